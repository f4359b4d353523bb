// The node daemon's object store (src/state): objects, errors,
// resourceVersion and generation rules, selectors, watches, concurrency,
// schema migrations, descriptors and a kill -9 loop.
#include "state/object_store.h"

#include <fcntl.h>
#include <poll.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <iostream>
#include <map>
#include <regex>
#include <set>
#include <thread>

#include "harness/harness.h"
#include "state/selector.h"
#include "state/sqlite.h"

namespace regdisk::state {
namespace {

using ::testing::HasSubstr;

constexpr char kVmis[] = "kubevirt.io/v1/virtualmachineinstances";
constexpr char kSecrets[] = "v1/secrets";
constexpr int64_t kClock = 1700000000;  // 2023-11-14T22:13:20Z

json Obj(const std::string& name, const std::string& ns = "default", json labels = json::object(),
         json spec = json{{"cpu", 1}}) {
  json o = {{"apiVersion", "kubevirt.io/v1"},
            {"kind", "VirtualMachineInstance"},
            {"metadata", {{"name", name}, {"namespace", ns}}},
            {"spec", std::move(spec)}};
  if (!labels.empty()) o["metadata"]["labels"] = std::move(labels);
  return o;
}

int64_t Rv(const json& o) { return std::stoll(o["metadata"]["resourceVersion"].get<std::string>()); }

class StateTest : public testing::TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    Reopen();
  }
  ObjectStore::Options Opts() {
    ObjectStore::Options o = options_;
    o.now = [this] { return clock_.load(); };
    return o;
  }
  void Reopen() {
    store_.reset();
    auto s = ObjectStore::Open(db_path(), Opts());
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    store_ = std::move(s).value();
  }
  std::filesystem::path db_path() const { return tmp() / "state.db"; }
  json MustCreate(std::string_view resource, json o) {
    auto r = store_->Create(resource, std::move(o));
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? r.value() : json();
  }

  ObjectStore::Options options_;
  std::atomic<int64_t> clock_{kClock};
  std::unique_ptr<ObjectStore> store_;
};

TEST_F(StateTest, CreateFillsSystemFields) {
  json in = Obj("web-1");
  in["metadata"]["uid"] = "caller-chosen";
  in["metadata"]["generation"] = 7;
  json out = MustCreate(kVmis, in);
  const json& md = out["metadata"];
  EXPECT_TRUE(std::regex_match(md["uid"].get<std::string>(),
                               std::regex("[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")))
      << md["uid"];
  EXPECT_EQ(md["resourceVersion"], "1");
  EXPECT_EQ(md["generation"], 1);
  EXPECT_EQ(md["creationTimestamp"], "2023-11-14T22:13:20Z");
  EXPECT_EQ(out["spec"], in["spec"]);
  auto got = store_->Get(kVmis, "default", "web-1");
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got.value(), out);
  // Another object gets another uid.
  json other = MustCreate(kVmis, Obj("web-2"));
  EXPECT_NE(other["metadata"]["uid"], md["uid"]);
  EXPECT_EQ(FormatTimestamp(0), "1970-01-01T00:00:00Z");
}

TEST_F(StateTest, ErrorCodes) {
  MustCreate(kVmis, Obj("web"));
  struct Case {
    const char* what;
    Status st;
    Code code;
    const char* message;
  };
  json with_rv = Obj("new");
  with_rv["metadata"]["resourceVersion"] = "5";
  json bad_label = Obj("x", "default", {{"app", 3}});
  json bad_key = Obj("x", "default", {{"-app", "web"}});
  json no_meta = {{"spec", {}}};
  Case cases[] = {
      {"create twice", store_->Create(kVmis, Obj("web")).status(), Code::kAlreadyExists, "already exists"},
      {"same name, other namespace is fine", store_->Create(kVmis, Obj("web", "other")).status(), Code::kOk, ""},
      {"same name, other resource is fine", store_->Create(kSecrets, Obj("web")).status(), Code::kOk, ""},
      {"no metadata", store_->Create(kVmis, no_meta).status(), Code::kInvalidArgument, "metadata"},
      {"no name", store_->Create(kVmis, Obj("")).status(), Code::kInvalidArgument, "metadata.name is required"},
      {"bad name", store_->Create(kVmis, Obj("Web_1")).status(), Code::kInvalidArgument, "\"Web_1\" is invalid"},
      {"bad namespace", store_->Create(kVmis, Obj("a", "a.b")).status(), Code::kInvalidArgument, "namespace"},
      {"not an object", store_->Create(kVmis, json::array()).status(), Code::kInvalidArgument, "JSON object"},
      {"rv on create", store_->Create(kVmis, with_rv).status(), Code::kInvalidArgument, "must not be set"},
      {"label not a string", store_->Create(kVmis, bad_label).status(), Code::kInvalidArgument, "must be a string"},
      {"bad label key", store_->Create(kVmis, bad_key).status(), Code::kInvalidArgument, "label key \"-app\""},
      {"get missing", store_->Get(kVmis, "default", "nope").status(), Code::kNotFound, "not found"},
      {"get other namespace", store_->Get(kVmis, "kube-system", "web").status(), Code::kNotFound, "not found"},
      {"update missing", store_->Update(kVmis, Obj("nope")).status(), Code::kNotFound, "not found"},
      {"status of missing", store_->UpdateStatus(kVmis, Obj("nope")).status(), Code::kNotFound, "not found"},
      {"delete missing", store_->Delete(kVmis, "default", "nope").status(), Code::kNotFound, "not found"},
      {"bad selector", store_->List(kVmis, "default", {.label_selector = "a b"}).status(), Code::kInvalidArgument,
       "label selector"},
      {"bad field", store_->List(kVmis, "default", {.field_selector = "spec.x=1"}).status(),
       Code::kInvalidArgument, "not supported"},
      {"bad rv", ParseResourceVersion("abc").status(), Code::kInvalidArgument, "\"abc\" is invalid"},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(c.st.code(), c.code) << c.what << ": " << c.st.ToString();
    EXPECT_THAT(c.st.message(), HasSubstr(c.message)) << c.what;
  }
  // Nothing failed left a trace: 3 objects, 3 writes.
  EXPECT_EQ(store_->CurrentResourceVersion().value(), 3);
}

TEST_F(StateTest, OptimisticConcurrency) {
  json v1 = MustCreate(kVmis, Obj("web"));
  json edit = v1;
  edit["spec"]["cpu"] = 2;
  auto v2 = store_->Update(kVmis, edit);
  ASSERT_TRUE(v2.ok()) << v2.status().ToString();
  EXPECT_EQ(Rv(v2.value()), Rv(v1) + 1);
  // The same stale copy again: Conflict.
  edit["spec"]["cpu"] = 3;
  auto stale = store_->Update(kVmis, edit);
  EXPECT_EQ(stale.status().code(), Code::kAborted);
  EXPECT_THAT(stale.status().message(), HasSubstr("Conflict"));
  EXPECT_THAT(stale.status().message(), HasSubstr("resourceVersion 1 given, 2 stored"));
  auto stale_status = store_->UpdateStatus(kVmis, edit);
  EXPECT_EQ(stale_status.status().code(), Code::kAborted);
  // Without a resourceVersion the update is unconditional.
  edit["metadata"].erase("resourceVersion");
  auto v3 = store_->Update(kVmis, edit);
  ASSERT_TRUE(v3.ok()) << v3.status().ToString();
  EXPECT_EQ(v3.value()["spec"]["cpu"], 3);
  // A uid that is not the stored one (deleted and created again): Conflict.
  edit["metadata"]["uid"] = "00000000-0000-4000-8000-000000000000";
  EXPECT_EQ(store_->Update(kVmis, edit).status().code(), Code::kAborted);
  // Delete preconditions.
  const std::string uid = v3.value()["metadata"]["uid"];
  EXPECT_EQ(store_->Delete(kVmis, "default", "web", {.uid = "other"}).status().code(), Code::kAborted);
  EXPECT_EQ(store_->Delete(kVmis, "default", "web", {.resource_version = 1}).status().code(), Code::kAborted);
  auto gone = store_->Delete(kVmis, "default", "web", {.uid = uid, .resource_version = Rv(v3.value())});
  ASSERT_TRUE(gone.ok()) << gone.status().ToString();
  EXPECT_EQ(Rv(gone.value()), Rv(v3.value()) + 1);  // the delete's own version
  EXPECT_EQ(store_->Get(kVmis, "default", "web").status().code(), Code::kNotFound);
  EXPECT_EQ(store_->CurrentResourceVersion().value(), Rv(gone.value()));
}

TEST_F(StateTest, GenerationAndStatusRules) {
  json v = MustCreate(kVmis, Obj("web"));
  auto update = [&](json o) {
    auto r = store_->Update(kVmis, std::move(o));
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? r.value() : json();
  };
  json spec = v;
  spec["spec"]["cpu"] = 4;
  v = update(spec);
  EXPECT_EQ(v["metadata"]["generation"], 2);
  // Labels (metadata) change: new resourceVersion, same generation.
  json meta = v;
  meta["metadata"]["labels"] = {{"app", "web"}};
  json v3 = update(meta);
  EXPECT_EQ(v3["metadata"]["generation"], 2);
  EXPECT_EQ(Rv(v3), Rv(v) + 1);
  // Status through Update is ignored (the stored status is kept).
  json with_status = v3;
  with_status["status"] = {{"phase", "Running"}};
  json v4 = update(with_status);
  EXPECT_FALSE(v4.contains("status"));
  EXPECT_EQ(Rv(v4), Rv(v3));  // nothing changed: no write
  // UpdateStatus changes only .status: spec and labels given with it are ignored.
  json st = v4;
  st["status"] = {{"phase", "Running"}};
  st["spec"]["cpu"] = 99;
  st["metadata"]["labels"] = {{"app", "other"}};
  auto v5 = store_->UpdateStatus(kVmis, st);
  ASSERT_TRUE(v5.ok()) << v5.status().ToString();
  EXPECT_EQ(v5.value()["status"]["phase"], "Running");
  EXPECT_EQ(v5.value()["spec"]["cpu"], 4);
  EXPECT_EQ(v5.value()["metadata"]["labels"]["app"], "web");
  EXPECT_EQ(v5.value()["metadata"]["generation"], 2);
  EXPECT_EQ(Rv(v5.value()), Rv(v4) + 1);
  // A later spec update keeps that status, and uid and creationTimestamp survive.
  json again = v5.value();
  again.erase("status");
  again["spec"]["cpu"] = 5;
  again["metadata"]["creationTimestamp"] = "1999-01-01T00:00:00Z";
  clock_ += 100;
  json v6 = update(again);
  EXPECT_EQ(v6["status"]["phase"], "Running");
  EXPECT_EQ(v6["metadata"]["generation"], 3);
  EXPECT_EQ(v6["metadata"]["creationTimestamp"], "2023-11-14T22:13:20Z");
  EXPECT_EQ(v6["metadata"]["uid"], v["metadata"]["uid"]);
}

TEST_F(StateTest, ResourceVersionIsOneCounterAcrossKinds) {
  int64_t last = 0;
  auto check = [&](const Result<json>& r) {
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(Rv(r.value()), last + 1);
    last = Rv(r.value());
  };
  check(store_->Create(kVmis, Obj("a")));
  check(store_->Create(kSecrets, Obj("a")));
  check(store_->Create(kVmis, Obj("b", "other")));
  json b = store_->Get(kVmis, "other", "b").value();
  b["spec"]["cpu"] = 8;
  check(store_->Update(kVmis, b));
  check(store_->Delete(kSecrets, "default", "a"));
  check(store_->Create(kSecrets, Obj("a")));
  auto list = store_->List(kVmis, "", {}, /*all_namespaces=*/true);
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(list->resource_version, last);
  // The counter survives a reopen and never goes back.
  Reopen();
  check(store_->Create(kVmis, Obj("c")));
}

TEST_F(StateTest, ListNamespacesAndSelectors) {
  MustCreate(kVmis, Obj("web-1", "default", {{"app", "web"}, {"tier", "front"}}));
  MustCreate(kVmis, Obj("web-2", "default", {{"app", "web"}, {"tier", "back"}, {"canary", "true"}}));
  MustCreate(kVmis, Obj("db-1", "default", {{"app", "db"}}));
  MustCreate(kVmis, Obj("web-1", "prod", {{"app", "web"}}));
  MustCreate(kSecrets, Obj("web-1", "default", {{"app", "web"}}));
  auto names = [&](std::string_view ns, ListOptions o, bool all = false) {
    auto r = store_->List(kVmis, ns, o, all);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    std::vector<std::string> out;
    if (!r.ok()) return out;
    for (const json& item : r->items) {
      out.push_back(item["metadata"]["namespace"].get<std::string>() + "/" + item["metadata"]["name"].get<std::string>());
    }
    return out;
  };
  using V = std::vector<std::string>;
  EXPECT_EQ(names("default", {}), (V{"default/db-1", "default/web-1", "default/web-2"}));
  EXPECT_EQ(names("", {}, true), (V{"default/db-1", "default/web-1", "default/web-2", "prod/web-1"}));
  EXPECT_EQ(names("nowhere", {}), V{});
  EXPECT_EQ(names("default", {.label_selector = "app=web"}), (V{"default/web-1", "default/web-2"}));
  EXPECT_EQ(names("default", {.label_selector = "app=web,tier!=back"}), (V{"default/web-1"}));
  EXPECT_EQ(names("default", {.label_selector = "tier!=back"}), (V{"default/db-1", "default/web-1"}));
  EXPECT_EQ(names("default", {.label_selector = "canary"}), (V{"default/web-2"}));
  EXPECT_EQ(names("default", {.label_selector = "app,!canary"}), (V{"default/db-1", "default/web-1"}));
  EXPECT_EQ(names("default", {.label_selector = "app in (db, cache)"}), (V{"default/db-1"}));
  EXPECT_EQ(names("", {.field_selector = "metadata.name=web-1"}, true), (V{"default/web-1", "prod/web-1"}));
  EXPECT_EQ(names("", {.label_selector = "app=web", .field_selector = "metadata.namespace!=default"}, true),
            (V{"prod/web-1"}));
}

const std::string kLongKey(64, 'a');

TEST(StateSelector, ParseAndMatch) {
  const Labels labels = {{"app", "web"}, {"tier", "front"}, {"example.com/team", "a"}, {"empty", ""}};
  struct Case {
    const char* selector;
    bool matches;
  };
  const Case good[] = {
      {"", true},
      {"  ", true},
      {"app=web", true},
      {"app==web", true},
      {"app = web", true},
      {"app=db", false},
      {"app!=db", true},
      {"app!=web", false},
      {"missing!=x", true},  // != matches an absent key, as in Kubernetes
      {"app,tier", true},
      {"app,missing", false},
      {"!missing", true},
      {"!app", false},
      {"app=web,tier!=back,app,!f", true},
      {"app in (web,db)", true},
      {"app in (db)", false},
      {"app notin (db)", true},
      {"missing notin (db)", true},
      {"app notin ( web )", false},
      {"example.com/team=a", true},
      {"empty=", true},
      {"empty", true},
      {"A-b_c.d=x", false},
  };
  for (const Case& c : good) {
    auto sel = LabelSelector::Parse(c.selector);
    ASSERT_TRUE(sel.ok()) << c.selector << ": " << sel.status().ToString();
    EXPECT_EQ(sel->Matches(labels), c.matches) << c.selector;
  }
  struct Bad {
    const char* selector;
    const char* error;
  };
  const Bad bad[] = {
      {"app==", ""},  // an empty value is fine for =; this is the test below
      {"=web", "expected a label key"},
      {"app=web,", "expected a label key"},
      {",app", "expected a label key"},
      {"app=we b", "expected ',' or the end"},
      {"app=-web", "label value \"-web\""},
      {"-app", "label key \"-app\""},
      {"Example.com/app=x", "prefix must be a DNS subdomain"},
      {"a/b/c", "label key"},
      {"app in web", "expected '(' after in"},
      {"app in (web", "missing ')'"},
      {"app in ()", "needs at least one value"},
      {"app ~ web", "expected =, ==, !=, in or notin"},
      {"!app=web", "takes no operator"},
      {"app!web", "expected '=' after '!'"},
      {"app=(web)", "unexpected '('"},
      {kLongKey.c_str(), "1 to 63 characters"},
  };
  for (const Bad& c : bad) {
    auto sel = LabelSelector::Parse(c.selector);
    if (std::string_view(c.error).empty()) {
      EXPECT_TRUE(sel.ok()) << c.selector;
      continue;
    }
    ASSERT_FALSE(sel.ok()) << c.selector;
    EXPECT_EQ(sel.status().code(), Code::kInvalidArgument);
    EXPECT_THAT(sel.status().message(), HasSubstr(c.error)) << c.selector;
    EXPECT_THAT(sel.status().message(), HasSubstr("label selector")) << c.selector;
  }
  const Bad bad_fields[] = {
      {"metadata.name", "has no =, == or !="},
      {"spec.nodeName=x", "only metadata.name and metadata.namespace"},
      {"metadata.name=a,", "has no =, == or !="},
  };
  for (const Bad& c : bad_fields) {
    auto sel = FieldSelector::Parse(c.selector);
    ASSERT_FALSE(sel.ok()) << c.selector;
    EXPECT_THAT(sel.status().message(), HasSubstr(c.error)) << c.selector;
  }
  auto f = FieldSelector::Parse("metadata.name==a, metadata.namespace!=kube-system");
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_TRUE(f->Matches("default", "a"));
  EXPECT_FALSE(f->Matches("kube-system", "a"));
  EXPECT_FALSE(f->Matches("default", "b"));
}

// Drains what a watch has queued (without waiting) as "TYPE ns/name@rv".
std::vector<std::string> Drain(Subscription& w, Status* end = nullptr) {
  std::vector<std::string> out;
  for (;;) {
    auto ev = w.TryNext();
    if (!ev.ok()) {
      if (end != nullptr) *end = ev.status();
      return out;
    }
    if (!ev.value()) return out;
    const json& md = (*ev.value()).object["metadata"];
    out.push_back(std::string(EventTypeName(ev.value()->type)) + " " + md["namespace"].get<std::string>() + "/" +
                  md["name"].get<std::string>() + "@" + std::to_string(ev.value()->resource_version));
    EXPECT_EQ(ev.value()->resource_version, Rv(ev.value()->object));
  }
}

TEST_F(StateTest, WatchFromNowFromVersionAndTooOld) {
  MustCreate(kVmis, Obj("a"));                   // 1
  json b = MustCreate(kVmis, Obj("b"));          // 2
  MustCreate(kSecrets, Obj("s"));                // 3
  auto from0 = store_->Watch(kVmis, "default", {}, 0);
  ASSERT_TRUE(from0.ok()) << from0.status().ToString();
  auto from2 = store_->Watch(kVmis, "default", {}, 2);
  ASSERT_TRUE(from2.ok());
  auto from1 = store_->Watch(kVmis, "default", {}, 1);
  ASSERT_TRUE(from1.ok());
  b["spec"]["cpu"] = 2;
  ASSERT_TRUE(store_->Update(kVmis, b).ok());         // 4
  ASSERT_TRUE(store_->Delete(kVmis, "default", "a").ok());  // 5
  using V = std::vector<std::string>;
  EXPECT_EQ(Drain(**from0), (V{"ADDED default/a@1", "ADDED default/b@2", "MODIFIED default/b@4",
                               "DELETED default/a@5"}));
  EXPECT_EQ(Drain(**from2), (V{"MODIFIED default/b@4", "DELETED default/a@5"}));
  EXPECT_EQ(Drain(**from1), (V{"ADDED default/b@2", "MODIFIED default/b@4", "DELETED default/a@5"}));
  // Ahead of the store.
  EXPECT_EQ(store_->Watch(kVmis, "default", {}, 99).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(store_->Watch(kVmis, "default", {.label_selector = "a b"}, 0).status().code(), Code::kInvalidArgument);
}

TEST_F(StateTest, WatchRetentionByCountAndAge) {
  options_.event_max_count = 5;
  Reopen();
  for (int i = 0; i < 10; ++i) MustCreate(kVmis, Obj("o" + std::to_string(i)));  // 1..10; 6..10 kept
  EXPECT_EQ(store_->OldestWatchableResourceVersion().value(), 5);
  auto old = store_->Watch(kVmis, "default", {}, 4);
  EXPECT_EQ(old.status().code(), Code::kOutOfRange);
  EXPECT_THAT(old.status().message(), HasSubstr("too old resource version: 4"));
  auto ok = store_->Watch(kVmis, "default", {}, 5);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(Drain(**ok).size(), 5u);
  // Two hours later, one write prunes everything older than an hour.
  clock_ += 7200;
  MustCreate(kVmis, Obj("late"));  // 11
  EXPECT_EQ(store_->Watch(kVmis, "default", {}, 9).status().code(), Code::kOutOfRange);
  auto latest = store_->Watch(kVmis, "default", {}, 10);
  ASSERT_TRUE(latest.ok()) << latest.status().ToString();
  EXPECT_EQ(Drain(**latest), std::vector<std::string>{"ADDED default/late@11"});
  // The retention survives a reopen.
  Reopen();
  EXPECT_EQ(store_->Watch(kVmis, "default", {}, 9).status().code(), Code::kOutOfRange);
  // Watching from 0 still works: the current objects, then changes.
  auto now = store_->Watch(kVmis, "default", {}, 0);
  ASSERT_TRUE(now.ok());
  EXPECT_EQ(Drain(**now).size(), 11u);
}

TEST_F(StateTest, WatchFiltersNamespaceAndLabels) {
  auto web = store_->Watch(kVmis, "default", {.label_selector = "app=web"}, 0);
  auto all = store_->Watch(kVmis, "", {}, 0, /*all_namespaces=*/true);
  auto named = store_->Watch(kVmis, "", {.field_selector = "metadata.name=b"}, 0, true);
  ASSERT_TRUE(web.ok() && all.ok() && named.ok());
  MustCreate(kVmis, Obj("a", "default", {{"app", "web"}}));
  MustCreate(kVmis, Obj("b", "default", {{"app", "db"}}));
  MustCreate(kVmis, Obj("c", "prod", {{"app", "web"}}));
  MustCreate(kSecrets, Obj("d", "default", {{"app", "web"}}));
  using V = std::vector<std::string>;
  EXPECT_EQ(Drain(**web), (V{"ADDED default/a@1"}));
  EXPECT_EQ(Drain(**all), (V{"ADDED default/a@1", "ADDED default/b@2", "ADDED prod/c@3"}));
  EXPECT_EQ(Drain(**named), (V{"ADDED default/b@2"}));
}

TEST_F(StateTest, SlowSubscriberIsClosedNotWaitedFor) {
  options_.watch_queue_limit = 3;
  Reopen();
  MustCreate(kVmis, Obj("backlog"));
  auto slow = store_->Watch(kVmis, "default", {}, 0);  // a backlog of 1, plus 3
  auto fast = store_->Watch(kVmis, "default", {}, 0);
  ASSERT_TRUE(slow.ok() && fast.ok());
  EXPECT_EQ(Drain(**fast).size(), 1u);
  for (int i = 0; i < 10; ++i) {
    MustCreate(kVmis, Obj("o" + std::to_string(i)));  // never blocks
    if (i % 3 == 2) {
      EXPECT_EQ(Drain(**fast).size(), 3u);
    }
  }
  EXPECT_EQ(Drain(**fast).size(), 1u);
  Status end;
  auto got = Drain(**slow, &end);
  EXPECT_EQ(got.size(), 4u);  // what was queued before it overflowed
  EXPECT_EQ(end.code(), Code::kResourceExhausted);
  EXPECT_THAT(end.message(), HasSubstr("list again"));
  // The fast one is still open; the slow one stays ended.
  MustCreate(kVmis, Obj("after"));
  EXPECT_EQ(Drain(**fast).size(), 1u);
  EXPECT_EQ((*slow)->TryNext().status().code(), Code::kResourceExhausted);
}

TEST_F(StateTest, NextWakesOnEventsCancelAndClose) {
  auto w = store_->Watch(kVmis, "default", {}, 0);
  ASSERT_TRUE(w.ok());
  // An event written by another thread wakes a waiting Next.
  std::thread writer([&] { MustCreate(kVmis, Obj("a")); });
  auto ev = (*w)->Next();
  writer.join();
  ASSERT_TRUE(ev.ok()) << ev.status().ToString();
  EXPECT_EQ(ev->type, EventType::kAdded);
  // The poll fd is readable only while something is queued.
  EXPECT_EQ(::fcntl((*w)->poll_fd(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
  pollfd p{(*w)->poll_fd(), POLLIN, 0};
  EXPECT_EQ(::poll(&p, 1, 0), 0);
  MustCreate(kVmis, Obj("b"));
  EXPECT_EQ(::poll(&p, 1, 0), 1);
  ASSERT_TRUE((*w)->Next().ok());
  EXPECT_EQ(::poll(&p, 1, 0), 0);
  // A token cancelled from another thread ends the wait.
  CancelToken token;
  std::thread canceller([&] { token.Cancel("client went away"); });
  auto cancelled = (*w)->Next(&token);
  canceller.join();
  EXPECT_EQ(cancelled.status().code(), Code::kCancelled);
  // Close from another thread ends a Next without a token.
  std::thread closer([&] { (*w)->Close(); });
  auto closed = (*w)->Next();
  closer.join();
  EXPECT_EQ(closed.status().code(), Code::kCancelled);
  // Closing the store ends the watches it feeds.
  auto w2 = store_->Watch(kVmis, "default", {}, 0);
  ASSERT_TRUE(w2.ok());
  store_.reset();
  EXPECT_EQ(Drain(**w2).size(), 2u);
  EXPECT_EQ((*w2)->Next().status().code(), Code::kCancelled);
}

// 8 threads x 200 updates: half on each thread's own object, half on one
// shared counter (read, increment, update, retry on Conflict). A watcher
// sees every write exactly once, in resourceVersion order.
TEST_F(StateTest, ConcurrentWritersAndAWatcher) {
  constexpr int kThreads = 8, kUpdates = 200;
  options_.watch_queue_limit = kThreads * kUpdates * 2;  // no overflow whatever the scheduling
  Reopen();
  for (int t = 0; t < kThreads; ++t) MustCreate(kVmis, Obj("own-" + std::to_string(t), "default", {}, {{"n", 0}}));
  MustCreate(kVmis, Obj("shared", "default", {}, {{"n", 0}}));
  int64_t start_rv = store_->CurrentResourceVersion().value();
  auto w = store_->Watch(kVmis, "default", {}, start_rv);
  ASSERT_TRUE(w.ok());
  std::atomic<int> conflicts{0};
  std::atomic<int> failures{0};
  auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::string own = "own-" + std::to_string(t);
      for (int i = 0; i < kUpdates; ++i) {
        std::string name = i % 2 == 0 ? own : "shared";
        for (;;) {
          auto cur = store_->Get(kVmis, "default", name);
          if (!cur.ok()) { ++failures; return; }
          json next = cur.value();
          next["spec"]["n"] = next["spec"]["n"].get<int>() + 1;
          auto r = store_->Update(kVmis, next);
          if (r.ok()) break;
          if (r.status().code() != Code::kAborted) { ++failures; return; }
          ++conflicts;
        }
      }
    });
  }
  // The watcher, concurrently: every event once, in order, with the
  // counters of each object going up by one.
  std::map<std::string, int> seen;
  int64_t last = start_rv;
  int events = 0;
  bool in_order = true;
  while (events < kThreads * kUpdates) {
    auto ev = (*w)->Next();
    if (!ev.ok()) {
      ADD_FAILURE() << ev.status().ToString();
      break;
    }
    in_order = in_order && ev->resource_version == last + 1;  // one counter, no gaps, no repeats
    last = ev->resource_version;
    std::string name = ev->object["metadata"]["name"];
    int n = ev->object["spec"]["n"];
    in_order = in_order && n == seen[name] + 1;
    seen[name] = n;
    ++events;
  }
  for (auto& th : threads) th.join();
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_TRUE(in_order);
  EXPECT_EQ(seen["shared"], kThreads * kUpdates / 2);  // no lost update
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(seen["own-" + std::to_string(t)], kUpdates / 2);
  EXPECT_EQ((*w)->TryNext().value(), std::nullopt);  // nothing more
  EXPECT_EQ(store_->CurrentResourceVersion().value(), start_rv + kThreads * kUpdates);
  std::cout << "state: " << kThreads * kUpdates << " updates (synchronous=FULL) in " << seconds << " s, "
            << (kThreads * kUpdates / seconds) << " writes/s, " << conflicts.load() << " conflicts retried\n";
}

// Descriptors on state.db, its WAL and shared memory carry FD_CLOEXEC.
// SQLite's unix VFS opens them with O_CLOEXEC itself: checked here on a bare
// connection too, before the store's own safety net runs.
std::vector<int> DbFds(const std::filesystem::path& db) {
  std::vector<int> fds;
  std::string base = std::filesystem::canonical(db).string();
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    auto target = std::filesystem::read_symlink(e.path(), ec);
    if (ec) continue;
    if (target.string().rfind(base, 0) == 0) fds.push_back(std::stoi(e.path().filename().string()));
  }
  return fds;
}

TEST_F(StateTest, DescriptorsAreCloseOnExec) {
  MustCreate(kVmis, Obj("a"));
  ASSERT_TRUE(store_->List(kVmis, "default").ok());
  auto fds = DbFds(db_path());
  EXPECT_GE(fds.size(), 3u);  // the database, -wal, -shm
  for (int fd : fds) EXPECT_EQ(::fcntl(fd, F_GETFD) & FD_CLOEXEC, FD_CLOEXEC) << fd;
  store_.reset();
  auto bare = Db::Open(tmp() / "bare.db");
  ASSERT_TRUE(bare.ok());
  ASSERT_TRUE(bare->Exec("PRAGMA journal_mode=WAL; CREATE TABLE t (x); INSERT INTO t VALUES (1);").ok());
  auto bare_fds = DbFds(tmp() / "bare.db");
  EXPECT_GE(bare_fds.size(), 3u);
  for (int fd : bare_fds) EXPECT_EQ(::fcntl(fd, F_GETFD) & FD_CLOEXEC, FD_CLOEXEC) << fd;
}

TEST_F(StateTest, MigratesAnEmptyDatabaseAndRefusesANewerOne) {
  store_.reset();
  auto path = tmp() / "v0.db";
  {
    auto db = Db::Open(path);  // an empty database: user_version 0
    ASSERT_TRUE(db.ok());
    EXPECT_EQ(db->QueryInt("PRAGMA user_version").value(), 0);
  }
  {
    auto s = ObjectStore::Open(path);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    ASSERT_TRUE((*s)->Create(kVmis, Obj("a")).ok());
  }
  {
    auto db = Db::Open(path);
    ASSERT_TRUE(db.ok());
    EXPECT_EQ(db->QueryInt("PRAGMA user_version").value(), kSchemaVersion);
    EXPECT_EQ(db->QueryInt("SELECT COUNT(*) FROM objects").value(), 1);
    ASSERT_TRUE(db->Exec("PRAGMA user_version = 42").ok());
  }
  auto refused = ObjectStore::Open(path);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(refused.status().message(), HasSubstr("schema version 42 is newer than this regdisk supports (" +
                                                    std::to_string(kSchemaVersion) + ")"));
  EXPECT_EQ(refused.status().message().find('\n'), std::string::npos);
  {
    auto db = Db::Open(path);  // left untouched
    ASSERT_TRUE(db.ok());
    EXPECT_EQ(db->QueryInt("PRAGMA user_version").value(), 42);
    EXPECT_EQ(db->QueryInt("SELECT COUNT(*) FROM objects").value(), 1);
  }
  // Not a database at all.
  auto junk = tmp() / "junk.db";
  ASSERT_TRUE(WriteFileAtomic(junk, std::string(8192, 'x')).ok());
  auto bad = ObjectStore::Open(junk);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), Code::kDataLoss) << bad.status().ToString();
}

// Checks what must hold after any crash: the database is intact, events
// are contiguous up to the counter, every object is its key's last event,
// and every key whose last event is DELETED has no object.
void CheckInvariants(const std::filesystem::path& path, int64_t reported) {
  auto db = Db::Open(path);
  ASSERT_TRUE(db.ok());
  {
    auto st = db->Prepare("PRAGMA integrity_check");
    ASSERT_TRUE(st.ok());
    ASSERT_TRUE(st->Step().value());
    EXPECT_EQ(st->Text(0), "ok");
  }
  int64_t counter = db->QueryInt("SELECT value FROM counters WHERE name = 'resource_version'").value();
  EXPECT_GE(counter, reported) << "a write the child saw committed was lost";
  EXPECT_EQ(db->QueryInt("SELECT COALESCE(MAX(resource_version), 0) FROM events").value(), counter);
  EXPECT_EQ(db->QueryInt("SELECT COUNT(*) FROM events").value(),
            counter - db->QueryInt("SELECT value FROM counters WHERE name = 'compacted'").value());
  EXPECT_EQ(db->QueryInt("SELECT COUNT(*) FROM objects WHERE resource_version > " + std::to_string(counter)).value(),
            0);
  // The last event of each key against the objects table.
  std::map<std::string, std::pair<std::string, std::string>> last;  // key -> (type, body)
  auto ev = db->Prepare("SELECT resource || ' ' || namespace || '/' || name, type, body FROM events ORDER BY resource_version");
  ASSERT_TRUE(ev.ok());
  while (ev->Step().value()) last[ev->Text(0)] = {ev->Text(1), ev->Text(2)};
  std::map<std::string, std::string> objects;
  auto ob = db->Prepare("SELECT resource || ' ' || namespace || '/' || name, body FROM objects");
  ASSERT_TRUE(ob.ok());
  while (ob->Step().value()) objects[ob->Text(0)] = ob->Text(1);
  for (const auto& [key, e] : last) {
    if (e.first == "DELETED") {
      EXPECT_EQ(objects.count(key), 0u) << key;
    } else {
      ASSERT_EQ(objects.count(key), 1u) << key;
      EXPECT_EQ(objects[key], e.second) << key;
    }
  }
  for (const auto& [key, body] : objects) EXPECT_EQ(last.count(key), 1u) << key;
}

// A child process writes (create, update, update status, delete) as fast
// as it can and reports each committed resourceVersion on a pipe; it is
// killed with SIGKILL after a varying number of writes, and the database
// is checked and reopened every round.
TEST_F(StateTest, SurvivesKillNineMidWrite) {
  store_.reset();
  int64_t reported = 0;
  constexpr int kRounds = 8;
  for (int round = 0; round < kRounds; ++round) {
    int fds[2];
    ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::close(fds[0]);
      auto s = ObjectStore::Open(db_path());
      if (!s.ok()) ::_exit(3);
      ObjectStore& store = **s;
      for (int i = 0; i < 100000; ++i) {
        std::string name = "r" + std::to_string(round) + "-" + std::to_string(i / 4);
        Result<json> r = json();
        switch (i % 4) {
          case 0: r = store.Create(kVmis, Obj(name, "default", {{"i", std::to_string(i)}})); break;
          case 1: {
            json o = store.Get(kVmis, "default", name).value_or(json());
            o["spec"]["cpu"] = 1000 + i;  // never the created value: a no-op update writes nothing
            r = store.Update(kVmis, o);
            break;
          }
          case 2: {
            json o = Obj(name);
            o["status"] = {{"i", i}};
            r = store.UpdateStatus(kVmis, o);
            break;
          }
          case 3:
            if ((i / 4) % 2 == 0) {
              r = store.Delete(kVmis, "default", name);
            } else {
              r = store.Create(kSecrets, Obj(name));
            }
            break;
        }
        if (!r.ok()) ::_exit(4);
        int64_t rv = Rv(r.value());
        if (::write(fds[1], &rv, sizeof rv) != sizeof rv) ::_exit(5);
      }
      ::_exit(0);
    }
    ::close(fds[1]);
    int want = 3 + round * 7;  // kill after a different number of writes each round
    for (int got = 0; got < want; ++got) {
      int64_t rv = 0;
      ASSERT_EQ(::read(fds[0], &rv, sizeof rv), static_cast<ssize_t>(sizeof rv)) << "the writer died early";
      EXPECT_GT(rv, reported);
      reported = rv;
    }
    ::kill(pid, SIGKILL);
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFSIGNALED(status)) << "child exited with " << WEXITSTATUS(status);
    // Writes reported after our reads but before the kill count too.
    int64_t rv = 0;
    while (::read(fds[0], &rv, sizeof rv) == static_cast<ssize_t>(sizeof rv)) reported = rv;
    ::close(fds[0]);
    CheckInvariants(db_path(), reported);
    // The store opens again and carries on from the last committed write.
    auto s = ObjectStore::Open(db_path());
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    EXPECT_GE((*s)->CurrentResourceVersion().value(), reported);
  }
}

}  // namespace
// --- Finalizers and deletion (Kubernetes' rules) -------------------------------

constexpr char kSets[] = "kubevirt.io/v1/virtualmachineinstancereplicasets";

json WithFinalizers(json o, std::vector<std::string> finalizers) {
  o["metadata"]["finalizers"] = finalizers;
  return o;
}

json OwnedBy(json o, const json& owner, bool block) {
  o["metadata"]["ownerReferences"] = {{{"apiVersion", "kubevirt.io/v1"},
                                       {"kind", "VirtualMachineInstanceReplicaSet"},
                                       {"name", owner["metadata"]["name"]},
                                       {"uid", owner["metadata"]["uid"]},
                                       {"controller", true},
                                       {"blockOwnerDeletion", block}}};
  return o;
}

TEST_F(StateTest, AFinalizerHoldsADeleteUntilAWriteLeavesNone) {
  json created = MustCreate(kVmis, WithFinalizers(Obj("web"), {"example.com/a", "example.com/b"}));
  auto w = store_->Watch(kVmis, "default", {}, Rv(created));
  ASSERT_TRUE(w.ok());
  clock_ = kClock + 60;
  // DELETE marks it: deletionTimestamp, grace 0, a new resourceVersion, MODIFIED.
  auto marked = store_->Delete(kVmis, "default", "web");
  ASSERT_TRUE(marked.ok()) << marked.status().ToString();
  EXPECT_EQ(marked.value()["metadata"]["deletionTimestamp"], FormatTimestamp(kClock + 60));
  EXPECT_EQ(marked.value()["metadata"]["deletionGracePeriodSeconds"], 0);
  EXPECT_EQ(Rv(marked.value()), Rv(created) + 1);
  auto listed = store_->List(kVmis, "default");
  ASSERT_EQ(listed.value().items.size(), 1u);
  EXPECT_EQ(listed.value().items[0], marked.value());
  // A second DELETE: the object as it is, no write.
  auto again = store_->Delete(kVmis, "default", "web");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again.value(), marked.value());
  EXPECT_EQ(store_->CurrentResourceVersion().value(), Rv(marked.value()));
  // Preconditions still apply.
  EXPECT_EQ(store_->Delete(kVmis, "default", "web", {.resource_version = Rv(created)}).status().code(), Code::kAborted);
  EXPECT_EQ(store_->Delete(kVmis, "default", "web", {.uid = "other"}).status().code(), Code::kAborted);
  // No new finalizer on an object being deleted.
  json add = marked.value();
  add["metadata"]["finalizers"] = {"example.com/a", "example.com/b", "example.com/c", "example.com/d"};
  auto refused = store_->Update(kVmis, add);
  EXPECT_EQ(refused.status().code(), Code::kInvalidArgument);
  EXPECT_EQ(refused.status().message(),
            "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new "
            "finalizers []string{\"example.com/c\", \"example.com/d\"}");
  // A client can neither clear nor move deletionTimestamp.
  json clear = marked.value();
  clear["metadata"].erase("deletionTimestamp");
  clear["metadata"].erase("deletionGracePeriodSeconds");
  clear["metadata"]["finalizers"] = {"example.com/b"};
  auto one_left = store_->Update(kVmis, clear);
  ASSERT_TRUE(one_left.ok()) << one_left.status().ToString();
  EXPECT_EQ(one_left.value()["metadata"]["deletionTimestamp"], FormatTimestamp(kClock + 60));
  EXPECT_EQ(one_left.value()["metadata"]["deletionGracePeriodSeconds"], 0);
  json moved = one_left.value();
  moved["metadata"]["deletionTimestamp"] = FormatTimestamp(kClock + 999);
  moved["spec"]["cpu"] = 4;
  auto still = store_->Update(kVmis, moved);
  ASSERT_TRUE(still.ok());
  EXPECT_EQ(still.value()["metadata"]["deletionTimestamp"], FormatTimestamp(kClock + 60));
  // A status write keeps it too.
  json status = still.value();
  status["status"] = {{"phase", "Running"}};
  ASSERT_TRUE(store_->UpdateStatus(kVmis, status).ok());
  // The write that leaves no finalizer removes it: DELETED, with that write's state.
  json last = store_->Get(kVmis, "default", "web").value();
  last["metadata"].erase("finalizers");
  auto removed = store_->Update(kVmis, last);
  ASSERT_TRUE(removed.ok()) << removed.status().ToString();
  EXPECT_FALSE(removed.value()["metadata"].contains("finalizers"));
  EXPECT_EQ(store_->Get(kVmis, "default", "web").status().code(), Code::kNotFound);
  const int64_t m = Rv(created);
  using V = std::vector<std::string>;
  auto at = [&](const char* type, int64_t rv) { return std::string(type) + " default/web@" + std::to_string(rv); };
  EXPECT_EQ(Drain(**w), (V{at("MODIFIED", m + 1), at("MODIFIED", m + 2), at("MODIFIED", m + 3), at("MODIFIED", m + 4),
                           at("DELETED", m + 5)}));
  // Created with a deletionTimestamp of its own: the store drops it.
  json fresh = Obj("fresh");
  fresh["metadata"]["deletionTimestamp"] = FormatTimestamp(kClock);
  fresh["metadata"]["deletionGracePeriodSeconds"] = 30;
  json stored = MustCreate(kVmis, fresh);
  EXPECT_FALSE(stored["metadata"].contains("deletionTimestamp"));
  EXPECT_FALSE(stored["metadata"].contains("deletionGracePeriodSeconds"));
  // Without finalizers, DELETE removes at once.
  ASSERT_TRUE(store_->Delete(kVmis, "default", "fresh").ok());
  EXPECT_EQ(store_->Get(kVmis, "default", "fresh").status().code(), Code::kNotFound);
}

TEST_F(StateTest, BackgroundDeletesTheOwnerThenItsDependents) {
  json rs = MustCreate(kSets, Obj("web"));
  MustCreate(kVmis, OwnedBy(Obj("web-a"), rs, true));
  MustCreate(kVmis, OwnedBy(WithFinalizers(Obj("web-b"), {"kubevirt.io/foregroundDeleteVirtualMachine"}), rs, true));
  MustCreate(kVmis, Obj("other"));
  const int64_t m = store_->CurrentResourceVersion().value();
  auto sets = store_->Watch(kSets, "default", {}, m);
  auto vmis = store_->Watch(kVmis, "default", {}, m);
  ASSERT_TRUE(sets.ok() && vmis.ok());
  auto gone = store_->Delete(kSets, "default", "web");
  ASSERT_TRUE(gone.ok()) << gone.status().ToString();
  using V = std::vector<std::string>;
  auto ev = [](const char* type, const char* name, int64_t rv) {
    return std::string(type) + " default/" + name + "@" + std::to_string(rv);
  };
  EXPECT_EQ(Drain(**sets), (V{ev("DELETED", "web", m + 1)}));
  EXPECT_EQ(Drain(**vmis), (V{ev("DELETED", "web-a", m + 2), ev("MODIFIED", "web-b", m + 3)}));
  EXPECT_TRUE(store_->Get(kVmis, "default", "web-b").value()["metadata"].contains("deletionTimestamp"));
  EXPECT_TRUE(store_->Get(kVmis, "default", "other").ok());
}

TEST_F(StateTest, BackgroundLeavesTheDependentsOfAnOwnerOnlyMarkedAndDeletesThemWhenItsRowGoes) {
  json rs = MustCreate(kSets, WithFinalizers(Obj("web"), {"example.com/keep"}));
  json other = MustCreate(kSets, Obj("other"));
  MustCreate(kVmis, OwnedBy(Obj("web-a"), rs, true));
  json shared = OwnedBy(Obj("web-shared"), rs, false);
  shared["metadata"]["ownerReferences"].push_back(
      {{"apiVersion", "kubevirt.io/v1"}, {"kind", "VirtualMachineInstanceReplicaSet"}, {"name", "other"},
       {"uid", other["metadata"]["uid"]}});
  MustCreate(kVmis, shared);
  const int64_t m = store_->CurrentResourceVersion().value();
  auto vmis = store_->Watch(kVmis, "default", {}, m);
  ASSERT_TRUE(vmis.ok());
  // Marked, not removed: it is still the owner, and nothing of it goes.
  auto marked = store_->Delete(kSets, "default", "web");
  ASSERT_TRUE(marked.ok()) << marked.status().ToString();
  EXPECT_TRUE(marked.value()["metadata"].contains("deletionTimestamp"));
  using V = std::vector<std::string>;
  EXPECT_EQ(Drain(**vmis), V{});
  EXPECT_FALSE(store_->Get(kVmis, "default", "web-a").value()["metadata"].contains("deletionTimestamp"));
  // Its last finalizer comes off: the row goes, then its dependents with no
  // other owner left (web-shared keeps "other").
  json last = marked.value();
  last["metadata"].erase("finalizers");
  ASSERT_TRUE(store_->Update(kSets, last).ok());
  EXPECT_EQ(store_->Get(kSets, "default", "web").status().code(), Code::kNotFound);
  EXPECT_EQ(store_->Get(kVmis, "default", "web-a").status().code(), Code::kNotFound);
  EXPECT_EQ(Drain(**vmis), (V{"DELETED default/web-a@" + std::to_string(m + 3)}));
  EXPECT_TRUE(store_->Get(kVmis, "default", "web-shared").ok());
  // The other owner goes too: now web-shared has none left.
  ASSERT_TRUE(store_->Delete(kSets, "default", "other").ok());
  EXPECT_EQ(store_->Get(kVmis, "default", "web-shared").status().code(), Code::kNotFound);
}

TEST_F(StateTest, ACreateUnderAMissingOrDeletingOwnerIsRefusedAndGarbageIsCollected) {
  json rs = MustCreate(kSets, WithFinalizers(Obj("web"), {"example.com/keep"}));
  MustCreate(kVmis, OwnedBy(Obj("web-a"), rs, true));
  ASSERT_TRUE(store_->Delete(kSets, "default", "web").ok());
  // Its owner is being deleted: refused, naming the owner.
  auto late = store_->Create(kVmis, OwnedBy(Obj("web-late"), rs, true));
  EXPECT_EQ(late.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(late.status().message(), HasSubstr("its owner VirtualMachineInstanceReplicaSet \"web\""));
  EXPECT_THAT(late.status().message(), HasSubstr("is being deleted"));
  json gone = rs;
  gone["metadata"]["uid"] = "no-such-uid";
  auto orphan = store_->Create(kVmis, OwnedBy(Obj("web-orphan"), gone, false));  // controller: true
  EXPECT_EQ(orphan.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(orphan.status().message(), HasSubstr("(uid no-such-uid) does not exist"));
  // A reference that is neither controller nor blocking is not checked.
  json loose = Obj("loose");
  loose["metadata"]["ownerReferences"] = {{{"apiVersion", "v1"}, {"kind", "Other"}, {"name", "x"}, {"uid", "u-x"}}};
  MustCreate(kVmis, loose);
  // The sweep: "loose" has no owner left and goes; a foreground owner whose
  // blocking dependent lost its reference (a write) is released at once.
  json fg = MustCreate(kSets, Obj("fg"));
  MustCreate(kVmis, OwnedBy(WithFinalizers(Obj("fg-a"), {"example.com/slow"}), fg, true));
  ASSERT_TRUE(store_->Delete(kSets, "default", "fg", {}, Propagation::kForeground).ok());
  EXPECT_TRUE(store_->Get(kSets, "default", "fg").ok());
  json a = store_->Get(kVmis, "default", "fg-a").value();
  a["metadata"]["ownerReferences"][0]["blockOwnerDeletion"] = false;
  ASSERT_TRUE(store_->Update(kVmis, a).ok());
  EXPECT_EQ(store_->Get(kSets, "default", "fg").status().code(), Code::kNotFound);
  auto swept = store_->CollectGarbage();
  ASSERT_TRUE(swept.ok()) << swept.status().ToString();
  EXPECT_EQ(swept.value(), 1);
  EXPECT_EQ(store_->Get(kVmis, "default", "loose").status().code(), Code::kNotFound);
  EXPECT_TRUE(store_->Get(kVmis, "default", "web-a").ok());  // its owner is only marked
  EXPECT_EQ(store_->CollectGarbage().value(), 0);
}

TEST_F(StateTest, ForegroundKeepsTheOwnerUntilItsBlockingDependentsAreGone) {
  json rs = MustCreate(kSets, Obj("web"));
  MustCreate(kVmis, OwnedBy(Obj("web-a"), rs, true));
  MustCreate(kVmis, OwnedBy(WithFinalizers(Obj("web-b"), {"kubevirt.io/foregroundDeleteVirtualMachine"}), rs, true));
  MustCreate(kVmis, OwnedBy(WithFinalizers(Obj("web-c"), {"example.com/slow"}), rs, false));
  const int64_t m = store_->CurrentResourceVersion().value();
  auto sets = store_->Watch(kSets, "default", {}, m);
  auto vmis = store_->Watch(kVmis, "default", {}, m);
  ASSERT_TRUE(sets.ok() && vmis.ok());
  auto marked = store_->Delete(kSets, "default", "web", {}, Propagation::kForeground);
  ASSERT_TRUE(marked.ok()) << marked.status().ToString();
  EXPECT_EQ(marked.value()["metadata"]["finalizers"], json({"foregroundDeletion"}));
  EXPECT_TRUE(marked.value()["metadata"].contains("deletionTimestamp"));
  // The owner went first (MODIFIED), then each dependent: web-a (no
  // finalizer) is gone, web-b and web-c are being deleted.
  using V = std::vector<std::string>;
  auto ev = [](const char* type, const char* name, int64_t rv) {
    return std::string(type) + " default/" + name + "@" + std::to_string(rv);
  };
  EXPECT_EQ(Drain(**sets), (V{ev("MODIFIED", "web", m + 1)}));
  EXPECT_EQ(Drain(**vmis), (V{ev("DELETED", "web-a", m + 2), ev("MODIFIED", "web-b", m + 3),
                              ev("MODIFIED", "web-c", m + 4)}));
  EXPECT_TRUE(store_->Get(kSets, "default", "web").ok());
  // A finalizer on the owner itself cannot be added now either.
  json add = store_->Get(kSets, "default", "web").value();
  add["metadata"]["finalizers"].push_back("example.com/late");
  EXPECT_THAT(store_->Update(kSets, add).status().message(), HasSubstr("[]string{\"example.com/late\"}"));
  // web-b's finalizer comes off: it goes, and with it the owner (web-c does
  // not block: blockOwnerDeletion is false).
  json b = store_->Get(kVmis, "default", "web-b").value();
  b["metadata"]["finalizers"] = json::array();
  ASSERT_TRUE(store_->Update(kVmis, b).ok());
  EXPECT_EQ(store_->Get(kVmis, "default", "web-b").status().code(), Code::kNotFound);
  EXPECT_EQ(store_->Get(kSets, "default", "web").status().code(), Code::kNotFound);
  EXPECT_EQ(Drain(**vmis), (V{ev("DELETED", "web-b", m + 5)}));
  EXPECT_EQ(Drain(**sets), (V{ev("DELETED", "web", m + 6)}));
  EXPECT_TRUE(store_->Get(kVmis, "default", "web-c").ok());
  // Without blocking dependents, Foreground goes at once.
  MustCreate(kSets, Obj("lone"));
  ASSERT_TRUE(store_->Delete(kSets, "default", "lone", {}, Propagation::kForeground).ok());
  EXPECT_EQ(store_->Get(kSets, "default", "lone").status().code(), Code::kNotFound);
}

TEST_F(StateTest, OrphanRemovesTheOwnerReferencesAndKeepsTheDependents) {
  json rs = MustCreate(kSets, WithFinalizers(Obj("web"), {"example.com/keep"}));
  json a = OwnedBy(Obj("web-a"), rs, true);
  a["metadata"]["ownerReferences"].push_back({{"apiVersion", "v1"}, {"kind", "Other"}, {"name", "x"}, {"uid", "u-2"}});
  MustCreate(kVmis, a);
  MustCreate(kVmis, OwnedBy(Obj("web-b"), rs, true));
  const int64_t m = store_->CurrentResourceVersion().value();
  auto vmis = store_->Watch(kVmis, "default", {}, m);
  ASSERT_TRUE(vmis.ok());
  auto marked = store_->Delete(kSets, "default", "web", {}, Propagation::kOrphan);
  ASSERT_TRUE(marked.ok()) << marked.status().ToString();
  // Its own finalizer keeps the owner; the dependents were let go first.
  EXPECT_EQ(marked.value()["metadata"]["finalizers"], json({"example.com/keep"}));
  EXPECT_EQ(Rv(marked.value()), m + 3);
  using V = std::vector<std::string>;
  EXPECT_EQ(Drain(**vmis), (V{"MODIFIED default/web-a@" + std::to_string(m + 1),
                              "MODIFIED default/web-b@" + std::to_string(m + 2)}));
  json got_a = store_->Get(kVmis, "default", "web-a").value();
  ASSERT_EQ(got_a["metadata"]["ownerReferences"].size(), 1u);
  EXPECT_EQ(got_a["metadata"]["ownerReferences"][0]["uid"], "u-2");
  EXPECT_FALSE(store_->Get(kVmis, "default", "web-b").value()["metadata"].contains("ownerReferences"));
  EXPECT_FALSE(store_->Get(kVmis, "default", "web-b").value()["metadata"].contains("deletionTimestamp"));
}

}  // namespace regdisk::state
