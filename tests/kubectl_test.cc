// The vendored KubeVirt examples (tests/kubevirt-examples/) and regdisk's
// own examples/ through the real kubectl (v1.32, /usr/bin/kubectl):
// `kubectl apply --dry-run=client --validate=false -o yaml -f FILE` must
// accept each, as regdisk does.
//
// A client dry run still asks the API server two things: discovery (which
// resource serves a kind) and the live object (to choose between create and
// patch). A fake API server on 127.0.0.1 answers both: discovery lists
// KubeVirt's kinds, and every object is 404 Not Found. A throwaway
// kubeconfig points kubectl at it, and HOME is a temp directory so that
// kubectl's discovery cache stays there.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <httplib.h>

#include <filesystem>
#include <thread>

#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

#include "harness/harness.h"
#include "spec/spec.h"

namespace regdisk::testing {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::HasSubstr;

const char kKubectl[] = "/usr/bin/kubectl";

json ResourceList(const std::string& group_version, const std::vector<std::string>& kinds) {
  json resources = json::array();
  for (const auto& kind : kinds) {
    std::string plural = kind;
    std::transform(plural.begin(), plural.end(), plural.begin(), [](unsigned char c) { return std::tolower(c); });
    resources.push_back({{"name", plural + "s"},
                         {"singularName", plural},
                         {"namespaced", true},
                         {"kind", kind},
                         {"verbs", {"get", "create", "patch"}}});
  }
  return {{"kind", "APIResourceList"}, {"apiVersion", "v1"}, {"groupVersion", group_version}, {"resources", resources}};
}

class FakeApiServer {
 public:
  FakeApiServer() {
    auto reply = [](const json& body) {
      return [body](const httplib::Request&, httplib::Response& res) { res.set_content(body.dump(), "application/json"); };
    };
    server_.Get("/api", reply({{"kind", "APIVersions"}, {"versions", {"v1"}}}));
    json v1 = {{"groupVersion", "kubevirt.io/v1"}, {"version", "v1"}};
    json v1alpha1 = {{"groupVersion", "kubevirt.io/v1alpha1"}, {"version", "v1alpha1"}};
    server_.Get("/apis", reply({{"kind", "APIGroupList"},
                                {"apiVersion", "v1"},
                                {"groups", {{{"name", "kubevirt.io"}, {"versions", {v1, v1alpha1}}, {"preferredVersion", v1}}}}}));
    server_.Get("/api/v1", reply(ResourceList("v1", {"Secret"})));
    server_.Get("/apis/kubevirt.io/v1",
                reply(ResourceList("kubevirt.io/v1", {"VirtualMachine", "VirtualMachineInstance",
                                                      "VirtualMachineInstanceReplicaSet"})));
    server_.Get("/apis/kubevirt.io/v1alpha1",
                reply(ResourceList("kubevirt.io/v1alpha1", {"VirtualMachine", "VirtualMachineReplicaSet"})));
    // Everything else, the live objects included: not found.
    server_.set_error_handler([](const httplib::Request&, httplib::Response& res) {
      res.status = 404;
      res.set_content(R"({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404})",
                      "application/json");
    });
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
  }
  ~FakeApiServer() {
    server_.stop();
    thread_.join();
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }

 private:
  httplib::Server server_;
  std::thread thread_;
  int port_ = 0;
};

class KubectlTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    if (::access(kKubectl, X_OK) != 0) GTEST_SKIP() << kKubectl << " is not installed";
    std::string config = "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {server: \"" + api_.url() +
                         "\"}\ncontexts:\n- name: fake\n  context: {cluster: fake, user: nobody, namespace: default}\n"
                         "current-context: fake\nusers:\n- name: nobody\n  user: {}\n";
    ASSERT_OK(WriteFileAtomic(P("kubeconfig"), config));
    fs::create_directories(tmp() / "home");
  }
  RunResult Apply(const fs::path& file) {
    return RunProgram({kKubectl, "apply", "--dry-run=client", "--validate=false", "-o", "yaml", "--cache-dir",
                       P("home/cache"), "-f", file.string()},
                      {}, {"KUBECONFIG=" + P("kubeconfig"), "HOME=" + P("home")}, std::chrono::seconds(60));
  }
  FakeApiServer api_;
};

// The instance spec of an object (a VirtualMachine's template spec).
nlohmann::json InstanceSpecJson(const json& object) {
  const json& spec = object["spec"];
  return spec.contains("template") ? spec["template"]["spec"] : spec;
}

// kubectl -o yaml and regdisk validate -o json write the quantities of a
// file the same way: as written. Returns the number of quantities compared.
int SameQuantities(const fs::path& file, const std::string& kubectl_yaml) {
  spec::ParseResult parsed = spec::ParseSpecs(ReadFileCapped(file, 1 << 20).value(), file.string());
  if (!parsed.ok() || parsed.objects.size() != 1) return 0;  // refused ones are checked elsewhere
  json ours = InstanceSpecJson(spec::ToJson(parsed.objects[0]))["domain"];
  const YAML::Node spec = YAML::Load(kubectl_yaml)["spec"];
  const YAML::Node theirs = spec["template"] ? spec["template"]["spec"]["domain"] : spec["domain"];
  int n = 0;
  auto compare = [&](const YAML::Node& k, const json& o, const std::string& what) {
    if (!k) return;
    ++n;
    EXPECT_EQ(k.Scalar(), o.is_string() ? o.get<std::string>() : o.dump()) << file << ": " << what;
  };
  if (ours.contains("memory")) compare(theirs["memory"]["guest"], ours["memory"]["guest"], "memory.guest");
  if (ours.contains("resources")) {
    const json& req = ours["resources"]["requests"];
    if (req.contains("memory")) compare(theirs["resources"]["requests"]["memory"], req["memory"], "requests.memory");
    if (req.contains("cpu")) compare(theirs["resources"]["requests"]["cpu"], req["cpu"], "requests.cpu");
  }
  return n;
}

TEST_F(KubectlTest, AcceptsEveryVendoredExampleAndEveryRegdiskExample) {
  std::vector<fs::path> files;
  for (const char* dir : {"tests/kubevirt-examples/kubevirt", "tests/kubevirt-examples/user-guide", "examples"}) {
    for (const auto& e : fs::directory_iterator(fs::path(REGDISK_SOURCE_DIR) / dir)) {
      if (e.path().extension() == ".yaml") files.push_back(e.path());
    }
  }
  std::sort(files.begin(), files.end());
  ASSERT_GE(files.size(), 60u);
  int compared = 0;
  for (const auto& f : files) {
    RunResult r = Apply(f);
    EXPECT_EQ(r.exit_code, 0) << f << ":\n" << r.err;
    EXPECT_THAT(r.out, HasSubstr("apiVersion: kubevirt.io/v1")) << f;
    compared += SameQuantities(f, r.out);
  }
  EXPECT_GE(compared, 50);
  // The test can fail: kubectl does refuse a document it cannot read.
  ASSERT_OK(WriteFileAtomic(P("broken.yaml"), "apiVersion: kubevirt.io/v1\nkind: VirtualMachine\nmetadata: [\n"));
  EXPECT_NE(Apply(P("broken.yaml")).exit_code, 0);
}

}  // namespace
}  // namespace regdisk::testing
