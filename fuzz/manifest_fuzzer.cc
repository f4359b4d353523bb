// libFuzzer target for manifests and indexes (oci::Manifest::Parse, with
// the descriptors and platforms in them): any input parses or gives an
// error without crashing, under every Content-Type a registry may send, and
// every descriptor that parses survives a trip through its JSON unchanged.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "oci/manifest.h"

namespace {

using namespace regdisk;

void CheckDescriptor(const oci::Descriptor& d) {
  std::string printed = d.ToJson().dump();
  auto again = oci::Descriptor::FromJson(d.ToJson());
  if (!again.ok() || again->ToJson().dump() != printed) {
    std::fprintf(stderr, "descriptor %s does not survive a JSON round trip: %s\n", printed.c_str(),
                 again.ok() ? again->ToJson().dump().c_str() : again.status().ToString().c_str());
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view bytes(reinterpret_cast<const char*>(data), size);
  for (std::string_view content_type : {std::string_view(), oci::media::kOciManifest, oci::media::kOciIndex,
                                        oci::media::kDockerManifestList, oci::media::kDockerSchema1}) {
    auto m = oci::Manifest::Parse(bytes, content_type);
    if (!m.ok()) {
      (void)m.status().ToString();
      continue;
    }
    if (m->config) CheckDescriptor(*m->config);
    for (const auto& d : m->layers) CheckDescriptor(d);
    for (const auto& d : m->manifests) CheckDescriptor(d);
    if (m->is_index()) (void)oci::SelectPlatform(*m, oci::Platform{"linux", "amd64", ""});
  }
  if (auto p = oci::Platform::Parse(bytes); p.ok()) (void)p->String();
  return 0;
}
