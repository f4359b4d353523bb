// Showing text that came from outside (an image, a registry, a file) to a
// user: control characters and invalid UTF-8 escaped, length bounded, so a
// hostile name cannot move the cursor, forge a second line or make a
// megabyte-long error.
//
//   return InvalidArgument("layer 1 has an entry " + Printable(path) + " ...");
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace regdisk {

// `s` quoted ("..."), with bytes below 0x20, DEL, backslash, the quote and
// invalid UTF-8 written as C escapes (\n, \t, \x1b, \\, \"), cut to about
// `max_bytes` with "..." and the original length when longer.
std::string Printable(std::string_view s, size_t max_bytes = 160);

// A whole message line made safe for a terminal: the same escapes without
// the quotes, cut to `max_bytes`.
std::string PrintableLine(std::string_view s, size_t max_bytes = 2000);

// Levenshtein distance between two byte strings (insertions, deletions and
// substitutions each count one), for "did you mean" suggestions; ASCII
// letters compare without case when `ignore_case`.
size_t EditDistance(std::string_view a, std::string_view b, bool ignore_case = false);

}  // namespace regdisk
