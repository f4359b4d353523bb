#include "store/chunked_pull.h"

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include <zstd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include <fmt/core.h>

#include "util/env.h"
#include "util/fs.h"
#include "util/log.h"
#include "util/text.h"

namespace regdisk::store {

namespace fs = std::filesystem;

namespace {

struct DCtxFree {
  void operator()(ZSTD_DCtx* d) const { ZSTD_freeDCtx(d); }
};

bool AllZero(const char* p, size_t n) {
  if (n < 16) return std::all_of(p, p + n, [](char c) { return c == 0; });
  static const char kZeros[16] = {};
  return std::memcmp(p, kZeros, 16) == 0 && std::memcmp(p, p + 16, n - 16) == 0;
}

// Decompresses one frame that must be exactly `frame` (no more, no less) and
// expand to exactly `want` bytes, into *out.
Status DecompressFrame(ZSTD_DCtx* dctx, std::string_view frame, uint64_t want, std::string* out,
                       const std::string& what) {
  const size_t span = ZSTD_findFrameCompressedSize(frame.data(), frame.size());
  if (ZSTD_isError(span) || span != frame.size()) {
    return InvalidArgument(what + " is not one zstd frame of " + std::to_string(frame.size()) + " bytes");
  }
  const unsigned long long declared = ZSTD_getFrameContentSize(frame.data(), frame.size());
  if (declared != want) {
    return InvalidArgument(what + " declares " +
                           (declared == ZSTD_CONTENTSIZE_UNKNOWN || declared == ZSTD_CONTENTSIZE_ERROR
                                ? std::string("no content size")
                                : std::to_string(declared) + " bytes") +
                           " for a chunk of " + std::to_string(want));
  }
  out->resize(want);
  const size_t got = ZSTD_decompressDCtx(dctx, out->data(), out->size(), frame.data(), frame.size());
  if (ZSTD_isError(got) || got != want) {
    return InvalidArgument(what + " does not decompress to its " + std::to_string(want) + " bytes" +
                           (ZSTD_isError(got) ? std::string(" (") + ZSTD_getErrorName(got) + ")" : ""));
  }
  return OkStatus();
}

struct ArchiveReadFree {
  void operator()(archive* a) const { archive_read_free(a); }
};

// Adjacent chunks fetched with one ranged read.
struct Batch {
  size_t first = 0, count = 0;
  uint64_t offset = 0, length = 0;
};

std::vector<Batch> MakeBatches(const oci::ChunkIndex& idx, uint64_t max_bytes) {
  std::vector<Batch> out;
  for (size_t k = 0; k < idx.chunks.size(); ++k) {
    const auto& c = idx.chunks[k];
    if (!out.empty() && out.back().offset + out.back().length == c.frame_offset &&
        out.back().length + c.frame_length <= max_bytes) {
      ++out.back().count;
      out.back().length += c.frame_length;
      continue;
    }
    out.push_back({k, 1, c.frame_offset, c.frame_length});
  }
  return out;
}

Status ReadRange(image::BlobRangeReader& r, const oci::Descriptor& layer, uint64_t offset, uint64_t length,
                 std::string* out) {
  out->clear();
  out->reserve(length);
  RETURN_IF_ERROR(r.Read(layer, offset, length, [&](std::string_view chunk) -> Status {
    if (out->size() + chunk.size() > length) return DataLoss("the registry sent more than the range asked for");
    out->append(chunk);
    return OkStatus();
  }));
  if (out->size() != length) {
    return DataLoss("the registry sent " + std::to_string(out->size()) + " of " + std::to_string(length) + " bytes");
  }
  return OkStatus();
}

}  // namespace

Result<std::string> CheckTarHead(std::string_view head, uint64_t disk_size) {
  auto bad = [](const std::string& why) { return InvalidArgument("the chunked layer's tar header " + why); };
  std::unique_ptr<archive, ArchiveReadFree> a(archive_read_new());
  archive_read_support_format_tar(a.get());
  if (archive_read_open_memory(a.get(), head.data(), head.size()) != ARCHIVE_OK) return bad("cannot be read");
  std::string last;
  archive_entry* e = nullptr;
  for (int i = 0;; ++i) {
    if (i == 8) return bad("holds more entries than a disk directory and its disk");
    const int r = archive_read_next_header(a.get(), &e);
    if (r != ARCHIVE_OK && r != ARCHIVE_WARN) return bad("is not a tar of the disk's entries");
    const char* p = archive_entry_pathname(e);
    const std::string path = p ? p : "";
    const bool is_dir = archive_entry_filetype(e) == AE_IFDIR;
    if (is_dir && (path == "disk" || path == "disk/" || path == "./disk" || path == "./disk/")) continue;
    std::string name = path.rfind("./", 0) == 0 ? path.substr(2) : path;
    if (archive_entry_filetype(e) != AE_IFREG || name.rfind("disk/", 0) != 0) {
      return bad("has the entry " + Printable(path, 100) + " where the disk's file belongs");
    }
    name = name.substr(5);
    if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos) {
      return bad("names the disk " + Printable(path, 100) + ", not disk/NAME");
    }
    if (!archive_entry_size_is_set(e) || static_cast<uint64_t>(archive_entry_size(e)) != disk_size) {
      return bad("gives the disk " + std::to_string(archive_entry_size(e)) + " bytes, not the index's " +
                 std::to_string(disk_size));
    }
    last = "/disk/" + name;
    break;
  }
  // The disk's data must start right after its header: no byte of the
  // header frame may be read as disk data.
  char byte;
  if (archive_read_data(a.get(), &byte, 1) > 0) return bad("frame runs past the disk's header into its data");
  return last;
}

Result<ChunkedDisk> PullChunkedLayer(image::ImageSource& src, const oci::Descriptor& layer,
                                     const oci::ChunkIndexLocation& loc, const fs::path& staging,
                                     const ChunkedPullOptions& o) {
  ASSIGN_OR_RETURN(std::unique_ptr<image::BlobRangeReader> reader, src.OpenRangeReader());
  std::string bytes;
  RETURN_IF_ERROR(ReadRange(*reader, layer, loc.offset, loc.length, &bytes).Annotate("reading the chunk index"));
  ASSIGN_OR_RETURN(oci::ChunkIndex idx, ParseChunkIndex(bytes, loc, static_cast<uint64_t>(layer.size)));
  bytes = {};
  if (idx.disk_size > o.max_disk_bytes) {
    return ResourceExhausted(fmt::format("the chunked disk of {} is {} bytes, over the maximum disk size of {} bytes; "
                                         "raise it with --max-disk-size if the image is trusted",
                                         o.label, idx.disk_size, o.max_disk_bytes));
  }

  // The tar header frame: the disk's name, and proof that a plain tar
  // reader sees the disk where the index says.
  std::unique_ptr<ZSTD_DCtx, DCtxFree> dctx(ZSTD_createDCtx());
  if (idx.HeaderFrameLength() > ZSTD_compressBound(oci::chunked::kMaxDataOffset)) {
    return InvalidArgument("the chunked layer's tar header frame is " + std::to_string(idx.HeaderFrameLength()) +
                           " bytes, more than a tar header needs");
  }
  std::string frame, head;
  RETURN_IF_ERROR(ReadRange(*reader, layer, 0, idx.HeaderFrameLength(), &frame).Annotate("reading the tar header"));
  RETURN_IF_ERROR(DecompressFrame(dctx.get(), frame, idx.data_offset, &head, "the tar header frame"));
  ChunkedDisk out;
  ASSIGN_OR_RETURN(out.image_path, CheckTarHead(head, idx.disk_size));
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

  const std::vector<Batch> batches = MakeBatches(idx, o.max_batch_bytes);
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
    std::unique_ptr<ZSTD_DCtx, DCtxFree> d(ZSTD_createDCtx());
    std::string buf, chunk;
    std::array<uint8_t, 32> sum{};
    for (;;) {
      const size_t b = next.fetch_add(1);
      if (b >= batches.size() || failed()) return;
      if (o.cancel && !o.cancel->status().ok()) return fail(o.cancel->status());
      const Batch& batch = batches[b];
      if (Status st = ReadRange(*r, layer, batch.offset, batch.length, &buf); !st.ok()) {
        return fail(std::move(st).Annotate(fmt::format("fetching chunks {}..{} of {}", batch.first,
                                                       batch.first + batch.count - 1, o.label)));
      }
      for (size_t k = batch.first; k < batch.first + batch.count; ++k) {
        const oci::ChunkEntry& c = idx.chunks[k];
        const std::string what = fmt::format("chunk {} of {}", k, o.label);
        std::string_view f(buf.data() + (c.frame_offset - batch.offset), c.frame_length);
        const uint64_t len = idx.ChunkLength(k);
        if (Status st = DecompressFrame(d.get(), f, len, &chunk, what); !st.ok()) return fail(std::move(st));
        if (c.zero) {
          if (!AllZero(chunk.data(), chunk.size())) {
            return fail(DataLoss(what + " failed verification: the index marks it zero but it holds data"));
          }
          ++zero_chunks;
          continue;
        }
        EVP_Digest(chunk.data(), chunk.size(), sum.data(), nullptr, EVP_sha256(), nullptr);
        if (sum != c.sha256) {
          oci::Digest got = oci::Digest::Sha256Of(chunk);
          std::string want;
          for (uint8_t x : c.sha256) want += fmt::format("{:02x}", x);
          return fail(DataLoss(what + " failed verification: expected sha256:" + want + ", got " + got.str()));
        }
        if (Status st = PWriteAll(fd.get(), chunk, uint64_t{k} << idx.chunk_shift); !st.ok()) {
          return fail(std::move(st).Annotate("writing " + what));
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
