// version and --version: what regdisk is, what it speaks, and which QEMU
// `regdisk run` would start.
#include <cstdio>
#include <string>

#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "util/process.h"
#include "util/text.h"

#ifndef REGDISK_VERSION
#error "REGDISK_VERSION comes from the CMake project version (src/CMakeLists.txt)"
#endif

namespace regdisk::cli {

namespace {

using json = nlohmann::json;

// The specifications regdisk reads and writes.
constexpr const char* kOciImageSpec = "1.1";          // manifests, indexes, layouts, zstd layers
constexpr const char* kOciDistributionSpec = "1.0";   // the registry API (no referrers)
constexpr const char* kDockerManifest = "v2 schema 2";
const char* const kKubeVirtApis[] = {"kubevirt.io/v1", "kubevirt.io/v1alpha1"};
constexpr const char* kQemu = "qemu-system-x86_64";

struct QemuVersion {
  std::string binary;   // the path found, empty when none
  std::string version;  // "7.2.19", empty when unknown
  std::string problem;  // why there is no version, for people
};

// Runs `qemu-system-x86_64 --version` (first line: "QEMU emulator version
// 7.2.19 (Debian ...)").
QemuVersion ProbeQemu() {
  QemuVersion q;
  q.binary = FindExecutable(kQemu).string();
  if (q.binary.empty()) {
    q.problem = std::string(kQemu) + " is not on PATH (regdisk run needs it, or --qemu)";
    return q;
  }
  auto out = Process::Run({q.binary, "--version"}, std::chrono::seconds(10));
  if (!out.ok() || out->exit_code != 0) {
    q.problem = q.binary + " --version failed" + (out.ok() ? "" : ": " + out.status().message());
    return q;
  }
  std::string first = out->out.substr(0, out->out.find('\n'));
  const std::string marker = "version ";
  size_t at = first.find(marker);
  if (at == std::string::npos) {
    q.problem = q.binary + " --version said something unexpected: " + Printable(first, 80);
    return q;
  }
  at += marker.size();
  q.version = first.substr(at, first.find(' ', at) - at);
  return q;
}

}  // namespace

const char* Version() { return REGDISK_VERSION; }

int RunVersion(const std::string& output) {
  const QemuVersion q = ProbeQemu();
  if (output == "json") {
    json apis = json::array();
    for (const char* a : kKubeVirtApis) apis.push_back(a);
    json qemu = {{"binary", q.binary}, {"version", q.version}};
    if (!q.problem.empty()) qemu["error"] = q.problem;
    json j = {{"version", Version()},
              {"oci", {{"imageSpec", kOciImageSpec}, {"distributionSpec", kOciDistributionSpec}}},
              {"dockerManifest", kDockerManifest},
              {"kubevirtApiVersions", apis},
              {"qemu", qemu}};
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("regdisk version %s\n", Version());
  std::printf("OCI image-spec: %s\nOCI distribution-spec: %s\nDocker image manifest: %s\n", kOciImageSpec,
              kOciDistributionSpec, kDockerManifest);
  std::printf("KubeVirt API: %s, %s\n", kKubeVirtApis[0], kKubeVirtApis[1]);
  if (q.problem.empty()) {
    std::printf("QEMU: %s (%s)\n", q.version.c_str(), q.binary.c_str());
  } else {
    std::printf("QEMU: unavailable: %s\n", q.problem.c_str());
  }
  return 0;
}

}  // namespace regdisk::cli
