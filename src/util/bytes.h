// Small predicates over byte buffers.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>

namespace regdisk {

// True when all n bytes at p are zero (a hole's worth of data).
inline bool AllZero(const char* p, size_t n) {
  if (n < 16) return std::all_of(p, p + n, [](char c) { return c == 0; });
  static const char kZeros[16] = {};
  return std::memcmp(p, kZeros, 16) == 0 && std::memcmp(p, p + 16, n - 16) == 0;
}

}  // namespace regdisk
