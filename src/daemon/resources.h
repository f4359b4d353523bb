// The object store's keys for the resources the daemon reconciles: the API
// server's (api/resources.h), under the daemon's names.
#pragma once

#include <string_view>

#include "api/resources.h"

namespace regdisk::daemon {

inline constexpr std::string_view kVmiResource = api::kVmiKey;
inline constexpr std::string_view kVmResource = api::kVmKey;
inline constexpr std::string_view kVmirsResource = api::kVmirsKey;
inline constexpr std::string_view kSecretResource = api::kSecretKey;
inline constexpr std::string_view kEventResource = api::kEventKey;
// The seed's kinds: a kubevirt.io/v1alpha1 VirtualMachine is what v1 calls
// a VirtualMachineInstance, and its VirtualMachineReplicaSet a
// VirtualMachineInstanceReplicaSet. The node runs both generations.
inline constexpr std::string_view kV1alpha1VmResource = api::kV1alpha1VmKey;
inline constexpr std::string_view kV1alpha1VmrsResource = api::kV1alpha1VmrsKey;
inline constexpr std::string_view kInstanceResources[] = {kVmiResource, kV1alpha1VmResource};
inline constexpr std::string_view kReplicaSetResources[] = {kVmirsResource, kV1alpha1VmrsResource};

// Annotations regdisk writes on the objects it creates.
// On a VMI an owner made: the owner's metadata.generation at that time.
inline constexpr char kTemplateGenerationAnnotation[] = "regdisk.io/template-generation";
// On a VMI: {"image as the spec names it": "sha256:..."}, the manifests
// its disks run.
inline constexpr char kImageDigestsAnnotation[] = "regdisk.io/image-digests";
// On a replica set: the same map, written when its first VMI with that
// image started; every later replica runs the pinned digest even if the
// tag has moved since, so all replicas run the same bytes. A template
// that names another image gets a pin of its own; removing the
// annotation re-resolves the tags.
inline constexpr char kPinnedImagesAnnotation[] = "regdisk.io/pinned-images";

}  // namespace regdisk::daemon
