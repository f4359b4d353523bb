// libFuzzer target for registries.conf (registry::RegistriesConf::Parse over
// toml++) and short-name resolution: any file gives a configuration or a
// one-line error naming the file, never a crash; whatever parses can be
// asked for pull sources and short names.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "registry/registries_conf.h"
#include "util/log.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace regdisk;
  log::SetLevel(log::Level::kError);  // unused keys are warnings
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto conf = registry::RegistriesConf::Parse(text, "fuzz.conf");
  if (!conf.ok()) {
    const std::string& m = conf.status().message();
    if (m.find("fuzz.conf") == std::string::npos || m.find('\n') != std::string::npos) {
      std::fprintf(stderr, "error does not name the file on one line: %s\n", m.c_str());
      std::abort();
    }
    return 0;
  }
  registry::RegistriesConf merged;
  merged.MergeFrom(*conf);
  for (const auto& r : conf->registries) {
    for (bool digest : {false, true}) {
      auto sources =
          merged.PullSources(r.prefix.rfind("*.", 0) == 0 ? "a" + r.prefix.substr(1) : r.prefix, "x/y", digest);
      if (sources.ok() && (sources->empty() || sources->back().mirror)) {
        std::fprintf(stderr, "the origin is not the last source for %s\n", r.prefix.c_str());
        std::abort();
      }
    }
  }
  for (const auto& [alias, target] : conf->aliases) (void)registry::ResolveShortName(*conf, alias + ":v1");
  (void)registry::ResolveShortName(*conf, "disk@sha256:0");
  return 0;
}
