// VM specs in KubeVirt's YAML: VirtualMachine (kubevirt.io/v1alpha1, and
// kubevirt.io/v1 with containerDisk), VirtualMachineReplicaSet, and the
// Secrets (kubernetes.io/dockerconfigjson) their imagePullSecret names.
//
//   auto parsed = ParseSpecs(text, "vm.yaml");
//   for (const auto& d : parsed.diagnostics) std::cerr << d.ToString() << "\n";
//   if (!parsed.ok()) return 1;
//   for (const auto& doc : parsed.documents) ...
//
// Parsing applies the defaults written down in docs/vm-specs.md and
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

// registryDisk (v1alpha1) or containerDisk (v1): one VM disk in an image.
struct RegistryDiskSource {
  std::string field = "registryDisk";  // how the spec spelt it
  std::string image;
  std::string image_pull_secret;
  std::string image_pull_policy;  // Always | IfNotPresent | Never (defaulted)
  std::string path;               // inside the image; empty: discover under /disk
};

struct Volume {
  std::string name;
  std::optional<RegistryDiskSource> registry_disk;
};

struct Disk {
  std::string name;
  std::string volume_name;
  std::string dev;  // defaulted: vda, vdb, ... for virtio; sda, ... otherwise
  std::string bus;  // virtio (default) | sata | scsi
  bool read_only = false;
  std::optional<int> boot_order;
};

struct VmSpec {
  int64_t memory_bytes = 0;
  int64_t cpu_millis = 0;  // 0: not requested
  int cores = 1;
  std::vector<Disk> disks;
  std::vector<Volume> volumes;
};

struct VirtualMachine {
  std::string api_version;
  std::string kind = "VirtualMachine";
  ObjectMeta metadata;
  VmSpec spec;
};

struct VirtualMachineReplicaSet {
  std::string api_version;
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
};

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
// The parsed object with defaults applied, in KubeVirt's field names.
nlohmann::json ToJson(const Object& object);

}  // namespace regdisk::spec
