// VMs people can use, end to end: the Linux test guest (guest/linux) pushed
// to a real registry as a registry disk and run by `regdisk run` under TCG,
// with cloud-init NoCloud seeds, published ports (curl from the host), and
// a console driven through a pseudo-terminal. The deadlines are hang
// guards only, never timing assertions.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <chrono>
#include <regex>
#include <thread>

#include "harness/harness.h"

namespace regdisk::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr auto kBootLimit = 240s;  // a hang guard for two TCG guests on a loaded machine

// A v1 VMI of the Linux guest: port 80 declared, cloud-init on a virtio disk
// (the guest's cloud kernel has no AHCI driver).
std::string VmiSpec(const std::string& name, const std::string& image, const std::string& cloud_init) {
  return "apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstance\nmetadata:\n  name: " + name +
         "\nspec:\n"
         "  domain:\n"
         "    memory: {guest: 256Mi}\n"
         "    devices:\n"
         "      disks:\n"
         "      - {name: containerdisk, disk: {bus: virtio}}\n"
         "      - {name: cloudinitdisk, disk: {bus: virtio}}\n"
         "      interfaces:\n"
         "      - name: default\n"
         "        masquerade: {}\n"
         "        ports: [{name: http, port: 80}]\n"
         "  networks:\n"
         "  - {name: default, pod: {}}\n"
         "  volumes:\n"
         "  - {name: containerdisk, containerDisk: {image: \"" + image + "\"}}\n"
         "  - name: cloudinitdisk\n"
         "    cloudInitNoCloud:\n" + cloud_init;
}

class VmNetworkTest : public StoreAndRegistryTest {
 protected:
  void SetUp() override {
    StoreAndRegistryTest::SetUp();
    if (HasFatalFailure()) return;
    image_ = reg_->host() + "/vmdisks/linux:v1";
    RunResult b = RunRegdisk({"build", REGDISK_LINUX_GUEST_IMAGE, "-t", "docker://" + image_});
    ASSERT_EQ(b.exit_code, 0) << b.err;
  }

  // `regdisk run` in the background, its stdout and stderr in files.
  struct Running {
    Process process;
    fs::path out, err;
  };
  Running Start(const std::string& spec_file, std::vector<std::string> extra = {}) {
    Process::Options opt;
    fs::path out = tmp() / (fs::path(spec_file).stem().string() + ".out");
    fs::path err = tmp() / (fs::path(spec_file).stem().string() + ".err");
    opt.stdout_mode = Process::Stdio::kFile;
    opt.stdout_file = out;
    opt.stderr_mode = Process::Stdio::kFile;
    opt.stderr_file = err;
    std::vector<std::string> argv = {REGDISK_BIN, "--root", root_, "run", "-f", spec_file, "--grace", "5"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    auto p = Process::Spawn(argv, opt);
    EXPECT_TRUE(p.ok()) << StatusText(p);
    return Running{std::move(*p), out, err};
  }

  // Waits until `file` holds `marker` (or the process ended, or the hang
  // guard ran out); returns the file's text.
  static std::string WaitFor(Running& r, const fs::path& file, const std::string& marker) {
    const auto deadline = Clock::now() + kBootLimit;
    std::string text;
    while (Clock::now() < deadline) {
      text = ReadFileCapped(file, 16 << 20).value_or("");
      if (text.find(marker) != std::string::npos || r.process.Poll()) break;
      std::this_thread::sleep_for(200ms);
    }
    return text;
  }

  // SIGTERM, as a service manager stops it: ACPI powerdown, exit 0.
  static RunResult Stop(Running& r) {
    ::kill(r.process.pid(), SIGTERM);
    RunResult res;
    res.exit_code = r.process.Wait(120s).value_or(-1);
    res.out = ReadFileCapped(r.out, 16 << 20).value_or("");
    res.err = ReadFileCapped(r.err, 1 << 20).value_or("");
    return res;
  }

  // "80/tcp -> 127.0.0.1:PORT" from regdisk port.
  int PublishedPort(const std::string& vm) {
    RunResult p = RunRegdisk({"--root", root_, "port", vm});
    EXPECT_EQ(p.exit_code, 0) << p.err;
    std::smatch m;
    if (!std::regex_search(p.out, m, std::regex("80/tcp -> 127\\.0\\.0\\.1:([0-9]+)"))) {
      ADD_FAILURE() << "no published port 80 for " << vm << " in: " << p.out;
      return 0;
    }
    return std::stoi(m[1]);
  }

  static std::string Curl(int port, const std::string& path) {
    RunResult r = RunProgram({"curl", "-sS", "--max-time", "60", "http://127.0.0.1:" + std::to_string(port) + path});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.out;
  }

  // No run directory, seed, overlay or socket is left under the root.
  void ExpectNothingLeft() {
    std::error_code ec;
    if (fs::exists(fs::path(root_) / "run", ec)) {
      EXPECT_TRUE(fs::is_empty(fs::path(root_) / "run")) << "a run directory was left behind";
    }
    for (const auto& e : fs::recursive_directory_iterator(root_, ec)) {
      std::string n = e.path().filename().string();
      EXPECT_FALSE(n.ends_with(".iso") || n.ends_with(".sock")) << e.path();
    }
  }

  std::string image_;
};

// Two replicas of one registry disk, each with its own user-data: each
// prints its own, serves it on its own published port, and neither sees
// the other's. One port is chosen by regdisk, the other by --publish.
TEST_F(VmNetworkTest, TwoReplicasWithTheirOwnUserDataAndPorts) {
  ASSERT_OK(WriteFileAtomic(tmp() / "a.yaml", VmiSpec("web-a", image_, "      userData: \"replica-A-7d1e\\n\"\n")));
  ASSERT_OK(WriteFileAtomic(tmp() / "b.yaml", VmiSpec("web-b", image_, "      userData: \"replica-B-93fc\\n\"\n")));
  const int fixed = FreePort();
  Running a = Start(P("a.yaml"));
  Running b = Start(P("b.yaml"), {"--publish", "127.0.0.1:" + std::to_string(fixed) + ":80"});
  std::string out_a = WaitFor(a, a.out, "REGDISK-GUEST: http ready");
  std::string out_b = WaitFor(b, b.out, "REGDISK-GUEST: http ready");
  ASSERT_THAT(out_a, HasSubstr("REGDISK-GUEST: http ready")) << out_a << ReadFileCapped(a.err, 1 << 20).value_or("");
  ASSERT_THAT(out_b, HasSubstr("REGDISK-GUEST: http ready")) << out_b << ReadFileCapped(b.err, 1 << 20).value_or("");
  // Each console shows its own user-data, hostname and KubeVirt's
  // masquerade address.
  EXPECT_THAT(out_a, HasSubstr("REGDISK-GUEST: user-data begin\r\nreplica-A-7d1e\r\nREGDISK-GUEST: user-data end"));
  EXPECT_THAT(out_a, HasSubstr("REGDISK-GUEST: hostname=web-a"));
  EXPECT_THAT(out_a, HasSubstr("REGDISK-GUEST: ip=10.0.2.2/24 gw=10.0.2.1"));
  EXPECT_THAT(out_a, Not(HasSubstr("replica-B")));
  EXPECT_THAT(out_b, HasSubstr("replica-B-93fc"));
  EXPECT_THAT(out_b, Not(HasSubstr("replica-A")));

  // run said where the ports went; regdisk port says the same.
  const int port_a = PublishedPort("web-a");
  EXPECT_EQ(PublishedPort("web-b"), fixed);
  EXPECT_THAT(ReadFileCapped(a.err, 1 << 20).value_or(""),
              HasSubstr("regdisk: VM web-a: 80/tcp -> 127.0.0.1:" + std::to_string(port_a) + " (http)"));
  std::string page_a = Curl(port_a, "/user-data");
  std::string page_b = Curl(fixed, "/user-data");
  EXPECT_EQ(page_a, "replica-A-7d1e\n");
  EXPECT_EQ(page_b, "replica-B-93fc\n");
  EXPECT_EQ(Curl(port_a, "/hostname"), "web-a\n");

  // The seeds are the VMs' own: 0600, in their run directories.
  int seeds = 0;
  for (const auto& e : fs::recursive_directory_iterator(fs::path(root_) / "run")) {
    if (e.path().extension() != ".iso") continue;
    ++seeds;
    struct stat st {};
    ASSERT_EQ(::stat(e.path().c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u) << e.path();
  }
  EXPECT_EQ(seeds, 2);
  // A second run of a running VM's name is refused, and leaves the first alone.
  RunResult again = RunRegdisk({"--root", root_, "run", "-f", P("a.yaml"), "--timeout", "5s"});
  EXPECT_EQ(again.exit_code, 1);
  EXPECT_THAT(again.err, HasSubstr("VM default/web-a is already running on this node"));
  EXPECT_EQ(Curl(port_a, "/hostname"), "web-a\n");

  RunResult sa = Stop(a), sb = Stop(b);
  EXPECT_EQ(sa.exit_code, 0) << sa.err;
  EXPECT_EQ(sb.exit_code, 0) << sb.err;
  EXPECT_THAT(sa.out, HasSubstr("REGDISK-GUEST: power button"));
  ExpectNothingLeft();
  // The console stays in the VM's log.
  EXPECT_THAT(ReadFileCapped(fs::path(root_) / "logs/default_web-a.log", 16 << 20).value_or(""),
              HasSubstr("replica-A-7d1e"));
  RunResult gone = RunRegdisk({"--root", root_, "port", "web-a"});
  EXPECT_EQ(gone.exit_code, 1);
  EXPECT_THAT(gone.err, HasSubstr("VM default/web-a is not running on this node"));
}

// Data from a Secret reaches the guest's seed and nothing else: no argv,
// no log, no other file under the root.
TEST_F(VmNetworkTest, SecretDataOnlyInTheVmsOwnSeed) {
  const std::string secret = "network-secret-5b8a0e";
  std::string spec = VmiSpec("secretive", image_,
                             "      userData: \"plain-user-data\\n\"\n      networkDataSecretRef: {name: netcfg}\n") +
                     "---\napiVersion: v1\nkind: Secret\nmetadata: {name: netcfg}\ntype: Opaque\nstringData:\n"
                     "  networkdata: \"" + secret + "\"\n";
  ASSERT_OK(WriteFileAtomic(tmp() / "s.yaml", spec));
  Running r = Start(P("s.yaml"), {"--log-level", "debug"});
  std::string out = WaitFor(r, r.out, "REGDISK-GUEST: http ready");
  ASSERT_THAT(out, HasSubstr("REGDISK-GUEST: http ready")) << out << ReadFileCapped(r.err, 1 << 20).value_or("");
  // Every process's argv.
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc", ec)) {
    auto cmdline = ReadFileCapped(e.path() / "cmdline", 1 << 20);
    if (cmdline.ok()) {
      EXPECT_THAT(*cmdline, Not(HasSubstr(secret))) << e.path();
    }
  }
  // Every file under the root but the seed, which holds it, 0600.
  int seeds = 0;
  for (const auto& e : fs::recursive_directory_iterator(root_, ec)) {
    if (!e.is_regular_file()) continue;
    std::string text = ReadFileCapped(e.path(), 64 << 20).value_or("");
    if (e.path().extension() == ".iso") {
      ++seeds;
      EXPECT_THAT(text, HasSubstr(secret));
      continue;
    }
    EXPECT_THAT(text, Not(HasSubstr(secret))) << e.path();
  }
  EXPECT_EQ(seeds, 1);
  // The console log is the owner's alone, as the seed is.
  struct stat st{};
  ASSERT_EQ(::stat((fs::path(root_) / "logs/default_secretive.log").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  RunResult stopped = Stop(r);
  EXPECT_EQ(stopped.exit_code, 0);
  EXPECT_THAT(stopped.out + stopped.err, Not(HasSubstr(secret)));
  ExpectNothingLeft();
}

// The console through a pseudo-terminal: the user types into the guest's
// shell and reads the answer; Ctrl-] stops the VM.
TEST_F(VmNetworkTest, ConsoleInputThroughATerminal) {
  ASSERT_OK(WriteFileAtomic(tmp() / "c.yaml", VmiSpec("console", image_, "      userData: \"hello\\n\"\n")));
  auto s = PtySession::Spawn({REGDISK_BIN, "--root", root_, "run", "-f", P("c.yaml"), "--grace", "5"});
  ASSERT_OK(s);
  PtySession& term = **s;
  ASSERT_TRUE(term.ReadUntil("console of VM console attached; Ctrl-] stops the VM", 0, kBootLimit)) << term.seen();
  ASSERT_TRUE(term.ReadUntil("guest# ", 0, kBootLimit)) << term.seen();
  size_t mark = term.seen().size();
  ASSERT_OK(term.Write("echo $((6*7))\r"));
  EXPECT_TRUE(term.ReadUntil("42", mark, kBootLimit)) << term.seen().substr(mark);
  mark = term.seen().size();
  ASSERT_OK(term.Write("\x1d"));
  EXPECT_TRUE(term.ReadUntil("detached from the console (Ctrl-]); stopping VM console", mark, kBootLimit))
      << term.seen().substr(mark);
  term.ReadToEnd(kBootLimit);  // until regdisk closes the terminal
  int status = term.Wait();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status << "\n" << term.seen();
  ExpectNothingLeft();
}

// `regdisk run ... &` from an interactive shell: stdin is the terminal, but
// regdisk is a background job. It must leave the terminal alone (raw mode
// from the background stops it with SIGTTOU) and run with the console on
// stdout only.
TEST_F(VmNetworkTest, BackgroundRunLeavesTheTerminalAlone) {
  ASSERT_OK(WriteFileAtomic(tmp() / "b.yaml", VmiSpec("bg", image_, "      userData: \"hello\\n\"\n")));
  const std::string spec = P("b.yaml");
  // The session's leader plays the shell: the job gets its own process
  // group, not the terminal's foreground one.
  auto s = PtySession::SpawnWith([&] {
    pid_t job = ::fork();
    if (job == 0) {
      ::setpgid(0, 0);
      ::execl(REGDISK_BIN, REGDISK_BIN, "--root", root_.c_str(), "run", "-f", spec.c_str(), "--timeout", "3s",
              "--grace", "1", static_cast<char*>(nullptr));
      ::_exit(127);
    }
    ::setpgid(job, job);
    int st = 0;
    if (::waitpid(job, &st, WUNTRACED) != job) return 125;
    if (WIFSTOPPED(st)) {  // stopped by the terminal
      ::kill(job, SIGKILL);
      ::waitpid(job, &st, 0);
      return 100;
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : 126;
  });
  ASSERT_OK(s);
  PtySession& term = **s;
  term.ReadToEnd(kBootLimit);
  int status = term.Wait();
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_NE(WEXITSTATUS(status), 100) << "regdisk was stopped by the terminal\n" << term.seen();
  EXPECT_EQ(WEXITSTATUS(status), 0) << term.seen();
  EXPECT_THAT(term.seen(), Not(HasSubstr("console of VM bg attached")));
  ExpectNothingLeft();
}

// A second SIGTERM ends regdisk at once, skipping the console's own
// cleanup; the terminal still leaves raw mode.
TEST_F(VmNetworkTest, SecondSignalRestoresTheTerminal) {
  ASSERT_OK(WriteFileAtomic(tmp() / "t.yaml", VmiSpec("twice", image_, "      userData: \"hello\\n\"\n")));
  auto s = PtySession::Spawn({REGDISK_BIN, "--root", root_, "run", "-f", P("t.yaml"), "--grace", "60"});
  ASSERT_OK(s);
  PtySession& term = **s;
  ASSERT_TRUE(term.ReadUntil("attached; Ctrl-]", 0, kBootLimit)) << term.seen();
  termios t{};
  ASSERT_EQ(::tcgetattr(term.master(), &t), 0);
  EXPECT_FALSE(t.c_lflag & ICANON) << "the console is not in raw mode";
  ::kill(term.pid(), SIGTERM);
  term.ReadUntil("terminated:", 0, kBootLimit);
  ::kill(term.pid(), SIGTERM);
  term.ReadToEnd(kBootLimit);
  int status = term.Wait();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 128 + SIGTERM) << status << "\n" << term.seen();
  ASSERT_EQ(::tcgetattr(term.master(), &t), 0);
  EXPECT_TRUE(t.c_lflag & ICANON) << "the terminal was left in raw mode";
  EXPECT_TRUE(t.c_lflag & ECHO) << "the terminal was left without echo";
}

// --network bridge=NAME: the VM's NIC is a tap on a host bridge, here in a
// network namespace the test makes; the guest's DHCP requests reach the
// bridge, and the tap goes with the VM.
TEST_F(VmNetworkTest, BridgeInANetworkNamespace) {
  if (::geteuid() != 0 || ::access("/dev/net/tun", R_OK | W_OK) != 0) {
    GTEST_SKIP() << "needs root and /dev/net/tun to make a network namespace and a tap";
  }
  const std::string ns = "regdisk-test-" + std::to_string(::getpid());
  ASSERT_EQ(RunProgram({"ip", "netns", "add", ns}).exit_code, 0);
  struct Cleanup {
    std::string ns;
    ~Cleanup() { RunProgram({"ip", "netns", "del", ns}); }
  } cleanup{ns};
  for (std::vector<std::string> cmd : {std::vector<std::string>{"link", "add", "br0", "type", "bridge"},
                                       std::vector<std::string>{"link", "set", "br0", "up"}}) {
    cmd.insert(cmd.begin(), {"ip", "-n", ns});
    RunResult r = RunProgram(cmd);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  // Outside the namespace there is no such bridge: a clear refusal.
  ASSERT_OK(WriteFileAtomic(tmp() / "br.yaml", VmiSpec("bridged", image_, "      userData: \"bridged\\n\"\n")));
  RunResult missing = RunRegdisk({"--root", root_, "run", "-f", P("br.yaml"), "--network", "bridge=regdisk-nobr0"});
  EXPECT_EQ(missing.exit_code, 1);
  EXPECT_THAT(missing.err, HasSubstr("there is no bridge \"regdisk-nobr0\" on this host"));
  // The registry is on the host's loopback, which the namespace does not
  // share: the disk is pulled first.
  RunResult pulled = RunRegdisk({"--root", root_, "pull", "docker://" + image_});
  ASSERT_EQ(pulled.exit_code, 0) << pulled.err;

  Process::Options opt;
  opt.stdout_mode = Process::Stdio::kFile;
  opt.stdout_file = tmp() / "br.out";
  opt.stderr_mode = Process::Stdio::kFile;
  opt.stderr_file = tmp() / "br.err";
  auto p = Process::Spawn({"ip", "netns", "exec", ns, REGDISK_BIN, "--root", root_, "run", "-f", P("br.yaml"),
                           "--grace", "5", "--network", "bridge=br0"},
                          opt);
  ASSERT_OK(p);
  Running r{std::move(*p), tmp() / "br.out", tmp() / "br.err"};
  std::string out = WaitFor(r, r.out, "udhcpc: broadcasting discover");
  ASSERT_THAT(out, HasSubstr("udhcpc: broadcasting discover")) << out << ReadFileCapped(r.err, 1 << 20).value_or("");
  RunResult ports = RunProgram({"ip", "-n", ns, "-o", "link", "show", "master", "br0"});
  EXPECT_THAT(ports.out, ::testing::ContainsRegex("rd[0-9a-f]{10}"));
  // The guest's broadcasts arrived on the bridge.
  RunResult rx = RunProgram({"ip", "netns", "exec", ns, "cat", "/sys/class/net/br0/statistics/rx_packets"});
  EXPECT_GT(std::atoi(rx.out.c_str()), 0) << rx.out << rx.err;
  RunResult stopped = Stop(r);
  EXPECT_EQ(stopped.exit_code, 0) << stopped.err;
  EXPECT_THAT(RunProgram({"ip", "-n", ns, "-o", "link", "show", "master", "br0"}).out, Not(HasSubstr("rd")));
  ExpectNothingLeft();
}

}  // namespace
}  // namespace regdisk::testing
