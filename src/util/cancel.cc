#include "util/cancel.h"

#include <cstdint>

#include <sys/eventfd.h>
#include <unistd.h>

namespace regdisk {

CancelToken::CancelToken() : event_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}

CancelToken::~CancelToken() {
  if (event_fd_ >= 0) ::close(event_fd_);
}

void CancelToken::Cancel(std::string reason) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (cancelled_.load(std::memory_order_relaxed)) return;
    reason_ = std::move(reason);
    cancelled_.store(true, std::memory_order_release);
  }
  cv_.notify_all();
  if (event_fd_ >= 0) {
    uint64_t one = 1;
    (void)!::write(event_fd_, &one, sizeof one);
  }
}

Status CancelToken::status() const {
  if (!cancelled()) return OkStatus();
  std::lock_guard<std::mutex> lock(mu_);
  return Cancelled(reason_);
}

Status CancelToken::SleepFor(std::chrono::milliseconds d) const {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, d, [&] { return cancelled_.load(std::memory_order_acquire); });
  lock.unlock();
  return status();
}

}  // namespace regdisk
