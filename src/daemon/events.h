// Kubernetes Events (core/v1 Event) that the daemon records in the object
// store, for `kubectl get events` and `kubectl describe`: pulls (size and
// time), starts, stops, failures, and a replica set's creates and deletes.
//
//   EventRecorder events(store, "node1", clock);
//   events.Normal(vmi_json, "Started", "VMI started (QEMU pid 1234)");
//   events.Warning(vmi_json, "FailedPull", status.message());
//
// As client-go's correlator does, a repeat of the same reason and message
// for the same object within kRepeatWindow bumps `count` and
// `lastTimestamp` of the existing Event instead of adding one. Events
// older than kTtl are deleted (the API server's default event TTL is one
// hour). Recording never fails the caller: a store error is logged.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>

#include "state/object_store.h"

namespace regdisk::daemon {

class EventRecorder {
 public:
  static constexpr int64_t kTtl = 3600;          // seconds
  static constexpr int64_t kRepeatWindow = 600;  // seconds

  EventRecorder(state::ObjectStore* store, std::string node_name, std::function<int64_t()> now);

  // `object` is the involved object as stored (apiVersion, kind, metadata).
  // Thread-safe.
  void Normal(const nlohmann::json& object, const std::string& reason, const std::string& message);
  void Warning(const nlohmann::json& object, const std::string& reason, const std::string& message);

  // Deletes Events older than kTtl.
  void Prune();

 private:
  void Record(const nlohmann::json& object, const std::string& type, const std::string& reason,
              const std::string& message);

  state::ObjectStore* store_;
  std::string node_;
  std::function<int64_t()> now_;
  std::mutex mu_;
  uint64_t sequence_ = 0;  // guarded by mu_
  // (uid, reason, message) -> the Event's namespace/name; guarded by mu_.
  std::map<std::string, std::pair<std::string, std::string>> recent_;
};

}  // namespace regdisk::daemon
