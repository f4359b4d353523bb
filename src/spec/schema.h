// KubeVirt's published OpenAPI schema, as regdisk validates specs against
// it. The definitions come from schema/kubevirt/swagger-subset.json (a
// subset of kubevirt/kubevirt's api/openapi-spec/swagger.json, regenerated
// by schema/kubevirt/regenerate.py) and schema/kubevirt/v1alpha1-overlay.json
// (what kubevirt.io/v1alpha1 spelt differently); both are compiled in.
//
//   const KubeVirtSchema* s = KubeVirtSchema::For("kubevirt.io/v1");
//   std::string root = s->RootOf("VirtualMachine");  // "v1.VirtualMachine"
//   SchemaChecker(*s, report).Check(doc, root, "");
//
// The checker reports, for one document: fields the schema does not define
// (an error naming the nearest defined field), values of the wrong type
// (string, integer, number, boolean, object, array; Kubernetes quantities
// take a string or a number), values outside an enum, missing required
// fields, fields regdisk refuses on purpose, and (a warning) fields KubeVirt
// defines that regdisk does not implement. What regdisk implements is the
// table in schema.cc; everything else comes from the schema.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

namespace regdisk::spec {

class KubeVirtSchema {
 public:
  // kubevirt.io/v1 or kubevirt.io/v1alpha1; nullptr for any other version.
  static const KubeVirtSchema* For(std::string_view api_version);

  // The definition a kind's documents follow ("v1.VirtualMachineInstance"),
  // or "" when this version has no such kind.
  std::string RootOf(std::string_view kind) const;
  // nullptr when there is no such definition.
  const nlohmann::json* Definition(const std::string& name) const;
  const std::string& api_version() const { return api_version_; }
  // Upstream commit and version the schema was taken from.
  static const std::string& UpstreamCommit();
  static const std::string& UpstreamVersion();

 private:
  std::string api_version_;
  std::map<std::string, std::string> kinds_;  // kind -> definition
  nlohmann::json definitions_;

  static KubeVirtSchema Load(std::string_view api_version);
};

// The type a YAML node has once read as Kubernetes reads YAML (YAML 1.1
// plain scalars, as sigs.k8s.io/yaml resolves them): "object", "array",
// "null", "boolean", "integer", "number" or "string".
std::string YamlType(const YAML::Node& node);

// True when a plain (unquoted) YAML scalar with this text would be read as
// something other than a string.
bool PlainScalarIsNotString(std::string_view text);

class SchemaChecker {
 public:
  enum class Level { kError, kWarning };
  using Report = std::function<void(Level, const YAML::Node& at, const std::string& path, const std::string& message)>;

  SchemaChecker(const KubeVirtSchema& schema, Report report) : schema_(schema), report_(std::move(report)) {}

  // Checks `node` against the definition `definition`; `path` is the field
  // path of `node` ("" for a document).
  void Check(const YAML::Node& node, const std::string& definition, const std::string& path);

 private:
  void Walk(const YAML::Node& node, const nlohmann::json& schema, const std::string& def_name, const std::string& path,
            bool implemented);
  void WalkObject(const YAML::Node& node, const nlohmann::json& schema, const std::string& def_name,
                  const std::string& path, bool implemented);
  const KubeVirtSchema& schema_;
  Report report_;
};

}  // namespace regdisk::spec
