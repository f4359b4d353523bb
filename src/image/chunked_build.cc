#include "image/chunked_build.h"

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <openssl/evp.h>
#include <zstd.h>

#include <algorithm>
#include <bit>
#include <charconv>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "oci/chunk_index.h"
#include "util/bytes.h"
#include "util/process.h"
#include "util/text.h"

namespace regdisk::image {

namespace fs = std::filesystem;

namespace {

constexpr int kQemuUid = 107;
constexpr int kLevel = 3;
constexpr uint64_t kProgressStep = 4 << 20;

void PutLe32(std::string& out, uint64_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

struct ArchiveFree {
  void operator()(archive* a) const { archive_write_free(a); }
};

// The tar bytes before the disk's first byte: the disk/ directory and the
// header of disk/NAME (pax-restricted, as the single-stream layer).
Result<std::string> TarHead(const std::string& name, uint64_t size, int64_t mtime) {
  struct Sink {
    std::string* out;
  };
  std::string head;
  Sink sink{&head};
  std::unique_ptr<archive, ArchiveFree> a(archive_write_new());
  archive_write_set_format_pax_restricted(a.get());
  archive_write_set_bytes_per_block(a.get(), 0);  // unblocked: each header reaches the callback at once
  auto write_cb = [](archive*, void* user, const void* buf, size_t n) -> la_ssize_t {
    auto* s = static_cast<Sink*>(user);
    if (s->out) s->out->append(static_cast<const char*>(buf), n);
    return static_cast<la_ssize_t>(n);
  };
  if (archive_write_open(a.get(), &sink, nullptr, write_cb, nullptr) != ARCHIVE_OK) {
    return Internal("libarchive could not start the layer's tar");
  }
  for (int i = 0; i < 2; ++i) {
    std::unique_ptr<archive_entry, decltype(&archive_entry_free)> e(archive_entry_new(), archive_entry_free);
    archive_entry_set_pathname(e.get(), i == 0 ? "disk" : ("disk/" + name).c_str());
    archive_entry_set_uid(e.get(), kQemuUid);
    archive_entry_set_gid(e.get(), kQemuUid);
    archive_entry_set_mtime(e.get(), mtime, 0);
    archive_entry_set_filetype(e.get(), i == 0 ? AE_IFDIR : AE_IFREG);
    archive_entry_set_perm(e.get(), i == 0 ? 0555 : 0444);
    if (i == 1) archive_entry_set_size(e.get(), static_cast<la_int64_t>(size));
    if (archive_write_header(a.get(), e.get()) != ARCHIVE_OK) {
      const char* msg = archive_error_string(a.get());
      return Internal(std::string("writing the layer's tar header: ") + (msg ? msg : "unknown error"));
    }
  }
  sink.out = nullptr;  // what libarchive writes when it is freed is not ours
  if (head.empty() || head.size() % 512 != 0 || head.size() > oci::chunked::kMaxDataOffset) {
    return Internal("libarchive wrote a tar header of " + std::to_string(head.size()) + " bytes");
  }
  return head;
}

Result<std::string> CompressFrame(ZSTD_CCtx* cctx, const char* data, size_t n) {
  std::string out(ZSTD_compressBound(n), '\0');
  size_t got = ZSTD_compress2(cctx, out.data(), out.size(), data, n);
  if (ZSTD_isError(got)) return Internal(std::string("zstd failed: ") + ZSTD_getErrorName(got));
  out.resize(got);
  return out;
}

struct CCtxFree {
  void operator()(ZSTD_CCtx* c) const { ZSTD_freeCCtx(c); }
};
std::unique_ptr<ZSTD_CCtx, CCtxFree> NewCCtx() {
  std::unique_ptr<ZSTD_CCtx, CCtxFree> c(ZSTD_createCCtx());
  ZSTD_CCtx_setParameter(c.get(), ZSTD_c_compressionLevel, kLevel);
  ZSTD_CCtx_setParameter(c.get(), ZSTD_c_contentSizeFlag, 1);
  ZSTD_CCtx_setParameter(c.get(), ZSTD_c_checksumFlag, 0);
  return c;
}

// One chunk in flight: read and compressed by a worker, written in order
// by the calling thread.
struct Slot {
  uint64_t chunk = UINT64_MAX;  // which chunk the slot holds once ready
  bool ready = false;
  bool zero = false;
  std::string raw;    // empty for a zero chunk
  std::string frame;
  std::array<uint8_t, 32> sha256{};
};

}  // namespace

uint64_t DefaultChunkSize(uint64_t disk_size) {
  uint64_t size = kDefaultChunkSize;
  while (size < (uint64_t{1} << oci::chunked::kMaxChunkShift) &&
         oci::chunked::kHeaderBytes + oci::ChunkCount(disk_size, std::countr_zero(size)) * oci::chunked::kEntryBytes >
             oci::chunked::kMaxPayloadBytes) {
    size <<= 1;
  }
  return size;
}

Result<uint64_t> ParseChunkSize(std::string_view text) {
  auto bad = [&] {
    return InvalidArgument("--chunk-size \"" + Printable(text, 40) +
                           "\" is not a power of two from 64K to 16M; give one such as 256K or 1M");
  };
  uint64_t v = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end == text.data()) return bad();
  std::string_view unit(end, static_cast<size_t>(text.data() + text.size() - end));
  if (unit == "K" || unit == "k" || unit == "KiB") {
    v <<= 10;
  } else if (unit == "M" || unit == "m" || unit == "MiB") {
    v <<= 20;
  } else if (!unit.empty()) {
    return bad();
  }
  if (v < (uint64_t{1} << oci::chunked::kMinChunkShift) || v > (uint64_t{1} << oci::chunked::kMaxChunkShift) ||
      !std::has_single_bit(v)) {
    return bad();
  }
  return v;
}

Result<RawDisk> OpenRawDisk(const fs::path& disk_file, int disk_fd, const disk::DiskInfo& info) {
  RawDisk r;
  if (info.format == disk::Format::kRaw) {
    r.fd = disk_fd;
    r.size = info.virtual_size;
    return r;
  }
  // QEMU reads its own format: regdisk never interprets qcow2 clusters.
  ASSIGN_OR_RETURN(TempDir dir, TempDir::Create("regdisk-build"));
  const fs::path out = dir.path() / "disk.raw";
  // The validated file itself, by its descriptor, so a rename cannot swap it.
  const std::string src = "/proc/self/fd/" + std::to_string(disk_fd);
  Process::Options po;
  po.inherit_fds = {disk_fd};
  ASSIGN_OR_RETURN(Process::Output o,
                   Process::Run({"qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", src, out.string()},
                                std::chrono::hours(24), {}, &po));
  if (o.exit_code != 0) {
    std::string err = o.err.substr(0, o.err.find('\n'));
    return InvalidArgument("qemu-img could not read " + disk_file.string() + " as qcow2: " + Printable(err, 200));
  }
  ASSIGN_OR_RETURN(r.owned, OpenFile(out, O_RDONLY));
  struct stat st;
  if (::fstat(r.owned.get(), &st) != 0) return ErrnoStatus("reading " + out.string());
  if (static_cast<uint64_t>(st.st_size) != info.virtual_size) {
    return Internal("qemu-img wrote " + std::to_string(st.st_size) + " bytes for a disk of " +
                    std::to_string(info.virtual_size));
  }
  r.fd = r.owned.get();
  r.size = info.virtual_size;
  r.dir.emplace(std::move(dir));
  return r;
}

Result<ChunkedLayer> WriteChunkedLayer(int raw_fd, uint64_t size, const ChunkedLayerOptions& o, int out_fd) {
  if (size == 0) return InvalidArgument(o.label + " is empty; a chunked layer needs a disk of at least one byte");
  const int shift = std::countr_zero(o.chunk_size);
  const uint64_t n = oci::ChunkCount(size, shift);
  if (oci::chunked::kHeaderBytes + n * oci::chunked::kEntryBytes > oci::chunked::kMaxPayloadBytes) {
    return InvalidArgument(o.label + " needs " + std::to_string(n) + " chunks of " + std::to_string(o.chunk_size) +
                           " bytes, more than a chunk index holds; give a larger --chunk-size");
  }
  ASSIGN_OR_RETURN(std::string head, TarHead(o.name, size, o.mtime));
  const std::string tail((512 - size % 512) % 512 + 1024, '\0');

  oci::Hasher diff, blob;
  uint64_t written = 0;
  std::string seek_entries;
  uint32_t frames = 0;
  auto emit = [&](std::string_view frame, uint64_t decompressed) -> Status {
    blob.Update(frame);
    RETURN_IF_ERROR(WriteAll(out_fd, frame).Annotate("writing the layer"));
    written += frame.size();
    PutLe32(seek_entries, frame.size());
    PutLe32(seek_entries, decompressed);
    ++frames;
    return OkStatus();
  };
  auto head_cctx = NewCCtx();
  ASSIGN_OR_RETURN(std::string head_frame, CompressFrame(head_cctx.get(), head.data(), head.size()));
  diff.Update(head);
  RETURN_IF_ERROR(emit(head_frame, head.size()));

  // Workers take chunks in order and fill the slot of each; the calling
  // thread writes slot k once it is ready. A worker waits while its chunk
  // is a full window ahead of the writer, which bounds memory.
  const int threads = std::max(1, o.threads);
  const uint64_t window = std::max<uint64_t>(2 * threads, std::min<uint64_t>(16, (64ull << 20) / o.chunk_size));
  std::vector<Slot> slots(window);
  std::mutex mu;
  std::condition_variable cv;
  uint64_t next_chunk = 0, next_write = 0;
  Status failure;
  auto work = [&] {
    auto cctx = NewCCtx();
    std::string buf;
    for (;;) {
      uint64_t k;
      {
        std::unique_lock lock(mu);
        if (next_chunk >= n || !failure.ok()) return;
        k = next_chunk++;
        cv.wait(lock, [&] { return k < next_write + window || !failure.ok(); });
        if (!failure.ok()) return;
      }
      const uint64_t start = k << shift, len = std::min(o.chunk_size, size - start);
      buf.resize(len);
      Status st;
      for (uint64_t got = 0; got < len && st.ok();) {
        ssize_t r = ::pread(raw_fd, buf.data() + got, len - got, static_cast<off_t>(start + got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) st = ErrnoStatus("reading " + o.label);
        else if (r == 0) st = DataLoss(o.label + " shrank while it was being read");
        else got += static_cast<uint64_t>(r);
      }
      Slot s;
      s.chunk = k;
      if (st.ok()) {
        s.zero = AllZero(buf.data(), len);
        if (!s.zero) {
          EVP_Digest(buf.data(), len, s.sha256.data(), nullptr, EVP_sha256(), nullptr);
        }
        auto f = CompressFrame(cctx.get(), buf.data(), len);
        if (f.ok()) s.frame = std::move(*f);
        else st = f.status();
        if (!s.zero) s.raw.swap(buf);
      }
      std::lock_guard lock(mu);
      if (!st.ok()) {
        if (failure.ok()) failure = st;
      } else {
        s.ready = true;
        slots[k % window] = std::move(s);
      }
      cv.notify_all();
    }
  };
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; ++i) pool.emplace_back(work);

  oci::ChunkIndex index;
  index.chunk_shift = shift;
  index.disk_size = size;
  index.data_offset = head.size();
  index.chunks.resize(n);
  ChunkedLayer out;
  out.chunks = n;
  auto report = [&](ProgressEvent::Kind kind, uint64_t done) {
    if (o.on_progress) o.on_progress({.kind = kind, .blob = {}, .done = done, .total = size, .label = o.label});
  };
  report(ProgressEvent::Kind::kStart, 0);
  static const std::string kZeros(1 << 20, '\0');
  uint64_t reported = 0;
  Status st = [&]() -> Status {
    for (uint64_t k = 0; k < n; ++k) {
      Slot s;
      {
        std::unique_lock lock(mu);
        cv.wait(lock, [&] { return (slots[k % window].ready && slots[k % window].chunk == k) || !failure.ok(); });
        if (!failure.ok()) return failure;
        s = std::move(slots[k % window]);
        slots[k % window] = Slot{};
      }
      const uint64_t start = k << shift, len = std::min(o.chunk_size, size - start);
      if (s.zero) {
        for (uint64_t z = 0; z < len; z += kZeros.size()) diff.Update(kZeros.data(), std::min<uint64_t>(kZeros.size(), len - z));
        ++out.zero_chunks;
      } else {
        diff.Update(s.raw);
      }
      oci::ChunkEntry& e = index.chunks[k];
      e.frame_offset = written;
      e.frame_length = static_cast<uint32_t>(s.frame.size());
      e.zero = s.zero;
      e.sha256 = s.sha256;
      RETURN_IF_ERROR(emit(s.frame, len));
      {
        std::lock_guard lock(mu);
        next_write = k + 1;
      }
      cv.notify_all();
      if (start + len - reported >= kProgressStep) {
        reported = start + len;
        report(ProgressEvent::Kind::kBytes, reported);
      }
    }
    return OkStatus();
  }();
  {
    std::lock_guard lock(mu);
    if (!st.ok() && failure.ok()) failure = st;
    next_write = UINT64_MAX / 2;  // release any waiting worker
  }
  cv.notify_all();
  for (auto& t : pool) t.join();
  report(st.ok() ? ProgressEvent::Kind::kDone : ProgressEvent::Kind::kFailed, st.ok() ? size : reported);
  RETURN_IF_ERROR(st);

  ASSIGN_OR_RETURN(std::string tail_frame, CompressFrame(head_cctx.get(), tail.data(), tail.size()));
  diff.Update(tail);
  RETURN_IF_ERROR(emit(tail_frame, tail.size()));
  const std::string index_frame = oci::EncodeChunkIndex(index);
  const uint64_t index_offset = written;
  RETURN_IF_ERROR(emit(index_frame, 0));

  // The seekable format's seek table, last: every frame above, in order.
  std::string seek;
  PutLe32(seek, oci::chunked::kSeekTableMagic);
  PutLe32(seek, seek_entries.size() + 9);
  seek += seek_entries;
  PutLe32(seek, frames);
  seek.push_back('\0');  // no checksums
  PutLe32(seek, oci::chunked::kSeekableFooterMagic);
  blob.Update(seek);
  RETURN_IF_ERROR(WriteAll(out_fd, seek).Annotate("writing the layer"));
  written += seek.size();

  out.diff_id = diff.Finish();
  out.desc.media_type = std::string(oci::media::kOciLayerZstd);
  out.desc.size = static_cast<int64_t>(written);
  out.desc.digest = blob.Finish();
  out.desc.annotations = {
      {std::string(oci::chunked::kVersionAnnotation), std::to_string(oci::chunked::kVersion)},
      {std::string(oci::chunked::kOffsetAnnotation), std::to_string(index_offset)},
      {std::string(oci::chunked::kLengthAnnotation), std::to_string(index_frame.size())},
      {std::string(oci::chunked::kDigestAnnotation), oci::Digest::Sha256Of(index_frame).str()},
  };
  return out;
}

}  // namespace regdisk::image
