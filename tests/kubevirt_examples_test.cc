// KubeVirt's own examples (tests/kubevirt-examples/, vendored verbatim from
// kubevirt/kubevirt and the KubeVirt user guide; see README.md there): each
// validates, or is refused for the one reason listed here.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <map>

#include <nlohmann/json.hpp>

#include "harness/harness.h"
#include "spec/spec.h"

namespace regdisk::spec {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

// Examples regdisk refuses, and why (a substring of one of the errors).
const std::map<std::string, std::string> kRefused = {
    // Live migration: registry disks are node-local.
    {"user-guide/cluster_admin-node_maintenance-0.yaml", "live migration is not possible"},
    // The guide puts ioThreadsPolicy under cpu; KubeVirt's schema has it on
    // domain, so KubeVirt's API server refuses this one too.
    {"user-guide/compute-numa-1.yaml", "cpu.ioThreadsPolicy: unknown field \"ioThreadsPolicy\""},
    // No memory at all (KubeVirt refuses it too).
    {"user-guide/compute-run_strategies-0.yaml", "memory: is required"},
    // An empty cdrom for media hotplugged later.
    {"user-guide/storage-hotplug_volumes-0.yaml", "regdisk does not insert media into an empty cdrom"},
    // The memory comes from an instancetype in the cluster.
    {"user-guide/user_workloads-boot_from_external_source-1.yaml", "instancetype u1.medium, which lives in the cluster"},
    // An old OpenShift template's VM: fields KubeVirt does not define
    // (osinfoname, lower-case terminationgraceperiodseconds), memory "1g".
    {"user-guide/user_workloads-templates-8.yaml", "metadata.osinfoname: unknown field \"osinfoname\""},
    // Networks other than the pod network, and bindings regdisk has no
    // backend for.
    {"kubevirt/vmi-multus-multiple-net.yaml", "network \"ptp\" is not a pod network"},
    {"kubevirt/vmi-multus-ptp.yaml", "network \"ptp\" is not a pod network"},
    {"kubevirt/vmi-sriov.yaml", "not sriov; use masquerade"},
    {"user-guide/network-net_binding_plugins-macvtap-4.yaml", "not the network binding plugin macvtap"},
    {"user-guide/network-net_binding_plugins-passt-3.yaml", "not the network binding plugin passt"},
    {"user-guide/network-net_binding_plugins-slirp-1.yaml", "not the network binding plugin slirp"},
    {"user-guide/network-network_binding_plugins-1.yaml", "not the network binding plugin"},
};

std::vector<fs::path> VendoredExamples() {
  std::vector<fs::path> out;
  for (const char* dir : {"kubevirt", "user-guide"}) {
    for (const auto& e : fs::directory_iterator(fs::path(REGDISK_SOURCE_DIR) / "tests/kubevirt-examples" / dir)) {
      if (e.path().extension() == ".yaml") out.push_back(e.path());
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

TEST(KubeVirtExamplesTest, EachValidatesOrIsRefusedWithItsReason) {
  auto examples = VendoredExamples();
  ASSERT_GE(examples.size(), 60u);
  size_t valid = 0;
  for (const auto& path : examples) {
    std::string name = path.parent_path().filename().string() + "/" + path.filename().string();
    ParseResult r = ParseSpecs(ReadFileCapped(path, 1 << 20).value(), name);
    std::vector<std::string> errors;
    for (const auto& d : r.diagnostics) {
      if (d.severity == Diagnostic::Severity::kError) errors.push_back(d.ToString());
    }
    if (auto it = kRefused.find(name); it != kRefused.end()) {
      EXPECT_FALSE(r.ok()) << name;
      EXPECT_THAT(errors, ::testing::Contains(HasSubstr(it->second))) << name;
      continue;
    }
    EXPECT_TRUE(r.ok()) << name << ":\n" << ::testing::PrintToString(errors);
    if (r.ok()) ++valid;
    // What validate -o json|yaml prints parses again to the same objects.
    for (const auto& o : r.objects) {
      ParseResult again = ParseSpecs(ToYaml(ToJson(o)), name + " (as YAML)");
      EXPECT_TRUE(again.ok()) << name << ":\n" << ToYaml(ToJson(o));
      if (again.ok() && !again.objects.empty()) {
        EXPECT_EQ(ToJson(again.objects[0]), ToJson(o)) << name;
      }
    }
  }
  EXPECT_EQ(valid + kRefused.size(), examples.size());
}

}  // namespace
}  // namespace regdisk::spec
