#include "spec/schema.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <set>
#include <vector>

#include "util/text.h"

namespace regdisk::spec {

namespace internal {
extern const std::string_view kKubeVirtSchemaJson;
extern const std::string_view kKubeVirtV1alpha1OverlayJson;
}  // namespace internal

using json = nlohmann::json;

namespace {

constexpr size_t kMaxListItems = 256;

// The KubeVirt fields regdisk implements, as DEFINITION.FIELD. A field the
// schema defines and this table does not name is accepted with a warning
// that regdisk ignores it (and its contents are still checked against the
// schema).
const std::set<std::string_view> kImplemented = {
    // Every kind's top level.
    "v1.VirtualMachine.apiVersion", "v1.VirtualMachine.kind", "v1.VirtualMachine.metadata", "v1.VirtualMachine.spec",
    "v1.VirtualMachineInstance.apiVersion", "v1.VirtualMachineInstance.kind", "v1.VirtualMachineInstance.metadata",
    "v1.VirtualMachineInstance.spec", "v1.VirtualMachineInstanceReplicaSet.apiVersion",
    "v1.VirtualMachineInstanceReplicaSet.kind", "v1.VirtualMachineInstanceReplicaSet.metadata",
    "v1.VirtualMachineInstanceReplicaSet.spec",
    "k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta.name", "k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta.namespace",
    "k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta.labels",
    "k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta.annotations",
    // VirtualMachine (v1).
    "v1.VirtualMachineSpec.template", "v1.VirtualMachineSpec.running", "v1.VirtualMachineSpec.runStrategy",
    "v1.VirtualMachineInstanceTemplateSpec.metadata", "v1.VirtualMachineInstanceTemplateSpec.spec",
    // Replica sets.
    "v1.VirtualMachineInstanceReplicaSetSpec.replicas", "v1.VirtualMachineInstanceReplicaSetSpec.selector",
    "v1.VirtualMachineInstanceReplicaSetSpec.template", "v1.VirtualMachineInstanceReplicaSetSpec.paused",
    "k8s.io.apimachinery.pkg.apis.meta.v1.LabelSelector.matchLabels",
    // The instance.
    "v1.VirtualMachineInstanceSpec.domain", "v1.VirtualMachineInstanceSpec.volumes",
    "v1.DomainSpec.resources", "v1.DomainSpec.cpu", "v1.DomainSpec.devices", "v1.DomainSpec.memory",
    "v1.Memory.guest",
    "v1.ResourceRequirements.requests",
    "v1.CPU.cores",
    "v1.Devices.disks",
    "v1.Disk.name", "v1.Disk.volumeName", "v1.Disk.disk", "v1.Disk.cdrom", "v1.Disk.bootOrder",
    "v1.DiskTarget.bus", "v1.DiskTarget.readonly", "v1.DiskTarget.dev", "v1.DiskTarget.readOnly",
    "v1.CDRomTarget.bus", "v1.CDRomTarget.readonly", "v1.CDRomTarget.readOnly",
    "v1.Volume.name", "v1.Volume.containerDisk", "v1.Volume.registryDisk", "v1.Volume.cloudInitNoCloud",
    "v1.Volume.emptyDisk",
    "v1.ContainerDiskSource.image", "v1.ContainerDiskSource.imagePullPolicy", "v1.ContainerDiskSource.imagePullSecret",
    "v1.ContainerDiskSource.path",
    "v1.CloudInitNoCloudSource.userData", "v1.CloudInitNoCloudSource.userDataBase64",
    "v1.CloudInitNoCloudSource.networkData", "v1.CloudInitNoCloudSource.networkDataBase64",
    "v1.EmptyDiskSource.capacity",
    "v1.CloudInitNoCloudSource.secretRef", "v1.CloudInitNoCloudSource.networkDataSecretRef",
    "k8s.io.api.core.v1.LocalObjectReference.name",
    // Networking.
    "v1.Devices.interfaces", "v1.Devices.autoattachPodInterface",
    "v1.Interface.name", "v1.Interface.masquerade", "v1.Interface.bridge", "v1.Interface.model",
    "v1.Interface.macAddress", "v1.Interface.ports",
    "v1.Port.name", "v1.Port.port", "v1.Port.protocol",
    "v1.VirtualMachineInstanceSpec.networks", "v1.Network.name", "v1.Network.pod", "v1.PodNetwork.vmNetworkCIDR",
};

const char kNoMigration[] =
    "live migration is not possible for VMs on registry disks, which are ephemeral and node-local; remove "
    "evictionStrategy and let the replica set start a fresh VM elsewhere";

// Fields KubeVirt defines that regdisk refuses rather than ignores.
std::string Refusal(const std::string& id, const std::string& key) {
  if (id == "v1.VirtualMachineInstanceSpec.evictionStrategy") return kNoMigration;
  if (id == "v1.Volume.persistentVolumeClaim" || id == "v1.Volume.dataVolume" || id == "v1.Volume.hostDisk" ||
      id == "v1.VirtualMachineSpec.dataVolumeTemplates") {
    return "regdisk runs stateless VMs on ephemeral registry disks and does not provide persistent volumes (" + key +
           "); keep state outside the VM, or run this VM with KubeVirt and a PersistentVolumeClaim";
  }
  return "";
}

// A sentence more for unknown fields that are known elsewhere.
std::string UnknownHint(const std::string& def, const std::string& key, const std::string& api_version) {
  if (api_version != "kubevirt.io/v1") return "";
  if (def == "v1.Disk" && key == "volumeName") {
    return "kubevirt.io/v1 has no volumeName: a disk uses the volume of the same name; name the disk after its volume "
           "and remove volumeName (or use apiVersion kubevirt.io/v1alpha1)";
  }
  if (def == "v1.Volume" && key == "registryDisk") {
    return "registryDisk is the kubevirt.io/v1alpha1 name; kubevirt.io/v1 calls it containerDisk";
  }
  if (def == "v1.DiskTarget" && key == "dev") {
    return "kubevirt.io/v1 names the guest devices itself; remove dev";
  }
  if (def == "v1.VirtualMachineSpec" && (key == "domain" || key == "volumes")) {
    return "a kubevirt.io/v1 VirtualMachine holds its instance under spec.template.spec; move it there, or use kind "
           "VirtualMachineInstance";
  }
  return "";
}


std::string Join(const std::string& path, const std::string& key) { return path.empty() ? key : path + "." + key; }

std::string DefinitionOfRef(const json& schema) {
  auto ref = schema.find("$ref");
  if (ref == schema.end() || !ref->is_string()) return "";
  const std::string& r = ref->get_ref<const std::string&>();
  return r.substr(r.rfind('/') + 1);
}

const json& Parsed() {
  static const json schema = json::parse(internal::kKubeVirtSchemaJson);
  return schema;
}

bool IsQuantitySchema(const json& s) {
  auto t = s.find("type");
  return t != s.end() && t->is_array() && std::find(t->begin(), t->end(), "string") != t->end() &&
         std::find(t->begin(), t->end(), "number") != t->end();
}

}  // namespace

KubeVirtSchema KubeVirtSchema::Load(std::string_view api_version) {
  KubeVirtSchema s;
  s.api_version_ = std::string(api_version);
  s.definitions_ = Parsed().at("definitions");
  if (api_version == "kubevirt.io/v1") {
    for (const auto& root : Parsed().at("roots")) {
      std::string name = root.get<std::string>();
      s.kinds_[name.substr(name.find('.') + 1)] = name;
    }
    return s;
  }
  const json overlay = json::parse(internal::kKubeVirtV1alpha1OverlayJson);
  for (const auto& [kind, def] : overlay.at("kinds").items()) s.kinds_[kind] = def.get<std::string>();
  for (const auto& [def, props] : overlay.at("properties").items()) {
    for (const auto& [name, prop] : props.items()) s.definitions_[def]["properties"][name] = prop;
  }
  for (const auto& [def, fields] : overlay.at("required").items()) {
    for (const auto& f : fields) s.definitions_[def]["required"].push_back(f);
  }
  return s;
}

const KubeVirtSchema* KubeVirtSchema::For(std::string_view api_version) {
  static const KubeVirtSchema v1 = Load("kubevirt.io/v1");
  static const KubeVirtSchema v1alpha1 = Load("kubevirt.io/v1alpha1");
  if (api_version == "kubevirt.io/v1") return &v1;
  if (api_version == "kubevirt.io/v1alpha1") return &v1alpha1;
  return nullptr;
}

std::string KubeVirtSchema::RootOf(std::string_view kind) const {
  auto it = kinds_.find(std::string(kind));
  return it == kinds_.end() ? "" : it->second;
}

const json* KubeVirtSchema::Definition(const std::string& name) const {
  auto it = definitions_.find(name);
  return it == definitions_.end() ? nullptr : &*it;
}

const std::string& KubeVirtSchema::UpstreamCommit() {
  static const std::string commit = Parsed().at("commit").get<std::string>();
  return commit;
}

const std::string& KubeVirtSchema::UpstreamVersion() {
  static const std::string version = Parsed().at("version").get<std::string>();
  return version;
}

namespace {

bool IsDigit(char c, int base) {
  if (c == '_') return true;
  if (base == 16) return std::isxdigit(static_cast<unsigned char>(c)) != 0;
  return c >= '0' && c < '0' + base;
}

// YAML 1.1 integers as go-yaml v2 reads them: decimal, 0x hex, 0b binary,
// 0-prefixed octal, with an optional sign and "_" separators.
bool IsYamlInt(std::string_view s) {
  if (!s.empty() && (s[0] == '-' || s[0] == '+')) s.remove_prefix(1);
  if (s.empty()) return false;
  int base = 10;
  if (s.size() > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'b')) {
    base = s[1] == 'x' ? 16 : 2;
    s.remove_prefix(2);
  } else if (s.size() > 1 && s[0] == '0') {
    base = 8;
  }
  return std::all_of(s.begin(), s.end(), [&](char c) { return IsDigit(c, base); });
}

// [-+]? (\.[0-9]+ | [0-9][0-9_]* (\.[0-9_]*)?) ([eE][-+]?[0-9]+)?
bool IsYamlFloat(std::string_view s) {
  size_t i = 0;
  auto digits = [&](bool underscore) {
    size_t start = i;
    while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || (underscore && s[i] == '_'))) ++i;
    return i > start;
  };
  if (i < s.size() && (s[i] == '-' || s[i] == '+')) ++i;
  if (i < s.size() && s[i] == '.') {
    ++i;
    if (!digits(false)) return false;
  } else {
    if (i >= s.size() || !std::isdigit(static_cast<unsigned char>(s[i])) || !digits(true)) return false;
    if (i < s.size() && s[i] == '.') {
      ++i;
      digits(true);
    }
  }
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < s.size() && (s[i] == '-' || s[i] == '+')) ++i;
    if (!digits(false)) return false;
  }
  return i == s.size();
}

const std::set<std::string_view> kBoolWords = {"y",    "Y",    "yes",   "Yes",   "YES",   "n",  "N",  "no",
                                               "No",   "NO",   "true",  "True",  "TRUE",  "false", "False", "FALSE",
                                               "on",   "On",   "ON",    "off",   "Off",   "OFF"};
const std::set<std::string_view> kOtherWords = {"",     "~",     "null",  "Null",  "NULL",  ".inf", ".Inf",
                                                ".INF", "-.inf", "-.Inf", "-.INF", "+.inf", ".nan", ".NaN", ".NAN"};

}  // namespace

bool PlainScalarIsNotString(std::string_view text) {
  // YAML 1.1 as go-yaml v2 (and so kubectl and the API server) resolves it.
  return kBoolWords.count(text) || kOtherWords.count(text) || IsYamlInt(text) || IsYamlFloat(text);
}

std::string YamlType(const YAML::Node& node) {
  if (!node.IsDefined() || node.IsNull()) return "null";
  if (node.IsMap()) return "object";
  if (node.IsSequence()) return "array";
  const std::string& tag = node.Tag();
  const std::string& s = node.Scalar();
  if (tag == "tag:yaml.org,2002:str" || tag == "!") return "string";
  if (tag == "tag:yaml.org,2002:bool") return "boolean";
  if (tag == "tag:yaml.org,2002:int") return "integer";
  if (tag == "tag:yaml.org,2002:float") return "number";
  if (tag != "?" && !tag.empty()) return "string";
  if (kBoolWords.count(s)) return "boolean";
  if (IsYamlInt(s)) return "integer";
  if (IsYamlFloat(s) || kOtherWords.count(s)) return "number";
  return "string";
}

void SchemaChecker::Check(const YAML::Node& node, const std::string& definition, const std::string& path) {
  const json* def = schema_.Definition(definition);
  if (def) Walk(node, *def, definition, path, true);
}

namespace {

std::string Describe(const std::string& type) {
  if (type == "object") return "a mapping of fields";
  if (type == "array") return "a list";
  if (type == "integer") return "an integer";
  if (type == "boolean") return "true or false";
  if (type == "number") return "a number";
  if (type == "null") return "null";
  return "a string";
}

}  // namespace

void SchemaChecker::Walk(const YAML::Node& node, const json& schema, const std::string& def_name,
                         const std::string& path, bool implemented) {
  const json* s = &schema;
  std::string name = def_name;
  if (std::string ref = DefinitionOfRef(schema); !ref.empty()) {
    s = schema_.Definition(ref);
    name = ref;
    if (!s) return;
  }
  if (!node.IsDefined() || node.IsNull()) return;  // unset
  const std::string actual = YamlType(node);
  std::vector<std::string> allowed;
  if (auto t = s->find("type"); t != s->end()) {
    if (t->is_string()) allowed.push_back(t->get<std::string>());
    if (t->is_array()) {
      for (const auto& e : *t) {
        if (e.is_string()) allowed.push_back(e.get<std::string>());
      }
    }
  } else if (s->contains("properties") || s->contains("additionalProperties")) {
    allowed.push_back("object");
  }
  if (s->value("format", "") == "int-or-string") allowed.push_back("integer");
  auto has = [&](const char* t) { return std::find(allowed.begin(), allowed.end(), t) != allowed.end(); };
  if (!allowed.empty() && !has(actual.c_str()) && !(actual == "integer" && has("number"))) {
    std::string msg;
    if (IsQuantitySchema(*s)) {
      msg = "must be a quantity such as 64M, 1Gi or 2";
    } else if (has("integer")) {
      msg = "must be an integer";
    } else {
      msg = "must be " + Describe(allowed.front());
    }
    if (node.IsScalar()) {
      msg += ", not \"" + node.Scalar() + "\"";
      if (has("string")) msg += "; write it in quotes to make it a string";
    } else {
      msg += ", not " + Describe(actual);
    }
    report_(Level::kError, node, path, msg);
    return;
  }
  if (actual == "integer") {
    errno = 0;
    std::string text = node.Scalar();
    text.erase(std::remove(text.begin(), text.end(), '_'), text.end());
    char* end = nullptr;
    long long v = std::strtoll(text.c_str(), &end, 0);
    bool int32 = s->value("format", "") == "int32";
    if (errno == ERANGE || (int32 && (v < INT32_MIN || v > INT32_MAX))) {
      report_(Level::kError, node, path, "\"" + node.Scalar() + "\" is out of range for " + (int32 ? "a 32" : "a 64") +
                                             "-bit integer");
      return;
    }
  }
  if (auto e = s->find("enum"); e != s->end() && e->is_array() && node.IsScalar()) {
    bool found = false;
    std::string list;
    for (const auto& v : *e) {
      if (!v.is_string()) continue;
      found |= v.get<std::string>() == node.Scalar();
      list += (list.empty() ? "" : ", ") + v.get<std::string>();
    }
    if (!found) {
      report_(Level::kError, node, path, "\"" + node.Scalar() + "\" is not one of " + list);
      return;
    }
  }
  if (actual == "object") {
    WalkObject(node, *s, name, path, implemented);
  } else if (actual == "array") {
    if (node.size() > kMaxListItems) {
      report_(Level::kError, node, path, "has more than 256 entries");
      return;
    }
    auto items = s->find("items");
    if (items == s->end()) return;
    for (size_t i = 0; i < node.size(); ++i) {
      Walk(node[i], *items, "", path + "[" + std::to_string(i) + "]", implemented);
    }
  }
}

void SchemaChecker::WalkObject(const YAML::Node& node, const json& s, const std::string& def_name,
                               const std::string& path, bool implemented) {
  auto props = s.find("properties");
  auto additional = s.find("additionalProperties");
  for (auto it = node.begin(); it != node.end(); ++it) {
    if (!it->first.IsScalar()) {
      report_(Level::kError, it->first, path, "has a field name that is not a string");
      continue;
    }
    const std::string key = it->first.Scalar();
    const std::string child = Join(path, key);
    if (props != s.end() && props->is_object() && props->contains(key)) {
      const std::string id = def_name + "." + key;
      if (std::string why = Refusal(id, key); !why.empty()) {
        report_(Level::kError, it->first, child, why);
        continue;
      }
      bool child_implemented = implemented && kImplemented.count(id) > 0;
      if (implemented && !child_implemented) {
        report_(Level::kWarning, it->first, child, "is defined by KubeVirt but not implemented by regdisk; it is ignored");
      }
      Walk(it->second, (*props)[key], "", child, child_implemented);
      continue;
    }
    if (additional != s.end() && additional->is_object()) {
      Walk(it->second, *additional, "", child, implemented);
      continue;
    }
    if (additional != s.end() && additional->is_boolean() && additional->get<bool>()) continue;
    std::string best;
    size_t best_d = SIZE_MAX;
    if (props != s.end() && props->is_object()) {
      for (const auto& [candidate, _] : props->items()) {
        size_t d = EditDistance(key, candidate, true);
        if (d < best_d) {
          best_d = d;
          best = candidate;
        }
      }
    }
    std::string msg = "unknown field \"" + key + "\"";
    if (std::string hint = UnknownHint(def_name, key, schema_.api_version()); !hint.empty()) {
      msg += "; " + hint;
    } else if (!best.empty() && best_d <= std::max<size_t>(2, key.size() / 3)) {
      msg += "; did you mean \"" + best + "\"?";
    }
    report_(Level::kError, it->first, child, msg);
  }
  if (auto req = s.find("required"); req != s.end() && req->is_array()) {
    for (const auto& r : *req) {
      if (!r.is_string()) continue;
      const std::string field = r.get<std::string>();
      if (!node[field].IsDefined() || node[field].IsNull()) report_(Level::kError, node, Join(path, field), "is required");
    }
  }
}

}  // namespace regdisk::spec
