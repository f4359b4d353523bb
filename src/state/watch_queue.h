// Internal to src/state: the state a Subscription shares with the store's
// writers. Writers call Offer() while holding the store's mutex; Offer only
// takes this queue's own mutex for a push, so a slow reader never blocks a
// writer: past `limit` queued events the watch ends with ResourceExhausted.
#pragma once

#include <condition_variable>
#include <deque>
#include <mutex>
#include <string>

#include "state/object_store.h"
#include "state/selector.h"
#include "util/fs.h"

namespace regdisk::state {

struct Subscription::Shared {
  // The filter, fixed at creation.
  std::string resource;
  std::string ns;
  bool all_namespaces = false;
  LabelSelector labels;
  FieldSelector fields;
  size_t limit = 0;

  std::mutex mu;
  std::condition_variable cv;
  std::deque<WatchEvent> queue;  // guarded by mu
  bool ended = false;            // guarded by mu
  Status end;                    // guarded by mu: why it ended
  UniqueFd event_fd;             // readable while queue or end is pending

  // Whether an event about this object concerns the subscriber.
  bool Wants(std::string_view res, std::string_view obj_ns, std::string_view name, const Labels& obj_labels) const;
  // Queues the event, or ends the watch if the queue is full. Never blocks
  // beyond the queue's mutex.
  void Offer(WatchEvent ev);
  // Ends the watch with `why` (the first reason is kept); `drop` discards
  // queued events.
  void End(Status why, bool drop);
  bool Ended();

 private:
  void SignalLocked();  // mu held
};

}  // namespace regdisk::state
