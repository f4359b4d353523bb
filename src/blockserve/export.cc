#include "blockserve/export.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>

#include <fmt/core.h>

#include "blockserve/control_protocol.h"
#include "util/log.h"
#include "util/text.h"

namespace regdisk::blockserve {

namespace fs = std::filesystem;

namespace {

constexpr std::string_view kPluginName = "nbdkit-regdisk-plugin.so";
// "PID START_TICKS": the nbdkit an owner with outlive_owner left running.
constexpr std::string_view kPidRecord = "nbdkit.pid";

Result<UniqueFd> Listen(const fs::path& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.native().size() >= sizeof addr.sun_path) {
    return InvalidArgument("the socket path " + path.string() + " is too long for a unix socket; use a shorter --root");
  }
  std::memcpy(addr.sun_path, path.c_str(), path.native().size());
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return ErrnoStatus("socket");
  ::unlink(path.c_str());
  // Owner only from the first moment, without touching the process's umask
  // (other threads create files meanwhile): Linux gives the socket file
  // the mode of the socket's inode, less the umask, and fchmod sets that.
  if (::fchmod(fd.get(), 0600) != 0) return ErrnoStatus("fchmod " + path.string());
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    return ErrnoStatus("bind " + path.string());
  }
  if (::listen(fd.get(), 64) != 0) return ErrnoStatus("listen " + path.string());
  return fd;
}

}  // namespace

std::string LastLogLine(std::string_view log) {
  while (!log.empty()) {
    const size_t nl = log.find_last_of('\n', log.size() - 1);
    std::string_view line = nl == std::string_view::npos ? log : log.substr(nl + 1);
    log = nl == std::string_view::npos ? std::string_view() : log.substr(0, nl);
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.remove_suffix(1);
    while (!line.empty() && (line.front() == ' ' || line.front() == '\t')) line.remove_prefix(1);
    if (line.empty()) continue;
    return PrintableLine(line, 300);
  }
  return "(nbdkit wrote nothing)";
}

namespace {

bool ReadFull(int fd, void* buf, size_t n) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    const ssize_t r = ::recv(fd, p, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

}  // namespace

bool CanConnect(const fs::path& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), std::min(path.native().size(), sizeof addr.sun_path - 1));
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  return fd.valid() && ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
}

Result<std::unique_ptr<ControlServer>> ControlServer::Start(LazyDisk& disk, const fs::path& socket, int workers) {
  ASSIGN_OR_RETURN(UniqueFd listener, Listen(socket));
  UniqueFd stop(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!stop.valid()) return ErrnoStatus("eventfd");
  auto s = std::unique_ptr<ControlServer>(
      new ControlServer(disk, socket, std::move(listener), std::move(stop), std::max(1, workers)));
  s->acceptor_ = std::thread([p = s.get()] { p->Serve(); });
  return s;
}

ControlServer::ControlServer(LazyDisk& disk, fs::path socket, UniqueFd listener, UniqueFd stop, int max_active)
    : disk_(disk),
      socket_(std::move(socket)),
      listener_(std::move(listener)),
      stop_(std::move(stop)),
      max_active_(max_active) {}

ControlServer::~ControlServer() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
    cv_.notify_all();
  }
  const uint64_t one = 1;
  if (::write(stop_.get(), &one, sizeof one) < 0) log::Warn("control server: cannot signal its workers");
  if (acceptor_.joinable()) acceptor_.join();
  // Requests still being answered end with their reads (the disk's owner
  // stops it first, which ends them promptly).
  std::map<std::thread::id, std::thread> left;
  {
    std::lock_guard lock(mu_);
    left.swap(answering_);
    answered_.clear();
  }
  for (auto& [id, t] : left) t.join();
  ::unlink(socket_.c_str());
}

int ControlServer::active() const {
  std::lock_guard lock(mu_);
  return static_cast<int>(answering_.size() - answered_.size());
}

void ControlServer::Reap() {
  for (const std::thread::id id : answered_) {
    auto it = answering_.find(id);
    if (it == answering_.end()) continue;
    it->second.join();
    answering_.erase(it);
  }
  answered_.clear();
}

void ControlServer::Serve() {
  for (;;) {
    {
      // At most max_active_ answers at once; the rest wait in the backlog.
      std::unique_lock lock(mu_);
      Reap();
      cv_.wait(lock, [&] {
        Reap();
        return stopping_ || static_cast<int>(answering_.size()) < max_active_;
      });
      if (stopping_) return;
    }
    pollfd p[2] = {{listener_.get(), POLLIN, 0}, {stop_.get(), POLLIN, 0}};
    if (::poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      log::Warn("control server {}: poll: {}", socket_.string(), std::strerror(errno));
      return;
    }
    if (p[1].revents) return;
    auto conn = std::make_shared<UniqueFd>(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn->valid()) continue;
    std::lock_guard lock(mu_);
    std::thread t([this, conn] {
      Answer(conn->get());
      conn->reset();
      std::lock_guard done(mu_);
      answered_.push_back(std::this_thread::get_id());
      cv_.notify_all();
    });
    const std::thread::id id = t.get_id();
    answering_.emplace(id, std::move(t));
  }
}

void ControlServer::Answer(int fd) {
  // The request is 16 bytes from a process on this machine; a peer that
  // sends less within a few seconds is dropped.
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  unsigned char req[REGDISK_CONTROL_REQUEST_BYTES];
  if (!ReadFull(fd, req, sizeof req)) return;
  uint64_t offset = 0, length = 0;
  std::memcpy(&offset, req, 8);
  std::memcpy(&length, req + 8, 8);
  ++requests_;
  const Status st = disk_.Ensure(offset, length);
  // The disk is stopping (its owner goes, and may be restarting): no
  // answer, so the plugin asks again, of the next owner, until its own
  // deadline, rather than failing the guest's read.
  if (st.code() == Code::kCancelled) return;
  int32_t err = 0;
  if (!st.ok()) {
    err = EIO;
    log::Warn("a guest read of {} bytes at {} fails: {}", length, offset, st.ToString());
  }
  unsigned char reply[REGDISK_CONTROL_REPLY_BYTES];
  std::memcpy(reply, &err, 4);
  ::send(fd, reply, sizeof reply, MSG_NOSIGNAL);
}

Result<fs::path> FindNbdkitPlugin() {
  std::vector<fs::path> tried;
  if (const char* env = std::getenv("REGDISK_NBDKIT_PLUGIN"); env && *env) {
    if (fs::exists(env)) return fs::path(env);
    return NotFound(std::string("REGDISK_NBDKIT_PLUGIN names ") + env + ", which does not exist");
  }
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    tried = {exe.parent_path() / kPluginName, exe.parent_path().parent_path() / "lib" / "regdisk" / kPluginName};
    for (const auto& p : tried) {
      if (fs::exists(p)) return p;
    }
  }
  std::string where;
  for (const auto& p : tried) where += (where.empty() ? "" : ", ") + p.string();
  return NotFound("regdisk's nbdkit plugin is not installed (looked in " + where +
                  "); install it with regdisk or set REGDISK_NBDKIT_PLUGIN");
}

Result<std::unique_ptr<Export>> Export::Start(LazyDisk& disk, const ExportOptions& o) {
  if (o.outlive_owner || fs::exists(disk.dir() / kPidRecord)) {
    // An nbdkit an earlier owner left serving this disk's VMs: take it over
    // (whatever this owner's mode: replacing it would cut those VMs off).
    Result<std::unique_ptr<Export>> adopted = Adopt(disk, o);
    if (adopted.ok() || adopted.status().code() != Code::kNotFound) return adopted;
  }
  fs::path plugin = o.plugin;
  if (plugin.empty()) {
    ASSIGN_OR_RETURN(plugin, FindNbdkitPlugin());
  }
  const fs::path dir = disk.dir();
  const fs::path control_path = dir / "control.sock", nbd_path = dir / "nbd.sock";
  ASSIGN_OR_RETURN(std::unique_ptr<ControlServer> control, ControlServer::Start(disk, control_path, o.workers));
  ::unlink(nbd_path.c_str());
  ::unlink((dir / kPidRecord).c_str());
  Process::Options po;
  po.stdout_mode = Process::Stdio::kNull;  // never a pipe or terminal of ours, which it may outlive
  po.stderr_mode = Process::Stdio::kFile;
  po.stderr_file = dir / "nbdkit.log";
  // nbdkit asks for a parent-death signal of its own, so one that is to
  // outlive us must not be our child (or a child of the thread that
  // started it) at all.
  po.die_with_parent = !o.outlive_owner;
  po.detach = o.outlive_owner;
  // Every path here is the store's own (digests), never a name from an image.
  const std::vector<std::string> argv = {o.nbdkit,
                                         "--foreground",
                                         "--readonly",
                                         "--unix",
                                         nbd_path.string(),
                                         "--threads",
                                         "16",
                                         plugin.string(),
                                         "file=" + disk.file().string(),
                                         "map=" + disk.bitmap_path().string(),
                                         "control=" + control_path.string(),
                                         "deadline=" + std::to_string(o.deadline.count())};
  ASSIGN_OR_RETURN(Process nbdkit, Process::Spawn(argv, po));
  if (o.outlive_owner) {
    // What a later owner adopts it by: the pid and that process's start
    // time, written at once, so that an owner killed while nbdkit starts
    // leaves it findable (to adopt, or to stop) rather than running unseen.
    const std::optional<uint64_t> ticks = ProcessStartTicks(nbdkit.pid());
    if (!ticks) return Unavailable("nbdkit exited as it started; see " + (dir / "nbdkit.log").string());
    RETURN_IF_ERROR(WriteFileAtomic(dir / kPidRecord, fmt::format("{} {}\n", nbdkit.pid(), *ticks), 0600));
  }
  const auto until = std::chrono::steady_clock::now() + o.start_timeout;
  while (!CanConnect(nbd_path)) {
    if (std::optional<int> code = nbdkit.Poll()) {
      Result<std::string> log_text = ReadFileCapped(dir / "nbdkit.log", 64 << 10);
      return Unavailable(fmt::format("nbdkit exited{} before serving {}: {}; see {} for more",
                                     *code >= 0 ? fmt::format(" with {}", *code) : std::string(),
                                     nbd_path.string(), LastLogLine(log_text.ok() ? *log_text : ""),
                                     (dir / "nbdkit.log").string()));
    }
    if (std::chrono::steady_clock::now() > until) {
      return DeadlineExceeded("nbdkit did not listen on " + nbd_path.string() + " in time; see " +
                              (dir / "nbdkit.log").string());
    }
    ::usleep(10000);
  }
  ::chmod(nbd_path.c_str(), 0600);
  auto e = std::unique_ptr<Export>(new Export());
  e->socket_ = nbd_path;
  e->control_ = std::move(control);
  e->pid_ = nbdkit.pid();
  e->nbdkit_.emplace(std::move(nbdkit));
  return e;
}

Result<std::unique_ptr<Export>> Export::Adopt(LazyDisk& disk, const ExportOptions& o) {
  const fs::path dir = disk.dir();
  Result<std::string> text = ReadFileCapped(dir / kPidRecord, 64);
  if (!text.ok()) return NotFound("no nbdkit recorded for " + dir.string());
  unsigned long long pid = 0, ticks = 0;
  if (std::sscanf(text->c_str(), "%llu %llu", &pid, &ticks) != 2 || pid == 0 || pid > INT32_MAX) {
    return NotFound("an unreadable nbdkit record in " + dir.string());
  }
  // The pidfd first, then the start time: if it still matches, the pidfd
  // refers to that very process, not to one that reused its pid.
  UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, static_cast<pid_t>(pid), 0)));
  const std::optional<uint64_t> now_ticks = ProcessStartTicks(static_cast<pid_t>(pid));
  const fs::path nbd_path = dir / "nbd.sock";
  if (!pidfd.valid() || now_ticks != ticks || !CanConnect(nbd_path)) {
    if (pidfd.valid() && now_ticks == ticks) {
      // Ours, alive, but not serving (its owner died as it started, or it
      // hangs): stopped, so that the one started next is the only one.
      ::syscall(SYS_pidfd_send_signal, pidfd.get(), SIGKILL, nullptr, 0);
      pollfd p{pidfd.get(), POLLIN, 0};
      ::poll(&p, 1, 5000);
    }
    ::unlink((dir / kPidRecord).c_str());
    return NotFound("the nbdkit recorded for " + dir.string() + " is gone");
  }
  ASSIGN_OR_RETURN(std::unique_ptr<ControlServer> control, ControlServer::Start(disk, dir / "control.sock", o.workers));
  auto e = std::unique_ptr<Export>(new Export());
  e->socket_ = nbd_path;
  e->control_ = std::move(control);
  e->pidfd_ = std::move(pidfd);
  e->pid_ = static_cast<pid_t>(pid);
  e->adopted_ = true;
  log::Info("serving {} again through its running nbdkit (pid {})", dir.string(), pid);
  return e;
}

Export::~Export() {
  if (!released_) {
    if (nbdkit_) {
      nbdkit_->Terminate(std::chrono::seconds(5));
    } else if (pidfd_.valid()) {
      // Not our child: signal it through its pidfd; its parent reaps it.
      ::syscall(SYS_pidfd_send_signal, pidfd_.get(), SIGTERM, nullptr, 0);
      pollfd p{pidfd_.get(), POLLIN, 0};
      if (::poll(&p, 1, 5000) == 0) ::syscall(SYS_pidfd_send_signal, pidfd_.get(), SIGKILL, nullptr, 0);
    }
    ::unlink(socket_.c_str());
    ::unlink((socket_.parent_path() / kPidRecord).c_str());
  } else if (nbdkit_) {
    nbdkit_->Release();  // it goes on serving; whoever adopts it next may stop it
  }
  control_.reset();
}

std::string Export::uri() const { return "nbd+unix:///?socket=" + socket_.string(); }

}  // namespace regdisk::blockserve
