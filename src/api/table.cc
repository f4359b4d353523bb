#include "api/table.h"

#include <algorithm>
#include <ctime>

#include "state/object_store.h"

namespace regdisk::api {

using json = nlohmann::json;

namespace {

// One printer column: its definition and how a cell is read from an object.
struct Column {
  std::string name;
  std::string type;  // string | integer | date
  std::string description;
  int priority = 0;  // 1: only with -o wide
  json (*cell)(const json& object);
};

const json* At(const json& j, std::initializer_list<const char*> path) {
  const json* cur = &j;
  for (const char* key : path) {
    if (!cur->is_object()) return nullptr;
    auto it = cur->find(key);
    if (it == cur->end()) return nullptr;
    cur = &*it;
  }
  return cur;
}

json Value(const json& j, std::initializer_list<const char*> path) {
  const json* v = At(j, path);
  return v ? *v : json(nullptr);
}

// .status.conditions[?(@.type==TYPE)].status
json Condition(const json& object, const char* type) {
  const json* conds = At(object, {"status", "conditions"});
  if (!conds || !conds->is_array()) return nullptr;
  for (const auto& c : *conds) {
    if (c.is_object() && c.value("type", "") == type && c.contains("status")) return c["status"];
  }
  return nullptr;
}

json Created(const json& o) { return Value(o, {"metadata", "creationTimestamp"}); }

json FirstIp(const json& o) {
  const json* ifs = At(o, {"status", "interfaces"});
  if (!ifs || !ifs->is_array() || ifs->empty() || !(*ifs)[0].is_object()) return nullptr;
  return (*ifs)[0].contains("ipAddress") ? (*ifs)[0]["ipAddress"] : json(nullptr);
}

// KubeVirt's additionalPrinterColumns (pkg/virt-operator/resource/generate/components/crds.go).
const std::vector<Column>& ColumnsFor(const Resource& r) {
  static const std::vector<Column> kVmi = {
      {"Age", "date", "", 0, Created},
      {"Phase", "string", "", 0, [](const json& o) { return Value(o, {"status", "phase"}); }},
      {"IP", "string", "", 0, FirstIp},
      {"NodeName", "string", "", 0, [](const json& o) { return Value(o, {"status", "nodeName"}); }},
      {"Ready", "string", "", 0, [](const json& o) { return Condition(o, "Ready"); }},
      {"Live-Migratable", "string", "", 1, [](const json& o) { return Condition(o, "LiveMigratable"); }},
      {"Paused", "string", "", 1, [](const json& o) { return Condition(o, "Paused"); }},
  };
  static const std::vector<Column> kVm = {
      {"Age", "date", "", 0, Created},
      {"Status", "string", "Human Readable Status", 0,
       [](const json& o) { return Value(o, {"status", "printableStatus"}); }},
      {"Ready", "string", "", 0, [](const json& o) { return Condition(o, "Ready"); }},
  };
  static const std::vector<Column> kReplicaSet = {
      {"Desired", "integer", "Number of desired VirtualMachineInstances", 0,
       [](const json& o) { return Value(o, {"spec", "replicas"}); }},
      {"Current", "integer", "Number of managed and not final or deleted VirtualMachineInstances", 0,
       [](const json& o) { return Value(o, {"status", "replicas"}); }},
      {"Ready", "integer", "Number of managed VirtualMachineInstances which are ready to receive traffic", 0,
       [](const json& o) { return Value(o, {"status", "readyReplicas"}); }},
      {"Age", "date", "", 0, Created},
  };
  static const std::vector<Column> kSecret = {
      {"Type", "string", "", 0, [](const json& o) { return Value(o, {"type"}); }},
      {"Data", "integer", "", 0,
       [](const json& o) {
         const json* d = At(o, {"data"});
         return json(d && d->is_object() ? d->size() : 0);
       }},
      {"Age", "date", "", 0, Created},
  };
  static const std::vector<Column> kNamespace = {
      {"Status", "string", "", 0, [](const json& o) { return Value(o, {"status", "phase"}); }},
      {"Age", "date", "", 0, Created},
  };
  if (r.kind == "VirtualMachineInstance" || (r.kind == "VirtualMachine" && r.version == "v1alpha1")) return kVmi;
  if (r.kind == "VirtualMachine") return kVm;
  if (r.has_scale) return kReplicaSet;
  if (r.kind == "Secret") return kSecret;
  return kNamespace;
}

int64_t ParseTimestamp(const std::string& text) {
  std::tm tm{};
  if (!strptime(text.c_str(), "%Y-%m-%dT%H:%M:%SZ", &tm)) return -1;
  return timegm(&tm);
}

json PartialMetadata(const json& object) {
  json meta = object.contains("metadata") ? object["metadata"] : json::object();
  meta.erase("managedFields");
  return {{"kind", "PartialObjectMetadata"}, {"apiVersion", "meta.k8s.io/v1"}, {"metadata", meta}};
}

}  // namespace

bool WantsTable(std::string_view accept) {
  // Media types are separated by commas, their parameters by semicolons.
  size_t start = 0;
  while (start < accept.size()) {
    size_t end = std::min(accept.find(',', start), accept.size());
    std::string_view type = accept.substr(start, end - start);
    bool as_table = false, group = false, v1 = false;
    size_t p = 0;
    while (p < type.size()) {
      size_t q = std::min(type.find(';', p), type.size());
      std::string param;
      for (char c : type.substr(p, q - p)) {
        if (c != ' ') param += c;
      }
      as_table |= param == "as=Table";
      group |= param == "g=meta.k8s.io";
      v1 |= param == "v=v1";
      p = q + 1;
    }
    if (as_table && group && v1) return true;
    start = end + 1;
  }
  return false;
}

std::string HumanDuration(int64_t s) {
  if (s < -1) return "<invalid>";
  if (s < 0) return "0s";
  auto str = [](int64_t v) { return std::to_string(v); };
  if (s < 60 * 2) return str(s) + "s";
  int64_t minutes = s / 60;
  if (minutes < 10) {
    int64_t sec = s % 60;
    return sec == 0 ? str(minutes) + "m" : str(minutes) + "m" + str(sec) + "s";
  }
  if (minutes < 60 * 3) return str(minutes) + "m";
  int64_t hours = s / 3600;
  if (hours < 8) {
    int64_t m = minutes % 60;
    return m == 0 ? str(hours) + "h" : str(hours) + "h" + str(m) + "m";
  }
  if (hours < 48) return str(hours) + "h";
  if (hours < 24 * 8) {
    int64_t h = hours % 24;
    return h == 0 ? str(hours / 24) + "d" : str(hours / 24) + "d" + str(h) + "h";
  }
  if (hours < 24 * 365 * 2) return str(hours / 24) + "d";
  if (hours < 24 * 365 * 8) {
    int64_t dy = hours / 24 % 365;
    return dy == 0 ? str(hours / 24 / 365) + "y" : str(hours / 24 / 365) + "y" + str(dy) + "d";
  }
  return str(hours / 24 / 365) + "y";
}

json ToTable(const Resource& r, const std::vector<json>& objects, const std::string& resource_version, int64_t now,
             bool with_columns) {
  const auto& columns = ColumnsFor(r);
  json defs = json::array();
  defs.push_back({{"name", "Name"},
                  {"type", "string"},
                  {"format", "name"},
                  {"description", "Name must be unique within a namespace."},
                  {"priority", 0}});
  for (const auto& c : columns) {
    defs.push_back({{"name", c.name},
                    {"type", c.type == "date" ? "date" : c.type},
                    {"format", ""},
                    {"description", c.description},
                    {"priority", c.priority}});
  }
  json rows = json::array();
  for (const auto& o : objects) {
    json cells = json::array();
    cells.push_back(o.contains("metadata") ? o["metadata"].value("name", "") : "");
    for (const auto& c : columns) {
      json v = c.cell(o);
      if (c.type == "date" && v.is_string()) v = HumanDuration(now - ParseTimestamp(v.get<std::string>()));
      cells.push_back(v);
    }
    rows.push_back({{"cells", cells}, {"object", PartialMetadata(o)}});
  }
  json table = {{"kind", "Table"},
                {"apiVersion", "meta.k8s.io/v1"},
                {"metadata", {{"resourceVersion", resource_version}}},
                {"rows", rows}};
  table["columnDefinitions"] = with_columns ? defs : json::array();
  return table;
}

}  // namespace regdisk::api
