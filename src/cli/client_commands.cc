// The client commands: apply, get, delete, scale, logs, console and port,
// as kubectl and virtctl do them, against `regdisk serve` over its unix
// socket or, given a kubeconfig, over TLS (api/client.h). Kinds are resolved through the server's
// discovery documents, so the names, short names and plurals are the
// server's; tables are the server's Table answers (printed as kubectl
// prints them), so their columns are the same as kubectl's.
#include <fcntl.h>
#include <poll.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <cstdio>
#include <iostream>
#include <iterator>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <curl/curl.h>
#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

#include "api/client.h"
#include "cli/common.h"
#include "util/fs.h"
#include "util/text.h"
#include "vm/launch.h"
#include "vm/runner.h"

namespace regdisk::cli {

namespace {

using json = nlohmann::json;

// One served resource, from discovery.
struct Kind {
  std::string group;  // "" for core
  std::string version;
  std::string plural;
  std::string singular;
  std::string kind;
  bool namespaced = true;
  std::vector<std::string> short_names;

  std::string api_version() const { return group.empty() ? version : group + "/" + version; }
  // "virtualmachineinstancereplicaset.kubevirt.io", as kubectl names objects.
  std::string object_prefix() const { return group.empty() ? singular : singular + "." + group; }
  // ns "" with a namespaced kind: every namespace's (a list or a watch).
  std::string Path(const std::string& ns, const std::string& name = "") const {
    std::string p = group.empty() ? "/api/" + version : "/apis/" + group + "/" + version;
    if (namespaced && !ns.empty()) p += "/namespaces/" + Escape(ns);
    p += "/" + plural;
    if (!name.empty()) p += "/" + Escape(name);
    return p;
  }
  static std::string Escape(const std::string& s) {
    char* e = curl_easy_escape(nullptr, s.c_str(), static_cast<int>(s.size()));
    std::string out = e ? e : "";
    curl_free(e);
    return out;
  }
};

std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// The API the flags name (--kubeconfig, else --socket/REGDISK_SOCKET, else
// REGDISK_KUBECONFIG, else the default socket) and the namespace to use (-n,
// else the kubeconfig context's, else default).
struct Connection {
  api::ApiClient api;
  ClientFlags flags;
};

Result<Connection> Connect(const ClientFlags& flags) {
  Connection out{api::ApiClient(flags.socket), flags};
  std::string kubeconfig = flags.kubeconfig;
  if (kubeconfig.empty() && !flags.socket_set) {
    // Only a kubeconfig named for regdisk: KUBECONFIG usually names a real
    // cluster, which `regdisk apply` or `delete` must never act on by
    // accident.
    const char* env = std::getenv("REGDISK_KUBECONFIG");
    if (env != nullptr) kubeconfig = env;
  }
  if (kubeconfig.empty()) return out;
  ASSIGN_OR_RETURN(api::Endpoint e, api::LoadKubeconfig(kubeconfig));
  if (!flags.namespace_set && !e.ns.empty()) out.flags.namespace_ = e.ns;
  out.api = api::ApiClient(std::move(e));
  return out;
}

// The group versions whose kinds the client knows, in order of preference
// (kubectl prefers a group's newest version).
constexpr const char* kGroupVersions[] = {"/apis/kubevirt.io/v1", "/apis/kubevirt.io/v1alpha1", "/api/v1"};

Result<std::vector<Kind>> Discover(const api::ApiClient& api) {
  std::vector<Kind> kinds;
  for (const char* path : kGroupVersions) {
    ASSIGN_OR_RETURN(api::ApiClient::Response r, api.Do("GET", path));
    if (r.code == 404) continue;  // a version this server does not serve
    if (!r.ok()) return r.Error();
    const json list = json::parse(r.body, nullptr, false);
    if (!list.is_object() || !list.contains("resources")) continue;
    const std::string gv = list.value("groupVersion", "");
    const size_t slash = gv.find('/');
    for (const auto& res : list["resources"]) {
      Kind k;
      k.plural = res.value("name", "");
      if (k.plural.empty() || k.plural.find('/') != std::string::npos) continue;  // subresources
      k.group = slash == std::string::npos ? "" : gv.substr(0, slash);
      k.version = slash == std::string::npos ? gv : gv.substr(slash + 1);
      k.kind = res.value("kind", "");
      k.singular = res.value("singularName", "");
      if (k.singular.empty()) k.singular = Lower(k.kind);
      k.namespaced = res.value("namespaced", true);
      if (res.contains("shortNames") && res["shortNames"].is_array()) {
        for (const auto& s : res["shortNames"]) {
          if (s.is_string()) k.short_names.push_back(s.get<std::string>());
        }
      }
      kinds.push_back(std::move(k));
    }
  }
  return kinds;
}

// "vmi", "vmis", "virtualmachineinstance", "VirtualMachineInstance",
// "virtualmachineinstances.kubevirt.io", "vm.v1alpha1.kubevirt.io"...
Result<Kind> ResolveKind(const std::vector<Kind>& kinds, const std::string& word) {
  const std::string w = Lower(word);
  const size_t dot = w.find('.');
  const std::string head = w.substr(0, dot);
  const std::string tail = dot == std::string::npos ? "" : w.substr(dot + 1);
  for (const Kind& k : kinds) {
    if (!tail.empty() && tail != k.group && tail != k.version + "." + k.group) continue;
    bool named = head == k.plural || head == k.singular || head == Lower(k.kind);
    for (const auto& s : k.short_names) named = named || head == s;
    // kubectl also takes a short name's plural ("vmis", "vmirss").
    for (const auto& s : k.short_names) named = named || head == s + "s";
    if (named) return k;
  }
  return InvalidArgument("the server doesn't have a resource type \"" + PrintableLine(word, 80) +
                         "\"; try vmi, vm, vmirs or secret (regdisk get --help)");
}

Result<Kind> KindOf(const std::vector<Kind>& kinds, const json& object) {
  const std::string api_version = object.value("apiVersion", "");
  const std::string kind = object.value("kind", "");
  for (const Kind& k : kinds) {
    if (k.api_version() == api_version && k.kind == kind) return k;
  }
  return InvalidArgument("no matches for kind \"" + PrintableLine(kind, 80) + "\" in version \"" +
                         PrintableLine(api_version, 80) + "\"");
}

// YAML (1.1 plain scalars as kubectl's YAML reader types them) as JSON.
json YamlToJson(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Sequence: {
      json a = json::array();
      for (const auto& e : n) a.push_back(YamlToJson(e));
      return a;
    }
    case YAML::NodeType::Map: {
      json o = json::object();
      for (const auto& kv : n) o[kv.first.Scalar()] = YamlToJson(kv.second);
      return o;
    }
    case YAML::NodeType::Scalar: {
      const std::string& s = n.Scalar();
      if (n.Tag() != "?") return s;  // quoted or explicitly tagged: a string
      if (s == "null" || s == "Null" || s == "NULL" || s == "~" || s.empty()) return nullptr;
      if (s == "true" || s == "True" || s == "TRUE") return true;
      if (s == "false" || s == "False" || s == "FALSE") return false;
      json number = json::parse(s, nullptr, false);
      if (number.is_number()) return number;
      return s;
    }
    default:
      return nullptr;
  }
}

// The objects of a YAML or JSON file ("-": stdin), documents split at
// "---" lines; a List's items are its objects.
Result<std::vector<json>> ReadObjects(const std::string& file) {
  std::string text;
  if (file == "-") {
    text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  } else {
    auto t = ReadFileCapped(file, 3 << 20);
    if (!t.ok()) return InvalidArgument("-f " + file + ": " + t.status().message());
    text = std::move(*t);
  }
  const std::string shown = file == "-" ? "<stdin>" : file;
  std::vector<std::string> docs(1);
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    std::string line = text.substr(pos, end == std::string::npos ? std::string::npos : end - pos);
    if (line.rfind("---", 0) == 0 && line.find_first_not_of(" \t\r", 3) == std::string::npos) {
      docs.emplace_back();
    } else {
      docs.back() += line + "\n";
    }
    if (end == std::string::npos) break;
    pos = end + 1;
  }
  std::vector<json> out;
  for (const auto& doc : docs) {
    json j;
    try {
      j = YamlToJson(YAML::Load(doc));
    } catch (const YAML::Exception& e) {
      return InvalidArgument(shown + ": not valid YAML or JSON: " + e.what());
    }
    if (j.is_null()) continue;  // an empty document
    if (!j.is_object() || !j.contains("kind") || !j.contains("apiVersion")) {
      return InvalidArgument(shown + ": every document must be an object with apiVersion and kind");
    }
    if (j["kind"] == "List" && j.contains("items") && j["items"].is_array()) {
      for (auto& item : j["items"]) out.push_back(item);
    } else {
      out.push_back(std::move(j));
    }
  }
  if (out.empty()) return InvalidArgument(shown + " holds no objects");
  return out;
}

std::string NameOf(const json& object) {
  if (!object.contains("metadata") || !object["metadata"].is_object()) return "";
  return object["metadata"].value("name", "");
}

// kubectl's JSON merge patch for client-side apply: from the last applied
// configuration `original` to the file's `modified`, plus whatever in
// `current` differs from `modified`. Empty when nothing changes.
json ThreeWayPatch(const json& original, const json& modified, const json& current) {
  json patch = json::object();
  if (original.is_object()) {
    for (const auto& [k, v] : original.items()) {
      if (!modified.contains(k)) patch[k] = nullptr;
    }
  }
  for (const auto& [k, v] : modified.items()) {
    const json* cur = current.is_object() && current.contains(k) ? &current[k] : nullptr;
    const json* orig = original.is_object() && original.contains(k) ? &original[k] : nullptr;
    if (v.is_object() && cur && cur->is_object()) {
      json sub = ThreeWayPatch(orig ? *orig : json(nullptr), v, *cur);
      if (!sub.empty()) patch[k] = sub;
    } else if (!cur || *cur != v) {
      patch[k] = v;
    }
  }
  return patch;
}

constexpr char kLastApplied[] = "kubectl.kubernetes.io/last-applied-configuration";

// Prints rows as kubectl's tabwriter does (minimum width 6, padding 3):
// each column as wide as its widest cell plus three spaces, at least six;
// the last one unpadded.
void PrintRows(const std::vector<std::vector<std::string>>& rows, std::vector<size_t>* widths) {
  for (const auto& row : rows) {
    for (size_t i = 0; i < row.size(); ++i) {
      if (widths->size() <= i) widths->push_back(0);
      (*widths)[i] = std::max((*widths)[i], row[i].size());
    }
  }
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line += std::string(std::max<size_t>(6, (*widths)[i] + 3) - row[i].size(), ' ');
    }
    std::printf("%s\n", line.c_str());
  }
  std::fflush(stdout);
}

std::string CellText(const json& cell) {
  if (cell.is_string()) return PrintableLine(cell.get<std::string>(), 200);
  if (cell.is_null()) return "";  // as kubectl prints a null cell
  if (cell.is_boolean()) return cell.get<bool>() ? "true" : "false";
  return cell.dump();
}

// A Table's columns to show (priority 0, or all with wide) and its rows.
std::vector<size_t> Columns(const json& table, bool wide) {
  std::vector<size_t> cols;
  if (!table.contains("columnDefinitions")) return cols;
  for (size_t i = 0; i < table["columnDefinitions"].size(); ++i) {
    if (wide || table["columnDefinitions"][i].value("priority", 0) == 0) cols.push_back(i);
  }
  return cols;
}

// With `with_namespace`, each row starts with its object's namespace (the
// row's object is the server's PartialObjectMetadata), as kubectl get -A
// prints it.
std::vector<std::vector<std::string>> TableRows(const json& table, const std::vector<size_t>& cols,
                                                bool with_namespace = false) {
  std::vector<std::vector<std::string>> rows;
  if (!table.contains("rows") || !table["rows"].is_array()) return rows;
  for (const auto& row : table["rows"]) {
    if (!row.is_object() || !row.contains("cells") || !row["cells"].is_array()) continue;
    std::vector<std::string> cells;
    if (with_namespace) {
      std::string ns;
      if (row.contains("object") && row["object"].is_object() && row["object"].contains("metadata") &&
          row["object"]["metadata"].is_object()) {
        ns = CellText(row["object"]["metadata"].value("namespace", json("")));
      }
      cells.push_back(ns);
    }
    for (size_t c : cols) cells.push_back(c < row["cells"].size() ? CellText(row["cells"][c]) : "");
    rows.push_back(std::move(cells));
  }
  return rows;
}

std::vector<std::string> Header(const json& table, const std::vector<size_t>& cols, bool with_namespace = false) {
  std::vector<std::string> h;
  if (with_namespace) h.push_back("NAMESPACE");
  for (size_t c : cols) {
    std::string name = table["columnDefinitions"][c].value("name", "");
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char ch) { return std::toupper(ch); });
    h.push_back(name);
  }
  return h;
}

// --- YAML as kubectl -o yaml prints it (sigs.k8s.io/yaml over go-yaml):
// keys sorted, two-space indent, sequences at their key's indent, strings
// that would read as another type double-quoted, others that plain YAML
// cannot carry single-quoted, multi-line strings as literal blocks.

bool ReadsAsOtherType(const std::string& s) {
  static const char* const kWords[] = {"true", "false", "yes", "no", "on", "off", "y", "n", "null", "~"};
  const std::string l = Lower(s);
  for (const char* w : kWords) {
    if (l == w) return true;
  }
  if (json::parse(s, nullptr, false).is_number()) return true;
  if (s.size() >= 8 && std::isdigit(static_cast<unsigned char>(s[0])) && s.find('-') == 4) return true;  // a date
  if (s == "." || s == ".inf" || s == "-.inf" || s == ".nan") return true;
  return false;
}

bool NeedsQuotes(const std::string& s) {
  if (s.empty() || s.front() == ' ' || s.back() == ' ' || s.back() == ':') return true;
  if (std::string("-?:,[]{}#&*!|>'\"%@`").find(s.front()) != std::string::npos) return true;
  if (s.find(": ") != std::string::npos || s.find(" #") != std::string::npos) return true;
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7f) return true;
  }
  return false;
}

std::string YamlScalar(const json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  if (!v.is_string()) return v.dump();
  const std::string s = v.get<std::string>();
  if (s.empty()) return "\"\"";
  const bool control = std::any_of(s.begin(), s.end(), [](unsigned char c) { return c < 0x20 || c == 0x7f; });
  // Double quotes escape control characters (a terminal never sees them raw).
  if (ReadsAsOtherType(s) || control) return json(s).dump(-1, ' ', false, json::error_handler_t::replace);
  if (NeedsQuotes(s)) {
    std::string out = "'";
    for (char c : s) out += c == '\'' ? std::string("''") : std::string(1, c);
    return out + "'";
  }
  return s;
}

void EmitYaml(const json& v, int indent, std::string* out);

// A value after "key:" or "- ": on the same line when it is a scalar.
void EmitValue(const json& v, int indent, std::string* out) {
  if (v.is_object() && !v.empty()) {
    *out += "\n";
    EmitYaml(v, indent + 2, out);
  } else if (v.is_array() && !v.empty()) {
    *out += "\n";
    EmitYaml(v, indent, out);
  } else if (v.is_object()) {
    *out += " {}\n";
  } else if (v.is_array()) {
    *out += " []\n";
  } else if (v.is_string() && v.get<std::string>().find('\n') != std::string::npos &&
             std::none_of(v.get_ref<const std::string&>().begin(), v.get_ref<const std::string&>().end(),
                          [](unsigned char c) { return (c < 0x20 && c != '\n') || c == 0x7f; })) {
    const std::string s = v.get<std::string>();
    *out += s.back() == '\n' ? " |\n" : " |-\n";
    size_t pos = 0;
    while (pos < s.size()) {
      size_t nl = s.find('\n', pos);
      std::string line = s.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos);
      *out += line.empty() ? "\n" : std::string(static_cast<size_t>(indent + 2), ' ') + line + "\n";
      if (nl == std::string::npos) break;
      pos = nl + 1;
    }
  } else {
    *out += " " + YamlScalar(v) + "\n";
  }
}

void EmitYaml(const json& v, int indent, std::string* out) {
  const std::string pad(static_cast<size_t>(indent), ' ');
  if (v.is_object()) {
    for (const auto& [k, val] : v.items()) {
      *out += pad + YamlScalar(json(k)) + ":";
      EmitValue(val, indent, out);
    }
  } else if (v.is_array()) {
    for (const auto& item : v) {
      if (item.is_object() && !item.empty()) {
        // The first key on the dash's line, the rest under it.
        std::string sub;
        EmitYaml(item, indent + 2, &sub);
        *out += pad + "- " + sub.substr(static_cast<size_t>(indent + 2));
      } else {
        *out += pad + "-";
        EmitValue(item, indent, out);
      }
    }
  }
}

std::string ToKubectlYaml(const json& v) {
  std::string out;
  EmitYaml(v, 0, &out);
  return out;
}

constexpr char kTableAccept[] = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";

// An object as -o json|yaml|name prints it.
void PrintObject(const Kind& k, const json& object, const std::string& output) {
  if (output == "name") {
    std::printf("%s/%s\n", k.object_prefix().c_str(), PrintableLine(NameOf(object)).c_str());
  } else if (output == "yaml") {
    std::fputs(ToKubectlYaml(object).c_str(), stdout);
  } else {
    std::printf("%s\n", object.dump(4, ' ', false, json::error_handler_t::replace).c_str());
  }
  std::fflush(stdout);
}

std::string Query(const GetFlags& f, bool watch, const std::string& resource_version) {
  std::string q;
  auto add = [&q](const std::string& k, const std::string& v) {
    q += (q.empty() ? "?" : "&") + k + "=" + Kind::Escape(v);
  };
  if (!f.selector.empty()) add("labelSelector", f.selector);
  if (!f.field_selector.empty()) add("fieldSelector", f.field_selector);
  if (watch) {
    add("watch", "true");
    if (!resource_version.empty()) add("resourceVersion", resource_version);
  }
  return q;
}

// Follows a watch, printing each event's object (or table row).
Status Watch(const api::ApiClient& api, const Kind& k, const ClientFlags& c, const GetFlags& f,
             const std::string& resource_version, std::vector<size_t> widths, const std::vector<size_t>& cols) {
  const bool table = f.output.empty() || f.output == "wide";
  std::string pending;
  api::ApiClient::Request req;
  const bool all = f.all_namespaces && k.namespaced;
  req.path = k.Path(all ? "" : c.namespace_) + Query(f, true, resource_version);
  if (table) req.accept = kTableAccept;
  auto sink = [&](std::string_view bytes) {
    pending.append(bytes);
    for (size_t nl; (nl = pending.find('\n')) != std::string::npos;) {
      const json ev = json::parse(pending.substr(0, nl), nullptr, false);
      pending.erase(0, nl + 1);
      if (!ev.is_object() || !ev.contains("object")) continue;
      if (ev.value("type", "") == "ERROR") {
        std::fprintf(stderr, "regdisk: error: %s\n", PrintableLine(ev["object"].value("message", "")).c_str());
        return false;
      }
      if (table) {
        json t = ev["object"];
        std::vector<size_t> use = cols;
        if (t.contains("columnDefinitions") && !t["columnDefinitions"].empty()) use = Columns(t, f.output == "wide");
        PrintRows(TableRows(t, use, all), &widths);
      } else {
        PrintObject(k, ev["object"], f.output);
      }
    }
    return true;
  };
  ASSIGN_OR_RETURN(api::ApiClient::Response r, api.Stream(req, sink));
  if (!r.ok()) return r.Error();
  return OkStatus();
}

}  // namespace

int RunApply(const Globals&, const ClientFlags& flags, const std::string& file) {
  auto objects = ReadObjects(file);
  if (!objects.ok()) return Fail(objects.status());
  auto conn = Connect(flags);
  if (!conn.ok()) return Fail(conn.status());
  const ClientFlags& c = conn->flags;
  const api::ApiClient& api = conn->api;
  auto kinds = Discover(api);
  if (!kinds.ok()) return Fail(kinds.status());
  int code = 0;
  for (json object : *objects) {
    auto k = KindOf(*kinds, object);
    if (!k.ok()) return Fail(k.status());
    const std::string name = NameOf(object);
    if (name.empty()) return Fail(InvalidArgument("a " + k->kind + " in " + file + " has no metadata.name"));
    std::string ns = c.namespace_;
    if (k->namespaced) {
      ns = object["metadata"].value("namespace", c.namespace_);
      object["metadata"]["namespace"] = ns;
    }
    // The configuration as applied, for the next apply's patch, in the
    // bytes kubectl writes (annotations without this one, "{}" when none;
    // keys sorted; a newline at the end), so either tool can apply next.
    json config = object;
    if (!config["metadata"].contains("annotations") || !config["metadata"]["annotations"].is_object()) {
      config["metadata"]["annotations"] = json::object();
    }
    config["metadata"]["annotations"].erase(kLastApplied);
    object["metadata"]["annotations"] = config["metadata"]["annotations"];
    object["metadata"]["annotations"][kLastApplied] = config.dump() + "\n";
    auto current = api.Do("GET", k->Path(ns, name));
    if (!current.ok()) return Fail(current.status());
    const std::string who = k->object_prefix() + "/" + PrintableLine(name);
    if (current->code == 404) {
      api::ApiClient::Request post = api::ApiClient::WithBody("POST", k->Path(ns), object.dump());
      auto created = api.Do(post);
      if (!created.ok()) return Fail(created.status());
      if (!created->ok()) {
        code = Fail(created->Error());
        continue;
      }
      std::printf("%s created\n", who.c_str());
      continue;
    }
    if (!current->ok()) {
      code = Fail(current->Error());
      continue;
    }
    const json live = json::parse(current->body, nullptr, false);
    json original;
    if (live.is_object() && live["metadata"].contains("annotations") &&
        live["metadata"]["annotations"].contains(kLastApplied)) {
      original = json::parse(live["metadata"]["annotations"][kLastApplied].get<std::string>(), nullptr, false);
    }
    json patch = ThreeWayPatch(original, object, live);
    if (patch.empty()) {
      std::printf("%s unchanged\n", who.c_str());
      continue;
    }
    api::ApiClient::Request req =
        api::ApiClient::WithBody("PATCH", k->Path(ns, name), patch.dump(), "application/merge-patch+json");
    auto patched = api.Do(req);
    if (!patched.ok()) return Fail(patched.status());
    if (!patched->ok()) {
      code = Fail(patched->Error());
      continue;
    }
    std::printf("%s configured\n", who.c_str());
  }
  return code;
}

int RunGet(const Globals&, const ClientFlags& flags, const GetFlags& f) {
  auto conn = Connect(flags);
  if (!conn.ok()) return Fail(conn.status());
  const ClientFlags& c = conn->flags;
  const api::ApiClient& api = conn->api;
  auto kinds = Discover(api);
  if (!kinds.ok()) return Fail(kinds.status());
  auto k = ResolveKind(*kinds, f.kind);
  if (!k.ok()) return Fail(k.status());
  const bool table = f.output.empty() || f.output == "wide";
  // -A: one list across namespaces, a NAMESPACE column first (kubectl
  // prints none for a kind that has no namespace).
  const bool all = f.all_namespaces && k->namespaced;
  if (f.all_namespaces && !f.names.empty()) {
    return Fail(InvalidArgument("a resource cannot be retrieved by name across all namespaces; leave out -A or the names"));
  }
  api::ApiClient::Request req;
  if (table) req.accept = kTableAccept;
  std::vector<json> answers;  // one list or table, or one per name
  int code = 0;
  if (f.names.empty()) {
    req.path = k->Path(all ? "" : c.namespace_) + Query(f, false, "");
    auto r = api.Do(req);
    if (!r.ok()) return Fail(r.status());
    if (!r->ok()) return Fail(r->Error());
    answers.push_back(json::parse(r->body, nullptr, false));
  } else {
    for (const auto& name : f.names) {
      req.path = k->Path(c.namespace_, name);
      auto r = api.Do(req);
      if (!r.ok()) return Fail(r.status());
      if (!r->ok()) {
        code = Fail(r->Error());
        continue;
      }
      answers.push_back(json::parse(r->body, nullptr, false));
    }
  }
  std::string resource_version;
  std::vector<size_t> widths, cols;
  if (table) {
    std::vector<std::vector<std::string>> rows;
    for (const auto& t : answers) {
      if (!t.is_object()) continue;
      if (cols.empty()) {
        cols = Columns(t, f.output == "wide");
        rows.push_back(Header(t, cols, all));
      }
      auto more = TableRows(t, cols, all);
      rows.insert(rows.end(), more.begin(), more.end());
      if (t.contains("metadata")) resource_version = t["metadata"].value("resourceVersion", "");
    }
    if (rows.size() <= 1 && f.names.empty() && !f.watch) {
      if (all || !k->namespaced) {
        std::fprintf(stderr, "No resources found\n");
      } else {
        std::fprintf(stderr, "No resources found in %s namespace.\n", PrintableLine(c.namespace_).c_str());
      }
    } else if (rows.size() > 1 || f.watch) {
      PrintRows(rows, &widths);
    }
  } else {
    std::vector<json> objects;
    for (const auto& a : answers) {
      if (!a.is_object()) continue;
      if (a.contains("items") && a["items"].is_array() && f.names.empty()) {
        resource_version = a.contains("metadata") ? a["metadata"].value("resourceVersion", "") : "";
        for (json item : a["items"]) {
          item["apiVersion"] = k->api_version();
          item["kind"] = k->kind;
          objects.push_back(std::move(item));
        }
      } else {
        objects.push_back(a);
      }
    }
    if (f.output == "name") {
      for (const auto& o : objects) PrintObject(*k, o, "name");
    } else if (objects.size() == 1 && !f.names.empty()) {
      PrintObject(*k, objects[0], f.output);
    } else if (!f.watch || !objects.empty()) {
      json list = {{"apiVersion", "v1"}, {"kind", "List"}, {"items", objects}, {"metadata", {{"resourceVersion", ""}}}};
      PrintObject(*k, list, f.output);
    }
  }
  if (f.watch && code == 0) {
    Status st = Watch(api, *k, c, f, resource_version, widths, cols);
    if (!st.ok()) return Fail(st);
  }
  return code;
}

int RunDelete(const Globals&, const ClientFlags& flags, const DeleteFlags& f) {
  auto conn = Connect(flags);
  if (!conn.ok()) return Fail(conn.status());
  const ClientFlags& c = conn->flags;
  const api::ApiClient& api = conn->api;
  if (f.file.empty() == f.args.empty()) {
    return Fail(InvalidArgument("regdisk delete takes KIND NAME... or -f FILE (one of them)"));
  }
  auto kinds = Discover(api);
  if (!kinds.ok()) return Fail(kinds.status());
  std::vector<std::tuple<Kind, std::string, std::string>> targets;  // kind, namespace, name
  if (!f.file.empty()) {
    auto objects = ReadObjects(f.file);
    if (!objects.ok()) return Fail(objects.status());
    for (const auto& o : *objects) {
      auto k = KindOf(*kinds, o);
      if (!k.ok()) return Fail(k.status());
      std::string ns = o.contains("metadata") ? o["metadata"].value("namespace", c.namespace_) : c.namespace_;
      targets.emplace_back(*k, ns, NameOf(o));
    }
  } else {
    if (f.args.size() < 2) return Fail(InvalidArgument("regdisk delete " + f.args[0] + " needs the names to delete"));
    auto k = ResolveKind(*kinds, f.args[0]);
    if (!k.ok()) return Fail(k.status());
    for (size_t i = 1; i < f.args.size(); ++i) targets.emplace_back(*k, c.namespace_, f.args[i]);
  }
  std::string policy = f.cascade;
  if (!policy.empty()) policy[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(policy[0])));
  const std::string options = json({{"kind", "DeleteOptions"}, {"apiVersion", "v1"}, {"propagationPolicy", policy}}).dump();
  int code = 0;
  std::vector<std::tuple<Kind, std::string, std::string, std::string>> pending;  // ..., uid
  for (const auto& [k, ns, name] : targets) {
    auto r = api.Do(api::ApiClient::WithBody("DELETE", k.Path(ns, name), options, "application/json"));
    if (!r.ok()) return Fail(r.status());
    if (!r->ok()) {
      code = Fail(r->Error());
      continue;
    }
    std::printf("%s \"%s\" deleted\n", k.object_prefix().c_str(), PrintableLine(name).c_str());
    std::fflush(stdout);
    json deleted = json::parse(r->body, nullptr, false);
    if (deleted.is_object() && deleted.contains("metadata") && deleted["metadata"].is_object()) {
      pending.emplace_back(k, ns, name, deleted["metadata"].value("uid", ""));
    }
  }
  // As kubectl delete --wait: until each object (that uid) is gone, which
  // is when its finalizers are done (a VMI: its QEMU stopped, its files removed).
  while (f.wait && !pending.empty()) {
    auto& [k, ns, name, uid] = pending.front();
    auto r = api.Do("GET", k.Path(ns, name));
    if (!r.ok()) return Fail(r.status());
    json now = r->ok() ? json::parse(r->body, nullptr, false) : json();
    const bool gone = r->code == 404 || (now.is_object() && now.contains("metadata") && now["metadata"].is_object() &&
                                         now["metadata"].value("uid", "") != uid);
    if (!r->ok() && r->code != 404) return Fail(r->Error());
    if (gone) {
      pending.erase(pending.begin());
      continue;
    }
    ::poll(nullptr, 0, 200);
  }
  return code;
}

int RunScale(const Globals&, const ClientFlags& flags, const std::string& kind, const std::string& name, int64_t replicas) {
  if (replicas < 0) return Fail(InvalidArgument("--replicas must be 0 or more"));
  auto conn = Connect(flags);
  if (!conn.ok()) return Fail(conn.status());
  const ClientFlags& c = conn->flags;
  const api::ApiClient& api = conn->api;
  auto kinds = Discover(api);
  if (!kinds.ok()) return Fail(kinds.status());
  auto k = ResolveKind(*kinds, kind);
  if (!k.ok()) return Fail(k.status());
  api::ApiClient::Request req =
      api::ApiClient::WithBody("PATCH", k->Path(c.namespace_, name) + "/scale",
                               json({{"spec", {{"replicas", replicas}}}}).dump(), "application/merge-patch+json");
  auto r = api.Do(req);
  if (!r.ok()) return Fail(r.status());
  if (r->code == 404 && r->body.find("the server could not find the requested resource") != std::string::npos) {
    return Fail(InvalidArgument(k->kind + " cannot be scaled; regdisk scale takes a replica set (vmirs)"));
  }
  if (!r->ok()) return Fail(r->Error());
  std::printf("%s/%s scaled\n", k->object_prefix().c_str(), PrintableLine(name).c_str());
  return 0;
}

namespace {

std::string SubresourcePath(const ClientFlags& c, const std::string& vmi, const std::string& sub) {
  return "/apis/subresources.kubevirt.io/v1/namespaces/" + Kind::Escape(c.namespace_) + "/virtualmachineinstances/" +
         Kind::Escape(vmi) + "/" + sub;
}

// The terminal in raw mode for as long as it lives, when stdin is one.
class RawTerminal {
 public:
  RawTerminal() {
    if (!::isatty(STDIN_FILENO) || ::tcgetattr(STDIN_FILENO, &saved_) != 0) return;
    termios raw = saved_;
    cfmakeraw(&raw);
    active_ = ::tcsetattr(STDIN_FILENO, TCSANOW, &raw) == 0;
  }
  ~RawTerminal() {
    if (active_) ::tcsetattr(STDIN_FILENO, TCSANOW, &saved_);
  }
  RawTerminal(const RawTerminal&) = delete;
  RawTerminal& operator=(const RawTerminal&) = delete;

 private:
  termios saved_{};
  bool active_ = false;
};

bool WriteAllFd(int fd, const char* data, size_t size) {
  while (size > 0) {
    ssize_t n = ::write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

constexpr char kEscape = 0x1d;  // Ctrl-]

}  // namespace

int RunLogs(const Globals&, const ClientFlags& flags, const std::string& vmi, bool follow) {
  auto conn = Connect(flags);
  if (!conn.ok()) return Fail(conn.status());
  const ClientFlags& c = conn->flags;
  const api::ApiClient& api = conn->api;
  api::ApiClient::Request req;
  req.path = SubresourcePath(c, vmi, "log") + (follow ? "?follow=true" : "");
  req.accept = "text/plain, application/json";
  auto r = api.Stream(req, [](std::string_view bytes) {
    std::fwrite(bytes.data(), 1, bytes.size(), stdout);
    std::fflush(stdout);
    return true;
  });
  if (!r.ok()) return Fail(r.status());
  if (!r->ok()) return Fail(r->Error());
  return 0;
}

int RunConsole(const Globals&, const ClientFlags& flags, const std::string& vmi) {
  auto conn = Connect(flags);
  if (!conn.ok()) return Fail(conn.status());
  const ClientFlags& c = conn->flags;
  const api::ApiClient& api = conn->api;
  auto u = api.Upgrade(SubresourcePath(c, vmi, "console"));
  if (!u.ok()) return Fail(u.status());
  if (!u->upgraded) return Fail(u->response.Error());
  std::fprintf(stderr, "Successfully connected to %s console. The escape sequence is ^]\n", PrintableLine(vmi).c_str());
  // libcurl left the socket non-blocking; this loop wants plain reads and writes.
  if (int fl = ::fcntl(u->fd, F_GETFL); fl >= 0) ::fcntl(u->fd, F_SETFL, fl & ~O_NONBLOCK);
  RawTerminal raw;
  if (!u->early.empty()) WriteAllFd(STDOUT_FILENO, u->early.data(), u->early.size());
  char buf[16 * 1024];
  for (;;) {
    pollfd fds[2] = {{STDIN_FILENO, POLLIN, 0}, {u->fd, POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return Fail(ErrnoStatus("poll"));
    }
    if (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t n = ::read(u->fd, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;  // the daemon closed the console (the VMI stopped)
      WriteAllFd(STDOUT_FILENO, buf, static_cast<size_t>(n));
    }
    if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t n = ::read(STDIN_FILENO, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;  // end of input: detach
      const char* esc = static_cast<const char*>(std::memchr(buf, kEscape, static_cast<size_t>(n)));
      const size_t keep = esc ? static_cast<size_t>(esc - buf) : static_cast<size_t>(n);
      if (keep > 0 && !WriteAllFd(u->fd, buf, keep)) break;
      if (esc) break;
    }
  }
  std::fputs("\r\n", stderr);
  return 0;
}

// port: foreground `regdisk run` VMs under --root first (they need no
// daemon); then, for a named VM not found there, the daemon's VMI.
int RunPortCommand(const Globals& g, const ClientFlags& flags, const std::string& name, const std::string& port) {
  auto conn = Connect(flags);
  if (!conn.ok()) return Fail(conn.status());
  const ClientFlags& c = conn->flags;
  std::vector<vm::PublishedPort> ports;
  std::vector<vm::RunningVm> running = vm::ListRunningVms(g.root);
  std::sort(running.begin(), running.end(), [](const auto& a, const auto& b) {
    return std::tie(a.namespace_, a.name) < std::tie(b.namespace_, b.name);
  });
  if (name.empty()) {
    for (const auto& r : running) {
      for (const auto& p : r.ports) {
        std::printf("%s\t%s\n", PrintableLine(r.namespace_ + "/" + r.name).c_str(), PrintableLine(p.String()).c_str());
      }
    }
    return 0;
  }
  bool found = false;
  for (const auto& r : running) {
    if (r.name != name || r.namespace_ != c.namespace_) continue;
    found = true;
    ports = r.ports;
  }
  if (!found) {
    auto r = conn->api.Do("GET", SubresourcePath(c, name, "ports"));
    const std::string local = "VM " + c.namespace_ + "/" + PrintableLine(name, 80) +
                              " is not running on this node (under --root " + g.root + ")";
    if (!r.ok()) return Fail(NotFound(local + ", and " + r.status().message()));
    if (r->code == 404) return Fail(NotFound(local + ", nor is it a VMI of the daemon: " + r->Error().message()));
    if (!r->ok()) return Fail(r->Error());
    const json list = json::parse(r->body, nullptr, false);
    if (list.is_object() && list.contains("ports")) ports = vm::PortsFromJson(list["ports"]);
  }
  if (port.empty()) {
    for (const auto& p : ports) std::printf("%s\n", PrintableLine(p.String()).c_str());
    return 0;
  }
  // PORT or PORT/PROTO: the host address alone, as podman port VM 80 prints it.
  std::string want = port.find('/') == std::string::npos ? port + "/tcp" : port;
  for (const auto& p : ports) {
    if (std::to_string(p.guest_port) + "/" + p.protocol == want) {
      std::printf("%s:%d\n", PrintableLine(p.host_ip).c_str(), p.host_port);
      return 0;
    }
  }
  return Fail(NotFound("VM " + c.namespace_ + "/" + PrintableLine(name, 80) + " does not publish port " +
                       PrintableLine(want, 20) + "; regdisk port " + PrintableLine(name, 80) + " lists its ports"));
}

}  // namespace regdisk::cli
