#include "controller/replicaset.h"

#include <algorithm>
#include <set>

namespace regdisk::controller {
namespace {

// A name that keeps failing to be free is given up for this reconcile; the
// next one tries again with fresh suffixes.
constexpr int kNameAttempts = 16;

enum class Ownership { kOurs, kAdoptable, kReleasable, kIgnored };

bool IsOurs(const ReplicaSetState& rs, const OwnerReference& ref) {
  return ref.controller && ref.kind == rs.kind && ref.name == rs.name && ref.uid == rs.uid;
}

// Kubernetes' ClaimObjects (controller_ref_manager.go), as KubeVirt's
// ClaimVirtualMachineInstances uses it: keep what we control and still
// select, release what we control and no longer select, adopt orphans we
// select (not while either side is being deleted), ignore what another
// controller owns.
Ownership Classify(const ReplicaSetState& rs, const ObservedVmi& vmi) {
  bool selected = SelectorMatches(rs.match_labels, vmi.labels);
  if (vmi.controller_ref && vmi.controller_ref->controller) {
    if (!IsOurs(rs, *vmi.controller_ref)) return Ownership::kIgnored;
    if (selected) return Ownership::kOurs;
    return rs.deletion_requested ? Ownership::kIgnored : Ownership::kReleasable;
  }
  if (selected && !rs.deletion_requested && !vmi.deletion_requested) return Ownership::kAdoptable;
  return Ownership::kIgnored;
}

// Scale-down preference, after Kubernetes' controller.ActivePods: VMIs that
// do not run yet go first (Pending/Scheduling/Scheduled, then Unknown, then
// Running), then those not ready, then the newest, then by name (greater
// first) so that the order is total.
int PhaseRank(VmiPhase phase) {
  switch (phase) {
    case VmiPhase::kPending:
    case VmiPhase::kScheduling:
    case VmiPhase::kScheduled:
      return 0;
    case VmiPhase::kUnknown:
      return 1;
    default:
      return 2;
  }
}

bool DeleteFirst(const ObservedVmi* a, const ObservedVmi* b) {
  if (PhaseRank(a->phase) != PhaseRank(b->phase)) return PhaseRank(a->phase) < PhaseRank(b->phase);
  if (a->ready != b->ready) return !a->ready;
  if (a->created != b->created) return a->created > b->created;
  return a->name > b->name;
}

struct Claimed {
  std::vector<const ObservedVmi*> active;    // ours, not final, not being deleted
  std::vector<const ObservedVmi*> finished;  // ours, final, not being deleted
};

Claimed Claim(const ReplicaSetState& rs, const std::vector<ObservedVmi>& vmis, std::vector<ReplicaSetAction>& out) {
  Claimed claimed;
  OwnerReference owner = OwnerRefFor(rs);
  for (const auto& vmi : vmis) {
    if (vmi.namespace_ != rs.namespace_) continue;
    switch (Classify(rs, vmi)) {
      case Ownership::kAdoptable:
        out.push_back(AdoptVmi{vmi.namespace_, vmi.name, vmi.uid, owner});
        break;
      case Ownership::kReleasable:
        out.push_back(ReleaseVmi{vmi.namespace_, vmi.name, vmi.uid});
        continue;
      case Ownership::kIgnored:
        continue;
      case Ownership::kOurs:
        break;
    }
    // A VMI being deleted is neither counted nor deleted again: its
    // replacement is created as soon as the deletion was requested.
    if (vmi.deletion_requested) continue;
    (IsFinal(vmi.phase) ? claimed.finished : claimed.active).push_back(&vmi);
  }
  return claimed;
}

void CreateMissing(const ReplicaSetState& rs, const std::vector<ObservedVmi>& vmis, int count, NameSource& names,
                   std::vector<ReplicaSetAction>& out) {
  std::set<std::string> taken;
  for (const auto& vmi : vmis) {
    if (vmi.namespace_ == rs.namespace_) taken.insert(vmi.name);
  }
  for (int i = 0; i < count; ++i) {
    std::string name;
    for (int attempt = 0; attempt < kNameAttempts && name.empty(); ++attempt) {
      std::string candidate = GeneratedName(rs.name, names.NextSuffix());
      if (!taken.contains(candidate)) name = std::move(candidate);
    }
    if (name.empty()) return;
    taken.insert(name);
    out.push_back(CreateVmi{rs.namespace_, name, rs.template_, rs.template_.labels, OwnerRefFor(rs)});
  }
}

void DeleteExcess(const ReplicaSetState& rs, std::vector<const ObservedVmi*> active, int count,
                  std::vector<ReplicaSetAction>& out) {
  std::sort(active.begin(), active.end(), DeleteFirst);
  for (int i = 0; i < count; ++i) {
    out.push_back(DeleteVmi{rs.namespace_, active[i]->name, active[i]->uid, DeleteReason::kScaleDown});
  }
}

void DeleteFinished(const ReplicaSetState& rs, std::vector<const ObservedVmi*> finished,
                    std::vector<ReplicaSetAction>& out) {
  std::sort(finished.begin(), finished.end(),
            [](const ObservedVmi* a, const ObservedVmi* b) { return a->name < b->name; });
  size_t count = std::min(finished.size(), static_cast<size_t>(std::max(rs.burst, 1)));
  for (size_t i = 0; i < count; ++i) {
    out.push_back(DeleteVmi{rs.namespace_, finished[i]->name, finished[i]->uid, DeleteReason::kFinished});
  }
}

void SetCondition(std::vector<Condition>& conditions, bool wanted, Condition condition) {
  auto it = std::find_if(conditions.begin(), conditions.end(),
                         [&](const Condition& c) { return c.type == condition.type; });
  if (!wanted) {
    if (it != conditions.end()) conditions.erase(it);
    return;
  }
  if (it == conditions.end()) {
    conditions.push_back(std::move(condition));
  } else if (it->reason != condition.reason || it->message != condition.message) {
    *it = std::move(condition);
  }
}

// KubeVirt's updateStatus/checkPaused/checkFailure: replicas counts the
// live VMIs (not final, not being deleted), readyReplicas those of them
// whose Ready condition is True.
ReplicaSetStatus ComputeStatus(const ReplicaSetState& rs, const Claimed& claimed) {
  ReplicaSetStatus status;
  status.replicas = static_cast<int>(claimed.active.size());
  status.ready_replicas = static_cast<int>(
      std::count_if(claimed.active.begin(), claimed.active.end(), [](const ObservedVmi* v) { return v->ready; }));
  status.label_selector = SelectorString(rs.match_labels);
  status.conditions = rs.status.conditions;
  SetCondition(status.conditions, rs.paused,
               Condition{kReplicaPaused, "True", "Paused", "Controller got paused", rs.now_seconds});
  bool short_of_replicas = status.replicas < rs.replicas;
  SetCondition(status.conditions, !rs.last_scale_error.empty(),
               Condition{kReplicaFailure, "True", short_of_replicas ? "FailedCreate" : "FailedDelete",
                         rs.last_scale_error, rs.now_seconds});
  return status;
}

}  // namespace

std::string_view DeleteReasonName(DeleteReason reason) {
  switch (reason) {
    case DeleteReason::kScaleDown:
      return "ScaleDown";
    case DeleteReason::kFinished:
      return "Finished";
    case DeleteReason::kStopped:
      return "Stopped";
    case DeleteReason::kRestart:
      return "Restart";
    case DeleteReason::kOwnerDeleted:
      return "OwnerDeleted";
  }
  return "Unknown";
}

OwnerReference OwnerRefFor(const ReplicaSetState& rs) {
  return OwnerReference{rs.api_version, rs.kind, rs.name, rs.uid, true, true};
}

std::vector<ReplicaSetAction> ReconcileReplicaSet(const ReplicaSetState& rs, const std::vector<ObservedVmi>& vmis,
                                                  NameSource& names) {
  std::vector<ReplicaSetAction> out;
  if (rs.match_labels.empty() || !SelectorMatches(rs.match_labels, rs.template_.labels)) return out;

  Claimed claimed = Claim(rs, vmis, out);
  if (!rs.paused && !rs.deletion_requested) {
    int burst = std::max(rs.burst, 1);
    int diff = static_cast<int>(claimed.active.size()) - std::max(rs.replicas, 0);
    if (diff > 0) DeleteExcess(rs, claimed.active, std::min(diff, burst), out);
    DeleteFinished(rs, claimed.finished, out);
    if (diff < 0) CreateMissing(rs, vmis, std::min(-diff, burst), names, out);
  }
  ReplicaSetStatus status = ComputeStatus(rs, claimed);
  if (status != rs.status) out.push_back(UpdateReplicaSetStatus{std::move(status)});
  return out;
}

}  // namespace regdisk::controller
