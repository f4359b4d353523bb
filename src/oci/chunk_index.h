// The chunk index of a chunked disk layer (docs/chunked-format.md, version 1):
// where each guest-aligned chunk of a raw disk sits in the layer's zstd
// stream and what it hashes to. Pure encoding and parsing, no I/O.
//
//   ASSIGN_OR_RETURN(std::optional<ChunkIndexLocation> loc, ChunkIndexLocationOf(layer));
//   if (loc) {
//     std::string bytes = /* blob bytes [loc->offset, loc->offset + loc->length) */;
//     ASSIGN_OR_RETURN(ChunkIndex index, ParseChunkIndex(bytes, *loc, layer.size));
//   }
//
// Everything here comes from an image, so it is checked before it is
// believed: every refusal is InvalidArgument (DataLoss for a digest
// mismatch) with one line naming what lies.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "oci/digest.h"
#include "oci/manifest.h"
#include "util/status.h"

namespace regdisk::oci {

namespace chunked {
inline constexpr std::string_view kVersionAnnotation = "io.regdisk.chunked.version";
inline constexpr std::string_view kOffsetAnnotation = "io.regdisk.chunked.index.offset";
inline constexpr std::string_view kLengthAnnotation = "io.regdisk.chunked.index.length";
inline constexpr std::string_view kDigestAnnotation = "io.regdisk.chunked.index.digest";
inline constexpr uint32_t kIndexFrameMagic = 0x184D2A5B;  // a zstd skippable frame
inline constexpr uint32_t kSeekTableMagic = 0x184D2A5E;   // the seekable format's
inline constexpr uint32_t kSeekableFooterMagic = 0x8F92EAB1;
inline constexpr uint16_t kVersion = 1;
inline constexpr int kMinChunkShift = 16;  // 64 KiB
inline constexpr int kMaxChunkShift = 24;  // 16 MiB
inline constexpr size_t kHeaderBytes = 32;
inline constexpr size_t kEntryBytes = 48;
inline constexpr uint64_t kMaxPayloadBytes = 64ull << 20;
inline constexpr uint64_t kMaxDataOffset = 1 << 20;
inline constexpr uint64_t kMinFrameBytes = 9;  // the smallest zstd frame
}  // namespace chunked

// Where a layer's index is, from its descriptor's annotations.
struct ChunkIndexLocation {
  uint64_t offset = 0;
  uint64_t length = 0;  // the skippable frame, 8-byte header included
  Digest digest;
};

// nullopt when the descriptor is not a chunked layer of version 1 (no
// version annotation, another version, or not tar+zstd): such a layer is
// read as a single stream. A version-1 descriptor whose other annotations
// are malformed or point outside the blob is InvalidArgument.
Result<std::optional<ChunkIndexLocation>> ChunkIndexLocationOf(const Descriptor& layer);

struct ChunkEntry {
  uint64_t frame_offset = 0;
  uint32_t frame_length = 0;
  bool zero = false;
  std::array<uint8_t, 32> sha256{};  // all zero for a zero chunk
};

struct ChunkIndex {
  int chunk_shift = 20;
  uint64_t disk_size = 0;
  uint64_t data_offset = 0;  // of guest byte 0 in the uncompressed tar
  std::vector<ChunkEntry> chunks;

  uint64_t chunk_size() const { return uint64_t{1} << chunk_shift; }
  // The length of chunk k: chunk_size, or less for the last one.
  uint64_t ChunkLength(size_t k) const;
  // The compressed bytes before chunk 0 (the tar header frame).
  uint64_t HeaderFrameLength() const { return chunks.empty() ? 0 : chunks.front().frame_offset; }
};

// The number of chunks a disk of this size has.
uint64_t ChunkCount(uint64_t disk_size, int chunk_shift);

// The index frame's bytes (skippable header included), as build writes it.
std::string EncodeChunkIndex(const ChunkIndex& index);

// Checks `bytes` (the blob's bytes at `loc`) against loc's digest and every
// rule of docs/chunked-format.md ("What a verifier checks") for a blob of
// `blob_size` bytes, and returns the index.
Result<ChunkIndex> ParseChunkIndex(std::string_view bytes, const ChunkIndexLocation& loc, uint64_t blob_size);

}  // namespace regdisk::oci
