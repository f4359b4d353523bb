#include "util/process.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <string_view>
#include <thread>

#include "util/fs.h"

extern char** environ;

namespace regdisk {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

fs::path FindExecutable(std::string_view name) {
  if (name.find('/') != std::string_view::npos) return fs::path(name);
  const char* path = ::getenv("PATH");
  std::string_view rest = path ? path : "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";
  while (!rest.empty()) {
    size_t colon = rest.find(':');
    std::string_view dir = rest.substr(0, colon);
    rest = colon == std::string_view::npos ? std::string_view() : rest.substr(colon + 1);
    if (dir.empty()) continue;
    fs::path candidate = fs::path(dir) / name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return {};
}

namespace {

Status MakePipe(UniqueFd& read_end, UniqueFd& write_end) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return ErrnoStatus("creating a pipe");
  read_end.reset(fds[0]);
  write_end.reset(fds[1]);
  return OkStatus();
}

// Moves `fd` to the lowest free number above stdio (close-on-exec).
Status RaiseAboveStdio(UniqueFd& fd) {
  if (!fd.valid() || fd.get() > 2) return OkStatus();
  int moved = ::fcntl(fd.get(), F_DUPFD_CLOEXEC, 3);
  if (moved < 0) return ErrnoStatus("moving a descriptor above stdio");
  fd.reset(moved);
  return OkStatus();
}

int DecodeWaitStatus(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

}  // namespace

Result<Process> Process::Spawn(const std::vector<std::string>& argv, const Options& options) {
  if (argv.empty()) return InvalidArgument("cannot start a process with an empty argv");
  if (options.detach && options.die_with_parent) {
    return InvalidArgument("a process cannot both be detached and die with its parent");
  }
  fs::path exe = FindExecutable(argv[0]);
  if (exe.empty()) {
    return NotFound("program \"" + argv[0] + "\" was not found on PATH; install it or give its full path");
  }

  Process p;
  // Child-side ends; closed in the parent once the child has them.
  UniqueFd child_ends[3];
  auto setup = [&](Stdio mode, const fs::path& file, UniqueFd& parent_end, UniqueFd& child_end,
                   bool is_input) -> Status {
    switch (mode) {
      case Stdio::kInherit:
        return OkStatus();
      case Stdio::kNull: {
        ASSIGN_OR_RETURN(child_end, OpenFile("/dev/null", is_input ? O_RDONLY : O_WRONLY));
        return OkStatus();
      }
      case Stdio::kFile: {
        ASSIGN_OR_RETURN(child_end, OpenFile(file, is_input ? O_RDONLY : (O_WRONLY | O_CREAT | O_APPEND), 0600));
        return OkStatus();
      }
      case Stdio::kPipe:
        return is_input ? MakePipe(child_end, parent_end) : MakePipe(parent_end, child_end);
    }
    return OkStatus();
  };
  RETURN_IF_ERROR(setup(options.stdin_mode, {}, p.in_, child_ends[0], true));
  RETURN_IF_ERROR(setup(options.stdout_mode, options.stdout_file, p.out_, child_ends[1], false));
  RETURN_IF_ERROR(setup(options.stderr_mode, options.stderr_file, p.err_, child_ends[2], false));
  for (int fd : options.inherit_fds) {
    if (fd < 3) return InvalidArgument("descriptor " + std::to_string(fd) + " is stdio; inherit_fds names others");
  }
  // exec's errno comes back through this pipe; it closes on a successful exec.
  UniqueFd exec_err_read, exec_err_write;
  RETURN_IF_ERROR(MakePipe(exec_err_read, exec_err_write));
  // A detached child's pid comes back through this one (it is not the pid
  // fork returns).
  UniqueFd detached_pid_read, detached_pid_write;
  // ...and the grandchild waits on this one until the parent holds a
  // pidfd for it, so the pidfd names it for sure (it cannot have exited,
  // been reaped by init and its pid reused); EOF without a byte: give up.
  UniqueFd detached_go_read, detached_go_write;
  if (options.detach) {
    RETURN_IF_ERROR(MakePipe(detached_pid_read, detached_pid_write));
    RETURN_IF_ERROR(MakePipe(detached_go_read, detached_go_write));
  }
  // When our own stdio was closed, a descriptor made above can sit on 0, 1
  // or 2, where the child's dup2 calls would clobber it (or, being its own
  // target, keep close-on-exec): each moves above stdio first.
  for (UniqueFd* fd : {&child_ends[0], &child_ends[1], &child_ends[2], &exec_err_write, &detached_pid_write,
                       &detached_go_read}) {
    RETURN_IF_ERROR(RaiseAboveStdio(*fd));
  }

  // Everything the child needs is prepared here: after fork it only makes
  // async-signal-safe calls.
  std::vector<char*> cargv;
  for (const auto& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  std::vector<char*> cenv;
  char** envp = environ;
  if (options.env) {
    for (const auto& e : *options.env) cenv.push_back(const_cast<char*>(e.c_str()));
    cenv.push_back(nullptr);
    envp = cenv.data();
  }
  // Descriptors the child keeps besides stdio, in ascending order; every
  // other one is closed once stdio is in place (belt and braces: all are
  // O_CLOEXEC already, but a library's may not be). The exec error pipe is
  // then the only one exec closes, so when the parent sees it close, the
  // child holds exactly stdio and inherit_fds.
  std::vector<int> keep(options.inherit_fds.begin(), options.inherit_fds.end());
  keep.push_back(exec_err_write.get());
  std::sort(keep.begin(), keep.end());
  const pid_t parent = ::getpid();

  const pid_t pid = ::fork();
  if (pid < 0) return ErrnoStatus("starting " + argv[0]);
  if (pid == 0) {
    const int err_fd = exec_err_write.get();
    auto die = [&](int err) {
      (void)!::write(err_fd, &err, sizeof err);
      ::_exit(127);
    };
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    for (int sig = 1; sig < NSIG; ++sig) ::sigaction(sig, &dfl, nullptr);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    if (options.detach) {
      // Fork again and let the middle process go; the grandchild waits to
      // be re-parented before it runs anything, so that a parent-death
      // signal the program sets refers to init, not to us.
      ::close(detached_go_write.get());  // the parent's end alone: its closing is EOF here
      // (_Fork: no atfork handlers, which are not async-signal-safe.)
      const pid_t middle = ::getpid();
      const pid_t grandchild = ::_Fork();
      if (grandchild < 0) die(errno);
      if (grandchild > 0) ::_exit(0);
      while (::getppid() == middle) {
        timespec pause{0, 1000000};
        ::nanosleep(&pause, nullptr);
      }
      if (::setsid() < 0) die(errno);
      const pid_t self = ::getpid();
      if (::write(detached_pid_write.get(), &self, sizeof self) != sizeof self) die(errno);
      char go = 0;
      ssize_t got;
      while ((got = ::read(detached_go_read.get(), &go, 1)) < 0 && errno == EINTR) {
      }
      if (got != 1) ::_exit(127);
    } else if (options.new_process_group && ::setpgid(0, 0) != 0) {
      die(errno);
    }
    if (options.die_with_parent) {
      if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) die(errno);
      if (::getppid() != parent) ::_exit(127);  // the parent is already gone
    }
    // Every child end is above 2 (RaiseAboveStdio): dup2 never clobbers
    // one, and clears close-on-exec on its target.
    for (int target = 0; target < 3; ++target) {
      if (child_ends[target].valid() && ::dup2(child_ends[target].get(), target) < 0) die(errno);
    }
    int next = 3;
    for (int fd : keep) {
      if (fd > next) ::close_range(static_cast<unsigned>(next), static_cast<unsigned>(fd - 1), 0);
      next = fd + 1;
    }
    ::close_range(static_cast<unsigned>(next), ~0U, 0);
    for (int fd : options.inherit_fds) {
      if (::fcntl(fd, F_SETFD, 0) != 0) die(errno);
    }
    if (!options.cwd.empty() && ::chdir(options.cwd.c_str()) != 0) die(errno);
    ::execve(exe.c_str(), cargv.data(), envp);
    die(errno);
  }
  p.pid_ = pid;
  p.group_ = options.new_process_group && !options.detach;
  exec_err_write.reset();
  if (options.detach) {
    // The middle process exits at once; then the grandchild names itself.
    int status;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    p.pid_ = -1;
    detached_pid_write.reset();
    detached_go_read.reset();
    pid_t grandchild = -1;
    ssize_t got;
    while ((got = ::read(detached_pid_read.get(), &grandchild, sizeof grandchild)) < 0 && errno == EINTR) {
    }
    if (got != sizeof grandchild) {
      int err = 0;
      if (::read(exec_err_read.get(), &err, sizeof err) == sizeof err) return ErrnoStatus("starting " + argv[0], err);
      return Internal("starting " + argv[0] + ": the detached child did not report its pid");
    }
    // The grandchild waits for the go byte: the pidfd names it. Without
    // the byte (this returns early, the pipe closes) it exits.
    p.pidfd_.reset(static_cast<int>(::syscall(SYS_pidfd_open, grandchild, 0)));
    if (!p.pidfd_.valid()) return ErrnoStatus("opening a pidfd for " + argv[0]);
    p.pid_ = grandchild;
    const char go = 1;
    if (::write(detached_go_write.get(), &go, 1) != 1) return ErrnoStatus("starting " + argv[0]);
    detached_go_write.reset();
  }
  int err = 0;
  ssize_t n;
  while ((n = ::read(exec_err_read.get(), &err, sizeof err)) < 0 && errno == EINTR) {
  }
  if (n == sizeof err) {
    p.Wait(std::chrono::seconds(5));
    p.pid_ = -1;
    return ErrnoStatus("starting " + argv[0], err);
  }
  return p;
}

Process::Process(Process&& o) noexcept
    : pid_(o.pid_), group_(o.group_), pidfd_(std::move(o.pidfd_)), exit_code_(o.exit_code_), in_(std::move(o.in_)),
      out_(std::move(o.out_)), err_(std::move(o.err_)) {
  o.pid_ = -1;
}

Process& Process::operator=(Process&& o) noexcept {
  if (this != &o) {
    if (pid_ > 0 && !exit_code_) Terminate(std::chrono::milliseconds(0));
    pid_ = o.pid_;
    group_ = o.group_;
    pidfd_ = std::move(o.pidfd_);
    exit_code_ = o.exit_code_;
    in_ = std::move(o.in_);
    out_ = std::move(o.out_);
    err_ = std::move(o.err_);
    o.pid_ = -1;
  }
  return *this;
}

Process::~Process() {
  if (pid_ > 0 && !exit_code_) Terminate(std::chrono::milliseconds(0));
}

pid_t Process::Release() {
  pid_t pid = pid_;
  pid_ = -1;
  pidfd_.reset();
  in_.reset();
  out_.reset();
  err_.reset();
  return pid;
}

std::optional<int> Process::Poll() {
  if (exit_code_ || pid_ <= 0) return exit_code_;
  if (pidfd_.valid()) {
    // Not our child: it has exited when its pidfd is readable; init has
    // its status.
    pollfd p{pidfd_.get(), POLLIN, 0};
    if (::poll(&p, 1, 0) > 0) exit_code_ = -1;
    return exit_code_;
  }
  int status;
  pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_) exit_code_ = DecodeWaitStatus(status);
  return exit_code_;
}

std::optional<int> Process::Wait(std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  auto sleep = std::chrono::milliseconds(1);
  while (!Poll()) {
    if (Clock::now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(sleep);
    sleep = std::min(sleep * 2, std::chrono::milliseconds(50));
  }
  return exit_code_;
}

void Process::Signal(int sig) {
  if (pid_ <= 0 || exit_code_) return;
  if (pidfd_.valid()) {
    ::syscall(SYS_pidfd_send_signal, pidfd_.get(), sig, nullptr, 0);
  } else if (group_) {
    ::kill(-pid_, sig);
  } else {
    ::kill(pid_, sig);
  }
}

int Process::Terminate(std::chrono::milliseconds grace) {
  if (pid_ <= 0) return -1;
  if (!exit_code_ && grace.count() > 0) {
    Signal(SIGTERM);
    Wait(grace);
  }
  if (!exit_code_ && pidfd_.valid()) {
    Signal(SIGKILL);
    pollfd p{pidfd_.get(), POLLIN, 0};
    while (::poll(&p, 1, -1) < 0 && errno == EINTR) {
    }
    exit_code_ = -1;
  } else if (!exit_code_) {
    Signal(SIGKILL);
    int status;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    exit_code_ = DecodeWaitStatus(status);
  } else if (group_) {
    ::kill(-pid_, SIGKILL);  // stragglers the child left in its group
  }
  return *exit_code_;
}

Result<Process::Output> Process::Communicate(std::chrono::milliseconds timeout, std::string_view input) {
  auto deadline = Clock::now() + timeout;
  Output result;
  size_t written = 0;
  if (in_.valid() && input.empty()) in_.reset();
  while (in_.valid() || out_.valid() || err_.valid()) {
    pollfd fds[3];
    int n = 0;
    if (in_.valid()) fds[n++] = {in_.get(), POLLOUT, 0};
    if (out_.valid()) fds[n++] = {out_.get(), POLLIN, 0};
    if (err_.valid()) fds[n++] = {err_.get(), POLLIN, 0};
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) break;
    int r = ::poll(fds, n, static_cast<int>(left.count()));
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("waiting for a child process");
    }
    for (int i = 0; i < n; ++i) {
      if (fds[i].revents == 0) continue;
      if (fds[i].fd == in_.get()) {
        ssize_t w = ::write(in_.get(), input.data() + written, input.size() - written);
        if (w < 0 && errno != EINTR && errno != EAGAIN) {
          in_.reset();
        } else if (w > 0) {
          written += static_cast<size_t>(w);
          if (written == input.size()) in_.reset();
        }
        continue;
      }
      UniqueFd& fd = fds[i].fd == out_.get() ? out_ : err_;
      std::string& sink = fds[i].fd == out_.get() ? result.out : result.err;
      char buf[16384];
      ssize_t got = ::read(fd.get(), buf, sizeof buf);
      if (got > 0) {
        sink.append(buf, static_cast<size_t>(got));
      } else if (got == 0 || (errno != EINTR && errno != EAGAIN)) {
        fd.reset();
      }
    }
  }
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  auto code = Wait(std::max(left, std::chrono::milliseconds(0)));
  if (!code) {
    Terminate(std::chrono::milliseconds(0));
    return DeadlineExceeded("child process " + std::to_string(pid_) + " did not finish in time");
  }
  result.exit_code = *code;
  return result;
}

Result<Process::Output> Process::Run(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
                                     std::string_view input, const Options* base) {
  Options opt = base ? *base : Options();
  opt.stdin_mode = input.empty() ? Stdio::kNull : Stdio::kPipe;
  opt.stdout_mode = Stdio::kPipe;
  opt.stderr_mode = Stdio::kPipe;
  ASSIGN_OR_RETURN(Process p, Spawn(argv, opt));
  return p.Communicate(timeout, input);
}

void EnsureStdioOpen() {
  for (int fd = 0; fd < 3; ++fd) {
    if (::fcntl(fd, F_GETFD) >= 0 || errno != EBADF) continue;
    // The lowest free number is fd itself; no O_CLOEXEC: children inherit it.
    int null = ::open("/dev/null", O_RDWR);
    if (null >= 0 && null != fd) ::close(null);
  }
}

std::optional<uint64_t> ProcessStartTicks(pid_t pid) {
  auto stat = ReadFileCapped("/proc/" + std::to_string(pid) + "/stat", 4096);
  if (!stat.ok()) return std::nullopt;
  // "pid (comm) state ppid ..."; comm may hold spaces and parentheses, so
  // count fields after the last ')': starttime is field 22, the 20th after.
  size_t close = stat->rfind(')');
  if (close == std::string::npos) return std::nullopt;
  std::string_view rest = std::string_view(*stat).substr(close + 1);
  int field = 2;
  size_t pos = 0;
  while (field < 22) {
    pos = rest.find(' ', pos);
    if (pos == std::string_view::npos) return std::nullopt;
    ++pos;
    ++field;
  }
  return std::strtoull(std::string(rest.substr(pos, rest.find(' ', pos) - pos)).c_str(), nullptr, 10);
}

}  // namespace regdisk
