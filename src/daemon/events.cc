#include "daemon/events.h"

#include <fmt/format.h>

#include "daemon/convert.h"
#include "daemon/resources.h"
#include "util/log.h"

namespace regdisk::daemon {

using json = nlohmann::json;

EventRecorder::EventRecorder(state::ObjectStore* store, std::string node_name, std::function<int64_t()> now)
    : store_(store), node_(std::move(node_name)), now_(std::move(now)) {}

void EventRecorder::Normal(const json& object, const std::string& reason, const std::string& message) {
  Record(object, "Normal", reason, message);
}

void EventRecorder::Warning(const json& object, const std::string& reason, const std::string& message) {
  Record(object, "Warning", reason, message);
}

void EventRecorder::Record(const json& object, const std::string& type, const std::string& reason,
                           const std::string& message) {
  const json& meta = object.contains("metadata") ? object["metadata"] : json::object();
  const std::string ns = meta.value("namespace", "default"), name = meta.value("name", ""), uid = meta.value("uid", "");
  const int64_t now = now_();
  const std::string stamp = state::FormatTimestamp(now);
  std::lock_guard lock(mu_);
  const std::string key = uid + "\n" + reason + "\n" + message;
  if (auto it = recent_.find(key); it != recent_.end()) {
    auto ev = store_->Get(kEventResource, it->second.first, it->second.second);
    if (ev.ok() && now - ParseTimestamp((*ev).value("lastTimestamp", "")).value_or(0) < kRepeatWindow) {
      (*ev)["count"] = (*ev).value("count", 1) + 1;
      (*ev)["lastTimestamp"] = stamp;
      if (store_->Update(kEventResource, *ev).ok()) return;
    }
    recent_.erase(it);
  }
  // Names as the API server's clients make them: the object's name and a
  // unique hexadecimal suffix.
  const std::string event_name = fmt::format("{}.{:x}{:04x}", name, now, sequence_++ & 0xffff);
  json ev = {{"apiVersion", "v1"},
             {"kind", "Event"},
             {"metadata", {{"name", event_name}, {"namespace", ns}}},
             {"involvedObject",
              {{"apiVersion", object.value("apiVersion", "")}, {"kind", object.value("kind", "")}, {"namespace", ns},
               {"name", name}, {"uid", uid}, {"resourceVersion", meta.value("resourceVersion", "")}}},
             {"reason", reason},
             {"message", message},
             {"type", type},
             {"source", {{"component", "regdisk"}, {"host", node_}}},
             {"reportingComponent", "regdisk"},
             {"reportingInstance", node_},
             {"firstTimestamp", stamp},
             {"lastTimestamp", stamp},
             {"count", 1}};
  auto st = store_->Create(kEventResource, ev);
  if (!st.ok()) {
    log::Debug("recording event {} of {}: {}", reason, name, st.status().message());
    return;
  }
  recent_[key] = {ns, event_name};
  if (recent_.size() > 4096) recent_.clear();
}

void EventRecorder::Prune() {
  auto list = store_->List(kEventResource, "", {}, true);
  if (!list.ok()) return;
  const int64_t now = now_();
  for (const auto& ev : list->items) {
    if (now - ParseTimestamp(ev.value("lastTimestamp", "")).value_or(now) <= kTtl) continue;
    const json& meta = ev["metadata"];
    (void)store_->Delete(kEventResource, meta.value("namespace", ""), meta.value("name", ""));
  }
}

}  // namespace regdisk::daemon
