#include "image/layout.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include "harness/harness.h"
#include "image/copy.h"

namespace regdisk::image {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

class LayoutTest : public testing::TempDirTest {
 protected:
  fs::path dir() { return tmp(); }
};

TEST_F(LayoutTest, WritesAndResolvesTags) {
  auto a = testing::MakeTestImage(dir() / "l", "a", {{"disk/a.img", "AAAA"}});
  ASSERT_OK(a);
  auto b = testing::MakeTestImage(dir() / "l", "b", {{"disk/b.img", "BBBB"}});
  ASSERT_OK(b);
  auto layout = OciLayout::Open(dir() / "l");
  ASSERT_OK(layout);
  EXPECT_EQ(layout->Resolve("a")->digest, a->manifest_digest);
  EXPECT_EQ(layout->Resolve("b")->digest, b->manifest_digest);
  auto none = layout->Resolve("c");
  EXPECT_THAT(none.status().message(), HasSubstr("no image tagged \"c\" (tags: a, b)"));
  auto ambiguous = layout->Resolve("");
  EXPECT_THAT(ambiguous.status().message(), HasSubstr("holds several images"));
  // Re-tagging replaces the entry.
  auto a2 = testing::MakeTestImage(dir() / "l", "a", {{"disk/a.img", "changed"}});
  ASSERT_OK(a2);
  EXPECT_EQ(layout->Resolve("a")->digest, a2->manifest_digest);
  // Blobs are read-only once written.
  struct stat st;
  ASSERT_EQ(::stat(layout->BlobPath(a->manifest_digest).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0444u);
}

TEST_F(LayoutTest, CorruptBlobIsDetected) {
  auto a = testing::MakeTestImage(dir() / "l", "a", {{"disk/a.img", "AAAA"}});
  ASSERT_OK(a);
  fs::path blob = dir() / "l/blobs/sha256" / a->layers[0].digest.hex();
  ::chmod(blob.c_str(), 0644);
  std::string data = ReadFileCapped(blob, 1 << 20).value();
  data[600] ^= 1;
  ASSERT_OK(WriteFileAtomic(blob, data));
  ImageName src_name = ImageName::Parse("oci:" + (dir() / "l").string() + ":a").value();
  ImageName dst_name = ImageName::Parse("oci:" + (dir() / "out").string() + ":a").value();
  auto src = OpenSource(src_name, {});
  ASSERT_OK(src);
  auto dst = OpenDestination(dst_name, {});
  ASSERT_OK(dst);
  auto r = Copy(**src, **dst, {});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kDataLoss);
  EXPECT_THAT(r.status().message(), HasSubstr("failed verification"));
  EXPECT_FALSE(fs::exists(dir() / "out/blobs/sha256" / a->layers[0].digest.hex()));
  // No temp files left behind.
  for (auto& e : fs::directory_iterator(dir() / "out/blobs/sha256")) {
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
  }
}

TEST_F(LayoutTest, RefusesNonLayouts) {
  ASSERT_OK(MakeDirs(dir() / "notlayout"));
  ASSERT_OK(MakeDirs(dir() / "badlayout"));
  ASSERT_OK(WriteFileAtomic(dir() / "notlayout/file", "x"));
  auto r = OciLayout::OpenOrCreate(dir() / "notlayout");
  EXPECT_THAT(r.status().message(), HasSubstr("is not an OCI layout"));
  auto o = OciLayout::Open(dir() / "missing");
  EXPECT_THAT(o.status().message(), HasSubstr("does not exist"));
  ASSERT_OK(WriteFileAtomic(dir() / "badlayout/oci-layout", "nope"));
  o = OciLayout::Open(dir() / "badlayout");
  EXPECT_THAT(o.status().message(), HasSubstr("oci-layout is malformed"));
}

}  // namespace
}  // namespace regdisk::image
