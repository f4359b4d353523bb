// The parts of VM networking that need no running QEMU: --publish values,
// stable MACs, VM network CIDRs, and what run and domxml refuse, warn
// about or write before a VM would start (specs whose image is nowhere, so
// nothing is pulled).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <regex>

#include "harness/harness.h"
#include "util/ipv4.h"
#include "vm/plan.h"

namespace regdisk::vm {
namespace {

using ::testing::HasSubstr;
using testing::RunRegdisk;
using testing::RunResult;
using testing::TempDirTest;

TEST(PublishTest, PodmanForms) {
  struct Case {
    const char* text;
    const char* ip;
    int host, guest;
    const char* proto;
  };
  for (const Case& c : {Case{"80", "127.0.0.1", 0, 80, "tcp"}, Case{"8080:80", "127.0.0.1", 8080, 80, "tcp"},
                        Case{"0.0.0.0:8080:80/udp", "0.0.0.0", 8080, 80, "udp"}, Case{"::22", "127.0.0.1", 0, 22, "tcp"},
                        Case{"127.0.0.1::443/TCP", "127.0.0.1", 0, 443, "tcp"}}) {
    auto p = ParsePublish(c.text);
    ASSERT_TRUE(p.ok()) << c.text << ": " << p.status().ToString();
    EXPECT_EQ(p->host_ip, c.ip) << c.text;
    EXPECT_EQ(p->host_port, c.host) << c.text;
    EXPECT_EQ(p->guest_port, c.guest) << c.text;
    EXPECT_EQ(p->protocol, c.proto) << c.text;
  }
  for (const char* bad : {"", "http", "80/sctp", "70000", "1:2:3:4", "host:80:80", "8080:0", "-1:80"}) {
    auto p = ParsePublish(bad);
    EXPECT_FALSE(p.ok()) << bad;
    EXPECT_THAT(p.status().message(), HasSubstr("--publish")) << bad;
  }
  PublishedPort shown = *ParsePublish("127.0.0.1:8080:80");
  EXPECT_EQ(shown.String(), "80/tcp -> 127.0.0.1:8080");
}

class PlanCliTest : public TempDirTest {};

// Two ports that name one host port are refused before anything is pulled
// (the spec's image is on a registry that does not exist), in one line.
TEST_F(PlanCliTest, TwoPortsOnOneHostPortAreRefused) {
  struct Case {
    std::vector<std::string> publish;
    std::string message;
  };
  const Case cases[] = {
      {{"8080:80", "8080:81"}, "--publish: 80/tcp -> 127.0.0.1:8080 and 81/tcp -> 127.0.0.1:8080 use the same host port"},
      {{"8080:80", "8080:80"}, "80/tcp -> 127.0.0.1:8080 and 80/tcp -> 127.0.0.1:8080 use the same host port"},
      {{"0.0.0.0:8080:80", "127.0.0.1:8080:81"}, "80/tcp -> 0.0.0.0:8080 and 81/tcp -> 127.0.0.1:8080 use the same"},
  };
  std::string spec = ReadFileCapped(REGDISK_SOURCE_DIR "/examples/vm.yaml", 1 << 20).value();
  spec = std::regex_replace(spec, std::regex("image: .*"), "image: 127.0.0.1:1/vmdisks/nowhere:v1");
  ASSERT_OK(WriteFileAtomic(tmp() / "vm.yaml", spec));
  for (const Case& c : cases) {
    std::vector<std::string> args = {"--root", P("root"), "run", "-f", P("vm.yaml"), "--accel", "tcg"};
    for (const auto& p : c.publish) args.insert(args.end(), {"--publish", p});
    RunResult r = RunRegdisk(args);
    EXPECT_EQ(r.exit_code, 2) << r.err;
    EXPECT_THAT(r.err, HasSubstr(c.message));
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  // Different protocols or addresses do not collide: those get as far as
  // the pull.
  for (auto publish : {std::vector<std::string>{"8080:80", "8080:80/udp"},
                       std::vector<std::string>{"127.0.0.1:8080:80", "127.0.0.2:8080:81"}}) {
    std::vector<std::string> args = {"--root", P("root"), "run", "-f", P("vm.yaml"), "--accel", "tcg"};
    for (const auto& p : publish) args.insert(args.end(), {"--publish", p});
    RunResult r = RunRegdisk(args);
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_THAT(r.err, HasSubstr("127.0.0.1:1"));
  }
}

// domxml writes the cloud-init seed its XML names, so the domain can be
// defined and started with virsh as it is: 0600, in a 0700 directory of
// its own under the root, replaced by the next domxml.
TEST_F(PlanCliTest, DomxmlWritesTheSeedItNames) {
  std::string spec = ReadFileCapped(REGDISK_SOURCE_DIR "/examples/vm-web.yaml", 1 << 20).value();
  spec = std::regex_replace(spec, std::regex("image: .*"), "image: 127.0.0.1:1/vmdisks/nowhere:v1");
  ASSERT_OK(WriteFileAtomic(tmp() / "web.yaml", spec));
  const std::filesystem::path seed = tmp() / "root/seeds/default_web/cloudinitdisk.cidata.iso";
  for (int i = 0; i < 2; ++i) {
    RunResult r = RunRegdisk({"--root", P("root"), "domxml", "-f", P("web.yaml")});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_THAT(r.out, HasSubstr("<source file=\"" + seed.string() + "\"/>"));
    EXPECT_THAT(r.err, HasSubstr("disk cloudinitdisk: its cloud-init seed (ISO 9660, label cidata, holding the "
                                 "user-data) is " + seed.string() + ", mode 0600"));
    std::string iso = ReadFileCapped(seed, 1 << 20).value_or("");
    EXPECT_EQ(iso.substr(0x8001, 5), "CD001");
    EXPECT_THAT(iso, HasSubstr("password: change-me"));
    struct stat st{};
    ASSERT_EQ(::stat(seed.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
    ASSERT_EQ(::stat(seed.parent_path().c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0700u);
  }
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(seed.parent_path()), {}), 1) << "a temp file was left";
}

// A disk's name is data: one that is a path ("../../../escape") cannot put
// the VM's files outside its run directory. The VM (a cloud-init disk only,
// so nothing is pulled) runs until its timeout.
TEST_F(PlanCliTest, DiskNamesThatArePathsStayInsideTheRunDirectory) {
  const std::string spec = R"(apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata: {name: t}
spec:
  domain:
    memory: {guest: 64Mi}
    devices:
      disks:
      - {name: "../../../escape", disk: {bus: virtio}}
  volumes:
  - name: "../../../escape"
    cloudInitNoCloud: {userData: "hi"}
)";
  ASSERT_OK(WriteFileAtomic(tmp() / "t.yaml", spec));
  RunResult r = RunRegdisk({"--root", P("root"), "run", "-f", P("t.yaml"), "--timeout", "1s", "--grace", "1",
                            "--accel", "tcg"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  for (const auto& e : std::filesystem::recursive_directory_iterator(tmp())) {
    EXPECT_EQ(e.path().string().find("escape"), std::string::npos) << e.path();
  }
  RunResult x = RunRegdisk({"--root", P("root"), "domxml", "-f", P("t.yaml")});
  ASSERT_EQ(x.exit_code, 0) << x.err;
  EXPECT_THAT(x.out, HasSubstr("<source file=\"" + P("root") + "/seeds/default_t/disk_0.cidata.iso\"/>"));
}

// VNC has no password: any --vnc address but loopback gets a warning.
TEST_F(PlanCliTest, VncOffLoopbackIsWarnedAbout) {
  std::string spec = ReadFileCapped(REGDISK_SOURCE_DIR "/examples/vm.yaml", 1 << 20).value();
  spec = std::regex_replace(spec, std::regex("image: .*"), "image: 127.0.0.1:1/vmdisks/nowhere:v1");
  ASSERT_OK(WriteFileAtomic(tmp() / "vm.yaml", spec));
  RunResult open = RunRegdisk({"--root", P("root"), "domxml", "-f", P("vm.yaml"), "--vnc", "0.0.0.0:3"});
  ASSERT_EQ(open.exit_code, 0) << open.err;
  EXPECT_THAT(open.err, HasSubstr("regdisk: warning: --vnc 0.0.0.0:3: VNC has no password, and 0.0.0.0 is not a "
                                  "loopback address: anyone who can reach port 5903 there"));
  EXPECT_THAT(open.out, HasSubstr("listen=\"0.0.0.0\""));
  RunResult local = RunRegdisk({"--root", P("root"), "domxml", "-f", P("vm.yaml"), "--vnc", "127.0.0.1:3"});
  ASSERT_EQ(local.exit_code, 0) << local.err;
  EXPECT_THAT(local.err, ::testing::Not(HasSubstr("warning")));
}

TEST(StableMacTest, LocallyAdministeredUnicastAndStable) {
  std::string a = StableMac("default", "web-a", "default");
  EXPECT_EQ(a, StableMac("default", "web-a", "default"));
  EXPECT_NE(a, StableMac("default", "web-b", "default"));
  EXPECT_NE(a, StableMac("other", "web-a", "default"));
  EXPECT_NE(a, StableMac("default", "web-a", "second"));
  ASSERT_EQ(a.size(), 17u);
  EXPECT_EQ(a.substr(0, 3), "02:");
}

TEST(Ipv4Test, Cidrs) {
  auto n = ParseIpv4Cidr("10.0.2.7/24");
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(n->String(), "10.0.2.0/24");
  EXPECT_EQ(Ipv4String(n->Host(2)), "10.0.2.2");
  EXPECT_TRUE(ParseIpv4Cidr("192.168.0.0/16").ok());
  for (const char* bad : {"10.0.2.0", "10.0.2.0/33", "10.0.2.0/29", "10.0.2/24", "10.0.2.0/", "10.0.2.0/2x", "::1/64"}) {
    EXPECT_FALSE(ParseIpv4Cidr(bad).ok()) << bad;
  }
}

}  // namespace
}  // namespace regdisk::vm
