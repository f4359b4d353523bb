// The VirtualMachine (kubevirt.io/v1) controller as one pure function: the
// VM and the VMI of the same name (if any) in, actions and the VM's status
// out. Level-triggered, no I/O, no clock, no threads.
//
//   VmState vm = ...;                     // from the store
//   std::optional<ObservedVmi> vmi = ...; // the VMI named vm.name, if any
//   for (const auto& action : ReconcileVm(vm, vmi)) ...;
//
// The run strategies follow KubeVirt's VM controller (syncRunStrategy and
// setPrintableStatus in pkg/virt-controller/watch/vm/vm.go) and the user
// guide's "Run Strategies" page; docs/architecture.md ("Controllers")
// lists the rules with their sources.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "controller/replicaset.h"
#include "controller/types.h"
#include "util/status.h"

namespace regdisk::controller {

enum class RunStrategy { kAlways, kRerunOnFailure, kManual, kHalted, kOnce };

std::string_view RunStrategyName(RunStrategy strategy);
std::optional<RunStrategy> ParseRunStrategy(std::string_view name);

// KubeVirt's VirtualMachine.RunStrategy(): spec.running true is Always,
// false is Halted; spec.runStrategy as given; neither is Halted. Both at
// once, or an unknown strategy, is an error naming the fix.
Result<RunStrategy> EffectiveRunStrategy(std::optional<bool> running, std::string_view run_strategy);

// status.stateChangeRequests[]: what `virtctl start/stop/restart` (the
// /start, /stop, /restart subresources) ask for. A stop names the VMI's uid.
struct StateChangeRequest {
  enum class Action { kStart, kStop };
  Action action = Action::kStart;
  std::string uid;  // kStop: the VMI to stop
  bool operator==(const StateChangeRequest&) const = default;
};

struct VmStatus {
  std::string printable_status;  // Stopped, Starting, Running, Paused, Stopping, Terminating, Unknown
  bool created = false;          // a VMI exists
  bool ready = false;            // it runs and its Ready condition is True
  std::optional<RunStrategy> run_strategy;  // status.runStrategy: the strategy last acted on
  bool operator==(const VmStatus&) const = default;
};

struct VmState {
  std::string api_version = "kubevirt.io/v1";
  std::string kind = "VirtualMachine";
  std::string namespace_ = "default";
  std::string name;
  std::string uid;
  RunStrategy run_strategy = RunStrategy::kHalted;
  VmiTemplate template_;
  bool deletion_requested = false;
  bool has_finalizer = false;  // metadata.finalizers holds kVmControllerFinalizer
  std::vector<StateChangeRequest> state_change_requests;  // only the first is acted on
  VmStatus status;  // as last written
};

// Append a state change request (RerunOnFailure asks for a start after it
// deleted a Failed VMI).
struct AddStateChangeRequest {
  StateChangeRequest request;
};
// Drop status.stateChangeRequests[0]: it has been carried out.
struct RemoveFirstStateChangeRequest {};
// Change spec.runStrategy (Halted with a start request becomes Always).
struct SetRunStrategy {
  RunStrategy run_strategy = RunStrategy::kAlways;
};
struct UpdateVmStatus {
  VmStatus status;
};
// Add kVmControllerFinalizer to the VM (a VM not being deleted lacks it).
struct AddVmFinalizer {};
// Remove kVmControllerFinalizer: the VM is being deleted and has no VMI
// of its own left (its deletion then completes unless other finalizers
// remain).
struct RemoveVmFinalizer {};

using VmAction = std::variant<AdoptVmi, DeleteVmi, CreateVmi, AddStateChangeRequest, RemoveFirstStateChangeRequest,
                              SetRunStrategy, UpdateVmStatus, AddVmFinalizer, RemoveVmFinalizer>;

OwnerReference OwnerRefFor(const VmState& vm);

// The VM's actions, in order: the finalizer added (a VM not being
// deleted), adoption, deletion or creation of its VMI,
// state change request bookkeeping, then the status (only when changed).
// `vmi` is the VMI named vm.name in vm.namespace_, whoever owns it; one
// that another controller owns blocks the VM (no actions; printableStatus
// Unknown). A VM being deleted adopts nothing, stops its VMI, and removes
// its finalizer (last) once no VMI of its own is left.
std::vector<VmAction> ReconcileVm(const VmState& vm, const std::optional<ObservedVmi>& vmi);

}  // namespace regdisk::controller
