// libFuzzer target for the VM spec parser: any input must give a result
// (objects or diagnostics) without crashing, hanging or tripping ASan.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include <nlohmann/json.hpp>

#include "spec/spec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  regdisk::spec::ParseResult r = regdisk::spec::ParseSpecs(text, "fuzz.yaml");
  for (const auto& d : r.diagnostics) (void)d.ToString();
  for (const auto& o : r.objects) {
    nlohmann::json j = regdisk::spec::ToJson(o);
    (void)j.dump();
    (void)regdisk::spec::ToYaml(j);
  }
  return 0;
}
