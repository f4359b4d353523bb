// File-system helpers: an owning fd, temp files and directories removed on
// scope exit, bounded reads and atomic writes (temp, fsync, rename).
//
// Every descriptor opened here carries O_CLOEXEC.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

#include "util/status.h"

namespace regdisk {

// Owns one file descriptor; closes it on destruction.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(o.release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

// open(2) with O_CLOEXEC added; errors name the path.
Result<UniqueFd> OpenFile(const std::filesystem::path& path, int flags, mode_t mode = 0644);

// Writes all of data to fd (at `offset` for PWriteAll), retrying short
// writes and EINTR. Goes through Env::Default(), like OpenFile, the syncs
// and renames of SyncDir and PendingFile, so tests can inject faults.
Status WriteAll(int fd, std::string_view data);
Status PWriteAll(int fd, std::string_view data, uint64_t offset);

// Reads a whole regular file, refusing one larger than max_bytes and
// anything else (a FIFO, a device, a directory) without blocking on it.
Result<std::string> ReadFileCapped(const std::filesystem::path& path, uint64_t max_bytes);

// Writes data to path atomically: a temp file in the same directory is
// written, fsynced and renamed over path; the directory is then fsynced.
Status WriteFileAtomic(const std::filesystem::path& path, std::string_view data, mode_t mode = 0644);

// fsync(2) on a directory, so that a rename inside it is durable.
Status SyncDir(const std::filesystem::path& dir);

// Creates a directory and its parents (mkdir -p); an existing one is fine.
Status MakeDirs(const std::filesystem::path& dir);

// Removes a file or a tree, including directories made read-only (as the
// store makes its disks); errors are ignored, as in `rm -rf`.
void RemoveAll(const std::filesystem::path& p);

// A directory created under `parent` (default $TMPDIR, or /tmp) as
// PREFIX.XXXXXX, and removed, with everything in it, when this object is
// destroyed.
class TempDir {
 public:
  static Result<TempDir> Create(std::string_view prefix = "regdisk", const std::filesystem::path& parent = {});
  // Exactly `path` (mode 0700), after removing whatever a process that died
  // left there. The caller must hold a lock that makes the name its own.
  static Result<TempDir> CreateFresh(const std::filesystem::path& path);
  TempDir(TempDir&& o) noexcept : path_(std::move(o.path_)) { o.path_.clear(); }
  TempDir& operator=(TempDir&&) = delete;
  TempDir(const TempDir&) = delete;
  ~TempDir();
  const std::filesystem::path& path() const { return path_; }

 private:
  explicit TempDir(std::filesystem::path p) : path_(std::move(p)) {}
  std::filesystem::path path_;
};

// An open, anonymous-until-committed file: removed on destruction unless
// Commit() renamed it into place.
class PendingFile {
 public:
  // Creates a unique temp file next to final_path.
  static Result<PendingFile> Create(const std::filesystem::path& final_path, mode_t mode = 0644);
  PendingFile(PendingFile&& o) noexcept;
  PendingFile& operator=(PendingFile&&) = delete;
  ~PendingFile();

  int fd() const { return fd_.get(); }
  const std::filesystem::path& temp_path() const { return temp_; }
  // fsync, rename over the final path, fsync the directory.
  Status Commit();
  // The same, to a final path chosen only now (same directory or file system).
  Status CommitAs(const std::filesystem::path& final_path);
  // Removes the temp files of `final_path` that writers which died left
  // behind (a live writer holds a lock on its own); returns how many.
  static int RemoveStale(const std::filesystem::path& final_path);

 private:
  PendingFile(UniqueFd fd, std::filesystem::path temp, std::filesystem::path final_path)
      : fd_(std::move(fd)), temp_(std::move(temp)), final_(std::move(final_path)) {}
  UniqueFd fd_;
  std::filesystem::path temp_;
  std::filesystem::path final_;
  bool committed_ = false;
};

// An exclusive advisory lock (flock) on a lock file, held until destruction.
// Blocks until the lock is free; processes that die release it.
class FileLock {
 public:
  enum class Mode { kExclusive, kShared };
  // Waits for the lock.
  static Result<FileLock> Acquire(const std::filesystem::path& path, Mode mode = Mode::kExclusive);
  // Takes the lock if no one holds it (exclusive); nullopt when someone does.
  static Result<std::optional<FileLock>> TryAcquire(const std::filesystem::path& path);
  FileLock(FileLock&&) = default;
  FileLock& operator=(FileLock&&) = default;
  // The locked descriptor: a child that inherits it (Process::Options::
  // inherit_fds) holds the lock for as long as it lives.
  int fd() const { return fd_.get(); }

 private:
  explicit FileLock(UniqueFd fd) : fd_(std::move(fd)) {}
  UniqueFd fd_;
};

}  // namespace regdisk
