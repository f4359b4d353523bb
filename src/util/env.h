// Env: the one seam between regdisk and the operating system for what a
// test wants to control: file writes, syncs and renames, the clock, and
// starting processes (LevelDB's Env is the model).
//
// Code that writes the store (fs.h helpers, the store, the layer reader)
// and that starts QEMU calls Env::Default(). Tests install a wrapper that
// injects faults, for as long as a ScopedDefaultEnv lives:
//
//   class FailNthWrite : public EnvWrapper {
//     Result<size_t> Write(int fd, const void* p, size_t n, std::optional<uint64_t> at) override {
//       if (++writes_ == fail_at_) return ErrnoStatus("writing", ENOSPC);
//       return EnvWrapper::Write(fd, p, n, at);
//     }
//   };
//   FailNthWrite faulty(Env::Default(), 7);
//   ScopedDefaultEnv use(&faulty);
//
// Implementations must be thread-safe: a pull writes from two threads.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "util/fs.h"
#include "util/process.h"
#include "util/status.h"

namespace regdisk {

class Env {
 public:
  virtual ~Env() = default;

  // The process-wide Env: the real system unless a test installed another.
  static Env* Default();

  // open(2) with O_CLOEXEC added; errors name the path.
  virtual Result<UniqueFd> Open(const std::filesystem::path& path, int flags, mode_t mode) = 0;
  // One write(2), or pwrite(2) at `offset`; returns the bytes written (a
  // short write is possible, EINTR is retried).
  virtual Result<size_t> Write(int fd, const void* data, size_t len, std::optional<uint64_t> offset) = 0;
  // fsync(2) of a file or a directory.
  virtual Status Sync(int fd) = 0;
  // ftruncate(2).
  virtual Status Truncate(int fd, uint64_t size) = 0;
  // rename(2).
  virtual Status Rename(const std::filesystem::path& from, const std::filesystem::path& to) = 0;

  virtual std::chrono::steady_clock::time_point Now() = 0;

  // Starts a child process (see Process::Spawn).
  virtual Result<Process> Spawn(const std::vector<std::string>& argv, const Process::Options& options) = 0;
};

// Forwards everything to another Env; fault injectors override a part.
class EnvWrapper : public Env {
 public:
  explicit EnvWrapper(Env* target) : target_(target) {}
  Result<UniqueFd> Open(const std::filesystem::path& path, int flags, mode_t mode) override {
    return target_->Open(path, flags, mode);
  }
  Result<size_t> Write(int fd, const void* data, size_t len, std::optional<uint64_t> offset) override {
    return target_->Write(fd, data, len, offset);
  }
  Status Sync(int fd) override { return target_->Sync(fd); }
  Status Truncate(int fd, uint64_t size) override { return target_->Truncate(fd, size); }
  Status Rename(const std::filesystem::path& from, const std::filesystem::path& to) override {
    return target_->Rename(from, to);
  }
  std::chrono::steady_clock::time_point Now() override { return target_->Now(); }
  Result<Process> Spawn(const std::vector<std::string>& argv, const Process::Options& options) override {
    return target_->Spawn(argv, options);
  }

 protected:
  Env* target() const { return target_; }

 private:
  Env* target_;
};

// Makes `env` the default for its lifetime (tests only; not thread-safe
// against code running at the moment it is installed or removed).
class ScopedDefaultEnv {
 public:
  explicit ScopedDefaultEnv(Env* env);
  ~ScopedDefaultEnv();
  ScopedDefaultEnv(const ScopedDefaultEnv&) = delete;
  ScopedDefaultEnv& operator=(const ScopedDefaultEnv&) = delete;

 private:
  Env* previous_;
};

}  // namespace regdisk
