// A chunked layer (docs/chunked-format.md) is an ordinary tar+zstd layer to
// everyone else: skopeo copies it, umoci unpacks its tar, containerd pulls it
// with its native snapshotter, and each gives the same raw disk; a chunked
// image that regdisk built boots with regdisk run.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <regex>
#include <thread>

#include <nlohmann/json.hpp>

#include "harness/harness.h"

namespace regdisk::testing {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;

class ChunkedInteropTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    auto reg = TestRegistry::Start(RegistryMode::kPlain);
    ASSERT_OK(reg);
    reg_ = std::move(*reg);
    // Data at the start, a stretch of zeros, data again: 3 MiB + 512.
    std::string raw(3 * (1 << 20) + 512, '\0');
    std::string a = RandomBytes(200000, 21), b = RandomBytes(50000, 22);
    raw.replace(1000, a.size(), a);
    raw.replace(raw.size() - b.size(), b.size(), b);
    ASSERT_OK(WriteFileAtomic(tmp() / "d.raw", raw));
    ASSERT_EQ(RunProgram({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", P("d.raw"), P("d.qcow2")}).exit_code, 0);
    ref_ = reg_->host() + "/vm/chunked:v1";
    RunResult r = RunRegdisk({"build", P("d.qcow2"), "-t", "docker://" + ref_, "--layout", "chunked",
                              "--chunk-size", "256K", "-q"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  // qemu-img compare of a raw disk someone else unpacked with the original.
  void ExpectSameDisk(const fs::path& disk) {
    ASSERT_TRUE(fs::exists(disk)) << disk;
    RunResult r = RunProgram({"qemu-img", "compare", "-f", "raw", "-F", "qcow2", disk.string(), P("d.qcow2")});
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  }
  std::unique_ptr<TestRegistry> reg_;
  std::string ref_;
};

TEST_F(ChunkedInteropTest, SkopeoCopiesItAndUmociUnpacksIt) {
  const std::string layout = P("layout");
  RunResult r = RunProgram({"skopeo", "copy", "--src-tls-verify=false", "docker://" + ref_, "oci:" + layout + ":v1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // skopeo kept the layer and its annotations as they were.
  r = RunProgram({"skopeo", "inspect", "--raw", "oci:" + layout + ":v1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json m = json::parse(r.out);
  EXPECT_EQ(m["layers"][0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+zstd");
  EXPECT_EQ(m["layers"][0]["annotations"]["io.regdisk.chunked.version"], "1");
  // umoci 0.4 reads no zstd layer at all (chunked or not): skopeo
  // recompresses it (as gzip) on the way, and umoci unpacks the tar inside.
  const std::string plain = P("plain");
  r = RunProgram({"skopeo", "copy", "--dest-compress", "--dest-compress-format", "gzip", "oci:" + layout + ":v1",
                  "oci:" + plain + ":v1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string bundle = P("bundle");
  r = RunProgram({"umoci", "unpack", "--rootless", "--image", plain + ":v1", bundle});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ExpectSameDisk(fs::path(bundle) / "rootfs/disk/d.raw");
  // And regdisk pulls what skopeo copied (ranged reads from the layout).
  r = RunRegdisk({"--root", P("root"), "pull", "oci:" + layout + ":v1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const auto& e : fs::recursive_directory_iterator(P("root") + "/disks")) {
    if (e.path().filename() == "disk.raw") ExpectSameDisk(e.path());
  }
}

TEST_F(ChunkedInteropTest, ContainerdPullsItWithTheNativeSnapshotter) {
  if (::geteuid() != 0 || FindExecutable("containerd").empty() || FindExecutable("ctr").empty()) {
    GTEST_SKIP() << "needs root and containerd";
  }
  // A containerd of the test's own (short paths: socket names are limited).
  auto dir = TempDir::Create("rdc", "/tmp");
  ASSERT_OK(dir);
  const fs::path d = dir->path();
  const std::string sock = (d / "s/c.sock").string();
  ASSERT_OK(WriteFileAtomic(d / "config.toml",
                            "version = 2\nroot = \"" + (d / "root").string() + "\"\nstate = \"" + (d / "s").string() +
                                "\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\", "
                                "\"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", "
                                "\"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.snapshotter.v1.aufs\", "
                                "\"io.containerd.internal.v1.opt\"]\n[grpc]\n  address = \"" + sock +
                                "\"\n[ttrpc]\n  address = \"" + sock + ".ttrpc\"\n"));
  Process::Options po;
  po.stdout_mode = Process::Stdio::kNull;
  po.stderr_mode = Process::Stdio::kFile;
  po.stderr_file = d / "log";
  po.die_with_parent = true;
  auto ctd = Process::Spawn({"containerd", "--config", (d / "config.toml").string()}, po);
  ASSERT_OK(ctd);
  bool up = false;
  for (int i = 0; i < 300 && !up; ++i) {
    up = RunProgram({"ctr", "--address", sock, "version"}).exit_code == 0;
    if (!up) std::this_thread::sleep_for(100ms);
  }
  ASSERT_TRUE(up) << ReadFileCapped(d / "log", 1 << 20).value_or("");
  RunResult r = RunProgram({"ctr", "--address", sock, "-n", "test", "images", "pull", "--plain-http", "--snapshotter",
                            "native", ref_});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  fs::path found;
  for (const auto& e : fs::recursive_directory_iterator(d / "root/io.containerd.snapshotter.v1.native/snapshots")) {
    if (e.path().filename() == "d.raw" && e.path().parent_path().filename() == "disk") found = e.path();
  }
  ExpectSameDisk(found);
  ctd->Terminate(5s);
}

TEST_F(ChunkedInteropTest, AChunkedImageBootsWithRegdiskRun) {
  // The boot-sector guest (guest/hello.S): it prints sector 1 and powers off.
  std::string raw = ReadFileCapped(REGDISK_GUEST_IMAGE, 512).value();
  std::string sector1 = "PRISTINE-SECTOR-CONTENT";
  sector1.resize(512, '\0');
  raw += sector1 + "POWEROFF";
  raw.resize(1 << 20, '\0');
  ASSERT_OK(WriteFileAtomic(tmp() / "guest.raw", raw));
  ASSERT_EQ(RunProgram({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", P("guest.raw"), P("guest.qcow2")}).exit_code, 0);
  RunResult r = RunRegdisk({"build", P("guest.qcow2"), "-t", "docker://" + reg_->host() + "/vmdisks/fedora25:latest",
                            "--layout", "chunked", "--chunk-size", "64K", "-q"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string spec = ReadFileCapped(REGDISK_SOURCE_DIR "/examples/vm.yaml", 1 << 20).value();
  spec = std::regex_replace(spec, std::regex("image: vmdisks/"), "image: " + reg_->host() + "/vmdisks/");
  ASSERT_OK(WriteFileAtomic(tmp() / "vm.yaml", spec));
  r = RunRegdisk({"--root", P("root"), "run", "-f", P("vm.yaml"), "--timeout", "120", "--grace", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("REGDISK-GUEST-BOOTED"));
  EXPECT_THAT(r.out, HasSubstr("sector1: PRISTINE-SECTOR-CONTENT"));
  EXPECT_THAT(r.out, HasSubstr("REGDISK-GUEST-POWEROFF"));
  // The store holds it as raw, and QEMU was told so.
  r = RunRegdisk({"--root", P("root"), "images", "-o", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("raw"));
}

}  // namespace
}  // namespace regdisk::testing
