#include "store/local_chunks.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "util/bytes.h"
#include "util/log.h"
#include "util/text.h"

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
  closed_ = other.closed_;
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
      auto plain = [](const std::string& n) {
        return !n.empty() && n[0] != '.' && n.find('/') == std::string::npos && n.find('\0') == std::string::npos;
      };
      if (!plain(p.dir) || !plain(p.file)) {
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

std::shared_ptr<UniqueFd> LocalChunks::Source(const ChunkTable::Place& p) {
  const std::string key = p.dir + "/" + p.file;
  {
    std::lock_guard lock(mu_);
    if (closed_) return nullptr;
    if (auto f = files_.find(key); f != files_.end()) return f->second;
  }
  // Opened outside the lock; a disk removed since, or anything but a
  // regular file (which O_NONBLOCK keeps from blocking the open), is not a
  // source.
  std::shared_ptr<UniqueFd> fd;
  if (Result<UniqueFd> opened = OpenFile(disks_dir_ / p.dir / p.file, O_RDONLY | O_NOFOLLOW | O_NONBLOCK);
      opened.ok()) {
    struct stat st;
    if (::fstat(opened->get(), &st) == 0 && S_ISREG(st.st_mode)) fd = std::make_shared<UniqueFd>(std::move(*opened));
  }
  std::lock_guard lock(mu_);
  if (closed_) return nullptr;
  return files_.emplace(key, fd).first->second;  // another thread's, if it was first
}

void LocalChunks::CloseFiles() {
  std::lock_guard lock(mu_);
  closed_ = true;
  files_.clear();
}

Result<bool> LocalChunks::CopyVerifyingFirst(int in, uint64_t in_off, const Wanted& w, int fd, std::string* buf) {
  buf->resize(w.length);
  uint64_t got = 0;
  while (got < w.length) {
    const ssize_t n = ::pread(in, buf->data() + got, w.length - got, static_cast<off_t>(in_off + got));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;  // unreadable or short: not this place
    got += static_cast<uint64_t>(n);
  }
  ChunkTable::Sha256 sum;
  EVP_Digest(buf->data(), w.length, sum.data(), nullptr, EVP_sha256(), nullptr);
  if (sum != w.sha256) return false;
  RETURN_IF_ERROR(PWriteAll(fd, std::string_view(buf->data(), w.length), w.at));
  return true;
}

Result<bool> LocalChunks::Copy(size_t k, int fd, CopyMode mode) {
  auto it = wanted_.find(k);
  if (it == wanted_.end()) return false;
  const Wanted& w = it->second;
  thread_local std::string buf;
  bool mismatched = false;
  for (const ChunkTable::Place& p : w.places) {
    const std::shared_ptr<UniqueFd> in = Source(p);
    if (!in) continue;
    const uint64_t in_off = p.chunk << w.chunk_shift;
    bool good = false;
    if (mode == CopyMode::kInPlace &&
        CopyFileRange(in->get(), in_off, fd, w.at, w.length).ok()) {
      ASSIGN_OR_RETURN(good, RangeHashes(fd, w.at, w.length, w.sha256, &buf));
    } else {
      // Verifying first, or the in-place copy failed: reading the source
      // apart from writing tells a bad source (try the next place) from a
      // disk that cannot be written (an error).
      ASSIGN_OR_RETURN(good, CopyVerifyingFirst(in->get(), in_off, w, fd, &buf));
    }
    if (good) return true;
    mismatched = true;
    log::Warn("chunk {} of the disk {} does not hash to what the store's chunk table says, or cannot be read (the "
              "disk may be damaged: regdisk fsck checks it); fetching it instead",
              p.chunk, Printable(p.dir));
  }
  if (mismatched) ++rotten_;
  return false;
}

}  // namespace regdisk::store
