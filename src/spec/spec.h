// VM specs in KubeVirt's YAML, read as KubeVirt reads them:
//   kubevirt.io/v1alpha1  VirtualMachine (the seed's shape: disks name their
//                         volume with volumeName), VirtualMachineReplicaSet;
//   kubevirt.io/v1        VirtualMachineInstance, VirtualMachine (the
//                         instance under spec.template, with running or
//                         runStrategy), VirtualMachineInstanceReplicaSet;
//                         a disk uses the volume of the same name;
//   v1                    the Secrets (kubernetes.io/dockerconfigjson) an
//                         imagePullSecret names.
//
//   auto parsed = ParseSpecs(text, "vm.yaml");
//   for (const auto& d : parsed.diagnostics) std::cerr << d.ToString() << "\n";
//   if (!parsed.ok()) return 1;
//   for (const auto& doc : parsed.objects) ...
//
// The field set and types come from KubeVirt's OpenAPI schema (spec/schema.h);
// parsing applies the defaults written down in docs/vm-specs.md and
// collects every error (with field path, and line and column for YAML)
// instead of stopping at the first. The parser never throws and bounds the
// work any input can cause.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace regdisk::spec {

struct Diagnostic {
  enum class Severity { kError, kWarning };
  Severity severity = Severity::kError;
  std::string file;
  int line = 0;    // 1-based; 0 when unknown
  int column = 0;  // 1-based
  std::string path;     // "spec.domain.devices.disks[0].volumeName"
  std::string message;  // one sentence

  // "vm.yaml:12:9: spec...: message" (warnings say "warning:").
  std::string ToString() const;
};

struct ObjectMeta {
  std::string name;
  std::string namespace_ = "default";
  std::map<std::string, std::string> labels;
  std::map<std::string, std::string> annotations;
};

// A Kubernetes quantity as the spec wrote it ("64M", or 2 written as a
// number), so that output keeps it as written.
struct Quantity {
  std::string text;
  bool number = false;  // written as a YAML number, not a string
};

// registryDisk (v1alpha1) or containerDisk (v1): one VM disk in an image.
struct RegistryDiskSource {
  std::string field = "registryDisk";  // how the spec spelt it
  std::string image;
  std::string image_pull_secret;
  std::string image_pull_policy;  // Always | IfNotPresent | Never (defaulted)
  std::string path;               // inside the image; empty: discover under /disk
};

// cloudInitNoCloud: the VM's NoCloud seed. At most one user-data source
// and one network-data source; a secretRef names a Secret (of the same
// file) whose data holds the key userdata or userData (networkdata or
// networkData).
struct CloudInitNoCloudSource {
  std::string user_data;
  std::string user_data_base64;
  std::string user_data_secret;  // secretRef.name
  std::string network_data;
  std::string network_data_base64;
  std::string network_data_secret;  // networkDataSecretRef.name
};

// emptyDisk: parsed and validated; regdisk run refuses it for now.
struct EmptyDiskSource {
  Quantity capacity;
  int64_t capacity_bytes = 0;
};

// A volume has exactly one source.
struct Volume {
  std::string name;
  std::optional<RegistryDiskSource> registry_disk;
  std::optional<CloudInitNoCloudSource> cloud_init_no_cloud;
  std::optional<EmptyDiskSource> empty_disk;
  // The source's field name: registryDisk, containerDisk, cloudInitNoCloud
  // or emptyDisk.
  std::string SourceField() const;
};

struct Disk {
  std::string name;
  // The volume it uses: v1alpha1 volumeName; in v1 the disk's own name.
  std::string volume_name;
  std::string device = "disk";  // disk | cdrom (read-only unless cdrom.readonly: false)
  std::string dev;  // defaulted: vda, vdb, ... for virtio; sda, ... otherwise
  std::string bus;  // virtio | sata | scsi (defaulted, see docs/vm-specs.md)
  bool read_only = false;
  std::optional<int> boot_order;
};

// A port the guest serves: published on the host by regdisk run.
struct Port {
  std::string name;  // optional
  int port = 0;      // 1-65535
  std::string protocol = "TCP";  // TCP | UDP
};

// domain.devices.interfaces[]: a NIC on the network of the same name.
struct Interface {
  std::string name;
  std::string binding = "masquerade";  // masquerade | bridge
  std::string model = "virtio";  // virtio | e1000 | e1000e | rtl8139
  std::string mac_address;       // empty: derived from namespace, VM and interface name
  std::vector<Port> ports;
};

// spec.networks[]: regdisk has one network, the pod network (QEMU's
// user-mode network per VM, or a host bridge with run --network bridge=).
struct Network {
  std::string name;
  bool pod = false;  // a pod network (the only kind regdisk accepts)
  std::string vm_network_cidr = "10.0.2.0/24";  // pod.vmNetworkCIDR
};

struct VmSpec {
  int64_t memory_bytes = 0;
  Quantity memory;          // requests.memory as written (empty when not given)
  Quantity guest_memory;    // domain.memory.guest as written (empty when not given)
  int64_t cpu_millis = 0;   // 0: not requested
  Quantity cpu;             // requests.cpu as written
  int cores = 1;
  bool cores_given = false;
  std::vector<Disk> disks;
  std::vector<Volume> volumes;
  // With no interfaces and no networks, and autoattachPodInterface not
  // false, the parser adds KubeVirt's default: interface "default"
  // (masquerade) on pod network "default".
  std::vector<Interface> interfaces;
  std::vector<Network> networks;
  bool autoattach_pod_interface = true;
};

// v1alpha1 VirtualMachine, v1 VirtualMachineInstance and v1 VirtualMachine:
// one VM that regdisk runs. `spec` is the instance's spec (for a v1
// VirtualMachine, spec.template.spec).
struct VirtualMachine {
  std::string api_version;
  std::string kind = "VirtualMachine";
  ObjectMeta metadata;
  VmSpec spec;
  // kubevirt.io/v1 VirtualMachine only.
  ObjectMeta template_metadata;
  std::optional<bool> running;
  std::string run_strategy;  // Always | Halted | Manual | RerunOnFailure | Once; empty with running
  bool IsV1VirtualMachine() const { return api_version == "kubevirt.io/v1" && kind == "VirtualMachine"; }
};

// v1alpha1 VirtualMachineReplicaSet and v1 VirtualMachineInstanceReplicaSet.
struct VirtualMachineReplicaSet {
  std::string api_version;
  std::string kind = "VirtualMachineReplicaSet";
  ObjectMeta metadata;
  int replicas = 1;
  std::map<std::string, std::string> match_labels;
  ObjectMeta template_metadata;
  VmSpec template_spec;
  bool paused = false;
};

struct Secret {
  ObjectMeta metadata;
  std::string type;
  std::string docker_config_json;  // decoded .dockerconfigjson
  // Every key of data (decoded) and stringData (which wins), as the API
  // server merges them.
  std::map<std::string, std::string> data;
};

// What a cloudInitNoCloud secretRef (user_data) or networkDataSecretRef
// reads from a Secret: the key userdata or userData (networkdata or
// networkData); nullptr when it has neither.
const std::string* CloudInitSecretData(const Secret& secret, bool user_data);

using Object = std::variant<VirtualMachine, VirtualMachineReplicaSet, Secret>;

struct ParseResult {
  std::vector<Object> objects;
  std::vector<Diagnostic> diagnostics;
  bool ok() const;
};

// Parses every document of a YAML or JSON file and validates the lot
// (cross-document rules included: imagePullSecret must name a Secret of
// the file).
ParseResult ParseSpecs(std::string_view text, std::string_view file_name);

// "VirtualMachine default/testvm-ephemeral"
std::string Describe(const Object& object);
// The parsed object with defaults applied, in KubeVirt's field names for
// its apiVersion; quantities as written.
nlohmann::json ToJson(const Object& object);
// JSON as YAML (block style, strings quoted where YAML would read them as
// something else), as kubectl -o yaml prints objects.
std::string ToYaml(const nlohmann::json& value);

}  // namespace regdisk::spec
