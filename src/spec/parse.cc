// Parsing and validation of VM specs (see spec.h). The schema lives in
// this file as FieldSet tables: the fields regdisk implements, and the ones
// KubeVirt defines that regdisk accepts with a warning and ignores.
#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/parser.h>
#include <yaml-cpp/yaml.h>

#include <sstream>

#include <algorithm>
#include <set>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include "oci/reference.h"
#include "registry/http.h"
#include "spec/quantity.h"
#include "spec/spec.h"

namespace regdisk::spec {

using json = nlohmann::json;

namespace {

constexpr size_t kMaxInputBytes = 1 << 20;
constexpr size_t kMaxDiagnostics = 200;
constexpr int kMaxFlowDepth = 64;
constexpr size_t kMaxIndent = 256;
constexpr size_t kMaxListItems = 256;

struct FieldSet {
  std::vector<std::string_view> implemented;
  std::vector<std::string_view> kubevirt_only;  // accepted with a warning
};

const FieldSet kTopFields{{"apiVersion", "kind", "metadata", "spec"}, {"status"}};
const FieldSet kSecretTopFields{{"apiVersion", "kind", "metadata", "type", "data", "stringData"}, {"immutable"}};
const FieldSet kMetaFields{{"name", "namespace", "labels", "annotations"},
                           {"generateName", "uid", "resourceVersion", "generation", "creationTimestamp",
                            "deletionTimestamp", "deletionGracePeriodSeconds", "ownerReferences", "finalizers",
                            "selfLink", "managedFields", "clusterName"}};
const FieldSet kVmSpecFields{{"domain", "volumes"},
                             {"terminationGracePeriodSeconds", "affinity", "nodeSelector", "hostname", "subdomain",
                              "tolerations", "schedulerName", "priorityClassName", "networks", "livenessProbe",
                              "readinessProbe", "dnsPolicy", "dnsConfig", "accessCredentials", "startStrategy",
                              "topologySpreadConstraints", "evictionStrategy"}};
const FieldSet kV1VmFields{{"template"}, {"running", "runStrategy", "instancetype", "preference"}};
const FieldSet kDomainFields{{"resources", "cpu", "devices"},
                             {"memory", "machine", "firmware", "clock", "features", "chassis", "ioThreadsPolicy",
                              "launchSecurity"}};
const FieldSet kResourcesFields{{"requests"}, {"limits", "overcommitGuestOverhead"}};
const FieldSet kRequestsFields{{"memory", "cpu"}, {}};
const FieldSet kCpuFields{{"cores"},
                          {"sockets", "threads", "model", "features", "dedicatedCpuPlacement", "isolateEmulatorThread",
                           "numa", "realtime", "maxSockets"}};
const FieldSet kDevicesFields{{"disks"},
                              {"interfaces", "watchdog", "autoattachGraphicsDevice", "autoattachPodInterface",
                               "autoattachSerialConsole", "autoattachMemBalloon", "rng", "blockMultiQueue",
                               "networkInterfaceMultiqueue", "gpus", "hostDevices", "inputs", "filesystems",
                               "useVirtioTransitional", "clientPassthrough", "sound", "tpm"}};
const FieldSet kDiskFields{{"name", "volumeName", "disk", "bootOrder"},
                           {"serial", "cache", "io", "dedicatedIOThread", "blockSize", "shareable", "errorPolicy", "tag",
                            "lun", "cdrom", "floppy"}};
const FieldSet kDiskTargetFields{{"dev", "bus", "readOnly"}, {"pciAddress"}};
const FieldSet kVolumeFields{{"name", "registryDisk", "containerDisk"},
                             {"cloudInitNoCloud", "cloudInitConfigDrive", "emptyDisk", "ephemeral", "hostDisk",
                              "configMap", "secret", "serviceAccount", "sysprep", "downwardAPI", "downwardMetrics",
                              "memoryDump", "persistentVolumeClaim", "dataVolume"}};
const FieldSet kRegistryDiskFields{{"image", "imagePullSecret", "imagePullPolicy", "path"}, {}};
const FieldSet kReplicaSetSpecFields{{"replicas", "selector", "template", "paused"}, {}};
const FieldSet kSelectorFields{{"matchLabels"}, {"matchExpressions"}};
const FieldSet kTemplateFields{{"metadata", "spec"}, {}};

// Volume sources that keep data: refused, because a VM on a registry disk
// is stateless by design.
const std::set<std::string_view> kPersistentSources = {"persistentVolumeClaim", "dataVolume", "hostDisk"};

// True when a looked-up node exists and is not null. yaml-cpp hands back an
// invalid node for a missing key, on which everything but IsDefined throws.
bool Has(const YAML::Node& n) { return n.IsDefined() && !n.IsNull(); }

size_t EditDistance(std::string_view a, std::string_view b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t sub = prev[j - 1] + (std::tolower(a[i - 1]) == std::tolower(b[j - 1]) ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

bool IsValidUtf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    uint32_t cp = n == 1 ? c : c & (0x7f >> n);
    for (size_t k = 1; k < n; ++k) {
      unsigned char cc = static_cast<unsigned char>(s[i + k]);
      if ((cc >> 6) != 2) return false;
      cp = (cp << 6) | (cc & 0x3f);
    }
    static constexpr uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += n;
  }
  return true;
}

// Why PreCheck refused a file; line and column (1-based) when one place is
// to blame, 0 otherwise.
struct Refusal {
  std::string why;
  int line = 0;
  int column = 0;
};

// Finds a C0 control character other than tab, LF and CR, which YAML does
// not allow. A NUL among the first bytes would also make yaml-cpp read the
// file as UTF-16 or UTF-32 and hand back strings that are not UTF-8.
// `text` must be valid UTF-8: columns count characters.
std::optional<Refusal> FindControlCharacter(std::string_view text) {
  int line = 1, column = 0;
  for (char ch : text) {
    unsigned char c = static_cast<unsigned char>(ch);
    if ((c & 0xc0) != 0x80) ++column;  // not a continuation byte
    if (c == '\n') {
      ++line;
      column = 0;
    } else if (c < 0x20 && c != '\t' && c != '\r') {
      return Refusal{fmt::format("the file holds control character U+{:04X}, which YAML does not allow; save it as "
                                 "UTF-8 text without control characters",
                                 c),
                     line, column};
    }
  }
  return std::nullopt;
}

// Rejects input that is not UTF-8 text, or that could make the YAML library
// recurse without bound.
std::optional<Refusal> PreCheck(std::string_view text) {
  if (text.size() > kMaxInputBytes) return Refusal{"the file is larger than 1 MiB; split it"};
  if (!IsValidUtf8(text)) return Refusal{"the file is not valid UTF-8 text; save it as UTF-8"};
  if (auto control = FindControlCharacter(text)) return control;
  int depth = 0;
  bool in_single = false, in_double = false, comment = false;
  size_t indent = 0;
  bool line_start = true;
  for (size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (c == '\n') {
      comment = in_single = in_double = false;  // flow scalars rarely span lines; be conservative
      line_start = true;
      indent = 0;
      continue;
    }
    if (line_start) {
      if (c == ' ' || c == '\t' || c == '-' || c == '?' || c == ':') {
        if (++indent > kMaxIndent) return Refusal{"nesting is deeper than regdisk accepts"};
        continue;
      }
      line_start = false;
    }
    if (comment) continue;
    if (in_double) {
      if (c == '\\') ++i;
      else if (c == '"') in_double = false;
      continue;
    }
    if (in_single) {
      if (c == '\'') in_single = false;
      continue;
    }
    switch (c) {
      case '#': comment = true; break;
      case '"': in_double = true; break;
      case '\'': in_single = true; break;
      case '[':
      case '{':
        if (++depth > kMaxFlowDepth) return Refusal{"nesting is deeper than regdisk accepts"};
        break;
      case ']':
      case '}':
        if (depth > 0) --depth;
        break;
      default: break;
    }
  }
  return std::nullopt;
}

// One document of a multi-document stream and the line it starts on.
struct Chunk {
  std::string text;
  int first_line = 0;  // 0-based line of the chunk's first line in the file
};

// Splits a stream at "---" and "..." marker lines, as kubectl does. yaml-cpp
// 0.7's LoadAll can loop forever on some malformed streams (fixed upstream
// in 2024), so each document is loaded on its own with YAML::Load.
std::vector<Chunk> SplitDocuments(std::string_view text) {
  std::vector<Chunk> out(1);
  int line = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    std::string_view l = text.substr(pos, end == std::string_view::npos ? std::string_view::npos : end - pos);
    bool start = l.substr(0, 3) == "---" && (l.size() == 3 || l[3] == ' ' || l[3] == '\t' || l[3] == '\r');
    bool stop = l.substr(0, 3) == "..." && l.find_first_not_of(" \t\r", 3) == std::string_view::npos;
    if (start || stop) {
      // The marker's line becomes the new chunk's first line; content after
      // "--- " stays there, at its column.
      std::string first = start && l.size() > 4 ? std::string(4, ' ') + std::string(l.substr(4)) : std::string();
      out.push_back(Chunk{first + "\n", line});
    } else {
      out.back().text.append(l).append("\n");
    }
    ++line;
    if (end == std::string_view::npos) break;
    pos = end + 1;
  }
  return out;
}

// Sees every string of a document as yaml-cpp's events give it (scalars,
// keys, tags) without building nodes, and remembers the first one that is
// not UTF-8. PreCheck should make that impossible; this keeps the promise
// that every string the parser returns is UTF-8 if yaml-cpp ever decodes
// differently.
class DocumentScanner : public YAML::EventHandler {
 public:
  std::optional<YAML::Mark> not_utf8;

  void OnDocumentStart(const YAML::Mark&) override {}
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
  void OnAlias(const YAML::Mark&, YAML::anchor_t) override {}
  void OnScalar(const YAML::Mark& mark, const std::string& tag, YAML::anchor_t, const std::string& value) override {
    Check(mark, tag);
    Check(mark, value);
  }
  void OnSequenceStart(const YAML::Mark& mark, const std::string& tag, YAML::anchor_t,
                       YAML::EmitterStyle::value) override {
    Check(mark, tag);
  }
  void OnSequenceEnd() override {}
  void OnMapStart(const YAML::Mark& mark, const std::string& tag, YAML::anchor_t, YAML::EmitterStyle::value) override {
    Check(mark, tag);
  }
  void OnMapEnd() override {}

 private:
  void Check(const YAML::Mark& mark, const std::string& s) {
    if (!not_utf8 && !IsValidUtf8(s)) not_utf8 = mark;
  }
};

// What one pass of the event parser over a chunk found.
struct ChunkScan {
  bool trailing_content = false;        // content after the first document
  std::optional<YAML::Mark> not_utf8;  // the first string that is not UTF-8
};

// Throws YAML::Exception like YAML::Load.
ChunkScan ScanChunk(const std::string& chunk) {
  std::istringstream in(chunk);
  YAML::Parser parser(in);
  DocumentScanner scanner;
  ChunkScan scan;
  if (!parser.HandleNextDocument(scanner)) return scan;
  scan.not_utf8 = scanner.not_utf8;
  scan.trailing_content = parser.HandleNextDocument(scanner);
  return scan;
}

class Parser {
 public:
  Parser(std::string_view file, std::vector<Diagnostic>& out) : file_(file), out_(out) {}

  void Report(Diagnostic::Severity sev, const YAML::Node& at, const std::string& path, std::string msg) {
    if (out_.size() >= kMaxDiagnostics) return;
    Diagnostic d;
    d.severity = sev;
    d.file = file_;
    if (at.IsDefined()) {
      YAML::Mark m = at.Mark();
      if (m.line >= 0) {
        d.line = m.line + 1 + line_offset_;
        d.column = m.column + 1;
      }
    }
    d.path = path;
    d.message = std::move(msg);
    if (out_.size() + 1 == kMaxDiagnostics) {
      d.path.clear();
      d.message = "too many problems; stopping here";
    }
    out_.push_back(std::move(d));
  }
  void Error(const YAML::Node& at, const std::string& path, std::string msg) {
    Report(Diagnostic::Severity::kError, at, path, std::move(msg));
  }
  void Warn(const YAML::Node& at, const std::string& path, std::string msg) {
    Report(Diagnostic::Severity::kWarning, at, path, std::move(msg));
  }

  // Checks a mapping's keys against a FieldSet. Returns false when `node`
  // is not a mapping (and says so).
  bool CheckFields(const YAML::Node& node, const std::string& path, const FieldSet& fields) {
    if (!node.IsMap()) {
      Error(node, path, "must be a mapping of fields");
      return false;
    }
    for (auto it = node.begin(); it != node.end(); ++it) {
      if (!it->first.IsScalar()) {
        Error(it->first, path, "has a field name that is not a string");
        continue;
      }
      std::string key = it->first.Scalar();
      std::string child = Join(path, key);
      auto in = [&](const std::vector<std::string_view>& v) { return std::find(v.begin(), v.end(), key) != v.end(); };
      if (in(fields.implemented)) continue;
      if (in(fields.kubevirt_only)) {
        if (!Refused(it->first, child, key)) {
          Warn(it->first, child, "is defined by KubeVirt but not implemented by regdisk; it is ignored");
        }
        continue;
      }
      std::string best;
      size_t best_d = 1000;
      for (const auto* v : {&fields.implemented, &fields.kubevirt_only}) {
        for (auto candidate : *v) {
          size_t d = EditDistance(key, candidate);
          if (d < best_d) {
            best_d = d;
            best = std::string(candidate);
          }
        }
      }
      std::string msg = "unknown field \"" + key + "\"";
      if (best_d <= std::max<size_t>(2, key.size() / 3)) msg += "; did you mean \"" + best + "\"?";
      Error(it->first, child, msg);
    }
    return true;
  }

  // Fields KubeVirt has that regdisk must refuse rather than ignore.
  bool Refused(const YAML::Node& at, const std::string& path, const std::string& key) {
    if (key == "evictionStrategy") {
      Error(at, path,
            "live migration is not possible for VMs on registry disks, which are ephemeral and node-local; remove "
            "evictionStrategy and let the replica set start a fresh VM elsewhere");
      return true;
    }
    if (kPersistentSources.count(key)) {
      Error(at, path,
            "regdisk runs stateless VMs on ephemeral registry disks and does not provide persistent volumes (" + key +
                "); keep state outside the VM, or run this VM with KubeVirt and a PersistentVolumeClaim");
      return true;
    }
    return false;
  }

  static std::string Join(const std::string& path, const std::string& key) {
    return path.empty() ? key : path + "." + key;
  }

  std::optional<std::string> String(const YAML::Node& map, const char* key, const std::string& path, bool required) {
    YAML::Node n = map[key];
    std::string p = Join(path, key);
    if (!n.IsDefined() || n.IsNull()) {
      if (required) Error(map, p, "is required");
      return std::nullopt;
    }
    if (!n.IsScalar()) {
      Error(n, p, "must be a string");
      return std::nullopt;
    }
    return n.Scalar();
  }

  std::optional<int64_t> Int(const YAML::Node& map, const char* key, const std::string& path) {
    YAML::Node n = map[key];
    if (!n.IsDefined() || n.IsNull()) return std::nullopt;
    std::string p = Join(path, key);
    if (!n.IsScalar()) {
      Error(n, p, "must be an integer");
      return std::nullopt;
    }
    const std::string& s = n.Scalar();
    char* end = nullptr;
    errno = 0;
    long long v = std::strtoll(s.c_str(), &end, 10);
    if (s.empty() || *end != '\0' || errno == ERANGE || v < INT32_MIN || v > INT32_MAX) {
      Error(n, p, "must be an integer, not \"" + s + "\"");
      return std::nullopt;
    }
    return v;
  }

  std::optional<bool> Bool(const YAML::Node& map, const char* key, const std::string& path) {
    YAML::Node n = map[key];
    if (!n.IsDefined() || n.IsNull()) return std::nullopt;
    std::string p = Join(path, key);
    if (n.IsScalar() && (n.Scalar() == "true" || n.Scalar() == "false")) return n.Scalar() == "true";
    Error(n, p, "must be true or false");
    return std::nullopt;
  }

  std::map<std::string, std::string> StringMap(const YAML::Node& map, const char* key, const std::string& path) {
    std::map<std::string, std::string> out;
    YAML::Node n = map[key];
    if (!n.IsDefined() || n.IsNull()) return out;
    std::string p = Join(path, key);
    if (!n.IsMap()) {
      Error(n, p, "must be a mapping of strings");
      return out;
    }
    for (auto it = n.begin(); it != n.end(); ++it) {
      if (!it->first.IsScalar() || !(it->second.IsScalar() || it->second.IsNull())) {
        Error(it->first, p, "must map strings to strings");
        continue;
      }
      out[it->first.Scalar()] = it->second.IsNull() ? "" : it->second.Scalar();
    }
    return out;
  }

  ObjectMeta Metadata(const YAML::Node& doc, const std::string& path, bool name_required) {
    ObjectMeta m;
    YAML::Node n = doc["metadata"];
    std::string p = Join(path, "metadata");
    if (!n.IsDefined() || n.IsNull()) {
      if (name_required) Error(doc, p + ".name", "is required");
      return m;
    }
    if (!CheckFields(n, p, kMetaFields)) return m;
    if (auto name = String(n, "name", p, name_required)) {
      m.name = *name;
      if (!IsDnsSubdomain(m.name)) {
        Error(n["name"], p + ".name",
              "\"" + m.name + "\" is not a valid name; use lowercase letters, digits, '-' and '.', at most 253 characters");
      }
    }
    if (auto ns = String(n, "namespace", p, false); ns && !ns->empty()) m.namespace_ = *ns;
    m.labels = StringMap(n, "labels", p);
    m.annotations = StringMap(n, "annotations", p);
    return m;
  }

  static bool IsDnsSubdomain(const std::string& s) {
    if (s.empty() || s.size() > 253) return false;
    auto alnum = [](char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); };
    if (!alnum(s.front()) || !alnum(s.back())) return false;
    return std::all_of(s.begin(), s.end(), [&](char c) { return alnum(c) || c == '-' || c == '.'; });
  }

  VmSpec Spec(const YAML::Node& spec, const std::string& path, const std::string& api_version) {
    VmSpec vm;
    if (!CheckFields(spec, path, kVmSpecFields)) return vm;
    YAML::Node domain = spec["domain"];
    std::string dp = path + ".domain";
    if (!domain.IsDefined() || domain.IsNull()) {
      Error(spec, dp, "is required");
    } else if (CheckFields(domain, dp, kDomainFields)) {
      Resources(domain, dp, vm);
      if (YAML::Node cpu = domain["cpu"]; cpu.IsDefined() && !cpu.IsNull() && CheckFields(cpu, dp + ".cpu", kCpuFields)) {
        if (auto cores = Int(cpu, "cores", dp + ".cpu")) {
          if (*cores < 1 || *cores > 512) {
            Error(cpu["cores"], dp + ".cpu.cores", "must be between 1 and 512");
          } else {
            vm.cores = static_cast<int>(*cores);
          }
        }
      }
      if (YAML::Node dev = domain["devices"]; dev.IsDefined() && !dev.IsNull()) {
        if (CheckFields(dev, dp + ".devices", kDevicesFields)) Disks(dev["disks"], dp + ".devices.disks", vm);
      }
    }
    Volumes(spec["volumes"], path + ".volumes", api_version, vm);
    CrossCheck(spec, path, vm);
    return vm;
  }

  void Resources(const YAML::Node& domain, const std::string& dp, VmSpec& vm) {
    YAML::Node res = domain["resources"];
    std::string rp = dp + ".resources";
    std::string qp = rp + ".requests";
    if (Has(res) && !CheckFields(res, rp, kResourcesFields)) return;
    YAML::Node req = Has(res) ? res["requests"] : YAML::Node();
    if (!Has(req)) {
      Error(domain, qp + ".memory", "is required; give the VM's memory, e.g. 64M or 1Gi");
      return;
    }
    if (!CheckFields(req, qp, kRequestsFields)) return;
    if (auto mem = String(req, "memory", qp, false)) {
      auto bytes = ParseQuantity(*mem, 1);
      if (!bytes.ok()) {
        Error(req["memory"], qp + ".memory", bytes.status().message());
      } else if (*bytes == 0) {
        Error(req["memory"], qp + ".memory", "must be more than zero");
      } else if (*bytes < (1 << 20)) {
        Error(req["memory"], qp + ".memory", "\"" + *mem + "\" is less than 1 MiB; did you mean " + *mem + "i or " + *mem + "M?");
      } else {
        vm.memory_bytes = *bytes;
      }
    } else {
      Error(req, qp + ".memory", "is required; give the VM's memory, e.g. 64M or 1Gi");
    }
    if (auto cpu = String(req, "cpu", qp, false)) {
      auto millis = ParseQuantity(*cpu, 1000);
      if (!millis.ok()) {
        Error(req["cpu"], qp + ".cpu", millis.status().message());
      } else if (*millis == 0) {
        Error(req["cpu"], qp + ".cpu", "must be more than zero");
      } else {
        vm.cpu_millis = *millis;
      }
    }
  }

  // True when `list` is a usable list (absent counts as empty: false, silently).
  bool CheckList(const YAML::Node& list, const std::string& path) {
    if (!Has(list)) return false;
    if (!list.IsSequence()) {
      Error(list, path, "must be a list");
      return false;
    }
    if (list.size() > kMaxListItems) {
      Error(list, path, "has more than 256 entries");
      return false;
    }
    return true;
  }

  void Disks(const YAML::Node& list, const std::string& path, VmSpec& vm) {
    if (!CheckList(list, path)) return;
    for (size_t i = 0; i < list.size(); ++i) {
      YAML::Node d = list[i];
      std::string p = path + "[" + std::to_string(i) + "]";
      Disk disk;
      marks_[p] = d;
      if (!CheckFields(d, p, kDiskFields)) {
        vm.disks.push_back(disk);
        continue;
      }
      disk.name = String(d, "name", p, true).value_or("");
      disk.volume_name = String(d, "volumeName", p, true).value_or("");
      if (auto b = Int(d, "bootOrder", p)) {
        if (*b < 1) {
          Error(d["bootOrder"], p + ".bootOrder", "must be 1 or more");
        } else {
          disk.boot_order = static_cast<int>(*b);
        }
      }
      YAML::Node target = d["disk"];
      if (target.IsDefined() && !target.IsNull() && CheckFields(target, p + ".disk", kDiskTargetFields)) {
        disk.dev = String(target, "dev", p + ".disk", false).value_or("");
        disk.bus = String(target, "bus", p + ".disk", false).value_or("");
        disk.read_only = Bool(target, "readOnly", p + ".disk").value_or(false);
        if (!disk.bus.empty() && disk.bus != "virtio" && disk.bus != "sata" && disk.bus != "scsi") {
          Error(target["bus"], p + ".disk.bus", "bus \"" + disk.bus + "\" is not supported; use virtio, sata or scsi");
        }
      }
      vm.disks.push_back(disk);
    }
  }

  void Volumes(const YAML::Node& list, const std::string& path, const std::string& api_version, VmSpec& vm) {
    if (!CheckList(list, path)) return;
    for (size_t i = 0; i < list.size(); ++i) {
      YAML::Node v = list[i];
      std::string p = path + "[" + std::to_string(i) + "]";
      Volume vol;
      marks_[p] = v;
      if (!CheckFields(v, p, kVolumeFields)) {
        vm.volumes.push_back(vol);
        continue;
      }
      vol.name = String(v, "name", p, true).value_or("");
      std::vector<std::string> sources;
      for (auto it = v.begin(); it != v.end(); ++it) {
        if (it->first.IsScalar() && it->first.Scalar() != "name") sources.push_back(it->first.Scalar());
      }
      if (sources.empty()) {
        Error(v, p, "volume \"" + vol.name + "\" has no source; give registryDisk: {image: ...}");
      } else if (sources.size() > 1) {
        Error(v, p, "volume \"" + vol.name + "\" has " + std::to_string(sources.size()) + " sources (" + sources[0] +
                        ", " + sources[1] + "); a volume has exactly one");
      }
      for (const char* field : {"registryDisk", "containerDisk"}) {
        YAML::Node src = v[field];
        if (!src.IsDefined()) continue;
        std::string sp = p + "." + field;
        if (std::string(field) == "registryDisk" && api_version == "kubevirt.io/v1") {
          Warn(src, sp, "is the kubevirt.io/v1alpha1 name; kubevirt.io/v1 calls it containerDisk");
        }
        vol.registry_disk = RegistryDisk(src, sp, field);
      }
      vm.volumes.push_back(vol);
    }
  }

  RegistryDiskSource RegistryDisk(const YAML::Node& src, const std::string& p, const std::string& field) {
    RegistryDiskSource r;
    r.field = field;
    if (!CheckFields(src, p, kRegistryDiskFields)) return r;
    r.image = String(src, "image", p, true).value_or("");
    bool latest = false;
    if (!r.image.empty()) {
      auto ref = oci::Reference::Parse(r.image);
      if (!ref.ok()) {
        Error(src["image"], p + ".image", ref.status().message());
      } else {
        latest = !ref->digest && ref->tag == "latest";
      }
    }
    r.image_pull_secret = String(src, "imagePullSecret", p, false).value_or("");
    if (!r.image_pull_secret.empty()) {
      secret_refs_.push_back({src["imagePullSecret"], p + ".imagePullSecret", r.image_pull_secret, line_offset_});
    }
    r.image_pull_policy = String(src, "imagePullPolicy", p, false).value_or("");
    if (r.image_pull_policy.empty()) {
      r.image_pull_policy = latest ? "Always" : "IfNotPresent";
    } else if (r.image_pull_policy != "Always" && r.image_pull_policy != "IfNotPresent" &&
               r.image_pull_policy != "Never") {
      Error(src["imagePullPolicy"], p + ".imagePullPolicy",
            "\"" + r.image_pull_policy + "\" is not a pull policy; use Always, IfNotPresent or Never");
    }
    r.path = String(src, "path", p, false).value_or("");
    if (!r.path.empty()) {
      bool dotdot = false;
      size_t start = 0;
      while (start <= r.path.size()) {
        size_t end = r.path.find('/', start);
        if (r.path.substr(start, end == std::string::npos ? std::string::npos : end - start) == "..") dotdot = true;
        if (end == std::string::npos) break;
        start = end + 1;
      }
      if (r.path.front() != '/') {
        Error(src["path"], p + ".path", "\"" + r.path + "\" is relative; give the absolute path inside the image, e.g. /disk/disk.qcow2");
      } else if (dotdot) {
        Error(src["path"], p + ".path", "\"" + r.path + "\" contains \"..\"; give a plain absolute path inside the image");
      }
    }
    return r;
  }

  // Rules that relate disks and volumes; applies the dev defaults.
  void CrossCheck(const YAML::Node& spec, const std::string& path, VmSpec& vm) {
    std::string dpath = path + ".domain.devices.disks";
    std::map<std::string, size_t> volume_index;
    for (size_t i = 0; i < vm.volumes.size(); ++i) {
      const auto& v = vm.volumes[i];
      if (v.name.empty()) continue;
      std::string p = path + ".volumes[" + std::to_string(i) + "]";
      if (!volume_index.emplace(v.name, i).second) Error(marks_[p], p + ".name", "volume name \"" + v.name + "\" is used twice");
    }
    std::map<std::string, size_t> disk_names, volume_users, devs;
    std::map<std::string, int> next_dev;  // per prefix
    for (size_t i = 0; i < vm.disks.size(); ++i) {
      auto& d = vm.disks[i];
      std::string p = dpath + "[" + std::to_string(i) + "]";
      const YAML::Node& at = marks_[p];
      if (d.bus.empty()) d.bus = "virtio";
      if (!d.name.empty() && !disk_names.emplace(d.name, i).second) {
        Error(at, p + ".name", "disk name \"" + d.name + "\" is used twice");
      }
      if (!d.volume_name.empty()) {
        if (!volume_index.count(d.volume_name)) {
          Error(at, p + ".volumeName", "volume \"" + d.volume_name + "\" not found");
        } else if (auto [it, fresh] = volume_users.emplace(d.volume_name, i); !fresh) {
          Error(at, p + ".volumeName",
                "volume \"" + d.volume_name + "\" is already used by disks[" + std::to_string(it->second) + "]; each volume backs one disk");
        }
      }
      std::string prefix = d.bus == "virtio" ? "vd" : "sd";
      if (!d.dev.empty()) {
        bool fits = d.dev.size() > 2 && d.dev.compare(0, 2, prefix) == 0 &&
                    std::all_of(d.dev.begin() + 2, d.dev.end(), [](char c) { return c >= 'a' && c <= 'z'; });
        if (!fits) {
          Error(at, p + ".disk.dev", "dev \"" + d.dev + "\" does not fit bus " + d.bus + "; use " + prefix + "a, " + prefix + "b, ...");
        }
      }
    }
    // Default dev names: the first free name of each bus's prefix, in order.
    std::set<std::string> taken;
    for (const auto& d : vm.disks) {
      if (!d.dev.empty()) taken.insert(d.dev);
    }
    for (size_t i = 0; i < vm.disks.size(); ++i) {
      auto& d = vm.disks[i];
      std::string p = dpath + "[" + std::to_string(i) + "]";
      if (!d.dev.empty()) {
        if (auto [it, fresh] = devs.emplace(d.dev, i); !fresh) {
          Error(marks_[p], p + ".disk.dev", "dev \"" + d.dev + "\" is already used by disks[" + std::to_string(it->second) + "]");
        }
        continue;
      }
      std::string prefix = d.bus == "virtio" ? "vd" : "sd";
      int& n = next_dev[prefix];
      std::string name;
      do {
        name = prefix + DevSuffix(n++);
      } while (taken.count(name));
      taken.insert(name);
      d.dev = name;
    }
    if (vm.volumes.empty() && vm.disks.empty()) {
      Error(spec, path + ".volumes", "the VM has no disks; add a volume with registryDisk and a disk that uses it");
    }
    bool any_boot = false;
    std::set<int> boot_orders;
    for (size_t i = 0; i < vm.disks.size(); ++i) {
      const auto& d = vm.disks[i];
      if (!d.boot_order) continue;
      any_boot = true;
      std::string p = dpath + "[" + std::to_string(i) + "]";
      if (!boot_orders.insert(*d.boot_order).second) {
        Error(marks_[p], p + ".bootOrder", "boot order " + std::to_string(*d.boot_order) + " is given to two disks");
      }
    }
    (void)any_boot;
  }

  static std::string DevSuffix(int n) {
    std::string s;
    ++n;
    while (n > 0) {
      --n;
      s.push_back(static_cast<char>('a' + n % 26));
      n /= 26;
    }
    std::reverse(s.begin(), s.end());
    return s;
  }

  struct SecretRef {
    YAML::Node at;
    std::string path;
    std::string name;
    int line_offset = 0;  // of the document the reference is in
  };
  std::vector<SecretRef> TakeSecretRefs() { return std::exchange(secret_refs_, {}); }
  void set_line_offset(int offset) { line_offset_ = offset; }

 private:
  int line_offset_ = 0;
  std::string file_;
  std::vector<Diagnostic>& out_;
  std::map<std::string, YAML::Node> marks_;
  std::vector<SecretRef> secret_refs_;
};

struct Parsed {
  Object object;
  std::vector<Parser::SecretRef> secret_refs;
  YAML::Node doc;
};

std::optional<Object> ParseDocument(Parser& p, const YAML::Node& doc, std::vector<Parser::SecretRef>& refs) {
  if (!doc.IsMap()) {
    p.Error(doc, "", "the document is not a mapping; expected an object with apiVersion, kind, metadata and spec");
    return std::nullopt;
  }
  auto kind = p.String(doc, "kind", "", true);
  auto api = p.String(doc, "apiVersion", "", true);
  if (!kind || !api) return std::nullopt;

  if (*kind == "Secret") {
    p.CheckFields(doc, "", kSecretTopFields);
    if (*api != "v1") p.Error(doc["apiVersion"], "apiVersion", "a Secret has apiVersion v1, not \"" + *api + "\"");
    Secret s;
    s.metadata = p.Metadata(doc, "", true);
    s.type = p.String(doc, "type", "", false).value_or("Opaque");
    std::string raw;
    if (YAML::Node data = doc["data"]; Has(data) && data.IsMap() && Has(data[".dockerconfigjson"]) &&
                                       data[".dockerconfigjson"].IsScalar()) {
      auto decoded = registry::Base64Decode(data[".dockerconfigjson"].Scalar());
      if (!decoded.ok()) {
        p.Error(data[".dockerconfigjson"], "data..dockerconfigjson", "is not valid base64");
      } else {
        raw = *decoded;
      }
    } else if (YAML::Node sd = doc["stringData"]; Has(sd) && sd.IsMap() && Has(sd[".dockerconfigjson"]) &&
                                                  sd[".dockerconfigjson"].IsScalar()) {
      raw = sd[".dockerconfigjson"].Scalar();
    }
    if (s.type == "kubernetes.io/dockerconfigjson") {
      json j = json::parse(raw, nullptr, false);
      if (raw.empty()) {
        p.Error(doc, "data", "a kubernetes.io/dockerconfigjson Secret needs data[.dockerconfigjson]");
      } else if (!j.is_object() || !j.contains("auths")) {
        p.Error(doc, "data..dockerconfigjson", "is not a Docker config JSON with \"auths\"");
      }
    }
    s.docker_config_json = std::move(raw);
    return s;
  }

  const bool v1alpha1 = *api == "kubevirt.io/v1alpha1";
  const bool v1 = *api == "kubevirt.io/v1";
  if (*kind == "VirtualMachineInstanceMigration" || *kind == "VirtualMachineMigration" || *kind == "Migration") {
    p.Error(doc["kind"], "kind",
            "live migration is not possible for VMs on registry disks, which are ephemeral and node-local; stop the VM and "
            "start it on the other node instead");
    return std::nullopt;
  }
  if (*kind != "VirtualMachine" && *kind != "VirtualMachineInstance" && *kind != "VirtualMachineReplicaSet" &&
      *kind != "VirtualMachineInstanceReplicaSet") {
    p.Error(doc["kind"], "kind",
            "kind \"" + *kind + "\" is not supported; use VirtualMachine, VirtualMachineReplicaSet or Secret");
    return std::nullopt;
  }
  if (!v1alpha1 && !v1) {
    p.Error(doc["apiVersion"], "apiVersion",
            "apiVersion \"" + *api + "\" is not supported; use kubevirt.io/v1alpha1 (or kubevirt.io/v1)");
    return std::nullopt;
  }
  p.CheckFields(doc, "", kTopFields);
  YAML::Node spec = doc["spec"];
  if (!spec.IsDefined() || spec.IsNull()) {
    p.Error(doc, "spec", "is required");
    return std::nullopt;
  }

  if (*kind == "VirtualMachineReplicaSet" || *kind == "VirtualMachineInstanceReplicaSet") {
    VirtualMachineReplicaSet rs;
    rs.api_version = *api;
    rs.metadata = p.Metadata(doc, "", true);
    if (!p.CheckFields(spec, "spec", kReplicaSetSpecFields)) return rs;
    if (auto r = p.Int(spec, "replicas", "spec")) {
      if (*r < 0) {
        p.Error(spec["replicas"], "spec.replicas", "must not be negative");
      } else if (*r > 10000) {
        p.Error(spec["replicas"], "spec.replicas", "must be at most 10000");
      } else {
        rs.replicas = static_cast<int>(*r);
      }
    }
    rs.paused = p.Bool(spec, "paused", "spec").value_or(false);
    if (YAML::Node sel = spec["selector"]; sel.IsDefined() && !sel.IsNull()) {
      if (p.CheckFields(sel, "spec.selector", kSelectorFields)) rs.match_labels = p.StringMap(sel, "matchLabels", "spec.selector");
    }
    YAML::Node tmpl = spec["template"];
    if (!tmpl.IsDefined() || tmpl.IsNull()) {
      p.Error(spec, "spec.template", "is required");
    } else if (p.CheckFields(tmpl, "spec.template", kTemplateFields)) {
      rs.template_metadata = p.Metadata(tmpl, "spec.template", false);
      YAML::Node ts = tmpl["spec"];
      if (!ts.IsDefined() || ts.IsNull()) {
        p.Error(tmpl, "spec.template.spec", "is required");
      } else {
        rs.template_spec = p.Spec(ts, "spec.template.spec", *api);
      }
      for (const auto& [k, v] : rs.match_labels) {
        auto it = rs.template_metadata.labels.find(k);
        if (it == rs.template_metadata.labels.end() || it->second != v) {
          p.Error(spec["selector"], "spec.selector.matchLabels",
                  "selector " + k + "=" + v + " does not match the template's labels; the replica set could never see its VMs");
        }
      }
    }
    for (auto& r : p.TakeSecretRefs()) refs.push_back(std::move(r));
    return rs;
  }

  VirtualMachine vm;
  vm.api_version = *api;
  vm.kind = *kind;
  vm.metadata = p.Metadata(doc, "", true);
  if (v1 && *kind == "VirtualMachine" && spec.IsMap() && Has(spec["template"])) {
    // kubevirt.io/v1 nests the instance under spec.template.
    p.CheckFields(spec, "spec", kV1VmFields);
    YAML::Node tmpl = spec["template"];
    if (p.CheckFields(tmpl, "spec.template", kTemplateFields)) {
      YAML::Node ts = tmpl["spec"];
      if (!ts.IsDefined() || ts.IsNull()) {
        p.Error(tmpl, "spec.template.spec", "is required");
      } else {
        vm.spec = p.Spec(ts, "spec.template.spec", *api);
      }
    }
  } else {
    vm.spec = p.Spec(spec, "spec", *api);
  }
  for (auto& r : p.TakeSecretRefs()) refs.push_back(std::move(r));
  return vm;
}

}  // namespace

std::string Diagnostic::ToString() const {
  std::string s = file;
  if (line > 0) s += ":" + std::to_string(line) + ":" + std::to_string(column);
  s += ": ";
  if (severity == Severity::kWarning) s += "warning: ";
  if (!path.empty()) s += path + ": ";
  return s + message;
}

bool ParseResult::ok() const {
  return std::none_of(diagnostics.begin(), diagnostics.end(),
                      [](const Diagnostic& d) { return d.severity == Diagnostic::Severity::kError; });
}

ParseResult ParseSpecs(std::string_view text, std::string_view file_name) {
  ParseResult result;
  Parser p(file_name, result.diagnostics);
  if (auto refusal = PreCheck(text)) {
    result.diagnostics.push_back(
        {Diagnostic::Severity::kError, std::string(file_name), refusal->line, refusal->column, "", refusal->why});
    return result;
  }
  std::vector<Parser::SecretRef> refs;
  for (const Chunk& chunk : SplitDocuments(text)) {
    p.set_line_offset(chunk.first_line);
    YAML::Node doc;
    try {
      doc = YAML::Load(chunk.text);
      ChunkScan scan = ScanChunk(chunk.text);
      if (scan.trailing_content) {
        result.diagnostics.push_back({Diagnostic::Severity::kError, std::string(file_name), chunk.first_line + 1, 1, "",
                                      "not valid YAML or JSON: unexpected content after the document"});
        continue;
      }
      if (scan.not_utf8) {
        result.diagnostics.push_back({Diagnostic::Severity::kError, std::string(file_name),
                                      scan.not_utf8->line + 1 + chunk.first_line, scan.not_utf8->column + 1, "",
                                      "the text here is not valid UTF-8; save the file as UTF-8"});
        continue;
      }
    } catch (const YAML::Exception& e) {
      Diagnostic d;
      d.file = std::string(file_name);
      if (e.mark.line >= 0) {
        d.line = e.mark.line + 1 + chunk.first_line;
        d.column = e.mark.column + 1;
      }
      d.message = "not valid YAML or JSON: " + e.msg;
      result.diagnostics.push_back(std::move(d));
      continue;
    }
    if (!doc.IsDefined() || doc.IsNull()) continue;  // an empty document between markers
    try {
      if (auto obj = ParseDocument(p, doc, refs)) result.objects.push_back(std::move(*obj));
    } catch (const std::exception& e) {
      result.diagnostics.push_back({Diagnostic::Severity::kError, std::string(file_name), chunk.first_line + 1, 0, "",
                                    std::string("could not be read: ") + e.what()});
    }
  }
  if (result.objects.empty() && result.ok()) {
    p.Error(YAML::Node(), "", "the file holds no objects; expected a VirtualMachine or VirtualMachineReplicaSet");
  }
  // imagePullSecret must name a dockerconfigjson Secret of this file.
  for (const auto& ref : refs) {
    p.set_line_offset(ref.line_offset);
    const Secret* found = nullptr;
    for (const auto& o : result.objects) {
      if (auto* s = std::get_if<Secret>(&o); s && s->metadata.name == ref.name) found = s;
    }
    if (!found) {
      p.Error(ref.at, ref.path, "Secret \"" + ref.name + "\" is not in this file; add it (type kubernetes.io/dockerconfigjson)");
    } else if (found->type != "kubernetes.io/dockerconfigjson") {
      p.Error(ref.at, ref.path,
              "Secret \"" + ref.name + "\" has type " + found->type + "; an image pull secret must be kubernetes.io/dockerconfigjson");
    }
  }
  return result;
}

std::string Describe(const Object& object) {
  std::string kind;
  const ObjectMeta* meta = nullptr;
  if (auto* vm = std::get_if<VirtualMachine>(&object)) {
    kind = vm->kind;
    meta = &vm->metadata;
  } else if (auto* rs = std::get_if<VirtualMachineReplicaSet>(&object)) {
    kind = "VirtualMachineReplicaSet";
    meta = &rs->metadata;
  } else {
    kind = "Secret";
    meta = &std::get<Secret>(object).metadata;
  }
  return kind + " " + meta->namespace_ + "/" + meta->name;
}

namespace {

json MetaJson(const ObjectMeta& m, bool with_namespace = true) {
  json j = json::object();
  if (!m.name.empty()) j["name"] = m.name;
  if (with_namespace) j["namespace"] = m.namespace_;
  if (!m.labels.empty()) j["labels"] = m.labels;
  if (!m.annotations.empty()) j["annotations"] = m.annotations;
  return j;
}

json SpecJson(const VmSpec& s) {
  json requests = {{"memory", std::to_string(s.memory_bytes)}};
  if (s.cpu_millis > 0) requests["cpu"] = std::to_string(s.cpu_millis) + "m";
  json disks = json::array();
  for (const auto& d : s.disks) {
    json dj = {{"name", d.name}, {"volumeName", d.volume_name}, {"disk", {{"dev", d.dev}, {"bus", d.bus}}}};
    if (d.read_only) dj["disk"]["readOnly"] = true;
    if (d.boot_order) dj["bootOrder"] = *d.boot_order;
    disks.push_back(dj);
  }
  json volumes = json::array();
  for (const auto& v : s.volumes) {
    json vj = {{"name", v.name}};
    if (v.registry_disk) {
      const auto& r = *v.registry_disk;
      json rj = {{"image", r.image}, {"imagePullPolicy", r.image_pull_policy}};
      if (!r.image_pull_secret.empty()) rj["imagePullSecret"] = r.image_pull_secret;
      if (!r.path.empty()) rj["path"] = r.path;
      vj[r.field] = rj;
    }
    volumes.push_back(vj);
  }
  return {{"domain", {{"resources", {{"requests", requests}}}, {"cpu", {{"cores", s.cores}}}, {"devices", {{"disks", disks}}}}},
          {"volumes", volumes}};
}

}  // namespace

json ToJson(const Object& object) {
  if (auto* vm = std::get_if<VirtualMachine>(&object)) {
    return {{"apiVersion", vm->api_version}, {"kind", vm->kind}, {"metadata", MetaJson(vm->metadata)}, {"spec", SpecJson(vm->spec)}};
  }
  if (auto* rs = std::get_if<VirtualMachineReplicaSet>(&object)) {
    json spec = {{"replicas", rs->replicas},
                 {"template", {{"metadata", MetaJson(rs->template_metadata, false)}, {"spec", SpecJson(rs->template_spec)}}}};
    if (!rs->match_labels.empty()) spec["selector"] = {{"matchLabels", rs->match_labels}};
    if (rs->paused) spec["paused"] = true;
    return {{"apiVersion", rs->api_version}, {"kind", "VirtualMachineReplicaSet"}, {"metadata", MetaJson(rs->metadata)}, {"spec", spec}};
  }
  const auto& s = std::get<Secret>(object);
  // The credentials themselves are never printed.
  return {{"apiVersion", "v1"}, {"kind", "Secret"}, {"metadata", MetaJson(s.metadata)}, {"type", s.type}};
}

}  // namespace regdisk::spec
