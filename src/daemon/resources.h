// The object store's keys for the resources the daemon reconciles. The
// API server (src/api) stores objects under the same keys; one key per
// kind, whatever version a client used.
#pragma once

namespace regdisk::daemon {

inline constexpr char kVmiResource[] = "kubevirt.io/v1/virtualmachineinstances";
inline constexpr char kVmResource[] = "kubevirt.io/v1/virtualmachines";
inline constexpr char kVmirsResource[] = "kubevirt.io/v1/virtualmachineinstancereplicasets";
inline constexpr char kSecretResource[] = "v1/secrets";
inline constexpr char kEventResource[] = "v1/events";

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
