// DiskTree on layers from memory: caps on counts and sizes, holes kept
// whatever the chunking, room checked before writing, hostile names shown
// escaped and bounded.
#include "store/unpack.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "harness/harness.h"

namespace regdisk::store {
namespace {

using ::testing::HasSubstr;
using testing::TarEntry;
using Type = TarEntry::Type;
namespace fs = std::filesystem;

constexpr char kTar[] = "application/vnd.oci.image.layer.v1.tar";

// Hands out `data` in chunks of `chunk` bytes, as a download would.
class MemorySource : public ByteSource {
 public:
  MemorySource(std::string data, size_t chunk) : data_(std::move(data)), chunk_(chunk) {}
  Result<std::span<const uint8_t>> Next() override {
    const size_t n = std::min(chunk_, data_.size() - pos_);
    std::span<const uint8_t> out(reinterpret_cast<const uint8_t*>(data_.data()) + pos_, n);
    pos_ += n;
    return out;
  }

 private:
  std::string data_;
  size_t chunk_;
  size_t pos_ = 0;
};

class UnpackTest : public testing::TempDirTest {
 protected:
  Status Apply(DiskTree& tree, const std::vector<TarEntry>& entries, size_t chunk = 1 << 20) {
    MemorySource src(testing::MakeTar(entries, ""), chunk);
    return tree.ApplyLayer(src, kTar, "layer 1");
  }
  // A new, empty staging directory.
  fs::path Staging() {
    const fs::path p = tmp() / ("staging-" + std::to_string(++stagings_));
    fs::create_directory(p);
    return p;
  }
  int stagings_ = 0;
  static uint64_t Allocated(const fs::path& p) {
    struct stat st {};
    EXPECT_EQ(::stat(p.c_str(), &st), 0) << p;
    return static_cast<uint64_t>(st.st_blocks) * 512;
  }
};

TEST_F(UnpackTest, ZeroBlocksStayHolesWhateverTheChunking) {
  // 16 MiB with 4 KiB of data in the middle; the tar reaches the reader in
  // chunks that never line up with the file's 4 KiB blocks.
  std::string disk(16 << 20, '\0');
  disk.replace(8 << 20, 4096, std::string(4096, 'x'));
  for (size_t chunk : {size_t{1000}, size_t{4097}, size_t{65536 + 512}, size_t{1} << 20}) {
    const fs::path staging = tmp() / ("s" + std::to_string(chunk));
    fs::create_directory(staging);
    DiskTree tree(staging);
    ASSERT_OK(Apply(tree, {{"disk", Type::kDir}, {"disk/disk.img", Type::kFile, disk}}, chunk));
    auto f = tree.FindDisk("");
    ASSERT_OK(f);
    EXPECT_EQ(ReadFileCapped(f->staged, 32 << 20).value(), disk) << chunk;
    // One 4 KiB block of data, maybe split across two: at most a few blocks.
    EXPECT_LE(Allocated(f->staged), 64u << 10) << "chunk " << chunk << ": zero blocks were written as data";
  }
}

TEST_F(UnpackTest, CountsAndSizesAreCapped) {
  DiskTree::Limits limits;
  limits.max_layer_entries = 50;
  limits.max_disk_entries = 10;
  limits.max_file_bytes = 1 << 20;

  std::vector<TarEntry> many_outside = {{"disk", Type::kDir}, {"disk/d.img", Type::kFile, "x"}};
  for (int i = 0; i < 60; ++i) many_outside.push_back({"etc/f" + std::to_string(i), Type::kFile, "y"});
  DiskTree a(Staging(), limits);
  Status st = Apply(a, many_outside);
  EXPECT_EQ(st.code(), Code::kResourceExhausted);
  EXPECT_THAT(st.message(), HasSubstr("layer 1 has more than 50 entries"));

  std::vector<TarEntry> many_disks = {{"disk", Type::kDir}};
  for (int i = 0; i < 20; ++i) many_disks.push_back({"disk/f" + std::to_string(i), Type::kFile, "y"});
  DiskTree b(Staging(), limits);
  st = Apply(b, many_disks);
  EXPECT_EQ(st.code(), Code::kResourceExhausted);
  EXPECT_THAT(st.message(), HasSubstr("puts more than 10 entries under /disk"));

  DiskTree c(Staging(), limits);
  st = Apply(c, {{"disk", Type::kDir}, {"disk/big.img", Type::kFile, std::string((1 << 20) + 1, 'z')}});
  EXPECT_EQ(st.code(), Code::kResourceExhausted);
  EXPECT_THAT(st.message(), HasSubstr("\"/disk/big.img\" of 1.0 MiB (1048577 bytes), over the maximum disk size of "
                                      "1.0 MiB (1048576 bytes); raise it with --max-disk-size"));

  // Opaque directories are entries too.
  std::vector<TarEntry> opaque = {{"disk", Type::kDir}};
  for (int i = 0; i < 20; ++i) opaque.push_back({"disk/d" + std::to_string(i) + "/.wh..wh..opq", Type::kFile, ""});
  DiskTree e(Staging(), limits);
  st = Apply(e, opaque);
  EXPECT_EQ(st.code(), Code::kResourceExhausted);
  EXPECT_THAT(st.message(), HasSubstr("puts more than 10 entries under /disk"));

  // Replacing one file many times in one layer is not many entries.
  std::vector<TarEntry> rewrites = {{"disk", Type::kDir}};
  for (int i = 0; i < 30; ++i) rewrites.push_back({"disk/d.img", Type::kFile, std::to_string(i)});
  DiskTree d(Staging(), limits);
  ASSERT_OK(Apply(d, rewrites));
  EXPECT_EQ(ReadFileCapped(d.FindDisk("").value().staged, 100).value(), "29");
}

TEST_F(UnpackTest, ManyFilesAndWhiteoutsUnderDisk) {
  // Files, then a layer that whites most of them out and an opaque
  // directory: what stays is exactly what the layers say.
  const fs::path staging = Staging();
  DiskTree tree(staging);
  std::vector<TarEntry> lower = {{"disk", Type::kDir}, {"disk/sub", Type::kDir}};
  for (int i = 0; i < 2000; ++i) lower.push_back({"disk/f" + std::to_string(i), Type::kFile, "a"});
  for (int i = 0; i < 100; ++i) lower.push_back({"disk/sub/g" + std::to_string(i), Type::kFile, "b"});
  lower.push_back({"disk/sub!", Type::kFile, "sorts between sub and sub/"});
  ASSERT_OK(Apply(tree, lower));
  std::vector<TarEntry> upper;
  for (int i = 0; i < 2000; ++i) upper.push_back({"disk/.wh.f" + std::to_string(i), Type::kFile, ""});
  upper.push_back({"disk/sub/.wh..wh..opq", Type::kFile, ""});
  upper.push_back({"disk/sub/keep.img", Type::kFile, "kept"});
  MemorySource src(testing::MakeTar(upper, ""), 1 << 20);
  ASSERT_OK(tree.ApplyLayer(src, kTar, "layer 2"));
  auto f = tree.FindDisk("");
  EXPECT_FALSE(f.ok());
  EXPECT_THAT(f.status().message(), HasSubstr("holds 2 files under /disk (\"/disk/sub!\", \"/disk/sub/keep.img\")"));
  ASSERT_OK(tree.FindDisk("/disk/sub/keep.img"));
  EXPECT_EQ(std::distance(fs::directory_iterator(staging), fs::directory_iterator()), 2) << "whited-out files stay staged";
}

TEST_F(UnpackTest, HostileNamesAreEscapedAndBounded) {
  DiskTree tree(Staging());
  const std::string evil = "disk/\x1b[2J\rOK\n" + std::string(100000, 'a');
  Status st = Apply(tree, {{"disk", Type::kDir}, {evil, Type::kSymlink, "", "/etc/passwd"}});
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("has a symlink at \"/disk/\\x1b[2J\\rOK\\naaa"));
  EXPECT_THAT(st.message(), HasSubstr("...(100014 bytes)"));
  EXPECT_EQ(st.message().find('\x1b'), std::string::npos);
  EXPECT_EQ(st.message().find('\n'), std::string::npos);
  EXPECT_LT(st.message().size(), 600u);
}

TEST_F(UnpackTest, AFullFileSystemIsNoSpaceWithBothNumbers) {
  // A 2 MiB tmpfs; needs root (CI runs as root).
  const fs::path small = tmp() / "small";
  fs::create_directory(small);
  if (::mount("tmpfs", small.c_str(), "tmpfs", 0, "size=2m") != 0) GTEST_SKIP() << "cannot mount a tmpfs here";
  struct Unmount {
    fs::path p;
    ~Unmount() { ::umount2(p.c_str(), MNT_DETACH); }
  } unmount{small};
  const fs::path staging = small / "staging";
  fs::create_directory(staging);

  // The entry needs more than is free: its writes fail with ENOSPC.
  DiskTree a(staging);
  Status st = Apply(a, {{"disk", Type::kDir}, {"disk/d.img", Type::kFile, testing::RandomBytes(3 << 20, 7)}});
  EXPECT_EQ(st.code(), Code::kNoSpace) << st.ToString();
  EXPECT_THAT(st.message(), HasSubstr("writing \"/disk/d.img\" needs up to 3.0 MiB (3145728 bytes) but the file "
                                      "system of " + small.string() + " has "));
  EXPECT_THAT(st.message(), HasSubstr("free; free space there or choose another --root"));

  EXPECT_TRUE(fs::is_empty(staging)) << "a refused file must not stay staged";
  // Two files that each fit, but not together.
  DiskTree b(staging);
  st = Apply(b, {{"disk", Type::kDir},
                 {"disk/a.img", Type::kFile, testing::RandomBytes(1536 << 10, 8)},
                 {"disk/b.img", Type::kFile, testing::RandomBytes(1536 << 10, 9)}});
  EXPECT_EQ(st.code(), Code::kNoSpace) << st.ToString();
  EXPECT_THAT(st.message(), HasSubstr("writing \"/disk/b.img\" needs up to 1.5 MiB"));
}

}  // namespace
}  // namespace regdisk::store
