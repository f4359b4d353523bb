#include "api/resources.h"

namespace regdisk::api {

using json = nlohmann::json;

const std::vector<Resource>& Resources() {
  static const std::vector<Resource> kResources = {
      {"kubevirt.io", "v1", "virtualmachineinstances", "virtualmachineinstance", "VirtualMachineInstance",
       {"vmi", "vmis"}, true, std::string(kVmiKey), true, false},
      {"kubevirt.io", "v1", "virtualmachines", "virtualmachine", "VirtualMachine", {"vm", "vms"}, true,
       std::string(kVmKey), true, false},
      {"kubevirt.io", "v1", "virtualmachineinstancereplicasets", "virtualmachineinstancereplicaset",
       "VirtualMachineInstanceReplicaSet", {"vmirs", "vmirss"}, true, std::string(kVmirsKey), true, true},
      {"kubevirt.io", "v1alpha1", "virtualmachines", "virtualmachine", "VirtualMachine", {"vm", "vms"}, true,
       std::string(kV1alpha1VmKey), true, false},
      {"kubevirt.io", "v1alpha1", "virtualmachinereplicasets", "virtualmachinereplicaset", "VirtualMachineReplicaSet",
       {"vmrs", "vmrss"}, true, std::string(kV1alpha1VmrsKey), true, true},
      {"", "v1", "secrets", "secret", "Secret", {}, true, std::string(kSecretKey), false, false},
      {"", "v1", "namespaces", "namespace", "Namespace", {"ns"}, false, std::string(kNamespaceKey), false, false},
      {"", "v1", "events", "event", "Event", {"ev"}, true, std::string(kEventKey), false, false},
  };
  return kResources;
}

const Resource* FindResource(std::string_view group, std::string_view version, std::string_view plural) {
  for (const auto& r : Resources()) {
    if (r.group == group && r.version == version && r.plural == plural) return &r;
  }
  return nullptr;
}

json CoreVersions() {
  return {{"kind", "APIVersions"},
          {"versions", {"v1"}},
          {"serverAddressByClientCIDRs", {{{"clientCIDR", "0.0.0.0/0"}, {"serverAddress", "127.0.0.1"}}}}};
}

json GroupList() {
  json v1 = {{"groupVersion", "kubevirt.io/v1"}, {"version", "v1"}};
  json v1alpha1 = {{"groupVersion", "kubevirt.io/v1alpha1"}, {"version", "v1alpha1"}};
  return {{"kind", "APIGroupList"},
          {"apiVersion", "v1"},
          {"groups", {{{"name", "kubevirt.io"}, {"versions", {v1, v1alpha1}}, {"preferredVersion", v1}}}}};
}

json ResourceList(std::string_view group_version) {
  json resources = json::array();
  bool any = false;
  for (const auto& r : Resources()) {
    if (r.api_version() != group_version) continue;
    any = true;
    json main = {{"name", r.plural},
                 {"singularName", r.singular},
                 {"namespaced", r.namespaced},
                 {"kind", r.kind},
                 {"verbs", {"delete", "deletecollection", "get", "list", "patch", "create", "update", "watch"}}};
    if (!r.short_names.empty()) main["shortNames"] = r.short_names;
    if (!r.group.empty()) main["categories"] = {"all"};
    resources.push_back(main);
    if (r.has_status) {
      resources.push_back({{"name", r.plural + "/status"},
                           {"singularName", ""},
                           {"namespaced", r.namespaced},
                           {"kind", r.kind},
                           {"verbs", {"get", "patch", "update"}}});
    }
    if (r.has_scale) {
      resources.push_back({{"name", r.plural + "/scale"},
                           {"singularName", ""},
                           {"namespaced", r.namespaced},
                           {"group", "autoscaling"},
                           {"version", "v1"},
                           {"kind", "Scale"},
                           {"verbs", {"get", "patch", "update"}}});
    }
  }
  if (!any) return nullptr;
  return {{"kind", "APIResourceList"},
          {"apiVersion", "v1"},
          {"groupVersion", std::string(group_version)},
          {"resources", resources}};
}

}  // namespace regdisk::api
