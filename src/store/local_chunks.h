// The chunks a wanted disk shares with disks already in the node store:
// where the store's chunk table (store/chunk_table.h) says they are, copied
// into the new disk and verified against the wanted index instead of being
// fetched. A chunked pull (store/chunked_pull.h) and a lazily-pulled disk
// (blockserve/lazy_disk.h) both use it, so a new version of an image moves
// only the chunks that changed, whether it is pulled first or booted while
// it fills.
//
//   LocalChunks local = LocalChunks::Find(root, index, [&](size_t k) { return !have.Test(k); }, label);
//   ASSIGN_OR_RETURN(bool copied, local.Copy(k, fd));  // true: chunk k in fd is verified
//
// The table is a hint: a row may be stale (a disk that rotted or was
// replaced), so each copy is hashed before it counts, and a chunk no place
// holds verified is left to fetch. A table that cannot be read finds
// nothing (with a warning). Thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "oci/chunk_index.h"
#include "store/chunk_table.h"
#include "util/fs.h"
#include "util/status.h"

namespace regdisk::store {

class LocalChunks {
 public:
  LocalChunks() = default;  // finds nothing
  // The places in the store at ROOT (its chunk table, ROOT/disks) of each
  // non-zero chunk k of `index` for which wanted(k). `label` names the
  // disk in the warning for an unreadable table.
  static LocalChunks Find(const std::filesystem::path& root, const oci::ChunkIndex& index,
                          const std::function<bool(size_t)>& wanted, std::string_view label);
  // The same with a table the caller has open.
  static LocalChunks Find(ChunkTable& table, const std::filesystem::path& disks_dir, const oci::ChunkIndex& index,
                          const std::function<bool(size_t)>& wanted, std::string_view label);
  LocalChunks(LocalChunks&& other) noexcept;
  LocalChunks& operator=(LocalChunks&&) = delete;

  // Whether some disk in the store is said to hold chunk k.
  bool Has(size_t k) const { return wanted_.count(k) > 0; }
  bool empty() const { return wanted_.empty(); }
  // The chunks some disk is said to hold, in disk order.
  std::vector<size_t> chunks() const;

  enum class CopyMode {
    // copy_file_range into place (sharing extents where the file system
    // reflinks), then hash what landed: for a file nobody else reads or
    // writes meanwhile (a pull's staging disk).
    kInPlace,
    // Read and hash the source first, then write only verified bytes: for
    // a file others read, and write verified bytes to, at the same time (a
    // lazily-pulled disk, which a fetch may fill around a claimed chunk).
    kVerifyFirst,
  };
  // Copies chunk k to `fd` at its offset in the disk from the first place
  // whose bytes hash to the index's digest. true: the chunk's bytes in fd
  // are verified; false: no place held it (fetch it). A place that cannot
  // be read, or is short, counts as one that does not match. An error only
  // when fd cannot be written.
  Result<bool> Copy(size_t k, int fd, CopyMode mode = CopyMode::kInPlace);

  // Closes the source files and finds nothing from now on (a disk that
  // has every chunk): a store disk removed meanwhile frees its space.
  void CloseFiles();

  // Copies that did not hash to what the table said (a damaged disk).
  uint64_t rotten() const { return rotten_.load(); }

 private:
  struct Wanted {
    ChunkTable::Sha256 sha256;
    uint64_t at = 0, length = 0;  // in the new disk
    int chunk_shift = 0;
    std::vector<ChunkTable::Place> places;
  };
  std::filesystem::path disks_dir_;
  std::map<size_t, Wanted> wanted_;
  // DIR/FILE -> opened on first use (nullptr: cannot be opened); a copy
  // holds its own reference, so CloseFiles never closes an fd in use.
  std::shared_ptr<UniqueFd> Source(const ChunkTable::Place& p);
  // One place into fd, read and hashed before it is written.
  Result<bool> CopyVerifyingFirst(int in, uint64_t in_off, const Wanted& w, int fd, std::string* buf);

  std::mutex mu_;
  std::map<std::string, std::shared_ptr<UniqueFd>> files_;  // guarded by mu_
  bool closed_ = false;                                      // guarded by mu_
  std::atomic<uint64_t> rotten_{0};
};

// Copies [in_off, in_off + len) of `in` to `out` at out_off:
// copy_file_range (which shares the extents on file systems that reflink),
// or read and write where the kernel cannot. DataLoss when `in` ends first.
Status CopyFileRange(int in, uint64_t in_off, int out, uint64_t out_off, uint64_t len);

// Whether [off, off + len) of fd hashes (SHA-256) to `want`; `buf` is
// scratch space.
Result<bool> RangeHashes(int fd, uint64_t off, uint64_t len, const ChunkTable::Sha256& want, std::string* buf);

}  // namespace regdisk::store
