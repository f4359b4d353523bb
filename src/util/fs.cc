#include "util/fs.h"

#include "util/env.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <system_error>

namespace regdisk {

namespace fs = std::filesystem;

void UniqueFd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

Result<UniqueFd> OpenFile(const fs::path& path, int flags, mode_t mode) {
  return Env::Default()->Open(path, flags, mode);
}

Status WriteAll(int fd, std::string_view data) {
  Env* env = Env::Default();
  while (!data.empty()) {
    ASSIGN_OR_RETURN(size_t n, env->Write(fd, data.data(), data.size(), std::nullopt));
    data.remove_prefix(n);
  }
  return OkStatus();
}

Status PWriteAll(int fd, std::string_view data, uint64_t offset) {
  Env* env = Env::Default();
  while (!data.empty()) {
    ASSIGN_OR_RETURN(size_t n, env->Write(fd, data.data(), data.size(), offset));
    data.remove_prefix(n);
    offset += n;
  }
  return OkStatus();
}

Result<std::string> ReadFileCapped(const fs::path& path, uint64_t max_bytes) {
  // Non-blocking, so a FIFO cannot hang the open; then only regular files.
  ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(path, O_RDONLY | O_NONBLOCK | O_NOCTTY));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus("reading " + path.string());
  if (!S_ISREG(st.st_mode)) {
    return InvalidArgument(path.string() + " is not a regular file (" +
                           (S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO" : "a device or socket") +
                           "); give a regular file");
  }
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    return ResourceExhausted(path.string() + " is " + std::to_string(st.st_size) + " bytes, larger than the limit of " +
                             std::to_string(max_bytes) + " bytes");
  }
  ::fcntl(fd.get(), F_SETFL, 0);
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("reading " + path.string());
    }
    if (n == 0) break;
    if (out.size() + static_cast<uint64_t>(n) > max_bytes) {
      return ResourceExhausted(path.string() + " is larger than the limit of " +
                               std::to_string(max_bytes) + " bytes");
    }
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

Status SyncDir(const fs::path& dir) {
  ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(dir, O_RDONLY | O_DIRECTORY));
  RETURN_IF_ERROR(Env::Default()->Sync(fd.get()).Annotate("directory " + dir.string()));
  return OkStatus();
}

Status MakeDirs(const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return ErrnoStatus("creating directory " + dir.string(), ec.value());
  return OkStatus();
}

Status WriteFileAtomic(const fs::path& path, std::string_view data, mode_t mode) {
  ASSIGN_OR_RETURN(PendingFile f, PendingFile::Create(path, mode));
  RETURN_IF_ERROR(WriteAll(f.fd(), data).Annotate("writing " + path.string()));
  return f.Commit();
}

Result<TempDir> TempDir::Create(std::string_view prefix, const fs::path& parent) {
  const char* tmp = ::getenv("TMPDIR");
  fs::path dir = !parent.empty() ? parent : fs::path(tmp && *tmp ? tmp : "/tmp");
  std::string templ = (dir / (std::string(prefix) + ".XXXXXX")).string();
  if (::mkdtemp(templ.data()) == nullptr) return ErrnoStatus("creating a temporary directory in " + dir.string());
  return TempDir(templ);
}

Result<TempDir> TempDir::CreateFresh(const fs::path& path) {
  RemoveAll(path);
  if (::mkdir(path.c_str(), 0700) != 0) return ErrnoStatus("creating directory " + path.string());
  return TempDir(path);
}

TempDir::~TempDir() {
  if (!path_.empty()) RemoveAll(path_);
}

void RemoveAll(const fs::path& p) {
  std::error_code ec;
  if (fs::is_directory(fs::symlink_status(p, ec))) {
    ::chmod(p.c_str(), 0700);
    for (auto it = fs::recursive_directory_iterator(p, ec); !ec && it != fs::recursive_directory_iterator();
         it.increment(ec)) {
      if (it->is_directory(ec) && !it->is_symlink(ec)) ::chmod(it->path().c_str(), 0700);
    }
  }
  fs::remove_all(p, ec);
}

Result<PendingFile> PendingFile::Create(const fs::path& final_path, mode_t mode) {
  std::string templ = final_path.string() + ".tmp-XXXXXX";
  int fd = ::mkostemp(templ.data(), O_CLOEXEC);
  if (fd < 0) return ErrnoStatus("creating a temporary file next to " + final_path.string());
  UniqueFd owned(fd);
  // Held until the file is committed or its writer dies, so RemoveStale
  // can tell an abandoned temp file from one being written.
  ::flock(fd, LOCK_EX | LOCK_NB);
  struct stat st;
  if (::fstat(fd, &st) == 0 && st.st_nlink == 0) {  // RemoveStale got it before the lock
    return Unavailable("a temporary file next to " + final_path.string() + " vanished; try again");
  }
  if (::fchmod(fd, mode) != 0) {
    int err = errno;
    ::unlink(templ.c_str());
    return ErrnoStatus("setting the mode of " + templ, err);
  }
  return PendingFile(std::move(owned), templ, final_path);
}

PendingFile::PendingFile(PendingFile&& o) noexcept
    : fd_(std::move(o.fd_)), temp_(std::move(o.temp_)), final_(std::move(o.final_)), committed_(o.committed_) {
  o.committed_ = true;  // the moved-from object owns nothing
}

PendingFile::~PendingFile() {
  if (!committed_ && !temp_.empty()) ::unlink(temp_.c_str());
}

Status PendingFile::CommitAs(const fs::path& final_path) {
  final_ = final_path;
  return Commit();
}

Status PendingFile::Commit() {
  RETURN_IF_ERROR(Env::Default()->Sync(fd_.get()).Annotate(temp_.string()));
  // Renamed while still open (and so still locked), so RemoveStale never
  // takes it for a dead writer's file.
  RETURN_IF_ERROR(Env::Default()->Rename(temp_, final_));
  fd_.reset();
  committed_ = true;
  return SyncDir(final_.parent_path().empty() ? fs::path(".") : final_.parent_path());
}

int PendingFile::RemoveStale(const fs::path& final_path) {
  const std::string prefix = final_path.filename().string() + ".tmp-";
  std::error_code ec;
  int removed = 0;
  for (const auto& e : fs::directory_iterator(final_path.parent_path(), ec)) {
    if (e.path().filename().string().rfind(prefix, 0) != 0) continue;
    UniqueFd fd(::open(e.path().c_str(), O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC));
    if (!fd.valid() || ::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) continue;  // its writer is alive
    removed += ::unlink(e.path().c_str()) == 0;
  }
  return removed;
}

Result<FileLock> FileLock::Acquire(const fs::path& path, Mode mode) {
  ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(path, O_RDWR | O_CREAT, 0600));
  while (::flock(fd.get(), mode == Mode::kShared ? LOCK_SH : LOCK_EX) != 0) {
    if (errno != EINTR) return ErrnoStatus("locking " + path.string());
  }
  return FileLock(std::move(fd));
}

Result<std::optional<FileLock>> FileLock::TryAcquire(const fs::path& path) {
  ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(path, O_RDWR | O_CREAT, 0600));
  while (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) return std::optional<FileLock>();
    if (errno != EINTR) return ErrnoStatus("locking " + path.string());
  }
  return std::optional<FileLock>(FileLock(std::move(fd)));
}

}  // namespace regdisk
