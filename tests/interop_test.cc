// Interoperability with independent tools: skopeo and umoci read what
// regdisk writes, and regdisk reads what skopeo writes. Digests must agree
// byte for byte.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "harness/harness.h"

namespace regdisk::testing {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;
using json = nlohmann::json;

class InteropTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    auto reg = TestRegistry::Start(RegistryMode::kPlain);
    ASSERT_OK(reg);
    reg_ = std::move(*reg);
  }
  std::string Remote(const std::string& repo) { return "docker://" + reg_->host() + "/" + repo; }
  std::unique_ptr<TestRegistry> reg_;
};

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

TEST_F(InteropTest, RegdiskPullsWhatSkopeoPushed) {
  std::string disk = RandomBytes(400000, 7);
  auto img = MakeTestImage(tmp() / "src", "v1", {{"disk/disk.img", disk}});
  ASSERT_OK(img);
  RunResult r = RunProgram({"skopeo", "copy", "--dest-tls-verify=false", "oci:" + (tmp() / "src").string() + ":v1",
                            Remote("vm/skopeo:v1")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = RunProgram({"skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}", Remote("vm/skopeo:v1")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string skopeo_digest = Trim(r.out);

  r = RunRegdisk({"copy", Remote("vm/skopeo:v1"), "oci:" + (tmp() / "pulled").string() + ":v1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Trim(r.out), skopeo_digest);
  r = RunRegdisk({"inspect", Remote("vm/skopeo:v1")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["Digest"], skopeo_digest);
}

TEST_F(InteropTest, SkopeoReadsWhatRegdiskPushed) {
  auto img = MakeTestImage(tmp() / "src", "v1", {{"disk/disk.img", RandomBytes(250000, 8)}});
  ASSERT_OK(img);
  RunResult r = RunRegdisk({"copy", "oci:" + (tmp() / "src").string() + ":v1", Remote("vm/regdisk:v1")});
  ASSERT_EQ(r.exit_code, 0) << r.err;

  r = RunProgram({"skopeo", "inspect", "--tls-verify=false", Remote("vm/regdisk:v1")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json j = json::parse(r.out);
  EXPECT_EQ(j["Digest"], img->manifest_digest.str());
  EXPECT_EQ(j["Layers"][0], img->layers[0].digest.str());

  // skopeo copies it on (to a dir: transport) without changing a byte.
  r = RunProgram({"skopeo", "copy", "--src-tls-verify=false", Remote("vm/regdisk:v1"), "dir:" + (tmp() / "dir").string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string manifest = ReadFileCapped(tmp() / "dir/manifest.json", 1 << 20).value();
  EXPECT_EQ(oci::Digest::Sha256Of(manifest), img->manifest_digest);
  std::string layer = ReadFileCapped(tmp() / "dir" / img->layers[0].digest.hex(), 1 << 24).value();
  EXPECT_EQ(oci::Digest::Sha256Of(layer), img->layers[0].digest);
}

TEST_F(InteropTest, SkopeoAndUmociReadRegdisksLayout) {
  std::string disk = RandomBytes(123457, 9);
  auto img = MakeTestImage(tmp() / "src", "v1", {{"disk/disk.img", disk}});
  ASSERT_OK(img);
  ASSERT_EQ(RunRegdisk({"copy", "oci:" + (tmp() / "src").string() + ":v1", Remote("vm/layout:v1")}).exit_code, 0);
  std::string layout = (tmp() / "layout").string();
  RunResult r = RunRegdisk({"copy", Remote("vm/layout:v1"), "oci:" + layout + ":fedora25"});
  ASSERT_EQ(r.exit_code, 0) << r.err;

  r = RunProgram({"skopeo", "inspect", "oci:" + layout + ":fedora25"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["Digest"], img->manifest_digest.str());

  std::string bundle = (tmp() / "bundle").string();
  r = RunProgram({"umoci", "unpack", "--rootless", "--image", layout + ":fedora25", bundle});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ReadFileCapped(fs::path(bundle) / "rootfs/disk/disk.img", 1 << 24).value(), disk);

  // And regdisk reads a layout that skopeo wrote (skopeo compresses the
  // uncompressed layer on the way, so the digest is skopeo's own).
  std::string theirs = "oci:" + (tmp() / "skopeo-layout").string() + ":x";
  r = RunProgram({"skopeo", "copy", "--src-tls-verify=false", Remote("vm/layout:v1"), theirs});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = RunProgram({"skopeo", "inspect", "--format", "{{.Digest}}", theirs});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string skopeo_digest = Trim(r.out);
  r = RunRegdisk({"inspect", theirs});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["Digest"], skopeo_digest);
  r = RunRegdisk({"copy", theirs, Remote("vm/from-skopeo-layout:v1")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Trim(r.out), skopeo_digest);
}

}  // namespace
}  // namespace regdisk::testing
