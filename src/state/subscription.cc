// Watch subscriptions: a bounded queue per watcher, filled by the store's
// writers after each commit and drained by the watcher's thread.
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cstdint>

#include "state/watch_queue.h"

namespace regdisk::state {

bool Subscription::Shared::Wants(std::string_view res, std::string_view obj_ns, std::string_view name,
                                 const Labels& obj_labels) const {
  if (res != resource) return false;
  if (!all_namespaces && obj_ns != ns) return false;
  return fields.Matches(obj_ns, name) && labels.Matches(obj_labels);
}

void Subscription::Shared::SignalLocked() {
  uint64_t one = 1;
  // The counter only has to be non-zero; a failed write (counter full)
  // still leaves it readable.
  (void)!::write(event_fd.get(), &one, sizeof one);
  cv.notify_all();
}

void Subscription::Shared::Offer(WatchEvent ev) {
  std::lock_guard lock(mu);
  if (ended) return;
  if (queue.size() >= limit) {
    ended = true;
    end = ResourceExhausted("watch on " + resource + " closed: the watcher fell " + std::to_string(queue.size()) +
                            " events behind (limit " + std::to_string(limit) +
                            "); list again and watch from the list's resourceVersion");
    SignalLocked();
    return;
  }
  queue.push_back(std::move(ev));
  SignalLocked();
}

void Subscription::Shared::End(Status why, bool drop) {
  std::lock_guard lock(mu);
  if (drop) queue.clear();
  if (ended) return;
  ended = true;
  end = std::move(why);
  SignalLocked();
}

bool Subscription::Shared::Ended() {
  std::lock_guard lock(mu);
  return ended;
}

Subscription::~Subscription() { Close(); }

void Subscription::Close() { shared_->End(Cancelled("watch closed"), /*drop=*/true); }

int Subscription::poll_fd() const { return shared_->event_fd.get(); }

Result<std::optional<WatchEvent>> Subscription::TryNext() {
  std::lock_guard lock(shared_->mu);
  if (!shared_->queue.empty()) {
    WatchEvent ev = std::move(shared_->queue.front());
    shared_->queue.pop_front();
    if (shared_->queue.empty() && !shared_->ended) {
      uint64_t drained;
      (void)!::read(shared_->event_fd.get(), &drained, sizeof drained);  // readable again on the next Offer
    }
    return std::optional<WatchEvent>(std::move(ev));
  }
  if (shared_->ended) return shared_->end;
  return std::optional<WatchEvent>();
}

Result<WatchEvent> Subscription::Next(const CancelToken* cancel) {
  for (;;) {
    if (cancel != nullptr) RETURN_IF_ERROR(cancel->status());
    ASSIGN_OR_RETURN(std::optional<WatchEvent> ev, TryNext());
    if (ev) return std::move(*ev);
    if (cancel == nullptr) {
      std::unique_lock lock(shared_->mu);
      shared_->cv.wait(lock, [&] { return !shared_->queue.empty() || shared_->ended; });
      continue;
    }
    // Wait for an event or the token, whichever comes first.
    pollfd fds[2] = {{shared_->event_fd.get(), POLLIN, 0}, {cancel->poll_fd(), POLLIN, 0}};
    int timeout_ms = cancel->poll_fd() >= 0 ? -1 : 100;  // no eventfd for the token: check it now and then
    if (::poll(fds, cancel->poll_fd() >= 0 ? 2 : 1, timeout_ms) < 0 && errno != EINTR) {
      return ErrnoStatus("waiting for watch events");
    }
  }
}

}  // namespace regdisk::state
