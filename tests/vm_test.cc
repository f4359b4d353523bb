// Running VMs with real QEMU (KVM when usable, else TCG) on registry disks
// pushed to a real registry. The guest is the boot sector in guest/hello.S:
// it prints sector 1, then overwrites it.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include <cstring>

#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <thread>
#include <tuple>

#include "harness/harness.h"
#include "registry/http.h"
#include "vm/plan.h"

namespace regdisk::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;
using namespace std::chrono_literals;

const char* kSeedSpec = REGDISK_SOURCE_DIR "/examples/vm.yaml";

class VmTest : public StoreAndRegistryTest {
 protected:
  void SetUp() override {
    StoreAndRegistryTest::SetUp();
    if (HasFatalFailure()) return;
    // The guest disks: boot sector, the sector it prints, and a sector
    // that says whether to power off at the end (guest) or stay up (halt).
    for (bool off : {true, false}) {
      std::string raw = ReadFileCapped(REGDISK_GUEST_IMAGE, 512).value();
      std::string sector1 = "PRISTINE-SECTOR-CONTENT";
      sector1.resize(512, '\0');
      raw += sector1 + (off ? "POWEROFF" : "STAY-UP");
      raw.resize(1 << 20, '\0');
      std::string name = off ? "guest" : "halt";
      ASSERT_OK(WriteFileAtomic(tmp() / (name + ".raw"), raw));
      ASSERT_EQ(RunProgram({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", P(name + ".raw"), P(name + ".qcow2")}).exit_code, 0);
    }
  }
  std::string Push(const std::string& disk, const std::string& repo) {
    std::string ref = "docker://" + reg_->host() + "/" + repo;
    RunResult r = RunRegdisk({"build", P(disk), "-t", ref});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return ref;
  }
  // The seed's spec with its image (or `image`) on the test registry.
  std::string Spec(const std::string& name, const std::string& image = "vmdisks/fedora25:latest",
                   const std::string& src = kSeedSpec) {
    std::string text = ReadFileCapped(src, 1 << 20).value();
    text = std::regex_replace(text, std::regex("image: vmdisks/"), "image: " + reg_->host() + "/vmdisks/");
    if (image != "vmdisks/fedora25:latest") {
      text = std::regex_replace(text, std::regex("image: .*fedora25:latest"), "image: " + reg_->host() + "/" + image);
    }
    std::string path = P(name);
    EXPECT_TRUE(WriteFileAtomic(path, text).ok());
    return path;
  }
  RunResult Run(const std::string& spec, std::vector<std::string> extra = {}) {
    // The guest powers itself off; the timeout is only a safety net.
    std::vector<std::string> args = {"--root", root_, "run", "-f", spec, "--timeout", "120", "--grace", "1"};
    args.insert(args.end(), extra.begin(), extra.end());
    return RunRegdisk(args);
  }
  static int Count(const std::string& s, const std::string& what) {
    int n = 0;
    for (size_t at = s.find(what); at != std::string::npos; at = s.find(what, at + 1)) ++n;
    return n;
  }
  void ExpectNothingLeft() {
    fs::path run = fs::path(root_) / "run";
    if (fs::exists(run)) {
      EXPECT_TRUE(fs::is_empty(run)) << "a run directory was left behind";
    }
    auto r = RunProgram({"pgrep", "-f", root_ + "/run"});
    EXPECT_NE(r.exit_code, 0) << "a QEMU process was left behind: " << r.out;
  }
  std::string StoredDiskDigest() {
    std::string out;
    for (const auto& e : fs::recursive_directory_iterator(fs::path(root_) / "disks")) {
      if (e.is_regular_file() && e.path().filename() != "meta.json") {
        out += oci::Digest::Sha256Of(ReadFileCapped(e.path(), 1 << 26).value()).str() + " ";
      }
    }
    return out;
  }
};

// Waits (up to `limit`) until `file` contains `marker`.
bool WaitFor(const std::string& file, const std::string& marker, std::chrono::seconds limit) {
  auto until = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < until) {
    auto t = ReadFileCapped(file, 1 << 20);
    if (t.ok() && t->find(marker) != std::string::npos) return true;
    std::this_thread::sleep_for(50ms);
  }
  return false;
}

TEST_F(VmTest, SeedSpecBootsAndWritesAreEphemeral) {
  Push("guest.qcow2", "vmdisks/fedora25:latest");
  std::string spec = Spec("vm.yaml");
  RunResult first = Run(spec);
  ASSERT_EQ(first.exit_code, 0) << first.err;
  EXPECT_THAT(first.out, HasSubstr("REGDISK-GUEST-BOOTED"));
  EXPECT_THAT(first.out, HasSubstr("sector1: PRISTINE-SECTOR-CONTENT"));
  EXPECT_THAT(first.out, HasSubstr("REGDISK-GUEST-DONE"));  // the guest wrote the sector
  EXPECT_THAT(first.out, HasSubstr("REGDISK-GUEST-POWEROFF"));  // and regdisk returned when it powered off
  std::string digest = StoredDiskDigest();
  ExpectNothingLeft();
  // The second run (under TCG emulation, whatever the host has) sees the
  // pristine sector again: the write went to an overlay that is gone.
  RunResult second = Run(spec, {"--accel", "tcg"});
  ASSERT_EQ(second.exit_code, 0) << second.err;
  EXPECT_THAT(second.out, HasSubstr("sector1: PRISTINE-SECTOR-CONTENT"));
  EXPECT_THAT(second.out, Not(HasSubstr("WRITTEN-BY-GUEST")));
  EXPECT_EQ(StoredDiskDigest(), digest) << "the store's copy of the disk changed";
  ExpectNothingLeft();
  // The console also went to the log; the run before is rotated, not lost.
  const fs::path log = fs::path(root_) / "logs/default_testvm-ephemeral.log";
  EXPECT_THAT(ReadFileCapped(log, 1 << 20).value(), HasSubstr("PRISTINE-SECTOR-CONTENT"));
  EXPECT_THAT(ReadFileCapped(log.string() + ".1", 1 << 20).value_or(""), HasSubstr("PRISTINE-SECTOR-CONTENT"));
  EXPECT_EQ(Count(ReadFileCapped(log, 1 << 20).value(), "sector1: PRISTINE"), 1);
}

// A start that fails (here QEMU is /bin/false, which exits at once) keeps
// the logs of the runs before as they were; the next run that starts
// rotates them.
TEST_F(VmTest, AFailedStartLeavesTheLogsAsTheyWere) {
  Push("guest.qcow2", "vmdisks/fedora25:latest");
  std::string spec = Spec("vm.yaml");
  const fs::path log = fs::path(root_) / "logs/default_testvm-ephemeral.log";
  ASSERT_EQ(Run(spec).exit_code, 0);
  const std::string before = ReadFileCapped(log, 1 << 20).value_or("");
  ASSERT_THAT(before, HasSubstr("REGDISK-GUEST-POWEROFF"));
  for (int i = 0; i < 4; ++i) {
    RunResult failed = Run(spec, {"--qemu", "/bin/false"});
    EXPECT_EQ(failed.exit_code, 1) << failed.err;
    EXPECT_THAT(failed.err, HasSubstr("QEMU could not run VM testvm-ephemeral"));
  }
  EXPECT_EQ(ReadFileCapped(log, 1 << 20).value_or("(gone)"), before);
  for (const char* suffix : {".0", ".1"}) EXPECT_FALSE(fs::exists(log.string() + suffix)) << suffix;
  ExpectNothingLeft();
  ASSERT_EQ(Run(spec).exit_code, 0);
  EXPECT_THAT(ReadFileCapped(log, 1 << 20).value_or(""), HasSubstr("REGDISK-GUEST-POWEROFF"));
  EXPECT_EQ(ReadFileCapped(log.string() + ".1", 1 << 20).value_or("(gone)"), before);
  EXPECT_FALSE(fs::exists(log.string() + ".0"));
}

// A paste into a guest that does not read its console (the boot sector
// never does) cannot block regdisk: input waits in a bounded buffer, the
// rest is dropped, and Ctrl-] after 8 MiB of it still stops the VM.
TEST_F(VmTest, APasteIntoAGuestThatDoesNotReadLeavesCtrlRightBracketWorking) {
  Push("halt.qcow2", "vmdisks/fedora25:latest");
  auto s = PtySession::Spawn({REGDISK_BIN, "--root", root_, "run", "-f", Spec("vm.yaml"), "--grace", "1"});
  ASSERT_OK(s);
  PtySession& term = **s;
  ASSERT_TRUE(term.ReadUntil("attached; Ctrl-] stops the VM", 0, 120s)) << term.seen();
  ASSERT_TRUE(term.ReadUntil("REGDISK-GUEST-DONE", 0, 120s)) << term.seen();  // the guest halts, reading nothing
  const size_t mark = term.seen().size();
  std::thread paste([&term] {
    const std::string chunk(64 << 10, 'x');
    for (int i = 0; i < 128; ++i) {
      if (!term.Write(chunk, 90s).ok()) return;  // regdisk stopped reading: the test fails below
    }
    (void)term.Write("\x1d", 90s);
  });
  const bool stopped = term.ReadUntil("detached from the console (Ctrl-]); stopping VM", mark, 120s);
  paste.join();
  ASSERT_TRUE(stopped) << term.seen().substr(mark, 4096);
  EXPECT_THAT(term.seen(), ::testing::ContainsRegex("did not read [0-9]+ bytes of console input, which were dropped"));
  term.ReadToEnd(120s);
  int status = term.Wait();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status << "\n" << term.seen().substr(mark, 4096);
  ExpectNothingLeft();
}

TEST_F(VmTest, RawDisksAndTwoVmsAtOnceShareOneStoredDisk) {
  Push("guest.raw", "vmdisks/raw:v1");
  std::string a = Spec("a.yaml", "vmdisks/raw:v1");
  // The same VM under a second name (one name runs once per node).
  std::string b = P("b.yaml");
  ASSERT_OK(WriteFileAtomic(b, std::regex_replace(ReadFileCapped(a, 1 << 20).value(), std::regex("name: testvm-ephemeral"),
                                                  "name: testvm-second")));
  // Pull once, then start two VMs from it at the same time.
  ASSERT_EQ(RunRegdisk({"--root", root_, "pull", "docker://" + reg_->host() + "/vmdisks/raw:v1"}).exit_code, 0);
  RunResult r1, r2;
  std::thread t1([&] { r1 = Run(a); });
  std::thread t2([&] { r2 = Run(b); });
  t1.join();
  t2.join();
  for (const RunResult* r : {&r1, &r2}) {
    ASSERT_EQ(r->exit_code, 0) << r->err;
    EXPECT_EQ(Count(r->out, "sector1: PRISTINE-SECTOR-CONTENT"), 1) << r->out;
  }
  int disks = 0;
  for (const auto& e : fs::directory_iterator(fs::path(root_) / "disks")) disks += e.is_directory();
  EXPECT_EQ(disks, 1);
  ExpectNothingLeft();
}

TEST_F(VmTest, SigtermDuringBootAndRunLeavesNothing) {
  Push("halt.qcow2", "vmdisks/fedora25:latest");
  std::string spec = Spec("vm.yaml");
  for (bool during_boot : {true, false}) {
    std::string out = P(during_boot ? "boot.out" : "run.out");
    Process::Options opt;
    opt.stdout_mode = Process::Stdio::kFile;
    opt.stdout_file = out;
    opt.stderr_mode = Process::Stdio::kFile;
    opt.stderr_file = out + ".err";
    auto p = Process::Spawn({REGDISK_BIN, "--root", root_, "run", "-f", spec, "--grace", "1"}, opt);
    ASSERT_OK(p);
    if (during_boot) {
      // Pulling, or QEMU starting: its run directory exists.
      bool started = false;
      for (int i = 0; i < 600 && !started; ++i, std::this_thread::sleep_for(10ms)) {
        std::error_code ec;
        started = fs::is_directory(fs::path(root_) / "run", ec) && !fs::is_empty(fs::path(root_) / "run", ec);
      }
      ASSERT_TRUE(started) << ReadFileCapped(out + ".err", 1 << 20).value_or("");
    } else {
      ASSERT_TRUE(WaitFor(out, "REGDISK-GUEST-DONE", 60s)) << ReadFileCapped(out + ".err", 1 << 20).value_or("");
    }
    ::kill(p->pid(), SIGTERM);
    auto code = p->Wait(30s);
    ASSERT_TRUE(code.has_value()) << "regdisk did not stop on SIGTERM";
    EXPECT_EQ(*code, 0) << ReadFileCapped(out + ".err", 1 << 20).value_or("");
    ExpectNothingLeft();
  }
}

// --vnc gives the guest a screen: a VNC server answers on 5900+display.
TEST_F(VmTest, VncServesTheScreen) {
  Push("halt.qcow2", "vmdisks/fedora25:latest");
  std::string spec = Spec("vm.yaml");
  RunResult bad = RunRegdisk({"--root", root_, "run", "-f", spec, "--vnc", "localhost"});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_THAT(bad.err, HasSubstr("--vnc takes IPV4ADDRESS:DISPLAY"));
  // A display whose port is free now.
  int display = -1;
  for (int d = 40; d < 100 && display < 0; ++d) {
    UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(5900 + d));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) display = d;
  }
  ASSERT_GE(display, 0);
  Process::Options opt;
  opt.stdout_mode = Process::Stdio::kFile;
  opt.stdout_file = P("vnc.out");
  opt.stderr_mode = Process::Stdio::kFile;
  opt.stderr_file = P("vnc.err");
  auto p = Process::Spawn({REGDISK_BIN, "--root", root_, "run", "-f", spec, "--grace", "1", "--vnc",
                           "127.0.0.1:" + std::to_string(display)}, opt);
  ASSERT_OK(p);
  ASSERT_TRUE(WaitFor(P("vnc.out"), "REGDISK-GUEST-DONE", 60s)) << ReadFileCapped(P("vnc.err"), 1 << 20).value_or("");
  // The RFB greeting: "RFB 003.008\n".
  UniqueFd c(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(5900 + display));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(c.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0) << std::strerror(errno);
  char greeting[12] = {};
  timeval tv{30, 0};
  ::setsockopt(c.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ASSERT_EQ(::recv(c.get(), greeting, sizeof greeting, MSG_WAITALL), 12);
  EXPECT_EQ(std::string(greeting, 4), "RFB ");
  ::kill(p->pid(), SIGTERM);
  EXPECT_EQ(p->Wait(30s).value_or(-1), 0);
  ExpectNothingLeft();
}

TEST_F(VmTest, RmiKeepsADiskARunningVmUsesUntilItStops) {
  std::string image = Push("halt.qcow2", "vmdisks/fedora25:latest");
  std::string spec = Spec("vm.yaml");
  Process::Options opt;
  opt.stdout_mode = Process::Stdio::kFile;
  opt.stdout_file = P("run.out");
  opt.stderr_mode = Process::Stdio::kFile;
  opt.stderr_file = P("run.err");
  auto p = Process::Spawn({REGDISK_BIN, "--root", root_, "run", "-f", spec, "--grace", "1"}, opt);
  ASSERT_OK(p);
  ASSERT_TRUE(WaitFor(P("run.out"), "REGDISK-GUEST-DONE", 60s)) << ReadFileCapped(P("run.err"), 1 << 20).value_or("");

  // Without --force, rmi refuses and removes nothing.
  RunResult r = RunRegdisk({"--root", root_, "rmi", image});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("is in use by a running VM; stop the VM first, or use --force"));
  EXPECT_THAT(RunRegdisk({"--root", root_, "images"}).out, HasSubstr("fedora25"));
  // With it, the name goes now and the disk once the VM stops.
  r = RunRegdisk({"--root", root_, "rmi", "--force", image});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("Untagged: " + image));
  EXPECT_THAT(r.err, HasSubstr("a running VM uses it"));
  EXPECT_FALSE(fs::is_empty(fs::path(root_) / "disks"));  // kept under the running VM
  EXPECT_THAT(RunRegdisk({"--root", root_, "images"}).out, Not(HasSubstr("fedora25")));

  ::kill(p->pid(), SIGTERM);
  ASSERT_TRUE(p->Wait(30s).has_value());
  r = RunRegdisk({"--root", root_, "prune"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("1 disks"));
  EXPECT_TRUE(fs::is_empty(fs::path(root_) / "disks"));
  EXPECT_TRUE(fs::is_empty(fs::path(root_) / "blobs/sha256"));
}

TEST_F(VmTest, CrashedRegdiskIsCleanedUpByTheNextRun) {
  Push("halt.qcow2", "vmdisks/fedora25:latest");
  std::string spec = Spec("vm.yaml");
  Process::Options opt;
  opt.stdout_mode = Process::Stdio::kFile;
  opt.stdout_file = P("crash.out");
  auto p = Process::Spawn({REGDISK_BIN, "--root", root_, "run", "-f", spec}, opt);
  ASSERT_OK(p);
  ASSERT_TRUE(WaitFor(P("crash.out"), "REGDISK-GUEST-DONE", 60s));
  ::kill(p->pid(), SIGKILL);  // regdisk dies, and takes its QEMU along
  p->Wait(10s);
  bool qemu_gone = false;
  for (int i = 0; i < 200 && !qemu_gone; ++i, std::this_thread::sleep_for(50ms)) {
    qemu_gone = RunProgram({"pgrep", "-f", root_ + "/run"}).exit_code != 0;
  }
  EXPECT_TRUE(qemu_gone) << "QEMU outlived the regdisk that ran it";
  EXPECT_FALSE(fs::is_empty(fs::path(root_) / "run"));
  Push("guest.qcow2", "vmdisks/fedora25:latest");
  RunResult r = Run(spec);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ExpectNothingLeft();
}

TEST_F(VmTest, RunsKilledAtAnyPointLeaveNoVmAndAWholeStore) {
  // SIGKILL while pulling, while QEMU starts, while the guest runs: no QEMU
  // outlives regdisk, the store stays whole, and the next run works.
  Push("halt.qcow2", "vmdisks/fedora25:latest");
  const std::string spec = Spec("vm.yaml");
  for (int ms : {0, 40, 120, 250, 500, 900, 1500, 2500}) {
    Process::Options opt;
    opt.stdout_mode = Process::Stdio::kNull;
    opt.stderr_mode = Process::Stdio::kNull;
    auto p = Process::Spawn({REGDISK_BIN, "--root", root_, "run", "-f", spec}, opt);
    ASSERT_OK(p);
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    p->Signal(SIGKILL);
    ASSERT_TRUE(p->Wait(30s).has_value());
    bool qemu_gone = false;
    for (int i = 0; i < 200 && !qemu_gone; ++i, std::this_thread::sleep_for(50ms)) {
      qemu_gone = RunProgram({"pgrep", "-f", root_ + "/run"}).exit_code != 0;
    }
    EXPECT_TRUE(qemu_gone) << "QEMU outlived a regdisk killed after " << ms << " ms";
    if (fs::exists(root_)) {
      RunResult fsck = RunRegdisk({"--root", root_, "fsck"});
      EXPECT_EQ(fsck.exit_code, 0) << "after " << ms << " ms: " << fsck.out << fsck.err;
    }
  }
  Push("guest.qcow2", "vmdisks/fedora25:latest");
  RunResult r = Run(spec);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Count(r.out, "sector1: PRISTINE-SECTOR-CONTENT"), 1) << r.out;
  ExpectNothingLeft();
}

TEST_F(VmTest, ImagePullSecretFromTheSameFile) {
  auto secure = TestRegistry::Start(RegistryMode::kTlsBasic);
  ASSERT_OK(secure);
  const std::string host = (*secure)->host();
  const std::string certs = (*secure)->ca_dir().string();
  const std::string creds = (*secure)->user() + ":" + (*secure)->password();
  RunResult r = RunRegdisk({"build", P("guest.qcow2"), "-t", "docker://" + host + "/private/vm:v1", "--cert-dir", certs,
                            "--creds", creds});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string config = "{\"auths\":{\"" + host + "\":{\"auth\":\"" + registry::Base64Encode(creds) + "\"}}}";
  std::string spec = "apiVersion: v1\nkind: Secret\nmetadata: {name: pull}\ntype: kubernetes.io/dockerconfigjson\n"
                     "data:\n  .dockerconfigjson: " + registry::Base64Encode(config) + "\n---\n" +
                     ReadFileCapped(kSeedSpec, 1 << 20).value();
  spec = std::regex_replace(spec, std::regex("image: vmdisks/fedora25:latest"),
                            "image: " + host + "/private/vm:v1\n        imagePullSecret: pull");
  ASSERT_OK(WriteFileAtomic(P("secret.yaml"), spec));
  // Without the secret the registry refuses; with it the VM boots.
  std::string no_secret = std::regex_replace(spec, std::regex("\n        imagePullSecret: pull"), "");
  ASSERT_OK(WriteFileAtomic(P("nosecret.yaml"), no_secret));
  r = Run(P("nosecret.yaml"), {"--cert-dir", certs});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("requires a login"));
  // The secret is never written anywhere: not under TMPDIR, not in the store.
  fs::create_directory(P("tmpdir"));
  r = RunRegdisk({"--root", root_, "run", "-f", P("secret.yaml"), "--timeout", "120", "--grace", "1", "--cert-dir", certs},
                 {}, {"TMPDIR=" + P("tmpdir")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("sector1: PRISTINE-SECTOR-CONTENT"));
  EXPECT_THAT(r.err, Not(HasSubstr((*secure)->password())));
  EXPECT_TRUE(fs::is_empty(P("tmpdir")));
  for (const auto& e : fs::recursive_directory_iterator(root_)) {
    if (!e.is_regular_file()) continue;
    const std::string text = ReadFileCapped(e.path(), 64 << 20).value_or("");
    EXPECT_EQ(text.find((*secure)->password()), std::string::npos) << e.path();
    EXPECT_EQ(text.find(registry::Base64Encode(creds)), std::string::npos) << e.path();
  }
  ExpectNothingLeft();
}

TEST_F(VmTest, FailuresAreOneClearSentence) {
  Push("guest.qcow2", "vmdisks/fedora25:latest");
  std::string spec = Spec("vm.yaml");
  struct Case {
    std::vector<std::string> extra;
    std::string spec;
    std::string message;
  };
  std::string huge = P("huge.yaml");
  ASSERT_OK(WriteFileAtomic(huge, std::regex_replace(ReadFileCapped(spec, 1 << 20).value(), std::regex("memory: 64M"),
                                                     "memory: 900Ti")));
  std::string never = P("never.yaml");
  ASSERT_OK(WriteFileAtomic(never, std::regex_replace(ReadFileCapped(Spec("missing.yaml", "vmdisks/absent:v1"), 1 << 20).value(),
                                                      std::regex("image: (.*)"), "image: $1\n        imagePullPolicy: Never")));
  std::string unreachable = P("unreachable.yaml");
  ASSERT_OK(WriteFileAtomic(unreachable, std::regex_replace(ReadFileCapped(Spec("u.yaml", "vmdisks/x:v1"), 1 << 20).value(),
                                                            std::regex(reg_->host()), "127.0.0.1:1")));
  // A host port another program holds, named by --publish.
  UniqueFd busy(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  ASSERT_EQ(::bind(busy.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::listen(busy.get(), 1), 0);
  ASSERT_EQ(::getsockname(busy.get(), reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const std::string held = std::to_string(ntohs(addr.sin_port));
  const Case cases[] = {
      {{"--qemu", "/nonexistent/qemu"}, spec, "QEMU (qemu-system-x86_64) was not found"},
      {{}, huge, "asks for 943718400 MiB of memory but the host has only"},
      {{}, never, "is not in the node store and its imagePullPolicy is Never"},
      {{}, Spec("absent.yaml", "vmdisks/absent:v1"), "not found on " + reg_->host()},
      {{}, unreachable, "127.0.0.1:1"},
      {{"--publish", held + ":80", "-q"}, spec,  // -q: no pull progress
       "--publish: host port 127.0.0.1:" + held + "/tcp for guest port 80 cannot be used (binding it: Address already in use)"},
  };
  for (const auto& c : cases) {
    RunResult r = Run(c.spec, c.extra);
    EXPECT_NE(r.exit_code, 0) << c.message;
    EXPECT_THAT(r.err, HasSubstr(c.message));
    EXPECT_EQ(Count(r.err, "\n"), 1) << r.err;
    ExpectNothingLeft();
  }
  if (::access("/dev/kvm", R_OK | W_OK) != 0) {
    RunResult r = Run(spec, {"--accel", "kvm"});
    EXPECT_THAT(r.err, HasSubstr("/dev/kvm is not usable"));
  }
}

// A cdrom goes to QEMU as a read-only ide-cd on the AHCI controller (or a
// scsi-cd), each SATA device on a port of its own.
TEST(QemuArgvTest, CdromsAreReadOnlyCdDevices) {
  vm::VmPlan plan;
  plan.name = "vm";
  plan.qemu = "/usr/bin/qemu-system-x86_64";
  plan.memory_bytes = 64 << 20;
  for (const auto& [name, device, bus] : std::vector<std::tuple<std::string, std::string, std::string>>{
           {"root", "disk", "virtio"}, {"media", "cdrom", "sata"}, {"data", "disk", "sata"}, {"iso", "cdrom", "scsi"}}) {
    vm::PlannedDisk d;
    d.name = name;
    d.device = device;
    d.bus = bus;
    d.read_only = device == "cdrom";
    d.backing = "/store/" + name;
    d.overlay = "/run/" + name + ".qcow2";
    plan.disks.push_back(d);
  }
  std::string argv;
  for (const auto& a : vm::QemuArgv(plan)) argv += a + "\n";
  EXPECT_THAT(argv, HasSubstr(R"({"bus":"ahci0.0","drive":"disk1","driver":"ide-cd","id":"media"})"));
  EXPECT_THAT(argv, HasSubstr(R"({"bus":"ahci0.1","drive":"disk2","driver":"ide-hd","id":"data"})"));
  EXPECT_THAT(argv, HasSubstr(R"("driver":"scsi-cd","id":"iso")"));
  EXPECT_THAT(argv, HasSubstr(R"({"backing":"base1","driver":"qcow2","file":"overlay-file1","node-name":"disk1","read-only":true})"));
}

// Every spec in examples/ boots: the seed (v1alpha1), the two-disk VM with
// its read-only SATA cdrom, and the kubevirt.io/v1 VirtualMachine.
TEST_F(VmTest, EveryExampleBoots) {
  Push("guest.qcow2", "vmdisks/fedora25:latest");
  Push("guest.raw", "vmdisks/data:v1");
  int booted = 0;
  for (const auto& e : fs::directory_iterator(REGDISK_SOURCE_DIR "/examples")) {
    std::string spec = Spec(e.path().filename().string(), "vmdisks/fedora25:latest", e.path().string());
    RunResult r = Run(spec);
    ASSERT_EQ(r.exit_code, 0) << e.path() << ": " << r.err;
    EXPECT_THAT(r.out, HasSubstr("sector1: PRISTINE-SECTOR-CONTENT")) << e.path();
    EXPECT_THAT(r.out, HasSubstr("REGDISK-GUEST-POWEROFF")) << e.path();
    ExpectNothingLeft();
    ++booted;
  }
  EXPECT_GE(booted, 3);
}

// emptyDisk validates but does not run yet: run says so in one line, and
// starts nothing.
TEST_F(VmTest, VolumesThatDoNotRunYetAreRefusedByName) {
  for (const std::string source : {"emptyDisk: {capacity: 1Gi}"}) {
    std::string text = "apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstance\nmetadata: {name: ci}\n"
                       "spec:\n  domain:\n    memory: {guest: 64Mi}\n    devices: {}\n"
                       "  volumes:\n  - name: extra\n    " + source + "\n";
    ASSERT_OK(WriteFileAtomic(P("ci.yaml"), text));
    RunResult v = RunRegdisk({"validate", "-f", P("ci.yaml")});
    EXPECT_EQ(v.exit_code, 0) << v.err;
    RunResult r = Run(P("ci.yaml"));
    EXPECT_NE(r.exit_code, 0);
    std::string name = source.substr(0, source.find(':'));
    EXPECT_THAT(r.err, HasSubstr("disk extra uses volume extra (" + name + "), which regdisk validates but cannot run yet"));
    EXPECT_EQ(Count(r.err, "\n"), 1) << r.err;
    ExpectNothingLeft();
  }
}

TEST_F(VmTest, DomainXmlValidatesForEveryExample) {
  Push("guest.qcow2", "vmdisks/fedora25:latest");
  Push("guest.raw", "vmdisks/data:v1");
  for (const auto& e : fs::directory_iterator(REGDISK_SOURCE_DIR "/examples")) {
    std::string spec = Spec(e.path().filename().string(), "vmdisks/fedora25:latest", e.path().string());
    RunResult r = RunRegdisk({"--root", root_, "domxml", "-f", spec});
    ASSERT_EQ(r.exit_code, 0) << e.path() << ": " << r.err;
    ASSERT_OK(WriteFileAtomic(P("domain.xml"), r.out));
    RunResult v = RunProgram({"virt-xml-validate", P("domain.xml"), "domain"});
    EXPECT_EQ(v.exit_code, 0) << e.path() << ":\n" << r.out << v.out << v.err;
    EXPECT_THAT(r.out, HasSubstr("<acpi/>"));
    // Every VM has KubeVirt's default pod interface unless it says otherwise.
    EXPECT_THAT(r.out, HasSubstr("<interface type=\"user\">"));
    EXPECT_THAT(r.out, HasSubstr("<model type=\"virtio\"/>"));
    if (e.path().filename() == "vm-web.yaml") {
      // The cloud-init seed is a raw disk of its own, not a transient one.
      EXPECT_THAT(r.out, ::testing::ContainsRegex("<driver name=\"qemu\" type=\"raw\"/>\\s*<source file=\"[^\"]*/cloudinitdisk\\.cidata\\.iso\"/>"));
      // domxml wrote it there, so virsh can start the domain as it is.
      EXPECT_THAT(r.err, HasSubstr("its cloud-init seed (ISO 9660, label cidata, holding the user-data) is " + root_ +
                                   "/seeds/default_web/cloudinitdisk.cidata.iso, mode 0600"));
    }
    if (e.path().filename() == "vm-two-disks.yaml") {
      // The read-only SATA device is a cdrom, as KubeVirt attaches one.
      EXPECT_THAT(r.out, HasSubstr("<disk type=\"file\" device=\"cdrom\">"));
      EXPECT_THAT(r.out, HasSubstr("<readonly/>"));
    }
  }
}

TEST_F(VmTest, HostileDiskNamesAndRootPathsAreDataNotSyntax) {
  // A disk whose name in the image is QEMU option syntax, XML and a second
  // line; a node store whose path has a comma, quotes and a space.
  const std::string name = "d.qcow2,locking=off,file.filename=/etc/passwd 'x\" <y> & z\nnext=1";
  auto img = MakeImageFromLayers(
      tmp() / "layout", "evil",
      {{LayerMediaType("gzip"), MakeTar({{"disk", TarEntry::Type::kDir, "", "", 107, 107, 0555},
                                         {"disk/" + name, TarEntry::Type::kFile, ReadFileCapped(P("guest.qcow2"), 1 << 22).value(),
                                          "", 107, 107, 0444}},
                                        "gzip")}});
  ASSERT_OK(img);
  const std::string ref = "docker://" + reg_->host() + "/vmdisks/fedora25:latest";
  ASSERT_EQ(RunRegdisk({"copy", "oci:" + P("layout") + ":evil", ref}).exit_code, 0);
  root_ = (tmp() / "node, \"store\" 'a=b'").string();

  const std::string spec = Spec("vm.yaml");
  RunResult r = Run(spec);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Count(r.out, "sector1: PRISTINE-SECTOR-CONTENT"), 1) << r.out;
  RunResult images = RunRegdisk({"--root", root_, "images", "-o", "json"});
  ASSERT_EQ(images.exit_code, 0) << images.err;
  const auto disk = nlohmann::json::parse(images.out)[0]["disk"];
  EXPECT_EQ(disk["path"], "/disk/" + name);  // kept as data
  EXPECT_EQ(fs::path(disk["file"].get<std::string>()).filename(), "disk.qcow2");  // not a name from the image

  RunResult x = RunRegdisk({"--root", root_, "domxml", "-f", spec});
  ASSERT_EQ(x.exit_code, 0) << x.err;
  ASSERT_OK(WriteFileAtomic(P("domain.xml"), x.out));
  RunResult v = RunProgram({"virt-xml-validate", P("domain.xml"), "domain"});
  EXPECT_EQ(v.exit_code, 0) << x.out << v.out << v.err;
  EXPECT_THAT(x.out, HasSubstr("node, &quot;store&quot; 'a=b'/by-name/"));
  ExpectNothingLeft();
}

// Ctrl-C during run: the first SIGINT says on stderr that the VM is being
// shut down, with the grace time; the guest (which ignores ACPI) is killed
// after --grace; exit 130. With a long grace, a second SIGINT stops it at
// once. Waits for lines in files, never for time.
TEST_F(VmTest, CtrlCShutsTheVmDownAndASecondOneStopsItAtOnce) {
  Push("halt.qcow2", "vmdisks/fedora25:latest");
  const std::string spec = Spec("vm.yaml");
  for (bool twice : {false, true}) {
    const std::string out = P(twice ? "twice.out" : "once.out");
    Process::Options opt;
    opt.stdout_mode = Process::Stdio::kFile;
    opt.stdout_file = out;
    opt.stderr_mode = Process::Stdio::kFile;
    opt.stderr_file = out + ".err";
    // -q: no informational lines (such as the TCG notice), but the stop notice stays.
    auto p = Process::Spawn({REGDISK_BIN, "-q", "--root", root_, "run", "-f", spec, "--grace", twice ? "1h" : "1s"}, opt);
    ASSERT_OK(p);
    ASSERT_TRUE(WaitFor(out, "REGDISK-GUEST-DONE", 60s)) << ReadFileCapped(out + ".err", 1 << 20).value_or("");
    ::kill(p->pid(), SIGINT);
    ASSERT_TRUE(WaitFor(out + ".err", "press Ctrl-C again", 30s)) << ReadFileCapped(out + ".err", 1 << 20).value_or("");
    if (twice) ::kill(p->pid(), SIGINT);
    auto code = p->Wait(60s);  // with --grace 1h, only the second Ctrl-C ends it in time
    ASSERT_TRUE(code.has_value()) << "regdisk did not stop after Ctrl-C";
    EXPECT_EQ(*code, 130);
    const std::string err = ReadFileCapped(out + ".err", 1 << 20).value_or("");
    EXPECT_THAT(err, HasSubstr(std::string("regdisk: interrupted: shutting the VM down: ACPI powerdown, then killed if it "
                                           "is still running after ") + (twice ? "1h" : "1s") + " (--grace)"));
    EXPECT_EQ(err.find("error"), std::string::npos) << err;
    EXPECT_EQ(err.find("notice"), std::string::npos) << err;
    if (twice) {
      EXPECT_THAT(err, HasSubstr("regdisk: interrupted again: stopping at once"));
    }
    bool qemu_gone = false;
    for (int i = 0; i < 200 && !qemu_gone; ++i, std::this_thread::sleep_for(50ms)) {
      qemu_gone = RunProgram({"pgrep", "-f", root_ + "/run"}).exit_code != 0;
    }
    EXPECT_TRUE(qemu_gone) << "QEMU outlived regdisk";
    if (!twice) ExpectNothingLeft();
  }
}

}  // namespace
}  // namespace regdisk::testing
