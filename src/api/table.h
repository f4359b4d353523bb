// Server-side printing: the meta.k8s.io/v1 Table kubectl asks for with
// `Accept: application/json;as=Table;v=v1;g=meta.k8s.io`, with KubeVirt's
// printer columns (its CRDs' additionalPrinterColumns) for the kubevirt.io
// kinds, and kubectl's defaults (Name, Age; Type, Data for Secrets; Status
// for Namespaces) for the core ones.
//
//   if (WantsTable(req.Header("accept"))) body = ToTable(resource, items, rv, now);
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "api/resources.h"

namespace regdisk::api {

// True when the Accept header asks for a meta.k8s.io/v1 Table.
bool WantsTable(std::string_view accept);

// A Table of `objects` (one row each, the row's object the object's
// PartialObjectMetadata); `now` is Unix seconds for the Age column.
nlohmann::json ToTable(const Resource& r, const std::vector<nlohmann::json>& objects, const std::string& resource_version,
                       int64_t now, bool with_columns = true);

// Kubernetes' duration.HumanDuration: "45s", "3m20s", "5h2m", "12d", "2y30d".
std::string HumanDuration(int64_t seconds);

}  // namespace regdisk::api
