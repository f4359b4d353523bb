#include "api/validate.h"

#include "spec/spec.h"

namespace regdisk::api {

using json = nlohmann::json;

Result<FieldValidation> ParseFieldValidation(const std::string& text) {
  if (text.empty() || text == "Warn") return FieldValidation::kWarn;
  if (text == "Strict") return FieldValidation::kStrict;
  if (text == "Ignore") return FieldValidation::kIgnore;
  return InvalidArgument("fieldValidation must be one of Ignore, Warn or Strict, not \"" + text + "\"");
}

namespace {

bool StartsWith(const std::string& s, const std::string& prefix) { return s.compare(0, prefix.size(), prefix) == 0; }

// Removes the field at `path` ("spec.a[2].b") from `object`, if there.
void Prune(json* object, const std::string& path) {
  json* cur = object;
  size_t i = 0;
  std::string key;
  while (i < path.size()) {
    size_t end = path.find_first_of(".[", i);
    if (end == std::string::npos) end = path.size();
    key = path.substr(i, end - i);
    i = end;
    bool last = i >= path.size();
    if (!key.empty()) {
      if (!cur->is_object() || !cur->contains(key)) return;
      if (last) {
        cur->erase(key);
        return;
      }
      cur = &(*cur)[key];
    }
    if (i < path.size() && path[i] == '[') {
      size_t close = path.find(']', i);
      if (close == std::string::npos || !cur->is_array()) return;
      size_t index = std::strtoul(path.c_str() + i + 1, nullptr, 10);
      if (index >= cur->size()) return;
      cur = &(*cur)[index];
      i = close + 1;
    }
    if (i < path.size() && path[i] == '.') ++i;
  }
}

// The object as the spec parser should see it: what a client writes.
json Checked(const json& object) {
  json c = object;
  c.erase("status");
  if (c.contains("metadata") && c["metadata"].is_object()) {
    json& m = c["metadata"];
    for (const char* k : {"uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
                          "deletionGracePeriodSeconds", "managedFields", "ownerReferences", "finalizers", "selfLink",
                          "generateName"}) {
      m.erase(k);
    }
  }
  return c;
}

}  // namespace

Validation ValidateObject(const Resource& r, json* object) {
  Validation v;
  if (r.kind == "Namespace") return v;
  spec::ParseResult parsed = spec::ParseSpecs(Checked(*object).dump(-1, ' ', false, json::error_handler_t::replace), "request");
  for (const auto& d : parsed.diagnostics) {
    if (d.severity == spec::Diagnostic::Severity::kWarning) {
      v.warnings.push_back(d.path.empty() ? d.message : d.path + ": " + d.message);
    } else if (StartsWith(d.message, "unknown field \"")) {
      v.unknown_fields.push_back(d.path);
    } else if (d.message.find("is not in this file") != std::string::npos) {
      // A Secret the object names need not exist when the object is
      // written (Kubernetes checks it when the VM starts).
    } else {
      v.errors.emplace_back(d.path, d.message);
    }
  }
  for (const auto& path : v.unknown_fields) Prune(object, path);
  return v;
}

}  // namespace regdisk::api
