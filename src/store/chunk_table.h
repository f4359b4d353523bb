// The store's chunk-digest table: for every chunked disk the store holds,
// the SHA-256 of each of its non-zero chunks, so a pull of another disk (a
// new version, another image) can copy the chunks it shares from the local
// file instead of fetching their frames (docs/chunked-format.md, "Delta
// pulls").
//
//   ASSIGN_OR_RETURN(ChunkTable t, ChunkTable::Open(root));
//   RETURN_IF_ERROR(t.AddDisk("ab12…", "disk.raw", index));          // on commit
//   ASSIGN_OR_RETURN(auto found, t.Find(index.chunk_shift, digests));  // before a pull
//   RETURN_IF_ERROR(t.RemoveDisk("ab12…"));                          // on removal
//
// The table lives in the store's database, ROOT/store.db (store/db.h: its
// schema and migrations). The table is a hint, never the truth: a row may
// name a disk that rotted or went away, so whoever copies a chunk it finds
// verifies the copied bytes against the digest it wants.
//
// Thread rules: one thread at a time per ChunkTable; any number of
// processes (SQLite's locking, with a busy timeout).
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "oci/chunk_index.h"
#include "state/sqlite.h"
#include "util/status.h"

namespace regdisk::store {

class ChunkTable {
 public:
  using Sha256 = std::array<uint8_t, 32>;

  // Opens (creating, migrating) ROOT/store.db, as OpenStoreDb does.
  // FailedPrecondition for a schema newer than this regdisk knows.
  static Result<ChunkTable> Open(const std::filesystem::path& root);

  // The schema version this regdisk writes (the highest migration).
  static int SchemaVersion();

  // Records the non-zero chunks of the disk file DIR/FILE (DIR: its
  // directory's name under ROOT/disks), replacing what was recorded for DIR.
  Status AddDisk(const std::string& dir, const std::string& file, const oci::ChunkIndex& index);
  // Forgets DIR's chunks (a disk that was removed); OK when there were none.
  Status RemoveDisk(const std::string& dir);

  // Where a chunk with a wanted digest can be read: disk directory, file in
  // it, chunk number (at the same chunk size).
  struct Place {
    std::string dir, file;
    uint64_t chunk = 0;
  };
  // For each of `digests` the table holds at chunk size 1 << chunk_shift,
  // its places (several disks may hold it). One query.
  Result<std::map<Sha256, std::vector<Place>>> Find(int chunk_shift, const std::vector<Sha256>& digests);

  // DIR's recorded chunks: chunk number -> digest.
  Result<std::map<uint64_t, Sha256>> DiskChunks(const std::string& dir);

  // Every recorded disk directory, with its chunk size's shift.
  Result<std::map<std::string, int>> Disks();

 private:
  explicit ChunkTable(state::Db db) : db_(std::move(db)) {}
  state::Db db_;
};

std::string HexOf(const ChunkTable::Sha256& sum);

}  // namespace regdisk::store
