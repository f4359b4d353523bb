#include "store/chunk_fetch.h"

#include <archive.h>
#include <archive_entry.h>
#include <openssl/evp.h>
#include <zstd.h>

#include <algorithm>
#include <array>
#include <thread>

#include <fmt/core.h>

#include "util/bytes.h"
#include "util/text.h"

namespace regdisk::store {

namespace {

struct ArchiveReadFree {
  void operator()(archive* a) const { archive_read_free(a); }
};

std::string Hex(const std::array<uint8_t, 32>& sum) {
  std::string out;
  out.reserve(64);
  for (uint8_t x : sum) out += fmt::format("{:02x}", x);
  return out;
}

}  // namespace

Status ReadRange(image::BlobRangeReader& r, const oci::Descriptor& blob, uint64_t offset, uint64_t length,
                 std::string* out, const CancelToken* cancel) {
  out->clear();
  out->reserve(length);
  const registry::BlobSink sink = [&](std::string_view chunk) -> Status {
    if (out->size() + chunk.size() > length) return DataLoss("the registry sent more than the range asked for");
    out->append(chunk);
    return OkStatus();
  };
  RETURN_IF_ERROR(cancel ? r.ReadCancellable(blob, offset, length, sink, *cancel) : r.Read(blob, offset, length, sink));
  if (out->size() != length) {
    return DataLoss("the registry sent " + std::to_string(out->size()) + " of " + std::to_string(length) + " bytes");
  }
  return OkStatus();
}

ChunkDecoder::ChunkDecoder() : dctx_(ZSTD_createDCtx()) {}
ChunkDecoder::~ChunkDecoder() { ZSTD_freeDCtx(dctx_); }

Status ChunkDecoder::DecompressExact(std::string_view frame, uint64_t want, std::string* out,
                                     const std::string& what) {
  if (dctx_ == nullptr) return ResourceExhausted("cannot allocate a zstd decompression context");
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
  const size_t got = ZSTD_decompressDCtx(dctx_, out->data(), out->size(), frame.data(), frame.size());
  if (ZSTD_isError(got) || got != want) {
    return InvalidArgument(what + " does not decompress to its " + std::to_string(want) + " bytes" +
                           (ZSTD_isError(got) ? std::string(" (") + ZSTD_getErrorName(got) + ")" : ""));
  }
  return OkStatus();
}

Status VerifyChunk(const oci::ChunkIndex& index, size_t k, std::string_view bytes, const std::string& label) {
  const std::string what = fmt::format("chunk {} of {}", k, label);
  if (bytes.size() != index.ChunkLength(k)) {
    return DataLoss(fmt::format("{} failed verification: {} bytes, not {}", what, bytes.size(), index.ChunkLength(k)));
  }
  const oci::ChunkEntry& c = index.chunks[k];
  if (c.zero) {
    if (!AllZero(bytes.data(), bytes.size())) {
      return DataLoss(what + " failed verification: the index marks it zero but it holds data");
    }
    return OkStatus();
  }
  std::array<uint8_t, 32> sum{};
  EVP_Digest(bytes.data(), bytes.size(), sum.data(), nullptr, EVP_sha256(), nullptr);
  if (sum != c.sha256) {
    return DataLoss(what + " failed verification: expected sha256:" + Hex(c.sha256) + ", got sha256:" + Hex(sum));
  }
  return OkStatus();
}

Status ChunkDecoder::Decode(const oci::ChunkIndex& index, size_t k, std::string_view frame, std::string* out,
                            const std::string& label) {
  RETURN_IF_ERROR(DecompressExact(frame, index.ChunkLength(k), out, fmt::format("chunk {} of {}", k, label)));
  return VerifyChunk(index, k, *out, label);
}

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

Result<ChunkedLayerHead> OpenChunkedLayer(image::BlobRangeReader& r, const oci::Descriptor& layer,
                                          const oci::ChunkIndexLocation& loc, uint64_t max_disk_bytes,
                                          const std::string& label, image::BlobRangeReader* head_reader,
                                          uint64_t head_guess_bytes) {
  // The header guess, on its own connection, while this one reads the index.
  // The frames end before the index, so the guess stays inside the blob.
  std::string guess;
  Status guessed = OkStatus();
  std::thread guesser;
  if (head_reader != nullptr) {
    const uint64_t length = std::max<uint64_t>(1, std::min(head_guess_bytes, loc.offset));
    guesser = std::thread([&, length] { guessed = ReadRange(*head_reader, layer, 0, length, &guess); });
  }
  std::string bytes;
  Status indexed = ReadRange(r, layer, loc.offset, loc.length, &bytes).Annotate("reading the chunk index");
  if (guesser.joinable()) guesser.join();
  RETURN_IF_ERROR(indexed);
  ChunkedLayerHead out;
  ASSIGN_OR_RETURN(out.index, oci::ParseChunkIndex(bytes, loc, static_cast<uint64_t>(layer.size)));
  if (out.index.disk_size > max_disk_bytes) {
    return ResourceExhausted(fmt::format("the chunked disk of {} is {} bytes, over the maximum disk size of {} bytes; "
                                         "raise it with --max-disk-size if the image is trusted",
                                         label, out.index.disk_size, max_disk_bytes));
  }
  // The tar header frame: the disk's name, and proof that a plain tar
  // reader sees the disk where the index says.
  const uint64_t frame_length = out.index.HeaderFrameLength();
  if (frame_length > ZSTD_compressBound(oci::chunked::kMaxDataOffset)) {
    return InvalidArgument("the chunked layer's tar header frame is " + std::to_string(frame_length) +
                           " bytes, more than a tar header needs");
  }
  if (head_reader != nullptr) {
    RETURN_IF_ERROR(std::move(guessed).Annotate("reading the tar header"));
    if (frame_length <= guess.size()) {
      bytes = guess.substr(0, frame_length);
    } else {
      // A header frame longer than the guess: the rest, after it.
      RETURN_IF_ERROR(ReadRange(r, layer, guess.size(), frame_length - guess.size(), &bytes)
                          .Annotate("reading the tar header"));
      bytes.insert(0, guess);
    }
  } else {
    RETURN_IF_ERROR(ReadRange(r, layer, 0, frame_length, &bytes).Annotate("reading the tar header"));
  }
  std::string head;
  ChunkDecoder decoder;
  RETURN_IF_ERROR(decoder.DecompressExact(bytes, out.index.data_offset, &head, "the tar header frame"));
  ASSIGN_OR_RETURN(out.image_path, CheckTarHead(head, out.index.disk_size));
  out.guess = std::move(guess);
  return out;
}

std::vector<size_t> AllChunks(const oci::ChunkIndex& index) {
  std::vector<size_t> all(index.chunks.size());
  for (size_t k = 0; k < all.size(); ++k) all[k] = k;
  return all;
}

std::vector<ChunkBatch> CoalesceChunks(const oci::ChunkIndex& index, const std::vector<size_t>& wanted,
                                       uint64_t max_bytes, uint64_t max_gap_bytes) {
  std::vector<ChunkBatch> out;
  for (size_t k : wanted) {
    const oci::ChunkEntry& c = index.chunks[k];
    if (!out.empty()) {
      ChunkBatch& b = out.back();
      const size_t last = b.first + b.count - 1;
      const uint64_t end = b.offset + b.length;
      // Frames are consecutive in the blob (the index's rules), so the gap
      // is the frames of the chunks between `last` and k.
      if (k > last && c.frame_offset >= end && c.frame_offset - end <= max_gap_bytes &&
          c.frame_offset + c.frame_length - b.offset <= max_bytes) {
        b.count = k - b.first + 1;
        b.length = c.frame_offset + c.frame_length - b.offset;
        continue;
      }
    }
    out.push_back({k, 1, c.frame_offset, c.frame_length});
  }
  return out;
}

Status ReadBatchFrames(image::BlobRangeReader& r, const oci::Descriptor& blob, const oci::ChunkIndex& index,
                       const ChunkBatch& batch, const FrameSink& on_frame, const CancelToken* cancel) {
  std::string buf;  // the bytes not yet handed on: from frame `next` on
  buf.reserve(std::min<uint64_t>(batch.length, 16 << 20));
  uint64_t received = 0, consumed = 0;  // bytes of the range, and those handed on
  size_t next = batch.first;
  const size_t end = batch.first + batch.count;
  const registry::BlobSink sink = [&](std::string_view piece) -> Status {
    if (received + piece.size() > batch.length) return DataLoss("the registry sent more than the range asked for");
    received += piece.size();
    buf.append(piece);
    size_t used = 0;
    while (next < end) {
      const oci::ChunkEntry& c = index.chunks[next];
      const uint64_t frame_end = c.frame_offset + c.frame_length - batch.offset;
      if (frame_end > received) break;
      const uint64_t at = c.frame_offset - batch.offset - consumed;
      RETURN_IF_ERROR(on_frame(next, std::string_view(buf).substr(at, c.frame_length)));
      used = frame_end - consumed;
      ++next;
    }
    if (used > 0) {
      buf.erase(0, used);
      consumed += used;
    }
    return OkStatus();
  };
  RETURN_IF_ERROR(cancel ? r.ReadCancellable(blob, batch.offset, batch.length, sink, *cancel)
                         : r.Read(blob, batch.offset, batch.length, sink));
  if (received != batch.length || next != end) {
    return DataLoss("the registry sent " + std::to_string(received) + " of " + std::to_string(batch.length) + " bytes");
  }
  return OkStatus();
}

std::string_view FrameOf(const oci::ChunkIndex& index, const ChunkBatch& batch, std::string_view fetched, size_t k) {
  const oci::ChunkEntry& c = index.chunks[k];
  return fetched.substr(c.frame_offset - batch.offset, c.frame_length);
}

}  // namespace regdisk::store
