// The VirtualMachineInstanceReplicaSet controller as one pure function:
// the replica set and the VMIs of its namespace in, the actions that move
// the cluster toward `replicas` live VMIs out. Level-triggered: it looks
// only at the current state, so calling it again after the actions were
// applied (or lost) is always right. No I/O, no clock, no threads.
//
//   ReplicaSetState rs = ...;              // from the store
//   std::vector<ObservedVmi> vmis = ...;   // every VMI of rs.namespace_
//   RandomNameSource names(seed);
//   for (const auto& action : ReconcileReplicaSet(rs, vmis, names)) ...;
//
// The rules follow KubeVirt's replica set controller
// (pkg/virt-controller/watch/replicaset/replicaset.go) and the Kubernetes
// ReplicaSet it is modelled on; docs/architecture.md ("Controllers") lists
// them with their sources and the places where regdisk chose differently.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "controller/names.h"
#include "controller/types.h"

namespace regdisk::controller {

// KubeVirt's controller.BurstReplicas (pkg/controller/controller.go): at
// most this many creates, and this many deletes, per reconcile.
inline constexpr int kDefaultBurstReplicas = 250;

// Status condition types and reasons of a VirtualMachineInstanceReplicaSet.
inline constexpr char kReplicaPaused[] = "ReplicaPaused";
inline constexpr char kReplicaFailure[] = "ReplicaFailure";

struct ReplicaSetStatus {
  int replicas = 0;
  int ready_replicas = 0;
  std::string label_selector;
  std::vector<Condition> conditions;
  bool operator==(const ReplicaSetStatus&) const = default;
};

struct ReplicaSetState {
  std::string api_version = "kubevirt.io/v1";
  std::string kind = "VirtualMachineInstanceReplicaSet";
  std::string namespace_ = "default";
  std::string name;
  std::string uid;
  int replicas = 1;
  Labels match_labels;  // spec.selector.matchLabels
  VmiTemplate template_;
  bool paused = false;
  bool deletion_requested = false;
  int burst = kDefaultBurstReplicas;  // >= 1
  ReplicaSetStatus status;            // as last written
  // The error the daemon met applying the previous reconcile's creates or
  // deletes (empty: none); reported as condition ReplicaFailure.
  std::string last_scale_error;
  int64_t now_seconds = 0;  // the caller's clock, for new conditions
};

// Create a VMI `name` in `namespace_` from the template, labelled with the
// template's labels and owned (controller: true) by the replica set.
struct CreateVmi {
  std::string namespace_;
  std::string name;
  VmiTemplate template_;
  Labels labels;
  OwnerReference owner;
};

enum class DeleteReason {
  kScaleDown,  // more live VMIs than replicas
  kFinished,   // the VMI Succeeded or Failed; a new one replaces it
  kStopped,    // a VM's run strategy or a stop request ends it
  kRestart,    // a VM restarts it (Always: it finished; a restart request)
  kOwnerDeleted,
};
std::string_view DeleteReasonName(DeleteReason reason);

// Delete the VMI `name` if its uid is still `uid` (a precondition, so a
// newer VMI of the same name is never hit).
struct DeleteVmi {
  std::string namespace_;
  std::string name;
  std::string uid;
  DeleteReason reason = DeleteReason::kScaleDown;
};

// Set the VMI's controller owner reference to `owner` (it had none).
struct AdoptVmi {
  std::string namespace_;
  std::string name;
  std::string uid;
  OwnerReference owner;
};

// Remove the replica set's owner reference: the VMI no longer matches the
// selector.
struct ReleaseVmi {
  std::string namespace_;
  std::string name;
  std::string uid;
};

// Write the replica set's status (only emitted when it changed).
struct UpdateReplicaSetStatus {
  ReplicaSetStatus status;
};

using ReplicaSetAction = std::variant<AdoptVmi, ReleaseVmi, DeleteVmi, CreateVmi, UpdateReplicaSetStatus>;

// The owner reference the replica set puts on the VMIs it creates or adopts.
OwnerReference OwnerRefFor(const ReplicaSetState& rs);

// The replica set's actions, in the order to apply them: adoptions and
// releases, deletions, creations, then the status update.
//
// `vmis` is every VMI the store holds in rs.namespace_ (VMIs of other
// namespaces are ignored); their names are the ones a new VMI must not take.
// An invalid replica set (empty selector, or a selector the template's
// labels do not match; KubeVirt refuses to sync those) yields no actions.
std::vector<ReplicaSetAction> ReconcileReplicaSet(const ReplicaSetState& rs, const std::vector<ObservedVmi>& vmis,
                                                  NameSource& names);

}  // namespace regdisk::controller
