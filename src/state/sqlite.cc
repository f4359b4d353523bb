#include "state/sqlite.h"

#include <sqlite3.h>

#include <string>

namespace regdisk::state {

Status SqliteStatus(std::string_view what, int rc, sqlite3* db) {
  std::string msg(what);
  msg += ": ";
  msg += db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  msg += " (SQLite code " + std::to_string(rc) + ")";
  switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED: return Unavailable(std::move(msg));
    case SQLITE_FULL: return NoSpace(std::move(msg));
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB: return DataLoss(std::move(msg));
    case SQLITE_PERM:
    case SQLITE_READONLY: return PermissionDenied(std::move(msg));
    case SQLITE_CANTOPEN: return NotFound(std::move(msg));
    case SQLITE_NOMEM: return ResourceExhausted(std::move(msg));
    case SQLITE_CONSTRAINT: return AlreadyExists(std::move(msg));
    default: return Internal(std::move(msg));
  }
}

Stmt& Stmt::operator=(Stmt&& o) noexcept {
  if (this != &o) {
    if (st_ != nullptr) sqlite3_finalize(st_);
    st_ = o.st_;
    db_ = o.db_;
    o.st_ = nullptr;
  }
  return *this;
}

Stmt::~Stmt() {
  if (st_ != nullptr) sqlite3_finalize(st_);
}

Status Stmt::Bind(int index, std::string_view text) {
  int rc = sqlite3_bind_text64(st_, index, text.data(), text.size(), SQLITE_TRANSIENT, SQLITE_UTF8);
  return rc == SQLITE_OK ? OkStatus() : SqliteStatus("binding a parameter", rc, db_);
}

Status Stmt::Bind(int index, int64_t value) {
  int rc = sqlite3_bind_int64(st_, index, value);
  return rc == SQLITE_OK ? OkStatus() : SqliteStatus("binding a parameter", rc, db_);
}

Status Stmt::BindNull(int index) {
  int rc = sqlite3_bind_null(st_, index);
  return rc == SQLITE_OK ? OkStatus() : SqliteStatus("binding a parameter", rc, db_);
}

Result<bool> Stmt::Step() {
  int rc = sqlite3_step(st_);
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  return SqliteStatus(std::string("running \"") + sqlite3_sql(st_) + "\"", rc, db_);
}

Status Stmt::Run() {
  for (;;) {
    ASSIGN_OR_RETURN(bool row, Step());
    if (!row) return OkStatus();
  }
}

int64_t Stmt::Int(int col) const { return sqlite3_column_int64(st_, col); }

std::string Stmt::Text(int col) const {
  const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(st_, col));
  if (p == nullptr) return {};
  return std::string(p, static_cast<size_t>(sqlite3_column_bytes(st_, col)));
}

bool Stmt::IsNull(int col) const { return sqlite3_column_type(st_, col) == SQLITE_NULL; }

Result<Db> Db::Open(const std::filesystem::path& path) {
  sqlite3* raw = nullptr;
  // SQLITE_OPEN_NOMUTEX: the store's own mutex serialises every use of the
  // connection. SQLITE_OPEN_EXRESCODE: extended codes in errors.
  int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_EXRESCODE;
  int rc = sqlite3_open_v2(path.c_str(), &raw, flags, nullptr);
  Db db(raw);  // closed on every way out, even when the open failed
  if (rc != SQLITE_OK) return SqliteStatus("opening " + path.string(), rc, raw);
  return db;
}

Db& Db::operator=(Db&& o) noexcept {
  if (this != &o) {
    if (db_ != nullptr) sqlite3_close_v2(db_);
    db_ = o.db_;
    o.db_ = nullptr;
  }
  return *this;
}

Db::~Db() {
  if (db_ != nullptr) sqlite3_close_v2(db_);
}

Result<Stmt> Db::Prepare(std::string_view sql) {
  sqlite3_stmt* st = nullptr;
  int rc = sqlite3_prepare_v2(db_, sql.data(), static_cast<int>(sql.size()), &st, nullptr);
  Stmt owned(st, db_);
  if (rc != SQLITE_OK) return SqliteStatus("preparing \"" + std::string(sql) + "\"", rc, db_);
  return owned;
}

Status Db::Exec(std::string_view sql) {
  std::string text(sql);
  int rc = sqlite3_exec(db_, text.c_str(), nullptr, nullptr, nullptr);
  return rc == SQLITE_OK ? OkStatus() : SqliteStatus("running \"" + text + "\"", rc, db_);
}

Result<int64_t> Db::QueryInt(std::string_view sql) {
  ASSIGN_OR_RETURN(Stmt st, Prepare(sql));
  ASSIGN_OR_RETURN(bool row, st.Step());
  if (!row) return Internal("\"" + std::string(sql) + "\" returned no row");
  return st.Int(0);
}

Result<Transaction> Transaction::Begin(Db& db) {
  RETURN_IF_ERROR(db.Exec("BEGIN IMMEDIATE"));
  return Transaction(&db);
}

Transaction::~Transaction() {
  if (db_ != nullptr) (void)db_->Exec("ROLLBACK");
}

Status Transaction::Commit() {
  if (db_ == nullptr) return Internal("transaction committed twice");
  Status st = db_->Exec("COMMIT");
  if (st.ok()) db_ = nullptr;  // else the destructor rolls back
  return st;
}

}  // namespace regdisk::state
