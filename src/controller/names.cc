#include "controller/names.h"

#include <algorithm>

namespace regdisk::controller {

// Kubernetes' names.SimpleNameGenerator: maxNameLength 63, randomLength 5,
// the base cut to 63 - 5 characters. regdisk adds a "-" between base and
// suffix (issue 13's "<rs>-<random5>"), so the base keeps one less.
constexpr size_t kMaxNameLength = 63;

std::string RandomNameSource::NextSuffix() {
  std::uniform_int_distribution<size_t> pick(0, kNameSuffixAlphabet.size() - 1);
  std::string suffix;
  for (size_t i = 0; i < kNameSuffixLength; ++i) suffix += kNameSuffixAlphabet[pick(engine_)];
  return suffix;
}

std::string GeneratedName(std::string_view base, std::string_view suffix) {
  size_t keep = kMaxNameLength - 1 - std::min(suffix.size(), kMaxNameLength - 1);
  std::string name(base.substr(0, keep));
  name += '-';
  name += suffix;
  return name;
}

}  // namespace regdisk::controller
