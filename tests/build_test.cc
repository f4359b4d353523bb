// Making registry disks both ways users do: regdisk build, and a Dockerfile
// built by buildah FROM regdisk's base image. Checked with skopeo, umoci,
// qemu-img and regdisk's own node store.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <random>
#include <sys/stat.h>
#include <ctime>

#include "harness/harness.h"

namespace regdisk::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;
using json = nlohmann::json;

class BuildTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    root_ = (tmp() / "root").string();
  }
  RunResult Regdisk(std::vector<std::string> args) {
    args.insert(args.begin(), {"--root", root_});
    return RunRegdisk(args);
  }
  void Qcow2(const std::string& name, const std::string& size, const std::string& pattern_at = "0") {
    ASSERT_EQ(RunProgram({"qemu-img", "create", "-q", "-f", "qcow2", P(name), size}).exit_code, 0);
    ASSERT_EQ(RunProgram({"qemu-io", "-f", "qcow2", "-c", "write -P 0x5a " + pattern_at + " 128k", P(name)}).exit_code, 0);
  }
  static std::string Trim(std::string s) {
    while (!s.empty() && s.back() == '\n') s.pop_back();
    return s;
  }
  std::string root_;
};

// Default options (gzip), so this also shows that umoci reads a default image.
TEST_F(BuildTest, ReproducibleWithSourceDateEpochAndReadableBySkopeoAndUmoci) {
  Qcow2("fedora25.qcow2", "32M");
  std::string layout = "oci:" + P("layout") + ":v1";
  const std::vector<std::string> epoch = {"SOURCE_DATE_EPOCH=1700000000"};
  RunResult a = RunRegdisk({"--root", root_, "build", P("fedora25.qcow2"), "-t", layout, "--label", "team=vm"}, {}, epoch);
  ASSERT_EQ(a.exit_code, 0) << a.err;
  RunResult b = RunRegdisk({"--root", root_, "build", P("fedora25.qcow2"), "-t", "oci:" + P("other") + ":v1", "--label",
                            "team=vm"}, {}, epoch);
  ASSERT_EQ(b.exit_code, 0) << b.err;
  EXPECT_EQ(a.out, b.out) << "the same disk, options and SOURCE_DATE_EPOCH must give the same digest";

  RunResult r = RunProgram({"skopeo", "inspect", layout});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json j = json::parse(r.out);
  EXPECT_EQ(j["Digest"], Trim(a.out));
  EXPECT_EQ(j["Created"], "2023-11-14T22:13:20Z");
  RunResult raw = RunProgram({"skopeo", "inspect", "--raw", layout});
  ASSERT_EQ(raw.exit_code, 0) << raw.err;
  json manifest = json::parse(raw.out);
  ASSERT_EQ(manifest["layers"].size(), 1u);
  EXPECT_EQ(manifest["layers"][0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip") << "gzip is the default";
  EXPECT_EQ(j["Labels"]["team"], "vm");
  EXPECT_EQ(j["Labels"]["io.regdisk.disk.path"], "/disk/fedora25.qcow2");
  EXPECT_EQ(j["Labels"]["io.regdisk.disk.format"], "qcow2");
  r = RunProgram({"skopeo", "copy", layout, "dir:" + P("dir")});
  ASSERT_EQ(r.exit_code, 0) << r.err;

  r = RunProgram({"umoci", "unpack", "--image", P("layout") + ":v1", P("bundle")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  struct stat st;
  ASSERT_EQ(::stat(P("bundle/rootfs/disk/fedora25.qcow2").c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, 107u);
  EXPECT_EQ(st.st_gid, 107u);
  EXPECT_EQ(st.st_mode & 0777, 0444u);
  ASSERT_EQ(::stat(P("bundle/rootfs/disk").c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, 107u);
  EXPECT_EQ(st.st_mode & 0777, 0555u);
  EXPECT_EQ(ReadFileCapped(P("bundle/rootfs/disk/fedora25.qcow2"), 1 << 26).value(),
            ReadFileCapped(P("fedora25.qcow2"), 1 << 26).value());
}

// What `created` says: the build time, unless SOURCE_DATE_EPOCH pins it.
// The layer itself never depends on the time.
TEST_F(BuildTest, CreatedIsTheBuildTimeUnlessSourceDateEpochIsSet) {
  Qcow2("disk.qcow2", "4M");
  auto build = [&](const std::string& dir) {
    return RunProgram({"/usr/bin/env", "-u", "SOURCE_DATE_EPOCH", REGDISK_BIN, "build", P("disk.qcow2"), "-t",
                       "oci:" + P(dir) + ":v1"});
  };
  auto inspect = [&](const std::string& dir) {
    RunResult r = RunProgram({"skopeo", "inspect", "oci:" + P(dir) + ":v1"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return json::parse(r.out, nullptr, false);
  };
  const time_t before = ::time(nullptr);
  ASSERT_EQ(build("a").exit_code, 0);
  ASSERT_EQ(build("b").exit_code, 0);
  const time_t after = ::time(nullptr);
  json a = inspect("a"), b = inspect("b");
  for (const json* j : {&a, &b}) {
    tm t{};
    const std::string created = (*j)["Created"].get<std::string>();
    ASSERT_NE(::strptime(created.c_str(), "%Y-%m-%dT%H:%M:%SZ", &t), nullptr) << created;
    const time_t when = ::timegm(&t);
    EXPECT_GE(when, before) << created;
    EXPECT_LE(when, after) << created;
  }
  EXPECT_EQ(a["Layers"], b["Layers"]) << "the same disk must give the same layer whatever the time";

  RunResult bad = RunRegdisk({"build", P("disk.qcow2"), "-t", "oci:" + P("c") + ":v1"}, {}, {"SOURCE_DATE_EPOCH=yesterday"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_THAT(bad.err, HasSubstr("SOURCE_DATE_EPOCH must be seconds since 1970"));
  EXPECT_FALSE(fs::exists(P("c")));
}

// --label takes exactly one value per flag: the disk after it stays the disk.
TEST_F(BuildTest, LabelNeverEatsThePositionalDisk) {
  Qcow2("disk.qcow2", "4M");
  const std::string layout = "oci:" + P("layout") + ":v1";
  RunResult r = Regdisk({"build", "--label", "a=b", P("disk.qcow2"), "-t", layout, "--label", "c=d=e"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // Progress as pulls show it (stderr is no terminal here: the final line only).
  EXPECT_THAT(r.err, ::testing::ContainsRegex("Writing [^\n]*disk\\.qcow2 done [0-9.]+[KM]iB\n"));
  EXPECT_THAT(Regdisk({"-q", "build", P("disk.qcow2"), "-t", "oci:" + P("quiet") + ":v1"}).err, Not(HasSubstr("Writing")));
  r = RunProgram({"skopeo", "inspect", layout});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json j = json::parse(r.out);
  EXPECT_EQ(j["Labels"]["a"], "b");
  EXPECT_EQ(j["Labels"]["c"], "d=e");
  EXPECT_EQ(j["Labels"]["io.regdisk.disk.path"], "/disk/disk.qcow2");
  r = Regdisk({"build", "--label", "a=b", P("disk.qcow2")});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("--tag is required"));
}

TEST_F(BuildTest, TempFilesAKilledBuildLeftInALayoutAreRemovedByTheNext) {
  Qcow2("disk.qcow2", "8M");
  const std::string layout = "oci:" + P("layout") + ":v1";
  ASSERT_EQ(Regdisk({"build", P("disk.qcow2"), "-t", layout}).exit_code, 0);
  EXPECT_EQ(RunProgram({"umoci", "gc", "--layout", P("layout")}).exit_code, 0);
  // What a build killed mid-blob leaves: a temp file no live writer holds
  // (and, from older regdisk versions, one inside blobs/sha256).
  const fs::path stale = P("layout/.regdisk-blob.tmp-AbC123");
  const fs::path old_stale = P("layout/blobs/sha256/stream.tmp-XyZ789");
  ASSERT_OK(WriteFileAtomic(stale, "half a layer"));
  ASSERT_OK(WriteFileAtomic(old_stale, "half a layer"));
  EXPECT_NE(RunProgram({"umoci", "gc", "--layout", P("layout")}).exit_code, 0) << "umoci should trip on the leftover";
  // A temp file whose writer is alive stays.
  auto live = PendingFile::Create(P("layout/.regdisk-blob"));
  ASSERT_OK(live);

  RunResult r = Regdisk({"build", P("disk.qcow2"), "-t", "oci:" + P("layout") + ":v2", "--compression", "gzip"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_FALSE(fs::exists(old_stale));
  EXPECT_TRUE(fs::exists(live->temp_path()));
}

TEST_F(BuildTest, RefusesBadInputAndWritesNothing) {
  ASSERT_EQ(RunProgram({"qemu-img", "create", "-q", "-f", "raw", P("host"), "1M"}).exit_code, 0);
  ASSERT_EQ(RunProgram({"qemu-img", "create", "-q", "-f", "qcow2", "-b", P("host"), "-F", "raw", P("backed.qcow2")}).exit_code, 0);
  ASSERT_EQ(RunProgram({"qemu-img", "convert", "-f", "raw", "-O", "vmdk", P("host"), P("disk.vmdk")}).exit_code, 0);
  Qcow2("ok.qcow2", "1M");
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  const std::string out = "oci:" + P("out") + ":v1";
  const Case cases[] = {
      {{"build", P("backed.qcow2"), "-t", out}, "has a backing file"},
      {{"build", P("disk.vmdk"), "-t", out}, "is in VMDK format"},
      {{"build", P("missing.qcow2"), "-t", out}, "missing.qcow2"},
      {{"build", P("ok.qcow2"), "-t", out, "--name", "../x"}, "is not a plain file name"},
      {{"build", P("ok.qcow2"), "-t", out, "--format", "docker", "--compression", "zstd"}, "gzip layers only"},
      {{"build", P("ok.qcow2"), "-t", out, "--compression", "lz4"}, "--compression takes gzip, zstd or none"},
      {{"build", P("ok.qcow2"), "-t", out, "--label", "novalue"}, "is not of the form KEY=VALUE"},
      {{"build", tmp().string(), "-t", out}, "is not a regular file"},
  };
  for (const auto& c : cases) {
    RunResult r = Regdisk(c.args);
    EXPECT_NE(r.exit_code, 0) << c.message;
    EXPECT_THAT(r.err, HasSubstr(c.message));
    EXPECT_FALSE(fs::exists(P("out"))) << c.message << ": a failed build left a layout behind";
  }
}

// Property-style: many generated disks, every compression, both formats,
// through a real registry and back, byte for byte.
TEST_F(BuildTest, BuildPushPullRoundTripsManyDisks) {
  auto reg = TestRegistry::Start(RegistryMode::kPlain);
  ASSERT_OK(reg);
  std::mt19937 rng(20261127);
  const char* compressions[] = {"zstd", "gzip", "none"};
  for (int i = 0; i < 9; ++i) {
    const bool qcow2 = i % 3 == 2;
    const std::string comp = compressions[i % 3];
    std::string name = "disk" + std::to_string(i) + (qcow2 ? ".qcow2" : ".img");
    if (qcow2) {
      Qcow2(name, std::to_string(1 + rng() % 64) + "M", std::to_string((rng() % 8) * 65536));
    } else {
      // Raw: random size (not a multiple of 512 on purpose), data islands between holes.
      size_t size = 512 + rng() % (3 << 20);
      std::string data(size, '\0');
      for (int k = 0; k < 4; ++k) {
        size_t at = rng() % size, len = std::min<size_t>(size - at, 1 + rng() % 70000);
        data.replace(at, len, RandomBytes(len, static_cast<uint32_t>(rng())));
      }
      ASSERT_OK(WriteFileAtomic(P(name), data));
    }
    std::string remote = "docker://" + (*reg)->host() + "/prop/disk" + std::to_string(i) + ":v1";
    std::vector<std::string> args = {"build", P(name), "-t", remote, "--compression", comp};
    if (comp == "gzip" && i % 2 == 0) args = {"build", P(name), "-t", remote, "--format", "docker"};  // gzip implied
    RunResult r = Regdisk(args);
    ASSERT_EQ(r.exit_code, 0) << name << ": " << r.err;
    r = Regdisk({"pull", remote});
    ASSERT_EQ(r.exit_code, 0) << name << ": " << r.err;
    json j;
    for (const auto& img : json::parse(Regdisk({"images", "-o", "json"}).out)) {
      if (img["name"] == remote) j = img;
    }
    EXPECT_EQ(j["disk"]["format"], qcow2 ? "qcow2" : "raw") << name;
    EXPECT_EQ(j["disk"]["path"], "/disk/" + name);
    EXPECT_EQ(ReadFileCapped(j["disk"]["file"].get<std::string>(), 1 << 27).value(), ReadFileCapped(P(name), 1 << 27).value())
        << name << " (" << comp << ") did not survive the round trip";
  }
}

TEST_F(BuildTest, DockerfileWorkflowWithBuildah) {
  auto reg = TestRegistry::Start(RegistryMode::kPlain);
  ASSERT_OK(reg);
  const std::string host = (*reg)->host();
  RunResult r = Regdisk({"base", "-t", "docker://" + host + "/kubevirt/registry-disk-v1alpha:latest"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  Qcow2("fedora25.qcow2", "48M", "1M");
  ASSERT_OK(MakeDirs(tmp() / "ctx"));
  ASSERT_OK(WriteFileAtomic(tmp() / "ctx/fedora25.qcow2", ReadFileCapped(P("fedora25.qcow2"), 1 << 26).value()));
  ASSERT_OK(WriteFileAtomic(tmp() / "ctx/Dockerfile",
                            "FROM " + host + "/kubevirt/registry-disk-v1alpha:latest\nADD fedora25.qcow2 /disk\n"));
  // buildah without a daemon: vfs storage in our temp dir, chroot isolation.
  const std::vector<std::string> storage = {"--root", P("containers"), "--runroot", P("run"), "--storage-driver", "vfs"};
  std::vector<std::string> bud = {"buildah"};
  bud.insert(bud.end(), storage.begin(), storage.end());
  bud.insert(bud.end(), {"bud", "--isolation", "chroot", "--tls-verify=false", "-t", host + "/vmdisks/fedora25:latest", P("ctx")});
  r = RunProgram(bud, {}, {"BUILDAH_ISOLATION=chroot"}, std::chrono::seconds(300));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::vector<std::string> push = {"buildah"};
  push.insert(push.end(), storage.begin(), storage.end());
  push.insert(push.end(), {"push", "--tls-verify=false", host + "/vmdisks/fedora25:latest"});
  r = RunProgram(push, {}, {}, std::chrono::seconds(300));
  ASSERT_EQ(r.exit_code, 0) << r.err;

  r = Regdisk({"pull", "docker://" + host + "/vmdisks/fedora25:latest"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Regdisk({"images", "-o", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json j = json::parse(r.out)[0];
  EXPECT_EQ(j["disk"]["path"], "/disk/fedora25.qcow2");
  EXPECT_EQ(j["disk"]["format"], "qcow2");
  EXPECT_EQ(j["disk"]["virtualSize"], 48 << 20);
  r = RunProgram({"qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", j["disk"]["file"], P("fedora25.qcow2")});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;

  // regdisk build on the same base gives the same layout natively.
  std::string native = "docker://" + host + "/vmdisks/native:v1";
  r = Regdisk({"build", P("fedora25.qcow2"), "--base", "docker://" + host + "/kubevirt/registry-disk-v1alpha:latest", "-t",
               native, "--compression", "gzip"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Regdisk({"inspect", native});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["Layers"].size(), 2u);
  EXPECT_EQ(json::parse(r.out)["Labels"]["io.regdisk.base"], "v1");
  r = Regdisk({"inspect", "--disk", native});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["Disk"]["Path"], "/disk/fedora25.qcow2");
}

}  // namespace
}  // namespace regdisk::testing
