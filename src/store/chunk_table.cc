#include "store/chunk_table.h"

#include <set>

#include <nlohmann/json.hpp>

#include "store/db.h"

namespace regdisk::store {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string HexOf(const ChunkTable::Sha256& sum) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out(64, '0');
  for (size_t i = 0; i < sum.size(); ++i) {
    out[2 * i] = kDigits[sum[i] >> 4];
    out[2 * i + 1] = kDigits[sum[i] & 15];
  }
  return out;
}

namespace {

bool ParseHex(const std::string& hex, ChunkTable::Sha256* out) {
  if (hex.size() != 64) return false;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  for (size_t i = 0; i < 32; ++i) {
    const int hi = nibble(hex[2 * i]), lo = nibble(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    (*out)[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return true;
}

}  // namespace

int ChunkTable::SchemaVersion() { return StoreDbSchemaVersion(); }

Result<ChunkTable> ChunkTable::Open(const fs::path& root) {
  ASSIGN_OR_RETURN(state::Db db, OpenStoreDb(root));
  return ChunkTable(std::move(db));
}

Status ChunkTable::AddDisk(const std::string& dir, const std::string& file, const oci::ChunkIndex& index) {
  // The digests as one JSON array (null for a zero chunk): one statement
  // inserts them all, whatever the chunk count.
  json digests = json::array();
  for (const auto& c : index.chunks) digests.push_back(c.zero ? json() : json(HexOf(c.sha256)));
  ASSIGN_OR_RETURN(state::Transaction txn, state::Transaction::Begin(db_));
  RETURN_IF_ERROR(RemoveDisk(dir));
  {
    ASSIGN_OR_RETURN(state::Stmt st,
                     db_.Prepare("INSERT INTO chunk_disks (dir, file, chunk_shift) VALUES (?1, ?2, ?3)"));
    RETURN_IF_ERROR(st.Bind(1, dir));
    RETURN_IF_ERROR(st.Bind(2, file));
    RETURN_IF_ERROR(st.Bind(3, int64_t{index.chunk_shift}));
    RETURN_IF_ERROR(st.Run());
  }
  {
    ASSIGN_OR_RETURN(state::Stmt st, db_.Prepare("INSERT INTO chunks (dir, chunk, chunk_shift, digest) "
                                                 "SELECT ?1, key, ?2, value FROM json_each(?3) WHERE value IS NOT NULL"));
    RETURN_IF_ERROR(st.Bind(1, dir));
    RETURN_IF_ERROR(st.Bind(2, int64_t{index.chunk_shift}));
    RETURN_IF_ERROR(st.Bind(3, digests.dump()));
    RETURN_IF_ERROR(st.Run());
  }
  return txn.Commit();
}

Status ChunkTable::RemoveDisk(const std::string& dir) {
  for (const char* sql : {"DELETE FROM chunks WHERE dir = ?1", "DELETE FROM chunk_disks WHERE dir = ?1"}) {
    ASSIGN_OR_RETURN(state::Stmt st, db_.Prepare(sql));
    RETURN_IF_ERROR(st.Bind(1, dir));
    RETURN_IF_ERROR(st.Run());
  }
  return OkStatus();
}

Result<std::map<ChunkTable::Sha256, std::vector<ChunkTable::Place>>> ChunkTable::Find(
    int chunk_shift, const std::vector<Sha256>& digests) {
  std::set<Sha256> distinct(digests.begin(), digests.end());
  json wanted = json::array();
  for (const auto& d : distinct) wanted.push_back(HexOf(d));
  ASSIGN_OR_RETURN(state::Stmt st,
                   db_.Prepare("SELECT c.digest, c.dir, d.file, c.chunk FROM json_each(?2) AS w "
                               "JOIN chunks AS c ON c.chunk_shift = ?1 AND c.digest = w.value "
                               "JOIN chunk_disks AS d ON d.dir = c.dir ORDER BY c.dir, c.chunk"));
  RETURN_IF_ERROR(st.Bind(1, int64_t{chunk_shift}));
  RETURN_IF_ERROR(st.Bind(2, wanted.dump()));
  std::map<Sha256, std::vector<Place>> out;
  for (;;) {
    ASSIGN_OR_RETURN(bool row, st.Step());
    if (!row) break;
    Sha256 sum;
    if (!ParseHex(st.Text(0), &sum) || st.Int(3) < 0) continue;  // not ours: never matched
    out[sum].push_back(Place{st.Text(1), st.Text(2), static_cast<uint64_t>(st.Int(3))});
  }
  return out;
}

Result<std::map<uint64_t, ChunkTable::Sha256>> ChunkTable::DiskChunks(const std::string& dir) {
  ASSIGN_OR_RETURN(state::Stmt st, db_.Prepare("SELECT chunk, digest FROM chunks WHERE dir = ?1"));
  RETURN_IF_ERROR(st.Bind(1, dir));
  std::map<uint64_t, Sha256> out;
  for (;;) {
    ASSIGN_OR_RETURN(bool row, st.Step());
    if (!row) break;
    Sha256 sum{};
    if (!ParseHex(st.Text(1), &sum)) sum.fill(0);  // matches no chunk: reported as a mismatch
    out[static_cast<uint64_t>(st.Int(0))] = sum;
  }
  return out;
}

Result<std::map<std::string, int>> ChunkTable::Disks() {
  ASSIGN_OR_RETURN(state::Stmt st, db_.Prepare("SELECT dir, chunk_shift FROM chunk_disks"));
  std::map<std::string, int> out;
  for (;;) {
    ASSIGN_OR_RETURN(bool row, st.Step());
    if (!row) break;
    out[st.Text(0)] = static_cast<int>(st.Int(1));
  }
  return out;
}

}  // namespace regdisk::store
