#include "store/chunked_pull.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include <fmt/core.h>

#include "store/chunk_bitmap.h"
#include "store/chunk_fetch.h"
#include "util/bytes.h"
#include "util/env.h"
#include "util/fs.h"
#include "util/log.h"
#include "util/text.h"

namespace regdisk::store {

namespace fs = std::filesystem;

namespace {

// Copies [in_off, in_off + len) of `in` to `out` at out_off: copy_file_range
// (which shares the extents on file systems that reflink), or read and
// write where the kernel cannot.
Status CopyRange(int in, uint64_t in_off, int out, uint64_t out_off, uint64_t len) {
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

// Whether [off, off + len) of fd hashes to `want`.
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

// Runs fn(i) for i in [0, n) on `threads` threads; the first failure stops
// the rest and is returned.
Status ParallelFor(size_t n, int threads, const std::function<Status(size_t)>& fn) {
  std::atomic<size_t> next{0};
  std::mutex mu;
  Status failure;
  auto work = [&] {
    for (;;) {
      const size_t i = next.fetch_add(1);
      if (i >= n) return;
      if (Status st = fn(i); !st.ok()) {
        std::lock_guard lock(mu);
        if (failure.ok()) failure = std::move(st);
        next = n;
        return;
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads && static_cast<size_t>(t) < n; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  return failure;
}

// Copies into fd every chunk the chunk table places in a disk of the store,
// verifying each copy; sets their bits in *have. A chunk whose copy does
// not verify (a disk that rotted, a stale row) tries its next place, and is
// fetched when none holds it.
Status ReuseLocalChunks(const oci::ChunkIndex& idx, int fd, const ChunkedPullOptions& o, ChunkBitmap* have,
                        ChunkedDisk* out) {
  std::vector<ChunkTable::Sha256> digests;
  for (size_t k = 0; k < idx.chunks.size(); ++k) {
    if (!idx.chunks[k].zero && !have->Test(k)) digests.push_back(idx.chunks[k].sha256);
  }
  if (digests.empty()) return OkStatus();
  auto found = o.table->Find(idx.chunk_shift, digests);
  if (!found.ok()) {
    // A hint only: without it the chunks are fetched.
    log::Warn("{}: the store's chunk table cannot be read; fetching every chunk ({})", o.label,
              found.status().message());
    return OkStatus();
  }
  if (found->empty()) return OkStatus();
  // The source files, opened once (a name from the table is one of the
  // store's own directories; one that is not a plain name is skipped).
  std::map<std::string, UniqueFd> files;
  for (const auto& [sum, places] : *found) {
    for (const auto& p : places) {
      const std::string key = p.dir + "/" + p.file;
      if (files.count(key) || p.dir.find('/') != std::string::npos || p.file.find('/') != std::string::npos ||
          p.dir.empty() || p.dir[0] == '.' || p.file.empty() || p.file[0] == '.') {
        continue;
      }
      auto f = OpenFile(o.disks_dir / p.dir / p.file, O_RDONLY | O_NOFOLLOW);
      if (f.ok()) files.emplace(key, std::move(*f));
    }
  }
  std::vector<size_t> candidates;
  for (size_t k = 0; k < idx.chunks.size(); ++k) {
    if (!idx.chunks[k].zero && !have->Test(k) && found->count(idx.chunks[k].sha256)) candidates.push_back(k);
  }
  std::atomic<uint64_t> reused{0}, bytes{0}, frames{0}, rotten{0};
  const int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  Status st = ParallelFor(candidates.size(), threads, [&](size_t i) -> Status {
    if (o.cancel && !o.cancel->status().ok()) return o.cancel->status();
    const size_t k = candidates[i];
    const oci::ChunkEntry& c = idx.chunks[k];
    const uint64_t len = idx.ChunkLength(k), at = uint64_t{k} << idx.chunk_shift;
    thread_local std::string buf;
    bool mismatched = false;
    for (const auto& p : found->at(c.sha256)) {
      auto f = files.find(p.dir + "/" + p.file);
      if (f == files.end()) continue;
      if (Status copied = CopyRange(f->second.get(), p.chunk << idx.chunk_shift, fd, at, len); !copied.ok()) {
        if (copied.code() == Code::kDataLoss) {
          mismatched = true;
          continue;
        }
        return std::move(copied).Annotate(fmt::format("copying chunk {} of {} from the store", k, o.label));
      }
      ASSIGN_OR_RETURN(bool good, RangeHashes(fd, at, len, c.sha256, &buf));
      if (good) {
        have->Set(k);
        ++reused;
        bytes += len;
        frames += c.frame_length;
        return OkStatus();
      }
      mismatched = true;
      log::Warn("chunk {} of the disk {} does not hash to what the store's chunk table says (the disk may be "
                "damaged: regdisk fsck checks it); fetching it instead",
                p.chunk, p.dir);
    }
    if (mismatched) ++rotten;
    return OkStatus();
  });
  RETURN_IF_ERROR(st);
  out->reused_chunks = reused;
  out->reused_bytes = bytes;
  out->reused_frame_bytes = frames;
  out->rotten_chunks = rotten;
  return OkStatus();
}

}  // namespace

Result<ChunkedDisk> PullChunkedLayer(image::ImageSource& src, const oci::Descriptor& layer,
                                     const oci::ChunkIndexLocation& loc, const fs::path& staging,
                                     const ChunkedPullOptions& o) {
  ASSIGN_OR_RETURN(std::unique_ptr<image::BlobRangeReader> reader, src.OpenRangeReader());
  ASSIGN_OR_RETURN(ChunkedLayerHead head, OpenChunkedLayer(*reader, layer, loc, o.max_disk_bytes, o.label));
  const oci::ChunkIndex& idx = head.index;
  ChunkedDisk out;
  out.image_path = std::move(head.image_path);
  out.size = idx.disk_size;
  out.chunks = idx.chunks.size();

  // The disk: sparse, its full size; only chunks with data are written.
  // Its bitmap says which chunks are there and verified: what a killed
  // pull of this layer left (same staging directory) is kept.
  out.file = staging / "disk.raw";
  ASSIGN_OR_RETURN(ChunkBitmap have, ChunkBitmap::Open(staging / "chunks.map", idx.chunks.size(), idx.chunk_shift,
                                                       loc.digest));
  if (struct stat st; have.Count() > 0 &&
                      (::stat(out.file.c_str(), &st) != 0 || static_cast<uint64_t>(st.st_size) != idx.disk_size)) {
    // Bits without the disk they describe (it was moved on, or cut short).
    for (uint64_t k = 0; k < have.chunks(); ++k) have.Clear(k);
  }
  ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(out.file, O_RDWR | O_CREAT | (have.Count() == 0 ? O_TRUNC : 0), 0644));
  if (have.Count() > 0 && have.from_previous_boot()) {
    // Bits may have reached the disk before the bytes did: check them.
    std::string buf;
    RETURN_IF_ERROR(have.Revalidate([&](uint64_t k) {
      const uint64_t len = idx.ChunkLength(k), at = k << idx.chunk_shift;
      if (!idx.chunks[k].zero) {
        auto good = RangeHashes(fd.get(), at, len, idx.chunks[k].sha256, &buf);
        return good.ok() && *good;
      }
      buf.resize(len);
      const ssize_t n = ::pread(fd.get(), buf.data(), len, static_cast<off_t>(at));
      return n == static_cast<ssize_t>(len) && AllZero(buf.data(), len);
    }));
  }
  out.resumed_chunks = have.Count();
  uint64_t data_bytes = 0, held_frame_bytes = 0;
  for (size_t k = 0; k < idx.chunks.size(); ++k) {
    if (have.Test(k)) {
      held_frame_bytes += idx.chunks[k].frame_length;
    } else if (!idx.chunks[k].zero) {
      data_bytes += idx.ChunkLength(k);
    }
  }
  if (out.resumed_chunks > 0) {
    log::Info("{}: resuming a pull: {} of {} chunks are already here, verified", o.label, out.resumed_chunks,
              out.chunks);
  }
  if (struct statvfs vfs; ::fstatvfs(fd.get(), &vfs) == 0) {
    const uint64_t free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
    if (data_bytes > free_bytes) {
      return NoSpace(fmt::format("the disk of {} needs {} bytes but the file system of {} has {} free; free some "
                                 "space (regdisk prune) and pull again",
                                 o.label, data_bytes, staging.string(), free_bytes));
    }
  }
  RETURN_IF_ERROR(Env::Default()->Truncate(fd.get(), idx.disk_size).Annotate(out.file.string()));

  // Chunks the store already holds: copied and verified, not fetched.
  if (o.table != nullptr) RETURN_IF_ERROR(ReuseLocalChunks(idx, fd.get(), o, &have, &out));
  std::vector<size_t> wanted;
  for (size_t k = 0; k < idx.chunks.size(); ++k) {
    if (!have.Test(k)) wanted.push_back(k);
  }

  const std::vector<ChunkBatch> batches = CoalesceChunks(idx, wanted, o.max_batch_bytes, o.max_gap_bytes);
  out.requests = batches.size() + 2;
  const uint64_t total = static_cast<uint64_t>(layer.size);
  std::atomic<size_t> next{0};
  std::atomic<uint64_t> fetched{0};
  std::mutex mu;  // failure, and progress events (one at a time, in order)
  Status failure;
  const uint64_t held = held_frame_bytes + out.reused_frame_bytes;
  uint64_t reported = held;
  auto fail = [&](Status st) {
    std::lock_guard lock(mu);
    if (failure.ok()) failure = std::move(st);
  };
  auto failed = [&] {
    std::lock_guard lock(mu);
    return !failure.ok();
  };
  // What the store held counts as bytes already there, as a resumed download's.
  if (o.on_progress) {
    o.on_progress({image::ProgressEvent::Kind::kStart, layer.digest, std::min(reported, total), total, {}});
  }

  auto work = [&](std::unique_ptr<image::BlobRangeReader> r) {
    ChunkDecoder decoder;
    std::string buf, chunk;
    for (;;) {
      const size_t b = next.fetch_add(1);
      if (b >= batches.size() || failed()) return;
      if (o.cancel && !o.cancel->status().ok()) return fail(o.cancel->status());
      const ChunkBatch& batch = batches[b];
      if (Status st = ReadRange(*r, layer, batch.offset, batch.length, &buf); !st.ok()) {
        return fail(std::move(st).Annotate(fmt::format("fetching chunks {}..{} of {}", batch.first,
                                                       batch.first + batch.count - 1, o.label)));
      }
      for (size_t k = batch.first; k < batch.first + batch.count; ++k) {
        if (have.Test(k)) continue;  // a gap the read bridged: here already
        if (Status st = decoder.Decode(idx, k, FrameOf(idx, batch, buf, k), &chunk, o.label); !st.ok()) {
          return fail(std::move(st));
        }
        if (idx.chunks[k].zero) {
          have.Set(k);  // a hole, as the file was made
          continue;
        }
        if (Status st = PWriteAll(fd.get(), chunk, uint64_t{k} << idx.chunk_shift); !st.ok()) {
          return fail(std::move(st).Annotate(fmt::format("writing chunk {} of {}", k, o.label)));
        }
        have.Set(k);
      }
      const uint64_t now = (fetched += batch.length) + held;
      if (o.on_progress) {
        std::lock_guard lock(mu);
        if (now > reported) {
          reported = now;
          o.on_progress({image::ProgressEvent::Kind::kBytes, layer.digest, std::min(now, total), total, {}});
        }
      }
    }
  };
  std::vector<std::thread> pool;
  const int n = std::max(1, std::min<int>(o.connections, static_cast<int>(batches.size())));
  for (int i = 0; i < n; ++i) {
    Result<std::unique_ptr<image::BlobRangeReader>> r = std::unique_ptr<image::BlobRangeReader>();
    if (i == 0) {
      r = std::move(reader);
    } else {
      r = src.OpenRangeReader();
    }
    if (!r.ok()) {
      fail(r.status());
      break;
    }
    pool.emplace_back(work, std::move(*r));
  }
  for (auto& t : pool) t.join();
  RETURN_IF_ERROR(failure);
  if (!have.Complete()) return Internal(fmt::format("{}: {} of {} chunks after the pull", o.label, have.Count(), out.chunks));
  out.zero_chunks = static_cast<uint64_t>(
      std::count_if(idx.chunks.begin(), idx.chunks.end(), [](const oci::ChunkEntry& c) { return c.zero; }));
  out.fetched_bytes = fetched;
  if (out.reused_chunks > 0 || o.table != nullptr) {
    log::Info("{}: {} chunks verified ({} zero); {} reused from the store ({} bytes, {} compressed bytes not "
              "fetched), {} compressed bytes fetched in {} requests",
              o.label, out.chunks, out.zero_chunks, out.reused_chunks, out.reused_bytes, out.reused_frame_bytes,
              out.fetched_bytes, out.requests);
  } else {
    log::Info("{}: {} chunks verified ({} zero) in {} requests", o.label, out.chunks, out.zero_chunks, out.requests);
  }
  out.index = std::move(head.index);
  return out;
}

}  // namespace regdisk::store
