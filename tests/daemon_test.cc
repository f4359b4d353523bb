// The node daemon's engine with real QEMU (the boot-sector guest, which
// stays up) on a disk in a real registry: VirtualMachineInstances start
// and stop as the object store says, replica sets heal and scale, and a
// restarted daemon adopts the QEMUs the previous one left running.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/file.h>
#include <fcntl.h>
#include <sys/wait.h>

#include <functional>
#include <optional>
#include <set>
#include <thread>

#include "daemon/convert.h"
#include "daemon/instance.h"
#include "daemon/node.h"
#include "daemon/resources.h"
#include "harness/harness.h"
#include "store/chunk_fetch.h"
#include "store/lazy_dir.h"
#include "image/layout.h"
#include "oci/chunk_index.h"
#include "store/store.h"
#include "state/object_store.h"
#include "util/log.h"

namespace regdisk::testing {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;
using ::testing::HasSubstr;
using ::testing::Not;
using daemon::kVmiResource;
using daemon::kVmirsResource;
using daemon::kVmResource;

TEST(DaemonConvertTest, TimestampsRoundTrip) {
  EXPECT_EQ(daemon::ParseTimestamp("2026-11-28T11:52:22Z"), 1795866742);
  EXPECT_EQ(state::FormatTimestamp(*daemon::ParseTimestamp("2026-11-28T11:52:22Z")), "2026-11-28T11:52:22Z");
  EXPECT_FALSE(daemon::ParseTimestamp("2026-11-28 11:52:22"));
  EXPECT_FALSE(daemon::ParseTimestamp("2026-11-28T11:52:22Zjunk"));
}

TEST(DaemonConvertTest, ObservedVmiReadsPhaseReadinessOwnerAndGeneration) {
  json vmi = json::parse(R"({
    "metadata": {"name": "web-x", "namespace": "ns1", "uid": "u1", "labels": {"app": "web"},
                 "creationTimestamp": "2026-11-28T11:52:22Z",
                 "annotations": {"regdisk.io/template-generation": "3"},
                 "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceReplicaSet",
                                      "name": "web", "uid": "rs1", "controller": true}]},
    "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})");
  controller::ObservedVmi o = daemon::ObservedVmiFromJson(vmi);
  EXPECT_EQ(o.namespace_, "ns1");
  EXPECT_EQ(o.phase, controller::VmiPhase::kRunning);
  EXPECT_TRUE(o.ready);
  ASSERT_TRUE(o.controller_ref);
  EXPECT_EQ(o.controller_ref->uid, "rs1");
  EXPECT_EQ(o.template_generation, 3);
  EXPECT_EQ(o.created.seconds, 1795866742);
  EXPECT_EQ(o.labels.at("app"), "web");
  // No status yet: Pending; an unknown phase is Unknown, never Running.
  EXPECT_EQ(daemon::ObservedVmiFromJson(json::parse(R"({"metadata": {"name": "a"}})")).phase,
            controller::VmiPhase::kPending);
  EXPECT_EQ(daemon::ObservedVmiFromJson(json::parse(R"({"metadata": {"name": "a"}, "status": {"phase": "Bogus"}})")).phase,
            controller::VmiPhase::kUnknown);
}

TEST(DaemonConvertTest, NewVmisCarryTheTemplateOwnerAndGeneration) {
  json rs = json::parse(R"({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceReplicaSet",
    "metadata": {"name": "web", "namespace": "default", "uid": "rs1", "generation": 2},
    "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
             "template": {"metadata": {"labels": {"app": "web"}, "annotations": {"note": "x"}},
                          "spec": {"domain": {"devices": {}}}}}})");
  auto state = daemon::ReplicaSetFromJson(rs, 100);
  ASSERT_OK(state);
  EXPECT_EQ(state->replicas, 2);
  EXPECT_EQ(state->template_.generation, 2);
  controller::CreateVmi create{"default", "web-abcde", state->template_, state->template_.labels,
                               controller::OwnerRefFor(*state)};
  json vmi = daemon::VmiFromTemplate(rs, create);
  EXPECT_EQ(vmi["kind"], "VirtualMachineInstance");
  EXPECT_EQ(vmi["metadata"]["name"], "web-abcde");
  EXPECT_EQ(vmi["metadata"]["labels"]["app"], "web");
  EXPECT_EQ(vmi["metadata"]["annotations"]["note"], "x");
  EXPECT_EQ(vmi["metadata"]["annotations"]["regdisk.io/template-generation"], "2");
  EXPECT_EQ(vmi["metadata"]["ownerReferences"][0]["uid"], "rs1");
  EXPECT_EQ(vmi["metadata"]["ownerReferences"][0]["controller"], true);
  EXPECT_EQ(vmi["spec"], rs["spec"]["template"]["spec"]);
  // matchExpressions are not implemented: refused, not ignored.
  rs["spec"]["selector"]["matchExpressions"] = json::array({{{"key", "a"}, {"operator", "Exists"}}});
  EXPECT_FALSE(daemon::ReplicaSetFromJson(rs, 100).ok());
}

TEST(DaemonConvertTest, ProcessStartTicksNamesOneProcess) {
  auto mine = ProcessStartTicks(::getpid());
  ASSERT_TRUE(mine);
  EXPECT_EQ(ProcessStartTicks(::getpid()), mine);
  EXPECT_FALSE(ProcessStartTicks(0x3ffffff));
}

class DaemonTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    root_ = tmp() / "root";
    TestRegistry::Extra extra;
    extra.access_log = true;
    auto reg = TestRegistry::Start(RegistryMode::kPlain, {}, extra);
    ASSERT_OK(reg);
    reg_ = std::move(*reg);
    image_ = reg_->host() + "/vmdisks/halt:v1";
    PushGuest("v1");
    ASSERT_OK(MakeDirs(root_));
    auto store = state::ObjectStore::Open(root_ / "state.db");
    ASSERT_OK(store);
    store_ = std::move(*store);
  }
  void TearDown() override {
    if (node_) node_->StopAllVms();
    node_.reset();
    if (serve_) serve_->Terminate(10s);
    RunProgram({"pkill", "-KILL", "-f", (root_ / "run").string()});  // whatever a failed test left
    RunProgram({"pkill", "-KILL", "-f", "nbdkit.*" + (root_ / "lazy").string()});
    TempDirTest::TearDown();
  }

  // The boot-sector guest, told to stay up (it halts without powering
  // off), with `version` in its padding so each version is other bytes.
  void PushGuest(const std::string& version) {
    std::string raw = ReadFileCapped(REGDISK_GUEST_IMAGE, 512).value();
    std::string sector1 = "PRISTINE-SECTOR-CONTENT";
    sector1.resize(512, '\0');
    raw += sector1 + "STAY-UP";
    raw.resize(4096, '\0');
    raw += version;
    raw.resize(1 << 20, '\0');
    ASSERT_OK(WriteFileAtomic(tmp() / "halt.raw", raw));
    RunResult r = RunRegdisk({"build", P("halt.raw"), "-t", "docker://" + image_});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  // How often the registry served each blob of the test image.
  std::map<std::string, int> BlobGets() {
    std::map<std::string, int> out;
    std::string log = reg_->log();
    const std::string what = "GET /v2/vmdisks/halt/blobs/";
    for (size_t at = log.find(what); at != std::string::npos; at = log.find(what, at + 1)) {
      out[log.substr(at + what.size(), 71)]++;
    }
    return out;
  }
  static std::string Annotation(const json& obj, const char* key) {
    const json& meta = obj["metadata"];
    if (!meta.contains("annotations") || !meta["annotations"].contains(key)) return "";
    return meta["annotations"][key].get<std::string>();
  }

  void StartNode(bool lazy = false) {
    daemon::NodeOptions o;
    o.root = root_;
    o.store = store_.get();
    o.plan.accel = "auto";
    o.plan.lazy = lazy;
    o.plan.lazy_options.export_options.plugin = REGDISK_NBDKIT_PLUGIN;
    o.node_name = "node1";
    o.grace = 1s;
    o.resync = 500ms;
    o.name_seed = 42;
    auto node = daemon::Node::Start(std::move(o));
    ASSERT_OK(node);
    node_ = std::move(*node);
  }

  json VmiTemplate() const {
    return {{"metadata", {{"labels", {{"app", "web"}}}}},
            {"spec",
             {{"domain", {{"devices", {{"disks", {{{"name", "root"}, {"disk", {{"bus", "virtio"}}}}}}}},
                          {"resources", {{"requests", {{"memory", "64M"}}}}}}},
              {"volumes", {{{"name", "root"}, {"containerDisk", {{"image", image_}}}}}}}}};
  }

  void CreateReplicaSet(const std::string& name, int replicas) {
    json rs = {{"apiVersion", "kubevirt.io/v1"},
               {"kind", "VirtualMachineInstanceReplicaSet"},
               {"metadata", {{"name", name}, {"namespace", "default"}}},
               {"spec", {{"replicas", replicas}, {"selector", {{"matchLabels", {{"app", "web"}}}}}, {"template", VmiTemplate()}}}};
    ASSERT_OK(store_->Create(kVmirsResource, rs));
  }

  std::vector<json> Vmis() {
    auto list = store_->List(kVmiResource, "default");
    EXPECT_TRUE(list.ok()) << StatusText(list.status());
    return list.ok() ? list->items : std::vector<json>{};
  }
  std::vector<json> RunningVmis() {
    std::vector<json> out;
    for (auto& v : Vmis()) {
      if (v.contains("status") && v["status"].value("phase", "") == "Running") out.push_back(v);
    }
    return out;
  }
  // Waits until `done` holds; a bounded wait, not a timing assertion
  // (QEMU under TCG on a loaded machine may take a while).
  bool Eventually(const std::function<bool()>& done, std::chrono::seconds limit = 120s) {
    auto until = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < until) {
      if (done()) return true;
      std::this_thread::sleep_for(100ms);
    }
    return done();
  }
  static pid_t PidOf(const fs::path& root, const std::string& uid) {
    auto text = ReadFileCapped(daemon::InstanceDir(root, uid) / "vm.json", 1 << 20);
    if (!text.ok()) return 0;
    return json::parse(*text).value("qemuPid", 0);
  }
  static bool Alive(pid_t pid) { return pid > 0 && ::kill(pid, 0) == 0; }

  // The real `regdisk serve` on root_, its API on socket(), its log in
  // serve.log; returns once it answers.
  std::string socket() const { return P("api.sock"); }
  void StartServe(const std::vector<std::string>& extra = {}) {
    Process::Options o;
    o.stderr_mode = Process::Stdio::kFile;
    o.stderr_file = P("serve.log");
    std::vector<std::string> argv = {REGDISK_BIN, "--root", root_.string(), "serve", "--socket", socket()};
    argv.insert(argv.end(), extra.begin(), extra.end());
    auto p = Process::Spawn(argv, o);
    ASSERT_OK(p);
    serve_.emplace(std::move(*p));
    ASSERT_TRUE(Eventually([&] {
      return RunRegdisk({"get", "vmis", "--socket", socket()}).exit_code == 0 || serve_->Poll().has_value();
    })) << ServeLog();
    ASSERT_FALSE(serve_->Poll().has_value()) << ServeLog();
  }
  void KillServe() {
    serve_->Signal(SIGKILL);
    serve_->Wait(10s);
    serve_.reset();
  }
  std::string ServeLog() const { return ReadFileCapped(P("serve.log"), 1 << 16).value_or("(no log)"); }
  // A replica set of `replicas` VMIs of VmiTemplate(), applied with the
  // client through the socket; the file it applied.
  std::string ApplyReplicaSet(const std::string& name, int replicas) {
    json rs = {{"apiVersion", "kubevirt.io/v1"},
               {"kind", "VirtualMachineInstanceReplicaSet"},
               {"metadata", {{"name", name}, {"namespace", "default"}}},
               {"spec", {{"replicas", replicas}, {"selector", {{"matchLabels", {{"app", "web"}}}}}, {"template", VmiTemplate()}}}};
    const std::string file = P(name + ".json");
    EXPECT_OK(WriteFileAtomic(file, rs.dump()));
    RunResult apply = RunRegdisk({"apply", "-f", file, "--socket", socket()});
    EXPECT_EQ(apply.exit_code, 0) << apply.err;
    return file;
  }
  int QemusUnderRoot() {
    RunResult r = RunProgram({"pgrep", "-f", (root_ / "run").string()});
    int n = 0;
    for (char ch : r.out) n += ch == '\n';
    return n;
  }

  fs::path root_;
  std::string image_;
  std::optional<Process> serve_;
  std::unique_ptr<TestRegistry> reg_;
  std::unique_ptr<state::ObjectStore> store_;
  std::unique_ptr<daemon::Node> node_;
};

TEST_F(DaemonTest, ReplicaSetRunsHealsScalesAndSurvivesARestart) {
  StartNode();
  CreateReplicaSet("web", 2);
  ASSERT_TRUE(Eventually([&] { return RunningVmis().size() == 2; })) << json(Vmis()).dump(2);
  std::vector<json> running = RunningVmis();
  for (const auto& v : running) {
    EXPECT_EQ(v["status"]["nodeName"], "node1");
    EXPECT_EQ(v["status"]["interfaces"][0]["ipAddress"], "10.0.2.2");
    EXPECT_EQ(v["metadata"]["ownerReferences"][0]["name"], "web");
    EXPECT_THAT(v["metadata"]["name"].get<std::string>(), ::testing::StartsWith("web-"));
    EXPECT_TRUE(Alive(PidOf(root_, v["metadata"]["uid"])));
  }

  // Kill one VMI's QEMU: it is marked Failed, deleted, and replaced.
  const std::string victim = running[0]["metadata"]["uid"];
  const std::string survivor = running[1]["metadata"]["uid"];
  ASSERT_EQ(::kill(PidOf(root_, victim), SIGKILL), 0);
  ASSERT_TRUE(Eventually([&] {
    auto now = RunningVmis();
    return now.size() == 2 && now[0]["metadata"]["uid"] != victim && now[1]["metadata"]["uid"] != victim;
  })) << json(Vmis()).dump(2);
  EXPECT_FALSE(fs::exists(daemon::InstanceDir(root_, victim)));
  // Three VMs started from one image: each of its blobs left the registry once.
  auto gets = BlobGets();
  EXPECT_FALSE(gets.empty());
  for (const auto& [digest, n] : gets) EXPECT_EQ(n, 1) << digest;

  // Events for kubectl describe / get events, and the counters /metrics serves.
  auto events = store_->List(daemon::kEventResource, "default");
  ASSERT_OK(events);
  std::multiset<std::string> reasons;
  for (const auto& e : events->items) reasons.insert(e["involvedObject"]["kind"].get<std::string>() + "/" + e["reason"].get<std::string>());
  EXPECT_EQ(reasons.count("VirtualMachineInstanceReplicaSet/SuccessfulCreate"), 3u) << json(events->items).dump(2);
  EXPECT_EQ(reasons.count("VirtualMachineInstanceReplicaSet/SuccessfulDelete"), 1u);
  EXPECT_EQ(reasons.count("VirtualMachineInstance/Started"), 3u);
  EXPECT_EQ(reasons.count("VirtualMachineInstance/Failed"), 1u);
  EXPECT_GE(reasons.count("VirtualMachineInstance/Pulled"), 1u);
  const std::string metrics = node_->MetricsText();
  EXPECT_THAT(metrics, HasSubstr("regdisk_vmis{phase=\"Running\"} 2\n"));
  EXPECT_THAT(metrics, HasSubstr("regdisk_vmi_starts_total 3\n"));
  EXPECT_THAT(metrics, HasSubstr("regdisk_vmi_exits_total{result=\"failed\"} 1\n"));
  EXPECT_THAT(metrics, HasSubstr("regdisk_pulls_total{result=\"success\"} 3\n"));
  EXPECT_THAT(metrics, ::testing::Not(HasSubstr("regdisk_pull_bytes_total 0\n")));

  // The daemon goes away (its QEMUs do not); a new one adopts them.
  std::map<std::string, pid_t> pids;
  for (const auto& v : RunningVmis()) pids[v["metadata"]["uid"]] = PidOf(root_, v["metadata"]["uid"]);
  node_.reset();
  for (const auto& [uid, pid] : pids) EXPECT_TRUE(Alive(pid)) << uid;
  StartNode();
  std::this_thread::sleep_for(1500ms);  // a few passes of the new daemon, which must change nothing
  auto after = RunningVmis();
  ASSERT_EQ(after.size(), 2u);
  for (const auto& v : after) EXPECT_EQ(PidOf(root_, v["metadata"]["uid"]), pids[v["metadata"]["uid"]]);

  // Scale down to 1, then delete the set and its VMIs: no QEMU and no run
  // directory is left.
  auto rs = store_->Get(kVmirsResource, "default", "web");
  ASSERT_OK(rs);
  (*rs)["spec"]["replicas"] = 1;
  ASSERT_OK(store_->Update(kVmirsResource, *rs));
  ASSERT_TRUE(Eventually([&] { return Vmis().size() == 1 && QemusUnderRoot() == 1; })) << json(Vmis()).dump(2);
  ASSERT_OK(store_->Delete(kVmirsResource, "default", "web"));
  // The set's deletion deleted them too (marked while they stop); once more is a no-op, or NotFound once gone.
  for (const auto& v : Vmis()) {
    auto st = store_->Delete(kVmiResource, "default", v["metadata"]["name"].get<std::string>());
    if (!st.ok()) {
      ASSERT_EQ(st.status().code(), Code::kNotFound) << st.status().ToString();
    }
  }
  ASSERT_TRUE(Eventually([&] { return QemusUnderRoot() == 0 && daemon::ListInstanceDirs(root_).empty(); }));
  EXPECT_TRUE(survivor.size() > 0);
}

TEST_F(DaemonTest, ReplicasRunThePinnedDigestWhenTheTagMoves) {
  StartNode();
  CreateReplicaSet("web", 1);
  ASSERT_TRUE(Eventually([&] { return RunningVmis().size() == 1; })) << json(Vmis()).dump(2);
  std::string pins;
  ASSERT_TRUE(Eventually([&] {
    auto rs = store_->Get(kVmirsResource, "default", "web");
    pins = rs.ok() ? Annotation(*rs, daemon::kPinnedImagesAnnotation) : "";
    return !pins.empty();
  }));
  const std::string first = Annotation(RunningVmis()[0], daemon::kImageDigestsAnnotation);
  EXPECT_EQ(json::parse(pins), json::parse(first));
  const std::string pinned = json::parse(pins)[image_];

  PushGuest("v2");  // the tag moves to other bytes
  RunResult moved = RunRegdisk({"inspect", "docker://" + image_, "--format", "{{.Digest}}"});
  ASSERT_EQ(moved.exit_code, 0) << moved.err;
  ASSERT_NE(moved.out.substr(0, pinned.size()), pinned);

  auto rs = store_->Get(kVmirsResource, "default", "web");
  ASSERT_OK(rs);
  (*rs)["spec"]["replicas"] = 2;
  ASSERT_OK(store_->Update(kVmirsResource, *rs));
  ASSERT_TRUE(Eventually([&] { return RunningVmis().size() == 2; })) << json(Vmis()).dump(2);
  for (const auto& v : RunningVmis()) EXPECT_EQ(json::parse(Annotation(v, daemon::kImageDigestsAnnotation))[image_], pinned);
}

TEST_F(DaemonTest, AVirtualMachineFollowsItsRunStrategy) {
  StartNode();
  json vm = {{"apiVersion", "kubevirt.io/v1"}, {"kind", "VirtualMachine"},
             {"metadata", {{"name", "db"}, {"namespace", "default"}}},
             {"spec", {{"runStrategy", "Always"}, {"template", VmiTemplate()}}}};
  ASSERT_OK(store_->Create(kVmResource, vm));
  auto printable = [&] {
    auto v = store_->Get(kVmResource, "default", "db");
    return v.ok() && (*v).contains("status") ? (*v)["status"].value("printableStatus", "") : std::string();
  };
  ASSERT_TRUE(Eventually([&] { return RunningVmis().size() == 1 && printable() == "Running"; }))
      << json(Vmis()).dump(2) << printable();
  json vmi = RunningVmis()[0];
  EXPECT_EQ(vmi["metadata"]["name"], "db");
  EXPECT_EQ(vmi["metadata"]["ownerReferences"][0]["kind"], "VirtualMachine");

  // Halted: the VMI and its QEMU go, the VM stays and says Stopped.
  auto current = store_->Get(kVmResource, "default", "db");
  ASSERT_OK(current);
  (*current)["spec"]["runStrategy"] = "Halted";
  ASSERT_OK(store_->Update(kVmResource, *current));
  ASSERT_TRUE(Eventually([&] { return Vmis().empty() && QemusUnderRoot() == 0 && printable() == "Stopped"; }))
      << json(Vmis()).dump(2) << printable();
}

// Deleting a VirtualMachine: KubeVirt's finalizers keep the VM and its VMI
// listed, marked, while the QEMU stops; the VMI goes once its files are
// removed, then the VM once its VMI is gone.
TEST_F(DaemonTest, ADeletedVirtualMachineGoesAfterItsVmiWhichGoesAfterItsQemu) {
  StartNode();
  json vm = {{"apiVersion", "kubevirt.io/v1"}, {"kind", "VirtualMachine"},
             {"metadata", {{"name", "db"}, {"namespace", "default"}}},
             {"spec", {{"runStrategy", "Always"}, {"template", VmiTemplate()}}}};
  ASSERT_OK(store_->Create(kVmResource, vm));
  auto finalizers = [&](std::string_view resource) {
    auto v = store_->Get(resource, "default", "db");
    return v.ok() ? (*v)["metadata"].value("finalizers", json::array()) : json();
  };
  ASSERT_TRUE(Eventually([&] {
    return RunningVmis().size() == 1 && finalizers(kVmResource) == json({"kubevirt.io/virtualMachineControllerFinalize"});
  })) << json(Vmis()).dump(2);
  EXPECT_EQ(finalizers(kVmiResource), json({"kubevirt.io/foregroundDeleteVirtualMachine"}));
  const std::string uid = RunningVmis()[0]["metadata"]["uid"];
  const pid_t pid = PidOf(root_, uid);
  ASSERT_TRUE(Alive(pid));

  auto marked = store_->Delete(kVmResource, "default", "db");
  ASSERT_OK(marked);
  EXPECT_TRUE((*marked)["metadata"].contains("deletionTimestamp"));
  // Only marked, the VM still owns its VMI (Background deletes that once
  // the VM's row goes): the VM controller stops the VMI, whose QEMU goes
  // first, then the VMI, then the VM.
  ASSERT_TRUE(Eventually([&] {
    return store_->Get(kVmResource, "default", "db").status().code() == Code::kNotFound && Vmis().empty();
  })) << json(Vmis()).dump(2);
  EXPECT_FALSE(Alive(pid));
  EXPECT_FALSE(fs::exists(daemon::InstanceDir(root_, uid)));
  EXPECT_EQ(QemusUnderRoot(), 0);
}

// The seed's kinds: a v1alpha1 VirtualMachine runs as an instance, and a
// v1alpha1 VirtualMachineReplicaSet makes v1alpha1 VirtualMachines.
TEST_F(DaemonTest, TheSeedsV1alpha1KindsRunToo) {
  StartNode();
  json spec = {{"domain",
                {{"resources", {{"requests", {{"memory", "64M"}}}}},
                 {"devices", {{"disks", {{{"name", "registrydisk"}, {"volumeName", "registryvolume"}, {"disk", {{"dev", "vda"}}}}}}}}}},
               {"volumes", {{{"name", "registryvolume"}, {"registryDisk", {{"image", image_}}}}}}};
  json vm = {{"apiVersion", "kubevirt.io/v1alpha1"}, {"kind", "VirtualMachine"},
             {"metadata", {{"name", "testvm-ephemeral"}, {"namespace", "default"}}}, {"spec", spec}};
  ASSERT_OK(store_->Create(daemon::kV1alpha1VmResource, vm));
  json rs = {{"apiVersion", "kubevirt.io/v1alpha1"}, {"kind", "VirtualMachineReplicaSet"},
             {"metadata", {{"name", "seed"}, {"namespace", "default"}}},
             {"spec", {{"replicas", 2}, {"selector", {{"matchLabels", {{"app", "seed"}}}}},
                       {"template", {{"metadata", {{"labels", {{"app", "seed"}}}}}, {"spec", spec}}}}}};
  ASSERT_OK(store_->Create(daemon::kV1alpha1VmrsResource, rs));
  auto running = [&] {
    auto list = store_->List(daemon::kV1alpha1VmResource, "default");
    int n = 0;
    for (const auto& v : list.ok() ? list->items : std::vector<json>{}) {
      n += v.contains("status") && v["status"].value("phase", "") == "Running";
    }
    return n;
  };
  ASSERT_TRUE(Eventually([&] { return running() == 3; })) << json(store_->List(daemon::kV1alpha1VmResource, "default")->items).dump(2);
  EXPECT_TRUE(Vmis().empty());  // nothing of the v1 generation was made
  auto owned = store_->List(daemon::kV1alpha1VmResource, "default", {.label_selector = "app=seed"});
  ASSERT_OK(owned);
  ASSERT_EQ(owned->items.size(), 2u);
  EXPECT_EQ(owned->items[0]["metadata"]["ownerReferences"][0]["kind"], "VirtualMachineReplicaSet");
  EXPECT_EQ(owned->items[0]["apiVersion"], "kubevirt.io/v1alpha1");
  EXPECT_EQ(QemusUnderRoot(), 3);
}

// A daemon killed between starting QEMU and writing Running: the next one
// adopts that QEMU and reports it, with the same pid.
TEST_F(DaemonTest, AnAdoptedStartThatWasNeverReportedBecomesRunning) {
  StartNode();
  json vmi = {{"apiVersion", "kubevirt.io/v1"}, {"kind", "VirtualMachineInstance"},
              {"metadata", {{"name", "late"}, {"namespace", "default"}}}, {"spec", VmiTemplate()["spec"]}};
  ASSERT_OK(store_->Create(kVmiResource, vmi));
  ASSERT_TRUE(Eventually([&] { return RunningVmis().size() == 1; })) << json(Vmis()).dump(2);
  const std::string uid = RunningVmis()[0]["metadata"]["uid"];
  const pid_t pid = PidOf(root_, uid);
  node_.reset();
  auto stored = store_->Get(kVmiResource, "default", "late");
  ASSERT_OK(stored);
  (*stored)["status"] = {{"phase", "Scheduled"}};
  ASSERT_OK(store_->UpdateStatus(kVmiResource, *stored));
  StartNode();
  ASSERT_TRUE(Eventually([&] { return RunningVmis().size() == 1; })) << json(Vmis()).dump(2);
  EXPECT_EQ(PidOf(root_, uid), pid);
  EXPECT_EQ(RunningVmis()[0]["status"]["interfaces"][0]["ipAddress"], "10.0.2.2");
}

TEST_F(DaemonTest, AQemuThatDiedWhileNoDaemonRanMakesItsVmiFailed) {
  StartNode();
  json vmi = {{"apiVersion", "kubevirt.io/v1"}, {"kind", "VirtualMachineInstance"},
              {"metadata", {{"name", "solo"}, {"namespace", "default"}}}, {"spec", VmiTemplate()["spec"]}};
  ASSERT_OK(store_->Create(kVmiResource, vmi));
  ASSERT_TRUE(Eventually([&] { return RunningVmis().size() == 1; })) << json(Vmis()).dump(2);
  const std::string uid = RunningVmis()[0]["metadata"]["uid"];
  const pid_t pid = PidOf(root_, uid);
  node_.reset();
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  // This test process started QEMU, so it reaps it (init would, for a real
  // daemon that died).
  ::waitpid(pid, nullptr, 0);
  StartNode();
  ASSERT_TRUE(Eventually([&] {
    auto v = store_->Get(kVmiResource, "default", "solo");
    return v.ok() && (*v)["status"].value("phase", "") == "Failed";
  }));
  auto v = store_->Get(kVmiResource, "default", "solo");
  ASSERT_OK(v);
  EXPECT_THAT((*v)["status"]["message"].get<std::string>(), ::testing::HasSubstr("gone"));
  EXPECT_FALSE(fs::exists(daemon::InstanceDir(root_, uid)));
}

// A write that drops KubeVirt's finalizer from a VMI the node runs (a PUT
// of the original manifest): the next pass puts it back.
TEST_F(DaemonTest, ARunningVmiGetsItsFinalizerBackAfterAWriteDropsIt) {
  StartNode();
  json vmi = {{"apiVersion", "kubevirt.io/v1"}, {"kind", "VirtualMachineInstance"},
              {"metadata", {{"name", "solo"}, {"namespace", "default"}}}, {"spec", VmiTemplate()["spec"]}};
  ASSERT_OK(store_->Create(kVmiResource, vmi));
  ASSERT_TRUE(Eventually([&] { return RunningVmis().size() == 1; })) << json(Vmis()).dump(2);
  auto finalizers = [&] {
    auto v = store_->Get(kVmiResource, "default", "solo");
    return v.ok() ? (*v)["metadata"].value("finalizers", json::array()) : json();
  };
  for (int attempt = 0;; ++attempt) {  // the daemon may write it meanwhile (a conflict)
    auto current = store_->Get(kVmiResource, "default", "solo");
    ASSERT_OK(current);
    (*current)["metadata"].erase("finalizers");
    auto st = store_->Update(kVmiResource, *current);
    if (st.ok()) break;
    ASSERT_EQ(st.status().code(), Code::kAborted);
    ASSERT_LT(attempt, 50);
  }
  ASSERT_TRUE(Eventually([&] { return finalizers() == json({"kubevirt.io/foregroundDeleteVirtualMachine"}); }))
      << finalizers().dump();
}

// The older name of KubeVirt's VMI finalizer is ours too: a VMI imported
// with it (here a final one, being deleted) is not stuck.
TEST_F(DaemonTest, TheOlderVmiFinalizerNameIsRemovedToo) {
  StartNode();
  json vmi = {{"apiVersion", "kubevirt.io/v1"}, {"kind", "VirtualMachineInstance"},
              {"metadata", {{"name", "old"}, {"namespace", "default"},
                            {"finalizers", {"foregroundDeleteVirtualMachine"}}}},
              {"spec", VmiTemplate()["spec"]}, {"status", {{"phase", "Failed"}}}};
  ASSERT_OK(store_->Create(kVmiResource, vmi));
  ASSERT_OK(store_->Delete(kVmiResource, "default", "old"));
  ASSERT_TRUE(Eventually([&] { return store_->Get(kVmiResource, "default", "old").status().code() == Code::kNotFound; }))
      << json(Vmis()).dump(2);
}

TEST_F(DaemonTest, AnImageThatIsNotThereYetIsRetriedThenRuns) {
  StartNode();
  json spec = VmiTemplate()["spec"];
  const std::string later = reg_->host() + "/vmdisks/later:v1";
  spec["volumes"][0]["containerDisk"]["image"] = later;
  json vmi = {{"apiVersion", "kubevirt.io/v1"}, {"kind", "VirtualMachineInstance"},
              {"metadata", {{"name", "later"}, {"namespace", "default"}}}, {"spec", spec}};
  ASSERT_OK(store_->Create(kVmiResource, vmi));
  ASSERT_TRUE(Eventually([&] {
    auto v = store_->Get(kVmiResource, "default", "later");
    if (!v.ok() || !(*v)["status"].contains("conditions")) return false;
    return (*v)["status"]["conditions"][0].value("reason", "") == "ErrImagePull";
  })) << json(Vmis()).dump(2);
  EXPECT_NE((*store_->Get(kVmiResource, "default", "later"))["status"].value("phase", ""), "Failed");
  RunResult r = RunRegdisk({"copy", "docker://" + image_, "docker://" + later});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_TRUE(Eventually([&] { return RunningVmis().size() == 1; })) << json(Vmis()).dump(2);
}

// Lazy boot in the daemon: the VMs of a replica set boot a chunked image
// while it fills, from one export; a daemon restart mid-fill hands the
// export and the fill to the next daemon, and the disk completes.
// The real `regdisk serve`, killed with SIGKILL while one VM runs and
// another VM's pull hangs mid-blob: the next daemon adopts the running VM
// (same QEMU, still Running) and pulls the other image again, which runs.
TEST_F(DaemonTest, AKilledDaemonWithAPullInFlightKeepsItsVmAndTheNextOneFinishesThePull) {
  auto proxy = FaultProxy::Start(reg_->port());
  ASSERT_OK(proxy);
  StartServe({"--no-lazy"});
  const std::string rs = ApplyReplicaSet("web", 1);
  ASSERT_TRUE(Eventually([&] { return RunningVmis().size() == 1; })) << ServeLog();
  const json web = RunningVmis()[0];
  const std::string web_uid = web["metadata"]["uid"];
  const pid_t web_pid = PidOf(root_, web_uid);
  ASSERT_TRUE(Alive(web_pid));

  // Another image, whose blobs hang in the proxy.
  image_ = reg_->host() + "/vmdisks/halt:v2";
  PushGuest("v2");
  image_ = (*proxy)->host() + "/vmdisks/halt:v2";
  FaultProxy::Rule hang;
  hang.path_contains = "/blobs/";
  hang.action = FaultProxy::Rule::Action::kStall;
  hang.stall = 600s;
  hang.times = 1 << 30;
  (*proxy)->AddRule(hang);
  json slow = {{"apiVersion", "kubevirt.io/v1"},
               {"kind", "VirtualMachineInstance"},
               {"metadata", {{"name", "slow"}, {"namespace", "default"}}},
               {"spec", VmiTemplate()["spec"]}};
  ASSERT_OK(WriteFileAtomic(P("slow.json"), slow.dump()));
  RunResult apply = RunRegdisk({"apply", "-f", P("slow.json"), "--socket", socket()});
  ASSERT_EQ(apply.exit_code, 0) << apply.err;
  auto pulling = [&] {
    for (const auto& r : (*proxy)->seen()) {
      if (r.path.find("/blobs/") != std::string::npos) return true;
    }
    return false;
  };
  ASSERT_TRUE(Eventually(pulling)) << ServeLog();
  EXPECT_EQ(RunningVmis().size(), 1u);

  KillServe();
  EXPECT_TRUE(Alive(web_pid));
  (*proxy)->ClearRules();
  StartServe({"--no-lazy"});
  // The adopted VM did not change: same QEMU, Running throughout.
  auto web_now = store_->Get(kVmiResource, "default", web["metadata"]["name"].get<std::string>());
  ASSERT_OK(web_now);
  EXPECT_EQ((*web_now)["status"].value("phase", ""), "Running");
  EXPECT_EQ(PidOf(root_, web_uid), web_pid);
  // The pull the killed daemon left is made again, and its VM runs.
  ASSERT_TRUE(Eventually([&] { return RunningVmis().size() == 2; })) << json(Vmis()).dump(2) << ServeLog();
  EXPECT_EQ(PidOf(root_, web_uid), web_pid);
  EXPECT_TRUE(Alive(web_pid));

  ASSERT_EQ(RunRegdisk({"delete", "-f", rs, "--socket", socket()}).exit_code, 0);
  ASSERT_EQ(RunRegdisk({"delete", "-f", P("slow.json"), "--socket", socket()}).exit_code, 0);
  EXPECT_TRUE(Eventually([&] { return QemusUnderRoot() == 0 && Vmis().empty(); })) << ServeLog();
}

class LazyDaemonTest : public DaemonTest {
 protected:
  static constexpr size_t kMiB = 1 << 20;
  void SetUp() override {
    DaemonTest::SetUp();
    auto proxy = FaultProxy::Start(reg_->port());
    ASSERT_OK(proxy);
    proxy_ = std::move(*proxy);
    // The guest stays up after printing sector 1; 8 MiB of data behind it
    // that nothing reads but the fill.
    raw_ = ReadFileCapped(REGDISK_GUEST_IMAGE, 512).value();
    std::string sector1 = "LAZY-DAEMON-SECTOR";
    sector1.resize(512, '\0');
    raw_ += sector1 + "STAY-UP";
    raw_.resize(kMiB, '\0');
    raw_ += RandomBytes(8 * kMiB, 11);
    ASSERT_OK(WriteFileAtomic(tmp() / "lazy.raw", raw_));
    // Pushed to the registry, pulled through the proxy (which relays
    // requests one at a time, not uploads).
    image_ = proxy_->host() + "/vmdisks/lazy:v1";
    for (const std::string& dest : {"docker://" + reg_->host() + "/vmdisks/lazy:v1", "oci:" + P("lazy.oci") + ":v1"}) {
      RunResult r = RunRegdisk({"build", P("lazy.raw"), "-t", dest, "--layout", "chunked", "--chunk-size", "64K", "-q"});
      ASSERT_EQ(r.exit_code, 0) << r.err;
    }
    auto layout = image::OciLayout::Open(P("lazy.oci")).value();
    json manifest = json::parse(layout.ReadBlob(layout.Resolve("v1").value(), 1 << 20).value());
    layer_ = oci::Descriptor::FromJson(manifest["layers"][0]).value();
    loc_ = oci::ChunkIndexLocationOf(layer_).value().value();
    const std::string blob = layout.ReadBlob(layer_, 1 << 28).value();
    index_ = oci::ParseChunkIndex(blob.substr(loc_.offset, loc_.length), loc_, blob.size()).value();
  }

  // How often each chunk's frame left the registry: ranges of the layer
  // the proxy relayed in full. The read of the blob's first bytes that
  // each start makes for the tar header, beside the index
  // (store::kHeadGuessBytes), is not a fetch of the chunk it may hold.
  std::vector<int> FrameFetches() const {
    std::vector<int> n(index_.chunks.size(), 0);
    for (const auto& s : proxy_->seen()) {
      unsigned long long a = 0, b = 0;
      if (s.faulted || s.path.find(layer_.digest.str()) == std::string::npos ||
          std::sscanf(s.range.c_str(), "bytes=%llu-%llu", &a, &b) != 2 || s.body_bytes != b - a + 1) {
        continue;
      }
      if (a == 0 && b + 1 == std::min<uint64_t>(store::kHeadGuessBytes, loc_.offset)) continue;
      for (size_t k = 0; k < index_.chunks.size(); ++k) {
        const auto& c = index_.chunks[k];
        if (c.frame_length > 0 && c.frame_offset >= a && c.frame_offset + c.frame_length - 1 <= b) n[k]++;
      }
    }
    return n;
  }
  // How often chunk k's frame must leave the registry for one fill: once,
  // or never when it lies inside the head read (the disk decodes it from
  // there).
  int OneFetch(size_t k) const {
    const auto& c = index_.chunks[k];
    return c.frame_offset + c.frame_length <= std::min<uint64_t>(store::kHeadGuessBytes, loc_.offset) ? 0 : 1;
  }
  // The running VMIs are those of `pids` (uid -> QEMU pid), with the same
  // QEMUs, and each chunk left the registry once: the VMs and the daemons
  // shared one fetch of it (zero chunks have no frame to fetch).
  void ExpectTheSameVmsAndOneFetchPerChunk(const std::map<std::string, pid_t>& pids) {
    std::vector<json> running = RunningVmis();
    EXPECT_EQ(running.size(), pids.size());
    for (const auto& v : running) {
      const std::string uid = v["metadata"]["uid"];
      EXPECT_EQ(PidOf(root_, uid), pids.count(uid) ? pids.at(uid) : -1) << uid;
    }
    const std::vector<int> fetches = FrameFetches();
    for (size_t k = 0; k < fetches.size(); ++k) {
      if (!index_.chunks[k].zero) {
        EXPECT_EQ(fetches[k], OneFetch(k)) << "chunk " << k;
      }
    }
  }
  std::vector<std::string> NbdkitsUnderRoot() {
    RunResult r = RunProgram({"pgrep", "-f", "nbdkit.*" + (root_ / "lazy").string()});
    std::vector<std::string> out;
    for (std::string_view rest = r.out; !rest.empty();) {
      const size_t eol = rest.find('\n');
      out.emplace_back(rest.substr(0, eol));
      rest = eol == std::string_view::npos ? std::string_view() : rest.substr(eol + 1);
    }
    return out;
  }
  bool Stored() {
    store::Store st = store::Store::OpenForReading(root_);
    // The store records the reference the pull was given: with its transport.
    auto have = st.Lookup("docker://" + image_, oci::Platform{"linux", "amd64", ""});
    return have.ok() && have->has_value();
  }
  bool ConsoleShows(const json& vmi, const std::string& what) {
    auto text = ReadFileCapped(root_ / "logs" / ("default_" + vmi["metadata"]["name"].get<std::string>() + ".log"), 1 << 20);
    return text.ok() && text->find(what) != std::string::npos;
  }
  // Every fill request fails while this holds: a range that starts past
  // the first chunk and before the index (the index, the tar header and
  // the guest's first read start before or after it).
  void StallTheFill() {
    FaultProxy::Rule rule;
    rule.path_contains = layer_.digest.str();
    rule.times = 1 << 30;
    rule.range_from = index_.chunks[1].frame_offset;
    rule.range_below = loc_.offset;
    proxy_->AddRule(rule);
  }

  std::string raw_;
  std::unique_ptr<FaultProxy> proxy_;
  oci::Descriptor layer_;
  oci::ChunkIndexLocation loc_;
  oci::ChunkIndex index_;
};

TEST_F(LazyDaemonTest, ReplicasShareOneExportAndTheFillSurvivesARestart) {
  if (getenv("REGDISK_TEST_DEBUG")) log::SetLevel(log::Level::kInfo);
  StallTheFill();
  StartNode(/*lazy=*/true);
  CreateReplicaSet("web", 2);
  ASSERT_TRUE(Eventually([&] { return RunningVmis().size() == 2; })) << json(Vmis()).dump(2);
  // Both guests read sector 1 through the export, verified.
  for (const auto& v : RunningVmis()) {
    EXPECT_TRUE(Eventually([&] { return ConsoleShows(v, "sector1: LAZY-DAEMON-SECTOR"); }))
        << v["metadata"]["name"] << ": "
        << ReadFileCapped(root_ / "logs" / ("default_" + v["metadata"]["name"].get<std::string>() + ".log"), 4096)
               .value_or("(no console log)");
  }
  // One export for the two VMs, and the disk is not complete: the fill
  // cannot fetch while the proxy fails it.
  std::vector<std::string> nbdkits = NbdkitsUnderRoot();
  ASSERT_EQ(nbdkits.size(), 1u);
  EXPECT_FALSE(Stored());
  // /metrics: one export, one fill, with chunks still missing.
  const std::string metrics = node_->MetricsText();
  EXPECT_THAT(metrics, HasSubstr("\nregdisk_lazy_exports 1\n"));
  EXPECT_THAT(metrics, HasSubstr("\nregdisk_lazy_fills 1\n"));
  EXPECT_THAT(metrics, Not(HasSubstr("regdisk_lazy_chunks{state=\"missing\"} 0\n")));
  const fs::path lazy_dir = root_ / "lazy" / layer_.digest.hex().substr(0, 24);
  EXPECT_TRUE(fs::exists(lazy_dir / "nbd.sock"));

  // The daemon goes; QEMU and nbdkit stay (a QEMU reading a disk that is
  // not all there needs its export). The next daemon adopts both.
  std::map<std::string, pid_t> pids;
  for (const auto& v : RunningVmis()) pids[v["metadata"]["uid"]] = PidOf(root_, v["metadata"]["uid"]);
  node_.reset();
  for (const auto& [uid, pid] : pids) EXPECT_TRUE(Alive(pid)) << uid;
  EXPECT_EQ(NbdkitsUnderRoot(), nbdkits) << "nbdkit did not outlive the daemon";
  StartNode(/*lazy=*/true);
  proxy_->ClearRules();
  // The fill resumes in the new daemon and commits the disk.
  ASSERT_TRUE(Eventually([&] { return Stored(); })) << json(Vmis()).dump(2);
  EXPECT_EQ(NbdkitsUnderRoot(), nbdkits) << "the export was restarted instead of adopted";
  EXPECT_TRUE(Eventually([&] { return node_->MetricsText().find("\nregdisk_lazy_fills 0\n") != std::string::npos; }))
      << node_->MetricsText();
  ExpectTheSameVmsAndOneFetchPerChunk(pids);
  fs::path stored;
  for (const auto& e : fs::recursive_directory_iterator(root_ / "disks")) {
    if (e.path().filename() == "disk.raw") stored = e.path();
  }
  ASSERT_FALSE(stored.empty());
  RunResult r = RunProgram({"qemu-img", "compare", "-f", "raw", "-F", "raw", P("lazy.raw"), stored.string()});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;

  // A third replica boots from the store; once the set is gone, so are
  // the export and its directory.
  auto rs = store_->Get(kVmirsResource, "default", "web");
  ASSERT_OK(rs);
  (*rs)["spec"]["replicas"] = 3;
  ASSERT_OK(store_->Update(kVmirsResource, *rs));
  ASSERT_TRUE(Eventually([&] { return RunningVmis().size() == 3; })) << json(Vmis()).dump(2);
  ASSERT_OK(store_->Delete(kVmirsResource, "default", "web"));
  // The set's deletion deleted them too (marked while they stop); once more is a no-op, or NotFound once gone.
  for (const auto& v : Vmis()) {
    auto st = store_->Delete(kVmiResource, "default", v["metadata"]["name"].get<std::string>());
    if (!st.ok()) {
      ASSERT_EQ(st.status().code(), Code::kNotFound) << st.status().ToString();
    }
  }
  ASSERT_TRUE(Eventually([&] { return QemusUnderRoot() == 0 && NbdkitsUnderRoot().empty(); }));
  EXPECT_TRUE(Eventually([&] { return !fs::exists(lazy_dir); }));
}

// The fill completes in the daemon that started it, long after the VM's
// start has returned: the commit reports to nothing of that start's (under
// ASan, a use after free if it did), and a VM started afterwards boots from
// the store, not from the export.
TEST_F(LazyDaemonTest, AFillThatCompletesUnderItsOwnDaemonCommitsAndLaterVmsUseTheStore) {
  StallTheFill();  // until the first VM runs from the export
  StartNode(/*lazy=*/true);
  CreateReplicaSet("web", 1);
  ASSERT_TRUE(Eventually([&] { return RunningVmis().size() == 1; })) << json(Vmis()).dump(2);
  proxy_->ClearRules();
  ASSERT_TRUE(Eventually([&] { return Stored(); })) << json(Vmis()).dump(2);
  EXPECT_TRUE(Eventually([&] { return node_->MetricsText().find("\nregdisk_lazy_fills 0\n") != std::string::npos; }));
  auto rs = store_->Get(kVmirsResource, "default", "web");
  ASSERT_OK(rs);
  (*rs)["spec"]["replicas"] = 2;
  ASSERT_OK(store_->Update(kVmirsResource, *rs));
  ASSERT_TRUE(Eventually([&] { return RunningVmis().size() == 2; })) << json(Vmis()).dump(2);
  // The second VM's overlay is backed by the store's disk, not by NBD.
  int over_nbd = 0;
  for (const auto& v : RunningVmis()) {
    const std::string uid = v["metadata"]["uid"];
    auto cmdline = ReadFileCapped("/proc/" + std::to_string(PidOf(root_, uid)) + "/cmdline", 1 << 20);
    ASSERT_OK(cmdline.status());
    over_nbd += cmdline->find("\"driver\":\"nbd\"") != std::string::npos;
  }
  EXPECT_EQ(over_nbd, 1);
}

// A VMI that boots an image `regdisk pull --lazy` is filling reads that
// process's export: the daemon starts no nbdkit and fetches nothing; the
// pull's background regdisk commits the disk, keeps its export up while
// the VM reads it, and goes once the VM is deleted.
TEST_F(LazyDaemonTest, AVmiBootsFromTheExportOfAPullLazy) {
  StallTheFill();
  struct Cleanup {
    fs::path root;
    ~Cleanup() { RunProgram({"pkill", "-9", "-f", "[-]-root " + root.string() + " .*pull --lazy"}); }
  } cleanup{root_};
  RunResult r = RunRegdisk({"--root", root_.string(), "pull", "--lazy", "docker://" + image_});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_THAT(r.err, HasSubstr("is usable now"));
  const std::vector<std::string> nbdkits = NbdkitsUnderRoot();
  ASSERT_EQ(nbdkits.size(), 1u);
  StartNode(/*lazy=*/true);
  CreateReplicaSet("web", 1);
  ASSERT_TRUE(Eventually([&] { return RunningVmis().size() == 1; })) << json(Vmis()).dump(2);
  const json vmi = RunningVmis()[0];
  EXPECT_TRUE(Eventually([&] { return ConsoleShows(vmi, "sector1: LAZY-DAEMON-SECTOR"); }));
  EXPECT_EQ(NbdkitsUnderRoot(), nbdkits) << "the daemon started an export of its own";
  EXPECT_THAT(node_->MetricsText(), HasSubstr("\nregdisk_lazy_exports 0\n"));

  // The pull's owner fills and commits; the VM still reads its export.
  proxy_->ClearRules();
  ASSERT_TRUE(Eventually([&] { return Stored(); }));
  const fs::path lazy_dir = root_ / "lazy" / layer_.digest.hex().substr(0, 24);
  EXPECT_EQ(NbdkitsUnderRoot(), nbdkits);
  EXPECT_TRUE(fs::exists(lazy_dir / "nbd.sock"));
  const std::vector<int> fetches = FrameFetches();
  for (size_t k = 0; k < fetches.size(); ++k) {
    if (!index_.chunks[k].zero) {
      EXPECT_EQ(fetches[k], OneFetch(k)) << "chunk " << k;
    }
  }
  // The daemon goes, the VM stays: its QEMU holds the export up by itself
  // (it inherited the daemon's hold), and the next daemon adopts the VM.
  node_.reset();
  // (An owner with no reader stops its export within 200 ms: a second is
  // ample for a regression to show.)
  std::this_thread::sleep_for(std::chrono::seconds(1));
  EXPECT_EQ(NbdkitsUnderRoot(), nbdkits) << "the owner stopped the export under the VM";
  const fs::path readers = store::LazyReadersLockPath(root_, store::LazyName(layer_.digest));
  {
    // Held shared (by the QEMU), not exclusively (by an owner retiring).
    UniqueFd a = OpenFile(readers, O_RDONLY).value();
    UniqueFd b = OpenFile(readers, O_RDONLY).value();
    EXPECT_EQ(::flock(a.get(), LOCK_SH | LOCK_NB), 0) << "an owner holds the readers' lock";
    EXPECT_NE(::flock(b.get(), LOCK_EX | LOCK_NB), 0) << "nothing holds the export up for the VM";
  }
  StartNode(/*lazy=*/true);
  ASSERT_TRUE(Eventually([&] { return RunningVmis().size() == 1; })) << json(Vmis()).dump(2);
  // The VM goes: its hold goes with its QEMU, and the owner stops the export.
  ASSERT_OK(store_->Delete(kVmirsResource, "default", "web"));
  ASSERT_TRUE(Eventually([&] { return QemusUnderRoot() == 0; }));
  EXPECT_TRUE(Eventually([&] { return NbdkitsUnderRoot().empty() && !fs::exists(lazy_dir); }))
      << "the pull's owner outlived its last reader";
}

// The same through the real `regdisk serve`, killed with SIGKILL mid-fill:
// nothing of the daemon's runs its destructors, yet the QEMUs and the
// export run on, and the next daemon adopts them and finishes the fill.
TEST_F(LazyDaemonTest, AKilledDaemonMidFillLeavesTheVmsAndTheirExportRunningAndTheNextOneFinishesIt) {
  StallTheFill();
  StartServe();
  const std::string rs = ApplyReplicaSet("web", 2);
  ASSERT_TRUE(Eventually([&] { return RunningVmis().size() == 2; })) << json(Vmis()).dump(2);
  for (const auto& v : RunningVmis()) {
    EXPECT_TRUE(Eventually([&] { return ConsoleShows(v, "sector1: LAZY-DAEMON-SECTOR"); })) << v["metadata"]["name"];
  }
  const std::vector<std::string> nbdkits = NbdkitsUnderRoot();
  ASSERT_EQ(nbdkits.size(), 1u);
  RunResult images = RunRegdisk({"--root", root_.string(), "images"});
  EXPECT_THAT(images.out, HasSubstr("filling")) << images.out;

  std::map<std::string, pid_t> pids;
  for (const auto& v : RunningVmis()) pids[v["metadata"]["uid"]] = PidOf(root_, v["metadata"]["uid"]);
  KillServe();
  for (const auto& [uid, pid] : pids) EXPECT_TRUE(Alive(pid)) << uid;
  EXPECT_EQ(NbdkitsUnderRoot(), nbdkits) << "nbdkit did not outlive the killed daemon";

  proxy_->ClearRules();
  StartServe();
  ASSERT_TRUE(Eventually([&] { return Stored(); })) << ServeLog();
  images = RunRegdisk({"--root", root_.string(), "images"});
  EXPECT_THAT(images.out, Not(HasSubstr("filling"))) << images.out;
  EXPECT_EQ(NbdkitsUnderRoot(), nbdkits) << "the export was restarted instead of adopted";
  ExpectTheSameVmsAndOneFetchPerChunk(pids);

  // Deleting the set takes its VMs, then the export and its directory.
  RunResult del = RunRegdisk({"delete", "-f", rs, "--socket", socket()});
  ASSERT_EQ(del.exit_code, 0) << del.err;
  ASSERT_TRUE(Eventually([&] { return QemusUnderRoot() == 0 && NbdkitsUnderRoot().empty(); })) << ServeLog();
  EXPECT_TRUE(Eventually([&] { return !fs::exists(root_ / "lazy" / layer_.digest.hex().substr(0, 24)); }));
}

}  // namespace
}  // namespace regdisk::testing
