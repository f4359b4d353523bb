// The pieces every reader of a chunked disk layer (docs/chunked-format.md)
// shares, whether it pulls the whole disk, only the chunks a new version
// changed, or the chunks a booting guest asks for: fetching byte ranges,
// opening the layer (index and tar header, both verified), grouping wanted
// chunks into few ranged reads, and turning one fetched frame into verified
// chunk bytes.
//
//   ASSIGN_OR_RETURN(ChunkedLayerHead head, OpenChunkedLayer(*reader, layer, loc, max_disk_bytes, label));
//   for (const ChunkBatch& b : CoalesceChunks(head.index, wanted, 8 << 20, 0)) {
//     RETURN_IF_ERROR(ReadRange(*reader, layer, b.offset, b.length, &buf));
//     for (size_t k = b.first; k < b.first + b.count; ++k) {
//       RETURN_IF_ERROR(decoder.Decode(head.index, k, FrameOf(head.index, b, buf, k), &chunk, label));
//       ... chunk holds exactly ChunkLength(k) verified bytes ...
//     }
//   }
//
// Everything read here comes from a registry and is refused unless it
// matches the index, which was itself checked against the digest in the
// layer's descriptor: InvalidArgument for a frame or header that lies,
// DataLoss for bytes that do not hash to the index's value.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "image/transport.h"
#include "oci/chunk_index.h"
#include "oci/manifest.h"
#include "util/cancel.h"
#include "util/status.h"

struct ZSTD_DCtx_s;

namespace regdisk::store {

// Reads exactly [offset, offset + length) of the blob into *out. With
// `cancel`, the read also stops once it is cancelled (a per-request
// deadline) and returns its status.
Status ReadRange(image::BlobRangeReader& r, const oci::Descriptor& blob, uint64_t offset, uint64_t length,
                 std::string* out, const CancelToken* cancel = nullptr);

struct ChunkedLayerHead {
  oci::ChunkIndex index;
  std::string image_path;  // "/disk/NAME", from the verified tar header
  // With a head_reader: the blob's first bytes, fetched beside the index.
  // They hold the first chunks' frames when those are small (a boot
  // sector and zeros compress to a few hundred bytes): a lazy disk decodes
  // and verifies those from here instead of fetching them again.
  std::string guess;
};

// The bytes at the blob's start fetched at the same time as the index, before
// the index says how long the tar header frame is: a header frame (a disk
// directory and one file's header, compressed) is 100 to 200 bytes, so the
// guess almost always holds it; a longer one is completed by a second read.
inline constexpr uint64_t kHeadGuessBytes = 4 << 10;

// Reads the index (verified against the descriptor's annotation) and the
// tar header frame (checked by CheckTarHead). ResourceExhausted when the
// disk is larger than max_disk_bytes.
//
// With `head_reader` (a second connection: the lazy path's, where one round
// trip matters), the first `head_guess_bytes` of the blob are fetched on it
// while `r` fetches the index, so both arrive in one round trip; they are
// used only once the index is verified, and only the header frame's bytes
// the index names. Without it, the header frame is read on `r` after the
// index. Either way a registry that sends a short, long or wrong header is
// refused (DataLoss or InvalidArgument naming the tar header), and an index
// error comes first. The guess fetches some of chunk 0's frame too, so a
// pull (whose delta must fetch only the header frame and the changed
// frames) passes no head_reader.
Result<ChunkedLayerHead> OpenChunkedLayer(image::BlobRangeReader& r, const oci::Descriptor& layer,
                                          const oci::ChunkIndexLocation& loc, uint64_t max_disk_bytes,
                                          const std::string& label, image::BlobRangeReader* head_reader = nullptr,
                                          uint64_t head_guess_bytes = kHeadGuessBytes);

// Checks the header frame's decompressed bytes: a tar whose last header is
// disk/NAME, a regular file of `disk_size` bytes, ending exactly where the
// disk's data begins. Returns "/disk/NAME".
Result<std::string> CheckTarHead(std::string_view head, uint64_t disk_size);

// Chunks [first, first + count), whose frames are consecutive in the blob:
// one ranged read of [offset, offset + length).
struct ChunkBatch {
  size_t first = 0, count = 0;
  uint64_t offset = 0, length = 0;
};

// Groups `wanted` (chunk numbers, ascending, each < index.chunks.size())
// into batches of at most max_bytes each (a single larger frame is a batch
// of its own). Two wanted chunks share a batch when the frames between them
// add at most max_gap_bytes: those chunks are fetched too, which costs
// fewer requests for a few bytes more.
std::vector<ChunkBatch> CoalesceChunks(const oci::ChunkIndex& index, const std::vector<size_t>& wanted,
                                       uint64_t max_bytes, uint64_t max_gap_bytes);

// Fetches one batch's range and hands each chunk's frame to on_frame(k,
// frame) the moment its last byte has arrived, in order from batch.first:
// a caller can verify and use the first chunks of a large read while the
// rest is still on the wire. An error from on_frame stops the read and is
// returned (the reader's connection is then in an unknown state: do not
// reuse it); so does a registry that sends more or fewer bytes than the
// range. With `cancel`, as ReadRange.
using FrameSink = std::function<Status(size_t k, std::string_view frame)>;
Status ReadBatchFrames(image::BlobRangeReader& r, const oci::Descriptor& blob, const oci::ChunkIndex& index,
                       const ChunkBatch& batch, const FrameSink& on_frame, const CancelToken* cancel = nullptr);

// All chunks, in order.
std::vector<size_t> AllChunks(const oci::ChunkIndex& index);

// Chunk k's frame within the bytes a batch fetched.
std::string_view FrameOf(const oci::ChunkIndex& index, const ChunkBatch& batch, std::string_view fetched, size_t k);

// OK when `bytes` are chunk k as the index describes it: its length, and
// its SHA-256 (or all zero for a zero chunk); DataLoss naming the chunk
// otherwise. For chunks read back from a local file as well as fetched.
Status VerifyChunk(const oci::ChunkIndex& index, size_t k, std::string_view bytes, const std::string& label);

// Decompresses and verifies chunk frames; one per thread.
class ChunkDecoder {
 public:
  ChunkDecoder();
  ~ChunkDecoder();
  ChunkDecoder(const ChunkDecoder&) = delete;
  ChunkDecoder& operator=(const ChunkDecoder&) = delete;

  // *out = chunk k's bytes (ChunkLength(k) of them), once the frame is
  // exactly one zstd frame of that content size and the bytes hash to the
  // index's value (or are all zero for a zero chunk). `label` names the
  // layer in errors ("layer 1 (sha256:…)").
  Status Decode(const oci::ChunkIndex& index, size_t k, std::string_view frame, std::string* out,
                const std::string& label);

  // One frame that must expand to exactly `want` bytes (the tar header).
  Status DecompressExact(std::string_view frame, uint64_t want, std::string* out, const std::string& what);

 private:
  ZSTD_DCtx_s* dctx_;
};

}  // namespace regdisk::store
