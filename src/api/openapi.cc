#include "api/openapi.h"

#include <functional>
#include <map>
#include <set>

#include "api/resources.h"
#include "spec/schema.h"

namespace regdisk::api {

using json = nlohmann::json;

namespace {

const char kMetaPrefix[] = "k8s.io.apimachinery.pkg.apis.meta.v1.";

// Rewrites every "$ref": "#/definitions/X" to `prefix` + X.
void Rebase(json* j, const std::string& prefix) {
  if (j->is_object()) {
    for (auto& [k, v] : j->items()) {
      if (k == "$ref" && v.is_string() && v.get<std::string>().rfind("#/definitions/", 0) == 0) {
        v = prefix + v.get<std::string>().substr(14);
      } else {
        Rebase(&v, prefix);
      }
    }
  } else if (j->is_array()) {
    for (auto& e : *j) Rebase(&e, prefix);
  }
}

// The definition `name` and every one it refers to, from `schema`.
void Collect(const spec::KubeVirtSchema& schema, const std::string& name, std::map<std::string, json>* out) {
  if (out->count(name)) return;
  const json* def = schema.Definition(name);
  if (!def) return;
  (*out)[name] = *def;
  std::function<void(const json&)> walk = [&](const json& j) {
    if (j.is_object()) {
      for (const auto& [k, v] : j.items()) {
        if (k == "$ref" && v.is_string() && v.get<std::string>().rfind("#/definitions/", 0) == 0) {
          Collect(schema, v.get<std::string>().substr(14), out);
        } else {
          walk(v);
        }
      }
    } else if (j.is_array()) {
      for (const auto& e : j) walk(e);
    }
  };
  walk(*def);
}

json Gvk(const Resource& r) { return {{"group", r.group}, {"version", r.version}, {"kind", r.kind}}; }

// Secret and Namespace as kubectl needs them: their fields, metadata from
// the KubeVirt schema's ObjectMeta.
std::map<std::string, json> CoreDefinitions() {
  std::map<std::string, json> defs;
  Collect(*spec::KubeVirtSchema::For("kubevirt.io/v1"), std::string(kMetaPrefix) + "ObjectMeta", &defs);
  json meta_ref = {{"$ref", std::string("#/definitions/") + kMetaPrefix + "ObjectMeta"}};
  json strings = {{"type", "object"}, {"additionalProperties", {{"type", "string"}}}};
  json bytes = {{"type", "object"}, {"additionalProperties", {{"type", "string"}, {"format", "byte"}}}};
  defs["io.k8s.api.core.v1.Secret"] = {
      {"type", "object"},
      {"properties",
       {{"apiVersion", {{"type", "string"}}},
        {"kind", {{"type", "string"}}},
        {"metadata", meta_ref},
        {"data", bytes},
        {"stringData", strings},
        {"type", {{"type", "string"}}},
        {"immutable", {{"type", "boolean"}}}}}};
  defs["io.k8s.api.core.v1.Namespace"] = {
      {"type", "object"},
      {"properties",
       {{"apiVersion", {{"type", "string"}}},
        {"kind", {{"type", "string"}}},
        {"metadata", meta_ref},
        {"spec", {{"type", "object"}, {"properties", {{"finalizers", {{"type", "array"}, {"items", {{"type", "string"}}}}}}}}},
        {"status", {{"type", "object"}, {"properties", {{"phase", {{"type", "string"}}}}}}}}}};
  return defs;
}

// The definition a resource's objects follow, and the definitions needed.
std::string RootDefinition(const Resource& r, std::map<std::string, json>* defs) {
  if (r.group.empty()) {
    for (auto& [k, v] : CoreDefinitions()) (*defs)[k] = v;
    return "io.k8s.api.core.v1." + r.kind;
  }
  const spec::KubeVirtSchema* schema = spec::KubeVirtSchema::For(r.api_version());
  std::string root = schema->RootOf(r.kind);
  Collect(*schema, root, defs);
  return root;
}

json Operation(const Resource& r, const std::string& action, const std::string& ref, bool with_body, bool validation) {
  json params = json::array();
  if (validation) {
    for (const char* p : {"dryRun", "fieldManager", "fieldValidation"}) {
      params.push_back({{"name", p}, {"in", "query"}, {"schema", {{"type", "string"}}}, {"uniqueItems", true}});
    }
  }
  json op = {{"operationId", action + r.kind},
             {"tags", {r.group.empty() ? "core_v1" : "kubevirt.io_" + r.version}},
             {"parameters", params},
             {"responses", {{"200", {{"description", "OK"}, {"content", {{"application/json", {{"schema", {{"$ref", ref}}}}}}}}}}},
             {"x-kubernetes-action", action},
             {"x-kubernetes-group-version-kind", Gvk(r)}};
  if (with_body) {
    json types = json::object();
    for (const char* t : {"application/json", "application/merge-patch+json", "application/json-patch+json",
                          "application/strategic-merge-patch+json"}) {
      if (action != "patch" && std::string(t) != "application/json") continue;
      types[t] = {{"schema", action == "patch" ? json::object() : json{{"$ref", ref}}}};
    }
    op["requestBody"] = {{"content", types}, {"required", true}};
  }
  return op;
}

json PathParams(bool named, bool namespaced) {
  json params = json::array();
  if (named) params.push_back({{"name", "name"}, {"in", "path"}, {"required", true}, {"schema", {{"type", "string"}}}});
  if (namespaced) {
    params.push_back({{"name", "namespace"}, {"in", "path"}, {"required", true}, {"schema", {{"type", "string"}}}});
  }
  return params;
}

// The OpenAPI 3.0 document of one group version ("v1", "kubevirt.io/v1").
json V3Document(const std::string& group_version) {
  std::map<std::string, json> defs;
  json paths = json::object();
  for (const auto& r : Resources()) {
    if (r.api_version() != group_version) continue;
    const std::string root = RootDefinition(r, &defs);
    defs[root]["x-kubernetes-group-version-kind"] = json::array({Gvk(r)});
    const std::string ref = "#/components/schemas/" + root;
    const std::string prefix = (r.group.empty() ? "/api/v1" : "/apis/" + group_version) +
                               (r.namespaced ? "/namespaces/{namespace}/" : "/") + r.plural;
    paths[prefix] = {{"get", Operation(r, "list", ref, false, false)},
                     {"post", Operation(r, "post", ref, true, true)},
                     {"parameters", PathParams(false, r.namespaced)}};
    paths[prefix + "/{name}"] = {{"get", Operation(r, "get", ref, false, false)},
                                 {"put", Operation(r, "put", ref, true, true)},
                                 {"patch", Operation(r, "patch", ref, true, true)},
                                 {"delete", Operation(r, "delete", ref, false, false)},
                                 {"parameters", PathParams(true, r.namespaced)}};
  }
  json schemas = json::object();
  for (auto& [name, def] : defs) {
    json d = def;
    Rebase(&d, "#/components/schemas/");
    schemas[name] = d;
  }
  return {{"openapi", "3.0.0"},
          {"info", {{"title", "regdisk"}, {"version", "v1.32.0"}}},
          {"paths", paths},
          {"components", {{"schemas", schemas}}}};
}

// One Swagger 2.0 document for every group version.
json V2Document() {
  std::map<std::string, json> defs;
  for (const auto& r : Resources()) {
    std::map<std::string, json> mine;
    const std::string root = RootDefinition(r, &mine);
    // v1alpha1 kinds reuse v1 definition names with other fields: keep
    // them apart.
    std::string name = r.version == "v1alpha1" ? "v1alpha1." + r.kind : root;
    for (auto& [k, v] : mine) {
      if (k != root && !defs.count(k)) defs[k] = v;
    }
    json d = mine[root];
    d["x-kubernetes-group-version-kind"] = json::array({Gvk(r)});
    defs[name] = d;
  }
  return {{"swagger", "2.0"}, {"info", {{"title", "regdisk"}, {"version", "v1.32.0"}}}, {"paths", json::object()},
          {"definitions", defs}};
}

const std::map<std::string, json>& V3Documents() {
  static const std::map<std::string, json> docs = [] {
    std::map<std::string, json> m;
    for (const char* gv : {"v1", "kubevirt.io/v1", "kubevirt.io/v1alpha1"}) m[gv] = V3Document(gv);
    return m;
  }();
  return docs;
}

std::string Hash(const json& doc) {
  char buf[17];
  snprintf(buf, sizeof buf, "%016zX", std::hash<std::string>{}(doc.dump()));
  return buf;
}

}  // namespace

std::optional<json> OpenApiDocument(const std::vector<std::string>& segs, const std::string& accept) {
  if (segs.size() == 2 && segs[1] == "v2") {
    if (!accept.empty() && accept.find("json") == std::string::npos && accept.find("*/*") == std::string::npos) {
      return std::nullopt;
    }
    static const json v2 = V2Document();
    return v2;
  }
  if (segs.size() < 2 || segs[1] != "v3") return std::nullopt;
  if (segs.size() == 2) {
    json paths = json::object();
    for (const auto& [gv, doc] : V3Documents()) {
      std::string path = gv == "v1" ? "api/v1" : "apis/" + gv;
      paths[path] = {{"serverRelativeURL", "/openapi/v3/" + path + "?hash=" + Hash(doc)}};
    }
    return json{{"paths", paths}};
  }
  std::string gv;
  if (segs.size() == 4 && segs[2] == "api") gv = segs[3];
  if (segs.size() == 5 && segs[2] == "apis") gv = segs[3] + "/" + segs[4];
  auto it = V3Documents().find(gv);
  if (it == V3Documents().end()) return std::nullopt;
  return it->second;
}

}  // namespace regdisk::api
