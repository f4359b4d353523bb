// libFuzzer target for image references (oci::Reference) and image names
// (image::ImageName): any input parses or gives an error without crashing,
// and what parses prints as a string that parses back to the same value.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "image/transport.h"
#include "oci/digest.h"
#include "oci/reference.h"

namespace {

[[noreturn]] void Fail(const char* what, const std::string& printed, const std::string& why) {
  std::fprintf(stderr, "%s \"%s\" does not parse back to itself: %s\n", what, printed.c_str(), why.c_str());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace regdisk;
  std::string_view text(reinterpret_cast<const char*>(data), size);
  if (auto ref = oci::Reference::Parse(text); ref.ok()) {
    (void)ref->ApiHost();
    (void)ref->IsLoopback();
    (void)ref->ManifestRef();
    std::string printed = ref->String();
    auto again = oci::Reference::Parse(printed);
    if (!again.ok()) Fail("reference", printed, again.status().ToString());
    if (again->String() != printed) Fail("reference", printed, "it parses as " + again->String());
  }
  if (auto name = image::ImageName::Parse(text); name.ok()) {
    std::string printed = name->String();
    auto again = image::ImageName::Parse(printed);
    if (!again.ok()) Fail("image name", printed, again.status().ToString());
    if (again->String() != printed) Fail("image name", printed, "it parses as " + again->String());
  }
  (void)oci::IsValidTag(text);
  (void)oci::Digest::Parse(text);
  return 0;
}
