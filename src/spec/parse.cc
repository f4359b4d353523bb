// Parsing and validation of VM specs (see spec.h). Each document is first
// checked against KubeVirt's OpenAPI schema (spec/schema.h: field names,
// types, required fields, what regdisk implements); then the fields regdisk
// implements are read into the model and checked against the rules the
// schema cannot express (references between disks and volumes, quantities,
// image references, defaults).
#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/parser.h>
#include <yaml-cpp/yaml.h>

#include <cerrno>
#include <climits>
#include <cstdint>
#include <sstream>
#include <tuple>

#include <algorithm>
#include <array>
#include <set>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include "oci/reference.h"
#include "registry/http.h"
#include "spec/quantity.h"
#include "spec/schema.h"
#include "spec/spec.h"
#include "util/ipv4.h"
#include "util/text.h"

namespace regdisk::spec {

using json = nlohmann::json;

namespace {

constexpr size_t kMaxInputBytes = 1 << 20;
constexpr size_t kMaxDiagnostics = 200;
constexpr int kMaxFlowDepth = 64;
constexpr size_t kMaxIndent = 256;
constexpr size_t kMaxListItems = 256;

// A Secret is core Kubernetes, not KubeVirt: its few top-level fields are
// listed here; its metadata is checked against the schema's ObjectMeta.
const std::vector<std::string_view> kSecretTopFields = {"apiVersion", "kind", "metadata", "type",
                                                        "data",       "stringData", "immutable"};
const char kObjectMeta[] = "k8s.io.apimachinery.pkg.apis.meta.v1.ObjectMeta";

// True when a looked-up node exists and is not null. yaml-cpp hands back an
// invalid node for a missing key, on which everything but IsDefined throws.
bool Has(const YAML::Node& n) { return n.IsDefined() && !n.IsNull(); }


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

  // Checks `node` against a definition of KubeVirt's schema.
  void SchemaCheck(const KubeVirtSchema& schema, const YAML::Node& node, const std::string& definition,
                   const std::string& path) {
    SchemaChecker checker(schema, [this](SchemaChecker::Level level, const YAML::Node& at, const std::string& p,
                                         const std::string& msg) {
      Report(level == SchemaChecker::Level::kError ? Diagnostic::Severity::kError : Diagnostic::Severity::kWarning, at,
             p, msg);
    });
    checker.Check(node, definition, path);
  }

  // A Secret's top-level fields (not KubeVirt's, so not in its schema).
  void CheckSecretFields(const YAML::Node& doc) {
    for (auto it = doc.begin(); it != doc.end(); ++it) {
      if (!it->first.IsScalar()) {
        Error(it->first, "", "has a field name that is not a string");
        continue;
      }
      const std::string& key = it->first.Scalar();
      if (std::find(kSecretTopFields.begin(), kSecretTopFields.end(), key) != kSecretTopFields.end()) continue;
      std::string best;
      size_t best_d = 1000;
      for (auto candidate : kSecretTopFields) {
        if (size_t d = EditDistance(key, candidate, true); d < best_d) {
          best_d = d;
          best = std::string(candidate);
        }
      }
      std::string msg = "unknown field \"" + key + "\"";
      if (best_d <= std::max<size_t>(2, key.size() / 3)) msg += "; did you mean \"" + best + "\"?";
      Error(it->first, key, msg);
    }
  }

  static std::string Join(const std::string& path, const std::string& key) {
    return path.empty() ? key : path + "." + key;
  }

  // The getters below read what the schema check has already typed: a
  // missing, null or mistyped value is std::nullopt (the schema check has
  // said what is wrong with it).
  static YAML::Node Child(const YAML::Node& map, const char* key) {
    if (!map.IsDefined() || !map.IsMap()) return YAML::Node(YAML::NodeType::Undefined);
    YAML::Node n = map[key];
    return n;
  }
  static std::optional<std::string> Str(const YAML::Node& map, const char* key) {
    YAML::Node n = Child(map, key);
    if (!Has(n) || !n.IsScalar() || YamlType(n) != "string") return std::nullopt;
    return n.Scalar();
  }
  static std::optional<int64_t> Integer(const YAML::Node& map, const char* key) {
    YAML::Node n = Child(map, key);
    if (!Has(n) || !n.IsScalar() || YamlType(n) != "integer") return std::nullopt;
    std::string text = n.Scalar();
    text.erase(std::remove(text.begin(), text.end(), '_'), text.end());
    errno = 0;
    char* end = nullptr;
    long long v = std::strtoll(text.c_str(), &end, 0);
    if (errno == ERANGE || v < INT32_MIN || v > INT32_MAX) return std::nullopt;
    return v;
  }
  static std::optional<bool> Boolean(const YAML::Node& map, const char* key) {
    YAML::Node n = Child(map, key);
    if (!Has(n) || !n.IsScalar() || YamlType(n) != "boolean") return std::nullopt;
    static const std::set<std::string_view> kTrue = {"y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"};
    return kTrue.count(n.Scalar()) > 0;
  }
  static std::optional<Quantity> Qty(const YAML::Node& map, const char* key) {
    YAML::Node n = Child(map, key);
    if (!Has(n) || !n.IsScalar()) return std::nullopt;
    std::string type = YamlType(n);
    if (type != "string" && type != "integer" && type != "number") return std::nullopt;
    return Quantity{n.Scalar(), type != "string"};
  }
  static std::map<std::string, std::string> StringMap(const YAML::Node& map, const char* key) {
    std::map<std::string, std::string> out;
    YAML::Node n = Child(map, key);
    if (!Has(n) || !n.IsMap()) return out;
    for (auto it = n.begin(); it != n.end(); ++it) {
      if (it->first.IsScalar() && it->second.IsScalar() && YamlType(it->second) == "string") {
        out[it->first.Scalar()] = it->second.Scalar();
      }
    }
    return out;
  }

  ObjectMeta Metadata(const YAML::Node& doc, const std::string& path, bool name_required) {
    ObjectMeta m;
    YAML::Node n = Child(doc, "metadata");
    std::string p = Join(path, "metadata");
    if (!Has(n) || !n.IsMap()) {
      if (name_required && !Has(n)) Error(doc, p + ".name", "is required");
      return m;
    }
    if (auto name = Str(n, "name")) {
      m.name = *name;
      if (!IsDnsSubdomain(m.name)) {
        Error(n["name"], p + ".name",
              "\"" + m.name + "\" is not a valid name; use lowercase letters, digits, '-' and '.', at most 253 characters");
      }
    } else if (name_required && !Has(Child(n, "name"))) {
      Error(n, p + ".name", "is required");
    }
    if (auto ns = Str(n, "namespace"); ns && !ns->empty()) {
      // A DNS label, as Kubernetes requires: it names files on the node.
      if (ns->size() > 63 || ns->find('.') != std::string::npos || !IsDnsSubdomain(*ns)) {
        Error(n["namespace"], p + ".namespace",
              "\"" + *ns + "\" is not a valid namespace; use lowercase letters, digits and '-', at most 63 characters");
      } else {
        m.namespace_ = *ns;
      }
    }
    m.labels = StringMap(n, "labels");
    m.annotations = StringMap(n, "annotations");
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
    if (!spec.IsMap()) return vm;
    const bool v1 = api_version == "kubevirt.io/v1";
    YAML::Node domain = Child(spec, "domain");
    std::string dp = path + ".domain";
    if (Has(domain) && domain.IsMap()) {
      Memory(domain, dp, vm);
      YAML::Node cpu = Child(domain, "cpu");
      if (auto cores = Integer(cpu, "cores")) {
        if (*cores < 1 || *cores > 512) {
          Error(cpu["cores"], dp + ".cpu.cores", "must be between 1 and 512");
        } else {
          vm.cores = static_cast<int>(*cores);
          vm.cores_given = true;
        }
      }
      YAML::Node devices = Child(domain, "devices");
      Disks(Child(devices, "disks"), dp + ".devices.disks", v1, vm);
      Interfaces(Child(devices, "interfaces"), dp + ".devices.interfaces", vm);
      vm.autoattach_pod_interface = Boolean(devices, "autoattachPodInterface").value_or(true);
    }
    Volumes(Child(spec, "volumes"), path + ".volumes", api_version, vm);
    Networks(Child(spec, "networks"), path + ".networks", vm);
    CrossCheck(spec, path, v1, vm);
    NetworkCheck(spec, path, vm);
    return vm;
  }

  void Interfaces(const YAML::Node& list, const std::string& path, VmSpec& vm) {
    if (!Has(list) || !list.IsSequence() || list.size() > kMaxListItems) return;
    static const std::set<std::string_view> kModels = {"virtio", "e1000", "e1000e", "rtl8139", "ne2k_pci", "pcnet"};
    for (size_t i = 0; i < list.size(); ++i) {
      YAML::Node n = list[i];
      std::string p = path + "[" + std::to_string(i) + "]";
      marks_[p] = n;
      Interface iface;
      if (!n.IsMap()) continue;
      iface.name = Str(n, "name").value_or("");
      std::vector<std::string> bindings;
      for (auto it = n.begin(); it != n.end(); ++it) {
        if (!it->first.IsScalar()) continue;
        const std::string& k = it->first.Scalar();
        if (k == "masquerade" || k == "bridge" || k == "slirp" || k == "sriov" || k == "macvtap" || k == "passt" ||
            k == "passtBinding" || k == "binding") {
          bindings.push_back(k);
        }
      }
      if (bindings.size() > 1) {
        Error(n, p, "interface \"" + iface.name + "\" has " + bindings[0] + " and " + bindings[1] +
                        "; an interface has one binding");
      } else if (bindings.size() == 1 && bindings[0] != "masquerade" && bindings[0] != "bridge") {
        std::string what = bindings[0];
        if (what == "binding") what = "the network binding plugin " + Str(n["binding"], "name").value_or("");
        Error(n[bindings[0]], p + "." + bindings[0],
              "regdisk connects interfaces with masquerade (user-mode networking, no root needed) or bridge, not " +
                  what + "; use masquerade: {}");
      } else if (bindings.size() == 1) {
        iface.binding = bindings[0];
      }
      iface.model = Str(n, "model").value_or("virtio");
      if (!kModels.count(iface.model)) {
        Error(n["model"], p + ".model",
              "model \"" + iface.model + "\" is not supported; use virtio (the default), e1000, e1000e, rtl8139, ne2k_pci or pcnet");
      }
      iface.mac_address = Str(n, "macAddress").value_or("");
      if (!iface.mac_address.empty()) {
        if (std::string why = MacProblem(iface.mac_address); !why.empty()) {
          Error(n["macAddress"], p + ".macAddress",
                Printable(iface.mac_address, 40) + " " + why +
                    "; give a unicast address (six hex pairs, first octet even), e.g. 02:00:00:00:00:01");
        }
      }
      YAML::Node ports = Child(n, "ports");
      std::set<std::pair<int, std::string>> seen;
      if (Has(ports) && ports.IsSequence() && ports.size() <= kMaxListItems) {
        for (size_t j = 0; j < ports.size(); ++j) {
          YAML::Node pn = ports[j];
          std::string pp = p + ".ports[" + std::to_string(j) + "]";
          if (!pn.IsMap()) continue;
          Port port;
          port.name = Str(pn, "name").value_or("");
          port.protocol = Str(pn, "protocol").value_or("TCP");
          if (auto num = Integer(pn, "port")) {
            if (*num < 1 || *num > 65535) {
              Error(pn["port"], pp + ".port", "must be between 1 and 65535");
            } else {
              port.port = static_cast<int>(*num);
            }
          }
          if (port.protocol != "TCP" && port.protocol != "UDP") {
            Error(pn["protocol"], pp + ".protocol", "\"" + port.protocol + "\" is not a protocol regdisk publishes; use TCP or UDP");
          }
          if (port.port && !seen.emplace(port.port, port.protocol).second) {
            Error(pn, pp, "port " + std::to_string(port.port) + "/" + port.protocol + " is listed twice");
          }
          iface.ports.push_back(port);
        }
      }
      vm.interfaces.push_back(iface);
    }
  }

  // Why `mac` cannot be a NIC's address, or empty when it can: six hex
  // pairs with one separator (':' or '-') throughout, as KubeVirt parses it,
  // and unicast and non-zero, as libvirt and QEMU need it.
  static std::string MacProblem(std::string_view mac) {
    bool form = mac.size() == 17 && (mac[2] == ':' || mac[2] == '-');
    for (size_t i = 0; form && i < mac.size(); ++i) {
      form = i % 3 == 2 ? mac[i] == mac[2] : std::isxdigit(static_cast<unsigned char>(mac[i])) != 0;
    }
    if (!form) return "is not a MAC address";
    std::string digits;
    for (size_t i = 0; i < mac.size(); ++i) {
      if (i % 3 != 2) digits += static_cast<char>(std::tolower(static_cast<unsigned char>(mac[i])));
    }
    if (digits == std::string(12, '0')) return "is the all-zero MAC address, which no NIC can have";
    if (digits == std::string(12, 'f')) return "is the broadcast MAC address, which no NIC can have";
    if (std::stoi(digits.substr(0, 2), nullptr, 16) & 1) {
      return "is a multicast MAC address (the lowest bit of its first octet is set), which no NIC can have";
    }
    return "";
  }

  void Networks(const YAML::Node& list, const std::string& path, VmSpec& vm) {
    if (!Has(list) || !list.IsSequence() || list.size() > kMaxListItems) return;
    for (size_t i = 0; i < list.size(); ++i) {
      YAML::Node n = list[i];
      std::string p = path + "[" + std::to_string(i) + "]";
      marks_[p] = n;
      if (!n.IsMap()) continue;
      Network net;
      net.name = Str(n, "name").value_or("");
      net.pod = Has(Child(n, "pod"));
      if (Has(Child(n, "multus")) || Has(Child(n, "resourceClaim"))) {
        Error(n, p, "network \"" + net.name + "\" is not a pod network; regdisk gives a VM only the pod network "
                    "(user-mode networking, or a host bridge with regdisk run --network bridge=NAME)");
      } else if (!Has(Child(n, "pod"))) {
        Error(n, p, "network \"" + net.name + "\" has no source; give pod: {}");
      }
      YAML::Node pod = Child(n, "pod");
      if (auto cidr = Str(pod, "vmNetworkCIDR")) {
        if (auto why = CidrProblem(*cidr)) {
          Error(pod["vmNetworkCIDR"], p + ".pod.vmNetworkCIDR", *why);
        } else {
          net.vm_network_cidr = *cidr;
        }
      }
      vm.networks.push_back(net);
    }
  }

  // Why an IPv4 CIDR cannot be the VM's network, or nothing.
  static std::optional<std::string> CidrProblem(const std::string& cidr) {
    auto parsed = ParseIpv4Cidr(cidr);
    if (!parsed.ok()) return parsed.status().message();
    return std::nullopt;
  }

  // Interfaces and networks pair up by name, as in KubeVirt; KubeVirt's
  // default pod interface is added when neither is given.
  void NetworkCheck(const YAML::Node& spec, const std::string& path, VmSpec& vm) {
    const std::string ipath = path + ".domain.devices.interfaces";
    const std::string npath = path + ".networks";
    if (vm.interfaces.empty() && vm.networks.empty()) {
      if (vm.autoattach_pod_interface) {
        Interface iface;
        iface.name = "default";
        vm.interfaces.push_back(iface);
        Network net;
        net.name = "default";
        net.pod = true;
        vm.networks.push_back(net);
      }
      return;
    }
    std::map<std::string, size_t> nets, ifaces;
    int pods = 0;
    for (size_t i = 0; i < vm.networks.size(); ++i) {
      std::string p = npath + "[" + std::to_string(i) + "]";
      if (!vm.networks[i].name.empty() && !nets.emplace(vm.networks[i].name, i).second) {
        Error(marks_[p], p + ".name", "network name \"" + vm.networks[i].name + "\" is used twice");
      }
      if (vm.networks[i].pod && ++pods == 2) Error(marks_[p], p, "a VM has at most one pod network (as in KubeVirt)");
    }
    for (size_t i = 0; i < vm.interfaces.size(); ++i) {
      const Interface& iface = vm.interfaces[i];
      std::string p = ipath + "[" + std::to_string(i) + "]";
      if (iface.name.empty()) continue;
      if (!ifaces.emplace(iface.name, i).second) {
        Error(marks_[p], p + ".name", "interface name \"" + iface.name + "\" is used twice");
      } else if (!nets.count(iface.name)) {
        Error(marks_[p], p + ".name",
              "interface \"" + iface.name + "\" has no network of the same name; add one to spec.networks (pod: {})");
      }
    }
    for (size_t i = 0; i < vm.networks.size(); ++i) {
      std::string p = npath + "[" + std::to_string(i) + "]";
      if (!vm.networks[i].name.empty() && !ifaces.count(vm.networks[i].name)) {
        Error(marks_[p], p + ".name",
              "network \"" + vm.networks[i].name + "\" has no interface of the same name; add one to "
              "spec.domain.devices.interfaces (masquerade: {})");
      }
    }
    (void)spec;
  }

  // A memory size from a quantity; 0 after an error.
  int64_t MemoryBytes(const YAML::Node& at, const std::string& path, const Quantity& q) {
    auto bytes = ParseQuantity(q.text, 1);
    if (!bytes.ok()) {
      Error(at, path, bytes.status().message());
    } else if (*bytes == 0) {
      Error(at, path, "must be more than zero");
    } else if (*bytes < (1 << 20)) {
      Error(at, path, "\"" + q.text + "\" is less than 1 MiB; did you mean " + q.text + "i or " + q.text + "M?");
    } else {
      return *bytes;
    }
    return 0;
  }

  // requests.memory, or domain.memory.guest (which wins, as in KubeVirt).
  void Memory(const YAML::Node& domain, const std::string& dp, VmSpec& vm) {
    YAML::Node req = Child(Child(domain, "resources"), "requests");
    std::string qp = dp + ".resources.requests";
    YAML::Node guest_at = Child(Child(domain, "memory"), "guest");
    if (auto guest = Qty(Child(domain, "memory"), "guest")) {
      vm.guest_memory = *guest;
      vm.memory_bytes = MemoryBytes(guest_at, dp + ".memory.guest", *guest);
    }
    if (auto mem = Qty(req, "memory")) {
      vm.memory = *mem;
      int64_t bytes = MemoryBytes(req["memory"], qp + ".memory", *mem);
      if (vm.guest_memory.text.empty()) vm.memory_bytes = bytes;
    } else if (vm.guest_memory.text.empty() && !Has(Child(req, "memory")) && !Has(guest_at)) {
      Error(Has(req) ? req : domain, qp + ".memory",
            instancetype_.empty()
                ? "is required; give the VM's memory, e.g. 64M or 1Gi (or domain.memory.guest)"
                : "is required: the VM's memory would come from instancetype " + instancetype_ +
                      ", which lives in the cluster and regdisk cannot read; give domain.memory.guest");
    }
    if (auto cpu = Qty(req, "cpu")) {
      vm.cpu = *cpu;
      auto millis = ParseQuantity(cpu->text, 1000);
      if (!millis.ok()) {
        Error(req["cpu"], qp + ".cpu", millis.status().message());
      } else if (*millis == 0) {
        Error(req["cpu"], qp + ".cpu", "must be more than zero");
      } else {
        vm.cpu_millis = *millis;
      }
    }
    if (Has(req) && req.IsMap()) {
      for (auto it = req.begin(); it != req.end(); ++it) {
        if (!it->first.IsScalar() || it->first.Scalar() == "memory" || it->first.Scalar() == "cpu") continue;
        Warn(it->first, qp + "." + it->first.Scalar(), "is not a resource regdisk implements; it is ignored");
      }
    }
  }

  void Disks(const YAML::Node& list, const std::string& path, bool v1, VmSpec& vm) {
    if (!Has(list) || !list.IsSequence() || list.size() > kMaxListItems) return;
    for (size_t i = 0; i < list.size(); ++i) {
      YAML::Node d = list[i];
      std::string p = path + "[" + std::to_string(i) + "]";
      Disk disk;
      marks_[p] = d;
      if (!d.IsMap()) {
        vm.disks.push_back(disk);
        continue;
      }
      disk.name = Str(d, "name").value_or("");
      disk.volume_name = v1 ? disk.name : Str(d, "volumeName").value_or("");
      if (auto b = Integer(d, "bootOrder")) {
        if (*b < 1) {
          Error(d["bootOrder"], p + ".bootOrder", "must be 1 or more");
        } else {
          disk.boot_order = static_cast<int>(*b);
        }
      }
      std::vector<std::string> targets;
      for (const char* t : {"disk", "cdrom", "lun", "floppy"}) {
        if (Child(d, t).IsDefined()) targets.push_back(t);
      }
      if (targets.size() > 1) {
        Error(d, p, "disk \"" + disk.name + "\" has " + targets[0] + " and " + targets[1] +
                        "; a disk is exactly one of disk, cdrom or lun");
      }
      if (!targets.empty() && (targets[0] == "lun" || targets[0] == "floppy")) {
        Error(Child(d, targets[0].c_str()), p + "." + targets[0],
              "regdisk attaches registry disks as disk or cdrom, not " + targets[0] + "; use disk: {} or cdrom: {}");
      }
      if (!targets.empty() && targets[0] == "cdrom") disk.device = "cdrom";
      YAML::Node target = Child(d, disk.device == "cdrom" ? "cdrom" : "disk");
      std::string tp = p + "." + disk.device;
      if (disk.device == "disk") disk.dev = Str(target, "dev").value_or("");
      disk.bus = Str(target, "bus").value_or("");
      std::optional<bool> ro = Boolean(target, "readonly");
      if (!ro) ro = Boolean(target, "readOnly");
      disk.read_only = ro.value_or(disk.device == "cdrom");  // a cdrom is read-only unless said otherwise
      if (!disk.bus.empty() && disk.bus != "virtio" && disk.bus != "sata" && disk.bus != "scsi") {
        Error(target["bus"], tp + ".bus", "bus \"" + disk.bus + "\" is not supported; use virtio, sata or scsi");
      }
      if (disk.device == "cdrom") {
        if (disk.bus == "virtio") {
          Error(target["bus"], tp + ".bus", "bus virtio is invalid for a cdrom (as in KubeVirt); use sata or scsi");
        }
        if (!disk.read_only) {
          YAML::Node at = Child(target, "readonly").IsDefined() ? Child(target, "readonly") : Child(target, "readOnly");
          Error(at, tp + ".readonly", "a cdrom in regdisk is read-only; leave readonly out, or use disk: for a writable disk");
        }
      }
      vm.disks.push_back(disk);
    }
  }

  void Volumes(const YAML::Node& list, const std::string& path, const std::string& api_version, VmSpec& vm) {
    if (!Has(list) || !list.IsSequence() || list.size() > kMaxListItems) return;
    const bool v1 = api_version == "kubevirt.io/v1";
    for (size_t i = 0; i < list.size(); ++i) {
      YAML::Node v = list[i];
      std::string p = path + "[" + std::to_string(i) + "]";
      Volume vol;
      marks_[p] = v;
      if (!v.IsMap()) {
        vm.volumes.push_back(vol);
        continue;
      }
      vol.name = Str(v, "name").value_or("");
      std::vector<std::string> sources;
      for (auto it = v.begin(); it != v.end(); ++it) {
        if (it->first.IsScalar() && it->first.Scalar() != "name") sources.push_back(it->first.Scalar());
      }
      if (sources.empty()) {
        Error(v, p, "volume \"" + vol.name + "\" has no source; give " + (v1 ? "containerDisk" : "registryDisk") +
                        ": {image: ...}");
      } else if (sources.size() > 1) {
        Error(v, p, "volume \"" + vol.name + "\" has " + std::to_string(sources.size()) + " sources (" + sources[0] +
                        ", " + sources[1] + "); a volume has exactly one");
      }
      for (const char* field : {"registryDisk", "containerDisk"}) {
        YAML::Node src = Child(v, field);
        if (!Has(src) || !src.IsMap()) continue;
        vol.registry_disk = RegistryDisk(src, p + "." + field, field);
      }
      if (YAML::Node src = Child(v, "cloudInitNoCloud"); Has(src) && src.IsMap()) {
        vol.cloud_init_no_cloud = CloudInit(src, p + ".cloudInitNoCloud");
      }
      if (YAML::Node src = Child(v, "emptyDisk"); Has(src) && src.IsMap()) {
        EmptyDiskSource e;
        if (auto c = Qty(src, "capacity")) {
          e.capacity = *c;
          auto bytes = ParseQuantity(c->text, 1);
          if (!bytes.ok()) {
            Error(src["capacity"], p + ".emptyDisk.capacity", bytes.status().message());
          } else if (*bytes == 0) {
            Error(src["capacity"], p + ".emptyDisk.capacity", "must be more than zero");
          } else {
            e.capacity_bytes = *bytes;
          }
        }
        vol.empty_disk = e;
      }
      vm.volumes.push_back(vol);
    }
  }

  CloudInitNoCloudSource CloudInit(const YAML::Node& src, const std::string& p) {
    CloudInitNoCloudSource c;
    c.user_data = Str(src, "userData").value_or("");
    c.user_data_base64 = Str(src, "userDataBase64").value_or("");
    c.network_data = Str(src, "networkData").value_or("");
    c.network_data_base64 = Str(src, "networkDataBase64").value_or("");
    c.user_data_secret = Str(Child(src, "secretRef"), "name").value_or("");
    c.network_data_secret = Str(Child(src, "networkDataSecretRef"), "name").value_or("");
    for (const auto& [field, name, purpose] : {std::tuple{"secretRef", c.user_data_secret, SecretPurpose::kUserData},
                                               std::tuple{"networkDataSecretRef", c.network_data_secret,
                                                          SecretPurpose::kNetworkData}}) {
      if (!Has(Child(src, field))) continue;
      if (name.empty()) {
        Error(src[field], p + "." + field + ".name", "is required: the name of a Secret in this file");
      } else {
        secret_refs_.push_back({src[field], p + "." + field, name, line_offset_, purpose});
      }
    }
    const bool secret = Has(Child(src, "secretRef"));
    int user = !c.user_data.empty() + !c.user_data_base64.empty() + secret;
    if (user > 1) {
      Error(src, p, "give only one of userData, userDataBase64 and secretRef");
    } else if (src.size() == 0) {
      Error(src, p, "is empty; give userData (or userDataBase64, or networkData)");
    }
    int network = !c.network_data.empty() + !c.network_data_base64.empty() + Has(Child(src, "networkDataSecretRef"));
    if (network > 1) {
      Error(src, p, "give only one of networkData, networkDataBase64 and networkDataSecretRef");
    }
    for (const char* field : {"userDataBase64", "networkDataBase64"}) {
      if (auto b64 = Str(src, field); b64 && !b64->empty() && !registry::Base64Decode(*b64).ok()) {
        Error(src[field], p + "." + field, "is not valid base64");
      }
    }
    return c;
  }

  RegistryDiskSource RegistryDisk(const YAML::Node& src, const std::string& p, const std::string& field) {
    RegistryDiskSource r;
    r.field = field;
    r.image = Str(src, "image").value_or("");
    bool latest = false;
    if (!r.image.empty()) {
      auto ref = oci::Reference::Parse(r.image);
      if (!ref.ok()) {
        Error(src["image"], p + ".image", ref.status().message());
      } else {
        latest = !ref->digest && ref->tag == "latest";
      }
    }
    r.image_pull_secret = Str(src, "imagePullSecret").value_or("");
    if (!r.image_pull_secret.empty()) {
      secret_refs_.push_back({src["imagePullSecret"], p + ".imagePullSecret", r.image_pull_secret, line_offset_});
    }
    // The schema holds the policy to Always, IfNotPresent or Never.
    r.image_pull_policy = Str(src, "imagePullPolicy").value_or("");
    if (r.image_pull_policy.empty()) r.image_pull_policy = latest ? "Always" : "IfNotPresent";
    r.path = Str(src, "path").value_or("");
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

  // Rules that relate disks and volumes; applies KubeVirt's defaults: in
  // v1 a volume without a disk gets one of its name, and buses default to
  // sata (KubeVirt on amd64); in v1alpha1 disks default to virtio.
  void CrossCheck(const YAML::Node& spec, const std::string& path, bool v1, VmSpec& vm) {
    std::string dpath = path + ".domain.devices.disks";
    std::map<std::string, size_t> volume_index;
    for (size_t i = 0; i < vm.volumes.size(); ++i) {
      const auto& v = vm.volumes[i];
      if (v.name.empty()) continue;
      std::string p = path + ".volumes[" + std::to_string(i) + "]";
      if (!volume_index.emplace(v.name, i).second) Error(marks_[p], p + ".name", "volume name \"" + v.name + "\" is used twice");
    }
    if (v1) {
      std::set<std::string> named;
      for (const auto& d : vm.disks) named.insert(d.name);
      for (size_t i = 0; i < vm.volumes.size(); ++i) {
        const auto& v = vm.volumes[i];
        if (v.name.empty() || named.count(v.name)) continue;
        named.insert(v.name);
        Disk d;
        d.name = d.volume_name = v.name;
        marks_[dpath + "[" + std::to_string(vm.disks.size()) + "]"] = marks_[path + ".volumes[" + std::to_string(i) + "]"];
        vm.disks.push_back(d);
      }
    }
    std::map<std::string, size_t> disk_names, volume_users, devs;
    std::map<std::string, int> next_dev;  // per prefix
    for (size_t i = 0; i < vm.disks.size(); ++i) {
      auto& d = vm.disks[i];
      std::string p = dpath + "[" + std::to_string(i) + "]";
      const YAML::Node& at = marks_[p];
      if (d.bus.empty()) d.bus = v1 || d.device == "cdrom" ? "sata" : "virtio";
      if (d.device == "disk" && d.bus == "sata" && d.read_only) {
        Error(at, p + ".disk.bus",
              "sata hard disks cannot be read-only (QEMU's ide-hd refuses it, and so does KubeVirt); use cdrom: {bus: "
              "sata} for a read-only SATA device, or bus virtio or scsi");
      }
      if (!d.name.empty() && !disk_names.emplace(d.name, i).second) {
        Error(at, p + ".name", "disk name \"" + d.name + "\" is used twice");
      }
      if (!d.volume_name.empty()) {
        const std::string field = v1 ? ".name" : ".volumeName";
        if (!volume_index.count(d.volume_name)) {
          std::string msg = "volume \"" + d.volume_name + "\" not found";
          if (v1 && d.device == "cdrom") {
            msg = "cdrom \"" + d.name + "\" has no volume of the same name; regdisk does not insert media into an "
                  "empty cdrom later (hotplug), so add a volume named \"" + d.name + "\"";
          } else if (v1) {
            msg = "disk \"" + d.name + "\" has no volume of the same name; add a volume named \"" + d.name + "\"";
          }
          Error(at, p + field, msg);
        } else if (auto [it, fresh] = volume_users.emplace(d.volume_name, i); !fresh) {
          Error(at, p + field,
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
      Error(spec, path + ".volumes",
            std::string("the VM has no disks; add a volume with ") + (v1 ? "containerDisk" : "registryDisk") +
                " and a disk that uses it");
    }
    std::set<int> boot_orders;
    for (size_t i = 0; i < vm.disks.size(); ++i) {
      const auto& d = vm.disks[i];
      if (!d.boot_order) continue;
      std::string p = dpath + "[" + std::to_string(i) + "]";
      if (!boot_orders.insert(*d.boot_order).second) {
        Error(marks_[p], p + ".bootOrder", "boot order " + std::to_string(*d.boot_order) + " is given to two disks");
      }
    }
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

  enum class SecretPurpose { kImagePull, kUserData, kNetworkData };
  struct SecretRef {
    YAML::Node at;
    std::string path;
    std::string name;
    int line_offset = 0;  // of the document the reference is in
    SecretPurpose purpose = SecretPurpose::kImagePull;
  };
  std::vector<SecretRef> TakeSecretRefs() { return std::exchange(secret_refs_, {}); }
  void set_line_offset(int offset) { line_offset_ = offset; }
  // The instancetype a v1 VirtualMachine names (for messages), or "".
  void set_instancetype(std::string name) { instancetype_ = std::move(name); }

 private:
  int line_offset_ = 0;
  std::string instancetype_;
  std::string file_;
  std::vector<Diagnostic>& out_;
  std::map<std::string, YAML::Node> marks_;
  std::vector<SecretRef> secret_refs_;
};

const char kKindsHint[] =
    "use VirtualMachineInstance, VirtualMachine or VirtualMachineInstanceReplicaSet (kubevirt.io/v1), VirtualMachine "
    "or VirtualMachineReplicaSet (kubevirt.io/v1alpha1), or Secret (v1)";

std::optional<Secret> ParseSecret(Parser& p, const YAML::Node& doc, const std::string& api) {
  p.CheckSecretFields(doc);
  if (api != "v1") p.Error(doc["apiVersion"], "apiVersion", "a Secret has apiVersion v1, not \"" + api + "\"");
  p.SchemaCheck(*KubeVirtSchema::For("kubevirt.io/v1"), Parser::Child(doc, "metadata"), kObjectMeta, "metadata");
  Secret s;
  s.metadata = p.Metadata(doc, "", true);
  s.type = Parser::Str(doc, "type").value_or("Opaque");
  // data is base64, stringData plain text; stringData wins, as the API
  // server merges them.
  if (YAML::Node data = doc["data"]; Has(data) && data.IsMap()) {
    for (auto it = data.begin(); it != data.end(); ++it) {
      if (!it->first.IsScalar() || !it->second.IsScalar()) {
        p.Error(it->first, "data", "values of data must be base64 strings");
        continue;
      }
      auto decoded = registry::Base64Decode(it->second.Scalar());
      if (!decoded.ok()) {
        p.Error(it->second, "data." + it->first.Scalar(), "is not valid base64");
      } else {
        s.data[it->first.Scalar()] = std::move(*decoded);
      }
    }
  }
  if (YAML::Node sd = doc["stringData"]; Has(sd) && sd.IsMap()) {
    for (auto it = sd.begin(); it != sd.end(); ++it) {
      if (!it->first.IsScalar() || !it->second.IsScalar()) {
        p.Error(it->first, "stringData", "values of stringData must be strings");
        continue;
      }
      s.data[it->first.Scalar()] = it->second.Scalar();
    }
  }
  std::string raw;
  if (auto it = s.data.find(".dockerconfigjson"); it != s.data.end()) raw = it->second;
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

// The schema for a kind and apiVersion, or an error saying what to write.
const KubeVirtSchema* SchemaFor(Parser& p, const YAML::Node& doc, const std::string& kind, const std::string& api,
                                std::string& root) {
  const KubeVirtSchema* schema = KubeVirtSchema::For(api);
  if (!schema) {
    p.Error(doc["apiVersion"], "apiVersion",
            "apiVersion \"" + api + "\" is not supported; use kubevirt.io/v1 (or kubevirt.io/v1alpha1 for the seed's shape)");
    return nullptr;
  }
  root = schema->RootOf(kind);
  if (!root.empty()) return schema;
  std::string hint = kKindsHint;
  if (api == "kubevirt.io/v1" && kind == "VirtualMachineReplicaSet") {
    hint = "kubevirt.io/v1 calls it VirtualMachineInstanceReplicaSet";
  } else if (api == "kubevirt.io/v1alpha1" &&
             (kind == "VirtualMachineInstance" || kind == "VirtualMachineInstanceReplicaSet")) {
    hint = "use apiVersion kubevirt.io/v1 (kubevirt.io/v1alpha1 calls it " +
           std::string(kind == "VirtualMachineInstance" ? "VirtualMachine" : "VirtualMachineReplicaSet") + ")";
  }
  p.Error(doc["kind"], "kind", "kind \"" + kind + "\" is not supported with apiVersion " + api + "; " + hint);
  return nullptr;
}

std::optional<Object> ParseDocument(Parser& p, const YAML::Node& doc, std::vector<Parser::SecretRef>& refs) {
  if (!doc.IsMap()) {
    p.Error(doc, "", "the document is not a mapping; expected an object with apiVersion, kind, metadata and spec");
    return std::nullopt;
  }
  std::optional<std::string> kind, api;
  for (const char* field : {"kind", "apiVersion"}) {
    YAML::Node n = doc[field];
    std::optional<std::string>& out = std::string(field) == "kind" ? kind : api;
    if (!Has(n)) {
      p.Error(doc, field, "is required");
    } else if (!n.IsScalar() || YamlType(n) != "string") {
      p.Error(n, field, "must be a string");
    } else {
      out = n.Scalar();
    }
  }
  if (!kind || !api) return std::nullopt;

  if (*kind == "Secret") return ParseSecret(p, doc, *api);
  if (*kind == "VirtualMachineInstanceMigration" || *kind == "VirtualMachineMigration" || *kind == "Migration") {
    p.Error(doc["kind"], "kind",
            "live migration is not possible for VMs on registry disks, which are ephemeral and node-local; stop the VM and "
            "start it on the other node instead");
    return std::nullopt;
  }
  static const std::set<std::string_view> kOurs = {"VirtualMachine", "VirtualMachineInstance", "VirtualMachineReplicaSet",
                                                   "VirtualMachineInstanceReplicaSet"};
  if (!kOurs.count(*kind)) {
    p.Error(doc["kind"], "kind", "kind \"" + *kind + "\" is not supported; " + kKindsHint);
    return std::nullopt;
  }
  std::string root;
  const KubeVirtSchema* schema = SchemaFor(p, doc, *kind, *api, root);
  if (!schema) return std::nullopt;
  p.SchemaCheck(*schema, doc, root, "");
  YAML::Node spec = doc["spec"];
  if (!Has(spec) || !spec.IsMap()) return std::nullopt;  // the schema check said why

  if (root == "v1.VirtualMachineInstanceReplicaSet") {
    VirtualMachineReplicaSet rs;
    rs.api_version = *api;
    rs.kind = *kind;
    rs.metadata = p.Metadata(doc, "", true);
    if (auto r = Parser::Integer(spec, "replicas")) {
      if (*r < 0) {
        p.Error(spec["replicas"], "spec.replicas", "must not be negative");
      } else if (*r > 10000) {
        p.Error(spec["replicas"], "spec.replicas", "must be at most 10000");
      } else {
        rs.replicas = static_cast<int>(*r);
      }
    }
    rs.paused = Parser::Boolean(spec, "paused").value_or(false);
    rs.match_labels = Parser::StringMap(Parser::Child(spec, "selector"), "matchLabels");
    YAML::Node tmpl = Parser::Child(spec, "template");
    if (Has(tmpl) && tmpl.IsMap()) {
      rs.template_metadata = p.Metadata(tmpl, "spec.template", false);
      if (YAML::Node ts = Parser::Child(tmpl, "spec"); Has(ts)) {
        rs.template_spec = p.Spec(ts, "spec.template.spec", *api);
      } else {
        p.Error(tmpl, "spec.template.spec", "is required");
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
  if (root == "v1.VirtualMachine") {
    // kubevirt.io/v1 nests the instance under spec.template.
    vm.running = Parser::Boolean(spec, "running");
    vm.run_strategy = Parser::Str(spec, "runStrategy").value_or("");
    static const std::set<std::string_view> kStrategies = {"Always", "Halted", "Manual", "RerunOnFailure", "Once"};
    if (vm.running && Has(spec["runStrategy"])) {
      p.Error(spec["runStrategy"], "spec.runStrategy",
              "running and runStrategy are mutually exclusive (as in KubeVirt); keep runStrategy and remove running");
    } else if (Has(spec["runStrategy"]) && !kStrategies.count(vm.run_strategy)) {
      p.Error(spec["runStrategy"], "spec.runStrategy",
              "\"" + vm.run_strategy + "\" is not a run strategy; use Always, Halted, Manual, RerunOnFailure or Once");
    }
    if (!vm.running && vm.run_strategy.empty()) vm.run_strategy = "Halted";  // KubeVirt's default
    YAML::Node tmpl = Parser::Child(spec, "template");
    if (Has(tmpl) && tmpl.IsMap()) {
      vm.template_metadata = p.Metadata(tmpl, "spec.template", false);
      p.set_instancetype(Parser::Str(Parser::Child(spec, "instancetype"), "name").value_or(""));
      if (YAML::Node ts = Parser::Child(tmpl, "spec"); Has(ts)) {
        vm.spec = p.Spec(ts, "spec.template.spec", *api);
      } else {
        p.Error(tmpl, "spec.template.spec", "is required");
      }
      p.set_instancetype("");
    }
  } else {
    vm.spec = p.Spec(spec, "spec", *api);
  }
  for (auto& r : p.TakeSecretRefs()) refs.push_back(std::move(r));
  return vm;
}

}  // namespace

const std::string* CloudInitSecretData(const Secret& secret, bool user_data) {
  for (const char* key : user_data ? std::array{"userdata", "userData"} : std::array{"networkdata", "networkData"}) {
    if (auto it = secret.data.find(key); it != secret.data.end()) return &it->second;
  }
  return nullptr;
}

std::string Volume::SourceField() const {
  if (registry_disk) return registry_disk->field;
  if (cloud_init_no_cloud) return "cloudInitNoCloud";
  if (empty_disk) return "emptyDisk";
  return "";
}

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
    if (ref.purpose != Parser::SecretPurpose::kImagePull) {
      const bool user = ref.purpose == Parser::SecretPurpose::kUserData;
      const char* key = user ? "userdata" : "networkdata";
      if (!found) {
        p.Error(ref.at, ref.path + ".name",
                "Secret \"" + ref.name + "\" is not in this file; add it, with the " + (user ? "user" : "network") +
                    " data under data." + key);
      } else if (!CloudInitSecretData(*found, user)) {
        p.Error(ref.at, ref.path + ".name",
                "Secret \"" + ref.name + "\" has no key " + key + " (or " + (user ? "userData" : "networkData") +
                    "); put the " + (user ? "user" : "network") + " data there");
      }
      continue;
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
    kind = rs->kind;
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

// A quantity as written: a string stays a string, a number a number.
json QuantityJson(const Quantity& q) {
  if (q.number) {
    json n = json::parse(q.text, nullptr, false);
    if (n.is_number()) return n;
  }
  return q.text;
}

json SpecJson(const VmSpec& s, bool v1alpha1) {
  json domain = json::object();
  json requests = json::object();
  if (!s.memory.text.empty()) requests["memory"] = QuantityJson(s.memory);
  if (!s.cpu.text.empty()) requests["cpu"] = QuantityJson(s.cpu);
  if (!requests.empty()) domain["resources"] = {{"requests", requests}};
  if (!s.guest_memory.text.empty()) domain["memory"] = {{"guest", QuantityJson(s.guest_memory)}};
  domain["cpu"] = {{"cores", s.cores}};
  json disks = json::array();
  for (const auto& d : s.disks) {
    json target = {{"bus", d.bus}};
    if (v1alpha1 && d.device == "disk") target["dev"] = d.dev;
    if (d.read_only) target[v1alpha1 ? "readOnly" : "readonly"] = true;
    json dj = {{"name", d.name}, {d.device, target}};
    if (v1alpha1) dj["volumeName"] = d.volume_name;
    if (d.boot_order) dj["bootOrder"] = *d.boot_order;
    disks.push_back(dj);
  }
  json devices = {{"disks", disks}};
  json interfaces = json::array();
  for (const auto& i : s.interfaces) {
    json ij = {{"name", i.name}, {i.binding, json::object()}, {"model", i.model}};
    if (!i.mac_address.empty()) ij["macAddress"] = i.mac_address;
    if (!i.ports.empty()) {
      json ports = json::array();
      for (const auto& p : i.ports) {
        json pj = {{"port", p.port}, {"protocol", p.protocol}};
        if (!p.name.empty()) pj["name"] = p.name;
        ports.push_back(pj);
      }
      ij["ports"] = ports;
    }
    interfaces.push_back(ij);
  }
  if (!interfaces.empty()) devices["interfaces"] = interfaces;
  if (!s.autoattach_pod_interface) devices["autoattachPodInterface"] = false;
  domain["devices"] = devices;
  json volumes = json::array();
  for (const auto& v : s.volumes) {
    json vj = {{"name", v.name}};
    if (v.registry_disk) {
      const auto& r = *v.registry_disk;
      json rj = {{"image", r.image}, {"imagePullPolicy", r.image_pull_policy}};
      if (!r.image_pull_secret.empty()) rj["imagePullSecret"] = r.image_pull_secret;
      if (!r.path.empty()) rj["path"] = r.path;
      vj[r.field] = rj;
    } else if (v.cloud_init_no_cloud) {
      const auto& c = *v.cloud_init_no_cloud;
      json cj = json::object();
      if (!c.user_data.empty()) cj["userData"] = c.user_data;
      if (!c.user_data_base64.empty()) cj["userDataBase64"] = c.user_data_base64;
      if (!c.network_data.empty()) cj["networkData"] = c.network_data;
      if (!c.network_data_base64.empty()) cj["networkDataBase64"] = c.network_data_base64;
      if (!c.user_data_secret.empty()) cj["secretRef"] = {{"name", c.user_data_secret}};
      if (!c.network_data_secret.empty()) cj["networkDataSecretRef"] = {{"name", c.network_data_secret}};
      vj["cloudInitNoCloud"] = cj;
    } else if (v.empty_disk) {
      vj["emptyDisk"] = {{"capacity", QuantityJson(v.empty_disk->capacity)}};
    }
    volumes.push_back(vj);
  }
  json out = {{"domain", domain}};
  if (!s.networks.empty()) {
    json networks = json::array();
    for (const auto& n : s.networks) networks.push_back({{"name", n.name}, {"pod", {{"vmNetworkCIDR", n.vm_network_cidr}}}});
    out["networks"] = networks;
  }
  out["volumes"] = volumes;
  return out;
}

void EmitYaml(YAML::Emitter& out, const json& j) {
  if (j.is_object()) {
    if (j.empty()) {
      out << YAML::Flow << YAML::BeginMap << YAML::EndMap;
      return;
    }
    out << YAML::BeginMap;
    for (const auto& [k, v] : j.items()) {
      out << YAML::Key << k << YAML::Value;
      EmitYaml(out, v);
    }
    out << YAML::EndMap;
  } else if (j.is_array()) {
    if (j.empty()) {
      out << YAML::Flow << YAML::BeginSeq << YAML::EndSeq;
      return;
    }
    out << YAML::BeginSeq;
    for (const auto& v : j) EmitYaml(out, v);
    out << YAML::EndSeq;
  } else if (j.is_string()) {
    const std::string& s = j.get_ref<const std::string&>();
    // A literal block (|) keeps exactly one final line break; anything else
    // with line breaks is written double-quoted, with escapes.
    const bool literal = s.size() > 1 && s.back() == '\n' && s[s.size() - 2] != '\n' && s[0] != ' ' &&
                         s[0] != '\n' && s.find_first_of("\r\t") == std::string::npos;
    if (literal) {
      out << YAML::Literal << s;
    } else if (s.find('\n') != std::string::npos) {
      out << YAML::DoubleQuoted << s;
    } else if (PlainScalarIsNotString(s)) {
      out << YAML::DoubleQuoted << s;
    } else {
      out << s;
    }
  } else if (j.is_null()) {
    out << YAML::Null;
  } else {
    out << j.dump();  // numbers and booleans
  }
}

}  // namespace

json ToJson(const Object& object) {
  if (auto* vm = std::get_if<VirtualMachine>(&object)) {
    const bool v1alpha1 = vm->api_version == "kubevirt.io/v1alpha1";
    json out = {{"apiVersion", vm->api_version}, {"kind", vm->kind}, {"metadata", MetaJson(vm->metadata)}};
    if (!vm->IsV1VirtualMachine()) {
      out["spec"] = SpecJson(vm->spec, v1alpha1);
      return out;
    }
    json spec = json::object();
    if (vm->running) {
      spec["running"] = *vm->running;
    } else {
      spec["runStrategy"] = vm->run_strategy;
    }
    spec["template"] = {{"metadata", MetaJson(vm->template_metadata, false)}, {"spec", SpecJson(vm->spec, false)}};
    out["spec"] = spec;
    return out;
  }
  if (auto* rs = std::get_if<VirtualMachineReplicaSet>(&object)) {
    json spec = {{"replicas", rs->replicas},
                 {"template",
                  {{"metadata", MetaJson(rs->template_metadata, false)},
                   {"spec", SpecJson(rs->template_spec, rs->api_version == "kubevirt.io/v1alpha1")}}}};
    if (!rs->match_labels.empty()) spec["selector"] = {{"matchLabels", rs->match_labels}};
    if (rs->paused) spec["paused"] = true;
    return {{"apiVersion", rs->api_version}, {"kind", rs->kind}, {"metadata", MetaJson(rs->metadata)}, {"spec", spec}};
  }
  const auto& s = std::get<Secret>(object);
  // The credentials themselves are never printed.
  return {{"apiVersion", "v1"}, {"kind", "Secret"}, {"metadata", MetaJson(s.metadata)}, {"type", s.type}};
}

std::string ToYaml(const json& value) {
  YAML::Emitter out;
  EmitYaml(out, value);
  return std::string(out.c_str()) + "\n";
}

}  // namespace regdisk::spec
