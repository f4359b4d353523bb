// The chunk index parser (oci/chunk_index.h): a valid index round-trips, and
// every lie docs/chunked-format.md lists is refused with one line.
#include "oci/chunk_index.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace regdisk::oci {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kIndexAt = 100000;
constexpr uint64_t kBlobSize = 200000;

// Three chunks of 64 KiB (the last one shorter), the middle one zero.
ChunkIndex Sample() {
  ChunkIndex idx;
  idx.chunk_shift = 16;
  idx.disk_size = 3 * 65536 - 4096;
  idx.data_offset = 1536;
  uint64_t at = 120;
  for (int k = 0; k < 3; ++k) {
    ChunkEntry c;
    c.frame_offset = at;
    c.frame_length = k == 1 ? 20 : 900;
    c.zero = k == 1;
    if (!c.zero) c.sha256.fill(static_cast<uint8_t>(k + 1));
    at += c.frame_length;
    idx.chunks.push_back(c);
  }
  return idx;
}

Result<ChunkIndex> Parse(const std::string& bytes, uint64_t index_at = kIndexAt, uint64_t blob = kBlobSize) {
  return ParseChunkIndex(bytes, {index_at, bytes.size(), Digest::Sha256Of(bytes)}, blob);
}

void ExpectRefused(const ChunkIndex& idx, const std::string& words) {
  auto r = Parse(EncodeChunkIndex(idx));
  ASSERT_FALSE(r.ok()) << "accepted an index that should fail with: " << words;
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr(words));
  EXPECT_EQ(r.status().message().find('\n'), std::string::npos);
}

TEST(ChunkIndexTest, RoundTrips) {
  const std::string bytes = EncodeChunkIndex(Sample());
  EXPECT_EQ(bytes.size(), 8 + chunked::kHeaderBytes + 3 * chunked::kEntryBytes);
  auto r = Parse(bytes);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->disk_size, Sample().disk_size);
  EXPECT_EQ(r->chunk_size(), 65536u);
  EXPECT_EQ(r->ChunkLength(2), 65536u - 4096);
  EXPECT_TRUE(r->chunks[1].zero);
  EXPECT_EQ(r->HeaderFrameLength(), 120u);
  EXPECT_EQ(EncodeChunkIndex(*r), bytes);
}

TEST(ChunkIndexTest, RefusesAWrongDigest) {
  std::string bytes = EncodeChunkIndex(Sample());
  auto r = ParseChunkIndex(bytes, {kIndexAt, bytes.size(), Digest::Sha256Of("other")}, kBlobSize);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kDataLoss);
  EXPECT_THAT(r.status().message(), HasSubstr("failed verification"));
}

TEST(ChunkIndexTest, RefusesAChunkCountThatDoesNotFitTheDiskSize) {
  ChunkIndex idx = Sample();
  idx.disk_size = 4 * 65536;  // needs four chunks
  ExpectRefused(idx, "lists 3 chunks, but a disk of 262144 bytes has 4");
  idx = Sample();
  idx.chunks.pop_back();
  ExpectRefused(idx, "lists 2 chunks");
}

TEST(ChunkIndexTest, RefusesOverlappingGappedAndOutOfRangeFrames) {
  ChunkIndex idx = Sample();
  idx.chunks[2].frame_offset -= 1;
  ExpectRefused(idx, "chunk 2's frame at 1039 overlaps the frame before it");
  idx = Sample();
  idx.chunks[2].frame_offset += 1;
  ExpectRefused(idx, "leaves a gap");
  idx = Sample();
  idx.chunks[0].frame_offset = 0;
  ExpectRefused(idx, "no room for the tar header frame");
  // Frames that run into the index, or past the blob.
  auto r = Parse(EncodeChunkIndex(Sample()), 1500);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("past the index at 1500"));
}

TEST(ChunkIndexTest, RefusesFramesNoChunkCouldNeed) {
  ChunkIndex idx = Sample();
  idx.chunks[0].frame_length = 70000;  // over ZSTD_compressBound(64 KiB)
  idx.chunks[1].frame_offset = 120 + 70000;
  idx.chunks[2].frame_offset = 120 + 70000 + 20;
  ExpectRefused(idx, "frame length 70000 is impossible");
  idx = Sample();
  idx.chunks[1].frame_length = 3;
  ExpectRefused(idx, "frame length 3 is impossible");
}

TEST(ChunkIndexTest, RefusesBadHeaders) {
  ChunkIndex idx = Sample();
  idx.chunk_shift = 25;
  ExpectRefused(idx, "outside 64 KiB..16 MiB");
  idx = Sample();
  idx.data_offset = 1000;
  ExpectRefused(idx, "not a multiple of 512");
  idx = Sample();
  idx.disk_size = 0;
  idx.chunks.clear();
  ExpectRefused(idx, "empty disk");
  idx = Sample();
  idx.chunks[1].sha256[0] = 1;
  ExpectRefused(idx, "marked zero but carries a hash");

  std::string bytes = EncodeChunkIndex(Sample());
  std::string v2 = bytes;
  v2[8 + 4] = 2;
  auto r = Parse(v2);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("version 2"));
  std::string magic = bytes;
  magic[0] = 0x5a;
  r = Parse(magic);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("skippable magic"));
  std::string flags = bytes;
  flags[8 + chunked::kHeaderBytes + 12] = 4;
  r = Parse(flags);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("chunk 0 has unknown flags"));
  std::string cut = bytes.substr(0, bytes.size() - 1);
  cut[4] = static_cast<char>(cut[4] - 1);
  r = Parse(cut);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("entries for 3 chunks"));
}

Descriptor Layer(std::map<std::string, std::string> annotations) {
  Descriptor d;
  d.media_type = std::string(media::kOciLayerZstd);
  d.digest = Digest::Sha256Of("layer");
  d.size = 1000;
  d.annotations = std::move(annotations);
  return d;
}

TEST(ChunkIndexTest, ReadsTheAnnotations) {
  const std::string digest = Digest::Sha256Of("index").str();
  auto loc = ChunkIndexLocationOf(Layer({{"io.regdisk.chunked.version", "1"},
                                         {"io.regdisk.chunked.index.offset", "500"},
                                         {"io.regdisk.chunked.index.length", "100"},
                                         {"io.regdisk.chunked.index.digest", digest}}));
  ASSERT_TRUE(loc.ok()) << loc.status().ToString();
  ASSERT_TRUE(loc->has_value());
  EXPECT_EQ((*loc)->offset, 500u);
  EXPECT_EQ((*loc)->length, 100u);

  // Not chunked, or a version this regdisk does not know: a plain layer.
  EXPECT_FALSE(ChunkIndexLocationOf(Layer({}))->has_value());
  EXPECT_FALSE(ChunkIndexLocationOf(Layer({{"io.regdisk.chunked.version", "2"}}))->has_value());

  // An annotation outside the blob, or not a number: refused.
  for (auto [offset, length, words] : {std::tuple{"950", "100", "outside the blob"},
                                       std::tuple{"18446744073709551615", "100", "outside the blob"},
                                       std::tuple{"500", "20", "outside 40 bytes"},
                                       std::tuple{"5e2", "100", "not a decimal number"},
                                       std::tuple{"-1", "100", "not a decimal number"}}) {
    auto bad = ChunkIndexLocationOf(Layer({{"io.regdisk.chunked.version", "1"},
                                           {"io.regdisk.chunked.index.offset", offset},
                                           {"io.regdisk.chunked.index.length", length},
                                           {"io.regdisk.chunked.index.digest", digest}}));
    ASSERT_FALSE(bad.ok()) << offset << " " << length;
    EXPECT_EQ(bad.status().code(), Code::kInvalidArgument);
    EXPECT_THAT(bad.status().message(), HasSubstr(words));
  }
  auto no_digest = ChunkIndexLocationOf(Layer({{"io.regdisk.chunked.version", "1"},
                                               {"io.regdisk.chunked.index.offset", "500"},
                                               {"io.regdisk.chunked.index.length", "100"}}));
  EXPECT_FALSE(no_digest.ok());
}

}  // namespace
}  // namespace regdisk::oci
