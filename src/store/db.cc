#include "store/db.h"

#include <sqlite3.h>

#include <iterator>
#include <optional>
#include <vector>

#include <nlohmann/json.hpp>

#include "oci/manifest.h"
#include "util/env.h"
#include "util/fs.h"
#include "util/log.h"
#include "util/text.h"

namespace regdisk::store {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// Migration N brings the database from N-1 to N. Never edit one that was
// released: append the next.
struct Migration {
  int version;
  const char* sql;
};
constexpr Migration kMigrations[] = {
    {1, R"sql(
CREATE TABLE chunk_disks (
  dir         TEXT PRIMARY KEY,  -- its directory under ROOT/disks
  file        TEXT NOT NULL,     -- the disk file in it
  chunk_shift INTEGER NOT NULL   -- chunk size = 1 << chunk_shift
) WITHOUT ROWID;
CREATE TABLE chunks (
  dir         TEXT NOT NULL,     -- chunk_disks.dir
  chunk       INTEGER NOT NULL,  -- chunk number: guest offset = chunk << chunk_shift
  chunk_shift INTEGER NOT NULL,
  digest      TEXT NOT NULL,     -- SHA-256 (hex) of the chunk's bytes; zero chunks are not listed
  PRIMARY KEY (dir, chunk)
) WITHOUT ROWID;
CREATE INDEX chunks_by_digest ON chunks (chunk_shift, digest);
)sql"},
    // The names, which refs.json held before (imported on the way).
    {2, R"sql(
CREATE TABLE refs (
  name     TEXT NOT NULL,            -- as pulled: "docker://host/repo:tag"
  platform TEXT NOT NULL,            -- the image's own, "linux/amd64"; '' when unknown
  manifest TEXT NOT NULL,            -- the manifest digest, "sha256:…"
  path     TEXT NOT NULL DEFAULT '', -- the disk's path in the image when one was asked for
  PRIMARY KEY (name, platform)
) WITHOUT ROWID;
CREATE TABLE refs_imports (
  sha256      TEXT PRIMARY KEY,      -- of a refs.json whose names were imported
  imported_at INTEGER NOT NULL
) WITHOUT ROWID;
)sql"},
};

constexpr uint64_t kMaxRefsJsonBytes = 64 << 20;

Result<int64_t> VersionOf(state::Db& db) {
  ASSIGN_OR_RETURN(int64_t tables, db.QueryInt("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND "
                                               "name = 'schema_migrations'"));
  if (tables == 0) return 0;
  return db.QueryInt("SELECT COALESCE(MAX(version), 0) FROM schema_migrations");
}

// One name of refs.json.
struct LegacyRef {
  std::string name, platform;  // platform "" when refs.json does not say
  oci::Digest manifest;
  std::string path;
};

Status Damaged(const fs::path& file, const std::string& why) {
  return DataLoss("the node store's names file " + file.string() + " (written by an older regdisk) is damaged (" + why +
                  "), and nothing was changed; run regdisk fsck --repair to set it aside (its names are lost: pull "
                  "those images again), or mend it by hand");
}

// The names in refs.json's text; entries whose value is not a digest are
// skipped (an older regdisk skipped them too), with a warning if `warn`.
Result<std::vector<LegacyRef>> ParseLegacyRefs(const fs::path& file, const std::string& text, bool warn) {
  const json j = json::parse(text, nullptr, false);
  if (j.is_discarded()) return Damaged(file, "not JSON");
  if (!j.is_object()) return Damaged(file, "not a JSON object");
  std::vector<LegacyRef> out;
  auto add = [&](const std::string& name, const std::string& platform, const json& value) {
    const std::string v = value.is_string() ? value.get<std::string>() : "";
    const size_t hash = v.find('#');
    auto d = oci::Digest::Parse(v.substr(0, hash));
    if (!d.ok()) {
      if (warn) log::Warn("{}: the name {} does not map to a digest; it is not imported", file.string(), Printable(name, 200));
      return;
    }
    out.push_back(LegacyRef{name, platform, *d, hash == std::string::npos ? "" : v.substr(hash + 1)});
  };
  for (const auto& [name, value] : j.items()) {
    if (value.is_object()) {  // name -> platform -> digest
      for (const auto& [platform, v] : value.items()) add(name, platform == "unknown" ? "" : platform, v);
    } else {  // the form before platforms were recorded
      add(name, "", value);
    }
  }
  return out;
}

bool Imported(state::Db& db, const std::string& sha) {
  auto st = db.Prepare("SELECT 1 FROM refs_imports WHERE sha256 = ?1");
  if (!st.ok() || !st->Bind(1, sha).ok()) return false;
  auto row = st->Step();
  return row.ok() && *row;
}

// Imports refs.json's names (in the caller's transaction) unless a file
// with these bytes was imported before.
Status Import(state::Db& db, const fs::path& root, const std::string& text, const std::string& sha) {
  if (Imported(db, sha)) return OkStatus();
  const fs::path file = root / "refs.json";
  ASSIGN_OR_RETURN(std::vector<LegacyRef> refs, ParseLegacyRefs(file, text, true));
  for (LegacyRef& r : refs) {
    ASSIGN_OR_RETURN(state::Stmt st, db.Prepare("INSERT OR REPLACE INTO refs (name, platform, manifest, path) "
                                                "VALUES (?1, ?2, ?3, ?4)"));
    // The form before platforms were recorded: the stored config says.
    if (r.platform.empty()) r.platform = StoredPlatformOf(root, r.manifest);
    RETURN_IF_ERROR(st.Bind(1, r.name));
    RETURN_IF_ERROR(st.Bind(2, r.platform));
    RETURN_IF_ERROR(st.Bind(3, r.manifest.str()));
    RETURN_IF_ERROR(st.Bind(4, r.path));
    RETURN_IF_ERROR(st.Run());
  }
  ASSIGN_OR_RETURN(state::Stmt rec, db.Prepare("INSERT INTO refs_imports (sha256, imported_at) "
                                               "VALUES (?1, strftime('%s', 'now'))"));
  RETURN_IF_ERROR(rec.Bind(1, sha));
  RETURN_IF_ERROR(rec.Run());
  log::Info("imported {} names from {} into {}", refs.size(), file.string(), (root / "store.db").string());
  return OkStatus();
}

// What refs.json holds once its names are in the database: valid JSON but
// not an object, which a regdisk from before the database refuses as
// damaged (so its prune and rmi stop before removing anything, rather than
// finding no names and removing every disk).
constexpr std::string_view kMovedMarker =
    "[\"regdisk: this store's names are in store.db; run a regdisk that knows it. Do not remove this file.\"]\n";

// refs.json's bytes, or nullopt when there is none (or only the marker).
Result<std::optional<std::string>> ReadLegacyFile(const fs::path& root) {
  const fs::path file = root / "refs.json";
  std::error_code ec;
  if (!fs::exists(file, ec)) return std::optional<std::string>();
  auto text = ReadFileCapped(file, kMaxRefsJsonBytes);
  if (!text.ok()) {
    if (text.status().code() == Code::kNotFound) return std::optional<std::string>();  // renamed meanwhile
    if (text.status().code() == Code::kResourceExhausted) return Damaged(file, text.status().message());
    return std::move(text).status();
  }
  if (*text == kMovedMarker) return std::optional<std::string>();
  return std::optional<std::string>(std::move(*text));
}

// After the commit: refs.json is kept beside as refs.json.migrated, and the
// marker takes its place. A failure is only logged (the names are in the
// database; the next open renames it).
void SetAside(const fs::path& root, const std::string& sha) {
  std::error_code ec;
  fs::path to = root / "refs.json.migrated";
  if (fs::exists(to, ec)) to = root / ("refs.json.migrated-" + sha.substr(0, 12));
  Status st = Env::Default()->Rename(root / "refs.json", to);
  if (st.ok()) st = WriteFileAtomic(root / "refs.json", std::string(kMovedMarker), 0600);
  if (!st.ok()) {
    log::Warn("{} was imported but could not be replaced ({}); it is on the next open", (root / "refs.json").string(),
              st.message());
  }
}

// A refs.json whose names are not in the database yet.
bool LegacyPending(const fs::path& root) {
  auto text = ReadLegacyFile(root);
  return !text.ok() || text->has_value();
}

}  // namespace

int StoreDbSchemaVersion() { return static_cast<int>(std::size(kMigrations)); }

namespace {

Status TooNew(int64_t v) {
  return FailedPrecondition("its schema version " + std::to_string(v) +
                            " is newer than this regdisk knows (" + std::to_string(StoreDbSchemaVersion()) +
                            "); run a newer regdisk");
}

// Applies the migrations `db` lacks and imports refs.json, in one
// transaction; the refs.json imported (its text), if any, in *imported.
Status Migrate(state::Db& db, const fs::path& root, std::optional<std::string>* imported) {
  ASSIGN_OR_RETURN(state::Transaction txn, state::Transaction::Begin(db));
  // Under the write lock: another process may have migrated meanwhile, or
  // imported refs.json and renamed it.
  RETURN_IF_ERROR(db.Exec("CREATE TABLE IF NOT EXISTS schema_migrations ("
                          "version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"));
  ASSIGN_OR_RETURN(int64_t version, VersionOf(db));
  if (version > StoreDbSchemaVersion()) return TooNew(version);
  for (const Migration& m : kMigrations) {
    if (m.version <= version) continue;
    RETURN_IF_ERROR(db.Exec(m.sql).Annotate("migrating to schema version " + std::to_string(m.version)));
    RETURN_IF_ERROR(db.Exec("INSERT INTO schema_migrations (version, applied_at) VALUES (" +
                            std::to_string(m.version) + ", strftime('%s', 'now'))"));
  }
  ASSIGN_OR_RETURN(*imported, ReadLegacyFile(root));
  if (*imported) RETURN_IF_ERROR(Import(db, root, **imported, oci::Digest::Sha256Of(**imported).hex()));
  return txn.Commit();
}

Result<state::Db> Open(const fs::path& root) {
  const fs::path path = root / "store.db";
  ASSIGN_OR_RETURN(state::Db db, state::Db::Open(path));
  sqlite3_busy_timeout(db.get(), kBusyTimeoutMs);
  {
    ASSIGN_OR_RETURN(state::Stmt st, db.Prepare("PRAGMA journal_mode = WAL"));
    ASSIGN_OR_RETURN(bool row, st.Step());
    if (!row || st.Text(0) != "wal") {
      return FailedPrecondition("SQLite could not switch it to WAL mode; is the store on a file system without "
                                "shared memory?");
    }
  }
  // The names are the store's truth: a commit that returned is on disk.
  RETURN_IF_ERROR(db.Exec("PRAGMA synchronous = FULL"));
  ASSIGN_OR_RETURN(int64_t found, VersionOf(db));
  if (found > StoreDbSchemaVersion()) return TooNew(found);
  std::error_code ec;
  if (found == StoreDbSchemaVersion() && !LegacyPending(root)) return db;  // the common case
  std::optional<std::string> imported;
  RETURN_IF_ERROR(Migrate(db, root, &imported));
  if (imported) SetAside(root, oci::Digest::Sha256Of(*imported).hex());
  return db;
}

}  // namespace

Result<state::Db> OpenStoreDb(const fs::path& root) {
  // A refs.json that cannot be imported is refused before the database is
  // even created: nothing changes.
  RETURN_IF_ERROR(CheckLegacyRefs(root));
  auto db = Open(root);
  if (!db.ok()) return std::move(db).status().Annotate("the store's database " + (root / "store.db").string());
  return db;
}

Status CheckLegacyRefs(const fs::path& root) {
  ASSIGN_OR_RETURN(std::optional<std::string> text, ReadLegacyFile(root));
  if (!text) return OkStatus();
  return ParseLegacyRefs(root / "refs.json", *text, false).status();
}

std::string StoredPlatformOf(const fs::path& root, const oci::Digest& manifest) {
  auto blob = [&](const oci::Digest& d) { return root / "blobs" / d.algorithm() / d.hex(); };
  auto mt = ReadFileCapped(blob(manifest), 4 << 20);
  if (!mt.ok()) return "";
  auto m = oci::Manifest::Parse(*mt);
  if (!m.ok() || !m->config) return "";
  auto ct = ReadFileCapped(blob(m->config->digest), 4 << 20);
  if (!ct.ok()) return "";
  const json c = json::parse(*ct, nullptr, false);
  if (!c.is_object()) return "";
  auto field = [&](const char* key) -> std::string {
    auto it = c.find(key);
    return it != c.end() && it->is_string() ? it->get<std::string>() : "";
  };
  oci::Platform p{field("os"), field("architecture"), field("variant")};
  if (p.os.empty() || p.architecture.empty()) return "";
  return p.String();
}

}  // namespace regdisk::store
