#include "store/chunked_pull.h"

#include <fcntl.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

#include <fmt/core.h>

#include "store/chunk_fetch.h"
#include "util/env.h"
#include "util/fs.h"
#include "util/log.h"
#include "util/text.h"

namespace regdisk::store {

namespace fs = std::filesystem;

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
  out.file = staging / "disk.raw";
  ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(out.file, O_RDWR | O_CREAT | O_TRUNC, 0644));
  uint64_t data_bytes = 0;
  for (size_t k = 0; k < idx.chunks.size(); ++k) {
    if (!idx.chunks[k].zero) data_bytes += idx.ChunkLength(k);
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

  const std::vector<ChunkBatch> batches = CoalesceChunks(idx, AllChunks(idx), o.max_batch_bytes, 0);
  out.requests = batches.size() + 2;
  const uint64_t total = static_cast<uint64_t>(layer.size);
  std::atomic<size_t> next{0};
  std::atomic<uint64_t> fetched{0}, zero_chunks{0};
  std::mutex mu;  // failure, and progress events (one at a time, in order)
  Status failure;
  uint64_t reported = 0;
  auto fail = [&](Status st) {
    std::lock_guard lock(mu);
    if (failure.ok()) failure = std::move(st);
  };
  auto failed = [&] {
    std::lock_guard lock(mu);
    return !failure.ok();
  };
  if (o.on_progress) o.on_progress({image::ProgressEvent::Kind::kStart, layer.digest, 0, total, {}});

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
        if (Status st = decoder.Decode(idx, k, FrameOf(idx, batch, buf, k), &chunk, o.label); !st.ok()) {
          return fail(std::move(st));
        }
        if (idx.chunks[k].zero) {
          ++zero_chunks;
          continue;
        }
        if (Status st = PWriteAll(fd.get(), chunk, uint64_t{k} << idx.chunk_shift); !st.ok()) {
          return fail(std::move(st).Annotate(fmt::format("writing chunk {} of {}", k, o.label)));
        }
      }
      const uint64_t now = fetched += batch.length;
      if (o.on_progress) {
        std::lock_guard lock(mu);
        if (now > reported) {
          reported = now;
          o.on_progress({image::ProgressEvent::Kind::kBytes, layer.digest, now, total, {}});
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
  out.zero_chunks = zero_chunks;
  log::Info("{}: {} chunks verified ({} zero) in {} requests", o.label, out.chunks, out.zero_chunks, out.requests);
  return out;
}

}  // namespace regdisk::store
