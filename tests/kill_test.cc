// Real processes killed with SIGKILL at a series of points while they pull
// or build. After each kill: fsck finds the store whole, no name stands for
// a partial disk, and a re-run gives the same bytes. Where each kill lands
// varies with the machine; what must hold after it does not.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <nlohmann/json.hpp>
#include <thread>

#include "harness/harness.h"
#include "util/process.h"

namespace regdisk::testing {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;

class KillTest : public TempDirTest {
 protected:
  // Starts regdisk with `args` and SIGKILLs it after `delay` (unless it has
  // finished by then).
  void RunAndKill(const std::vector<std::string>& args, std::chrono::milliseconds delay) {
    std::vector<std::string> argv = {REGDISK_BIN};
    argv.insert(argv.end(), args.begin(), args.end());
    Process::Options opt;
    opt.stdout_mode = Process::Stdio::kNull;
    opt.stderr_mode = Process::Stdio::kNull;
    auto p = Process::Spawn(argv, opt);
    ASSERT_OK(p);
    std::this_thread::sleep_for(delay);
    p->Signal(SIGKILL);
    ASSERT_TRUE(p->Wait(30s).has_value());
  }
  void ExpectStoreWhole(const std::string& root, const std::string& when) {
    if (!fs::exists(root)) return;  // killed before it made the store
    RunResult r = RunRegdisk({"--root", root, "fsck"});
    EXPECT_EQ(r.exit_code, 0) << when << ":\n" << r.out << r.err;
  }
};

TEST_F(KillTest, PullsKilledAnywhereLeaveAWholeStoreAndResume) {
  auto reg = TestRegistry::Start(RegistryMode::kPlain);
  ASSERT_OK(reg);
  const std::string disk = RandomBytes(24 << 20, 61) + std::string(8 << 20, '\0');
  ASSERT_OK(WriteFileAtomic(P("disk.raw"), disk));
  const std::string ref = "docker://" + (*reg)->host() + "/vm/kill:v1";
  ASSERT_EQ(RunRegdisk({"build", P("disk.raw"), "-t", ref, "--compression", "gzip"}).exit_code, 0);
  const std::string root = P("root");
  for (int i = 0; i < 10; ++i) {
    const auto delay = std::chrono::milliseconds(i * i * 12);  // 0 ms to about 1 s
    RunAndKill({"--root", root, "pull", ref}, delay);
    const std::string when = "after a kill at " + std::to_string(delay.count()) + " ms";
    ExpectStoreWhole(root, when);
    RunResult images = RunRegdisk({"--root", root, "images", "-o", "json"});
    ASSERT_EQ(images.exit_code, 0) << images.err;
    for (const auto& img : json::parse(images.out)) {
      // A name that stands is for the whole disk.
      EXPECT_EQ(ReadFileCapped(img["disk"]["file"].get<std::string>(), 64 << 20).value_or(""), disk) << when;
    }
  }
  std::string partials;
  std::error_code ec;  // on a slow machine every kill can land before the store exists
  for (const auto& e : fs::directory_iterator(fs::path(root) / "ingest", ec)) {
    partials += e.path().filename().string() + ": " + std::to_string(fs::file_size(e.path())) + " bytes\n";
  }
  RunResult r = RunRegdisk({"--root", root, "-v", "pull", ref});
  ASSERT_EQ(r.exit_code, 0) << r.err << "partial downloads before it:\n" << partials;
  r = RunRegdisk({"--root", root, "images", "-o", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ReadFileCapped(json::parse(r.out)[0]["disk"]["file"].get<std::string>(), 64 << 20).value_or(""), disk);
  ExpectStoreWhole(root, "at the end");
  EXPECT_TRUE(fs::is_empty(fs::path(root) / "tmp"));
  EXPECT_TRUE(fs::is_empty(fs::path(root) / "ingest"));
}

TEST_F(KillTest, BuildsKilledAnywhereLeaveALayoutOthersCanRead) {
  ASSERT_OK(WriteFileAtomic(P("disk.raw"), RandomBytes(24 << 20, 62)));
  // A fixed creation time, so that two whole builds give the same digest.
  const std::vector<std::string> epoch = {"SOURCE_DATE_EPOCH=1700000000"};
  RunResult reference = RunRegdisk({"build", P("disk.raw"), "-t", "oci:" + P("reference") + ":v1"}, {}, epoch);
  ASSERT_EQ(reference.exit_code, 0) << reference.err;
  const std::string layout = "oci:" + P("layout") + ":v1";
  for (int i = 0; i < 8; ++i) {
    const auto delay = std::chrono::milliseconds(i * i * 15);
    RunAndKill({"build", P("disk.raw"), "-t", layout}, delay);
    if (!fs::exists(P("layout/blobs/sha256"))) continue;  // killed before the layout existed
    // blobs/ only ever holds whole, digest-named blobs.
    for (const auto& e : fs::directory_iterator(P("layout/blobs/sha256"))) {
      const std::string name = e.path().filename().string();
      EXPECT_EQ(name.size(), 64u) << "a temp file in blobs/: " << name;
      if (name.size() == 64) {
        EXPECT_EQ(oci::Digest::Sha256Of(ReadFileCapped(e.path(), 64 << 20).value_or("")).hex(), name);
      }
    }
  }
  RunResult r = RunRegdisk({"build", P("disk.raw"), "-t", layout}, {}, epoch);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, reference.out) << "the same disk must give the same digest";
  EXPECT_EQ(RunProgram({"umoci", "gc", "--layout", P("layout")}).exit_code, 0);
  RunResult inspect = RunProgram({"skopeo", "inspect", layout});
  EXPECT_EQ(inspect.exit_code, 0) << inspect.err;
  for (const auto& e : fs::directory_iterator(P("layout/blobs/sha256"))) {
    EXPECT_EQ(e.path().filename().string().size(), 64u) << "a temp file in blobs/: " << e.path();
  }
}

}  // namespace
}  // namespace regdisk::testing
