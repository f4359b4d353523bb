// Flag values the command line shares: durations and "did you mean".
//
//   ASSIGN_OR_RETURN(auto grace, ParseDuration("--grace", "1m30s"));  // 90 s
//   Nearest("logn", {"login", "pull"});                              // "login"
//
// Pure functions, no I/O; errors are InvalidArgument naming the flag.
#pragma once

#include <chrono>
#include <string>
#include <string_view>
#include <vector>

#include "util/status.h"

namespace regdisk::cli {

// A duration as Go and kubectl write them: one or more NUMBER UNIT pairs,
// units ms, s, m, h ("500ms", "10s", "1h30m", "1.5h"); a bare number is
// seconds, as earlier regdisk versions took. Negative values, unknown
// units and values over 10 years are refused with a message naming `flag`.
Result<std::chrono::milliseconds> ParseDuration(std::string_view flag, std::string_view text);

// The candidate closest to `word` by edit distance (a candidate that
// starts with `word` counts as one edit away; ties go to the first); empty
// only when there are no candidates.
std::string Nearest(std::string_view word, const std::vector<std::string>& candidates);

}  // namespace regdisk::cli
