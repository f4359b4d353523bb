// Pulls and pushes through a fault-injecting proxy: cut connections,
// 429/503 answers and stalls. Everything must still arrive verified, and a
// resumed download must not start over from zero.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "harness/harness.h"

namespace regdisk::testing {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;
using json = nlohmann::json;
using Rule = FaultProxy::Rule;

constexpr int kBigLayer = 3 << 20;

class FaultTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    auto reg = TestRegistry::Start(RegistryMode::kPlain);
    ASSERT_OK(reg);
    reg_ = std::move(*reg);
    auto img = MakeTestImage(tmp() / "src", "v1", {{"disk/disk.img", "x"}}, "amd64", kBigLayer);
    ASSERT_OK(img);
    img_ = *img;
    RunResult r = RunRegdisk({"copy", "oci:" + (tmp() / "src").string() + ":v1", "docker://" + reg_->host() + "/vm/disk:v1"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto proxy = FaultProxy::Start(reg_->port());
    ASSERT_OK(proxy);
    proxy_ = std::move(*proxy);
  }
  std::string ViaProxy(const std::string& repo = "vm/disk:v1") { return "docker://" + proxy_->host() + "/" + repo; }
  RunResult Pull(std::vector<std::string> extra_env = {}) {
    return RunRegdisk({"copy", ViaProxy(), "oci:" + (tmp() / "out").string() + ":v1"}, {}, extra_env);
  }
  std::string LayerPath() const { return "/blobs/" + img_.layers[0].digest.str(); }
  std::vector<FaultProxy::Seen> LayerRequests() {
    std::vector<FaultProxy::Seen> out;
    for (const auto& s : proxy_->seen()) {
      if (s.method == "GET" && s.path.find(LayerPath()) != std::string::npos) out.push_back(s);
    }
    return out;
  }
  void ExpectPulledIntact() {
    fs::path blob = tmp() / "out/blobs/sha256" / img_.layers[0].digest.hex();
    ASSERT_TRUE(fs::exists(blob));
    EXPECT_EQ(oci::Digest::Sha256Of(ReadFileCapped(blob, 1 << 26).value()), img_.layers[0].digest);
  }
  std::unique_ptr<TestRegistry> reg_;
  std::unique_ptr<FaultProxy> proxy_;
  TestImage img_;
};

TEST_F(FaultTest, CutDownloadResumesWithRange) {
  const uint64_t cut = 1 << 20;
  Rule rule;
  rule.method = "GET";
  rule.path_contains = LayerPath();
  rule.action = Rule::Action::kCutAfter;
  rule.cut_after = cut;
  rule.times = 2;  // cut twice: at 1 MiB, and again 1 MiB later
  proxy_->AddRule(rule);
  RunResult r = Pull();
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ExpectPulledIntact();
  auto reqs = LayerRequests();
  ASSERT_GE(reqs.size(), 3u);
  EXPECT_EQ(reqs[0].range, "");
  EXPECT_EQ(reqs[1].range, "bytes=" + std::to_string(cut) + "-");
  EXPECT_EQ(reqs[2].range, "bytes=" + std::to_string(2 * cut) + "-");
  uint64_t relayed = 0;
  for (const auto& s : reqs) relayed += s.body_bytes;
  EXPECT_LE(relayed, static_cast<uint64_t>(img_.layers[0].size) + 64 * 1024) << "the download started over";
}

TEST_F(FaultTest, ResumeCopesWithAServerThatIgnoresRange) {
  const uint64_t cut = 1 << 20;
  Rule rule;
  rule.method = "GET";
  rule.path_contains = LayerPath();
  rule.action = Rule::Action::kCutAfter;
  rule.cut_after = cut;
  proxy_->AddRule(rule);
  Rule ignore = rule;
  ignore.action = Rule::Action::kIgnoreRange;
  proxy_->AddRule(ignore);
  RunResult r = Pull();
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ExpectPulledIntact();
  auto reqs = LayerRequests();
  ASSERT_EQ(reqs.size(), 2u);
  EXPECT_EQ(reqs[1].range, "bytes=" + std::to_string(cut) + "-");  // asked for the rest, got it all
  EXPECT_EQ(reqs[1].body_bytes, static_cast<uint64_t>(img_.layers[0].size));
}

TEST_F(FaultTest, RateLimitAndServerErrorsAreRetried) {
  Rule busy;
  busy.path_contains = "/manifests/";
  busy.status = 429;
  busy.retry_after = "1";
  proxy_->AddRule(busy);
  Rule down;
  down.path_contains = LayerPath();
  down.status = 503;
  down.times = 2;
  proxy_->AddRule(down);
  auto start = std::chrono::steady_clock::now();
  RunResult r = Pull();
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ExpectPulledIntact();
  // Retry-After: 1 was honoured.
  EXPECT_GE(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(900));
  int faulted = 0;
  for (const auto& s : proxy_->seen()) faulted += s.faulted;
  EXPECT_EQ(faulted, 3);
}

TEST_F(FaultTest, PersistentErrorsGiveUpWithAClearMessage) {
  Rule down;
  down.path_contains = "/manifests/";
  down.status = 503;
  down.times = 100;
  proxy_->AddRule(down);
  RunResult r = Pull();
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("answered HTTP 503"));
  EXPECT_FALSE(fs::exists(tmp() / "out")) << "a failed copy left a layout behind";
}

TEST_F(FaultTest, StalledTransferIsAbandonedAndRetried) {
  Rule stall;
  stall.method = "GET";
  stall.path_contains = LayerPath();
  stall.action = Rule::Action::kStall;
  stall.stall = std::chrono::seconds(20);
  proxy_->AddRule(stall);
  auto start = std::chrono::steady_clock::now();
  RunResult r = Pull({"REGDISK_STALL_TIMEOUT_SECONDS=2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ExpectPulledIntact();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(15));
}

TEST_F(FaultTest, ChunkedUploadAndFailedUploadRestart) {
  // Small thresholds make a 3 MiB layer go up in 1 MiB PATCHes.
  Rule fail_put;
  fail_put.method = "PUT";
  fail_put.path_contains = "/blobs/uploads/";
  fail_put.status = 500;
  proxy_->AddRule(fail_put);
  RunResult r = RunRegdisk({"copy", "oci:" + (tmp() / "src").string() + ":v1", ViaProxy("vm/chunked:v1")}, {},
                           {"REGDISK_CHUNK_THRESHOLD=1048576", "REGDISK_CHUNK_SIZE=1048576"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  int patches = 0;
  for (const auto& s : proxy_->seen()) patches += s.method == "PATCH";
  EXPECT_GE(patches, 3);
  r = RunRegdisk({"copy", "docker://" + reg_->host() + "/vm/chunked:v1", "oci:" + (tmp() / "out").string() + ":v1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ExpectPulledIntact();
}

TEST_F(FaultTest, SameRegistryCopyMountsInsteadOfUploading) {
  RunResult r = RunRegdisk({"copy", ViaProxy(), ViaProxy("other/disk:v1")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  bool mounted = false;
  for (const auto& s : proxy_->seen()) {
    if (s.method == "POST" && s.path.find("mount=") != std::string::npos) mounted = true;
    EXPECT_FALSE(s.method == "GET" && s.path.find(LayerPath()) != std::string::npos) << "layer was downloaded";
    EXPECT_NE(s.method, "PATCH");
  }
  EXPECT_TRUE(mounted);
}

}  // namespace
}  // namespace regdisk::testing
