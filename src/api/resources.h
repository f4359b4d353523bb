// The API's resource table: which Kubernetes resources regdisk serves, how
// discovery describes them, and the object-store key each one is kept
// under. The daemon's controllers read and write the same keys, so these
// constants are the contract between src/api and src/daemon.
//
//   const Resource* r = FindResource("kubevirt.io", "v1", "virtualmachineinstances");
//   store->List(r->store_key, "default");
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace regdisk::api {

// Object-store keys ("group/version/plural", see state/object_store.h).
inline constexpr std::string_view kVmiKey = "kubevirt.io/v1/virtualmachineinstances";
inline constexpr std::string_view kVmKey = "kubevirt.io/v1/virtualmachines";
inline constexpr std::string_view kVmirsKey = "kubevirt.io/v1/virtualmachineinstancereplicasets";
inline constexpr std::string_view kV1alpha1VmKey = "kubevirt.io/v1alpha1/virtualmachines";
inline constexpr std::string_view kV1alpha1VmrsKey = "kubevirt.io/v1alpha1/virtualmachinereplicasets";
inline constexpr std::string_view kSecretKey = "v1/secrets";
inline constexpr std::string_view kNamespaceKey = "v1/namespaces";  // cluster-scoped: namespace ""
inline constexpr std::string_view kEventKey = "v1/events";  // written by the daemon (daemon/events.h)

// On a running VMI: the host ports forwarded to the guest, a JSON array of
// {"name","protocol","port","hostIP","hostPort"} as text. An annotation
// because KubeVirt's status.interfaces[] (VirtualMachineInstanceNetwork-
// Interface) has no field for them; written by the node, read by the
// ports subresource (api/subresources.h).
inline constexpr char kPublishedPortsAnnotation[] = "regdisk.io/published-ports";

struct Resource {
  std::string group;  // "" for the core group
  std::string version;
  std::string plural;
  std::string singular;
  std::string kind;
  std::vector<std::string> short_names;
  bool namespaced = true;
  std::string store_key;
  bool has_status = false;  // a /status subresource (status kept apart from spec)
  bool has_scale = false;   // a /scale subresource (autoscaling/v1 Scale over spec.replicas)

  std::string api_version() const { return group.empty() ? version : group + "/" + version; }
  // "virtualmachineinstances.kubevirt.io" (or "secrets"), as errors name it.
  std::string qualified() const { return group.empty() ? plural : plural + "." + group; }
};

const std::vector<Resource>& Resources();
// nullptr when not served.
const Resource* FindResource(std::string_view group, std::string_view version, std::string_view plural);

// Discovery documents: /api, /apis, and one APIResourceList per group
// version ("v1", "kubevirt.io/v1", ...; null json when not served).
nlohmann::json CoreVersions();
nlohmann::json GroupList();
nlohmann::json ResourceList(std::string_view group_version);

}  // namespace regdisk::api
