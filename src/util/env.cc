#include "util/env.h"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <atomic>

namespace regdisk {

namespace {

class PosixEnv : public Env {
 public:
  Result<UniqueFd> Open(const std::filesystem::path& path, int flags, mode_t mode) override {
    int fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
    if (fd < 0) return ErrnoStatus("opening " + path.string());
    return UniqueFd(fd);
  }
  Result<size_t> Write(int fd, const void* data, size_t len, std::optional<uint64_t> offset) override {
    for (;;) {
      ssize_t n = offset ? ::pwrite(fd, data, len, static_cast<off_t>(*offset)) : ::write(fd, data, len);
      if (n >= 0) return static_cast<size_t>(n);
      if (errno != EINTR) return ErrnoStatus("writing");
    }
  }
  Status Sync(int fd) override {
    if (::fsync(fd) != 0) return ErrnoStatus("syncing");
    return OkStatus();
  }
  Status Truncate(int fd, uint64_t size) override {
    if (::ftruncate(fd, static_cast<off_t>(size)) != 0) return ErrnoStatus("sizing");
    return OkStatus();
  }
  Status Rename(const std::filesystem::path& from, const std::filesystem::path& to) override {
    if (::rename(from.c_str(), to.c_str()) != 0) return ErrnoStatus("renaming " + from.string() + " to " + to.string());
    return OkStatus();
  }
  std::chrono::steady_clock::time_point Now() override { return std::chrono::steady_clock::now(); }
  Result<Process> Spawn(const std::vector<std::string>& argv, const Process::Options& options) override {
    return Process::Spawn(argv, options);
  }
};

PosixEnv* Posix() {
  static PosixEnv* env = new PosixEnv;  // never destroyed: used until exit
  return env;
}

std::atomic<Env*> g_default{nullptr};

}  // namespace

Env* Env::Default() {
  Env* e = g_default.load(std::memory_order_acquire);
  return e ? e : Posix();
}

ScopedDefaultEnv::ScopedDefaultEnv(Env* env) : previous_(g_default.exchange(env)) {}
ScopedDefaultEnv::~ScopedDefaultEnv() { g_default.store(previous_); }

}  // namespace regdisk
