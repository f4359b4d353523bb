// libFuzzer target for the WWW-Authenticate challenge parser
// (registry::ParseChallenges) and the --creds flag: any header gives a list
// of challenges without crashing or hanging, each with a lowercase scheme.
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "registry/auth.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace regdisk;
  std::string_view header(reinterpret_cast<const char*>(data), size);
  std::vector<registry::Challenge> challenges = registry::ParseChallenges(header);
  if (challenges.size() > size) {
    std::fprintf(stderr, "%zu challenges from %zu bytes\n", challenges.size(), size);
    std::abort();
  }
  for (const auto& c : challenges) {
    for (char ch : c.scheme) {
      if (std::isupper(static_cast<unsigned char>(ch))) {
        std::fprintf(stderr, "scheme \"%s\" is not lowercased\n", c.scheme.c_str());
        std::abort();
      }
    }
    (void)c.params.size();
  }
  (void)registry::ParseCredsFlag(header);
  return 0;
}
