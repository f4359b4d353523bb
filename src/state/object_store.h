// ObjectStore: the node daemon's store of Kubernetes-shaped API objects
// (VirtualMachineInstances, replica sets, Secrets...), with the semantics
// the API server and kubectl expect: uid, resourceVersion, generation,
// creationTimestamp, optimistic concurrency, label and field selectors, and
// watches that resume from a resourceVersion.
//
//   ASSIGN_OR_RETURN(auto store, ObjectStore::Open(root / "state.db"));
//   ASSIGN_OR_RETURN(json vmi, store->Create("virtualmachineinstances.kubevirt.io", object));
//   ASSIGN_OR_RETURN(ObjectList list, store->List(resource, "default", {.label_selector = "app=web"}));
//   ASSIGN_OR_RETURN(auto watch, store->Watch(resource, "default", {}, list.resource_version));
//   while (true) { ASSIGN_OR_RETURN(WatchEvent ev, watch->Next(token.get())); ... }
//
// Objects are keyed by (resource, namespace, name). `resource` is an opaque
// string chosen by the caller (the API server uses "group/version/plural";
// the same string for every version of one kind); the namespace is the
// object's metadata.namespace ("" for cluster-scoped resources).
//
// resourceVersion: one int64 counter for the whole store (etcd's revision),
// incremented by every write and stored in the written object's
// metadata.resourceVersion as a decimal string (clients treat it as opaque).
// A List returns the counter's value at the time of the read.
//
// Every write is one SQLite transaction (WAL mode, synchronous=FULL by
// default): after a crash or kill -9 the store holds exactly the writes that
// returned OK before it (and, for a write interrupted in its commit, possibly
// that one). The object and its event are written in the same transaction.
//
// Thread safety: all methods may be called from any thread, concurrently.
// Writes are serialised; watch delivery never blocks a writer: each
// subscriber has a bounded queue, and one that falls behind is closed
// with ResourceExhausted (the client re-lists and watches again).
//
// Errors (Status codes, and the HTTP status the API server maps them to):
//   InvalidArgument (400/422)  malformed object, name, selector or version
//   NotFound (404)             no such object
//   AlreadyExists (409)        Create of a name that exists
//   Aborted (409 Conflict)     a stale metadata.resourceVersion or uid precondition
//   FailedPrecondition (409)   Create under an owner that is missing or being deleted
//   InvalidArgument "...Forbidden: ..." (422)  a finalizer added to an object being deleted
//   OutOfRange (410 Gone)      a watch from a resourceVersion older than the kept events
//   FailedPrecondition         the database's schema is newer than this code
// Database failures keep SQLite's meaning (NoSpace, DataLoss, Unavailable...).
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "state/selector.h"
#include "util/cancel.h"
#include "util/fs.h"
#include "util/status.h"

namespace regdisk::state {

using json = nlohmann::json;

// The schema version this code writes; see kMigrations in object_store.cc.
inline constexpr int kSchemaVersion = 1;

struct ListOptions {
  std::string label_selector;  // "a=b,c!=d,e,!f", see selector.h
  std::string field_selector;  // "metadata.name=x"
};

struct ObjectList {
  std::vector<json> items;       // sorted by namespace, then name
  int64_t resource_version = 0;  // the store's counter when the list was read
};

// DeleteOptions.propagationPolicy.
enum class Propagation { kBackground, kForeground, kOrphan };

// The finalizer a foreground deletion puts on the owner (metav1.FinalizerDeleteDependents).
inline constexpr char kForegroundDeletionFinalizer[] = "foregroundDeletion";
// How many owners deep a delete cascades in one transaction.
inline constexpr int kMaxCascadeDepth = 16;

// Preconditions for Delete; an unset one is not checked.
struct Preconditions {
  std::optional<std::string> uid;
  std::optional<int64_t> resource_version;
};

enum class EventType { kAdded, kModified, kDeleted };
std::string_view EventTypeName(EventType t);  // "ADDED", "MODIFIED", "DELETED"

struct WatchEvent {
  EventType type;
  int64_t resource_version;  // the write's resourceVersion
  json object;               // the object after the write; for DELETED the
                             // last state, with the delete's resourceVersion
};

// One watch subscription. Created by ObjectStore::Watch; events arrive in
// resourceVersion order, each exactly once. Next() may be called from one
// thread at a time; Close() from any thread.
class Subscription {
 public:
  struct Shared;  // the queue, shared with the store's writers
  explicit Subscription(std::shared_ptr<Shared> shared) : shared_(std::move(shared)) {}
  ~Subscription();  // Close()
  Subscription(const Subscription&) = delete;
  Subscription& operator=(const Subscription&) = delete;

  // Waits for the next event. Returns Cancelled when `cancel` fires or the
  // watch was closed, ResourceExhausted when this subscriber fell behind
  // (the events queued before that are delivered first), Cancelled when
  // the store is destroyed.
  Result<WatchEvent> Next(const CancelToken* cancel = nullptr);
  // The next event if one is queued, without waiting; nullopt when none
  // is, the error when the watch has ended.
  Result<std::optional<WatchEvent>> TryNext();
  // Ends the watch; a Next() waiting in another thread returns Cancelled.
  void Close();
  // Readable (POLLIN) while an event or the end is waiting, for loops that
  // poll() sockets too.
  int poll_fd() const;

 private:
  std::shared_ptr<Shared> shared_;
};

class ObjectStore {
 public:
  struct Options {
    // Events kept for watches: at most this many, and none older than
    // event_max_age; older ones are pruned as writes happen.
    int64_t event_max_count = 10000;
    std::chrono::seconds event_max_age{3600};
    // Events a watcher may have queued beyond its initial backlog before
    // it is closed as too slow.
    size_t watch_queue_limit = 1024;
    // PRAGMA synchronous=FULL (fsync at every commit) or NORMAL (in WAL
    // mode: durable across a process crash, the last commits may be lost
    // on power failure, never corrupted).
    bool sync_every_commit = true;
    // Wall clock (Unix seconds) for creationTimestamp and event age; tests
    // set a fixed one.
    std::function<int64_t()> now;
  };

  // Opens or creates the database at `path` (ROOT/state.db), sets WAL mode
  // and a busy timeout, and migrates the schema to kSchemaVersion in one
  // transaction. A database with a newer schema is refused
  // (FailedPrecondition naming both versions) and left untouched.
  static Result<std::unique_ptr<ObjectStore>> Open(const std::filesystem::path& path);
  static Result<std::unique_ptr<ObjectStore>> Open(const std::filesystem::path& path, Options options);

  ~ObjectStore();  // ends every watch with Cancelled
  ObjectStore(const ObjectStore&) = delete;
  ObjectStore& operator=(const ObjectStore&) = delete;

  // Stores a new object. metadata.name is required (a DNS subdomain);
  // metadata.resourceVersion must not be set. Sets uid (random UUID v4),
  // resourceVersion, generation = 1 and creationTimestamp (RFC 3339 UTC);
  // any caller-given uid, generation, creation or deletion timestamp is
  // replaced. Returns the stored object. AlreadyExists if the key is taken.
  // An owner reference with controller or blockOwnerDeletion true must name
  // an object that exists and is not being deleted, else FailedPrecondition
  // naming that owner (the API server's 409 Conflict): a dependent created
  // from a stale read would outlive its owner.
  Result<json> Create(std::string_view resource, json object);

  Result<json> Get(std::string_view resource, std::string_view ns, std::string_view name);

  // Objects of `resource` in namespace `ns` ("" with all_namespaces for
  // every namespace) that match the selectors.
  Result<ObjectList> List(std::string_view resource, std::string_view ns, const ListOptions& options = {},
                          bool all_namespaces = false);

  // Replaces an object's metadata and spec (PUT). If the object carries
  // metadata.resourceVersion (or uid) it must equal the stored one, else
  // Aborted (Conflict). .status is kept as stored (use UpdateStatus);
  // uid, creationTimestamp and deletionTimestamp are kept; generation is
  // incremented when .spec changes. An update that changes nothing is not
  // written and returns the stored object.
  // On an object being deleted (deletionTimestamp set, which no client can
  // set or clear): a write that adds a finalizer is refused
  // (InvalidArgument "metadata.finalizers: Forbidden: no new finalizers
  // can be added if the object is being deleted, found new finalizers
  // [...]"); one that leaves the finalizers empty removes the object
  // (one DELETED event carrying the written state), releasing a
  // foreground-deleted owner waiting for it. Same for UpdateStatus.
  Result<json> Update(std::string_view resource, json object);

  // Replaces only .status (the /status subresource); the rest of the
  // given object is ignored except the name, namespace and the
  // resourceVersion precondition.
  Result<json> UpdateStatus(std::string_view resource, json object);

  // DELETE, with Kubernetes' finalizer and owner-reference rules, all in
  // one transaction:
  //   - an object whose metadata.finalizers is empty is removed (DELETED
  //     event); one with finalizers gets metadata.deletionTimestamp (now)
  //     and deletionGracePeriodSeconds 0 and stays (MODIFIED event) until
  //     a write leaves its finalizers empty (see Update);
  //   - an object that already has a deletionTimestamp is returned as it
  //     is (no write, no event), whatever the propagation;
  //   - dependents (objects whose metadata.ownerReferences name its uid):
  //     kBackground deletes them after the owner, kForeground adds the
  //     "foregroundDeletion" finalizer to the owner when a dependent with
  //     blockOwnerDeletion: true exists, deletes the dependents, and
  //     releases the owner when the last such dependent is removed;
  //     kOrphan removes the owner references to it from its dependents
  //     first (what Kubernetes' "orphan" finalizer does, done at once).
  //     Cascades go at most kMaxCascadeDepth owners deep.
  // Preconditions are checked first (Aborted). Returns the object as the
  // delete left it: marked, or as it was removed (with the delete's
  // resourceVersion).
  Result<json> Delete(std::string_view resource, std::string_view ns, std::string_view name,
                      const Preconditions& pre = {}, Propagation propagation = Propagation::kBackground);

  // The garbage collector's sweep, in one transaction: deletes
  // (Background) every object not being deleted whose
  // metadata.ownerReferences are non-empty and name no object that still
  // exists, and releases every foreground-deleted object ("foregroundDeletion"
  // finalizer, deletionTimestamp set) that waits for no blocking dependent
  // any more (removing it if that was its last finalizer). What Delete and
  // Update do at once, for what they could not (a dependent created from a
  // stale read, an owner reference dropped by a write, a cascade past
  // kMaxCascadeDepth). Returns how many objects it deleted or released.
  Result<int> CollectGarbage();

  // Events of `resource` in `ns` (all namespaces when all_namespaces)
  // matching the selectors, with a resourceVersion greater than
  // `from_resource_version`. 0 means "now": the current objects are
  // delivered first as ADDED events (as for a Kubernetes watch without a
  // resourceVersion), then the changes after them. OutOfRange (Gone) if
  // events after `from_resource_version` were already pruned;
  // InvalidArgument for a version ahead of the store.
  // Note: an object MODIFIED so that it stops matching the label selector
  // is not announced as DELETED to the watcher (Kubernetes does that).
  Result<std::unique_ptr<Subscription>> Watch(std::string_view resource, std::string_view ns, const ListOptions& options,
                                       int64_t from_resource_version, bool all_namespaces = false);

  // The store's counter: the resourceVersion of the last write.
  Result<int64_t> CurrentResourceVersion();
  // The oldest resourceVersion a watch can still start from.
  Result<int64_t> OldestWatchableResourceVersion();

 private:
  struct Impl;
  explicit ObjectStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Parses a resourceVersion string as sent by clients ("" and "0" are 0).
Result<int64_t> ParseResourceVersion(std::string_view text);

// Formats Unix seconds as RFC 3339 UTC ("2026-11-28T11:52:22Z").
std::string FormatTimestamp(int64_t unix_seconds);

// A random (version 4) UUID from getrandom(2).
Result<std::string> NewUuid();

}  // namespace regdisk::state
