// The OpenAPI documents kubectl reads, built from the KubeVirt schema
// regdisk validates with (schema/kubevirt, compiled in; spec/schema.h):
//   /openapi/v3                  the index of group versions (JSON)
//   /openapi/v3/api/v1           Secret and Namespace
//   /openapi/v3/apis/kubevirt.io/v1, .../v1alpha1
//   /openapi/v2                  one Swagger 2.0 document (JSON only)
// Each group version lists, per kind, the object paths with their
// operations; the PATCH operations declare the fieldValidation parameter,
// which is how kubectl (1.27+) learns that the server validates fields
// itself, so `kubectl apply` sends fieldValidation=Strict and reports the
// server's strict-decoding errors as against a cluster.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace regdisk::api {

// The document for a path split into segments ({"openapi", "v3", "apis",
// "kubevirt.io", "v1"}), nullopt when there is none. `accept` is the
// request's Accept header: /openapi/v2 is served as JSON only, so a client
// that asks only for protobuf gets nullopt too.
std::optional<nlohmann::json> OpenApiDocument(const std::vector<std::string>& segs, const std::string& accept);

}  // namespace regdisk::api
