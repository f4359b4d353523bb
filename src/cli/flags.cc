#include "cli/flags.h"

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstdlib>

#include "util/text.h"

namespace regdisk::cli {

namespace {

Status BadDuration(std::string_view flag, std::string_view text) {
  return InvalidArgument(std::string(flag) + " takes a duration such as 30s, 5m, 1h30m or 500ms (a bare number is seconds), not " +
                         Printable(text, 40));
}

// Milliseconds per unit; 0 for an unknown unit.
double UnitMillis(std::string_view unit) {
  if (unit == "ms") return 1;
  if (unit == "s") return 1e3;
  if (unit == "m") return 60e3;
  if (unit == "h") return 3600e3;
  return 0;
}

bool IsNumberChar(char c) { return (c >= '0' && c <= '9') || c == '.'; }

// "12" or "1.5": digits with at most one dot and at least one digit.
bool ParseNumber(std::string_view s, double* out) {
  if (s.empty() || std::count(s.begin(), s.end(), '.') > 1 || s == ".") return false;
  *out = std::strtod(std::string(s).c_str(), nullptr);
  return true;
}

}  // namespace

Result<std::chrono::milliseconds> ParseDuration(std::string_view flag, std::string_view text) {
  constexpr double kMaxMillis = 10.0 * 366 * 24 * 3600e3;
  if (text.empty()) return BadDuration(flag, text);
  double total = 0;
  if (std::all_of(text.begin(), text.end(), IsNumberChar)) {
    if (!ParseNumber(text, &total)) return BadDuration(flag, text);
    total *= 1e3;
  } else {
    size_t i = 0;
    while (i < text.size()) {
      size_t num_end = i;
      while (num_end < text.size() && IsNumberChar(text[num_end])) ++num_end;
      size_t unit_end = num_end;
      while (unit_end < text.size() && !IsNumberChar(text[unit_end])) ++unit_end;
      double value = 0;
      const double per = UnitMillis(text.substr(num_end, unit_end - num_end));
      if (!ParseNumber(text.substr(i, num_end - i), &value) || per == 0) return BadDuration(flag, text);
      total += value * per;
      i = unit_end;
    }
  }
  if (!std::isfinite(total) || total > kMaxMillis) return BadDuration(flag, text);
  return std::chrono::milliseconds(static_cast<int64_t>(std::llround(total)));
}


std::string Nearest(std::string_view word, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_distance = SIZE_MAX;
  for (const auto& c : candidates) {
    size_t d = EditDistance(word, c);
    if (word.size() >= 2 && c.rfind(word, 0) == 0) d = std::min<size_t>(d, 1);
    if (d < best_distance) {
      best = c;
      best_distance = d;
    }
  }
  return best;
}

}  // namespace regdisk::cli
