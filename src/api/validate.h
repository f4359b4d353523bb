// What the API server checks in an object before it stores it: unknown
// fields (Kubernetes' field validation: Strict refuses them, Warn and
// Ignore drop them, Warn with a warning) and KubeVirt's rules, by the same
// parser and schema regdisk validate uses (src/spec).
//
//   ASSIGN_OR_RETURN(FieldValidation fv, ParseFieldValidation(req.Query("fieldValidation")));
//   Validation v = ValidateObject(*resource, &object);
//   if (fv == FieldValidation::kStrict && !v.unknown_fields.empty()) -> 400 strict decoding error
//   if (!v.errors.empty()) -> 422 Invalid with causes
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "api/resources.h"
#include "util/status.h"

namespace regdisk::api {

enum class FieldValidation { kIgnore, kWarn, kStrict };

// The fieldValidation query parameter; "" is Warn, as for the API server.
Result<FieldValidation> ParseFieldValidation(const std::string& text);

struct Validation {
  std::vector<std::string> unknown_fields;  // "spec.domain.foo"
  std::vector<std::pair<std::string, std::string>> errors;  // field path, message
  std::vector<std::string> warnings;  // "spec.x: is defined by KubeVirt but not implemented..."
};

// Checks `object` (status and server-set metadata are not checked) and
// removes the unknown fields from it. Namespaces are not checked.
Validation ValidateObject(const Resource& r, nlohmann::json* object);

}  // namespace regdisk::api
