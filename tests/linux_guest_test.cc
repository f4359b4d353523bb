// The Linux test guest (guest/linux) booted directly with QEMU under TCG:
// its markers on the serial console, the cloud-init seed's user-data, DHCP
// and HTTP through a user-mode network port forward, typed console input,
// and power-off both by ACPI (QMP system_powerdown) and from its shell.
// The deadlines are hang guards only.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <iostream>
#include <thread>

#include "harness/harness.h"

namespace regdisk::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

const char* kImage = REGDISK_LINUX_GUEST_IMAGE;
constexpr auto kBootLimit = 120s;  // a hang guard, not a timing assertion

// A connected unix stream socket, retried while `alive` holds and until the
// deadline (QEMU creates its sockets a moment after it starts).
Result<UniqueFd> ConnectUnix(const fs::path& path, Clock::time_point deadline, const std::function<bool()>& alive) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (path.native().size() >= sizeof a.sun_path) return InvalidArgument("socket path too long: " + path.string());
  std::strncpy(a.sun_path, path.c_str(), sizeof a.sun_path - 1);
  while (true) {
    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd.valid()) return ErrnoStatus("socket");
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) return fd;
    if (!alive() || Clock::now() > deadline) return Unavailable("cannot connect to " + path.string());
    std::this_thread::sleep_for(50ms);
  }
}

bool WriteString(int fd, std::string_view s) {
  while (!s.empty()) {
    ssize_t n = ::send(fd, s.data(), s.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    s.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

// Reads what is there within `wait` (nothing on timeout); false at EOF or
// on an error.
bool ReadSome(int fd, std::string& into, std::chrono::milliseconds wait) {
  pollfd p{fd, POLLIN, 0};
  int r = ::poll(&p, 1, static_cast<int>(wait.count()));
  if (r <= 0) return r == 0 || errno == EINTR;
  char buf[4096];
  ssize_t n = ::read(fd, buf, sizeof buf);
  if (n <= 0) return n < 0 && errno == EINTR;
  into.append(buf, static_cast<size_t>(n));
  return true;
}

// One QEMU running the guest: console on a socket, QMP on another.
class Guest {
 public:
  // `devices`: the seed's drive and any other arguments; the guest's own
  // disk, network (port 80 forwarded to http_port) and sockets are added.
  static Result<std::unique_ptr<Guest>> Boot(const fs::path& dir, const std::vector<std::string>& devices) {
    auto g = std::unique_ptr<Guest>(new Guest);
    g->dir_ = dir;
    g->http_port_ = FreePort();
    std::vector<std::string> argv = {
        "qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "256",
        "-no-reboot",
        // Read-only: the guest never writes its disk, and tests may share it.
        "-drive", std::string("file=") + kImage + ",format=raw,if=virtio,readonly=on", "-netdev",
        "user,id=n0,hostfwd=tcp:127.0.0.1:" + std::to_string(g->http_port_) + "-:80", "-device",
        "virtio-net-pci,netdev=n0",
        // wait=on: QEMU starts the VM once the test is connected, so the
        // console loses nothing.
        "-chardev", "socket,id=console,path=" + (dir / "console.sock").string() + ",server=on,wait=on", "-serial",
        "chardev:console", "-qmp", "unix:" + (dir / "qmp.sock").string() + ",server=on,wait=off"};
    argv.insert(argv.end(), devices.begin(), devices.end());
    Process::Options opt;
    opt.stderr_mode = Process::Stdio::kFile;
    opt.stderr_file = dir / "qemu.err";
    opt.stdout_mode = Process::Stdio::kFile;
    opt.stdout_file = dir / "qemu.err";
    opt.die_with_parent = true;
    auto p = Process::Spawn(argv, opt);
    if (!p.ok()) return p.status();
    g->qemu_.emplace(std::move(*p));
    g->start_ = Clock::now();
    g->deadline_ = g->start_ + kBootLimit;
    auto fd = ConnectUnix(dir / "console.sock", g->deadline_, [&] { return !g->qemu_->Poll().has_value(); });
    if (!fd.ok()) return Unavailable(fd.status().message() + "; QEMU said: " + g->QemuErr());
    g->console_fd_ = std::move(*fd);
    return g;
  }

  ~Guest() {
    if (qemu_) qemu_->Terminate(2s);
  }

  int http_port() const { return http_port_; }
  // The console so far, carriage returns removed.
  const std::string& console() const { return console_; }
  std::string QemuErr() const { return ReadFileCapped(dir_ / "qemu.err", 1 << 16).value_or(""); }

  // Waits for `text` on the console after the previous match; the position
  // then moves past it. False at the hang guard or when QEMU is gone.
  bool WaitFor(std::string_view text) {
    while (true) {
      size_t at = console_.find(text, cursor_);
      if (at != std::string::npos) {
        cursor_ = at + text.size();
        return true;
      }
      if (Clock::now() > deadline_) return false;
      std::string chunk;
      if (!ReadSome(console_fd_.get(), chunk, 200ms)) return false;
      for (char c : chunk) {
        if (c != '\r') console_ += c;
      }
    }
  }
  // Seconds from QEMU's start to now.
  double Elapsed() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }
  size_t cursor() const { return cursor_; }

  bool Type(std::string_view keys) { return WriteString(console_fd_.get(), keys); }

  // QMP: capabilities, then system_powerdown (the ACPI power button).
  Status Powerdown() {
    auto fd = ConnectUnix(dir_ / "qmp.sock", Clock::now() + 30s, [] { return true; });
    if (!fd.ok()) return fd.status();
    std::string in;
    auto until = [&](std::string_view what) {
      auto deadline = Clock::now() + 30s;
      while (in.find(what) == std::string::npos) {
        if (Clock::now() > deadline || !ReadSome(fd->get(), in, 200ms)) return false;
      }
      in.erase(0, in.find(what) + what.size());
      return true;
    };
    if (!until("\"QMP\"")) return Unavailable("no QMP greeting: " + in);
    if (!WriteString(fd->get(), "{\"execute\":\"qmp_capabilities\"}\n") || !until("\"return\"")) {
      return Unavailable("qmp_capabilities failed: " + in);
    }
    if (!WriteString(fd->get(), "{\"execute\":\"system_powerdown\"}\n") || !until("\"return\"")) {
      return Unavailable("system_powerdown failed: " + in);
    }
    return OkStatus();
  }

  // QEMU's exit code once it has exited within the hang guard.
  std::optional<int> WaitExit() { return qemu_->Wait(60s); }

 private:
  Guest() = default;
  fs::path dir_;
  int http_port_ = 0;
  std::optional<Process> qemu_;
  UniqueFd console_fd_;
  std::string console_;
  size_t cursor_ = 0;
  Clock::time_point start_, deadline_;
};

class LinuxGuestTest : public TempDirTest {
 protected:
  // A NoCloud seed (ISO 9660, label cidata) as genisoimage makes it.
  std::string MakeSeed(const std::string& name, const std::string& user_data, const std::string& meta_data) {
    fs::path d = tmp() / (name + "-files");
    fs::create_directories(d);
    EXPECT_TRUE(WriteFileAtomic(d / "user-data", user_data).ok());
    EXPECT_TRUE(WriteFileAtomic(d / "meta-data", meta_data).ok());
    std::string iso = P(name + ".iso");
    RunResult r = RunProgram({"genisoimage", "-quiet", "-o", iso, "-V", "cidata", "-J", "-r",
                              (d / "user-data").string(), (d / "meta-data").string()});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return iso;
  }
  // The text between the user-data markers.
  static std::string PrintedUserData(const std::string& console) {
    const std::string begin = "REGDISK-GUEST: user-data begin\n", end = "REGDISK-GUEST: user-data end\n";
    size_t b = console.find(begin);
    if (b == std::string::npos) return "<no begin marker>";
    b += begin.size();
    size_t e = console.find(end, b);
    if (e == std::string::npos) return "<no end marker>";
    return console.substr(b, e - b);
  }
  static RunResult Curl(int port, const std::string& path) {
    return RunProgram({"curl", "-sS", "--max-time", "60", "http://127.0.0.1:" + std::to_string(port) + path});
  }
};

TEST_F(LinuxGuestTest, SeedOnVirtioDiskHttpConsoleAndAcpiPowerdown) {
  ASSERT_TRUE(fs::exists(kImage)) << kImage << " is missing: build the linux_guest target";
  const std::string user_data =
      "#cloud-config\n"
      "# replica-a's own data <&> \"quoted\"\n"
      "write_files:\n"
      "  - path: /etc/motd\n"
      "    content: USERDATA-MARKER-replica-a\n";
  std::string seed = MakeSeed("seed", user_data, "instance-id: 0b7c-replica-a\nlocal-hostname: replica-a\n");
  fs::create_directories(tmp() / "vm");
  auto guest = Guest::Boot(tmp() / "vm", {"-drive", "file=" + seed + ",format=raw,if=virtio,readonly=on"});
  ASSERT_OK(guest);
  Guest& g = **guest;

  ASSERT_TRUE(g.WaitFor("REGDISK-GUEST: booted\n")) << g.console() << g.QemuErr();
  const double booted = g.Elapsed();
  ASSERT_TRUE(g.WaitFor("REGDISK-GUEST: user-data end\n")) << g.console();
  EXPECT_EQ(PrintedUserData(g.console()), user_data);
  ASSERT_TRUE(g.WaitFor("REGDISK-GUEST: instance-id=0b7c-replica-a\n")) << g.console();
  ASSERT_TRUE(g.WaitFor("REGDISK-GUEST: hostname=replica-a\n")) << g.console();
  // QEMU's user network: the guest is 10.0.2.15/24 behind 10.0.2.2.
  ASSERT_TRUE(g.WaitFor("REGDISK-GUEST: ip=10.0.2.15/24 gw=10.0.2.2\n")) << g.console();
  ASSERT_TRUE(g.WaitFor("REGDISK-GUEST: http ready\n")) << g.console();
  const double http_ready = g.Elapsed();
  std::cout << "linux guest under TCG: booted after " << booted << " s, http ready after " << http_ready << " s\n";
  RecordProperty("boot_seconds", std::to_string(booted));

  RunResult page = Curl(g.http_port(), "/");
  ASSERT_EQ(page.exit_code, 0) << page.err;
  EXPECT_THAT(page.out, HasSubstr("USERDATA-MARKER-replica-a"));
  EXPECT_THAT(page.out, HasSubstr("hostname: replica-a"));
  EXPECT_THAT(page.out, HasSubstr("&lt;&amp;&gt;"));  // escaped in HTML
  RunResult raw = Curl(g.http_port(), "/user-data");
  ASSERT_EQ(raw.exit_code, 0) << raw.err;
  EXPECT_EQ(raw.out, user_data);

  // The console takes input: a shell answers.
  ASSERT_TRUE(g.WaitFor("guest# ")) << g.console();
  ASSERT_TRUE(g.Type("echo $((6*7))\n"));
  ASSERT_TRUE(g.WaitFor("\n42\n")) << g.console();

  // The ACPI power button ends the VM (QEMU exits on the guest's power-off).
  ASSERT_OK(g.Powerdown());
  EXPECT_TRUE(g.WaitFor("REGDISK-GUEST: power button\n")) << g.console();
  std::optional<int> code = g.WaitExit();
  ASSERT_TRUE(code.has_value()) << "QEMU still runs after system_powerdown:\n" << g.console();
  EXPECT_EQ(*code, 0) << g.QemuErr();
}

// The seed on an IDE CD-ROM (the pc machine's own controller): another
// replica's data, and "poweroff -f" typed at the shell ends QEMU.
TEST_F(LinuxGuestTest, SeedOnCdromAndPoweroffFromTheShell) {
  ASSERT_TRUE(fs::exists(kImage)) << kImage << " is missing: build the linux_guest target";
  const std::string user_data = "#cloud-config\nhostname: ignored-by-the-test-guest\nUSERDATA-MARKER-replica-b";
  std::string seed = MakeSeed("seed", user_data, "instance-id: 51d2-replica-b\nlocal-hostname: replica-b\n");
  fs::create_directories(tmp() / "vm");
  auto guest = Guest::Boot(tmp() / "vm", {"-drive", "file=" + seed + ",format=raw,if=ide,media=cdrom"});
  ASSERT_OK(guest);
  Guest& g = **guest;

  ASSERT_TRUE(g.WaitFor("REGDISK-GUEST: user-data end\n")) << g.console() << g.QemuErr();
  // No final newline in the file: the guest adds one before the end marker.
  EXPECT_EQ(PrintedUserData(g.console()), user_data + "\n");
  ASSERT_TRUE(g.WaitFor("REGDISK-GUEST: hostname=replica-b\n")) << g.console();
  ASSERT_TRUE(g.WaitFor("REGDISK-GUEST: http ready\n")) << g.console();
  RunResult page = Curl(g.http_port(), "/");
  ASSERT_EQ(page.exit_code, 0) << page.err;
  EXPECT_THAT(page.out, HasSubstr("USERDATA-MARKER-replica-b"));
  EXPECT_THAT(page.out, Not(HasSubstr("replica-a")));

  ASSERT_TRUE(g.WaitFor("guest# ")) << g.console();
  ASSERT_TRUE(g.Type("hostname\n"));
  ASSERT_TRUE(g.WaitFor("\nreplica-b\n")) << g.console();
  ASSERT_TRUE(g.Type("poweroff -f\n"));
  std::optional<int> code = g.WaitExit();
  ASSERT_TRUE(code.has_value()) << "QEMU still runs after poweroff -f:\n" << g.console();
  EXPECT_EQ(*code, 0) << g.QemuErr();
}

}  // namespace
}  // namespace regdisk::testing
