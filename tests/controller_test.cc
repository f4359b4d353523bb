// The controllers' reconcile functions (src/controller): one case per rule,
// and a fixed-seed property test that applies the replica set's actions to
// a simulated cluster.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "controller/names.h"
#include "controller/replicaset.h"
#include "controller/types.h"
#include "controller/vm.h"

namespace regdisk::controller {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

// Suffixes from a list, then "b0000"-style ones counting up, so every test
// knows the names it will get.
class ScriptedNames final : public NameSource {
 public:
  explicit ScriptedNames(std::vector<std::string> script = {}) : script_(std::move(script)) {}
  std::string NextSuffix() override {
    ++calls;
    if (next_ < script_.size()) return script_[next_++];
    std::string s = "n" + std::to_string(1000 + counter_++);
    return s;
  }
  int calls = 0;

 private:
  std::vector<std::string> script_;
  size_t next_ = 0;
  int counter_ = 0;
};

ReplicaSetState Rs(int replicas) {
  ReplicaSetState rs;
  rs.name = "web";
  rs.uid = "rs-uid";
  rs.replicas = replicas;
  rs.match_labels = {{"app", "web"}};
  rs.template_.labels = {{"app", "web"}, {"tier", "front"}};
  rs.template_.generation = 1;
  rs.now_seconds = 1000;
  return rs;
}

OwnerReference RsOwner() {
  return OwnerReference{"kubevirt.io/v1", "VirtualMachineInstanceReplicaSet", "web", "rs-uid", true, true};
}

ObservedVmi Vmi(std::string name, VmiPhase phase, int64_t created, std::optional<OwnerReference> owner = RsOwner()) {
  ObservedVmi vmi;
  vmi.name = std::move(name);
  vmi.uid = "uid-" + vmi.name;
  vmi.labels = {{"app", "web"}, {"tier", "front"}};
  vmi.controller_ref = std::move(owner);
  vmi.phase = phase;
  vmi.ready = phase == VmiPhase::kRunning;
  vmi.created = CreationStamp{created, created};
  vmi.template_generation = 1;
  return vmi;
}

template <typename T, typename Actions>
std::vector<T> All(const Actions& actions) {
  std::vector<T> out;
  for (const auto& a : actions) {
    if (const T* t = std::get_if<T>(&a)) out.push_back(*t);
  }
  return out;
}

std::vector<std::string> CreatedNames(const std::vector<ReplicaSetAction>& actions) {
  std::vector<std::string> names;
  for (const auto& c : All<CreateVmi>(actions)) names.push_back(c.name);
  return names;
}

std::vector<std::string> DeletedNames(const std::vector<ReplicaSetAction>& actions) {
  std::vector<std::string> names;
  for (const auto& d : All<DeleteVmi>(actions)) names.push_back(d.name);
  return names;
}

std::optional<ReplicaSetStatus> StatusOf(const std::vector<ReplicaSetAction>& actions) {
  auto updates = All<UpdateReplicaSetStatus>(actions);
  if (updates.empty()) return std::nullopt;
  return updates.back().status;
}

// ---- names ----

TEST(ControllerNames, RandomSuffixUsesKubernetesAlphabetAndIsSeeded) {
  RandomNameSource a(42), b(42), c(43);
  std::string first_a = a.NextSuffix();
  EXPECT_EQ(first_a.size(), kNameSuffixLength);
  for (char ch : first_a) EXPECT_NE(kNameSuffixAlphabet.find(ch), std::string_view::npos) << first_a;
  EXPECT_EQ(first_a, b.NextSuffix());
  EXPECT_NE(first_a, c.NextSuffix());
  for (int i = 0; i < 200; ++i) {
    for (char ch : a.NextSuffix()) EXPECT_EQ(std::string_view("aeiou013").find(ch), std::string_view::npos);
  }
}

TEST(ControllerNames, GeneratedNameFitsADnsLabel) {
  EXPECT_EQ(GeneratedName("web", "b2x7k"), "web-b2x7k");
  std::string long_base(70, 'a');
  std::string name = GeneratedName(long_base, "b2x7k");
  EXPECT_EQ(name.size(), 63u);
  EXPECT_EQ(name.substr(57), "-b2x7k");
}

TEST(ControllerTypes, SelectorMatchingAndString) {
  Labels selector{{"tier", "front"}, {"app", "web"}};
  EXPECT_TRUE(SelectorMatches(selector, {{"app", "web"}, {"tier", "front"}, {"x", "y"}}));
  EXPECT_FALSE(SelectorMatches(selector, {{"app", "web"}}));
  EXPECT_FALSE(SelectorMatches(selector, {{"app", "web"}, {"tier", "back"}}));
  EXPECT_EQ(SelectorString(selector), "app=web,tier=front");
  EXPECT_EQ(SelectorString({}), "");
}

// ---- replica set ----

TEST(ReplicaSetController, ScalesUpFromZeroToThree) {
  ScriptedNames names({"b2x7k", "c4d5f", "g6h7j"});
  auto actions = ReconcileReplicaSet(Rs(3), {}, names);
  auto creates = All<CreateVmi>(actions);
  ASSERT_EQ(creates.size(), 3u);
  EXPECT_THAT(CreatedNames(actions), ElementsAre("web-b2x7k", "web-c4d5f", "web-g6h7j"));
  for (const auto& c : creates) {
    EXPECT_EQ(c.namespace_, "default");
    EXPECT_EQ(c.owner, RsOwner());
    EXPECT_TRUE(c.owner.controller);
    EXPECT_EQ(c.labels, (Labels{{"app", "web"}, {"tier", "front"}}));
    EXPECT_EQ(c.template_.generation, 1);
  }
  auto status = StatusOf(actions);
  ASSERT_TRUE(status);
  EXPECT_EQ(status->replicas, 0);
  EXPECT_EQ(status->label_selector, "app=web");
  // Status is last, so a reader sees the creates first.
  EXPECT_TRUE(std::holds_alternative<UpdateReplicaSetStatus>(actions.back()));
}

TEST(ReplicaSetController, ScalesDownFromFourToOneNewestFirst) {
  std::vector<ObservedVmi> vmis = {Vmi("web-a", VmiPhase::kRunning, 100), Vmi("web-b", VmiPhase::kRunning, 400),
                                   Vmi("web-c", VmiPhase::kRunning, 200), Vmi("web-d", VmiPhase::kRunning, 300)};
  ScriptedNames names;
  auto actions = ReconcileReplicaSet(Rs(1), vmis, names);
  EXPECT_THAT(DeletedNames(actions), ElementsAre("web-b", "web-d", "web-c"));
  for (const auto& d : All<DeleteVmi>(actions)) {
    EXPECT_EQ(d.reason, DeleteReason::kScaleDown);
    EXPECT_EQ(d.uid, "uid-" + d.name);
  }
  EXPECT_THAT(CreatedNames(actions), IsEmpty());
  EXPECT_EQ(names.calls, 0);
}

TEST(ReplicaSetController, ScaleDownPrefersVmisNotYetRunningThenNotReady) {
  ObservedVmi old_pending = Vmi("web-pending", VmiPhase::kPending, 10);
  ObservedVmi scheduled = Vmi("web-scheduled", VmiPhase::kScheduled, 5);
  ObservedVmi unknown = Vmi("web-unknown", VmiPhase::kUnknown, 1);
  ObservedVmi not_ready = Vmi("web-notready", VmiPhase::kRunning, 2);
  not_ready.ready = false;
  ObservedVmi newest_ready = Vmi("web-newest", VmiPhase::kRunning, 500);
  std::vector<ObservedVmi> vmis = {newest_ready, not_ready, unknown, scheduled, old_pending};
  ScriptedNames names;
  for (int keep = 4; keep >= 0; --keep) {
    SCOPED_TRACE(keep);
    auto deleted = DeletedNames(ReconcileReplicaSet(Rs(keep), vmis, names));
    std::vector<std::string> expected = {"web-pending", "web-scheduled", "web-unknown", "web-notready", "web-newest"};
    expected.resize(5 - keep);
    EXPECT_EQ(deleted, expected);
  }
}

TEST(ReplicaSetController, ScaleDownBreaksTiesBySequenceThenName) {
  ObservedVmi a = Vmi("web-a", VmiPhase::kRunning, 100);
  ObservedVmi b = Vmi("web-b", VmiPhase::kRunning, 100);
  ObservedVmi c = Vmi("web-c", VmiPhase::kRunning, 100);
  a.created = {100, 7};  // same second, created after b and c
  b.created = {100, 3};
  c.created = {100, 3};
  ScriptedNames names;
  EXPECT_THAT(DeletedNames(ReconcileReplicaSet(Rs(1), {a, b, c}, names)), ElementsAre("web-a", "web-c"));
}

TEST(ReplicaSetController, ReplacesFailedAndSucceededVmis) {
  for (VmiPhase dead : {VmiPhase::kFailed, VmiPhase::kSucceeded}) {
    SCOPED_TRACE(PhaseName(dead));
    std::vector<ObservedVmi> vmis = {Vmi("web-a", VmiPhase::kRunning, 1), Vmi("web-b", dead, 2),
                                     Vmi("web-c", VmiPhase::kRunning, 3)};
    ScriptedNames names({"x2x2x"});
    auto actions = ReconcileReplicaSet(Rs(3), vmis, names);
    auto deletes = All<DeleteVmi>(actions);
    ASSERT_EQ(deletes.size(), 1u);
    EXPECT_EQ(deletes[0].name, "web-b");
    EXPECT_EQ(deletes[0].reason, DeleteReason::kFinished);
    EXPECT_THAT(CreatedNames(actions), ElementsAre("web-x2x2x"));
    EXPECT_EQ(StatusOf(actions)->replicas, 2);
  }
}

TEST(ReplicaSetController, PausedMakesNoChangesButReportsStatus) {
  ReplicaSetState rs = Rs(3);
  rs.paused = true;
  std::vector<ObservedVmi> vmis = {Vmi("web-a", VmiPhase::kRunning, 1), Vmi("web-b", VmiPhase::kFailed, 2)};
  ScriptedNames names;
  auto actions = ReconcileReplicaSet(rs, vmis, names);
  EXPECT_THAT(CreatedNames(actions), IsEmpty());
  EXPECT_THAT(DeletedNames(actions), IsEmpty());
  auto status = StatusOf(actions);
  ASSERT_TRUE(status);
  EXPECT_EQ(status->replicas, 1);
  EXPECT_EQ(status->ready_replicas, 1);
  ASSERT_EQ(status->conditions.size(), 1u);
  EXPECT_EQ(status->conditions[0], (Condition{"ReplicaPaused", "True", "Paused", "Controller got paused", 1000}));

  // Unpausing removes the condition and scales again.
  rs.paused = false;
  rs.status = *status;
  actions = ReconcileReplicaSet(rs, vmis, names);
  EXPECT_EQ(CreatedNames(actions).size(), 2u);
  EXPECT_THAT(DeletedNames(actions), ElementsAre("web-b"));
  EXPECT_THAT(StatusOf(actions)->conditions, IsEmpty());
}

TEST(ReplicaSetController, AdoptsMatchingOrphans) {
  ObservedVmi orphan = Vmi("stray", VmiPhase::kRunning, 1, std::nullopt);
  ObservedVmi deleting_orphan = Vmi("stray-deleting", VmiPhase::kRunning, 2, std::nullopt);
  deleting_orphan.deletion_requested = true;
  ObservedVmi unmatched_orphan = Vmi("other", VmiPhase::kRunning, 3, std::nullopt);
  unmatched_orphan.labels = {{"app", "db"}};
  ScriptedNames names;
  auto actions = ReconcileReplicaSet(Rs(1), {orphan, deleting_orphan, unmatched_orphan}, names);
  auto adopts = All<AdoptVmi>(actions);
  ASSERT_EQ(adopts.size(), 1u);
  EXPECT_EQ(adopts[0].name, "stray");
  EXPECT_EQ(adopts[0].uid, "uid-stray");
  EXPECT_EQ(adopts[0].owner, RsOwner());
  // The adopted VMI counts: nothing to create, nothing to delete.
  EXPECT_THAT(CreatedNames(actions), IsEmpty());
  EXPECT_THAT(DeletedNames(actions), IsEmpty());
  EXPECT_EQ(StatusOf(actions)->replicas, 1);
  // Adoption comes before everything else.
  EXPECT_TRUE(std::holds_alternative<AdoptVmi>(actions.front()));

  // A replica set being deleted adopts nothing.
  ReplicaSetState deleting = Rs(1);
  deleting.deletion_requested = true;
  EXPECT_THAT(All<AdoptVmi>(ReconcileReplicaSet(deleting, {orphan}, names)), IsEmpty());
}

TEST(ReplicaSetController, IgnoresVmisOfOtherControllers) {
  OwnerReference other_rs = RsOwner();
  other_rs.uid = "an-older-web";  // same name, another object
  OwnerReference other_kind = RsOwner();
  other_kind.kind = "VirtualMachine";
  OwnerReference other_name = RsOwner();
  other_name.name = "api";
  std::vector<ObservedVmi> vmis = {Vmi("x1", VmiPhase::kRunning, 1, other_rs),
                                   Vmi("x2", VmiPhase::kFailed, 2, other_kind),
                                   Vmi("x3", VmiPhase::kRunning, 3, other_name)};
  ScriptedNames names;
  auto down = ReconcileReplicaSet(Rs(0), vmis, names);
  EXPECT_THAT(DeletedNames(down), IsEmpty());
  EXPECT_THAT(All<AdoptVmi>(down), IsEmpty());
  EXPECT_THAT(All<ReleaseVmi>(down), IsEmpty());
  auto up = ReconcileReplicaSet(Rs(2), vmis, names);
  EXPECT_EQ(CreatedNames(up).size(), 2u);
  EXPECT_EQ(StatusOf(up)->replicas, 0);
}

TEST(ReplicaSetController, IgnoresOtherNamespaces) {
  ObservedVmi elsewhere = Vmi("web-a", VmiPhase::kRunning, 1);
  elsewhere.namespace_ = "prod";
  ObservedVmi orphan_elsewhere = Vmi("web-b", VmiPhase::kRunning, 1, std::nullopt);
  orphan_elsewhere.namespace_ = "prod";
  ScriptedNames names({"aaaaa"});
  ObservedVmi taken_elsewhere = Vmi("web-aaaaa", VmiPhase::kRunning, 1);
  taken_elsewhere.namespace_ = "prod";
  auto actions = ReconcileReplicaSet(Rs(1), {elsewhere, orphan_elsewhere, taken_elsewhere}, names);
  EXPECT_THAT(All<AdoptVmi>(actions), IsEmpty());
  EXPECT_THAT(CreatedNames(actions), ElementsAre("web-aaaaa"));  // names are per namespace
}

TEST(ReplicaSetController, TemplateChangeLeavesExistingVmisAlone) {
  ReplicaSetState rs = Rs(2);
  rs.template_.generation = 2;
  rs.template_.spec.cores = 4;
  rs.template_.labels["version"] = "2";
  std::vector<ObservedVmi> vmis = {Vmi("web-a", VmiPhase::kRunning, 1), Vmi("web-b", VmiPhase::kRunning, 2)};
  ScriptedNames names;
  auto actions = ReconcileReplicaSet(rs, vmis, names);
  EXPECT_THAT(CreatedNames(actions), IsEmpty());
  EXPECT_THAT(DeletedNames(actions), IsEmpty());
  EXPECT_THAT(All<ReleaseVmi>(actions), IsEmpty());
  // A new replica uses the new template.
  rs.replicas = 3;
  auto creates = All<CreateVmi>(ReconcileReplicaSet(rs, vmis, names));
  ASSERT_EQ(creates.size(), 1u);
  EXPECT_EQ(creates[0].template_.generation, 2);
  EXPECT_EQ(creates[0].template_.spec.cores, 4);
  EXPECT_EQ(creates[0].labels.at("version"), "2");
}

TEST(ReplicaSetController, BurstLimitsCreatesAndDeletesPerReconcile) {
  ReplicaSetState rs = Rs(25);
  rs.burst = 10;
  ScriptedNames names;
  EXPECT_EQ(CreatedNames(ReconcileReplicaSet(rs, {}, names)).size(), 10u);

  std::vector<ObservedVmi> vmis;
  for (int i = 0; i < 25; ++i) vmis.push_back(Vmi("web-" + std::to_string(100 + i), VmiPhase::kRunning, i));
  rs.replicas = 0;
  auto deleted = DeletedNames(ReconcileReplicaSet(rs, vmis, names));
  ASSERT_EQ(deleted.size(), 10u);
  EXPECT_EQ(deleted.front(), "web-124");  // newest first
  EXPECT_EQ(deleted.back(), "web-115");

  // Finished VMIs are cleaned up under their own limit, as KubeVirt's
  // cleanFinishedVmis does, while replacements are created.
  for (auto& v : vmis) v.phase = VmiPhase::kFailed;
  rs.replicas = 25;
  auto actions = ReconcileReplicaSet(rs, vmis, names);
  EXPECT_EQ(DeletedNames(actions).size(), 10u);
  EXPECT_EQ(CreatedNames(actions).size(), 10u);
  EXPECT_EQ(kDefaultBurstReplicas, 250);
}

TEST(ReplicaSetController, AvoidsNamesAlreadyTaken) {
  std::vector<ObservedVmi> vmis = {Vmi("web-aaaaa", VmiPhase::kRunning, 1)};
  // The first suffix collides with an existing VMI, the third with the
  // second: both are drawn again.
  ScriptedNames names({"aaaaa", "bbbbb", "bbbbb", "ccccc"});
  auto actions = ReconcileReplicaSet(Rs(3), vmis, names);
  EXPECT_THAT(CreatedNames(actions), ElementsAre("web-bbbbb", "web-ccccc"));
  EXPECT_EQ(names.calls, 4);

  // A source that only ever collides: the reconcile gives up after a bounded
  // number of draws and creates nothing, rather than looping.
  class Stuck final : public NameSource {
   public:
    std::string NextSuffix() override {
      ++calls;
      return "aaaaa";
    }
    int calls = 0;
  } stuck;
  auto none = ReconcileReplicaSet(Rs(2), vmis, stuck);
  EXPECT_THAT(CreatedNames(none), IsEmpty());
  EXPECT_GT(stuck.calls, 1);
  EXPECT_LE(stuck.calls, 64);
}

TEST(ReplicaSetController, ReleasesOwnedVmisTheSelectorNoLongerMatches) {
  ObservedVmi relabelled = Vmi("web-a", VmiPhase::kRunning, 1);
  relabelled.labels = {{"app", "debug"}};
  ScriptedNames names({"xxxxx"});
  auto actions = ReconcileReplicaSet(Rs(1), {relabelled}, names);
  auto releases = All<ReleaseVmi>(actions);
  ASSERT_EQ(releases.size(), 1u);
  EXPECT_EQ(releases[0].name, "web-a");
  EXPECT_THAT(DeletedNames(actions), IsEmpty());
  EXPECT_THAT(CreatedNames(actions), ElementsAre("web-xxxxx"));
}

TEST(ReplicaSetController, InvalidSelectorYieldsNoActions) {
  ScriptedNames names;
  ReplicaSetState mismatch = Rs(3);
  mismatch.match_labels = {{"app", "db"}};  // the template's labels do not match
  EXPECT_THAT(ReconcileReplicaSet(mismatch, {Vmi("web-a", VmiPhase::kFailed, 1)}, names), IsEmpty());
  ReplicaSetState empty = Rs(3);
  empty.match_labels.clear();  // would select every VMI of the namespace
  EXPECT_THAT(ReconcileReplicaSet(empty, {Vmi("x", VmiPhase::kRunning, 1, std::nullopt)}, names), IsEmpty());
  EXPECT_EQ(names.calls, 0);
}

TEST(ReplicaSetController, VmisBeingDeletedAreNeitherCountedNorDeletedAgain) {
  ObservedVmi going = Vmi("web-a", VmiPhase::kRunning, 1);
  going.deletion_requested = true;
  ObservedVmi going_failed = Vmi("web-b", VmiPhase::kFailed, 2);
  going_failed.deletion_requested = true;
  ScriptedNames names({"xxxxx"});
  auto actions = ReconcileReplicaSet(Rs(1), {going, going_failed}, names);
  EXPECT_THAT(DeletedNames(actions), IsEmpty());
  EXPECT_THAT(CreatedNames(actions), ElementsAre("web-xxxxx"));
  EXPECT_EQ(StatusOf(actions)->replicas, 0);
  ReplicaSetState zero = Rs(0);
  EXPECT_THAT(DeletedNames(ReconcileReplicaSet(zero, {going}, names)), IsEmpty());
}

TEST(ReplicaSetController, DeletedReplicaSetStopsScaling) {
  ReplicaSetState rs = Rs(3);
  rs.deletion_requested = true;
  ScriptedNames names;
  auto actions = ReconcileReplicaSet(rs, {Vmi("web-a", VmiPhase::kFailed, 1)}, names);
  EXPECT_THAT(CreatedNames(actions), IsEmpty());
  EXPECT_THAT(DeletedNames(actions), IsEmpty());
}

TEST(ReplicaSetController, StatusCountsReadyAndIsOnlyWrittenWhenChanged) {
  ReplicaSetState rs = Rs(3);
  rs.match_labels = {{"tier", "front"}, {"app", "web"}};
  ObservedVmi starting = Vmi("web-c", VmiPhase::kScheduling, 3);
  std::vector<ObservedVmi> vmis = {Vmi("web-a", VmiPhase::kRunning, 1), Vmi("web-b", VmiPhase::kRunning, 2), starting};
  ScriptedNames names;
  auto status = StatusOf(ReconcileReplicaSet(rs, vmis, names));
  ASSERT_TRUE(status);
  EXPECT_EQ(status->replicas, 3);
  EXPECT_EQ(status->ready_replicas, 2);
  EXPECT_EQ(status->label_selector, "app=web,tier=front");
  rs.status = *status;
  EXPECT_THAT(ReconcileReplicaSet(rs, vmis, names), IsEmpty());
}

TEST(ReplicaSetController, ReportsTheLastScaleErrorAsReplicaFailure) {
  ReplicaSetState rs = Rs(2);
  rs.last_scale_error = "creating VMI web-xxxxx: no space left on device";
  ScriptedNames names;
  auto status = StatusOf(ReconcileReplicaSet(rs, {}, names));
  ASSERT_TRUE(status);
  ASSERT_EQ(status->conditions.size(), 1u);
  EXPECT_EQ(status->conditions[0].type, "ReplicaFailure");
  EXPECT_EQ(status->conditions[0].reason, "FailedCreate");
  EXPECT_EQ(status->conditions[0].message, rs.last_scale_error);
  // The condition keeps its transition time while it holds.
  rs.status = *status;
  rs.now_seconds = 2000;
  auto again = ReconcileReplicaSet(rs, {}, names);
  EXPECT_FALSE(StatusOf(again));
  rs.last_scale_error.clear();
  EXPECT_THAT(StatusOf(ReconcileReplicaSet(rs, {}, names))->conditions, IsEmpty());
}

// ---- replica set property: a simulated cluster converges ----

struct SimCluster {
  std::vector<ObservedVmi> vmis;
  int64_t clock = 1000;
  int64_t seq = 0;
  int uids = 0;

  ObservedVmi* Find(const std::string& name) {
    for (auto& v : vmis) {
      if (v.name == name) return &v;
    }
    return nullptr;
  }
};

ObservedVmi RandomVmi(std::mt19937& rng, SimCluster& c, const ReplicaSetState& rs) {
  static const VmiPhase kPhases[] = {VmiPhase::kPending, VmiPhase::kScheduling, VmiPhase::kScheduled,
                                     VmiPhase::kRunning, VmiPhase::kRunning,    VmiPhase::kSucceeded,
                                     VmiPhase::kFailed,  VmiPhase::kUnknown};
  ObservedVmi v;
  v.name = "pre-" + std::to_string(c.uids);
  v.uid = "uid-" + std::to_string(c.uids++);
  v.phase = kPhases[rng() % std::size(kPhases)];
  v.ready = v.phase == VmiPhase::kRunning && rng() % 2 == 0;
  v.created = {static_cast<int64_t>(rng() % 50), c.seq++};
  v.labels = rng() % 5 == 0 ? Labels{{"app", "db"}} : rs.template_.labels;
  switch (rng() % 6) {
    case 0:
      break;  // orphan
    case 1:
      v.controller_ref = OwnerReference{"kubevirt.io/v1", rs.kind, "web", "someone-else", true, true};
      break;
    default:
      v.controller_ref = OwnerRefFor(rs);
  }
  v.deletion_requested = rng() % 8 == 0;
  return v;
}

// Applies the actions as the daemon would: a deletion is first requested,
// and the VMI disappears at the next step; new VMIs start Pending.
void Apply(const std::vector<ReplicaSetAction>& actions, SimCluster& c, const ReplicaSetState& rs) {
  for (const auto& action : actions) {
    if (const auto* create = std::get_if<CreateVmi>(&action)) {
      ASSERT_EQ(c.Find(create->name), nullptr) << "name reused: " << create->name;
      ObservedVmi v;
      v.namespace_ = create->namespace_;
      v.name = create->name;
      v.uid = "uid-" + std::to_string(c.uids++);
      v.labels = create->labels;
      v.controller_ref = create->owner;
      v.created = {c.clock, c.seq++};
      v.template_generation = create->template_.generation;
      c.vmis.push_back(v);
    } else if (const auto* del = std::get_if<DeleteVmi>(&action)) {
      ObservedVmi* v = c.Find(del->name);
      ASSERT_NE(v, nullptr);
      ASSERT_EQ(v->uid, del->uid);
      ASSERT_TRUE(v->controller_ref && *v->controller_ref == OwnerRefFor(rs)) << "deleted a VMI it does not own: "
                                                                              << v->name;
      ASSERT_FALSE(v->deletion_requested) << "deleted twice: " << v->name;
      v->deletion_requested = true;
    } else if (const auto* adopt = std::get_if<AdoptVmi>(&action)) {
      ObservedVmi* v = c.Find(adopt->name);
      ASSERT_NE(v, nullptr);
      ASSERT_FALSE(v->controller_ref.has_value()) << "adopted an owned VMI: " << v->name;
      v->controller_ref = adopt->owner;
    } else if (const auto* release = std::get_if<ReleaseVmi>(&action)) {
      ObservedVmi* v = c.Find(release->name);
      ASSERT_NE(v, nullptr);
      v->controller_ref.reset();
    }
  }
}

int LiveOwned(const SimCluster& c, const ReplicaSetState& rs) {
  return static_cast<int>(std::count_if(c.vmis.begin(), c.vmis.end(), [&](const ObservedVmi& v) {
    return v.controller_ref && *v.controller_ref == OwnerRefFor(rs) && !v.deletion_requested && !IsFinal(v.phase) &&
           SelectorMatches(rs.match_labels, v.labels);
  }));
}

TEST(ReplicaSetController, PropertyConvergesWithinBurstBoundAndDeletesOnlyItsOwn) {
  std::mt19937 rng(20261128);  // fixed: every run checks the same 400 clusters
  for (int iteration = 0; iteration < 400; ++iteration) {
    SCOPED_TRACE("iteration " + std::to_string(iteration));
    ReplicaSetState rs = Rs(static_cast<int>(rng() % 30));
    rs.burst = 1 + static_cast<int>(rng() % 12);
    SimCluster c;
    int initial = static_cast<int>(rng() % 35);
    for (int i = 0; i < initial; ++i) c.vmis.push_back(RandomVmi(rng, c, rs));
    std::set<std::string> foreign;
    for (const auto& v : c.vmis) {
      if (v.controller_ref && !(*v.controller_ref == OwnerRefFor(rs))) foreign.insert(v.uid);
    }

    // What the replica set will count once it has adopted its orphans.
    int claimable = static_cast<int>(std::count_if(c.vmis.begin(), c.vmis.end(), [&](const ObservedVmi& v) {
      bool owned_or_orphan = !v.controller_ref || *v.controller_ref == OwnerRefFor(rs);
      return owned_or_orphan && !v.deletion_requested && !IsFinal(v.phase) &&
             SelectorMatches(rs.match_labels, v.labels);
    }));
    int diff = std::abs(claimable - rs.replicas);
    int bound = (diff + rs.burst - 1) / rs.burst + 1;

    RandomNameSource names(static_cast<uint64_t>(iteration));
    int steps = 0;
    for (; steps <= bound + 5; ++steps) {
      if (LiveOwned(c, rs) == rs.replicas && steps > 0) break;
      // The previous step's deletions complete; some VMIs make progress.
      std::erase_if(c.vmis, [](const ObservedVmi& v) { return v.deletion_requested && v.name.rfind("pre-", 0) != 0; });
      auto actions = ReconcileReplicaSet(rs, c.vmis, names);
      Apply(actions, c, rs);
      if (HasFatalFailure()) return;
      for (auto& v : c.vmis) {
        if (v.phase == VmiPhase::kPending && rng() % 2 == 0) v.phase = VmiPhase::kRunning;
      }
      if (auto status = StatusOf(actions)) rs.status = *status;
      ++c.clock;
    }
    EXPECT_EQ(LiveOwned(c, rs), rs.replicas);
    EXPECT_LE(steps, bound) << "replicas " << rs.replicas << " burst " << rs.burst << " claimable " << claimable;
    for (const auto& v : c.vmis) {
      if (foreign.contains(v.uid)) {
        EXPECT_FALSE(v.controller_ref && *v.controller_ref == OwnerRefFor(rs)) << v.name;
      }
    }
    // Once converged, a further reconcile neither creates nor scales down.
    auto settled = ReconcileReplicaSet(rs, c.vmis, names);
    EXPECT_THAT(CreatedNames(settled), IsEmpty());
    for (const auto& d : All<DeleteVmi>(settled)) EXPECT_EQ(d.reason, DeleteReason::kFinished);
  }
}

// ---- VirtualMachine ----

VmState Vm(RunStrategy strategy) {
  VmState vm;
  vm.name = "db";
  vm.uid = "vm-uid";
  vm.run_strategy = strategy;
  vm.template_.labels = {{"kubevirt.io/vm", "db"}};
  vm.template_.generation = 3;
  vm.status.run_strategy = strategy;  // not a new VM unless a case says so
  vm.has_finalizer = true;             // as the first reconcile left it
  return vm;
}

OwnerReference VmOwner() { return OwnerReference{"kubevirt.io/v1", "VirtualMachine", "db", "vm-uid", true, true}; }

ObservedVmi VmVmi(VmiPhase phase) {
  ObservedVmi vmi = Vmi("db", phase, 1, VmOwner());
  vmi.uid = "vmi-1";
  return vmi;
}

// A compact summary of the actions, for tables.
std::string Summary(const std::vector<VmAction>& actions) {
  std::string out;
  auto add = [&](std::string s) {
    if (!out.empty()) out += ' ';
    out += s;
  };
  for (const auto& a : actions) {
    if (std::holds_alternative<CreateVmi>(a)) add("create");
    if (const auto* d = std::get_if<DeleteVmi>(&a)) add("delete:" + std::string(DeleteReasonName(d->reason)));
    if (std::holds_alternative<AdoptVmi>(a)) add("adopt");
    if (std::holds_alternative<AddStateChangeRequest>(a)) add("request-start");
    if (std::holds_alternative<RemoveFirstStateChangeRequest>(a)) add("request-done");
    if (const auto* s = std::get_if<SetRunStrategy>(&a)) add("set:" + std::string(RunStrategyName(s->run_strategy)));
  }
  return out;
}

VmStatus VmStatusOf(const VmState& vm, const std::vector<VmAction>& actions) {
  for (const auto& a : actions) {
    if (const auto* u = std::get_if<UpdateVmStatus>(&a)) return u->status;
  }
  return vm.status;
}

struct VmCase {
  const char* what;
  RunStrategy strategy;
  std::optional<VmiPhase> phase;  // nullopt: no VMI
  const char* request;            // "", "start", "stop" (stop names the VMI), "stop-old"
  bool new_vm;                    // status.runStrategy not yet written
  bool vmi_deleting;
  const char* actions;
  const char* printable;
};

// gtest prints the case's name, not its bytes.
void PrintTo(const VmCase& c, std::ostream* os) { *os << c.what; }

class VmRunStrategy : public ::testing::TestWithParam<VmCase> {};

TEST_P(VmRunStrategy, Reconciles) {
  const VmCase& c = GetParam();
  VmState vm = Vm(c.strategy);
  if (c.new_vm) vm.status.run_strategy.reset();
  std::string request = c.request;
  if (request == "start") vm.state_change_requests.push_back({StateChangeRequest::Action::kStart, ""});
  if (request == "stop") vm.state_change_requests.push_back({StateChangeRequest::Action::kStop, "vmi-1"});
  if (request == "stop-old") vm.state_change_requests.push_back({StateChangeRequest::Action::kStop, "vmi-0"});
  std::optional<ObservedVmi> vmi;
  if (c.phase) {
    vmi = VmVmi(*c.phase);
    vmi->deletion_requested = c.vmi_deleting;
  }
  auto actions = ReconcileVm(vm, vmi);
  EXPECT_EQ(Summary(actions), c.actions);
  VmStatus status = VmStatusOf(vm, actions);
  EXPECT_EQ(status.printable_status, c.printable);
  EXPECT_EQ(status.created, c.phase.has_value());
  EXPECT_EQ(status.run_strategy, c.strategy);
}

using P = VmiPhase;
constexpr auto kNone = std::nullopt;
INSTANTIATE_TEST_SUITE_P(
    Table, VmRunStrategy,
    ::testing::Values(
        // Always: keep one running; recreate after it stops or fails.
        VmCase{"always-none", RunStrategy::kAlways, kNone, "", false, false, "create", "Starting"},
        VmCase{"always-pending", RunStrategy::kAlways, P::kPending, "", false, false, "", "Starting"},
        VmCase{"always-scheduled", RunStrategy::kAlways, P::kScheduled, "", false, false, "", "Starting"},
        VmCase{"always-running", RunStrategy::kAlways, P::kRunning, "", false, false, "", "Running"},
        VmCase{"always-failed", RunStrategy::kAlways, P::kFailed, "", false, false, "delete:Restart", "Stopped"},
        VmCase{"always-succeeded", RunStrategy::kAlways, P::kSucceeded, "", false, false, "delete:Restart",
               "Stopped"},
        VmCase{"always-restart", RunStrategy::kAlways, P::kRunning, "stop", false, false, "delete:Restart",
               "Stopping"},
        VmCase{"always-deleting", RunStrategy::kAlways, P::kRunning, "", false, true, "", "Stopping"},
        VmCase{"always-failed-deleting", RunStrategy::kAlways, P::kFailed, "", false, true, "", "Stopped"},
        VmCase{"always-restart-done", RunStrategy::kAlways, kNone, "stop", false, false, "create request-done",
               "Starting"},
        VmCase{"always-start-done", RunStrategy::kAlways, P::kRunning, "start", false, false, "request-done",
               "Running"},
        VmCase{"always-unknown", RunStrategy::kAlways, P::kUnknown, "", false, false, "", "Unknown"},
        // RerunOnFailure: recreate only after Failed.
        VmCase{"rerun-new", RunStrategy::kRerunOnFailure, kNone, "", true, false, "create", "Starting"},
        VmCase{"rerun-none", RunStrategy::kRerunOnFailure, kNone, "", false, false, "", "Stopped"},
        VmCase{"rerun-none-start", RunStrategy::kRerunOnFailure, kNone, "start", false, false, "create", "Starting"},
        VmCase{"rerun-running", RunStrategy::kRerunOnFailure, P::kRunning, "", false, false, "", "Running"},
        VmCase{"rerun-failed", RunStrategy::kRerunOnFailure, P::kFailed, "", false, false,
               "delete:Restart request-start", "Stopped"},
        VmCase{"rerun-succeeded", RunStrategy::kRerunOnFailure, P::kSucceeded, "", false, false, "delete:Stopped",
               "Stopped"},
        VmCase{"rerun-stop", RunStrategy::kRerunOnFailure, P::kRunning, "stop", false, false, "delete:Stopped",
               "Stopping"},
        VmCase{"rerun-failed-deleting", RunStrategy::kRerunOnFailure, P::kFailed, "", false, true, "", "Stopped"},
        // Once: run once; not again after Succeeded or Failed.
        VmCase{"once-none", RunStrategy::kOnce, kNone, "", false, false, "create", "Starting"},
        VmCase{"once-running", RunStrategy::kOnce, P::kRunning, "", false, false, "", "Running"},
        VmCase{"once-succeeded", RunStrategy::kOnce, P::kSucceeded, "", false, false, "", "Stopped"},
        VmCase{"once-failed", RunStrategy::kOnce, P::kFailed, "", false, false, "", "Stopped"},
        // Manual: only start and stop requests act.
        VmCase{"manual-none", RunStrategy::kManual, kNone, "", false, false, "", "Stopped"},
        VmCase{"manual-start", RunStrategy::kManual, kNone, "start", false, false, "create", "Starting"},
        VmCase{"manual-started", RunStrategy::kManual, P::kScheduling, "start", false, false, "request-done",
               "Starting"},
        VmCase{"manual-running", RunStrategy::kManual, P::kRunning, "", false, false, "", "Running"},
        VmCase{"manual-failed", RunStrategy::kManual, P::kFailed, "", false, false, "", "Stopped"},
        VmCase{"manual-stop", RunStrategy::kManual, P::kRunning, "stop", false, false, "delete:Stopped", "Stopping"},
        VmCase{"manual-stop-old", RunStrategy::kManual, P::kRunning, "stop-old", false, false, "request-done",
               "Running"},
        VmCase{"manual-stop-done", RunStrategy::kManual, kNone, "stop", false, false, "request-done", "Stopped"},
        // Halted: stop it; a start request turns the VM into Always.
        VmCase{"halted-none", RunStrategy::kHalted, kNone, "", false, false, "", "Stopped"},
        VmCase{"halted-running", RunStrategy::kHalted, P::kRunning, "", false, false, "delete:Stopped", "Stopping"},
        VmCase{"halted-failed", RunStrategy::kHalted, P::kFailed, "", false, false, "delete:Stopped", "Stopped"},
        VmCase{"halted-deleting", RunStrategy::kHalted, P::kRunning, "", false, true, "", "Stopping"},
        VmCase{"halted-start", RunStrategy::kHalted, kNone, "start", false, false, "set:Always", "Stopped"}),
    [](const ::testing::TestParamInfo<VmCase>& case_info) {
      std::string name = case_info.param.what;
      std::replace(name.begin(), name.end(), '-', '_');
      return name;
    });

TEST(VmController, RunningMapsToAlwaysAndHalted) {
  EXPECT_EQ(*EffectiveRunStrategy(true, ""), RunStrategy::kAlways);
  EXPECT_EQ(*EffectiveRunStrategy(false, ""), RunStrategy::kHalted);
  EXPECT_EQ(*EffectiveRunStrategy(std::nullopt, ""), RunStrategy::kHalted);
  EXPECT_EQ(*EffectiveRunStrategy(std::nullopt, "RerunOnFailure"), RunStrategy::kRerunOnFailure);
  EXPECT_EQ(*EffectiveRunStrategy(std::nullopt, "Once"), RunStrategy::kOnce);
  auto both = EffectiveRunStrategy(true, "Always");
  ASSERT_FALSE(both.ok());
  EXPECT_THAT(both.status().message(), ::testing::HasSubstr("keep only spec.runStrategy"));
  auto unknown = EffectiveRunStrategy(std::nullopt, "Sometimes");
  ASSERT_FALSE(unknown.ok());
  EXPECT_THAT(unknown.status().message(), ::testing::HasSubstr("\"Sometimes\" is unknown"));
  for (auto s : {RunStrategy::kAlways, RunStrategy::kRerunOnFailure, RunStrategy::kManual, RunStrategy::kHalted,
                 RunStrategy::kOnce}) {
    EXPECT_EQ(ParseRunStrategy(RunStrategyName(s)), s);
  }
}

TEST(VmController, TheFinalizerIsAddedAndRemovedOnceTheVmisGone) {
  // A VM without KubeVirt's finalizer gets it, first.
  VmState vm = Vm(RunStrategy::kAlways);
  vm.has_finalizer = false;
  auto actions = ReconcileVm(vm, VmVmi(VmiPhase::kRunning));
  ASSERT_FALSE(actions.empty());
  EXPECT_TRUE(std::holds_alternative<AddVmFinalizer>(actions.front()));
  vm.has_finalizer = true;
  EXPECT_TRUE(All<AddVmFinalizer>(ReconcileVm(vm, VmVmi(VmiPhase::kRunning))).empty());
  // Being deleted: the VMI is stopped; the finalizer stays while it exists.
  vm.deletion_requested = true;
  actions = ReconcileVm(vm, VmVmi(VmiPhase::kRunning));
  EXPECT_EQ(Summary(actions), "delete:OwnerDeleted");
  EXPECT_TRUE(All<RemoveVmFinalizer>(actions).empty());
  EXPECT_TRUE(All<AddVmFinalizer>(actions).empty());
  ObservedVmi stopping = VmVmi(VmiPhase::kRunning);
  stopping.deletion_requested = true;
  EXPECT_TRUE(All<RemoveVmFinalizer>(ReconcileVm(vm, stopping)).empty());
  // Gone: the finalizer comes off, last.
  actions = ReconcileVm(vm, std::nullopt);
  ASSERT_FALSE(actions.empty());
  EXPECT_TRUE(std::holds_alternative<RemoveVmFinalizer>(actions.back()));
  // A VMI of its name that it does not own (orphaned by a delete with
  // propagationPolicy Orphan) is neither adopted nor stopped, and does not
  // hold the VM.
  ObservedVmi orphan = VmVmi(VmiPhase::kRunning);
  orphan.controller_ref.reset();
  actions = ReconcileVm(vm, orphan);
  EXPECT_EQ(Summary(actions), "");
  EXPECT_EQ(All<RemoveVmFinalizer>(actions).size(), 1u);
  // Nor does one another controller owns.
  ObservedVmi foreign = VmVmi(VmiPhase::kRunning);
  foreign.controller_ref->uid = "someone-else";
  EXPECT_EQ(All<RemoveVmFinalizer>(ReconcileVm(vm, foreign)).size(), 1u);
}

TEST(VmController, CreatesTheVmiFromTheTemplateUnderTheVmsName) {
  auto actions = ReconcileVm(Vm(RunStrategy::kAlways), std::nullopt);
  auto creates = All<CreateVmi>(actions);
  ASSERT_EQ(creates.size(), 1u);
  EXPECT_EQ(creates[0].name, "db");
  EXPECT_EQ(creates[0].owner, VmOwner());
  EXPECT_EQ(creates[0].labels.at("kubevirt.io/vm"), "db");
  EXPECT_EQ(creates[0].template_.generation, 3);
}

TEST(VmController, ReadyAndCreated) {
  VmState vm = Vm(RunStrategy::kAlways);
  ObservedVmi vmi = VmVmi(VmiPhase::kRunning);
  VmStatus status = VmStatusOf(vm, ReconcileVm(vm, vmi));
  EXPECT_TRUE(status.created);
  EXPECT_TRUE(status.ready);
  vmi.ready = false;
  EXPECT_FALSE(VmStatusOf(vm, ReconcileVm(vm, vmi)).ready);
  vmi = VmVmi(VmiPhase::kRunning);
  vmi.paused = true;
  EXPECT_EQ(VmStatusOf(vm, ReconcileVm(vm, vmi)).printable_status, "Paused");
  // Status is written only when it changes.
  vm.status = VmStatusOf(vm, ReconcileVm(vm, vmi));
  EXPECT_THAT(ReconcileVm(vm, vmi), IsEmpty());
}

TEST(VmController, DeletedVmStopsItsVmi) {
  VmState vm = Vm(RunStrategy::kAlways);
  vm.deletion_requested = true;
  auto actions = ReconcileVm(vm, VmVmi(VmiPhase::kRunning));
  EXPECT_EQ(Summary(actions), "delete:OwnerDeleted");
  EXPECT_EQ(VmStatusOf(vm, actions).printable_status, "Terminating");
  EXPECT_EQ(Summary(ReconcileVm(vm, std::nullopt)), "");
}

TEST(VmController, AdoptsAnOrphanOfItsNameAndLeavesOthersVmisAlone) {
  VmState vm = Vm(RunStrategy::kAlways);
  ObservedVmi orphan = VmVmi(VmiPhase::kRunning);
  orphan.controller_ref.reset();
  EXPECT_EQ(Summary(ReconcileVm(vm, orphan)), "adopt");

  ObservedVmi foreign = VmVmi(VmiPhase::kFailed);
  foreign.controller_ref = RsOwner();
  auto actions = ReconcileVm(vm, foreign);
  EXPECT_EQ(Summary(actions), "");
  EXPECT_EQ(VmStatusOf(vm, actions).printable_status, "Unknown");
}

// Applies a VM's actions to a one-VMI world, to follow a strategy over time.
struct VmWorld {
  VmState vm;
  std::optional<ObservedVmi> vmi;
  int uids = 1;
  std::string Step() {
    auto actions = ReconcileVm(vm, vmi);
    for (const auto& a : actions) {
      if (std::holds_alternative<CreateVmi>(a)) {
        EXPECT_FALSE(vmi.has_value());
        vmi = VmVmi(VmiPhase::kPending);
        vmi->uid = "vmi-" + std::to_string(uids++);
      } else if (std::holds_alternative<DeleteVmi>(a)) {
        vmi->deletion_requested = true;
      } else if (const auto* r = std::get_if<AddStateChangeRequest>(&a)) {
        vm.state_change_requests.push_back(r->request);
      } else if (std::holds_alternative<RemoveFirstStateChangeRequest>(a)) {
        vm.state_change_requests.erase(vm.state_change_requests.begin());
      } else if (const auto* s = std::get_if<SetRunStrategy>(&a)) {
        vm.run_strategy = s->run_strategy;
      } else if (const auto* u = std::get_if<UpdateVmStatus>(&a)) {
        vm.status = u->status;
      }
    }
    return Summary(actions) + " => " + vm.status.printable_status;
  }
  void Gone() { vmi.reset(); }
};

TEST(VmController, RerunOnFailureRestartsAfterFailureOnly) {
  VmWorld w{Vm(RunStrategy::kRerunOnFailure)};
  w.vm.status.run_strategy.reset();  // a new VM
  EXPECT_EQ(w.Step(), "create => Starting");
  w.vmi->phase = VmiPhase::kRunning;
  EXPECT_EQ(w.Step(), " => Running");
  w.vmi->phase = VmiPhase::kFailed;
  EXPECT_EQ(w.Step(), "delete:Restart request-start => Stopped");
  w.Gone();
  EXPECT_EQ(w.Step(), "create => Starting");
  EXPECT_EQ(w.Step(), "request-done => Starting");
  w.vmi->phase = VmiPhase::kSucceeded;
  EXPECT_EQ(w.Step(), "delete:Stopped => Stopped");
  w.Gone();
  EXPECT_EQ(w.Step(), " => Stopped");
  EXPECT_EQ(w.Step(), " => Stopped");
}

TEST(VmController, AlwaysRecreatesAndHaltedStartRequestSwitchesToAlways) {
  VmWorld w{Vm(RunStrategy::kHalted)};
  w.vm.status.printable_status = "Stopped";
  w.vm.state_change_requests.push_back({StateChangeRequest::Action::kStart, ""});
  EXPECT_EQ(w.Step(), "set:Always => Stopped");
  EXPECT_EQ(w.Step(), "create => Starting");
  EXPECT_EQ(w.Step(), "request-done => Starting");
  w.vmi->phase = VmiPhase::kRunning;
  EXPECT_EQ(w.Step(), " => Running");
  w.vmi->phase = VmiPhase::kSucceeded;  // the guest powered off
  EXPECT_EQ(w.Step(), "delete:Restart => Stopped");
  w.Gone();
  EXPECT_EQ(w.Step(), "create => Starting");
  // spec.running: false (Halted) stops it.
  w.vm.run_strategy = RunStrategy::kHalted;
  EXPECT_EQ(w.Step(), "delete:Stopped => Stopping");
  EXPECT_EQ(w.Step(), " => Stopping");
  w.Gone();
  EXPECT_EQ(w.Step(), " => Stopped");
}

TEST(VmController, ManualStartAndStopRequests) {
  VmWorld w{Vm(RunStrategy::kManual)};
  EXPECT_EQ(w.Step(), " => Stopped");
  w.vm.state_change_requests.push_back({StateChangeRequest::Action::kStart, ""});
  EXPECT_EQ(w.Step(), "create => Starting");
  w.vmi->phase = VmiPhase::kRunning;
  EXPECT_EQ(w.Step(), "request-done => Running");
  w.vmi->phase = VmiPhase::kFailed;
  EXPECT_EQ(w.Step(), " => Stopped");  // Manual never restarts on its own
  w.vmi->phase = VmiPhase::kRunning;
  w.vm.state_change_requests.push_back({StateChangeRequest::Action::kStop, w.vmi->uid});
  EXPECT_EQ(w.Step(), "delete:Stopped => Stopping");
  w.Gone();
  EXPECT_EQ(w.Step(), "request-done => Stopped");
  EXPECT_EQ(w.Step(), " => Stopped");
}

TEST(VmController, OnceRunsOnce) {
  VmWorld w{Vm(RunStrategy::kOnce)};
  EXPECT_EQ(w.Step(), "create => Starting");
  w.vmi->phase = VmiPhase::kRunning;
  EXPECT_EQ(w.Step(), " => Running");
  w.vmi->phase = VmiPhase::kFailed;
  EXPECT_EQ(w.Step(), " => Stopped");
  EXPECT_EQ(w.Step(), " => Stopped");
}

}  // namespace
}  // namespace regdisk::controller
