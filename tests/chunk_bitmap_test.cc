#include "store/chunk_bitmap.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "harness/harness.h"
#include "store/chunk_bitmap_format.h"
#include "util/fs.h"

namespace regdisk::store {
namespace {

class ChunkBitmapTest : public regdisk::testing::TempDirTest {
 protected:
  oci::Digest Key(std::string_view s) { return oci::Digest::Sha256Of(s); }
  std::filesystem::path path() { return tmp() / "chunks.map"; }
};

TEST_F(ChunkBitmapTest, StartsClearAndKeepsBitsAcrossReopen) {
  {
    ChunkBitmap m = ChunkBitmap::Open(path(), 130, 16, Key("a")).value();
    EXPECT_EQ(m.Count(), 0u);
    EXPECT_FALSE(m.from_previous_boot());
    m.Set(0);
    m.Set(64);
    m.Set(129);
    m.Set(130);  // out of range: ignored
    EXPECT_EQ(m.Count(), 3u);
    EXPECT_TRUE(m.Test(64));
    EXPECT_FALSE(m.Test(63));
    EXPECT_FALSE(m.Test(130));
  }
  ChunkBitmap m = ChunkBitmap::Open(path(), 130, 16, Key("a")).value();
  EXPECT_EQ(m.Count(), 3u);
  EXPECT_TRUE(m.Test(0) && m.Test(64) && m.Test(129));
  EXPECT_FALSE(m.from_previous_boot());
  m.Clear(64);
  EXPECT_FALSE(m.Test(64));
  EXPECT_EQ(m.Count(), 2u);
}

TEST_F(ChunkBitmapTest, AnotherIndexOrShapeStartsAfresh) {
  ChunkBitmap::Open(path(), 10, 16, Key("a")).value().Set(3);
  EXPECT_EQ(ChunkBitmap::Open(path(), 10, 16, Key("b")).value().Count(), 0u) << "another index";
  ChunkBitmap::Open(path(), 10, 16, Key("a")).value().Set(3);
  EXPECT_EQ(ChunkBitmap::Open(path(), 10, 17, Key("a")).value().Count(), 0u) << "another chunk size";
  ChunkBitmap::Open(path(), 10, 16, Key("a")).value().Set(3);
  EXPECT_EQ(ChunkBitmap::Open(path(), 11, 16, Key("a")).value().Count(), 0u) << "another chunk count";
}

TEST_F(ChunkBitmapTest, DamagedFileStartsAfresh) {
  ChunkBitmap::Open(path(), 200, 16, Key("a")).value().Set(100);
  {
    UniqueFd fd = OpenFile(path(), O_RDWR).value();
    ASSERT_EQ(::pwrite(fd.get(), "X", 1, 0), 1);  // the magic
  }
  EXPECT_EQ(ChunkBitmap::Open(path(), 200, 16, Key("a")).value().Count(), 0u);
  ChunkBitmap::Open(path(), 200, 16, Key("a")).value().Set(100);
  std::filesystem::resize_file(path(), REGDISK_CHUNKMAP_HEADER_BYTES + 8);  // cut short
  EXPECT_EQ(ChunkBitmap::Open(path(), 200, 16, Key("a")).value().Count(), 0u);
}

TEST_F(ChunkBitmapTest, BitsFromAnotherBootAreRevalidated) {
  ASSERT_FALSE(CurrentBootId().empty());
  {
    ChunkBitmap m = ChunkBitmap::Open(path(), 8, 16, Key("a")).value();
    for (uint64_t k = 0; k < 8; ++k) m.Set(k);
  }
  {
    UniqueFd fd = OpenFile(path(), O_RDWR).value();
    const char other[] = "00000000-0000-0000-0000-000000000000";
    ASSERT_EQ(::pwrite(fd.get(), other, sizeof other, REGDISK_CHUNKMAP_OFF_BOOT_ID), ssize_t(sizeof other));
  }
  ChunkBitmap m = ChunkBitmap::Open(path(), 8, 16, Key("a")).value();
  ASSERT_TRUE(m.from_previous_boot());
  std::vector<uint64_t> asked;
  ASSERT_TRUE(m.Revalidate([&](uint64_t k) {
                 asked.push_back(k);
                 return k % 2 == 0;
               }).ok());
  EXPECT_EQ(asked.size(), 8u);
  EXPECT_EQ(m.Count(), 4u);
  EXPECT_FALSE(m.Test(1));
  EXPECT_FALSE(m.from_previous_boot());
  EXPECT_FALSE(ChunkBitmap::Open(path(), 8, 16, Key("a")).value().from_previous_boot()) << "the boot is recorded";
}

TEST_F(ChunkBitmapTest, NextClearAndCompletion) {
  ChunkBitmap m = ChunkBitmap::Open(path(), 70, 16, Key("a")).value();
  EXPECT_EQ(m.NextClear(0), 0u);
  for (uint64_t k = 0; k < 66; ++k) m.Set(k);
  EXPECT_EQ(m.NextClear(0), 66u);
  EXPECT_EQ(m.NextClear(67), 67u);
  for (uint64_t k = 66; k < 70; ++k) m.Set(k);
  EXPECT_EQ(m.NextClear(0), 70u);
  EXPECT_TRUE(m.Complete());
  EXPECT_TRUE(m.Sync().ok());
}

TEST_F(ChunkBitmapTest, ConcurrentSettersInOneWordLoseNothing) {
  ChunkBitmap m = ChunkBitmap::Open(path(), 64, 16, Key("a")).value();
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t) {
    ts.emplace_back([&m, t] {
      for (uint64_t k = t; k < 64; k += 4) m.Set(k);
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_TRUE(m.Complete());
}

TEST_F(ChunkBitmapTest, ASecondMappingSeesBitsAtOnce) {
  ChunkBitmap a = ChunkBitmap::Open(path(), 10, 16, Key("a")).value();
  ChunkBitmap b = ChunkBitmap::Open(path(), 10, 16, Key("a")).value();
  a.Set(7);
  EXPECT_TRUE(b.Test(7));
}

// What the nbdkit plugin does: map the file read-only. A bitmap started
// afresh for another index must not change what such a mapping shows.
TEST_F(ChunkBitmapTest, AReaderMappingTheOldBitmapKeepsItsViewWhenItStartsAfresh) {
  {
    ChunkBitmap m = ChunkBitmap::Open(path(), 200, 16, Key("a")).value();
    m.Set(5);
    m.Set(150);
    ASSERT_OK(m.Sync());
  }
  UniqueFd fd = OpenFile(path(), O_RDONLY).value();
  const size_t bytes = REGDISK_CHUNKMAP_HEADER_BYTES + 4 * 8;
  void* map = ::mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd.get(), 0);
  ASSERT_NE(map, MAP_FAILED);
  const auto* words = reinterpret_cast<const uint64_t*>(static_cast<const char*>(map) + REGDISK_CHUNKMAP_HEADER_BYTES);
  ChunkBitmap fresh = ChunkBitmap::Open(path(), 200, 16, Key("b")).value();
  EXPECT_EQ(fresh.Count(), 0u);
  fresh.Set(7);
  // The old mapping: the old header and bits, whole (not truncated, not
  // cleared, not the new bits).
  EXPECT_EQ(std::memcmp(map, REGDISK_CHUNKMAP_MAGIC, REGDISK_CHUNKMAP_MAGIC_BYTES), 0);
  EXPECT_EQ(words[0], uint64_t{1} << 5);
  EXPECT_EQ(words[2], uint64_t{1} << (150 - 128));
  ::munmap(map, bytes);
  EXPECT_FALSE(std::filesystem::exists(path().string() + ".new"));
  EXPECT_EQ(ChunkBitmap::Open(path(), 200, 16, Key("b")).value().Count(), 1u) << "the new one is at the path";
}

}  // namespace
}  // namespace regdisk::store
