// Kubernetes resource quantities: "64M", "512Mi", "1G", "1Gi", "1e9", "0.5",
// "250m". Parsed exactly (no floating point) and rounded up, as Kubernetes
// rounds a quantity up to the unit it is read in.
//
//   ParseQuantity("512Mi", 1)   -> 536870912   (bytes)
//   ParseQuantity("0.5", 1000)  -> 500         (millicores)
#pragma once

#include <cstdint>
#include <string_view>

#include "util/status.h"

namespace regdisk::spec {

// Returns ceil(quantity * scale). Negative quantities and results above
// 2^62 are errors.
Result<int64_t> ParseQuantity(std::string_view text, int64_t scale);

}  // namespace regdisk::spec
