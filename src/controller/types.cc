#include "controller/types.h"

namespace regdisk::controller {

std::string_view PhaseName(VmiPhase phase) {
  switch (phase) {
    case VmiPhase::kPending:
      return "Pending";
    case VmiPhase::kScheduling:
      return "Scheduling";
    case VmiPhase::kScheduled:
      return "Scheduled";
    case VmiPhase::kRunning:
      return "Running";
    case VmiPhase::kSucceeded:
      return "Succeeded";
    case VmiPhase::kFailed:
      return "Failed";
    case VmiPhase::kUnknown:
      return "Unknown";
  }
  return "Unknown";
}

bool SelectorMatches(const Labels& selector, const Labels& labels) {
  for (const auto& [key, value] : selector) {
    auto it = labels.find(key);
    if (it == labels.end() || it->second != value) return false;
  }
  return true;
}

std::string SelectorString(const Labels& selector) {
  std::string out;
  for (const auto& [key, value] : selector) {  // std::map: sorted by key
    if (!out.empty()) out += ',';
    out += key;
    out += '=';
    out += value;
  }
  return out;
}

}  // namespace regdisk::controller
