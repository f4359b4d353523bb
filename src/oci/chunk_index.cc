#include "oci/chunk_index.h"

#include <zstd.h>

#include <charconv>
#include <cstring>

namespace regdisk::oci {

using namespace chunked;

namespace {

uint64_t Le(std::string_view b, size_t at, size_t n) {
  uint64_t v = 0;
  for (size_t i = 0; i < n; ++i) v |= uint64_t{static_cast<uint8_t>(b[at + i])} << (8 * i);
  return v;
}

void PutLe(std::string& out, uint64_t v, size_t n) {
  for (size_t i = 0; i < n; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

Result<uint64_t> Decimal(const Descriptor& d, std::string_view key) {
  auto it = d.annotations.find(std::string(key));
  if (it == d.annotations.end()) {
    return InvalidArgument("the chunked layer " + d.digest.Short() + " has no " + std::string(key) + " annotation");
  }
  const std::string& s = it->second;
  uint64_t v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || end != s.data() + s.size()) {
    return InvalidArgument("the chunked layer " + d.digest.Short() + "'s " + std::string(key) +
                           " annotation is not a decimal number");
  }
  return v;
}

std::string Chunk(size_t k) { return "chunk " + std::to_string(k); }

}  // namespace

uint64_t ChunkCount(uint64_t disk_size, int chunk_shift) {
  return (disk_size >> chunk_shift) + ((disk_size & ((uint64_t{1} << chunk_shift) - 1)) != 0 ? 1 : 0);
}

uint64_t ChunkIndex::ChunkLength(size_t k) const {
  const uint64_t start = uint64_t{k} << chunk_shift;
  return std::min(chunk_size(), disk_size - start);
}

Result<std::optional<ChunkIndexLocation>> ChunkIndexLocationOf(const Descriptor& layer) {
  auto v = layer.annotations.find(std::string(kVersionAnnotation));
  if (v == layer.annotations.end() || v->second != std::to_string(kVersion) ||
      layer.media_type != media::kOciLayerZstd) {
    return std::optional<ChunkIndexLocation>();
  }
  ChunkIndexLocation loc;
  ASSIGN_OR_RETURN(loc.offset, Decimal(layer, kOffsetAnnotation));
  ASSIGN_OR_RETURN(loc.length, Decimal(layer, kLengthAnnotation));
  auto d = layer.annotations.find(std::string(kDigestAnnotation));
  if (d == layer.annotations.end()) {
    return InvalidArgument("the chunked layer " + layer.digest.Short() + " has no " + std::string(kDigestAnnotation) +
                           " annotation");
  }
  auto digest = Digest::Parse(d->second);
  if (!digest.ok() || digest->algorithm() != "sha256") {
    return InvalidArgument("the chunked layer " + layer.digest.Short() + "'s index digest is not a sha256 digest");
  }
  loc.digest = *digest;
  const uint64_t size = static_cast<uint64_t>(std::max<int64_t>(layer.size, 0));
  if (loc.length < 8 + kHeaderBytes || loc.length > 8 + kMaxPayloadBytes) {
    return InvalidArgument("the chunked layer " + layer.digest.Short() + "'s index length " +
                           std::to_string(loc.length) + " is outside 40 bytes..64 MiB");
  }
  // The seek table (17 bytes at least) follows the index.
  if (loc.offset > size || size - loc.offset < loc.length + 17) {
    return InvalidArgument("the chunked layer " + layer.digest.Short() + "'s index annotation points outside the blob (" +
                           std::to_string(loc.offset) + "+" + std::to_string(loc.length) + " of " +
                           std::to_string(size) + " bytes)");
  }
  return std::optional<ChunkIndexLocation>(loc);
}

std::string EncodeChunkIndex(const ChunkIndex& index) {
  std::string payload;
  payload.reserve(kHeaderBytes + index.chunks.size() * kEntryBytes);
  payload += "RDCI";
  PutLe(payload, kVersion, 2);
  PutLe(payload, static_cast<uint64_t>(index.chunk_shift), 1);
  PutLe(payload, 0, 1);
  PutLe(payload, index.disk_size, 8);
  PutLe(payload, index.data_offset, 8);
  PutLe(payload, index.chunks.size(), 8);
  for (const auto& c : index.chunks) {
    PutLe(payload, c.frame_offset, 8);
    PutLe(payload, c.frame_length, 4);
    PutLe(payload, c.zero ? 1 : 0, 4);
    payload.append(reinterpret_cast<const char*>(c.sha256.data()), c.sha256.size());
  }
  std::string out;
  PutLe(out, kIndexFrameMagic, 4);
  PutLe(out, payload.size(), 4);
  return out + payload;
}

Result<ChunkIndex> ParseChunkIndex(std::string_view bytes, const ChunkIndexLocation& loc, uint64_t blob_size) {
  auto bad = [](const std::string& what) { return InvalidArgument("the chunk index " + what); };
  if (bytes.size() != loc.length) {
    return bad("is " + std::to_string(bytes.size()) + " bytes, not the annotated " + std::to_string(loc.length));
  }
  if (Digest got = Digest::Sha256Of(bytes); got != loc.digest) {
    return DataLoss("the chunk index failed verification: expected " + loc.digest.str() + ", got " + got.str());
  }
  if (bytes.size() < 8 + kHeaderBytes) return bad("is too short for its header");
  if (Le(bytes, 0, 4) != kIndexFrameMagic) return bad("is not in a regdisk index frame (wrong skippable magic)");
  if (Le(bytes, 4, 4) != bytes.size() - 8) return bad("frame's size field does not match its length");
  std::string_view p = bytes.substr(8);
  if (p.substr(0, 4) != "RDCI") return bad("has the wrong magic");
  if (Le(p, 4, 2) != kVersion) {
    return InvalidArgument("the chunk index has version " + std::to_string(Le(p, 4, 2)) +
                           ", which this regdisk does not read (it reads version 1); upgrade regdisk");
  }
  ChunkIndex idx;
  idx.chunk_shift = static_cast<int>(Le(p, 6, 1));
  if (idx.chunk_shift < kMinChunkShift || idx.chunk_shift > kMaxChunkShift) {
    return bad("declares a chunk size of 2^" + std::to_string(idx.chunk_shift) + " bytes, outside 64 KiB..16 MiB");
  }
  if (Le(p, 7, 1) != 0) return bad("has unknown flags");
  idx.disk_size = Le(p, 8, 8);
  idx.data_offset = Le(p, 16, 8);
  const uint64_t count = Le(p, 24, 8);
  if (idx.disk_size == 0) return bad("declares an empty disk");
  if (count != ChunkCount(idx.disk_size, idx.chunk_shift)) {
    return bad("lists " + std::to_string(count) + " chunks, but a disk of " + std::to_string(idx.disk_size) +
               " bytes has " + std::to_string(ChunkCount(idx.disk_size, idx.chunk_shift)));
  }
  if ((p.size() - kHeaderBytes) % kEntryBytes != 0 || (p.size() - kHeaderBytes) / kEntryBytes != count) {
    return bad("holds " + std::to_string((p.size() - kHeaderBytes) / kEntryBytes) + " entries for " +
               std::to_string(count) + " chunks");
  }
  if (idx.data_offset < 512 || idx.data_offset % 512 != 0 || idx.data_offset > kMaxDataOffset) {
    return bad("places the disk at tar offset " + std::to_string(idx.data_offset) +
               ", not a multiple of 512 in 512..1 MiB");
  }
  const uint64_t max_frame = ZSTD_compressBound(idx.chunk_size());
  static constexpr std::array<uint8_t, 32> kNoHash{};
  uint64_t next = 0;  // where the next frame must start
  idx.chunks.resize(count);
  for (size_t k = 0; k < count; ++k) {
    std::string_view e = p.substr(kHeaderBytes + k * kEntryBytes, kEntryBytes);
    ChunkEntry& c = idx.chunks[k];
    c.frame_offset = Le(e, 0, 8);
    c.frame_length = static_cast<uint32_t>(Le(e, 8, 4));
    const uint64_t flags = Le(e, 12, 4);
    std::memcpy(c.sha256.data(), e.data() + 16, 32);
    if (flags & ~uint64_t{1}) return bad(Chunk(k) + " has unknown flags");
    c.zero = (flags & 1) != 0;
    if (c.zero && c.sha256 != kNoHash) return bad(Chunk(k) + " is marked zero but carries a hash");
    if (c.frame_length < kMinFrameBytes || c.frame_length > max_frame) {
      return bad(Chunk(k) + "'s frame length " + std::to_string(c.frame_length) + " is impossible for a chunk of " +
                 std::to_string(idx.chunk_size()) + " bytes");
    }
    if (k == 0 ? c.frame_offset < kMinFrameBytes : c.frame_offset != next) {
      return bad(Chunk(k) + "'s frame at " + std::to_string(c.frame_offset) +
                 (k == 0 ? " leaves no room for the tar header frame"
                         : (c.frame_offset < next ? " overlaps the frame before it" : " leaves a gap after the frame before it")));
    }
    next = c.frame_offset + c.frame_length;
    if (next > loc.offset || next > blob_size) {
      return bad(Chunk(k) + "'s frame ends at " + std::to_string(next) + ", past the index at " +
                 std::to_string(loc.offset));
    }
  }
  return idx;
}

}  // namespace regdisk::oci
