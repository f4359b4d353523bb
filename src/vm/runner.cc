#include "vm/runner.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <thread>

#include "disk/overlay.h"
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

// Copies what QEMU appended to its console file since the last call to
// `out` and to the VM's log file.
class ConsoleTail {
 public:
  ConsoleTail(fs::path path, std::FILE* out, UniqueFd log) : path_(std::move(path)), out_(out), log_(std::move(log)) {}
  void Drain() {
    if (!fd_.valid()) {
      auto fd = OpenFile(path_, O_RDONLY);
      if (!fd.ok()) return;
      fd_ = std::move(*fd);
    }
    char buf[65536];
    for (;;) {
      ssize_t n = ::read(fd_.get(), buf, sizeof buf);
      if (n <= 0) break;
      std::fwrite(buf, 1, static_cast<size_t>(n), out_);
      if (log_.valid()) (void)WriteAll(log_.get(), std::string_view(buf, static_cast<size_t>(n)));
    }
    std::fflush(out_);
  }

 private:
  fs::path path_;
  std::FILE* out_;
  UniqueFd log_;
  UniqueFd fd_;
};

// Asks the guest to power off through QMP (ACPI powerdown).
Status QmpPowerdown(const fs::path& socket_path) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return ErrnoStatus("opening a QMP socket");
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket_path.string().size() >= sizeof addr.sun_path) return InvalidArgument("the QMP socket path is too long");
  std::strcpy(addr.sun_path, socket_path.c_str());
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return ErrnoStatus("connecting to QMP");
  timeval tv{2, 0};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  auto read_line = [&]() -> std::string {
    std::string line;
    char c;
    while (::recv(fd.get(), &c, 1, 0) == 1 && c != '\n') line.push_back(c);
    return line;
  };
  read_line();  // the greeting
  RETURN_IF_ERROR(WriteAll(fd.get(), "{\"execute\":\"qmp_capabilities\"}\n"));
  read_line();
  RETURN_IF_ERROR(WriteAll(fd.get(), "{\"execute\":\"system_powerdown\"}\n"));
  read_line();
  return OkStatus();
}

std::string LastLines(const fs::path& p) {
  auto t = ReadFileCapped(p, 1 << 20);
  if (!t.ok()) return {};
  std::string s = *t;
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
  size_t nl = s.rfind('\n');
  return nl == std::string::npos ? s : s.substr(nl + 1);
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

Status RunVm(const spec::VirtualMachine& vm, const std::vector<spec::Secret>& secrets, const RunOptions& o) {
  CleanStaleRuns(o.plan.root);
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
  if (plan.accel == "tcg" && o.plan.accel == "auto" && !log::Quiet()) {
    std::fprintf(stderr, "regdisk: notice: /dev/kvm is not usable here; running %s under TCG emulation, which is slower\n",
                 plan.name.c_str());
  }

  // One overlay per disk: a qcow2 header naming the store's disk, with its
  // format given explicitly. Creating it does not read the disk.
  for (const auto& d : plan.disks) {
    const auto t0 = Clock::now();
    RETURN_IF_ERROR(disk::CreateOverlay(d.overlay, d.backing, d.backing_format, d.virtual_size)
                        .Annotate("creating the ephemeral disk for " + d.name));
    log::Info("ephemeral disk for {} created in {:.2f} ms", d.name,
              std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  // The VM's log holds the console of its latest run (runs of the same name
  // at the same time append to it together).
  RETURN_IF_ERROR(MakeDirs(plan.log_file.parent_path()));
  ASSIGN_OR_RETURN(UniqueFd log_fd, OpenFile(plan.log_file, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0600));

  Process::Options popt;
  popt.stdout_mode = Process::Stdio::kFile;
  popt.stdout_file = run.path() / "qemu.log";
  popt.stderr_mode = Process::Stdio::kFile;
  popt.stderr_file = run.path() / "qemu.log";
  // QEMU holds the disks' use locks itself, so rmi keeps them for as long
  // as it runs, and dies with this process however it dies.
  for (const auto& lease : plan.disk_leases) popt.inherit_fds.push_back(lease.fd());
  popt.inherit_fds.push_back(rundir.lock.get());  // the run directory stays QEMU's while it lives
  popt.die_with_parent = true;
  ASSIGN_OR_RETURN(Process qemu, Env::Default()->Spawn(QemuArgv(plan), popt));
  RETURN_IF_ERROR(WriteFileAtomic(run.path() / "qemu.pid", std::to_string(qemu.pid()), 0600));
  UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, qemu.pid(), 0)));
  log::Info("VM {} started (QEMU pid {})", plan.name, qemu.pid());

  ConsoleTail console(plan.console_log, o.console, std::move(log_fd));
  Env* env = Env::Default();
  const auto start = env->Now();
  std::string why;
  for (;;) {
    pollfd fds[1] = {{pidfd.get(), POLLIN, 0}};
    ::poll(fds, pidfd.valid() ? 1 : 0, 50);
    console.Drain();
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
  if (!qemu.Poll()) {
    log::Info("stopping VM {} ({})", plan.name, why);
    Status st = QmpPowerdown(plan.qmp_socket);
    if (!st.ok()) log::Debug("QMP powerdown: {}", st.message());
    auto deadline = Clock::now() + o.grace;
    while (!qemu.Poll() && Clock::now() < deadline) {
      console.Drain();
      std::this_thread::sleep_for(50ms);
    }
    qemu.Terminate(1s);
  }
  console.Drain();
  std::optional<int> code = qemu.Poll();
  if (why.empty() && code && *code != 0) {
    std::string detail = LastLines(run.path() / "qemu.log");
    return Internal("QEMU could not run VM " + plan.name + (detail.empty() ? "" : ": " + detail));
  }
  return OkStatus();
}

}  // namespace regdisk::vm
