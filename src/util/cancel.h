// Cancellation: a token that long operations check where they wait, so a
// signal, a deleted VM or a deadline stops a pull, a back-off sleep or a
// VM's wait loop promptly, and the operation unwinds through its normal
// error path (RAII cleans up; partial downloads are kept for a resume).
//
//   auto token = std::make_shared<CancelToken>();
//   options.cancel = token;                  // handed to the operation
//   token->Cancel("interrupted");            // from any thread
//   RETURN_IF_ERROR(token->status());        // in the operation: Cancelled
//   RETURN_IF_ERROR(token->SleepFor(backoff));  // wakes early when cancelled
//
// Thread-safe. Cancel is idempotent: the first reason is kept.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>

#include "util/status.h"

namespace regdisk {

class CancelToken {
 public:
  CancelToken();
  ~CancelToken();
  CancelToken(const CancelToken&) = delete;
  CancelToken& operator=(const CancelToken&) = delete;

  void Cancel(std::string reason);
  bool cancelled() const { return cancelled_.load(std::memory_order_acquire); }
  // OK, or Cancelled with the reason.
  Status status() const;
  // Waits `d`, or less when cancelled meanwhile; returns status().
  Status SleepFor(std::chrono::milliseconds d) const;
  // A descriptor that becomes readable (POLLIN) once the token is
  // cancelled, for loops that poll() other descriptors too; -1 if the
  // kernel gave none (then such loops must also check cancelled()).
  int poll_fd() const { return event_fd_; }

 private:
  int event_fd_ = -1;  // an eventfd, written once by Cancel
  std::atomic<bool> cancelled_{false};
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::string reason_;  // guarded by mu_
};

}  // namespace regdisk
