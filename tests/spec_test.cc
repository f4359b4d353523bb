#include "spec/spec.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "harness/harness.h"
#include "registry/http.h"
#include "spec/quantity.h"
#include "spec/schema.h"

namespace regdisk::spec {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using json = nlohmann::json;

// The seed's spec, exactly as written in the issue.
const char* kSeed = R"(metadata:
  name: testvm-ephemeral
apiVersion: kubevirt.io/v1alpha1
kind: VirtualMachine
spec:
  domain:
    resources:
      requests:
        memory: 64M
    devices:
      disks:
      - name: registrydisk
        volumeName: registryvolume
        disk:
          dev: vda
  volumes:
    - name: registryvolume
      registryDisk:
        image: vmdisks/fedora25:latest
)";

std::string Replace(std::string s, const std::string& from, const std::string& to) {
  size_t at = s.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  if (at != std::string::npos) s.replace(at, from.size(), to);
  return s;
}

std::vector<std::string> Errors(const ParseResult& r) {
  std::vector<std::string> out;
  for (const auto& d : r.diagnostics) {
    if (d.severity == Diagnostic::Severity::kError) out.push_back(d.ToString());
  }
  return out;
}

TEST(QuantityTest, KubernetesForms) {
  EXPECT_EQ(*ParseQuantity("64M", 1), 64000000);
  EXPECT_EQ(*ParseQuantity("512Mi", 1), 512LL << 20);
  EXPECT_EQ(*ParseQuantity("1G", 1), 1000000000);
  EXPECT_EQ(*ParseQuantity("1Gi", 1), 1LL << 30);
  EXPECT_EQ(*ParseQuantity("1e9", 1), 1000000000);
  EXPECT_EQ(*ParseQuantity("1.5Gi", 1), 3LL << 29);
  EXPECT_EQ(*ParseQuantity("0.5", 1000), 500);
  EXPECT_EQ(*ParseQuantity("250m", 1000), 250);
  EXPECT_EQ(*ParseQuantity("2", 1000), 2000);
  EXPECT_EQ(*ParseQuantity("1.0001", 1), 2);  // rounded up
  EXPECT_EQ(*ParseQuantity("1k", 1), 1000);
  for (const char* bad : {"", "M", "1Q", "1.2.3", "abc", "1e", "1 Gi", "0x10", "1e99999"}) {
    EXPECT_FALSE(ParseQuantity(bad, 1).ok()) << bad;
  }
  EXPECT_THAT(ParseQuantity("-1Gi", 1).status().message(), HasSubstr("negative"));
  EXPECT_THAT(ParseQuantity("99999999Ei", 1).status().message(), HasSubstr("too large"));
}

TEST(SpecTest, SeedSpecIsAcceptedWithDefaults) {
  ParseResult r = ParseSpecs(kSeed, "vm.yaml");
  ASSERT_TRUE(r.ok()) << ::testing::PrintToString(Errors(r));
  EXPECT_TRUE(r.diagnostics.empty());
  ASSERT_EQ(r.objects.size(), 1u);
  const auto& vm = std::get<VirtualMachine>(r.objects[0]);
  EXPECT_EQ(Describe(r.objects[0]), "VirtualMachine default/testvm-ephemeral");
  EXPECT_EQ(vm.spec.memory_bytes, 64000000);
  EXPECT_EQ(vm.spec.cores, 1);
  ASSERT_EQ(vm.spec.disks.size(), 1u);
  EXPECT_EQ(vm.spec.disks[0].dev, "vda");
  EXPECT_EQ(vm.spec.disks[0].bus, "virtio");
  ASSERT_TRUE(vm.spec.volumes[0].registry_disk);
  EXPECT_EQ(vm.spec.volumes[0].registry_disk->image, "vmdisks/fedora25:latest");
  EXPECT_EQ(vm.spec.volumes[0].registry_disk->image_pull_policy, "Always");  // :latest
}

TEST(SpecTest, EveryExampleInTheRepositoryValidates) {
  for (const auto& e : std::filesystem::directory_iterator(REGDISK_SOURCE_DIR "/examples")) {
    std::string text = ReadFileCapped(e.path(), 1 << 20).value();
    ParseResult r = ParseSpecs(text, e.path().filename().string());
    EXPECT_TRUE(r.ok()) << e.path() << ": " << ::testing::PrintToString(Errors(r));
  }
}

TEST(SpecTest, DefaultsForDevsBusesAndPullPolicy) {
  const char* doc = R"(apiVersion: kubevirt.io/v1alpha1
kind: VirtualMachine
metadata: {name: two-disks, namespace: team, labels: {app: web}}
spec:
  domain:
    resources: {requests: {memory: 1Gi, cpu: "0.5"}}
    cpu: {cores: 2}
    devices:
      disks:
      - {name: a, volumeName: va}
      - {name: b, volumeName: vb, disk: {bus: sata}}
      - {name: c, volumeName: vc, disk: {dev: vda}}
      - {name: d, volumeName: vd, bootOrder: 1, disk: {readOnly: true}}
  volumes:
  - {name: va, registryDisk: {image: "reg.example.org/a:v1"}}
  - {name: vb, registryDisk: {image: "reg.example.org/b", imagePullPolicy: Never}}
  - {name: vc, registryDisk: {image: "reg.example.org/c@sha256:0000000000000000000000000000000000000000000000000000000000000000"}}
  - {name: vd, registryDisk: {image: "reg.example.org/d:latest", path: /disk/d.qcow2}}
)";
  ParseResult r = ParseSpecs(doc, "two.yaml");
  ASSERT_TRUE(r.ok()) << ::testing::PrintToString(Errors(r));
  const auto& vm = std::get<VirtualMachine>(r.objects[0]);
  EXPECT_EQ(vm.metadata.namespace_, "team");
  EXPECT_EQ(vm.spec.memory_bytes, 1LL << 30);
  EXPECT_EQ(vm.spec.cpu_millis, 500);
  EXPECT_EQ(vm.spec.cores, 2);
  EXPECT_EQ(vm.spec.disks[0].dev, "vdb");  // vda is taken by disk c
  EXPECT_EQ(vm.spec.disks[1].dev, "sda");
  EXPECT_EQ(vm.spec.disks[1].bus, "sata");
  EXPECT_EQ(vm.spec.disks[2].dev, "vda");
  EXPECT_EQ(vm.spec.disks[3].dev, "vdc");
  EXPECT_TRUE(vm.spec.disks[3].read_only);
  EXPECT_EQ(vm.spec.disks[3].boot_order, 1);
  EXPECT_EQ(vm.spec.volumes[0].registry_disk->image_pull_policy, "IfNotPresent");
  EXPECT_EQ(vm.spec.volumes[1].registry_disk->image_pull_policy, "Never");
  EXPECT_EQ(vm.spec.volumes[2].registry_disk->image_pull_policy, "IfNotPresent");  // digest
  EXPECT_EQ(vm.spec.volumes[3].registry_disk->image_pull_policy, "Always");
  EXPECT_EQ(vm.spec.volumes[3].registry_disk->path, "/disk/d.qcow2");
}

TEST(SpecTest, ReplicaSetAndPullSecretAndJsonInput) {
  std::string secret_json = R"({"auths":{"reg.example.org":{"auth":"dXNlcjpwYXNz"}}})";
  std::string doc = R"(apiVersion: v1
kind: Secret
metadata: {name: pull}
type: kubernetes.io/dockerconfigjson
data:
  .dockerconfigjson: )" + registry::Base64Encode(secret_json) + R"(
---
apiVersion: kubevirt.io/v1alpha1
kind: VirtualMachineReplicaSet
metadata: {name: fleet}
spec:
  replicas: 3
  selector: {matchLabels: {app: fleet}}
  template:
    metadata: {labels: {app: fleet}}
    spec:
      domain:
        resources: {requests: {memory: 128Mi}}
        devices: {disks: [{name: root, volumeName: root}]}
      volumes:
      - name: root
        registryDisk: {image: "reg.example.org/vm/fleet:v2", imagePullSecret: pull}
---
{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": "v1-vm"},
 "spec": {"template": {"spec": {"domain": {"resources": {"requests": {"memory": "64Mi"}},
   "devices": {"disks": [{"name": "v"}]}},
   "volumes": [{"name": "v", "containerDisk": {"image": "quay.io/x/y:1"}}]}}}}
)";
  ParseResult r = ParseSpecs(doc, "fleet.yaml");
  ASSERT_TRUE(r.ok()) << ::testing::PrintToString(Errors(r));
  ASSERT_EQ(r.objects.size(), 3u);
  const auto& s = std::get<Secret>(r.objects[0]);
  EXPECT_EQ(s.docker_config_json, secret_json);
  const auto& rs = std::get<VirtualMachineReplicaSet>(r.objects[1]);
  EXPECT_EQ(rs.replicas, 3);
  EXPECT_EQ(rs.template_spec.volumes[0].registry_disk->image_pull_secret, "pull");
  const auto& v1 = std::get<VirtualMachine>(r.objects[2]);
  EXPECT_EQ(v1.spec.volumes[0].registry_disk->field, "containerDisk");
  EXPECT_EQ(v1.spec.memory_bytes, 64LL << 20);
  // The secret's credentials never appear in the JSON output.
  EXPECT_EQ(ToJson(r.objects[0]).dump().find("dXNlcjpwYXNz"), std::string::npos);
}

TEST(SpecTest, RoundTripThroughJsonIsStable) {
  for (std::string doc : {std::string(kSeed), std::string(R"(apiVersion: kubevirt.io/v1alpha1
kind: VirtualMachineReplicaSet
metadata: {name: fleet}
spec:
  replicas: 2
  paused: true
  selector: {matchLabels: {app: a}}
  template:
    metadata: {labels: {app: a}}
    spec:
      domain:
        resources: {requests: {memory: 1Gi, cpu: 250m}}
        devices: {disks: [{name: root, volumeName: root, bootOrder: 2, disk: {bus: scsi}}]}
      volumes: [{name: root, registryDisk: {image: "r.example.org/a:v1", path: /disk/a.img}}]
)")}) {
    ParseResult first = ParseSpecs(doc, "a.yaml");
    ASSERT_TRUE(first.ok()) << ::testing::PrintToString(Errors(first));
    json j1 = ToJson(first.objects[0]);
    ParseResult second = ParseSpecs(j1.dump(), "a.json");
    ASSERT_TRUE(second.ok()) << ::testing::PrintToString(Errors(second));
    EXPECT_EQ(ToJson(second.objects[0]), j1);
  }
}

struct BadCase {
  std::string name;
  std::string doc;
  std::string expected;  // an exact diagnostic line
};

TEST(SpecTest, EachRuleHasItsMessage) {
  const std::string s = kSeed;
  const BadCase cases[] = {
      {"missing name", Replace(s, "  name: testvm-ephemeral\n", "  labels: {}\n"), "vm.yaml:2:3: metadata.name: is required"},
      {"namespace escapes the root", Replace(s, "  name: testvm-ephemeral\n", "  name: testvm-ephemeral\n  namespace: ../../x\n"),
       "vm.yaml:3:14: metadata.namespace: \"../../x\" is not a valid namespace; use lowercase letters, digits and '-', at most 63 characters"},
      {"missing kind", Replace(s, "kind: VirtualMachine\n", ""), "vm.yaml:1:1: kind: is required"},
      {"missing apiVersion", Replace(s, "apiVersion: kubevirt.io/v1alpha1\n", ""), "vm.yaml:1:1: apiVersion: is required"},
      {"unknown kind", Replace(s, "kind: VirtualMachine", "kind: Pod"),
       "vm.yaml:4:7: kind: kind \"Pod\" is not supported; use VirtualMachineInstance, VirtualMachine or "
       "VirtualMachineInstanceReplicaSet (kubevirt.io/v1), VirtualMachine or VirtualMachineReplicaSet "
       "(kubevirt.io/v1alpha1), or Secret (v1)"},
      {"bad apiVersion", Replace(s, "kubevirt.io/v1alpha1", "kubevirt.io/v2"),
       "vm.yaml:3:13: apiVersion: apiVersion \"kubevirt.io/v2\" is not supported; use kubevirt.io/v1 (or "
       "kubevirt.io/v1alpha1 for the seed's shape)"},
      {"misspelt field", Replace(s, "      disks:", "      disk:"),
       "vm.yaml:11:7: spec.domain.devices.disk: unknown field \"disk\"; did you mean \"disks\"?"},
      {"unknown field", Replace(s, "  domain:", "  flavour: big\n  domain:"),
       "vm.yaml:6:3: spec.flavour: unknown field \"flavour\""},
      {"missing volume", Replace(s, "volumeName: registryvolume", "volumeName: x"),
       "vm.yaml:12:9: spec.domain.devices.disks[0].volumeName: volume \"x\" not found"},
      {"two disks one volume",
       Replace(s, "      - name: registrydisk\n", "      - name: other\n        volumeName: registryvolume\n      - name: registrydisk\n"),
       "vm.yaml:14:9: spec.domain.devices.disks[1].volumeName: volume \"registryvolume\" is already used by disks[0]; each volume backs one disk"},
      {"duplicate disk",
       Replace(s, "      - name: registrydisk\n", "      - name: registrydisk\n        volumeName: other\n      - name: registrydisk\n") +
           "    - name: other\n      registryDisk: {image: a/b:v1}\n",
       "vm.yaml:14:9: spec.domain.devices.disks[1].name: disk name \"registrydisk\" is used twice"},
      {"duplicate volume", s + "    - name: registryvolume\n      registryDisk: {image: a/b:v1}\n",
       "vm.yaml:20:7: spec.volumes[1].name: volume name \"registryvolume\" is used twice"},
      {"zero sources", Replace(s, "      registryDisk:\n        image: vmdisks/fedora25:latest\n", ""),
       "vm.yaml:17:7: spec.volumes[0]: volume \"registryvolume\" has no source; give registryDisk: {image: ...}"},
      {"two sources", Replace(s, "      registryDisk:", "      emptyDisk: {capacity: 1Gi}\n      registryDisk:"),
       "vm.yaml:17:7: spec.volumes[0]: volume \"registryvolume\" has 2 sources (emptyDisk, registryDisk); a volume has exactly one"},
      {"bad image", Replace(s, "vmdisks/fedora25:latest", "vmdisks/Fedora25"),
       "vm.yaml:19:16: spec.volumes[0].registryDisk.image: image reference \"vmdisks/Fedora25\" has an invalid repository component \"Fedora25\"; repository names must be lowercase"},
      {"dev does not fit bus", Replace(s, "dev: vda", "dev: sda"),
       "vm.yaml:12:9: spec.domain.devices.disks[0].disk.dev: dev \"sda\" does not fit bus virtio; use vda, vdb, ..."},
      {"dev repeats",
       Replace(s, "      - name: registrydisk\n", "      - name: other\n        volumeName: v2\n        disk: {dev: vda}\n      - name: registrydisk\n") +
           "    - name: v2\n      registryDisk: {image: a/b:v1}\n",
       "vm.yaml:15:9: spec.domain.devices.disks[1].disk.dev: dev \"vda\" is already used by disks[0]"},
      {"memory missing", Replace(s, "        memory: 64M\n", "        cpu: 1\n"),
       "vm.yaml:9:9: spec.domain.resources.requests.memory: is required; give the VM's memory, e.g. 64M or 1Gi (or "
       "domain.memory.guest)"},
      {"memory zero", Replace(s, "memory: 64M", "memory: 0"),
       "vm.yaml:9:17: spec.domain.resources.requests.memory: must be more than zero"},
      {"memory malformed", Replace(s, "memory: 64M", "memory: 64MB"),
       "vm.yaml:9:17: spec.domain.resources.requests.memory: \"64MB\" is not a quantity; write a number with an optional suffix such as 64M, 512Mi, 1Gi or 1e9"},
      {"relative path", Replace(s, "image: vmdisks/fedora25:latest", "image: vmdisks/fedora25:latest\n        path: disk/x.img"),
       "vm.yaml:20:15: spec.volumes[0].registryDisk.path: \"disk/x.img\" is relative; give the absolute path inside the image, e.g. /disk/disk.qcow2"},
      {"dotdot path", Replace(s, "image: vmdisks/fedora25:latest", "image: vmdisks/fedora25:latest\n        path: /disk/../etc/passwd"),
       "vm.yaml:20:15: spec.volumes[0].registryDisk.path: \"/disk/../etc/passwd\" contains \"..\"; give a plain absolute path inside the image"},
      {"bad pull policy", Replace(s, "image: vmdisks/fedora25:latest", "image: vmdisks/fedora25:latest\n        imagePullPolicy: Sometimes"),
       "vm.yaml:20:26: spec.volumes[0].registryDisk.imagePullPolicy: \"Sometimes\" is not one of Always, IfNotPresent, Never"},
      {"bad bus", Replace(s, "dev: vda", "dev: vda\n          bus: ide"),
       "vm.yaml:16:16: spec.domain.devices.disks[0].disk.bus: bus \"ide\" is not supported; use virtio, sata or scsi"},
      {"persistent volume", Replace(s, "      registryDisk:\n        image: vmdisks/fedora25:latest\n", "      persistentVolumeClaim: {claimName: data}\n"),
       "vm.yaml:18:7: spec.volumes[0].persistentVolumeClaim: regdisk runs stateless VMs on ephemeral registry disks and does not provide persistent volumes (persistentVolumeClaim); keep state outside the VM, or run this VM with KubeVirt and a PersistentVolumeClaim"},
      {"live migration", Replace(s, "  domain:", "  evictionStrategy: LiveMigrate\n  domain:"),
       "vm.yaml:6:3: spec.evictionStrategy: live migration is not possible for VMs on registry disks, which are ephemeral and node-local; remove evictionStrategy and let the replica set start a fresh VM elsewhere"},
      {"not yaml", "a: [1, 2\nb: c\n", "vm.yaml:2:2: not valid YAML or JSON: end of sequence flow not found"},
      {"not a mapping", "- 1\n- 2\n", "vm.yaml:1:1: the document is not a mapping; expected an object with apiVersion, kind, metadata and spec"},
  };
  for (const auto& c : cases) {
    ParseResult r = ParseSpecs(c.doc, "vm.yaml");
    EXPECT_FALSE(r.ok()) << c.name;
    EXPECT_THAT(Errors(r), ::testing::Contains(c.expected)) << c.name << "\n" << c.doc;
  }
}

TEST(SpecTest, PositionsCountFromTheStartOfTheFileAcrossDocuments) {
  std::string doc = "# leading comment\n---\n" + std::string(kSeed) + "---\n" + Replace(kSeed, "memory: 64M", "memory: none");
  ParseResult r = ParseSpecs(doc, "multi.yaml");
  // kSeed has 19 lines; the second copy starts after line 22.
  EXPECT_THAT(Errors(r), ElementsAre(HasSubstr("multi.yaml:31:17: spec.domain.resources.requests.memory")));
}

TEST(SpecTest, ReplicaSetRules) {
  const std::string rs = R"(apiVersion: kubevirt.io/v1alpha1
kind: VirtualMachineReplicaSet
metadata: {name: fleet}
spec:
  replicas: -1
  selector: {matchLabels: {app: other}}
  template:
    metadata: {labels: {app: fleet}}
    spec:
      domain:
        resources: {requests: {memory: 64Mi}}
        devices: {disks: [{name: root, volumeName: root}]}
      volumes: [{name: root, registryDisk: {image: "r.example.org/a:v1", imagePullSecret: creds}}]
---
apiVersion: v1
kind: Secret
metadata: {name: creds}
type: Opaque
)";
  ParseResult r = ParseSpecs(rs, "rs.yaml");
  EXPECT_THAT(Errors(r), ::testing::UnorderedElementsAre(
                             "rs.yaml:5:13: spec.replicas: must not be negative",
                             "rs.yaml:6:13: spec.selector.matchLabels: selector app=other does not match the template's labels; the replica set could never see its VMs",
                             "rs.yaml:13:91: spec.template.spec.volumes[0].registryDisk.imagePullSecret: Secret \"creds\" has type Opaque; an image pull secret must be kubernetes.io/dockerconfigjson"));
  r = ParseSpecs(rs.substr(0, rs.find("---")), "rs.yaml");
  EXPECT_THAT(Errors(r), ::testing::Contains(HasSubstr("Secret \"creds\" is not in this file")));
  r = ParseSpecs("apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstanceMigration\nmetadata: {name: m}\nspec: {vmiName: x}\n", "m.yaml");
  EXPECT_THAT(Errors(r), ElementsAre("m.yaml:2:7: kind: live migration is not possible for VMs on registry disks, which are ephemeral and node-local; stop the VM and start it on the other node instead"));
}

TEST(SpecTest, KubeVirtFieldsRegdiskIgnoresAreWarnings) {
  std::string doc = Replace(kSeed, "  domain:\n", "  terminationGracePeriodSeconds: 0\n  domain:\n    firmware: {uuid: x}\n");
  ParseResult r = ParseSpecs(doc, "vm.yaml");
  EXPECT_TRUE(r.ok()) << ::testing::PrintToString(Errors(r));
  std::vector<std::string> warnings;
  for (const auto& d : r.diagnostics) warnings.push_back(d.ToString());
  EXPECT_THAT(warnings, ElementsAre(
                            "vm.yaml:6:3: warning: spec.terminationGracePeriodSeconds: is defined by KubeVirt but not implemented by regdisk; it is ignored",
                            "vm.yaml:8:5: warning: spec.domain.firmware: is defined by KubeVirt but not implemented by regdisk; it is ignored"));
}

TEST(SpecTest, HostileInputIsBounded) {
  EXPECT_FALSE(ParseSpecs(std::string(2 << 20, 'a'), "big.yaml").ok());
  EXPECT_FALSE(ParseSpecs(std::string(10000, '[') + std::string(10000, ']'), "deep.yaml").ok());
  std::string nested;
  for (int i = 0; i < 2000; ++i) nested += std::string(static_cast<size_t>(i), ' ') + "a:\n";
  EXPECT_FALSE(ParseSpecs(nested, "indent.yaml").ok());
  // Billion laughs: aliases are shared, never expanded.
  std::string laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n";
  for (char c = 'b'; c <= 'k'; ++c) {
    laughs += std::string(1, c) + ": &" + c + " [*" + static_cast<char>(c - 1) + ", *" + static_cast<char>(c - 1) +
              ", *" + static_cast<char>(c - 1) + ", *" + static_cast<char>(c - 1) + "]\n";
  }
  laughs += "apiVersion: kubevirt.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: x, labels: *k}\nspec: *k\n";
  auto start = std::chrono::steady_clock::now();
  ParseResult r = ParseSpecs(laughs, "laughs.yaml");
  EXPECT_FALSE(r.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  EXPECT_TRUE(ParseSpecs("", "empty.yaml").diagnostics.size() == 1);
  // Inputs that made yaml-cpp 0.7's LoadAll loop forever, eating memory.
  for (const char* loop : {"[1], 2\n", "{\"a\":1},\"c\":1}", ",\n", "a: 1\n---\n[x], y\n"}) {
    ParseResult bad = ParseSpecs(loop, "loop.yaml");
    EXPECT_FALSE(bad.ok()) << loop;
  }
  EXPECT_THAT(Errors(ParseSpecs("[1], 2\n", "loop.yaml")),
              ElementsAre("loop.yaml:1:1: not valid YAML or JSON: unexpected content after the document"));
  // Not UTF-8.
  EXPECT_THAT(Errors(ParseSpecs(std::string(kSeed) + "# \xff\xfe\n", "bin.yaml")),
              ElementsAre("bin.yaml: the file is not valid UTF-8 text; save it as UTF-8"));
}

TEST(SpecTest, ControlCharactersAndOtherEncodingsAreRefused) {
  // A NUL among the first bytes makes yaml-cpp read the file as UTF-16 or
  // UTF-32; these valid UTF-8 files then gave strings with unpaired
  // surrogates, and ToJson(...).dump() threw (found by the fuzzer).
  for (std::string name : {"regress-utf16be-surrogate.yaml:1:1", "regress-utf16le-surrogate.yaml:1:2",
                            "regress-utf32be-surrogate.yaml:1:1"}) {
    std::string at = name;
    name.resize(name.find(':'));
    std::string text = ReadFileCapped(REGDISK_SOURCE_DIR "/fuzz/corpus/spec/" + name, 1 << 20).value();
    ParseResult r = ParseSpecs(text, name);
    EXPECT_THAT(Errors(r), ElementsAre(HasSubstr(at + ": the file holds control character U+0000")));
    for (const auto& o : r.objects) EXPECT_NO_THROW((void)ToJson(o).dump()) << name;
  }
  EXPECT_THAT(Errors(ParseSpecs(Replace(kSeed, "kind: VirtualMachine", "kind: Virtual\x01Machine"), "c0.yaml")),
              ElementsAre("c0.yaml:4:14: the file holds control character U+0001, which YAML does not allow; save it "
                          "as UTF-8 text without control characters"));
  // Columns count characters, not bytes.
  EXPECT_THAT(Errors(ParseSpecs("# \u00e9\u00e9\x1b", "esc.yaml")), ElementsAre(HasSubstr("esc.yaml:1:5: ")));
  // Tab, line feed and carriage return are text.
  EXPECT_TRUE(ParseSpecs(Replace(kSeed, "\n", "\t\r\n"), "crlf.yaml").ok());
}

TEST(ValidateCommandTest, OutputAndExitCodes) {
  auto dir = TempDir::Create("regdisk-spec");
  ASSERT_TRUE(dir.ok());
  std::string good = (dir->path() / "vm.yaml").string();
  ASSERT_TRUE(WriteFileAtomic(good, kSeed).ok());
  auto r = testing::RunRegdisk({"validate", "-f", good});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, good + ": VirtualMachine default/testvm-ephemeral: valid\n");
  r = testing::RunRegdisk({"validate", "-f", good, "-o", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json j = json::parse(r.out);
  EXPECT_EQ(j["spec"]["domain"]["devices"]["disks"][0]["disk"]["bus"], "virtio");
  EXPECT_EQ(j["spec"]["domain"]["resources"]["requests"]["memory"], "64M");  // as written, as kubectl keeps it
  r = testing::RunRegdisk({"validate", "-f", good, "-o", "yaml"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("\n        memory: 64M\n"));
  EXPECT_THAT(r.out, HasSubstr("kind: VirtualMachine\n"));
  EXPECT_TRUE(ParseSpecs(r.out, "out.yaml").ok()) << r.out;
  r = testing::RunRegdisk({"validate", "-f", good, "-o", "xml"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("-o takes text, json or yaml"));
  std::string bad = (dir->path() / "bad.yaml").string();
  ASSERT_TRUE(WriteFileAtomic(bad, Replace(Replace(kSeed, "memory: 64M", "memory: lots"), "volumeName: registryvolume", "volumeName: x")).ok());
  r = testing::RunRegdisk({"validate", "-f", bad});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("spec.domain.resources.requests.memory: \"lots\" is not a quantity"));
  EXPECT_THAT(r.err, HasSubstr("volume \"x\" not found"));
  r = testing::RunRegdisk({"validate", "-f", "-"}, kSeed);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  r = testing::RunRegdisk({"validate", "-f", (dir->path() / "missing.yaml").string()});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("missing.yaml"));
}


// --- kubevirt.io/v1, read as KubeVirt reads it -----------------------------

std::vector<std::string> Warnings(const ParseResult& r) {
  std::vector<std::string> out;
  for (const auto& d : r.diagnostics) {
    if (d.severity == Diagnostic::Severity::kWarning) out.push_back(d.ToString());
  }
  return out;
}

const char* kV1Vmi = R"(apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata:
  name: vmi-nocloud
spec:
  domain:
    memory:
      guest: 128Mi
    devices:
      disks:
      - name: containerdisk
        disk:
          bus: virtio
      - name: cloudinitdisk
        disk:
          bus: virtio
  volumes:
  - name: containerdisk
    containerDisk:
      image: quay.io/kubevirt/cirros-container-disk-demo:v1.0
  - name: cloudinitdisk
    cloudInitNoCloud:
      userData: |
        #cloud-config
        password: fedora
  - name: scratch
    emptyDisk:
      capacity: 2Gi
)";

TEST(SpecV1Test, VirtualMachineInstanceDisksUseTheVolumeOfTheSameName) {
  ParseResult r = ParseSpecs(kV1Vmi, "vmi.yaml");
  ASSERT_TRUE(r.ok()) << ::testing::PrintToString(Errors(r));
  EXPECT_THAT(Warnings(r), ::testing::IsEmpty());
  const auto& vm = std::get<VirtualMachine>(r.objects[0]);
  EXPECT_EQ(Describe(r.objects[0]), "VirtualMachineInstance default/vmi-nocloud");
  EXPECT_EQ(vm.spec.memory_bytes, 128LL << 20);
  ASSERT_EQ(vm.spec.disks.size(), 3u);
  EXPECT_EQ(vm.spec.disks[0].volume_name, "containerdisk");
  EXPECT_EQ(vm.spec.disks[1].volume_name, "cloudinitdisk");
  // A volume without a disk gets one of its name, on KubeVirt's amd64 bus.
  EXPECT_EQ(vm.spec.disks[2].name, "scratch");
  EXPECT_EQ(vm.spec.disks[2].bus, "sata");
  EXPECT_EQ(vm.spec.disks[2].dev, "sda");
  ASSERT_TRUE(vm.spec.volumes[0].registry_disk);
  EXPECT_EQ(vm.spec.volumes[0].registry_disk->field, "containerDisk");
  EXPECT_EQ(vm.spec.volumes[0].registry_disk->image_pull_policy, "IfNotPresent");
  ASSERT_TRUE(vm.spec.volumes[1].cloud_init_no_cloud);
  EXPECT_EQ(vm.spec.volumes[1].cloud_init_no_cloud->user_data, "#cloud-config\npassword: fedora\n");
  ASSERT_TRUE(vm.spec.volumes[2].empty_disk);
  EXPECT_EQ(vm.spec.volumes[2].empty_disk->capacity_bytes, 2LL << 30);
  // Output in v1's own names: no volumeName, no dev; quantities as written.
  json j = ToJson(r.objects[0]);
  EXPECT_EQ(j["spec"]["domain"]["memory"]["guest"], "128Mi");
  EXPECT_FALSE(j["spec"]["domain"]["devices"]["disks"][0].contains("volumeName"));
  EXPECT_FALSE(j["spec"]["domain"]["devices"]["disks"][0]["disk"].contains("dev"));
  EXPECT_EQ(j["spec"]["volumes"][2]["emptyDisk"]["capacity"], "2Gi");
  EXPECT_EQ(j["spec"]["volumes"][1]["cloudInitNoCloud"]["userData"], "#cloud-config\npassword: fedora\n");
}

TEST(SpecV1Test, VirtualMachineRunStrategyAndReplicaSet) {
  std::string vm = R"(apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata: {name: vm-cirros, labels: {kubevirt.io/vm: vm-cirros}}
spec:
  runStrategy: RerunOnFailure
  template:
    metadata: {labels: {kubevirt.io/vm: vm-cirros}}
    spec:
      domain:
        resources: {requests: {memory: 64M, cpu: 2}}
        devices: {disks: [{name: root, cdrom: {}}]}
      volumes: [{name: root, containerDisk: {image: "r.example.org/a:v1"}}]
---
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstanceReplicaSet
metadata: {name: fleet}
spec:
  replicas: 2
  paused: true
  selector: {matchLabels: {app: fleet}}
  template:
    metadata: {labels: {app: fleet}}
    spec:
      domain: {memory: {guest: 1Gi}, devices: {}}
      volumes: [{name: root, containerDisk: {image: "r.example.org/a:v1"}}]
)";
  ParseResult r = ParseSpecs(vm, "vm.yaml");
  ASSERT_TRUE(r.ok()) << ::testing::PrintToString(Errors(r));
  ASSERT_EQ(r.objects.size(), 2u);
  const auto& v = std::get<VirtualMachine>(r.objects[0]);
  EXPECT_TRUE(v.IsV1VirtualMachine());
  EXPECT_EQ(v.run_strategy, "RerunOnFailure");
  EXPECT_EQ(v.template_metadata.labels.at("kubevirt.io/vm"), "vm-cirros");
  EXPECT_EQ(v.spec.cpu_millis, 2000);
  // A cdrom is read-only on SATA unless the spec says otherwise.
  EXPECT_EQ(v.spec.disks[0].device, "cdrom");
  EXPECT_EQ(v.spec.disks[0].bus, "sata");
  EXPECT_TRUE(v.spec.disks[0].read_only);
  json j = ToJson(r.objects[0]);
  EXPECT_EQ(j["spec"]["runStrategy"], "RerunOnFailure");
  EXPECT_EQ(j["spec"]["template"]["spec"]["domain"]["resources"]["requests"]["memory"], "64M");
  EXPECT_EQ(j["spec"]["template"]["spec"]["domain"]["resources"]["requests"]["cpu"], 2);  // a number stays a number
  EXPECT_EQ(j["spec"]["template"]["spec"]["domain"]["devices"]["disks"][0]["cdrom"]["readonly"], true);
  const auto& rs = std::get<VirtualMachineReplicaSet>(r.objects[1]);
  EXPECT_EQ(Describe(r.objects[1]), "VirtualMachineInstanceReplicaSet default/fleet");
  EXPECT_EQ(rs.replicas, 2);
  EXPECT_TRUE(rs.paused);
  EXPECT_EQ(rs.template_spec.memory_bytes, 1LL << 30);
  EXPECT_EQ(rs.template_spec.disks.size(), 1u);
  // Neither running nor runStrategy: KubeVirt's default, Halted.
  ParseResult halted = ParseSpecs(Replace(vm.substr(0, vm.find("---")), "  runStrategy: RerunOnFailure\n", ""), "h.yaml");
  ASSERT_TRUE(halted.ok()) << ::testing::PrintToString(Errors(halted));
  EXPECT_EQ(std::get<VirtualMachine>(halted.objects[0]).run_strategy, "Halted");
  // YAML output reads back to the same objects.
  for (const auto& o : r.objects) {
    ParseResult again = ParseSpecs(ToYaml(ToJson(o)), "again.yaml");
    ASSERT_TRUE(again.ok()) << ToYaml(ToJson(o)) << ::testing::PrintToString(Errors(again));
    EXPECT_EQ(ToJson(again.objects[0]), ToJson(o));
  }
}

TEST(SpecV1Test, EachRuleHasItsMessage) {
  const std::string vmi = kV1Vmi;
  const std::string vm = R"(apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata: {name: vm}
spec:
  running: true
  template:
    spec:
      domain: {memory: {guest: 64M}, devices: {}}
      volumes: [{name: root, containerDisk: {image: "r.example.org/a:v1"}}]
)";
  const BadCase cases[] = {
      {"volumeName in v1", Replace(vmi, "      - name: containerdisk\n", "      - name: containerdisk\n        volumeName: containerdisk\n"),
       "vmi.yaml:12:9: spec.domain.devices.disks[0].volumeName: unknown field \"volumeName\"; kubevirt.io/v1 has no "
       "volumeName: a disk uses the volume of the same name; name the disk after its volume and remove volumeName (or "
       "use apiVersion kubevirt.io/v1alpha1)"},
      {"disk without its volume", Replace(vmi, "      - name: cloudinitdisk\n        disk:", "      - name: other\n        disk:"),
       "vmi.yaml:14:9: spec.domain.devices.disks[1].name: disk \"other\" has no volume of the same name; add a volume named \"other\""},
      {"registryDisk in v1", Replace(vmi, "    containerDisk:", "    registryDisk:"),
       "vmi.yaml:19:5: spec.volumes[0].registryDisk: unknown field \"registryDisk\"; registryDisk is the "
       "kubevirt.io/v1alpha1 name; kubevirt.io/v1 calls it containerDisk"},
      {"readOnly in v1", Replace(vmi, "          bus: virtio\n      - name: cloudinitdisk", "          bus: virtio\n          readOnly: true\n      - name: cloudinitdisk"),
       "vmi.yaml:14:11: spec.domain.devices.disks[0].disk.readOnly: unknown field \"readOnly\"; did you mean \"readonly\"?"},
      {"read-only sata disk", Replace(vmi, "          bus: virtio\n      - name: cloudinitdisk", "          bus: sata\n          readonly: true\n      - name: cloudinitdisk"),
       "vmi.yaml:11:9: spec.domain.devices.disks[0].disk.bus: sata hard disks cannot be read-only (QEMU's ide-hd "
       "refuses it, and so does KubeVirt); use cdrom: {bus: sata} for a read-only SATA device, or bus virtio or scsi"},
      {"virtio cdrom", Replace(vmi, "        disk:\n          bus: virtio\n      - name: cloudinitdisk", "        cdrom:\n          bus: virtio\n      - name: cloudinitdisk"),
       "vmi.yaml:13:16: spec.domain.devices.disks[0].cdrom.bus: bus virtio is invalid for a cdrom (as in KubeVirt); use sata or scsi"},
      {"lun", Replace(vmi, "        disk:\n          bus: virtio\n      - name: cloudinitdisk", "        lun: {}\n      - name: cloudinitdisk"),
       "vmi.yaml:12:14: spec.domain.devices.disks[0].lun: regdisk attaches registry disks as disk or cdrom, not lun; use disk: {} or cdrom: {}"},
      {"running and runStrategy", Replace(vm, "  running: true\n", "  running: true\n  runStrategy: Always\n"),
       "vm.yaml:6:16: spec.runStrategy: running and runStrategy are mutually exclusive (as in KubeVirt); keep runStrategy and remove running"},
      {"bad runStrategy", Replace(vm, "  running: true\n", "  runStrategy: Sometimes\n"),
       "vm.yaml:5:16: spec.runStrategy: \"Sometimes\" is not a run strategy; use Always, Halted, Manual, RerunOnFailure or Once"},
      {"running as a string", Replace(vm, "running: true", "running: \"true\""),
       "vm.yaml:5:12: spec.running: must be true or false, not \"true\""},
      {"v1 VirtualMachine without template", Replace(vm, "  running: true\n", "  running: true\n  domain: {}\n"),
       "vm.yaml:6:3: spec.domain: unknown field \"domain\"; a kubevirt.io/v1 VirtualMachine holds its instance under "
       "spec.template.spec; move it there, or use kind VirtualMachineInstance"},
      {"v1 replica set kind", Replace(vm, "kind: VirtualMachine", "kind: VirtualMachineReplicaSet"),
       "vm.yaml:2:7: kind: kind \"VirtualMachineReplicaSet\" is not supported with apiVersion kubevirt.io/v1; "
       "kubevirt.io/v1 calls it VirtualMachineInstanceReplicaSet"},
      {"cores as words", Replace(vmi, "    memory:\n", "    cpu: {cores: two}\n    memory:\n"),
       "vmi.yaml:7:18: spec.domain.cpu.cores: must be an integer, not \"two\""},
      {"name as a number", Replace(vmi, "  name: vmi-nocloud", "  name: 42"),
       "vmi.yaml:4:9: metadata.name: must be a string, not \"42\"; write it in quotes to make it a string"},
      {"memory as a list", Replace(vmi, "guest: 128Mi", "guest: [128Mi]"),
       "vmi.yaml:8:14: spec.domain.memory.guest: must be a quantity such as 64M, 1Gi or 2, not a list"},
      {"bootOrder too big", Replace(vmi, "      - name: containerdisk\n", "      - name: containerdisk\n        bootOrder: 9999999999\n"),
       "vmi.yaml:12:20: spec.domain.devices.disks[0].bootOrder: \"9999999999\" is out of range for a 32-bit integer"},
      {"misspelt cloud-init field", Replace(vmi, "userData: |", "userdata: |"),
       "vmi.yaml:23:7: spec.volumes[1].cloudInitNoCloud.userdata: unknown field \"userdata\"; did you mean \"userData\"?"},
      {"empty cloud-init", Replace(vmi, "    cloudInitNoCloud:\n      userData: |\n        #cloud-config\n        password: fedora\n", "    cloudInitNoCloud: {}\n"),
       "vmi.yaml:22:23: spec.volumes[1].cloudInitNoCloud: is empty; give userData (or userDataBase64, or networkData)"},
      {"emptyDisk without capacity", Replace(vmi, "      capacity: 2Gi\n", "      {}\n"),
       "vmi.yaml:28:7: spec.volumes[2].emptyDisk.capacity: is required"},
      {"unknown field inside an ignored one", Replace(vmi, "  domain:\n", "  domain:\n    firmware: {uuidd: x}\n"),
       "vmi.yaml:7:16: spec.domain.firmware.uuidd: unknown field \"uuidd\"; did you mean \"uuid\"?"},
  };
  for (const auto& c : cases) {
    std::string file = c.expected.substr(0, c.expected.find(':'));
    ParseResult r = ParseSpecs(c.doc, file);
    EXPECT_FALSE(r.ok()) << c.name;
    EXPECT_THAT(Errors(r), ::testing::Contains(c.expected)) << c.name << "\n" << c.doc;
  }
}

// The field set comes from KubeVirt's schema: fields no table in regdisk
// names are known (a warning), and the schema's version is on record.
TEST(SpecV1Test, FieldsComeFromKubeVirtsSchema) {
  std::string doc = Replace(Replace(kV1Vmi, "  domain:\n", "  architecture: amd64\n  domain:\n"),
                            "      - name: containerdisk\n", "      - name: containerdisk\n        changedBlockTracking: true\n");
  ParseResult r = ParseSpecs(doc, "vmi.yaml");
  ASSERT_TRUE(r.ok()) << ::testing::PrintToString(Errors(r));
  EXPECT_THAT(Warnings(r),
              ElementsAre("vmi.yaml:6:3: warning: spec.architecture: is defined by KubeVirt but not implemented by regdisk; it is ignored",
                          "vmi.yaml:13:9: warning: spec.domain.devices.disks[0].changedBlockTracking: is defined by "
                          "KubeVirt but not implemented by regdisk; it is ignored"));
  const KubeVirtSchema* v1 = KubeVirtSchema::For("kubevirt.io/v1");
  ASSERT_NE(v1, nullptr);
  EXPECT_EQ(v1->RootOf("VirtualMachineInstanceReplicaSet"), "v1.VirtualMachineInstanceReplicaSet");
  EXPECT_EQ(KubeVirtSchema::For("kubevirt.io/v1alpha1")->RootOf("VirtualMachine"), "v1.VirtualMachineInstance");
  EXPECT_EQ(KubeVirtSchema::For("kubevirt.io/v2"), nullptr);
  json file = json::parse(ReadFileCapped(REGDISK_SOURCE_DIR "/schema/kubevirt/swagger-subset.json", 1 << 20).value());
  EXPECT_EQ(KubeVirtSchema::UpstreamCommit(), file["commit"]);
  EXPECT_EQ(*v1->Definition("v1.Disk"), file["definitions"]["v1.Disk"]);
  // YAML 1.1 scalars, as kubectl and the API server read them.
  for (const char* s : {"yes", "No", "on", "OFF", "true", "~", "null", "12", "-3", "0x1F", "1e9", "1.5", ".inf"}) {
    EXPECT_TRUE(PlainScalarIsNotString(s)) << s;
  }
  for (const char* s : {"64M", "1Gi", "hello", "1.2.3", "v1", "yes please"}) EXPECT_FALSE(PlainScalarIsNotString(s)) << s;
}

// Interfaces and networks as KubeVirt writes them; with neither, KubeVirt's
// default pod interface.
TEST(SpecNetworkTest, InterfacesNetworksAndTheDefault) {
  ParseResult plain = ParseSpecs(kV1Vmi, "vmi.yaml");
  ASSERT_TRUE(plain.ok());
  const auto& dflt = std::get<VirtualMachine>(plain.objects[0]).spec;
  ASSERT_EQ(dflt.interfaces.size(), 1u);
  EXPECT_EQ(dflt.interfaces[0].name, "default");
  EXPECT_EQ(dflt.interfaces[0].binding, "masquerade");
  EXPECT_EQ(dflt.interfaces[0].model, "virtio");
  ASSERT_EQ(dflt.networks.size(), 1u);
  EXPECT_EQ(dflt.networks[0].vm_network_cidr, "10.0.2.0/24");

  std::string none = Replace(kV1Vmi, "    devices:\n", "    devices:\n      autoattachPodInterface: false\n");
  ParseResult r0 = ParseSpecs(none, "vmi.yaml");
  ASSERT_TRUE(r0.ok()) << ::testing::PrintToString(Errors(r0));
  EXPECT_TRUE(std::get<VirtualMachine>(r0.objects[0]).spec.interfaces.empty());
  EXPECT_EQ(ToJson(r0.objects[0])["spec"]["domain"]["devices"]["autoattachPodInterface"], false);

  std::string web = Replace(Replace(kV1Vmi, "    devices:\n", R"(    devices:
      interfaces:
      - name: pod
        masquerade: {}
        macAddress: "02:00:00:aa:bb:cc"
        ports:
        - {name: http, port: 80}
        - {port: 53, protocol: UDP}
)"), "  volumes:\n", "  networks:\n  - name: pod\n    pod: {vmNetworkCIDR: 10.11.12.0/24}\n  volumes:\n");
  ParseResult r = ParseSpecs(web, "vmi.yaml");
  ASSERT_TRUE(r.ok()) << ::testing::PrintToString(Errors(r));
  EXPECT_THAT(Warnings(r), ::testing::IsEmpty());
  const auto& s = std::get<VirtualMachine>(r.objects[0]).spec;
  ASSERT_EQ(s.interfaces.size(), 1u);
  EXPECT_EQ(s.interfaces[0].mac_address, "02:00:00:aa:bb:cc");
  EXPECT_TRUE(ParseSpecs(Replace(web, "02:00:00:aa:bb:cc", "52-54-00-AB-cd-01"), "vmi.yaml").ok());
  ASSERT_EQ(s.interfaces[0].ports.size(), 2u);
  EXPECT_EQ(s.interfaces[0].ports[0].port, 80);
  EXPECT_EQ(s.interfaces[0].ports[0].protocol, "TCP");
  EXPECT_EQ(s.interfaces[0].ports[1].protocol, "UDP");
  EXPECT_EQ(s.networks[0].vm_network_cidr, "10.11.12.0/24");
  json j = ToJson(r.objects[0]);
  EXPECT_EQ(j["spec"]["domain"]["devices"]["interfaces"][0]["ports"][0],
            json({{"name", "http"}, {"port", 80}, {"protocol", "TCP"}}));
  EXPECT_EQ(j["spec"]["networks"][0]["pod"]["vmNetworkCIDR"], "10.11.12.0/24");

  struct Case {
    std::string name, doc, expected;
  };
  std::vector<Case> cases = {
      {"port out of range", Replace(web, "port: 80}", "port: 70000}"),
       "spec.domain.devices.interfaces[0].ports[0].port: must be between 1 and 65535"},
      {"protocol", Replace(web, "protocol: UDP", "protocol: SCTP"),
       "spec.domain.devices.interfaces[0].ports[1].protocol: \"SCTP\" is not a protocol regdisk publishes; use TCP or UDP"},
      {"duplicate port", Replace(web, "{port: 53, protocol: UDP}", "{port: 80}"),
       "spec.domain.devices.interfaces[0].ports[1]: port 80/TCP is listed twice"},
      {"multicast MAC", Replace(web, "02:00:00:aa:bb:cc", "01:00:5e:00:00:01"),
       "spec.domain.devices.interfaces[0].macAddress: \"01:00:5e:00:00:01\" is a multicast MAC address (the lowest "
       "bit of its first octet is set), which no NIC can have; give a unicast address"},
      {"multicast MAC, dashes", Replace(web, "02:00:00:aa:bb:cc", "33-33-00-00-00-01"),
       "\"33-33-00-00-00-01\" is a multicast MAC address"},
      {"broadcast MAC", Replace(web, "02:00:00:aa:bb:cc", "FF:ff:ff:ff:ff:ff"),
       "\"FF:ff:ff:ff:ff:ff\" is the broadcast MAC address, which no NIC can have"},
      {"zero MAC", Replace(web, "02:00:00:aa:bb:cc", "00:00:00:00:00:00"),
       "\"00:00:00:00:00:00\" is the all-zero MAC address, which no NIC can have"},
      {"zero MAC, dashes", Replace(web, "02:00:00:aa:bb:cc", "00-00-00-00-00-00"),
       "\"00-00-00-00-00-00\" is the all-zero MAC address"},
      {"mixed separators", Replace(web, "02:00:00:aa:bb:cc", "02:00-00:aa:bb:cc"),
       "\"02:00-00:aa:bb:cc\" is not a MAC address; give a unicast address (six hex pairs"},
      {"model", Replace(web, "masquerade: {}", "masquerade: {}\n        model: virtio-transitional"),
       "spec.domain.devices.interfaces[0].model: model \"virtio-transitional\" is not supported"},
      {"sriov", Replace(web, "masquerade: {}", "sriov: {}"),
       "spec.domain.devices.interfaces[0].sriov: regdisk connects interfaces with masquerade (user-mode networking, "
       "no root needed) or bridge, not sriov; use masquerade: {}"},
      {"CIDR", Replace(web, "10.11.12.0/24", "10.11.12.0/30"),
       "spec.networks[0].pod.vmNetworkCIDR: \"10.11.12.0/30\" is too small for a VM network"},
      {"CIDR syntax", Replace(web, "10.11.12.0/24", "10.11.12/24"),
       "spec.networks[0].pod.vmNetworkCIDR: \"10.11.12/24\" is not an IPv4 network"},
      {"interface without network", Replace(web, "  - name: pod\n    pod:", "  - name: other\n    pod:"),
       "spec.domain.devices.interfaces[0].name: interface \"pod\" has no network of the same name; add one to "
       "spec.networks (pod: {})"},
      {"multus", Replace(web, "    pod: {vmNetworkCIDR: 10.11.12.0/24}", "    multus: {networkName: ptp}"),
       "spec.networks[0]: network \"pod\" is not a pod network"},
  };
  for (const auto& c : cases) {
    ParseResult bad = ParseSpecs(c.doc, "vmi.yaml");
    EXPECT_FALSE(bad.ok()) << c.name;
    std::string all;
    for (const auto& e : Errors(bad)) all += e + "\n";
    EXPECT_THAT(all, HasSubstr(c.expected)) << c.name;
  }
}

// cloud-init user data and network data from a Secret of the same file.
TEST(SpecNetworkTest, CloudInitFromSecrets) {
  std::string doc = Replace(kV1Vmi, "      userData: |\n        #cloud-config\n        password: fedora\n",
                            "      secretRef: {name: ci}\n      networkDataSecretRef: {name: ci}\n") +
                    R"(---
apiVersion: v1
kind: Secret
metadata: {name: ci}
type: Opaque
data:
  userdata: I2Nsb3VkLWNvbmZpZwpwYXNzd29yZDogczNjcjN0Cg==
stringData:
  networkData: "version: 2\n"
)";
  ParseResult r = ParseSpecs(doc, "vmi.yaml");
  ASSERT_TRUE(r.ok()) << ::testing::PrintToString(Errors(r));
  const auto& ci = *std::get<VirtualMachine>(r.objects[0]).spec.volumes[1].cloud_init_no_cloud;
  EXPECT_EQ(ci.user_data_secret, "ci");
  EXPECT_EQ(ci.network_data_secret, "ci");
  const auto& secret = std::get<Secret>(r.objects[1]);
  ASSERT_NE(CloudInitSecretData(secret, true), nullptr);
  EXPECT_EQ(*CloudInitSecretData(secret, true), "#cloud-config\npassword: s3cr3t\n");
  EXPECT_EQ(*CloudInitSecretData(secret, false), "version: 2\n");
  // Printed objects name the Secret, never its data.
  EXPECT_EQ(ToJson(r.objects[0])["spec"]["volumes"][1]["cloudInitNoCloud"]["secretRef"]["name"], "ci");
  EXPECT_THAT(ToJson(r.objects[1]).dump(), ::testing::Not(HasSubstr("s3cr3t")));

  ParseResult missing = ParseSpecs(Replace(doc, "name: ci}\n      networkData", "name: nope}\n      networkData"), "vmi.yaml");
  EXPECT_THAT(::testing::PrintToString(Errors(missing)),
              HasSubstr("spec.volumes[1].cloudInitNoCloud.secretRef.name: Secret \\\"nope\\\" is not in this file"));
  ParseResult nokey = ParseSpecs(Replace(doc, "  userdata: ", "  other: "), "vmi.yaml");
  EXPECT_THAT(::testing::PrintToString(Errors(nokey)), HasSubstr("has no key userdata (or userData)"));
}

TEST(SpecV1Test, YamlOutputQuotesWhatYamlWouldMisread) {
  json j = {{"a", "yes"}, {"b", "12"}, {"c", "64M"}, {"d", 12}, {"e", true}, {"f", "two\nlines\n"}, {"g", json::array()}};
  std::string y = ToYaml(j);
  EXPECT_THAT(y, HasSubstr("a: \"yes\"\n"));
  EXPECT_THAT(y, HasSubstr("b: \"12\"\n"));
  EXPECT_THAT(y, HasSubstr("c: 64M\n"));
  EXPECT_THAT(y, HasSubstr("d: 12\n"));
  EXPECT_THAT(y, HasSubstr("e: true\n"));
  EXPECT_EQ(YAML::Load(y)["f"].as<std::string>(), "two\nlines\n");
}

TEST(SpecV1Test, TheSeedsTwoDiskExampleUsesACdromNotAReadOnlySataDisk) {
  ParseResult r = ParseSpecs(ReadFileCapped(REGDISK_SOURCE_DIR "/examples/vm-two-disks.yaml", 1 << 20).value(), "two.yaml");
  ASSERT_TRUE(r.ok()) << ::testing::PrintToString(Errors(r));
  const auto& d = std::get<VirtualMachine>(r.objects[0]).spec.disks[1];
  EXPECT_EQ(d.device, "cdrom");
  EXPECT_EQ(d.bus, "sata");
  EXPECT_TRUE(d.read_only);
  // What the example used to say is refused in validate, with the reason.
  std::string old = Replace(ReadFileCapped(REGDISK_SOURCE_DIR "/examples/vm-two-disks.yaml", 1 << 20).value(),
                            "        cdrom:\n          bus: sata\n", "        disk:\n          bus: sata\n          readOnly: true\n");
  EXPECT_THAT(Errors(ParseSpecs(old, "two.yaml")),
              ElementsAre(HasSubstr("spec.domain.devices.disks[1].disk.bus: sata hard disks cannot be read-only")));
}

}  // namespace
}  // namespace regdisk::spec
