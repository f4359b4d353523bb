#include "daemon/node.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <unistd.h>

#include <deque>
#include <fmt/format.h>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "controller/names.h"
#include "controller/replicaset.h"
#include "controller/vm.h"
#include "daemon/convert.h"
#include "daemon/events.h"
#include "daemon/instance.h"
#include "daemon/resources.h"
#include "image/transport.h"
#include "store/store.h"
#include "spec/spec.h"
#include "util/cancel.h"
#include "util/log.h"
#include "util/text.h"

namespace regdisk::daemon {

namespace fs = std::filesystem;
namespace c = controller;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {

// A VMI's spec as the parser takes it: what a user wrote, without the
// fields the API server and the daemon fill in.
json UserView(const json& object, std::initializer_list<const char*> top_fields) {
  json out = json::object();
  for (const char* f : top_fields) {
    if (object.contains(f)) out[f] = object[f];
  }
  json meta = json::object();
  const json& m = object.contains("metadata") ? object["metadata"] : json::object();
  for (const char* f : {"name", "namespace", "labels", "annotations"}) {
    if (m.is_object() && m.contains(f)) meta[f] = m[f];
  }
  out["metadata"] = meta;
  return out;
}

// Pull and plan failures that may pass by themselves: retried.
bool MayPass(const Status& st) {
  switch (st.code()) {
    case Code::kUnavailable:
    case Code::kDeadlineExceeded:
    case Code::kNotFound:
    case Code::kUnauthenticated:
    case Code::kPermissionDenied:
    case Code::kResourceExhausted:
      return true;
    default:
      return false;
  }
}

std::string Hostname() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof buf - 1) != 0) return "localhost";
  return buf;
}

uint64_t RandomSeed() {
  uint64_t seed = 0;
  if (::getrandom(&seed, sizeof seed, 0) != sizeof seed) seed = static_cast<uint64_t>(::getpid()) * 2654435761u;
  return seed;
}

}  // namespace

struct Node::Impl {
  // Lazy boot's pulls and exports, one per image, shared by the VMs that
  // read from them (each Instance holds its own): destroyed last, after
  // every Instance has let go.
  blockserve::LazyPool lazy_pool;
  NodeOptions o;
  state::ObjectStore* store = nullptr;
  c::RandomNameSource names{1};

  // Loop thread only.
  std::map<std::string, std::unique_ptr<Instance>> instances;  // by VMI uid
  struct Backoff {
    Clock::time_point next;
    std::chrono::milliseconds delay{0};
  };
  std::map<std::string, Backoff> backoffs;
  // By VMI uid: the images a start runs by their pinned digest ->
  // the image as the spec names it.
  std::map<std::string, std::map<std::string, std::string>> pinned;
  std::vector<std::unique_ptr<state::Subscription>> watches;

  // Work in other threads, and what it hands back.
  struct Start {
    std::shared_ptr<CancelToken> cancel;
    std::thread thread;
  };
  std::map<std::string, Start> starts;      // by VMI uid; loop thread only
  std::map<std::string, std::thread> stops;  // by VMI uid; loop thread only
  // Adopted VMs whose disks are served while they fill: their lazy pulls,
  // acquired again (by VMI uid; loop thread only).
  std::map<std::string, std::thread> reserves;
  struct Done {
    std::string uid;
    bool is_stop = false;
    Result<std::unique_ptr<Instance>> started = Internal("not started");
    // A start's pull: bytes fetched from registries, and how long pulling
    // and planning took.
    uint64_t pulled_bytes = 0;
    double plan_seconds = 0;
    // An adopted VM's lazy pulls, acquired again (ReServe).
    bool is_reserve = false;
    std::vector<std::shared_ptr<blockserve::LazyPull>> lazy = {};
  };
  std::mutex mu;
  std::deque<Done> done;  // guarded by mu
  UniqueFd wake;          // eventfd: work finished

  // Counters for /metrics; any thread.
  struct Metrics {
    std::mutex mu;
    std::map<std::string, uint64_t> pulls;  // result -> count
    uint64_t pull_bytes = 0;
    double pull_seconds = 0;
    uint64_t starts = 0;
    std::map<std::string, uint64_t> exits;  // succeeded | failed -> count
    void CountPull(bool ok, uint64_t bytes, double seconds) {
      std::lock_guard lock(mu);
      pulls[ok ? "success" : "error"]++;
      pull_bytes += bytes;
      pull_seconds += seconds;
    }
    void Count(uint64_t Metrics::*counter) {
      std::lock_guard lock(mu);
      ++(this->*counter);
    }
    void CountExit(bool succeeded) {
      std::lock_guard lock(mu);
      exits[succeeded ? "succeeded" : "failed"]++;
    }
  } metrics;
  std::unique_ptr<EventRecorder> events;
  Clock::time_point next_prune;  // loop thread only

  std::shared_ptr<CancelToken> quit = std::make_shared<CancelToken>();
  std::thread loop;

  int64_t Now() const { return o.now ? o.now() : static_cast<int64_t>(::time(nullptr)); }

  void Wake() {
    uint64_t one = 1;
    (void)::write(wake.get(), &one, sizeof one);
  }

  void Post(Done d) {
    {
      std::lock_guard lock(mu);
      done.push_back(std::move(d));
    }
    Wake();
  }

  // ---- the store ----

  // The instance (v1 VMI or v1alpha1 VirtualMachine) `ns`/`name` if its
  // uid is still `uid`.
  std::optional<json> GetInstance(const std::string& ns, const std::string& name, const std::string& uid) {
    for (std::string_view key : kInstanceResources) {
      auto vmi = store->Get(key, ns, name);
      if (vmi.ok() && (*vmi)["metadata"].value("uid", "") == uid) return std::move(*vmi);
    }
    return std::nullopt;
  }

  // Every instance of both generations, in all namespaces.
  Result<std::vector<json>> ListInstances() {
    std::vector<json> out;
    for (std::string_view key : kInstanceResources) {
      ASSIGN_OR_RETURN(state::ObjectList list, store->List(key, "", {}, true));
      for (auto& item : list.items) out.push_back(std::move(item));
    }
    return out;
  }

  // Changes the status of the VMI `uid` (if it still exists) with `edit`,
  // retrying on a conflict.
  void EditVmiStatus(const std::string& ns, const std::string& name, const std::string& uid,
                     const std::function<void(json& status)>& edit) {
    for (int attempt = 0; attempt < 5; ++attempt) {
      auto vmi = GetInstance(ns, name, uid);
      if (!vmi) return;
      json status = vmi->contains("status") && (*vmi)["status"].is_object() ? (*vmi)["status"] : json::object();
      json before = status;
      edit(status);
      if (status == before) return;
      (*vmi)["status"] = status;
      auto st = store->UpdateStatus(InstanceResourceOf(*vmi), *vmi);
      if (st.ok()) return;
      if (st.status().code() != Code::kAborted) {
        log::Warn("writing the status of VMI {}/{}: {}", ns, name, st.status().message());
        return;
      }
    }
  }

  static void SetPhase(json& status, c::VmiPhase phase, int64_t now) {
    const std::string name(c::PhaseName(phase));
    if (status.value("phase", "") == name) return;
    status["phase"] = name;
    json& stamps = status["phaseTransitionTimestamps"];
    if (!stamps.is_array()) stamps = json::array();
    stamps.push_back({{"phase", name}, {"phaseTransitionTimestamp", state::FormatTimestamp(now)}});
  }

  static void SetCondition(json& status, const std::string& type, bool value, const std::string& reason,
                           const std::string& message, int64_t now) {
    json& conds = status["conditions"];
    if (!conds.is_array()) conds = json::array();
    const std::string v = value ? "True" : "False";
    for (auto& cond : conds) {
      if (cond.value("type", "") != type) continue;
      if (cond.value("status", "") != v) cond["lastTransitionTime"] = state::FormatTimestamp(now);
      cond["status"] = v;
      if (reason.empty()) cond.erase("reason"); else cond["reason"] = reason;
      if (message.empty()) cond.erase("message"); else cond["message"] = message;
      return;
    }
    json cond = {{"type", type}, {"status", v}, {"lastProbeTime", nullptr},
                 {"lastTransitionTime", state::FormatTimestamp(now)}};
    if (!reason.empty()) cond["reason"] = reason;
    if (!message.empty()) cond["message"] = message;
    conds.push_back(std::move(cond));
  }

  void MarkFinal(const std::string& ns, const std::string& name, const std::string& uid, bool succeeded,
                 const std::string& reason) {
    const int64_t now = Now();
    auto vmi = GetInstance(ns, name, uid);
    if (!vmi) return;
    if (c::IsFinal(ObservedVmiFromJson(*vmi).phase)) return;
    log::Info("VMI {}/{} {}: {}", ns, name, succeeded ? "succeeded" : "failed", reason);
    metrics.CountExit(succeeded);
    {
      if (succeeded) {
        events->Normal(*vmi, "Succeeded", reason);
      } else {
        events->Warning(*vmi, "Failed", reason);
      }
    }
    EditVmiStatus(ns, name, uid, [&](json& status) {
      if (status.value("phase", "") == "Succeeded" || status.value("phase", "") == "Failed") return;
      SetPhase(status, succeeded ? c::VmiPhase::kSucceeded : c::VmiPhase::kFailed, now);
      SetCondition(status, "Ready", false, succeeded ? "GuestPoweredOff" : "Failed", reason, now);
      status["reason"] = succeeded ? "Succeeded" : "Failed";
      status["message"] = reason;
    });
  }

  // ---- starting and stopping VMs ----

  // The replica set that controls `vmi`, if any (and it still exists).
  std::optional<json> OwningReplicaSet(const json& vmi) {
    auto ref = ObservedVmiFromJson(vmi).controller_ref;
    if (!ref || (ref->kind != "VirtualMachineInstanceReplicaSet" && ref->kind != "VirtualMachineReplicaSet")) {
      return std::nullopt;
    }
    const std::string_view key = ref->kind == "VirtualMachineReplicaSet" ? kV1alpha1VmrsResource : kVmirsResource;
    auto rs = store->Get(key, vmi["metadata"].value("namespace", "default"), ref->name);
    if (!rs.ok() || (*rs)["metadata"].value("uid", "") != ref->uid) return std::nullopt;
    return std::move(*rs);
  }

  static json PinsOf(const json& owner) {
    const json& ann = owner["metadata"].contains("annotations") ? owner["metadata"]["annotations"] : json::object();
    if (!ann.is_object() || !ann.contains(kPinnedImagesAnnotation) || !ann[kPinnedImagesAnnotation].is_string()) {
      return json::object();
    }
    json pins = json::parse(ann[kPinnedImagesAnnotation].get<std::string>(), nullptr, false);
    return pins.is_object() ? pins : json::object();
  }

  static bool HasOurFinalizer(const json& vmi) {
    return HasFinalizer(vmi, c::kVmiFinalizer) || HasFinalizer(vmi, c::kLegacyVmiFinalizer);
  }

  // Puts controller::kVmiFinalizer on the VMI `uid` (retrying on a
  // conflict), so that its deletion waits for this node's cleanup. False
  // when the VMI is gone or being deleted: it must not start.
  bool AddVmiFinalizer(const std::string& ns, const std::string& name, const std::string& uid) {
    for (int attempt = 0; attempt < 5; ++attempt) {
      auto vmi = GetInstance(ns, name, uid);
      if (!vmi || (*vmi)["metadata"].contains("deletionTimestamp")) return false;
      if (HasFinalizer(*vmi, c::kVmiFinalizer) || HasFinalizer(*vmi, c::kLegacyVmiFinalizer)) return true;
      const std::string_view resource = InstanceResourceOf(*vmi);
      auto st = store->Update(resource, WithFinalizer(std::move(*vmi), c::kVmiFinalizer));
      if (st.ok()) return true;
      if (st.status().code() != Code::kAborted) {
        log::Warn("adding the finalizer to VMI {}/{}: {}", ns, name, st.status().message());
        return false;
      }
    }
    return false;
  }

  // The deletion of a VMI that nothing of this node runs or holds any more
  // (no QEMU, start or stop, no run directory): KubeVirt's finalizer comes
  // off, and the store removes the VMI unless other finalizers remain.
  // The same for a final VMI (KubeVirt lets those go once cleaned up).
  // Level-triggered: after a restart, a VMI that was being deleted when
  // the daemon died is finished here.
  void ReleaseFinalizers(const std::vector<json>& list) {
    for (const auto& v : list) {
      if (!HasFinalizer(v, c::kVmiFinalizer) && !HasFinalizer(v, c::kLegacyVmiFinalizer)) continue;
      const json& meta = v["metadata"];
      const std::string uid = meta.value("uid", ""), ns = meta.value("namespace", "default"),
                        name = meta.value("name", "");
      const bool deleting = meta.contains("deletionTimestamp");
      if (!deleting && !c::IsFinal(ObservedVmiFromJson(v).phase)) continue;
      if (instances.count(uid) || starts.count(uid) || stops.count(uid) || reserves.count(uid)) continue;
      const fs::path dir = InstanceDir(o.root, uid);
      std::error_code ec;
      if (fs::exists(dir, ec)) {
        // Left by a failed start or a killed daemon; nothing runs from it.
        fs::remove_all(dir, ec);
        if (ec) {
          log::Warn("removing {} of VMI {}/{}: {}", dir.string(), ns, name, ec.message());
          continue;
        }
      }
      auto st = store->Update(InstanceResourceOf(v),
                              WithoutFinalizer(WithoutFinalizer(v, c::kVmiFinalizer), c::kLegacyVmiFinalizer));
      if (!st.ok() && st.status().code() != Code::kAborted && st.status().code() != Code::kNotFound) {
        Warn(st.status(), "removing the finalizer of VMI " + name);
      } else if (st.ok() && deleting) {
        log::Info("VMI {}/{}: cleaned up, finalizer removed", ns, name);
      }
    }
  }

  void BeginStart(json vmi) {
    const json& meta = vmi["metadata"];
    const std::string ns = meta.value("namespace", "default"), name = meta.value("name", ""),
                      uid = meta.value("uid", "");
    if (!AddVmiFinalizer(ns, name, uid)) return;
    // A replica's images: the digests its set pinned (a tag that moved
    // since does not split the set).
    if (auto rs = OwningReplicaSet(vmi)) {
      json pins = PinsOf(*rs);
      json& spec = vmi["spec"];
      json empty = json::array();
      json& volumes = spec.is_object() && spec.contains("volumes") && spec["volumes"].is_array() ? spec["volumes"] : empty;
      for (auto& v : volumes) {
        if (!v.is_object()) continue;
        const char* source = v.contains("containerDisk") ? "containerDisk" : "registryDisk";
        if (!v.contains(source) || !v[source].is_object()) continue;
        json& disk = v[source];
        if (!disk.contains("image") || !disk["image"].is_string()) continue;
        const std::string image = disk["image"];
        if (image.find('@') == std::string::npos && pins.contains(image) && pins[image].is_string()) {
          disk["image"] = image + "@" + pins[image].get<std::string>();
          pinned[uid][disk["image"]] = image;
        }
      }
    }
    // The VMI and its namespace's Secrets, as one multi-document file.
    std::string text = UserView(vmi, {"apiVersion", "kind", "spec"}).dump();
    auto secrets = store->List(kSecretResource, ns);
    if (secrets.ok()) {
      for (const auto& s : secrets->items) text += "\n---\n" + UserView(s, {"apiVersion", "kind", "type", "data", "stringData"}).dump();
    }
    auto cancel = std::make_shared<CancelToken>();
    vm::PlanOptions plan = o.plan;
    plan.root = o.root;
    plan.cancel = cancel;
    const int64_t now = Now();
    EditVmiStatus(ns, name, uid, [&](json& status) {
      SetPhase(status, c::VmiPhase::kScheduling, now);
      status["nodeName"] = o.node_name;
    });
    log::Info("starting VMI {}/{}", ns, name);
    std::thread t([this, ns, name, uid, text = std::move(text), plan = std::move(plan)]() mutable {
      Done d{uid, false};
      d.started = RunStart(ns, name, uid, text, plan, d);
      Post(std::move(d));
    });
    starts[uid] = Start{cancel, std::move(t)};
  }

  // In a start thread: parse, pull and plan, then QEMU.
  Result<std::unique_ptr<Instance>> RunStart(const std::string& ns, const std::string& name, const std::string& uid,
                                             const std::string& text, vm::PlanOptions plan_options, Done& stats) {
    spec::ParseResult parsed = spec::ParseSpecs(text, "VMI " + ns + "/" + name);
    if (!parsed.ok()) {
      std::string why;
      for (const auto& d : parsed.diagnostics) {
        if (d.severity == spec::Diagnostic::Severity::kError) why += (why.empty() ? "" : "; ") + d.ToString();
      }
      return InvalidArgument(why);
    }
    const spec::VirtualMachine* vm = nullptr;
    std::vector<spec::Secret> secrets;
    for (const auto& obj : parsed.objects) {
      if (const auto* v = std::get_if<spec::VirtualMachine>(&obj)) vm = v;
      if (const auto* s = std::get_if<spec::Secret>(&obj)) secrets.push_back(*s);
    }
    if (vm == nullptr) return InvalidArgument("not a VirtualMachineInstance");
    const fs::path dir = InstanceDir(o.root, uid);
    // Bytes fetched: per blob, what it ended at minus what the store
    // already held when it started (a resumed download).
    std::map<std::string, uint64_t> held;
    plan_options.on_progress = [&](const image::ProgressEvent& e) {
      using K = image::ProgressEvent::Kind;
      if (e.kind == K::kStart) held[e.blob.str()] = e.done;
      if (e.kind == K::kDone) stats.pulled_bytes += e.total - std::min(e.total, held[e.blob.str()]);
    };
    const auto t0 = Clock::now();
    auto planned = vm::PlanVm(*vm, secrets, plan_options, dir);
    stats.plan_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    metrics.CountPull(planned.ok(), stats.pulled_bytes, stats.plan_seconds);
    if (!planned.ok()) return std::move(planned).status();
    vm::VmPlan plan = std::move(*planned);
    const int64_t now = Now();
    EditVmiStatus(ns, name, uid, [&](json& status) { SetPhase(status, c::VmiPhase::kScheduled, now); });
    RETURN_IF_ERROR(plan_options.cancel->status());
    return Instance::Launch(std::move(plan), {uid, now});
  }

  // Running, Ready, with its address: once QEMU runs (also for a QEMU a
  // killed daemon started but never reported).
  void MarkRunning(const InstanceRecord& r) {
    const int64_t now = Now();
    // Published ports: an annotation, as KubeVirt's interface status has
    // no field for them (api/resources.h).
    if (!r.ports.empty()) {
      json ports = json::array();
      for (const auto& p : r.ports) {
        ports.push_back({{"name", p.name}, {"protocol", p.protocol}, {"port", p.guest_port}, {"hostIP", p.host_ip},
                         {"hostPort", p.host_port}});
      }
      EditVmi(r.namespace_, r.name, r.uid, [&](json& vmi) {
        vmi["metadata"]["annotations"][api::kPublishedPortsAnnotation] = ports.dump();
      });
    }
    EditVmiStatus(r.namespace_, r.name, r.uid, [&](json& status) {
      SetPhase(status, c::VmiPhase::kRunning, now);
      SetCondition(status, "Ready", true, "", "", now);
      status["nodeName"] = o.node_name;
      json ifaces = json::array();
      if (!r.ip.empty()) ifaces.push_back({{"name", "default"}, {"ipAddress", r.ip}, {"ipAddresses", {r.ip}}});
      status["interfaces"] = ifaces;
      status.erase("reason");
      status.erase("message");
    });
  }

  void FinishStart(Done& d) {
    auto it = starts.find(d.uid);
    if (it == starts.end()) return;
    it->second.thread.join();
    const bool cancelled = it->second.cancel->cancelled();
    starts.erase(it);
    auto vmi = FindVmiByUid(d.uid);
    if (d.started.ok()) {
      std::unique_ptr<Instance> inst = std::move(*d.started);
      backoffs.erase(d.uid);
      // The launch beat the cancel of a VMI deleted meanwhile: it stops at
      // once, and is never marked Running, announced or pinned.
      if (vmi && (*vmi)["metadata"].contains("deletionTimestamp")) {
        pinned.erase(d.uid);
        BeginStop(std::move(inst), "its VMI is being deleted");
        return;
      }
      const InstanceRecord& r = inst->record();
      // Digests, events and counters first: whoever sees Running sees them.
      RecordImages(*inst);
      if (vmi) {
        if (d.pulled_bytes > 0) {
          events->Normal(*vmi, "Pulled", fmt::format("Pulled {} in {:.1f} s ({:.1f} MiB fetched)", ImagesOf(*inst),
                                                     d.plan_seconds, d.pulled_bytes / 1048576.0));
        }
        events->Normal(*vmi, "Started", fmt::format("VirtualMachineInstance started (QEMU pid {})", r.pid));
      }
      metrics.Count(&Metrics::starts);
      MarkRunning(r);
      instances[d.uid] = std::move(inst);
      return;
    }
    pinned.erase(d.uid);
    const Status& st = d.started.status();
    if (cancelled || st.code() == Code::kCancelled || !vmi) {
      std::error_code ec;
      fs::remove_all(InstanceDir(o.root, d.uid), ec);
      return;
    }
    const json& meta = (*vmi)["metadata"];
    const std::string ns = meta.value("namespace", "default"), name = meta.value("name", "");
    if (MayPass(st)) {
      Backoff& b = backoffs[d.uid];
      b.delay = b.delay.count() == 0 ? o.pull_backoff : std::min(b.delay * 2, o.pull_backoff_max);
      b.next = Clock::now() + b.delay;
      log::Warn("VMI {}/{}: {} (retrying in {} s)", ns, name, st.message(), b.delay.count() / 1000.0);
      events->Warning(*vmi, "ErrImagePull", st.message());
      const int64_t now = Now();
      EditVmiStatus(ns, name, d.uid, [&](json& status) {
        SetCondition(status, "Ready", false, "ErrImagePull", st.message(), now);
      });
      return;
    }
    events->Warning(*vmi, "FailedCreate", st.message());
    MarkFinal(ns, name, d.uid, false, st.message());
  }

  static std::string ImagesOf(const Instance& inst) {
    std::string out;
    for (const auto& [image, digest] : inst.record().images) out += (out.empty() ? "" : ", ") + image;
    return out.empty() ? "the VM's images" : out;
  }

  // The digests a started VMI runs, on the VMI, and as its replica set's
  // pins for the images that have none yet.
  void RecordImages(const Instance& inst) {
    const InstanceRecord& r = inst.record();
    std::map<std::string, std::string> images;  // as the spec names them
    const auto& renamed = pinned[r.uid];
    for (const auto& [image, digest] : r.images) {
      auto it = renamed.find(image);
      images[it == renamed.end() ? image : it->second] = digest;
    }
    pinned.erase(r.uid);
    if (images.empty()) return;
    EditVmi(r.namespace_, r.name, r.uid, [&](json& vmi) {
      vmi["metadata"]["annotations"][kImageDigestsAnnotation] = json(images).dump();
    });
    auto vmi = GetInstance(r.namespace_, r.name, r.uid);
    if (!vmi) return;
    auto rs = OwningReplicaSet(*vmi);
    if (!rs) return;
    json pins = PinsOf(*rs);
    bool added = false;
    for (const auto& [image, digest] : images) {
      if (image.find('@') != std::string::npos || pins.contains(image)) continue;
      pins[image] = digest;
      added = true;
      log::Info("replica set {}/{}: {} pinned to {}", r.namespace_, (*rs)["metadata"].value("name", ""), image, digest);
    }
    if (!added) return;
    EditOwner(ReplicaSetResourceOf(*rs), *rs, [&](json& obj) {
      json current = PinsOf(obj);
      for (const auto& [image, digest] : pins.items()) {
        if (!current.contains(image)) current[image] = digest;
      }
      obj["metadata"]["annotations"][kPinnedImagesAnnotation] = current.dump();
    }, false);
  }

  void BeginStop(std::unique_ptr<Instance> inst, const std::string& why) {
    const std::string uid = inst->record().uid;
    log::Info("stopping VMI {}/{} ({})", inst->record().namespace_, inst->record().name, why);
    std::thread t([this, uid, inst = std::move(inst)]() mutable {
      inst->Stop(o.grace, quit.get());
      inst->Remove();
      Post(Done{uid, true, Internal("stopped")});
    });
    stops[uid] = std::move(t);
  }

  std::optional<json> FindVmiByUid(const std::string& uid) {
    auto list = ListInstances();
    if (!list.ok()) return std::nullopt;
    for (auto& v : *list) {
      if (v["metadata"].value("uid", "") == uid) return std::move(v);
    }
    return std::nullopt;
  }

  // ---- one pass ----

  void Pass() {
    std::deque<Done> finished;
    {
      std::lock_guard lock(mu);
      finished.swap(done);
    }
    for (auto& d : finished) {
      if (d.is_reserve) {
        if (auto it = reserves.find(d.uid); it != reserves.end()) {
          it->second.join();
          reserves.erase(it);
        }
        if (auto it = instances.find(d.uid); it != instances.end()) it->second->HoldLazy(std::move(d.lazy));
      } else if (d.is_stop) {
        auto it = stops.find(d.uid);
        if (it != stops.end()) {
          it->second.join();
          stops.erase(it);
        }
      } else {
        FinishStart(d);
      }
    }
    // Lazy pulls whose disk is committed (or that failed) and that no VM
    // reads from any more: their exports stop.
    lazy_pool.Sweep();

    // The garbage collector: dependents whose owners are all gone (a VMI
    // created from a replica set read before the set's DELETE, say), and
    // foreground deletions no blocking dependent holds any more.
    if (auto gc = store->CollectGarbage(); !gc.ok()) log::Warn("collecting garbage: {}", gc.status().message());

    auto list = ListInstances();
    if (!list.ok()) {
      log::Warn("listing VMIs: {}", list.status().message());
      return;
    }
    std::map<std::string, const json*> by_uid;
    for (const auto& v : *list) by_uid[v["metadata"].value("uid", "")] = &v;

    std::set<std::string> ended;  // in this pass: `list` still shows them as they were
    for (auto it = instances.begin(); it != instances.end();) {
      Instance& inst = *it->second;
      const InstanceRecord& r = inst.record();
      if (auto exit = inst.Poll()) {
        MarkFinal(r.namespace_, r.name, r.uid, exit->succeeded, exit->reason);
        ended.insert(r.uid);
        inst.Remove();
        it = instances.erase(it);
        continue;
      }
      auto vmi = by_uid.find(it->first);
      if (vmi == by_uid.end() || (*vmi->second)["metadata"].contains("deletionTimestamp")) {
        auto owned = std::move(it->second);
        it = instances.erase(it);
        BeginStop(std::move(owned), vmi == by_uid.end() ? "its VMI was deleted" : "its VMI is being deleted");
        continue;
      }
      const c::VmiPhase phase = ObservedVmiFromJson(*vmi->second).phase;
      if (c::IsFinal(phase)) {  // a final VMI never runs again
        auto owned = std::move(it->second);
        it = instances.erase(it);
        BeginStop(std::move(owned), "its VMI is " + std::string(c::PhaseName(phase)));
        continue;
      }
      // A write (a PUT of the original manifest) may have dropped it.
      if (!HasOurFinalizer(*vmi->second)) AddVmiFinalizer(r.namespace_, r.name, r.uid);
      // An adopted QEMU whose start the previous daemon did not report.
      if (phase != c::VmiPhase::kRunning) MarkRunning(r);
      ++it;
    }
    for (auto& [uid, start] : starts) {
      auto vmi = by_uid.find(uid);
      if (vmi == by_uid.end() || (*vmi->second)["metadata"].contains("deletionTimestamp")) {
        start.cancel->Cancel("the VMI was deleted");
      } else if (!HasOurFinalizer(*vmi->second) && !c::IsFinal(ObservedVmiFromJson(*vmi->second).phase)) {
        const json& meta = (*vmi->second)["metadata"];
        AddVmiFinalizer(meta.value("namespace", "default"), meta.value("name", ""), uid);
      }
    }
    for (const auto& v : *list) {
      const json& meta = v["metadata"];
      const std::string uid = meta.value("uid", "");
      if (instances.count(uid) || starts.count(uid) || stops.count(uid) || ended.count(uid) ||
          meta.contains("deletionTimestamp")) {
        continue;
      }
      c::ObservedVmi observed = ObservedVmiFromJson(v);
      if (c::IsFinal(observed.phase)) continue;
      if (observed.phase == c::VmiPhase::kRunning) {
        MarkFinal(observed.namespace_, observed.name, uid, false, "its QEMU is gone (it ended while no daemon watched it)");
        continue;
      }
      auto b = backoffs.find(uid);
      if (b != backoffs.end() && Clock::now() < b->second.next) continue;
      BeginStart(v);
    }
    for (auto b = backoffs.begin(); b != backoffs.end();) {
      b = by_uid.count(b->first) ? std::next(b) : backoffs.erase(b);
    }
    ReleaseFinalizers(*list);

    if (Clock::now() >= next_prune) {
      events->Prune();
      next_prune = Clock::now() + 60s;
    }

    // Each generation's replica sets see only their own generation's instances.
    std::vector<c::ObservedVmi> v1, v1alpha1;
    for (const auto& v : *list) (IsV1alpha1(v) ? v1alpha1 : v1).push_back(ObservedVmiFromJson(v));
    ReconcileReplicaSets(kVmirsResource, v1);
    ReconcileReplicaSets(kV1alpha1VmrsResource, v1alpha1);
    ReconcileVms(v1);
  }

  void ReconcileReplicaSets(std::string_view resource, const std::vector<c::ObservedVmi>& vmis) {
    auto sets = store->List(resource, "", {}, true);
    if (!sets.ok()) return;
    for (const auto& rs_json : sets->items) {
      auto rs = ReplicaSetFromJson(rs_json, Now());
      if (!rs.ok()) {
        log::Warn("{}", rs.status().message());
        continue;
      }
      std::vector<c::ObservedVmi> in_ns;
      for (const auto& v : vmis) {
        if (v.namespace_ == rs->namespace_) in_ns.push_back(v);
      }
      for (const auto& action : c::ReconcileReplicaSet(*rs, in_ns, names)) {
        std::visit([&](const auto& a) { Apply(rs_json, a, true); }, action);
      }
    }
  }

  void ReconcileVms(const std::vector<c::ObservedVmi>& vmis) {
    auto list = store->List(kVmResource, "", {}, true);
    if (!list.ok()) return;
    for (const auto& vm_json : list->items) {
      auto vm = VmFromJson(vm_json);
      if (!vm.ok()) {
        log::Warn("{}", vm.status().message());
        continue;
      }
      std::optional<c::ObservedVmi> vmi;
      for (const auto& v : vmis) {
        if (v.namespace_ == vm->namespace_ && v.name == vm->name) vmi = v;
      }
      for (const auto& action : c::ReconcileVm(*vm, vmi)) {
        std::visit([&](const auto& a) { Apply(vm_json, a, false); }, action);
      }
    }
  }

  // ---- the controllers' actions, as store writes ----

  void Warn(const Status& st, std::string_view what) {
    if (!st.ok()) log::Warn("{}: {}", what, st.message());
  }

  void Apply(const json& owner, const c::CreateVmi& a, bool) {
    auto st = store->Create(IsV1alpha1(owner) ? kV1alpha1VmResource : kVmiResource, VmiFromTemplate(owner, a));
    if (!st.ok()) {
      Warn(st.status(), "creating VMI " + a.name);
      events->Warning(owner, "FailedCreate", "creating VirtualMachineInstance " + a.name + ": " + st.status().message());
      return;
    }
    events->Normal(owner, "SuccessfulCreate", "Created VirtualMachineInstance " + a.name);
  }
  void Apply(const json& owner, const c::DeleteVmi& a, bool) {
    state::Preconditions pre;
    pre.uid = a.uid;
    log::Info("deleting VMI {}/{} ({})", a.namespace_, a.name, c::DeleteReasonName(a.reason));
    auto st = store->Delete(IsV1alpha1(owner) ? kV1alpha1VmResource : kVmiResource, a.namespace_, a.name, pre);
    if (!st.ok() && st.status().code() != Code::kNotFound) Warn(st.status(), "deleting VMI " + a.name);
    if (st.ok()) {
      events->Normal(owner, "SuccessfulDelete", fmt::format("Deleted VirtualMachineInstance {} ({})", a.name,
                                                            c::DeleteReasonName(a.reason)));
    }
  }
  void Apply(const json&, const c::AdoptVmi& a, bool) {
    EditVmi(a.namespace_, a.name, a.uid, [&](json& vmi) {
      json& refs = vmi["metadata"]["ownerReferences"];
      if (!refs.is_array()) refs = json::array();
      refs.push_back(OwnerReferenceJson(a.owner));
    });
  }
  void Apply(const json&, const c::ReleaseVmi& a, bool) {
    EditVmi(a.namespace_, a.name, a.uid, [&](json& vmi) {
      json& refs = vmi["metadata"]["ownerReferences"];
      if (!refs.is_array()) return;
      json kept = json::array();
      for (const auto& r : refs) {
        if (!r.value("controller", false)) kept.push_back(r);
      }
      refs = kept;
    });
  }
  void Apply(const json& owner, const c::UpdateReplicaSetStatus& a, bool) {
    EditOwner(ReplicaSetResourceOf(owner), owner, [&](json& rs) { rs["status"] = ReplicaSetStatusJson(a.status, rs.value("status", json())); }, true);
  }
  void Apply(const json& owner, const c::UpdateVmStatus& a, bool) {
    EditOwner(kVmResource, owner, [&](json& vm) { vm["status"] = VmStatusJson(a.status, vm.value("status", json())); }, true);
  }
  void Apply(const json& owner, const c::AddStateChangeRequest& a, bool) {
    EditOwner(kVmResource, owner, [&](json& vm) {
      json& reqs = vm["status"]["stateChangeRequests"];
      if (!reqs.is_array()) reqs = json::array();
      json r = {{"action", a.request.action == c::StateChangeRequest::Action::kStop ? "Stop" : "Start"}};
      if (!a.request.uid.empty()) r["data"] = {{"uid", a.request.uid}};
      reqs.push_back(r);
    }, true);
  }
  void Apply(const json& owner, const c::RemoveFirstStateChangeRequest&, bool) {
    EditOwner(kVmResource, owner, [&](json& vm) {
      json& reqs = vm["status"]["stateChangeRequests"];
      if (reqs.is_array() && !reqs.empty()) reqs.erase(reqs.begin());
      if (reqs.is_array() && reqs.empty()) vm["status"].erase("stateChangeRequests");
    }, true);
  }
  void Apply(const json& owner, const c::AddVmFinalizer&, bool) {
    EditOwner(kVmResource, owner, [](json& vm) { vm = WithFinalizer(std::move(vm), c::kVmControllerFinalizer); }, false);
  }
  void Apply(const json& owner, const c::RemoveVmFinalizer&, bool) {
    log::Info("VM {}/{}: its VMI is gone, finalizer removed", owner["metadata"].value("namespace", "default"),
              owner["metadata"].value("name", ""));
    EditOwner(kVmResource, owner, [](json& vm) { vm = WithoutFinalizer(std::move(vm), c::kVmControllerFinalizer); }, false);
  }
  void Apply(const json& owner, const c::SetRunStrategy& a, bool) {
    EditOwner(kVmResource, owner, [&](json& vm) {
      vm["spec"].erase("running");
      vm["spec"]["runStrategy"] = std::string(c::RunStrategyName(a.run_strategy));
    }, false);
  }

  void EditVmi(const std::string& ns, const std::string& name, const std::string& uid,
               const std::function<void(json&)>& edit) {
    auto vmi = GetInstance(ns, name, uid);
    if (!vmi) return;
    edit(*vmi);
    Warn(store->Update(InstanceResourceOf(*vmi), *vmi).status(), "updating VMI " + name);
  }

  // The owner as stored now (the action was computed from `owner`; a newer
  // version is left for the next pass).
  void EditOwner(std::string_view resource, const json& owner, const std::function<void(json&)>& edit, bool status) {
    const json& meta = owner["metadata"];
    auto current = store->Get(resource, meta.value("namespace", "default"), meta.value("name", ""));
    if (!current.ok() || (*current)["metadata"].value("uid", "") != meta.value("uid", "")) return;
    edit(*current);
    auto st = status ? store->UpdateStatus(resource, *current) : store->Update(resource, *current);
    if (!st.ok() && st.status().code() != Code::kAborted) Warn(st.status(), "updating " + meta.value("name", ""));
  }

  // ---- the loop ----

  Status OpenWatches() {
    watches.clear();
    for (std::string_view r : {kVmiResource, kVmResource, kVmirsResource, kV1alpha1VmResource, kV1alpha1VmrsResource}) {
      ASSIGN_OR_RETURN(int64_t rv, store->CurrentResourceVersion());
      ASSIGN_OR_RETURN(auto w, store->Watch(r, "", {}, rv, true));
      watches.push_back(std::move(w));
    }
    return OkStatus();
  }

  void Run() {
    while (!quit->cancelled()) {
      Pass();
      std::vector<pollfd> fds;
      fds.push_back({quit->poll_fd(), POLLIN, 0});
      fds.push_back({wake.get(), POLLIN, 0});
      for (const auto& w : watches) fds.push_back({w->poll_fd(), POLLIN, 0});
      for (const auto& [uid, inst] : instances) fds.push_back({inst->exit_fd(), POLLIN, 0});
      int timeout = static_cast<int>(o.resync.count());
      if (!backoffs.empty()) {
        auto soonest = std::min_element(backoffs.begin(), backoffs.end(), [](const auto& a, const auto& b) {
                         return a.second.next < b.second.next;
                       })->second.next;
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(soonest - Clock::now()).count();
        timeout = static_cast<int>(std::clamp<int64_t>(left + 1, 0, timeout));
      }
      ::poll(fds.data(), fds.size(), timeout);
      uint64_t n;
      if (fds[1].revents) (void)::read(wake.get(), &n, sizeof n);
      bool reopen = false;
      for (const auto& w : watches) {
        for (;;) {
          auto ev = w->TryNext();
          if (!ev.ok()) {
            reopen = true;  // fell behind, or ended: a full pass covers what was missed
            break;
          }
          if (!ev->has_value()) break;
        }
      }
      if (reopen) {
        auto st = OpenWatches();
        if (!st.ok()) log::Warn("watching the store: {}", st.message());
      }
    }
  }

  // In a thread of its own: serves an adopted VM's lazily-pulled disks
  // again (the fill resumes from its bitmap, and the export's running
  // nbdkit is taken over), and hands the pulls to the VM.
  void ReServe(const std::string& uid, const std::vector<std::string>& images) {
    Done d;
    d.uid = uid;
    d.is_reserve = true;
    for (const std::string& key : images) {
      Result<std::shared_ptr<blockserve::LazyPull>> pull =
          lazy_pool.Acquire(key + "@" + o.plan.platform.String(), [&]() -> Result<std::unique_ptr<blockserve::LazyPull>> {
            ASSIGN_OR_RETURN(image::ImageName name, image::ImageName::Parse(key));
            ASSIGN_OR_RETURN(std::unique_ptr<image::ImageSource> source, image::OpenSource(name, o.plan.client));
            store::PullOptions po;
            po.platform = o.plan.platform;
            po.limits = o.plan.disk_limits;
            ASSIGN_OR_RETURN(store::Store st, store::Store::Open(o.root));
            return blockserve::LazyPull::Start(st, std::move(source), key, po, o.plan.lazy_options);
          });
      Status st = pull.ok() ? (*pull)->Ready(quit.get()).status() : pull.status();
      if (!st.ok()) {
        log::Warn("serving {} again for VMI {}: {}", Printable(key), uid, st.message());
        continue;
      }
      d.lazy.push_back(std::move(*pull));
    }
    Post(std::move(d));
  }

  void Adopt() {
    for (const auto& dir : ListInstanceDirs(o.root)) {
      auto inst = Instance::Adopt(dir);
      if (!inst.ok()) {
        log::Info("removing {}: {}", dir.string(), inst.status().message());
        std::error_code ec;
        fs::remove_all(dir, ec);
        continue;
      }
      const InstanceRecord& r = (*inst)->record();
      log::Info("adopted VMI {}/{} (QEMU pid {})", r.namespace_, r.name, r.pid);
      if (!r.lazy_images.empty()) {
        reserves[r.uid] = std::thread([this, uid = r.uid, images = r.lazy_images] { ReServe(uid, images); });
      }
      instances[r.uid] = std::move(*inst);
    }
  }

  void Shutdown() {
    quit->Cancel("the daemon is stopping");
    if (loop.joinable()) loop.join();
    for (auto& [uid, s] : starts) s.cancel->Cancel("the daemon is stopping");
    for (auto& [uid, s] : starts) s.thread.join();
    for (auto& [uid, t] : stops) t.join();
    for (auto& [uid, t] : reserves) t.join();
    starts.clear();
    stops.clear();
    reserves.clear();
    // A QEMU a start launched meanwhile keeps running, and the next daemon
    // adopts it: the export it reads from stays up too, so it is kept
    // while its holders (in `done`) still count.
    lazy_pool.KeepExports();
    std::lock_guard lock(mu);
    done.clear();
  }
};

Result<std::unique_ptr<Node>> Node::Start(NodeOptions options) {
  if (options.store == nullptr) return InvalidArgument("Node::Start needs an object store");
  auto impl = std::make_unique<Impl>();
  impl->o = std::move(options);
  impl->store = impl->o.store;
  if (impl->o.node_name.empty()) impl->o.node_name = Hostname();
  impl->names = c::RandomNameSource(impl->o.name_seed ? impl->o.name_seed : RandomSeed());
  // QEMU outlives the daemon, so the exports its disks read from do too.
  impl->o.plan.lazy_pool = &impl->lazy_pool;
  impl->o.plan.lazy_options.export_options.outlive_owner = true;
  impl->wake = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!impl->wake.valid()) return ErrnoStatus("creating an eventfd");
  RETURN_IF_ERROR(MakeDirs(impl->o.root / "run"));
  Impl* self = impl.get();
  impl->events = std::make_unique<EventRecorder>(impl->store, impl->o.node_name, [self] { return self->Now(); });
  impl->Adopt();
  if (Status st = impl->OpenWatches(); !st.ok()) {
    impl->Shutdown();  // joins the threads Adopt started
    return st;
  }
  Impl* raw = impl.get();
  impl->loop = std::thread([raw] { raw->Run(); });
  return std::unique_ptr<Node>(new Node(std::move(impl)));
}

Node::Node(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Node::~Node() {
  impl_->Shutdown();
  // The VMs keep running, and so do the exports they read from.
  impl_->lazy_pool.KeepExports();
}

std::string Node::MetricsText() {
  std::map<std::string, int> phases;
  for (auto p : {c::VmiPhase::kPending, c::VmiPhase::kScheduling, c::VmiPhase::kScheduled, c::VmiPhase::kRunning,
                 c::VmiPhase::kSucceeded, c::VmiPhase::kFailed}) {
    phases[std::string(c::PhaseName(p))] = 0;
  }
  if (auto list = impl_->ListInstances(); list.ok()) {
    for (const auto& v : *list) {
      const json& status = v.contains("status") ? v["status"] : json::object();
      std::string phase = status.is_object() ? status.value("phase", "") : "";
      phases[phase.empty() ? "Pending" : phase]++;
    }
  }
  const blockserve::LazyPool::Stats lazy = impl_->lazy_pool.stats();  // before m.mu: no lock held across both
  auto& m = impl_->metrics;
  std::lock_guard lock(m.mu);
  std::string out;
  out += "# HELP regdisk_vmis VirtualMachineInstances in the store, by phase.\n# TYPE regdisk_vmis gauge\n";
  for (const auto& [phase, n] : phases) out += fmt::format("regdisk_vmis{{phase=\"{}\"}} {}\n", phase, n);
  out += "# HELP regdisk_pulls_total Disk pulls (with planning) for VMI starts, by result.\n"
         "# TYPE regdisk_pulls_total counter\n";
  for (const char* r : {"success", "error"}) {
    out += fmt::format("regdisk_pulls_total{{result=\"{}\"}} {}\n", r, m.pulls.count(r) ? m.pulls.at(r) : 0);
  }
  out += fmt::format("# HELP regdisk_pull_bytes_total Bytes fetched from registries for VMI starts.\n"
                     "# TYPE regdisk_pull_bytes_total counter\nregdisk_pull_bytes_total {}\n", m.pull_bytes);
  out += fmt::format("# HELP regdisk_pull_duration_seconds Time spent pulling and planning VMI starts.\n"
                     "# TYPE regdisk_pull_duration_seconds summary\nregdisk_pull_duration_seconds_sum {:.3f}\n"
                     "regdisk_pull_duration_seconds_count {}\n",
                     m.pull_seconds, (m.pulls.count("success") ? m.pulls.at("success") : 0) +
                                         (m.pulls.count("error") ? m.pulls.at("error") : 0));
  out += fmt::format("# HELP regdisk_vmi_starts_total QEMU processes started for VMIs.\n"
                     "# TYPE regdisk_vmi_starts_total counter\nregdisk_vmi_starts_total {}\n", m.starts);
  out += "# HELP regdisk_vmi_exits_total VMIs that ended, by result.\n# TYPE regdisk_vmi_exits_total counter\n";
  for (const char* r : {"succeeded", "failed"}) {
    out += fmt::format("regdisk_vmi_exits_total{{result=\"{}\"}} {}\n", r, m.exits.count(r) ? m.exits.at(r) : 0);
  }
  out += fmt::format("# HELP regdisk_lazy_exports Lazily-pulled disks served to VMs over NBD now.\n"
                     "# TYPE regdisk_lazy_exports gauge\nregdisk_lazy_exports {}\n", lazy.exports);
  out += fmt::format("# HELP regdisk_lazy_fills Lazy pulls still filling in the background.\n"
                     "# TYPE regdisk_lazy_fills gauge\nregdisk_lazy_fills {}\n", lazy.filling);
  out += fmt::format("# HELP regdisk_lazy_chunks Chunks of the disks still filling, by state.\n"
                     "# TYPE regdisk_lazy_chunks gauge\nregdisk_lazy_chunks{{state=\"present\"}} {}\n"
                     "regdisk_lazy_chunks{{state=\"missing\"}} {}\n", lazy.present, lazy.missing);
  out += fmt::format("# HELP regdisk_lazy_fetched_bytes Bytes the lazy pulls the node holds fetched from registries.\n"
                     "# TYPE regdisk_lazy_fetched_bytes gauge\nregdisk_lazy_fetched_bytes {}\n", lazy.fetched_bytes);
  return out;
}

void Node::StopAllVms() {
  impl_->Shutdown();
  std::vector<std::thread> stops;
  for (auto& [uid, inst] : impl_->instances) {
    Instance* raw = inst.get();
    stops.emplace_back([this, raw] {
      raw->Stop(impl_->o.grace);
      raw->Remove();
    });
  }
  for (auto& t : stops) t.join();
  impl_->instances.clear();
}

}  // namespace regdisk::daemon
