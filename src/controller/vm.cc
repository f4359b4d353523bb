#include "controller/vm.h"

#include <string>

namespace regdisk::controller {
namespace {

using Action = StateChangeRequest::Action;

bool HasStartRequest(const VmState& vm) {
  return !vm.state_change_requests.empty() && vm.state_change_requests.front().action == Action::kStart;
}

// KubeVirt's hasStopRequestForVMI: the first request is a stop naming this
// VMI's uid (a stop for an older VMI does not stop its successor).
bool HasStopRequestFor(const VmState& vm, const ObservedVmi& vmi) {
  if (vm.state_change_requests.empty()) return false;
  const auto& first = vm.state_change_requests.front();
  return first.action == Action::kStop && first.uid == vmi.uid;
}

bool IsOurs(const VmState& vm, const OwnerReference& ref) {
  return ref.controller && ref.kind == vm.kind && ref.name == vm.name && ref.uid == vm.uid;
}

// What one reconcile decided, for the printable status.
struct Plan {
  std::vector<VmAction> actions;
  bool start_expected = false;  // a CreateVmi was emitted
  bool stop_expected = false;   // a DeleteVmi was emitted
};

void Start(const VmState& vm, Plan& plan) {
  plan.actions.push_back(CreateVmi{vm.namespace_, vm.name, vm.template_, vm.template_.labels, OwnerRefFor(vm)});
  plan.start_expected = true;
}

// KubeVirt's stopVMI does nothing to a VMI already being deleted.
void Stop(const VmState& vm, const ObservedVmi& vmi, DeleteReason reason, Plan& plan) {
  if (vmi.deletion_requested) return;
  plan.actions.push_back(DeleteVmi{vm.namespace_, vmi.name, vmi.uid, reason});
  plan.stop_expected = true;
}

// syncRunStrategy, one case per strategy.
void SyncRunStrategy(const VmState& vm, const ObservedVmi* vmi, Plan& plan) {
  switch (vm.run_strategy) {
    case RunStrategy::kAlways:
      // Keep one running: a finished VMI, or one a restart request names,
      // is deleted; the next reconcile finds none and creates it anew.
      if (vmi == nullptr) {
        Start(vm, plan);
      } else if (HasStopRequestFor(vm, *vmi) || IsFinal(vmi->phase)) {
        Stop(vm, *vmi, DeleteReason::kRestart, plan);
      }
      return;
    case RunStrategy::kRerunOnFailure:
      // Restart only after Failed: a Failed VMI is deleted and a start
      // request recorded; a Succeeded one (or a stop request) is deleted
      // without one, so it stays stopped.
      if (vmi != nullptr) {
        bool failed = vmi->phase == VmiPhase::kFailed;
        if (!vmi->deletion_requested &&
            (HasStopRequestFor(vm, *vmi) || failed || vmi->phase == VmiPhase::kSucceeded)) {
          Stop(vm, *vmi, failed ? DeleteReason::kRestart : DeleteReason::kStopped, plan);
          if (failed) plan.actions.push_back(AddStateChangeRequest{StateChangeRequest{Action::kStart, ""}});
        }
        return;
      }
      // No VMI: start when asked to, or when the VM just came to this
      // strategy (a new VM, or one switched from another strategy).
      if (HasStartRequest(vm) || vm.status.run_strategy != RunStrategy::kRerunOnFailure) Start(vm, plan);
      return;
    case RunStrategy::kManual:
      // Never on its own: only start and stop requests act.
      if (vmi != nullptr) {
        if (HasStopRequestFor(vm, *vmi)) Stop(vm, *vmi, DeleteReason::kStopped, plan);
      } else if (HasStartRequest(vm)) {
        Start(vm, plan);
      }
      return;
    case RunStrategy::kHalted:
      // No VMI under any circumstances; a start request turns the VM into
      // Always (virtctl start on a halted VM).
      if (vmi != nullptr) {
        Stop(vm, *vmi, DeleteReason::kStopped, plan);
      } else if (HasStartRequest(vm)) {
        plan.actions.push_back(SetRunStrategy{RunStrategy::kAlways});
      }
      return;
    case RunStrategy::kOnce:
      // Start when there is no VMI; a finished VMI stays (Succeeded or
      // Failed) and is not started again.
      if (vmi == nullptr) Start(vm, plan);
      return;
  }
}

// isTrimFirstChangeRequestNeeded: a stop is done once its VMI is gone (or
// replaced); a start once a VMI exists that is neither finished nor being
// deleted.
bool FirstRequestDone(const VmState& vm, const ObservedVmi* vmi) {
  if (vm.state_change_requests.empty()) return false;
  const auto& first = vm.state_change_requests.front();
  if (first.action == Action::kStop) return vmi == nullptr || first.uid != vmi->uid;
  return vmi != nullptr && !vmi->deletion_requested && !IsFinal(vmi->phase);
}

// setPrintableStatus: the first of these that holds wins. regdisk has no
// migrations, volumes to provision or image pull back-off on the VM yet,
// so those statuses never appear.
std::string PrintableStatus(const VmState& vm, const ObservedVmi* vmi, const Plan& plan) {
  if (vm.deletion_requested) return "Terminating";
  if (vmi != nullptr && !IsFinal(vmi->phase) && (vmi->deletion_requested || plan.stop_expected)) return "Stopping";
  if (vmi != nullptr && vmi->phase == VmiPhase::kRunning) return vmi->paused ? "Paused" : "Running";
  if (vmi == nullptr ? plan.start_expected
                     : (vmi->phase == VmiPhase::kPending || vmi->phase == VmiPhase::kScheduling ||
                        vmi->phase == VmiPhase::kScheduled)) {
    return "Starting";
  }
  if (vmi == nullptr ? !plan.start_expected : IsFinal(vmi->phase)) return "Stopped";
  return "Unknown";
}

}  // namespace

std::string_view RunStrategyName(RunStrategy strategy) {
  switch (strategy) {
    case RunStrategy::kAlways:
      return "Always";
    case RunStrategy::kRerunOnFailure:
      return "RerunOnFailure";
    case RunStrategy::kManual:
      return "Manual";
    case RunStrategy::kHalted:
      return "Halted";
    case RunStrategy::kOnce:
      return "Once";
  }
  return "Halted";
}

std::optional<RunStrategy> ParseRunStrategy(std::string_view name) {
  for (auto s : {RunStrategy::kAlways, RunStrategy::kRerunOnFailure, RunStrategy::kManual, RunStrategy::kHalted,
                 RunStrategy::kOnce}) {
    if (RunStrategyName(s) == name) return s;
  }
  return std::nullopt;
}

Result<RunStrategy> EffectiveRunStrategy(std::optional<bool> running, std::string_view run_strategy) {
  if (running && !run_strategy.empty()) {
    return InvalidArgument("spec.running and spec.runStrategy are both set; keep only spec.runStrategy");
  }
  if (running) return *running ? RunStrategy::kAlways : RunStrategy::kHalted;
  if (run_strategy.empty()) return RunStrategy::kHalted;
  if (auto parsed = ParseRunStrategy(run_strategy)) return *parsed;
  return InvalidArgument("spec.runStrategy \"" + std::string(run_strategy) +
                         "\" is unknown; use Always, RerunOnFailure, Manual, Halted or Once");
}

OwnerReference OwnerRefFor(const VmState& vm) {
  return OwnerReference{vm.api_version, vm.kind, vm.name, vm.uid, true, true};
}

std::vector<VmAction> ReconcileVm(const VmState& vm, const std::optional<ObservedVmi>& observed) {
  Plan plan;
  const ObservedVmi* vmi = observed ? &*observed : nullptr;
  VmStatus status;
  status.run_strategy = vm.status.run_strategy;
  if (!vm.deletion_requested && !vm.has_finalizer) plan.actions.push_back(AddVmFinalizer{});
  if (vmi != nullptr && vmi->controller_ref && vmi->controller_ref->controller && !IsOurs(vm, *vmi->controller_ref)) {
    status.printable_status = "Unknown";
    vmi = nullptr;  // not ours: it does not hold up the VM's deletion
  } else {
    if (vmi != nullptr && !(vmi->controller_ref && vmi->controller_ref->controller)) {
      // An orphan of the VM's name: KubeVirt's VM controller claims it
      // (unless it or the VM is being deleted, which leaves nothing to
      // claim: a VM deleted with propagationPolicy Orphan let it go).
      if (vmi->deletion_requested || vm.deletion_requested) {
        vmi = nullptr;
      } else {
        plan.actions.push_back(AdoptVmi{vm.namespace_, vmi->name, vmi->uid, OwnerRefFor(vm)});
      }
    }
    if (vm.deletion_requested) {
      if (vmi != nullptr) Stop(vm, *vmi, DeleteReason::kOwnerDeleted, plan);
    } else {
      SyncRunStrategy(vm, vmi, plan);
      status.run_strategy = vm.run_strategy;
    }
    if (FirstRequestDone(vm, vmi)) plan.actions.push_back(RemoveFirstStateChangeRequest{});
    status.printable_status = PrintableStatus(vm, vmi, plan);
    status.created = vmi != nullptr;
    status.ready = vmi != nullptr && vmi->ready && vmi->phase == VmiPhase::kRunning && !vmi->deletion_requested;
  }
  if (status != vm.status) plan.actions.push_back(UpdateVmStatus{std::move(status)});
  if (vm.deletion_requested && vm.has_finalizer && vmi == nullptr) plan.actions.push_back(RemoveVmFinalizer{});
  return std::move(plan.actions);
}

}  // namespace regdisk::controller
