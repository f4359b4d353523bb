#include "store/local_chunks.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "util/bytes.h"
#include "util/log.h"

namespace regdisk::store {

namespace fs = std::filesystem;

Status CopyFileRange(int in, uint64_t in_off, int out, uint64_t out_off, uint64_t len) {
  bool fallback = false;
  while (len > 0 && !fallback) {
    loff_t i = static_cast<loff_t>(in_off), o = static_cast<loff_t>(out_off);
    const ssize_t n = ::copy_file_range(in, &i, out, &o, len, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EXDEV || errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP)) {
      fallback = true;
      break;
    }
    if (n < 0) return ErrnoStatus("copying a chunk");
    if (n == 0) return DataLoss("the chunk's source file is shorter than the chunk table says");
    in_off += static_cast<uint64_t>(n);
    out_off += static_cast<uint64_t>(n);
    len -= static_cast<uint64_t>(n);
  }
  std::string buf;
  while (len > 0) {
    buf.resize(std::min<uint64_t>(len, 1 << 20));
    const ssize_t n = ::pread(in, buf.data(), buf.size(), static_cast<off_t>(in_off));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoStatus("reading a chunk");
    if (n == 0) return DataLoss("the chunk's source file is shorter than the chunk table says");
    RETURN_IF_ERROR(PWriteAll(out, std::string_view(buf.data(), static_cast<size_t>(n)), out_off));
    in_off += static_cast<uint64_t>(n);
    out_off += static_cast<uint64_t>(n);
    len -= static_cast<uint64_t>(n);
  }
  return OkStatus();
}

Result<bool> RangeHashes(int fd, uint64_t off, uint64_t len, const ChunkTable::Sha256& want, std::string* buf) {
  buf->resize(len);
  uint64_t got = 0;
  while (got < len) {
    const ssize_t n = ::pread(fd, buf->data() + got, len - got, static_cast<off_t>(off + got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoStatus("reading back a copied chunk");
    if (n == 0) return false;
    got += static_cast<uint64_t>(n);
  }
  ChunkTable::Sha256 sum;
  EVP_Digest(buf->data(), len, sum.data(), nullptr, EVP_sha256(), nullptr);
  return sum == want;
}

LocalChunks::LocalChunks(LocalChunks&& other) noexcept
    : disks_dir_(std::move(other.disks_dir_)), wanted_(std::move(other.wanted_)), rotten_(other.rotten_.load()) {
  std::lock_guard lock(other.mu_);
  files_ = std::move(other.files_);
}

LocalChunks LocalChunks::Find(const fs::path& root, const oci::ChunkIndex& index,
                              const std::function<bool(size_t)>& wanted, std::string_view label) {
  Result<ChunkTable> table = ChunkTable::Open(root);
  if (!table.ok()) {
    log::Warn("{}: the store's chunk table cannot be opened; fetching every chunk ({})", label,
              table.status().message());
    return {};
  }
  return Find(*table, root / "disks", index, wanted, label);
}

LocalChunks LocalChunks::Find(ChunkTable& table, const fs::path& disks_dir, const oci::ChunkIndex& index,
                              const std::function<bool(size_t)>& wanted, std::string_view label) {
  LocalChunks out;
  std::vector<ChunkTable::Sha256> digests;
  for (size_t k = 0; k < index.chunks.size(); ++k) {
    if (!index.chunks[k].zero && wanted(k)) digests.push_back(index.chunks[k].sha256);
  }
  if (digests.empty()) return out;
  auto found = table.Find(index.chunk_shift, digests);
  if (!found.ok()) {
    // A hint only: without it the chunks are fetched.
    log::Warn("{}: the store's chunk table cannot be read; fetching every chunk ({})", label,
              found.status().message());
    return out;
  }
  out.disks_dir_ = disks_dir;
  for (size_t k = 0; k < index.chunks.size(); ++k) {
    const oci::ChunkEntry& c = index.chunks[k];
    if (c.zero || !wanted(k)) continue;
    auto it = found->find(c.sha256);
    if (it == found->end()) continue;
    Wanted w{c.sha256, uint64_t{k} << index.chunk_shift, index.ChunkLength(k), index.chunk_shift, {}};
    // A name from the table is one of the store's own directories: one that
    // is not a plain name is skipped.
    for (const ChunkTable::Place& p : it->second) {
      if (p.dir.empty() || p.dir[0] == '.' || p.dir.find('/') != std::string::npos || p.file.empty() ||
          p.file[0] == '.' || p.file.find('/') != std::string::npos) {
        continue;
      }
      w.places.push_back(p);
    }
    if (!w.places.empty()) out.wanted_.emplace(k, std::move(w));
  }
  return out;
}

std::vector<size_t> LocalChunks::chunks() const {
  std::vector<size_t> out;
  out.reserve(wanted_.size());
  for (const auto& [k, w] : wanted_) out.push_back(k);
  return out;
}

Result<bool> LocalChunks::Copy(size_t k, int fd) {
  auto it = wanted_.find(k);
  if (it == wanted_.end()) return false;
  const Wanted& w = it->second;
  thread_local std::string buf;
  bool mismatched = false;
  for (const ChunkTable::Place& p : w.places) {
    int in = -1;
    {
      std::lock_guard lock(mu_);
      const std::string key = p.dir + "/" + p.file;
      auto f = files_.find(key);
      if (f == files_.end()) {
        // Opened once, on first use; a disk removed since is not there.
        Result<UniqueFd> opened = OpenFile(disks_dir_ / p.dir / p.file, O_RDONLY | O_NOFOLLOW);
        f = files_.emplace(key, opened.ok() ? std::move(*opened) : UniqueFd()).first;
      }
      in = f->second.get();
    }
    if (in < 0) continue;
    if (Status copied = CopyFileRange(in, p.chunk << w.chunk_shift, fd, w.at, w.length); !copied.ok()) {
      if (copied.code() == Code::kDataLoss) {
        mismatched = true;
        continue;
      }
      return std::move(copied).Annotate("copying chunk " + std::to_string(k) + " from the store");
    }
    ASSIGN_OR_RETURN(bool good, RangeHashes(fd, w.at, w.length, w.sha256, &buf));
    if (good) return true;
    mismatched = true;
    log::Warn("chunk {} of the disk {} does not hash to what the store's chunk table says (the disk may be "
              "damaged: regdisk fsck checks it); fetching it instead",
              p.chunk, p.dir);
  }
  if (mismatched) ++rotten_;
  return false;
}

}  // namespace regdisk::store
