// The object store's keys for the resources the daemon reconciles. The
// API server (src/api) stores objects under the same keys; one key per
// kind, whatever version a client used.
#pragma once

namespace regdisk::daemon {

inline constexpr char kVmiResource[] = "kubevirt.io/v1/virtualmachineinstances";
inline constexpr char kVmResource[] = "kubevirt.io/v1/virtualmachines";
inline constexpr char kVmirsResource[] = "kubevirt.io/v1/virtualmachineinstancereplicasets";
inline constexpr char kSecretResource[] = "v1/secrets";

// Annotations regdisk writes on the objects it creates.
// On a VMI an owner made: the owner's metadata.generation at that time.
inline constexpr char kTemplateGenerationAnnotation[] = "regdisk.io/template-generation";

}  // namespace regdisk::daemon
