#include "vm/runner.h"

#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <termios.h>
#include <unistd.h>

#include <cstring>
#include <thread>

#include <linux/sockios.h>
#include <nlohmann/json.hpp>

#include "oci/digest.h"
#include "vm/launch.h"
#include "vm/qmp.h"
#include "util/env.h"
#include "util/fs.h"
#include "util/log.h"
#include "util/process.h"

namespace regdisk::vm {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {

bool Alive(pid_t pid) { return pid > 0 && (::kill(pid, 0) == 0 || errno == EPERM); }

pid_t ReadPid(const fs::path& p) {
  auto t = ReadFileCapped(p, 64);
  return t.ok() ? static_cast<pid_t>(std::atoi(t->c_str())) : 0;
}

// The run directory (removed, with whatever is in it, on every way out),
// locked (flock on the directory itself) for as long as its regdisk, or the
// QEMU that inherits the lock, lives. It is created and locked while
// locks/run is held, so CleanStaleRuns (which holds it too) never sees a
// directory that is not locked yet.
struct RunDir {
  TempDir dir;
  UniqueFd lock;
};

Result<RunDir> CreateRunDir(const fs::path& root, const std::string& name) {
  RETURN_IF_ERROR(MakeDirs(root / "run"));
  RETURN_IF_ERROR(MakeDirs(root / "locks"));
  ASSIGN_OR_RETURN(FileLock creating, FileLock::Acquire(root / "locks" / "run"));
  ASSIGN_OR_RETURN(TempDir d, TempDir::Create(name, root / "run"));
  ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(d.path(), O_RDONLY | O_DIRECTORY));
  if (::flock(fd.get(), LOCK_EX) != 0) return ErrnoStatus("locking " + d.path().string());
  return RunDir{std::move(d), std::move(fd)};
}

// The guest's serial console: the socket QEMU serves, with what arrives
// copied to `out`, and keystrokes from `input` (a terminal in raw mode while
// attached) sent to the guest. Ctrl-] is never sent: it asks to detach.
// Nothing here blocks: QEMU takes input only as fast as the guest reads it,
// so keystrokes wait in a bounded buffer, sent as the socket has room, and
// what does not fit is dropped (input is still read, so Ctrl-] always
// works, even after a paste into a guest that reads nothing).
class Console {
 public:
  static constexpr char kDetach = 0x1d;  // Ctrl-]
  static constexpr size_t kMaxPending = 64 << 10;

  Console(std::FILE* out, int input) : out_(out), input_(input) {}
  ~Console() { RestoreTerminal(); }
  Console(const Console&) = delete;
  Console& operator=(const Console&) = delete;

  // Connects to QEMU's console socket, waiting for QEMU to create it (QEMU
  // waits for this connection before it starts the guest). Gives up when
  // QEMU exits.
  Status Connect(const fs::path& path, Process& qemu) {
    // An invalid fd when QEMU ended before it served the console; the
    // caller reports why.
    ASSIGN_OR_RETURN(sock_, ConnectConsole(path, qemu, std::chrono::milliseconds(0)));
    return OkStatus();
  }

  // Raw mode on the input terminal, until RestoreTerminal or destruction.
  void MakeRaw() {
    if (input_ < 0 || !::isatty(input_) || ::tcgetattr(input_, &saved_) != 0) return;
    termios raw = saved_;
    ::cfmakeraw(&raw);
    if (::tcsetattr(input_, TCSANOW, &raw) == 0) raw_ = true;
  }
  void RestoreTerminal() {
    if (raw_) ::tcsetattr(input_, TCSANOW, &saved_);
    raw_ = false;
  }

  int socket_fd() const { return sock_.get(); }
  // Whether the guest has written anything to its console.
  bool received() const { return received_; }
  int input_fd() const { return input_; }

  // Copies what the guest wrote; false once QEMU closed the console.
  bool Drain() {
    if (!sock_.valid()) return false;
    char buf[65536];
    for (;;) {
      ssize_t n = ::recv(sock_.get(), buf, sizeof buf, MSG_DONTWAIT);
      if (n > 0) {
        std::fwrite(buf, 1, static_cast<size_t>(n), out_);
        received_ = true;
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      std::fflush(out_);
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
      sock_.reset();  // EOF or error: QEMU is going away
      return false;
    }
  }

  // Reads what the user typed and sends what the socket takes now; false
  // when the user typed Ctrl-].
  bool Forward() {
    char buf[4096];
    ssize_t n = ::read(input_, buf, sizeof buf);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return true;
    if (n <= 0) {
      input_ = -1;  // end of input: keep running, stop reading
      return true;
    }
    std::string_view typed(buf, static_cast<size_t>(n));
    size_t detach = typed.find(kDetach);
    std::string_view keys = typed.substr(0, detach);
    size_t room = sock_.valid() ? kMaxPending - pending_.size() : 0;
    pending_.append(keys.substr(0, room));
    dropped_ += keys.size() - std::min(room, keys.size());
    Flush();
    return detach == std::string_view::npos;
  }

  // Sends as much of the waiting input as the socket takes without
  // blocking.
  void Flush() {
    while (!pending_.empty() && sock_.valid()) {
      ssize_t n = ::send(sock_.get(), pending_.data(), pending_.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n > 0) {
        pending_.erase(0, static_cast<size_t>(n));
      } else if (n < 0 && errno == EINTR) {
        continue;
      } else {
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) pending_.clear();  // QEMU is going away
        return;
      }
    }
  }
  // Whether input waits for room in the socket (poll for POLLOUT).
  bool pending() const { return !pending_.empty(); }
  // Bytes of input dropped because the guest was not reading.
  size_t dropped() const { return dropped_; }

 private:
  std::FILE* out_;
  int input_;
  UniqueFd sock_;
  termios saved_{};
  bool raw_ = false;
  bool received_ = false;
  std::string pending_;  // typed, not yet taken by the socket
  size_t dropped_ = 0;
};

// The VM's console log across runs: NAME.log is the newest run's, and the
// three runs before it are NAME.log.1 to .3. A new run's log displaces them
// only once the run has started (the guest wrote to its console, or QEMU ran
// until it ended or was stopped); a start that fails leaves them as they
// were. While a run is starting, the log before it waits as NAME.log.0.
class LogRotation {
 public:
  // Sets the current log aside for the new run, first settling what an
  // interrupted regdisk left (a log with something in it counts as started).
  explicit LogRotation(fs::path log) : log_(std::move(log)), aside_(log_.string() + ".0") {
    std::error_code ec;
    if (fs::exists(aside_, ec)) Settle(fs::file_size(log_, ec) > 0 && !ec);
    if (fs::exists(log_, ec)) fs::rename(log_, aside_, ec);
    pending_ = true;
  }
  ~LogRotation() {
    std::error_code ec;
    if (pending_) Settle(fs::file_size(log_, ec) > 0 && !ec);
  }
  LogRotation(const LogRotation&) = delete;
  LogRotation& operator=(const LogRotation&) = delete;

  // started: the earlier logs move down one (.3 is dropped). Otherwise the
  // new run's log is removed and the one before is the newest again.
  void Settle(bool started) {
    std::error_code ec;
    pending_ = false;
    if (!started) {
      fs::remove(log_, ec);
      if (fs::exists(aside_, ec)) fs::rename(aside_, log_, ec);
      return;
    }
    if (!fs::exists(aside_, ec)) return;
    for (int i = 2; i >= 1; --i) {
      fs::path from = log_.string() + "." + std::to_string(i);
      if (fs::exists(from, ec)) fs::rename(from, log_.string() + "." + std::to_string(i + 1), ec);
    }
    fs::rename(aside_, log_.string() + ".1", ec);
  }
  bool pending() const { return pending_; }

 private:
  fs::path log_, aside_;
  bool pending_ = false;
};

// Holds the VM's name on this node: one run per namespace and name. The
// lock file names the regdisk that holds it, for the error of the next one.
Result<FileLock> ClaimName(const fs::path& root, const std::string& ns, const std::string& name) {
  RETURN_IF_ERROR(MakeDirs(root / "locks" / "vms"));
  const fs::path path = root / "locks" / "vms" / (ns + "_" + name);
  ASSIGN_OR_RETURN(std::optional<FileLock> lock, FileLock::TryAcquire(path));
  if (!lock) {
    auto holder = ReadFileCapped(path, 64);
    std::string pid = holder.ok() && !holder->empty() ? " (regdisk pid " + *holder + ")" : "";
    return AlreadyExists("VM " + ns + "/" + name + " is already running on this node" + pid +
                         "; stop it first, or give this one another metadata.name");
  }
  if (::ftruncate(lock->fd(), 0) == 0) (void)WriteAll(lock->fd(), std::to_string(::getpid()));
  return std::move(*lock);
}

// A tap on a host bridge for one NIC, gone when the last descriptor closes
// (QEMU inherits it).
Result<UniqueFd> OpenTapOnBridge(const PlannedNic& nic, const std::string& ns, const std::string& vm) {
  UniqueFd tap(::open("/dev/net/tun", O_RDWR | O_CLOEXEC));
  if (!tap.valid()) return ErrnoStatus("opening /dev/net/tun for a tap on bridge " + nic.bridge);
  const std::string name = "rd" + oci::Digest::Sha256Of(ns + "/" + vm + "/" + nic.name).hex().substr(0, 10);
  ifreq ifr{};
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
  std::strncpy(ifr.ifr_name, name.c_str(), IFNAMSIZ - 1);
  if (::ioctl(tap.get(), TUNSETIFF, &ifr) != 0) return ErrnoStatus("creating tap " + name);
  UniqueFd ctl(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!ctl.valid()) return ErrnoStatus("opening a socket to configure " + name);
  ifreq idx{};
  std::strncpy(idx.ifr_name, name.c_str(), IFNAMSIZ - 1);
  if (::ioctl(ctl.get(), SIOCGIFINDEX, &idx) != 0) return ErrnoStatus("finding tap " + name);
  ifreq br{};
  std::strncpy(br.ifr_name, nic.bridge.c_str(), IFNAMSIZ - 1);
  br.ifr_ifindex = idx.ifr_ifindex;
  if (::ioctl(ctl.get(), SIOCBRADDIF, &br) != 0) return ErrnoStatus("adding tap " + name + " to bridge " + nic.bridge);
  ifreq up{};
  std::strncpy(up.ifr_name, name.c_str(), IFNAMSIZ - 1);
  if (::ioctl(ctl.get(), SIOCGIFFLAGS, &up) != 0) return ErrnoStatus("reading the flags of tap " + name);
  up.ifr_flags |= IFF_UP;
  if (::ioctl(ctl.get(), SIOCSIFFLAGS, &up) != 0) return ErrnoStatus("bringing tap " + name + " up");
  return tap;
}

// run_dir/vm.json: what ListRunningVms and regdisk port read.
Status WriteRunInfo(const VmPlan& plan, int qemu_pid) {
  std::vector<PublishedPort> ports;
  std::string ip;
  for (const auto& nic : plan.nics) {
    if (nic.bridge.empty() && ip.empty()) ip = nic.GuestAddress();
    ports.insert(ports.end(), nic.ports.begin(), nic.ports.end());
  }
  nlohmann::json info = {{"namespace", plan.namespace_}, {"name", plan.name}, {"qemuPid", qemu_pid},
                         {"ip", ip}, {"ports", PortsToJson(ports)}};
  return WriteFileAtomic(plan.run_dir / "vm.json", info.dump(), 0600);
}

// Asks the guest to power off through QMP (ACPI powerdown).
Status QmpPowerdown(const fs::path& socket_path) {
  ASSIGN_OR_RETURN(QmpClient qmp, QmpClient::Connect(socket_path, 2s));
  return qmp.Execute("system_powerdown").status();
}

}  // namespace

void CleanStaleRuns(const fs::path& root) {
  std::error_code ec;
  if (!fs::is_directory(root / "run", ec)) return;
  if (!fs::is_directory(root / "locks", ec)) return;
  auto creating = FileLock::Acquire(root / "locks" / "run");
  if (!creating.ok()) return;
  for (const auto& e : fs::directory_iterator(root / "run", ec)) {
    // Locked: its regdisk (or that regdisk's QEMU) is alive.
    UniqueFd fd(::open(e.path().c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (fd.valid() && ::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) continue;
    pid_t qemu = ReadPid(e.path() / "qemu.pid");
    if (Alive(qemu)) {
      // Only a QEMU that uses this run directory is ours to kill.
      auto cmdline = ReadFileCapped("/proc/" + std::to_string(qemu) + "/cmdline", 1 << 20);
      if (cmdline.ok() && cmdline->find(e.path().string()) != std::string::npos) ::kill(qemu, SIGKILL);
    }
    log::Info("removing {} left by a regdisk that is gone", e.path().string());
    fs::remove_all(e.path(), ec);
  }
}

std::vector<RunningVm> ListRunningVms(const fs::path& root) {
  std::vector<RunningVm> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root / "run", ec)) {
    UniqueFd fd(::open(e.path().c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!fd.valid() || ::flock(fd.get(), LOCK_SH | LOCK_NB) == 0) continue;  // not locked: nobody runs it
    auto text = ReadFileCapped(e.path() / "vm.json", 1 << 20);
    if (!text.ok()) continue;  // still starting
    nlohmann::json j = nlohmann::json::parse(*text, nullptr, false);
    if (!j.is_object()) continue;
    RunningVm vm;
    vm.namespace_ = j.value("namespace", "");
    vm.name = j.value("name", "");
    vm.qemu_pid = j.value("qemuPid", 0);
    vm.ip = j.value("ip", "");
    vm.run_dir = e.path();
    vm.ports = PortsFromJson(j.value("ports", nlohmann::json::array()));
    out.push_back(std::move(vm));
  }
  return out;
}

Status RunVm(const spec::VirtualMachine& vm, const std::vector<spec::Secret>& secrets, const RunOptions& o) {
  CleanStaleRuns(o.plan.root);
  ASSIGN_OR_RETURN(FileLock name_claim, ClaimName(o.plan.root, vm.metadata.namespace_, vm.metadata.name));
  ASSIGN_OR_RETURN(RunDir rundir, CreateRunDir(o.plan.root, vm.metadata.namespace_ + "_" + vm.metadata.name));
  const TempDir& run = rundir.dir;
  ::chmod(run.path().c_str(), 0700);
  PlanOptions plan_options = o.plan;
  plan_options.cancel = o.stop;  // a stop during the pull ends the pull
  auto planned = PlanVm(vm, secrets, plan_options, run.path());
  if (!planned.ok() && o.stop && o.stop->cancelled()) {
    log::Info("VM {} stopped before it started ({})", vm.metadata.name, o.stop->status().message());
    return OkStatus();
  }
  if (!planned.ok()) return std::move(planned).status();
  VmPlan plan = std::move(*planned);
  // Its lazily-pulled disks go readers first (blockserve/lazy_pull.h): one
  // of them may serve the export another reads.
  struct LazyTeardown {
    std::vector<std::shared_ptr<blockserve::LazyPull>>& pulls;
    ~LazyTeardown() { blockserve::ReleaseReadersFirst(pulls); }
  } lazy_teardown{plan.lazy_pulls};
  if (plan.accel == "tcg" && o.plan.accel == "auto" && !log::Quiet()) {
    std::fprintf(stderr, "regdisk: notice: /dev/kvm is not usable here; running %s under TCG emulation, which is slower\n",
                 plan.name.c_str());
  }

  RETURN_IF_ERROR(PrepareDisks(plan));
  std::vector<UniqueFd> taps;
  for (auto& nic : plan.nics) {
    if (nic.bridge.empty()) continue;
    ASSIGN_OR_RETURN(UniqueFd tap, OpenTapOnBridge(nic, plan.namespace_, plan.name));
    nic.tap_fd = tap.get();
    taps.push_back(std::move(tap));
  }
  RETURN_IF_ERROR(MakeDirs(plan.log_file.parent_path()));
  LogRotation logs(plan.log_file);
  RETURN_IF_ERROR(CreatePrivateLog(plan.log_file, /*truncate=*/false));  // QEMU appends the console to it

  // QEMU holds the disks' use locks and the VM's name itself, so rmi keeps
  // the disks for as long as it runs, and dies with this process however
  // it dies.
  Process::Options popt = QemuProcessOptions(plan);
  popt.inherit_fds.push_back(rundir.lock.get());  // the run directory stays QEMU's while it lives
  popt.inherit_fds.push_back(name_claim.fd());
  for (const auto& tap : taps) popt.inherit_fds.push_back(tap.get());
  popt.die_with_parent = true;
  ASSIGN_OR_RETURN(Process qemu, Env::Default()->Spawn(QemuArgv(plan), popt));
  taps.clear();  // QEMU has them now
  RETURN_IF_ERROR(WriteFileAtomic(run.path() / "qemu.pid", std::to_string(qemu.pid()), 0600));
  UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, qemu.pid(), 0)));
  log::Info("VM {} started (QEMU pid {})", plan.name, qemu.pid());
  RETURN_IF_ERROR(WriteRunInfo(plan, qemu.pid()));

  Console console(o.console, o.console_input);
  RETURN_IF_ERROR(console.Connect(plan.console_socket, qemu));
  if (o.notices) {
    for (const auto& note : plan.notes) std::fprintf(o.notices, "regdisk: VM %s: %s\n", plan.name.c_str(), note.c_str());
    for (const auto& nic : plan.nics) {
      for (const auto& p : nic.ports) {
        std::fprintf(o.notices, "regdisk: VM %s: %s%s\n", plan.name.c_str(), p.String().c_str(),
                     p.name.empty() ? "" : (" (" + p.name + ")").c_str());
      }
    }
    std::fflush(o.notices);
  }
  // Raw before the attach notice, so whoever reads the notice finds the
  // terminal raw (the notice ends its line itself: raw mode has no OPOST).
  console.MakeRaw();
  if (o.notices && o.console_input >= 0 && ::isatty(o.console_input)) {
    std::fprintf(o.notices, "regdisk: console of VM %s attached; Ctrl-] stops the VM\r\n", plan.name.c_str());
    std::fflush(o.notices);
  }

  Env* env = Env::Default();
  const auto start = env->Now();
  std::string why;
  const int cancel_fd = o.stop ? o.stop->poll_fd() : -1;
  for (;;) {
    // Wakes on the guest's output, a keystroke, QEMU's exit or a stop; the
    // timeout only bounds the wait when a deadline or a token without a
    // descriptor needs checking.
    const short console_events = static_cast<short>(POLLIN | (console.pending() ? POLLOUT : 0));
    pollfd fds[4] = {{pidfd.get(), POLLIN, 0}, {console.socket_fd(), console_events, 0}, {cancel_fd, POLLIN, 0},
                     {console.input_fd(), POLLIN, 0}};
    int wait_ms = -1;
    if (o.timeout.count() > 0) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(o.timeout - (env->Now() - start)).count();
      wait_ms = static_cast<int>(std::clamp<int64_t>(left, 0, 60000));
    }
    if (!pidfd.valid() || (o.stop && cancel_fd < 0)) wait_ms = wait_ms < 0 ? 100 : std::min(wait_ms, 100);
    ::poll(fds, 4, wait_ms);  // a negative fd is ignored
    if (fds[1].revents & POLLOUT) console.Flush();
    if (fds[1].revents & ~POLLOUT) console.Drain();
    if (logs.pending() && console.received()) logs.Settle(true);  // the guest runs
    if (fds[3].revents && !console.Forward()) {
      why = "detached from the console (Ctrl-])";
      break;
    }
    if (qemu.Poll()) break;  // the guest powered off, or QEMU failed
    if (o.stop && o.stop->cancelled()) {
      why = o.stop->status().message();
      break;
    }
    if (o.timeout.count() > 0 && env->Now() - start >= o.timeout) {
      why = "timed out";
      break;
    }
  }
  console.RestoreTerminal();
  if (o.notices && console.dropped() > 0) {
    std::fprintf(o.notices, "\nregdisk: VM %s did not read %zu bytes of console input, which were dropped\n",
                 plan.name.c_str(), console.dropped());
  }
  if (!qemu.Poll()) {
    log::Info("stopping VM {} ({})", plan.name, why);
    if (o.notices && why.rfind("detached", 0) == 0) {
      std::fprintf(o.notices, "\nregdisk: %s; stopping VM %s\n", why.c_str(), plan.name.c_str());
    }
    Status st = QmpPowerdown(plan.qmp_socket);
    if (!st.ok()) log::Debug("QMP powerdown: {}", st.message());
    auto deadline = Clock::now() + o.grace;
    while (!qemu.Poll() && Clock::now() < deadline) {
      pollfd fds[2] = {{pidfd.get(), POLLIN, 0}, {console.socket_fd(), POLLIN, 0}};
      ::poll(fds, 2, static_cast<int>(std::clamp<int64_t>(
                         std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count(), 0, 100)));
      if (fds[1].revents & POLLOUT) console.Flush();
    if (fds[1].revents & ~POLLOUT) console.Drain();
    }
    qemu.Terminate(1s);
  }
  console.Drain();
  std::optional<int> code = qemu.Poll();
  if (why.empty() && code && *code != 0) {
    std::string detail = QemuLogLastLine(run.path());
    return Internal("QEMU could not run VM " + plan.name + (detail.empty() ? "" : ": " + detail));
  }
  if (logs.pending()) logs.Settle(true);
  return OkStatus();
}

}  // namespace regdisk::vm
