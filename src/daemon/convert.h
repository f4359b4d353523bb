// Between the object store's JSON (KubeVirt's shapes, as kubectl sends
// them) and the controllers' plain values (src/controller/types.h). Pure:
// no store, no clock.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>

#include "controller/replicaset.h"
#include "controller/types.h"
#include "controller/vm.h"
#include "util/status.h"

namespace regdisk::daemon {

using json = nlohmann::json;

// The store key of an instance (v1 VMI or v1alpha1 VirtualMachine) or a
// replica set (v1 VMIRS or v1alpha1 VMRS), from its apiVersion.
std::string_view InstanceResourceOf(const json& object);
std::string_view ReplicaSetResourceOf(const json& object);
bool IsV1alpha1(const json& object);

// "2026-11-28T11:52:22Z" -> Unix seconds; nullopt for anything else.
std::optional<int64_t> ParseTimestamp(const std::string& text);

controller::ObservedVmi ObservedVmiFromJson(const json& vmi);

// A VirtualMachineInstanceReplicaSet. InvalidArgument when the object
// cannot be reconciled (no template, a selector with matchExpressions).
Result<controller::ReplicaSetState> ReplicaSetFromJson(const json& rs, int64_t now_seconds);

// A kubevirt.io/v1 VirtualMachine.
Result<controller::VmState> VmFromJson(const json& vm);

json OwnerReferenceJson(const controller::OwnerReference& ref);

// metadata.finalizers of `object` holds `finalizer`.
bool HasFinalizer(const json& object, std::string_view finalizer);
// `object` with `finalizer` added to metadata.finalizers (once), or removed
// (an emptied list is dropped).
json WithFinalizer(json object, std::string_view finalizer);
json WithoutFinalizer(json object, std::string_view finalizer);

// The VMI a CreateVmi action asks for: the owner's spec.template (labels,
// annotations and spec as the owner holds them) under the action's name,
// namespace, labels and owner, with controller::kVmiFinalizer.
json VmiFromTemplate(const json& owner, const controller::CreateVmi& action);

// The owner's status with the controller's fields replaced (other fields
// the object carries are kept).
json ReplicaSetStatusJson(const controller::ReplicaSetStatus& status, json old_status);
json VmStatusJson(const controller::VmStatus& status, json old_status);

}  // namespace regdisk::daemon
