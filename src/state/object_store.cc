#include "state/object_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <charconv>
#include <chrono>
#include <mutex>

#include "state/sqlite.h"
#include "state/watch_queue.h"

namespace regdisk::state {
namespace {

// The schema, as an ordered list of migrations. Migration N brings a
// database from user_version N-1 to N; Open applies the missing ones in one
// transaction. Never edit a released migration: append a new one.
struct Migration {
  int version;
  const char* sql;
};
constexpr Migration kMigrations[] = {
    {1, R"sql(
CREATE TABLE objects (
  resource           TEXT NOT NULL,
  namespace          TEXT NOT NULL,
  name               TEXT NOT NULL,
  uid                TEXT NOT NULL UNIQUE,
  resource_version   INTEGER NOT NULL UNIQUE,
  generation         INTEGER NOT NULL,
  creation_timestamp TEXT NOT NULL,
  deletion_timestamp TEXT,
  labels             TEXT NOT NULL DEFAULT '{}',
  finalizers         TEXT NOT NULL DEFAULT '[]',
  body               TEXT NOT NULL,
  PRIMARY KEY (resource, namespace, name)
) WITHOUT ROWID;
CREATE TABLE events (
  resource_version INTEGER PRIMARY KEY,
  type             TEXT NOT NULL CHECK (type IN ('ADDED', 'MODIFIED', 'DELETED')),
  resource         TEXT NOT NULL,
  namespace        TEXT NOT NULL,
  name             TEXT NOT NULL,
  created_at       INTEGER NOT NULL,
  body             TEXT NOT NULL
);
CREATE INDEX events_by_age ON events (created_at);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO counters (name, value) VALUES ('resource_version', 0), ('compacted', 0);
)sql"},
};
static_assert(std::size(kMigrations) == kSchemaVersion, "one migration per schema version");

constexpr int kBusyTimeoutMs = 5000;

int64_t SystemNow() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The parts of an object's metadata the store reads and checks.
struct Meta {
  std::string ns;
  std::string name;
  Labels labels;
  json finalizers = json::array();
  std::optional<int64_t> resource_version;
  std::optional<std::string> uid;
};

Result<Meta> ReadMeta(std::string_view resource, const json& obj) {
  auto bad = [&](std::string what) { return InvalidArgument(std::string(resource) + ": " + what); };
  if (!obj.is_object()) return bad("the object must be a JSON object");
  auto m = obj.find("metadata");
  if (m == obj.end() || !m->is_object()) return bad("metadata must be an object with a name");
  Meta meta;
  auto str = [&](const char* field, std::string* out) -> Status {
    auto it = m->find(field);
    if (it == m->end() || it->is_null()) return OkStatus();
    if (!it->is_string()) return bad(std::string("metadata.") + field + " must be a string");
    *out = it->get<std::string>();
    return OkStatus();
  };
  RETURN_IF_ERROR(str("name", &meta.name));
  RETURN_IF_ERROR(str("namespace", &meta.ns));
  if (meta.name.empty()) return bad("metadata.name is required");
  if (!IsDnsSubdomain(meta.name)) {
    return bad("metadata.name \"" + meta.name +
               "\" is invalid: use at most 253 lower-case letters, digits, '-' and '.', beginning and ending "
               "with a letter or digit");
  }
  if (!meta.ns.empty() && (meta.ns.size() > 63 || !IsDnsSubdomain(meta.ns) || meta.ns.find('.') != std::string::npos)) {
    return bad("metadata.namespace \"" + meta.ns +
               "\" is invalid: use at most 63 lower-case letters, digits and '-', beginning and ending with a "
               "letter or digit");
  }
  std::string rv, uid;
  RETURN_IF_ERROR(str("resourceVersion", &rv));
  RETURN_IF_ERROR(str("uid", &uid));
  if (!rv.empty()) {
    ASSIGN_OR_RETURN(int64_t v, ParseResourceVersion(rv));
    meta.resource_version = v;
  }
  if (!uid.empty()) meta.uid = uid;
  if (auto l = m->find("labels"); l != m->end() && !l->is_null()) {
    if (!l->is_object()) return bad("metadata.labels must be a map of strings");
    for (const auto& [k, v] : l->items()) {
      if (!v.is_string()) return bad("metadata.labels[\"" + k + "\"] must be a string");
      RETURN_IF_ERROR(ValidateLabelKey(k).Annotate(std::string(resource) + " " + meta.name));
      RETURN_IF_ERROR(ValidateLabelValue(v.get<std::string>()).Annotate(std::string(resource) + " " + meta.name));
      meta.labels.emplace(k, v.get<std::string>());
    }
  }
  if (auto f = m->find("finalizers"); f != m->end() && !f->is_null()) {
    if (!f->is_array() || !std::all_of(f->begin(), f->end(), [](const json& x) { return x.is_string(); })) {
      return bad("metadata.finalizers must be a list of strings");
    }
    meta.finalizers = *f;
  }
  return meta;
}

Labels LabelsOf(const json& obj) {
  Labels out;
  auto m = obj.find("metadata");
  if (m == obj.end() || !m->is_object()) return out;
  auto l = m->find("labels");
  if (l == m->end() || !l->is_object()) return out;
  for (const auto& [k, v] : l->items()) {
    if (v.is_string()) out.emplace(k, v.get<std::string>());
  }
  return out;
}

std::string Describe(std::string_view resource, std::string_view ns, std::string_view name) {
  std::string s = std::string(resource) + " \"";
  if (!ns.empty()) s += std::string(ns) + "/";
  return s + std::string(name) + "\"";
}

Result<json> ParseBody(const std::string& text, std::string_view what) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return DataLoss("state.db: the stored JSON of " + std::string(what) + " does not parse");
  return j;
}

// A stored object, as read inside a write transaction.
struct Row {
  json body;
  std::string uid;
  int64_t resource_version = 0;
  int64_t generation = 0;
};

// Checks the descriptors SQLite opened on the database, its WAL and its
// shared-memory file for FD_CLOEXEC, and sets it where missing. SQLite's
// unix VFS opens every file with O_CLOEXEC (robust_open), so this is a
// safety net, not the mechanism; the tests check the flag directly.
void EnsureCloexec(const std::filesystem::path& db_path) {
  std::error_code ec;
  auto base = std::filesystem::weakly_canonical(db_path, ec);
  if (ec) return;
  std::string names[3] = {base.string(), base.string() + "-wal", base.string() + "-shm"};
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return;
  while (dirent* e = ::readdir(dir)) {
    int fd = std::atoi(e->d_name);
    if (e->d_name[0] == '.' || fd == ::dirfd(dir)) continue;
    char target[4096];
    std::string link = std::string("/proc/self/fd/") + e->d_name;
    ssize_t n = ::readlink(link.c_str(), target, sizeof target - 1);
    if (n <= 0) continue;
    std::string_view t(target, static_cast<size_t>(n));
    if (std::find(std::begin(names), std::end(names), t) == std::end(names)) continue;
    int flags = ::fcntl(fd, F_GETFD);
    if (flags >= 0 && (flags & FD_CLOEXEC) == 0) ::fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
  }
  ::closedir(dir);
}

}  // namespace

std::string_view EventTypeName(EventType t) {
  switch (t) {
    case EventType::kAdded: return "ADDED";
    case EventType::kModified: return "MODIFIED";
    case EventType::kDeleted: return "DELETED";
  }
  return "UNKNOWN";
}

namespace {
Result<EventType> ParseEventType(const std::string& s) {
  if (s == "ADDED") return EventType::kAdded;
  if (s == "MODIFIED") return EventType::kModified;
  if (s == "DELETED") return EventType::kDeleted;
  return DataLoss("state.db: unknown event type \"" + s + "\"");
}
}  // namespace

Result<int64_t> ParseResourceVersion(std::string_view text) {
  if (text.empty()) return int64_t{0};
  int64_t v = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || p != text.data() + text.size() || v < 0) {
    return InvalidArgument("resourceVersion \"" + std::string(text) +
                           "\" is invalid: use a value this server returned (a non-negative integer)");
  }
  return v;
}

std::string FormatTimestamp(int64_t unix_seconds) {
  time_t t = static_cast<time_t>(unix_seconds);
  struct tm tm {};
  ::gmtime_r(&t, &tm);
  char buf[32];
  size_t n = ::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return std::string(buf, n);
}

Result<std::string> NewUuid() {
  unsigned char b[16];
  size_t got = 0;
  while (got < sizeof b) {
    ssize_t n = ::getrandom(b + got, sizeof b - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("getrandom for a uid");
    }
    got += static_cast<size_t>(n);
  }
  b[6] = static_cast<unsigned char>((b[6] & 0x0f) | 0x40);  // version 4
  b[8] = static_cast<unsigned char>((b[8] & 0x3f) | 0x80);  // RFC 4122 variant
  static const char kHex[] = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) s += '-';
    s += kHex[b[i] >> 4];
    s += kHex[b[i] & 0xf];
  }
  return s;
}

struct ObjectStore::Impl {
  Options options;
  std::filesystem::path path;
  std::mutex mu;  // serialises every use of db and subs
  Db db;
  std::vector<std::shared_ptr<Subscription::Shared>> subs;

  int64_t Now() const { return options.now ? options.now() : SystemNow(); }

  Status TooNew(int64_t version) const;
  Status Migrate();
  Result<std::optional<Row>> Load(std::string_view resource, std::string_view ns, std::string_view name);
  Result<int64_t> Counter(const char* name);
  Result<int64_t> NextResourceVersion();
  Status PutRow(std::string_view resource, const Meta& meta, const Row& row, bool insert);
  Status AddEvent(EventType type, std::string_view resource, const Meta& meta, int64_t rv, const json& body);
  Status Prune();
  void Publish(EventType type, std::string_view resource, const Meta& meta, int64_t rv, const json& body);
  Result<json> Replace(std::string_view resource, json object, bool status_only);

  // ---- inside a write transaction (mu held) ----
  // Events written in the current transaction, published after its commit
  // (Flush) in resourceVersion order; a write that fails drops them.
  struct Pending {
    EventType type;
    std::string resource;
    Meta meta;
    int64_t rv;
    json body;
  };
  std::vector<Pending> pending;
  Status Record(EventType type, std::string_view resource, const Meta& meta, int64_t rv, const json& body);
  void Flush();

  struct Dependent {
    std::string resource;
    std::string ns;
    std::string name;
    bool blocking = false;  // its reference has blockOwnerDeletion: true
  };
  Result<std::vector<Dependent>> Dependents(const std::string& owner_uid);
  Result<bool> HasBlockingDependents(const std::string& owner_uid);
  // Writes `body` (metadata only changed) as the next version of the stored
  // row `old`: new resourceVersion, MODIFIED event.
  Result<json> WriteMetadata(std::string_view resource, const Row& old, json body);
  // Removes the row, records DELETED, and releases the foreground-deleted
  // owners that waited for it.
  Result<json> RemoveObject(std::string_view resource, const Meta& meta, json body, int depth);
  Status ReleaseOwners(const json& body, int depth);
  // Whether any object named by body's metadata.ownerReferences still exists.
  Result<bool> AnyOwnerLeft(const json& body);
  // Create's check: every controller or blockOwnerDeletion owner exists
  // and is not being deleted, else FailedPrecondition naming it.
  Status CheckOwners(std::string_view resource, const Meta& meta, const json& object);
  // Releases the foreground deletion of the object `uid` if it waits for
  // no blocking dependent any more. Whether it wrote.
  Result<bool> ReleaseOwner(const std::string& uid, int depth);
  Result<json> DeleteLocked(std::string_view resource, std::string_view ns, std::string_view name,
                            const Preconditions& pre, Propagation propagation, int depth);
};

namespace {

bool HasFinalizer(const json& finalizers, std::string_view f) {
  return std::any_of(finalizers.begin(), finalizers.end(), [&](const json& x) { return x == f; });
}

const json& FinalizersOf(const json& body) {
  static const json kNone = json::array();
  auto m = body.find("metadata");
  if (m == body.end() || !m->is_object()) return kNone;
  auto f = m->find("finalizers");
  return f != m->end() && f->is_array() ? *f : kNone;
}

bool BeingDeleted(const json& body) {
  auto m = body.find("metadata");
  return m != body.end() && m->is_object() && m->contains("deletionTimestamp") &&
         !(*m)["deletionTimestamp"].is_null();
}

// The owner references of `body` that name `uid`.
bool OwnedBy(const json& body, const std::string& uid, bool* blocking) {
  const json& md = body["metadata"];
  if (!md.is_object() || !md.contains("ownerReferences") || !md["ownerReferences"].is_array()) return false;
  bool found = false;
  for (const auto& ref : md["ownerReferences"]) {
    if (!ref.is_object() || ref.value("uid", "") != uid) continue;
    found = true;
    auto b = ref.find("blockOwnerDeletion");
    if (b != ref.end() && b->is_boolean() && b->get<bool>()) *blocking = true;
  }
  return found;
}

// Go's %#v of a []string, as Kubernetes' message prints the new finalizers.
std::string GoStringSlice(const std::vector<std::string>& items) {
  std::string out = "[]string{";
  for (size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + json(items[i]).dump();
  return out + "}";
}

}  // namespace

Status ObjectStore::Impl::TooNew(int64_t version) const {
  return FailedPrecondition(path.string() + ": schema version " + std::to_string(version) +
                            " is newer than this regdisk supports (" + std::to_string(kSchemaVersion) +
                            "); run a newer regdisk or restore a backup");
}

Status ObjectStore::Impl::Migrate() {
  ASSIGN_OR_RETURN(int64_t found, db.QueryInt("PRAGMA user_version"));
  if (found > kSchemaVersion) return TooNew(found);
  if (found == kSchemaVersion) return OkStatus();
  ASSIGN_OR_RETURN(Transaction txn, Transaction::Begin(db));
  // Read again under the write lock: another process may have migrated.
  ASSIGN_OR_RETURN(int64_t version, db.QueryInt("PRAGMA user_version"));
  if (version > kSchemaVersion) return TooNew(version);
  for (const Migration& m : kMigrations) {
    if (m.version <= version) continue;
    RETURN_IF_ERROR(db.Exec(m.sql).Annotate(path.string() + ": migrating the schema to version " +
                                            std::to_string(m.version)));
    RETURN_IF_ERROR(db.Exec("PRAGMA user_version = " + std::to_string(m.version)));
  }
  return txn.Commit();
}

Result<std::optional<Row>> ObjectStore::Impl::Load(std::string_view resource, std::string_view ns,
                                                    std::string_view name) {
  ASSIGN_OR_RETURN(Stmt st, db.Prepare("SELECT body, uid, resource_version, generation FROM objects "
                                       "WHERE resource = ?1 AND namespace = ?2 AND name = ?3"));
  RETURN_IF_ERROR(st.Bind(1, resource));
  RETURN_IF_ERROR(st.Bind(2, ns));
  RETURN_IF_ERROR(st.Bind(3, name));
  ASSIGN_OR_RETURN(bool found, st.Step());
  if (!found) return std::optional<Row>();
  Row row;
  ASSIGN_OR_RETURN(row.body, ParseBody(st.Text(0), Describe(resource, ns, name)));
  row.uid = st.Text(1);
  row.resource_version = st.Int(2);
  row.generation = st.Int(3);
  return std::optional<Row>(std::move(row));
}

Result<int64_t> ObjectStore::Impl::Counter(const char* name) {
  ASSIGN_OR_RETURN(Stmt st, db.Prepare("SELECT value FROM counters WHERE name = ?1"));
  RETURN_IF_ERROR(st.Bind(1, name));
  ASSIGN_OR_RETURN(bool found, st.Step());
  if (!found) return DataLoss(path.string() + ": the counter " + name + " is missing");
  return st.Int(0);
}

Result<int64_t> ObjectStore::Impl::NextResourceVersion() {
  ASSIGN_OR_RETURN(Stmt st, db.Prepare("UPDATE counters SET value = value + 1 WHERE name = 'resource_version' "
                                       "RETURNING value"));
  ASSIGN_OR_RETURN(bool found, st.Step());
  if (!found) return DataLoss(path.string() + ": the resource_version counter is missing");
  int64_t rv = st.Int(0);
  RETURN_IF_ERROR(st.Run());
  return rv;
}

Status ObjectStore::Impl::PutRow(std::string_view resource, const Meta& meta, const Row& row, bool insert) {
  json labels(meta.labels);
  const json& md = row.body["metadata"];
  std::string created = md.value("creationTimestamp", "");
  ASSIGN_OR_RETURN(Stmt st, db.Prepare(insert ? "INSERT INTO objects (resource, namespace, name, uid, "
                                                "resource_version, generation, creation_timestamp, "
                                                "deletion_timestamp, labels, finalizers, body) "
                                                "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
                                              : "UPDATE objects SET uid = ?4, resource_version = ?5, "
                                                "generation = ?6, creation_timestamp = ?7, "
                                                "deletion_timestamp = ?8, labels = ?9, finalizers = ?10, "
                                                "body = ?11 WHERE resource = ?1 AND namespace = ?2 AND name = ?3"));
  RETURN_IF_ERROR(st.Bind(1, resource));
  RETURN_IF_ERROR(st.Bind(2, meta.ns));
  RETURN_IF_ERROR(st.Bind(3, meta.name));
  RETURN_IF_ERROR(st.Bind(4, row.uid));
  RETURN_IF_ERROR(st.Bind(5, row.resource_version));
  RETURN_IF_ERROR(st.Bind(6, row.generation));
  RETURN_IF_ERROR(st.Bind(7, created));
  if (auto d = md.find("deletionTimestamp"); d != md.end() && d->is_string()) {
    RETURN_IF_ERROR(st.Bind(8, d->get<std::string>()));
  } else {
    RETURN_IF_ERROR(st.BindNull(8));
  }
  RETURN_IF_ERROR(st.Bind(9, labels.dump()));
  RETURN_IF_ERROR(st.Bind(10, meta.finalizers.dump()));
  RETURN_IF_ERROR(st.Bind(11, row.body.dump()));
  return st.Run();
}

Status ObjectStore::Impl::AddEvent(EventType type, std::string_view resource, const Meta& meta, int64_t rv,
                                   const json& body) {
  ASSIGN_OR_RETURN(Stmt st, db.Prepare("INSERT INTO events (resource_version, type, resource, namespace, name, "
                                       "created_at, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"));
  RETURN_IF_ERROR(st.Bind(1, rv));
  RETURN_IF_ERROR(st.Bind(2, EventTypeName(type)));
  RETURN_IF_ERROR(st.Bind(3, resource));
  RETURN_IF_ERROR(st.Bind(4, meta.ns));
  RETURN_IF_ERROR(st.Bind(5, meta.name));
  RETURN_IF_ERROR(st.Bind(6, Now()));
  RETURN_IF_ERROR(st.Bind(7, body.dump()));
  RETURN_IF_ERROR(st.Run());
  return Prune();
}

// Drops events beyond the count or older than the age limit, and records
// the newest dropped resourceVersion as 'compacted'. Events are contiguous
// (one per resourceVersion), so compacted = the oldest kept - 1.
Status ObjectStore::Impl::Prune() {
  ASSIGN_OR_RETURN(int64_t current, Counter("resource_version"));
  ASSIGN_OR_RETURN(Stmt del, db.Prepare("DELETE FROM events WHERE resource_version <= ?1 OR created_at < ?2"));
  RETURN_IF_ERROR(del.Bind(1, current - options.event_max_count));
  RETURN_IF_ERROR(del.Bind(2, Now() - static_cast<int64_t>(options.event_max_age.count())));
  RETURN_IF_ERROR(del.Run());
  if (sqlite3_changes(db.get()) == 0) return OkStatus();
  ASSIGN_OR_RETURN(Stmt up, db.Prepare("UPDATE counters SET value = (SELECT COALESCE(MIN(resource_version) - 1, ?1) "
                                       "FROM events) WHERE name = 'compacted'"));
  RETURN_IF_ERROR(up.Bind(1, current));
  return up.Run();
}

void ObjectStore::Impl::Publish(EventType type, std::string_view resource, const Meta& meta, int64_t rv,
                                const json& body) {
  std::erase_if(subs, [](const auto& s) { return s->Ended(); });
  for (const auto& s : subs) {
    if (s->Wants(resource, meta.ns, meta.name, meta.labels)) s->Offer(WatchEvent{type, rv, body});
  }
}

ObjectStore::ObjectStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

ObjectStore::~ObjectStore() {
  std::lock_guard lock(impl_->mu);
  for (const auto& s : impl_->subs) s->End(Cancelled("the object store was closed"), /*drop=*/false);
}

Result<std::unique_ptr<ObjectStore>> ObjectStore::Open(const std::filesystem::path& path) {
  return Open(path, Options{});
}

Result<std::unique_ptr<ObjectStore>> ObjectStore::Open(const std::filesystem::path& path, Options options) {
  auto impl = std::make_unique<Impl>();
  impl->options = std::move(options);
  impl->path = path;
  ASSIGN_OR_RETURN(impl->db, Db::Open(path));
  Db& db = impl->db;
  sqlite3_busy_timeout(db.get(), kBusyTimeoutMs);
  // Refuse a newer schema before changing anything (even the journal mode).
  ASSIGN_OR_RETURN(int64_t found, db.QueryInt("PRAGMA user_version"));
  if (found > kSchemaVersion) return impl->TooNew(found);
  {
    ASSIGN_OR_RETURN(Stmt st, db.Prepare("PRAGMA journal_mode = WAL"));
    ASSIGN_OR_RETURN(bool row, st.Step());
    if (!row || st.Text(0) != "wal") {
      return FailedPrecondition(path.string() + ": SQLite could not switch to WAL mode (journal_mode is " +
                                (row ? st.Text(0) : std::string("unknown")) +
                                "); is the file on a file system without shared memory?");
    }
  }
  RETURN_IF_ERROR(db.Exec(impl->options.sync_every_commit ? "PRAGMA synchronous = FULL"
                                                          : "PRAGMA synchronous = NORMAL"));
  RETURN_IF_ERROR(impl->Migrate());
  EnsureCloexec(path);
  return std::unique_ptr<ObjectStore>(new ObjectStore(std::move(impl)));
}

Result<json> ObjectStore::Create(std::string_view resource, json object) {
  ASSIGN_OR_RETURN(Meta meta, ReadMeta(resource, object));
  if (meta.resource_version) {
    return InvalidArgument(Describe(resource, meta.ns, meta.name) +
                           ": metadata.resourceVersion must not be set on create; remove it");
  }
  ASSIGN_OR_RETURN(std::string uid, NewUuid());
  Impl& s = *impl_;
  std::lock_guard lock(s.mu);
  ASSIGN_OR_RETURN(Transaction txn, Transaction::Begin(s.db));
  ASSIGN_OR_RETURN(std::optional<Row> existing, s.Load(resource, meta.ns, meta.name));
  if (existing) return AlreadyExists(Describe(resource, meta.ns, meta.name) + " already exists");
  RETURN_IF_ERROR(s.CheckOwners(resource, meta, object));
  ASSIGN_OR_RETURN(int64_t rv, s.NextResourceVersion());
  json& md = object["metadata"];
  md["uid"] = uid;
  md["resourceVersion"] = std::to_string(rv);
  md["generation"] = 1;
  md["creationTimestamp"] = FormatTimestamp(s.Now());
  md.erase("deletionTimestamp");
  md.erase("deletionGracePeriodSeconds");
  Row row{std::move(object), uid, rv, 1};
  RETURN_IF_ERROR(s.PutRow(resource, meta, row, /*insert=*/true));
  s.pending.clear();
  RETURN_IF_ERROR(s.Record(EventType::kAdded, resource, meta, rv, row.body));
  RETURN_IF_ERROR(txn.Commit());
  s.Flush();
  return std::move(row.body);
}

Result<json> ObjectStore::Get(std::string_view resource, std::string_view ns, std::string_view name) {
  std::lock_guard lock(impl_->mu);
  ASSIGN_OR_RETURN(std::optional<Row> row, impl_->Load(resource, ns, name));
  if (!row) return NotFound(Describe(resource, ns, name) + " not found");
  return std::move(row->body);
}

Result<ObjectList> ObjectStore::List(std::string_view resource, std::string_view ns, const ListOptions& options,
                                     bool all_namespaces) {
  ASSIGN_OR_RETURN(LabelSelector labels, LabelSelector::Parse(options.label_selector));
  ASSIGN_OR_RETURN(FieldSelector fields, FieldSelector::Parse(options.field_selector));
  Impl& s = *impl_;
  std::lock_guard lock(s.mu);
  ObjectList out;
  ASSIGN_OR_RETURN(out.resource_version, s.Counter("resource_version"));
  ASSIGN_OR_RETURN(Stmt st, s.db.Prepare(all_namespaces ? "SELECT namespace, name, labels, body FROM objects "
                                                          "WHERE resource = ?1 ORDER BY namespace, name"
                                                        : "SELECT namespace, name, labels, body FROM objects "
                                                          "WHERE resource = ?1 AND namespace = ?2 ORDER BY name"));
  RETURN_IF_ERROR(st.Bind(1, resource));
  if (!all_namespaces) RETURN_IF_ERROR(st.Bind(2, ns));
  for (;;) {
    ASSIGN_OR_RETURN(bool row, st.Step());
    if (!row) break;
    std::string obj_ns = st.Text(0), name = st.Text(1);
    if (!fields.Matches(obj_ns, name)) continue;
    if (!labels.empty()) {
      ASSIGN_OR_RETURN(json l, ParseBody(st.Text(2), Describe(resource, obj_ns, name)));
      if (!labels.Matches(LabelsOf(json{{"metadata", {{"labels", std::move(l)}}}}))) continue;
    }
    ASSIGN_OR_RETURN(json body, ParseBody(st.Text(3), Describe(resource, obj_ns, name)));
    out.items.push_back(std::move(body));
  }
  return out;
}

Result<json> ObjectStore::Impl::Replace(std::string_view resource, json object, bool status_only) {
  ASSIGN_OR_RETURN(Meta meta, ReadMeta(resource, object));
  std::string what = Describe(resource, meta.ns, meta.name);
  std::lock_guard lock(mu);
  ASSIGN_OR_RETURN(Transaction txn, Transaction::Begin(db));
  ASSIGN_OR_RETURN(std::optional<Row> old, Load(resource, meta.ns, meta.name));
  if (!old) return NotFound(what + " not found");
  if (meta.resource_version && *meta.resource_version != old->resource_version) {
    return Aborted("Conflict: " + what + " has been modified (resourceVersion " +
                   std::to_string(*meta.resource_version) + " given, " + std::to_string(old->resource_version) +
                   " stored); get the latest version, apply the change again and retry");
  }
  if (meta.uid && *meta.uid != old->uid) {
    return Aborted("Conflict: " + what + " has uid " + old->uid + ", not " + *meta.uid +
                   " (it was deleted and created again)");
  }
  json next;
  if (status_only) {
    next = old->body;
    if (auto st = object.find("status"); st != object.end()) {
      next["status"] = *st;
    } else {
      next.erase("status");
    }
    // The stored metadata (labels included) stays in force.
    ASSIGN_OR_RETURN(Meta m2, ReadMeta(resource, next));
    meta = std::move(m2);
  } else {
    next = std::move(object);
    if (auto st = old->body.find("status"); st != old->body.end()) {
      next["status"] = *st;
    } else {
      next.erase("status");
    }
  }
  const json& old_md = old->body["metadata"];
  json& md = next["metadata"];
  md["uid"] = old->uid;
  md["creationTimestamp"] = old_md.value("creationTimestamp", "");
  // Set by Delete only: a client can neither set nor clear them.
  for (const char* field : {"deletionTimestamp", "deletionGracePeriodSeconds"}) {
    if (auto d = old_md.find(field); d != old_md.end()) {
      md[field] = *d;
    } else {
      md.erase(field);
    }
  }
  const bool deleting = BeingDeleted(old->body);
  if (deleting) {
    const json& had = FinalizersOf(old->body);
    std::vector<std::string> added;
    for (const auto& f : meta.finalizers) {
      if (!HasFinalizer(had, f.get<std::string>())) added.push_back(f.get<std::string>());
    }
    if (!added.empty()) {
      return InvalidArgument("metadata.finalizers: Forbidden: no new finalizers can be added if the object is being "
                             "deleted, found new finalizers " + GoStringSlice(added));
    }
  }
  bool spec_changed = next.value("spec", json()) != old->body.value("spec", json());
  int64_t generation = old->generation + (spec_changed ? 1 : 0);
  md["generation"] = generation;
  md["resourceVersion"] = std::to_string(old->resource_version);
  if (next == old->body) return std::move(old->body);  // nothing changed: no write, no event

  pending.clear();
  if (deleting && meta.finalizers.empty()) {
    // The last finalizer is gone: the deletion completes.
    ASSIGN_OR_RETURN(json removed, RemoveObject(resource, meta, std::move(next), 0));
    RETURN_IF_ERROR(txn.Commit());
    Flush();
    return removed;
  }
  ASSIGN_OR_RETURN(int64_t rv, NextResourceVersion());
  md["resourceVersion"] = std::to_string(rv);
  Row row{std::move(next), old->uid, rv, generation};
  RETURN_IF_ERROR(PutRow(resource, meta, row, /*insert=*/false));
  RETURN_IF_ERROR(Record(EventType::kModified, resource, meta, rv, row.body));
  // An owner reference (or its blockOwnerDeletion) dropped by this write may
  // have been the last one a foreground deletion waited for.
  if (old->body["metadata"].value("ownerReferences", json()) != row.body["metadata"].value("ownerReferences", json())) {
    RETURN_IF_ERROR(ReleaseOwners(old->body, 0));
  }
  RETURN_IF_ERROR(txn.Commit());
  Flush();
  return std::move(row.body);
}

Result<json> ObjectStore::Update(std::string_view resource, json object) {
  return impl_->Replace(resource, std::move(object), /*status_only=*/false);
}

Result<json> ObjectStore::UpdateStatus(std::string_view resource, json object) {
  return impl_->Replace(resource, std::move(object), /*status_only=*/true);
}

Result<json> ObjectStore::Delete(std::string_view resource, std::string_view ns, std::string_view name,
                                 const Preconditions& pre, Propagation propagation) {
  Impl& s = *impl_;
  std::lock_guard lock(s.mu);
  s.pending.clear();
  ASSIGN_OR_RETURN(Transaction txn, Transaction::Begin(s.db));
  ASSIGN_OR_RETURN(json out, s.DeleteLocked(resource, ns, name, pre, propagation, 0));
  RETURN_IF_ERROR(txn.Commit());
  s.Flush();
  return out;
}

Status ObjectStore::Impl::Record(EventType type, std::string_view resource, const Meta& meta, int64_t rv,
                                 const json& body) {
  RETURN_IF_ERROR(AddEvent(type, resource, meta, rv, body));
  pending.push_back(Pending{type, std::string(resource), meta, rv, body});
  return OkStatus();
}

void ObjectStore::Impl::Flush() {
  for (const Pending& p : pending) Publish(p.type, p.resource, p.meta, p.rv, p.body);
  pending.clear();
}

Result<std::vector<ObjectStore::Impl::Dependent>> ObjectStore::Impl::Dependents(const std::string& owner_uid) {
  std::vector<Dependent> out;
  if (owner_uid.empty()) return out;
  // A uid is unique and random: a body that names it is almost always a
  // dependent; OwnedBy checks.
  ASSIGN_OR_RETURN(Stmt st, db.Prepare("SELECT resource, namespace, name, body FROM objects "
                                       "WHERE instr(body, ?1) > 0 ORDER BY resource, namespace, name"));
  RETURN_IF_ERROR(st.Bind(1, owner_uid));
  for (;;) {
    ASSIGN_OR_RETURN(bool row, st.Step());
    if (!row) break;
    Dependent d{st.Text(0), st.Text(1), st.Text(2)};
    ASSIGN_OR_RETURN(json body, ParseBody(st.Text(3), Describe(d.resource, d.ns, d.name)));
    if (body.is_object() && OwnedBy(body, owner_uid, &d.blocking)) out.push_back(std::move(d));
  }
  return out;
}

Result<bool> ObjectStore::Impl::HasBlockingDependents(const std::string& owner_uid) {
  ASSIGN_OR_RETURN(std::vector<Dependent> deps, Dependents(owner_uid));
  return std::any_of(deps.begin(), deps.end(), [](const Dependent& d) { return d.blocking; });
}

Result<json> ObjectStore::Impl::WriteMetadata(std::string_view resource, const Row& old, json body) {
  ASSIGN_OR_RETURN(Meta meta, ReadMeta(resource, body));
  ASSIGN_OR_RETURN(int64_t rv, NextResourceVersion());
  body["metadata"]["resourceVersion"] = std::to_string(rv);
  Row row{std::move(body), old.uid, rv, old.generation};
  RETURN_IF_ERROR(PutRow(resource, meta, row, /*insert=*/false));
  RETURN_IF_ERROR(Record(EventType::kModified, resource, meta, rv, row.body));
  return std::move(row.body);
}

Result<json> ObjectStore::Impl::RemoveObject(std::string_view resource, const Meta& meta, json body, int depth) {
  ASSIGN_OR_RETURN(int64_t rv, NextResourceVersion());
  body["metadata"]["resourceVersion"] = std::to_string(rv);
  ASSIGN_OR_RETURN(Stmt del, db.Prepare("DELETE FROM objects WHERE resource = ?1 AND namespace = ?2 AND name = ?3"));
  RETURN_IF_ERROR(del.Bind(1, resource));
  RETURN_IF_ERROR(del.Bind(2, meta.ns));
  RETURN_IF_ERROR(del.Bind(3, meta.name));
  RETURN_IF_ERROR(del.Run());
  RETURN_IF_ERROR(Record(EventType::kDeleted, resource, meta, rv, body));
  RETURN_IF_ERROR(ReleaseOwners(body, depth));
  // The row is gone, so the owner is gone: its dependents with no other
  // owner left go too (Background, as Kubernetes' garbage collector does
  // after the owner's DELETED; an owner merely marked is still an owner).
  const std::string uid = body["metadata"].value("uid", "");
  if (depth + 1 < kMaxCascadeDepth) {
    ASSIGN_OR_RETURN(std::vector<Dependent> deps, Dependents(uid));
    for (const Dependent& d : deps) {
      ASSIGN_OR_RETURN(std::optional<Row> dep, Load(d.resource, d.ns, d.name));
      if (!dep) continue;
      ASSIGN_OR_RETURN(bool owned, AnyOwnerLeft(dep->body));
      if (owned) continue;
      Result<json> r = DeleteLocked(d.resource, d.ns, d.name, {}, Propagation::kBackground, depth + 1);
      if (!r.ok() && r.status().code() != Code::kNotFound) return r.status();
    }
  }
  return body;
}

Result<bool> ObjectStore::Impl::AnyOwnerLeft(const json& body) {
  const json& md = body["metadata"];
  if (!md.contains("ownerReferences") || !md["ownerReferences"].is_array()) return false;
  for (const auto& ref : md["ownerReferences"]) {
    if (!ref.is_object() || !ref.contains("uid") || !ref["uid"].is_string()) continue;
    ASSIGN_OR_RETURN(Stmt st, db.Prepare("SELECT 1 FROM objects WHERE uid = ?1"));
    RETURN_IF_ERROR(st.Bind(1, ref["uid"].get<std::string>()));
    ASSIGN_OR_RETURN(bool found, st.Step());
    if (found) return true;
  }
  return false;
}

// A removed dependent may have been the last one a foreground deletion of
// its owner waited for: the owner loses "foregroundDeletion", and goes if
// that was its last finalizer (as Kubernetes' garbage collector does).
Status ObjectStore::Impl::ReleaseOwners(const json& body, int depth) {
  const json& md = body["metadata"];
  if (!md.contains("ownerReferences") || !md["ownerReferences"].is_array()) return OkStatus();
  // Past the cap the owners stay marked here; CollectGarbage releases them.
  if (depth >= kMaxCascadeDepth) return OkStatus();
  for (const auto& ref : md["ownerReferences"]) {
    if (!ref.is_object() || !ref.contains("uid") || !ref["uid"].is_string()) continue;
    RETURN_IF_ERROR(ReleaseOwner(ref["uid"].get<std::string>(), depth).status());
  }
  return OkStatus();
}

Result<bool> ObjectStore::Impl::ReleaseOwner(const std::string& uid, int depth) {
  ASSIGN_OR_RETURN(Stmt st, db.Prepare("SELECT resource, namespace, name FROM objects WHERE uid = ?1"));
  RETURN_IF_ERROR(st.Bind(1, uid));
  ASSIGN_OR_RETURN(bool found, st.Step());
  if (!found) return false;
  const std::string resource = st.Text(0), ns = st.Text(1), name = st.Text(2);
  ASSIGN_OR_RETURN(std::optional<Row> owner, Load(resource, ns, name));
  if (!owner || !BeingDeleted(owner->body) ||
      !HasFinalizer(FinalizersOf(owner->body), kForegroundDeletionFinalizer)) {
    return false;
  }
  ASSIGN_OR_RETURN(bool blocked, HasBlockingDependents(uid));
  if (blocked) return false;
  json next = owner->body;
  json kept = json::array();
  for (const auto& f : FinalizersOf(owner->body)) {
    if (f != kForegroundDeletionFinalizer) kept.push_back(f);
  }
  next["metadata"]["finalizers"] = kept;
  if (kept.empty()) {
    next["metadata"].erase("finalizers");
    ASSIGN_OR_RETURN(Meta meta, ReadMeta(resource, next));
    RETURN_IF_ERROR(RemoveObject(resource, meta, std::move(next), depth + 1).status());
  } else {
    RETURN_IF_ERROR(WriteMetadata(resource, *owner, std::move(next)).status());
  }
  return true;
}

Status ObjectStore::Impl::CheckOwners(std::string_view resource, const Meta& meta, const json& object) {
  const json& md = object["metadata"];
  if (!md.contains("ownerReferences") || !md["ownerReferences"].is_array()) return OkStatus();
  for (const auto& ref : md["ownerReferences"]) {
    if (!ref.is_object() || !ref.contains("uid") || !ref["uid"].is_string()) continue;
    auto flag = [&](const char* key) {
      auto f = ref.find(key);
      return f != ref.end() && f->is_boolean() && f->get<bool>();
    };
    if (!flag("controller") && !flag("blockOwnerDeletion")) continue;
    const std::string uid = ref["uid"].get<std::string>();
    const std::string owner = ref.value("kind", std::string("owner")) + " \"" + ref.value("name", std::string()) +
                              "\" (uid " + uid + ")";
    ASSIGN_OR_RETURN(Stmt st, db.Prepare("SELECT body FROM objects WHERE uid = ?1"));
    RETURN_IF_ERROR(st.Bind(1, uid));
    ASSIGN_OR_RETURN(bool found, st.Step());
    const std::string what = Describe(resource, meta.ns, meta.name);
    if (!found) {
      return FailedPrecondition(what + ": its owner " + owner + " does not exist; create it under an owner that does");
    }
    ASSIGN_OR_RETURN(json body, ParseBody(st.Text(0), what + "'s owner"));
    if (BeingDeleted(body)) {
      return FailedPrecondition(what + ": its owner " + owner + " is being deleted");
    }
  }
  return OkStatus();
}

Result<int> ObjectStore::CollectGarbage() {
  Impl& s = *impl_;
  std::lock_guard lock(s.mu);
  s.pending.clear();
  ASSIGN_OR_RETURN(Transaction txn, Transaction::Begin(s.db));
  struct Found {
    std::string resource, ns, name, uid;
    json body;
  };
  std::vector<Found> all;
  {
    ASSIGN_OR_RETURN(Stmt st, s.db.Prepare("SELECT resource, namespace, name, uid, body FROM objects "
                                           "ORDER BY resource, namespace, name"));
    for (;;) {
      ASSIGN_OR_RETURN(bool row, st.Step());
      if (!row) break;
      Found f{st.Text(0), st.Text(1), st.Text(2), st.Text(3), json()};
      ASSIGN_OR_RETURN(f.body, ParseBody(st.Text(4), Describe(f.resource, f.ns, f.name)));
      all.push_back(std::move(f));
    }
  }
  int written = 0;
  for (const Found& f : all) {
    ASSIGN_OR_RETURN(std::optional<Row> now, s.Load(f.resource, f.ns, f.name));
    if (!now || now->uid != f.uid) continue;  // gone with an earlier one
    const json& md = now->body["metadata"];
    const bool owned = md.contains("ownerReferences") && md["ownerReferences"].is_array() &&
                       !md["ownerReferences"].empty();
    if (owned && !BeingDeleted(now->body)) {
      ASSIGN_OR_RETURN(bool left, s.AnyOwnerLeft(now->body));
      if (!left) {
        Result<json> r = s.DeleteLocked(f.resource, f.ns, f.name, {}, Propagation::kBackground, 0);
        if (!r.ok() && r.status().code() != Code::kNotFound) return r.status();
        ++written;
        continue;
      }
    }
    ASSIGN_OR_RETURN(bool released, s.ReleaseOwner(f.uid, 0));
    if (released) ++written;
  }
  RETURN_IF_ERROR(txn.Commit());
  s.Flush();
  return written;
}

Result<json> ObjectStore::Impl::DeleteLocked(std::string_view resource, std::string_view ns, std::string_view name,
                                             const Preconditions& pre, Propagation propagation, int depth) {
  std::string what = Describe(resource, ns, name);
  ASSIGN_OR_RETURN(std::optional<Row> old, Load(resource, ns, name));
  if (!old) return NotFound(what + " not found");
  if (pre.uid && *pre.uid != old->uid) {
    return Aborted("Conflict: precondition failed for deleting " + what + ": uid is " + old->uid + ", not " +
                   *pre.uid);
  }
  if (pre.resource_version && *pre.resource_version != old->resource_version) {
    return Aborted("Conflict: precondition failed for deleting " + what + ": resourceVersion is " +
                   std::to_string(old->resource_version) + ", not " + std::to_string(*pre.resource_version));
  }
  // Already being deleted: nothing more to do (its finalizers decide).
  if (BeingDeleted(old->body)) return std::move(old->body);
  ASSIGN_OR_RETURN(Meta meta, ReadMeta(resource, old->body));
  const std::string uid = old->uid;
  ASSIGN_OR_RETURN(std::vector<Dependent> deps, Dependents(uid));
  if (depth >= kMaxCascadeDepth) deps.clear();
  bool blocking = std::any_of(deps.begin(), deps.end(), [](const Dependent& d) { return d.blocking; });

  if (propagation == Propagation::kOrphan) {
    for (const Dependent& d : deps) {
      ASSIGN_OR_RETURN(std::optional<Row> dep, Load(d.resource, d.ns, d.name));
      if (!dep) continue;
      json next = dep->body;
      json kept = json::array();
      for (const auto& ref : next["metadata"]["ownerReferences"]) {
        if (!ref.is_object() || ref.value("uid", "") != uid) kept.push_back(ref);
      }
      if (kept.empty()) {
        next["metadata"].erase("ownerReferences");
      } else {
        next["metadata"]["ownerReferences"] = kept;
      }
      RETURN_IF_ERROR(WriteMetadata(d.resource, *dep, std::move(next)).status());
    }
    deps.clear();
    blocking = false;
  }

  json body = std::move(old->body);
  json& md = body["metadata"];
  const bool foreground = propagation == Propagation::kForeground && blocking;
  if (foreground && !HasFinalizer(meta.finalizers, kForegroundDeletionFinalizer)) {
    meta.finalizers.push_back(kForegroundDeletionFinalizer);
    md["finalizers"] = meta.finalizers;
  }
  json out;
  if (meta.finalizers.empty()) {
    ASSIGN_OR_RETURN(out, RemoveObject(resource, meta, std::move(body), depth));
  } else {
    md["deletionTimestamp"] = FormatTimestamp(Now());
    md["deletionGracePeriodSeconds"] = 0;
    ASSIGN_OR_RETURN(out, WriteMetadata(resource, *old, std::move(body)));
  }
  // Foreground: the dependents while the owner waits for them (their
  // removal releases it, see ReleaseOwners). Background: RemoveObject
  // deleted them if the owner's row went; an owner only marked (its
  // finalizers remain) is still their owner, and they stay.
  if (foreground) {
    for (const Dependent& d : deps) {
      Result<json> r = DeleteLocked(d.resource, d.ns, d.name, {}, propagation, depth + 1);
      if (!r.ok() && r.status().code() != Code::kNotFound) return r.status();
    }
    // The owner as the cascade left it (released and removed, perhaps).
    ASSIGN_OR_RETURN(std::optional<Row> now, Load(resource, ns, name));
    if (now && now->uid == uid) return std::move(now->body);
    for (auto it = pending.rbegin(); it != pending.rend(); ++it) {
      if (it->type == EventType::kDeleted && it->resource == resource && it->meta.ns == ns && it->meta.name == name) {
        return it->body;
      }
    }
  }
  return out;
}

Result<std::unique_ptr<Subscription>> ObjectStore::Watch(std::string_view resource, std::string_view ns,
                                                         const ListOptions& options, int64_t from_resource_version,
                                                         bool all_namespaces) {
  auto shared = std::make_shared<Subscription::Shared>();
  shared->resource = std::string(resource);
  shared->ns = std::string(ns);
  shared->all_namespaces = all_namespaces;
  ASSIGN_OR_RETURN(shared->labels, LabelSelector::Parse(options.label_selector));
  ASSIGN_OR_RETURN(shared->fields, FieldSelector::Parse(options.field_selector));
  int efd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (efd < 0) return ErrnoStatus("creating an eventfd for a watch");
  shared->event_fd = UniqueFd(efd);
  if (from_resource_version < 0) return InvalidArgument("resourceVersion must not be negative");

  Impl& s = *impl_;
  std::lock_guard lock(s.mu);
  ASSIGN_OR_RETURN(int64_t current, s.Counter("resource_version"));
  ASSIGN_OR_RETURN(int64_t compacted, s.Counter("compacted"));
  if (from_resource_version > current) {
    return InvalidArgument("resourceVersion " + std::to_string(from_resource_version) +
                           " is ahead of this store (" + std::to_string(current) +
                           "); watch from a version a list or get returned");
  }
  std::vector<WatchEvent> backlog;
  auto wants = [&](const std::string& obj_ns, const std::string& name, const json& body) {
    return shared->Wants(resource, obj_ns, name, LabelsOf(body));
  };
  if (from_resource_version == 0) {
    // "Now": the current objects as ADDED, oldest first.
    ASSIGN_OR_RETURN(Stmt st, s.db.Prepare("SELECT namespace, name, resource_version, body FROM objects "
                                           "WHERE resource = ?1 ORDER BY resource_version"));
    RETURN_IF_ERROR(st.Bind(1, resource));
    for (;;) {
      ASSIGN_OR_RETURN(bool row, st.Step());
      if (!row) break;
      std::string obj_ns = st.Text(0), name = st.Text(1);
      ASSIGN_OR_RETURN(json body, ParseBody(st.Text(3), Describe(resource, obj_ns, name)));
      if (wants(obj_ns, name, body)) backlog.push_back({EventType::kAdded, st.Int(2), std::move(body)});
    }
  } else {
    if (from_resource_version < compacted) {
      return OutOfRange("too old resource version: " + std::to_string(from_resource_version) + " (events up to " +
                        std::to_string(compacted) + " are no longer kept); list again and watch from the list's "
                        "resourceVersion");
    }
    ASSIGN_OR_RETURN(Stmt st, s.db.Prepare("SELECT resource_version, type, namespace, name, body FROM events "
                                           "WHERE resource_version > ?1 AND resource = ?2 "
                                           "ORDER BY resource_version"));
    RETURN_IF_ERROR(st.Bind(1, from_resource_version));
    RETURN_IF_ERROR(st.Bind(2, resource));
    for (;;) {
      ASSIGN_OR_RETURN(bool row, st.Step());
      if (!row) break;
      std::string obj_ns = st.Text(2), name = st.Text(3);
      ASSIGN_OR_RETURN(EventType type, ParseEventType(st.Text(1)));
      ASSIGN_OR_RETURN(json body, ParseBody(st.Text(4), "an event of " + Describe(resource, obj_ns, name)));
      if (wants(obj_ns, name, body)) backlog.push_back({type, st.Int(0), std::move(body)});
    }
  }
  shared->limit = s.options.watch_queue_limit + backlog.size();
  for (WatchEvent& ev : backlog) shared->Offer(std::move(ev));
  s.subs.push_back(shared);
  return std::make_unique<Subscription>(std::move(shared));
}

Result<int64_t> ObjectStore::CurrentResourceVersion() {
  std::lock_guard lock(impl_->mu);
  return impl_->Counter("resource_version");
}

Result<int64_t> ObjectStore::OldestWatchableResourceVersion() {
  std::lock_guard lock(impl_->mu);
  return impl_->Counter("compacted");
}

}  // namespace regdisk::state
