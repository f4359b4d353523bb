#include "spec/quantity.h"

#include <cctype>
#include <string>

namespace regdisk::spec {

namespace {

__extension__ typedef __int128 Int128;  // exact arithmetic for mantissa * 10^e * 2^p
constexpr Int128 kLimit = static_cast<Int128>(1) << 62;

struct Suffix {
  std::string_view text;
  int pow10;  // decimal SI
  int pow2;   // binary SI
};

constexpr Suffix kSuffixes[] = {
    {"Ki", 0, 10}, {"Mi", 0, 20}, {"Gi", 0, 30}, {"Ti", 0, 40}, {"Pi", 0, 50}, {"Ei", 0, 60},
    {"n", -9, 0},  {"u", -6, 0},  {"m", -3, 0},  {"k", 3, 0},   {"M", 6, 0},   {"G", 9, 0},
    {"T", 12, 0},  {"P", 15, 0},  {"E", 18, 0},  {"", 0, 0},
};

}  // namespace

Result<int64_t> ParseQuantity(std::string_view text, int64_t scale) {
  std::string quoted = "\"";  // (built by append: GCC 12 warns falsely on "x" + std::string)
  quoted.append(text).append("\"");
  auto bad = [&] {
    return InvalidArgument(quoted + " is not a quantity; write a number with an optional suffix such as 64M, 512Mi, 1Gi or 1e9");
  };
  std::string_view s = text;
  if (s.empty()) return bad();
  if (s.front() == '+') s.remove_prefix(1);
  if (!s.empty() && s.front() == '-') return InvalidArgument(quoted + " is negative; quantities must be positive");

  // Mantissa: digits with an optional fraction.
  Int128 mantissa = 0;
  int exp10 = 0;
  size_t i = 0;
  bool digits = false, point = false;
  for (; i < s.size(); ++i) {
    char c = s[i];
    if (c == '.' && !point) {
      point = true;
      continue;
    }
    if (!std::isdigit(static_cast<unsigned char>(c))) break;
    digits = true;
    if (mantissa < kLimit * 1000) {
      mantissa = mantissa * 10 + (c - '0');
      if (point) --exp10;
    } else if (!point) {
      ++exp10;  // too many digits to keep: the value is huge anyway
    }
  }
  if (!digits) return bad();
  std::string_view rest = s.substr(i);

  int pow2 = 0;
  if (!rest.empty() && (rest.front() == 'e' || rest.front() == 'E') && rest.size() > 1 &&
      (std::isdigit(static_cast<unsigned char>(rest[1])) || rest[1] == '-' || rest[1] == '+')) {
    std::string_view e = rest.substr(1);
    bool neg = false;
    if (e.front() == '-' || e.front() == '+') {
      neg = e.front() == '-';
      e.remove_prefix(1);
    }
    if (e.empty() || e.size() > 3) return bad();
    int v = 0;
    for (char c : e) {
      if (!std::isdigit(static_cast<unsigned char>(c))) return bad();
      v = v * 10 + (c - '0');
    }
    exp10 += neg ? -v : v;
  } else {
    bool found = false;
    for (const auto& suf : kSuffixes) {
      if (rest == suf.text) {
        exp10 += suf.pow10;
        pow2 = suf.pow2;
        found = true;
        break;
      }
    }
    if (!found) return bad();
  }

  // value = mantissa * 10^exp10 * 2^pow2 * scale, rounded up.
  Int128 num = mantissa * scale;
  Int128 den = 1;
  for (; exp10 > 0; --exp10) {
    num *= 10;
    if (num > kLimit * 1000000) return InvalidArgument(quoted + " is too large");
  }
  for (; exp10 < 0; ++exp10) {
    den *= 10;
    if (den > kLimit) return InvalidArgument(quoted + " has too many decimal places");
  }
  for (; pow2 > 0; --pow2) {
    num *= 2;
    if (num > kLimit * 1000000) return InvalidArgument(quoted + " is too large");
  }
  Int128 value = (num + den - 1) / den;
  if (value > kLimit) return InvalidArgument(quoted + " is too large");
  return static_cast<int64_t>(value);
}

}  // namespace regdisk::spec
