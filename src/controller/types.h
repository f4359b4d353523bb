// The values the controllers read and write: what the store observed about
// a VirtualMachineInstance, and the owner reference that ties a VMI to the
// replica set or VirtualMachine that made it.
//
// These are plain values, deliberately independent of the object store
// (src/state) and of the API's JSON: the daemon converts its objects into
// them before a reconcile and turns the reconcile's actions back into store
// writes. Nothing here reads a clock or touches a file; a time is a number
// the caller passes in.
//
//   ObservedVmi vmi;
//   vmi.name = "web-b2x7k";
//   vmi.phase = VmiPhase::kRunning;
//   vmi.controller_ref = OwnerReference{"kubevirt.io/v1",
//       "VirtualMachineInstanceReplicaSet", "web", "uid-1"};
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>

#include "spec/spec.h"

namespace regdisk::controller {

using Labels = std::map<std::string, std::string>;

// KubeVirt's finalizers (staging/src/kubevirt.io/api/core/v1/types.go).
// On every VMI the node starts, removed once its QEMU and files are gone
// (the domain-qualified name KubeVirt uses since v1.7; older releases
// wrote "foregroundDeleteVirtualMachine").
inline constexpr char kVmiFinalizer[] = "kubevirt.io/foregroundDeleteVirtualMachine";
// The older name, on VMIs written by KubeVirt before v1.7 (an imported
// manifest, say): ours too, it is removed with kVmiFinalizer.
inline constexpr char kLegacyVmiFinalizer[] = "foregroundDeleteVirtualMachine";
// On every VirtualMachine, removed once the VM is being deleted and its
// VMI is gone.
inline constexpr char kVmControllerFinalizer[] = "kubevirt.io/virtualMachineControllerFinalize";

// The VMI phases of KubeVirt's VirtualMachineInstanceStatus.phase.
enum class VmiPhase { kPending, kScheduling, kScheduled, kRunning, kSucceeded, kFailed, kUnknown };

// "Pending", "Running", ... as KubeVirt spells the phase.
std::string_view PhaseName(VmiPhase phase);

// KubeVirt's VirtualMachineInstance.IsFinal(): Succeeded or Failed. A final
// VMI never runs again; its owner deletes it and, if it wants one running,
// creates a new one.
inline bool IsFinal(VmiPhase phase) { return phase == VmiPhase::kSucceeded || phase == VmiPhase::kFailed; }

// metadata.ownerReferences[] entry. The controllers only set and read the
// one with controller: true (Kubernetes allows at most one).
struct OwnerReference {
  std::string api_version;  // "kubevirt.io/v1"
  std::string kind;         // "VirtualMachineInstanceReplicaSet", "VirtualMachine"
  std::string name;
  std::string uid;
  bool controller = true;
  bool block_owner_deletion = true;
  bool operator==(const OwnerReference&) const = default;
};

// When a VMI was created: creationTimestamp in whole seconds (what the API
// shows), then a number the store increases with every object it creates,
// so two VMIs created in the same second still have an order. Larger is
// newer.
struct CreationStamp {
  int64_t seconds = 0;
  int64_t sequence = 0;
  auto operator<=>(const CreationStamp&) const = default;
};

// One VirtualMachineInstance as the store last saw it.
struct ObservedVmi {
  std::string namespace_ = "default";
  std::string name;
  std::string uid;
  Labels labels;
  // The owner reference with controller: true; nullopt for an orphan.
  std::optional<OwnerReference> controller_ref;
  VmiPhase phase = VmiPhase::kPending;
  bool ready = false;   // condition Ready is True (the guest runs and, with probes, passes them)
  bool paused = false;  // condition Paused is True
  CreationStamp created;
  bool deletion_requested = false;  // metadata.deletionTimestamp is set
  // The owner's template generation this VMI was made from (the replica
  // set's or VM's metadata.generation when it created it).
  int64_t template_generation = 0;
};

// What a CreateVmi action instantiates: the owner's spec.template.
struct VmiTemplate {
  Labels labels;
  std::map<std::string, std::string> annotations;
  spec::VmSpec spec;
  int64_t generation = 0;  // the owner's metadata.generation
};

// A status condition as Kubernetes writes it. last_transition_seconds is
// the caller's clock (passed in), kept unchanged while the condition holds.
struct Condition {
  std::string type;
  std::string status = "True";
  std::string reason;
  std::string message;
  int64_t last_transition_seconds = 0;
  bool operator==(const Condition&) const = default;
};

// True when every key=value of `selector` is among `labels` (matchLabels
// semantics). An empty selector matches everything; callers that must not
// accept one check for it first.
bool SelectorMatches(const Labels& selector, const Labels& labels);

// metav1.LabelSelectorAsSelector(...).String() for a matchLabels-only
// selector: "app=web,tier=front", requirements sorted by key.
std::string SelectorString(const Labels& selector);

}  // namespace regdisk::controller
