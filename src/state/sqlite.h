// A thin RAII layer over SQLite's C API for the object store: a connection
// that closes itself, statements finalized on scope exit, and SQLite's
// result codes turned into Status in one place (SqliteStatus).
//
//   ASSIGN_OR_RETURN(Db db, Db::Open(path));
//   ASSIGN_OR_RETURN(Stmt st, db.Prepare("SELECT body FROM objects WHERE name = ?1"));
//   RETURN_IF_ERROR(st.Bind(1, name));
//   ASSIGN_OR_RETURN(bool row, st.Step());
//   if (row) use(st.Text(0));
//
// Thread rules: a Db and its statements are used by one thread at a time
// (the ObjectStore serialises access with its mutex). Statements must be
// destroyed before their Db.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

#include "util/status.h"

struct sqlite3;
struct sqlite3_stmt;

namespace regdisk::state {

// "WHAT: SQLite's message (code N)"; SQLITE_BUSY becomes Unavailable,
// SQLITE_FULL NoSpace, SQLITE_CORRUPT/NOTADB DataLoss, SQLITE_CANTOPEN and
// SQLITE_PERM PermissionDenied or NotFound, anything else Internal.
Status SqliteStatus(std::string_view what, int rc, sqlite3* db);

class Stmt {
 public:
  Stmt() = default;
  Stmt(sqlite3_stmt* st, sqlite3* db) : st_(st), db_(db) {}
  Stmt(Stmt&& o) noexcept : st_(o.st_), db_(o.db_) { o.st_ = nullptr; }
  Stmt& operator=(Stmt&& o) noexcept;
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;
  ~Stmt();  // sqlite3_finalize

  // Parameters are 1-based, as in SQLite. Text is copied (SQLITE_TRANSIENT).
  Status Bind(int index, std::string_view text);
  Status Bind(int index, int64_t value);
  Status BindNull(int index);

  // One step: true when a row is ready, false when the statement is done.
  Result<bool> Step();
  // Steps to the end, for statements that return no rows.
  Status Run();

  // Column accessors for the current row (0-based).
  int64_t Int(int col) const;
  std::string Text(int col) const;
  bool IsNull(int col) const;

 private:
  sqlite3_stmt* st_ = nullptr;
  sqlite3* db_ = nullptr;
};

class Db {
 public:
  // Opens (creating) the database file read-write, with the full-mutex
  // threading mode off (access is serialised by the caller) and O_CLOEXEC
  // on every descriptor SQLite opens (its unix VFS adds O_CLOEXEC itself;
  // the store's tests check the descriptors).
  static Result<Db> Open(const std::filesystem::path& path);

  Db() = default;
  Db(Db&& o) noexcept : db_(o.db_) { o.db_ = nullptr; }
  Db& operator=(Db&& o) noexcept;
  Db(const Db&) = delete;
  Db& operator=(const Db&) = delete;
  ~Db();  // sqlite3_close_v2

  Result<Stmt> Prepare(std::string_view sql);
  // Runs one or more statements that return no rows (schema, pragmas).
  Status Exec(std::string_view sql);
  // A single-integer query such as "PRAGMA user_version".
  Result<int64_t> QueryInt(std::string_view sql);

  sqlite3* get() const { return db_; }

 private:
  explicit Db(sqlite3* db) : db_(db) {}
  sqlite3* db_ = nullptr;
};

// BEGIN IMMEDIATE on construction (Begin), ROLLBACK on scope exit unless
// Commit() succeeded, so every early return undoes the transaction.
class Transaction {
 public:
  static Result<Transaction> Begin(Db& db);
  Transaction(Transaction&& o) noexcept : db_(o.db_) { o.db_ = nullptr; }
  Transaction& operator=(Transaction&&) = delete;
  Transaction(const Transaction&) = delete;
  ~Transaction();
  Status Commit();

 private:
  explicit Transaction(Db* db) : db_(db) {}
  Db* db_ = nullptr;
};

}  // namespace regdisk::state
