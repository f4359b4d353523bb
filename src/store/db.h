// The node store's database, ROOT/store.db (SQLite, WAL), and the one
// place its schema lives. It holds the names (refs: which image a name was
// pulled as, per platform; store.h) and the chunk table (chunk_table.h).
//
//   ASSIGN_OR_RETURN(state::Db db, OpenStoreDb(root));  // creates, migrates, imports refs.json
//   ASSIGN_OR_RETURN(state::Stmt st, db.Prepare("SELECT name FROM refs"));
//
// Schema: versioned by the schema_migrations table. Migration N brings the
// database from N-1 to N; each is applied once, in order, in one
// transaction with its row, so a crash leaves the old schema or the new.
//
// refs.json: a store written before its names moved into the database kept
// them in ROOT/refs.json ({"name": {"linux/amd64": "sha256:…[#path]"}}, or
// the older {"name": "sha256:…"}). Opening imports it in the transaction
// that migrates (or in one of its own, if the file appears later, when an
// older regdisk ran): its names replace the database's for the same name
// and platform, and its SHA-256 is recorded in refs_imports. Only after the
// commit is it renamed to refs.json.migrated (refs.json.migrated-<hash>
// when that exists). A crash before the commit leaves the file and the
// database as they were; one after it leaves a file whose digest the
// database records, which the next open only renames. A second open is a
// no-op.
//
// Concurrency: any number of processes and connections. WAL: readers never
// wait for a writer. Writers wait up to kBusyTimeoutMs for each other, and
// every write is one transaction (BEGIN IMMEDIATE for several statements).
// A connection (state::Db) is used by one thread at a time.
//
// Errors: FailedPrecondition for a schema newer than this regdisk knows;
// DataLoss naming ROOT/refs.json, with the fix, when it cannot be imported
// (nothing is changed); SQLite's failures as state::SqliteStatus maps them
// (DataLoss for a damaged database, Unavailable when the busy timeout
// expires).
#pragma once

#include <filesystem>
#include <string>

#include "oci/digest.h"
#include "state/sqlite.h"
#include "util/status.h"

namespace regdisk::store {

inline constexpr int kBusyTimeoutMs = 10000;

// Opens ROOT/store.db, creating it and its schema, migrating an older one
// and importing ROOT/refs.json as described above.
Result<state::Db> OpenStoreDb(const std::filesystem::path& root);

// The schema version this regdisk writes (its newest migration).
int StoreDbSchemaVersion();

// OK when ROOT/refs.json is absent or can be imported; otherwise the
// DataLoss OpenStoreDb gives (for fsck, which sets such a file aside).
Status CheckLegacyRefs(const std::filesystem::path& root);

// The platform ("linux/arm64") the config of a stored manifest states, ""
// when the store does not hold them or they do not say.
std::string StoredPlatformOf(const std::filesystem::path& root, const oci::Digest& manifest);

}  // namespace regdisk::store
