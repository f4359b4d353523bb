// A persisted bitmap of the chunks of a chunked disk that are present and
// verified in its local file (layout in store/chunk_bitmap_format.h). It is
// what lets a killed pull resume and a lazily-pulled disk be served while it
// fills: the file is mapped shared, so a bit set here is seen at once by
// other processes that map it (the nbdkit plugin) and survives the death of
// this one.
//
//   ASSIGN_OR_RETURN(ChunkBitmap map, ChunkBitmap::Open(dir / "chunks.map", index.chunks.size(),
//                                                       index.chunk_shift, index_digest));
//   if (map.from_previous_boot()) RETURN_IF_ERROR(map.Revalidate([&](size_t k) { return Verify(k); }));
//   if (!map.Test(k)) { ... write chunk k, verified ...; map.Set(k); }
//
// Durability: a bit may reach the disk before the chunk's bytes do. That is
// harmless while the machine stays up (the page cache is shared), and after
// a reboot the bitmap says so (from_previous_boot): the owner re-verifies
// every set bit before trusting it. One writer process at a time (the
// caller's lock); any number of readers. Thread-safe.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>

#include "oci/digest.h"
#include "util/status.h"

namespace regdisk::store {

class ChunkBitmap {
 public:
  // Opens PATH, or creates it with every bit clear. An existing file made
  // for another index (key, count or shift differ) or that is damaged is
  // started afresh (all clear): it holds no proof about this disk. The
  // fresh bitmap is a new file renamed over PATH, so a process that maps
  // the old one keeps a whole, unchanged view of it.
  static Result<ChunkBitmap> Open(const std::filesystem::path& path, uint64_t chunks, int chunk_shift,
                                  const oci::Digest& key);

  ChunkBitmap(ChunkBitmap&& o) noexcept;
  ChunkBitmap& operator=(ChunkBitmap&& o) noexcept;
  ChunkBitmap(const ChunkBitmap&) = delete;
  ChunkBitmap& operator=(const ChunkBitmap&) = delete;
  ~ChunkBitmap();

  uint64_t chunks() const { return chunks_; }
  bool Test(uint64_t k) const;
  void Set(uint64_t k);
  void Clear(uint64_t k);
  uint64_t Count() const;  // set bits
  bool Complete() const { return Count() == chunks_; }
  // The first clear bit at or after k, or chunks() when there is none.
  uint64_t NextClear(uint64_t k) const;

  // True when Open made this file (none was there, or the one there was
  // not this index's): a process that mapped the file before maps another.
  bool created() const { return created_; }
  // True when the bits were written under an earlier boot of the machine.
  bool from_previous_boot() const { return previous_boot_; }
  // Calls still_good(k) for every set bit and clears those it rejects,
  // then records the current boot: the bits are trusted again.
  Status Revalidate(const std::function<bool(uint64_t)>& still_good);

  // Writes the mapping back to the file and waits for it (msync).
  Status Sync();

 private:
  ChunkBitmap() = default;
  uint64_t* words() const;
  void Unmap();

  std::filesystem::path path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  uint64_t chunks_ = 0;
  bool previous_boot_ = false;
  bool created_ = false;
};

// What a bitmap file says, read without changing it (for `images`):
// chunks and set bits. InvalidArgument when PATH is not a bitmap.
struct ChunkBitmapCounts {
  uint64_t chunks = 0, present = 0;
};
Result<ChunkBitmapCounts> PeekChunkBitmap(const std::filesystem::path& path);

// The current boot id (/proc/sys/kernel/random/boot_id), or "" if unknown.
std::string CurrentBootId();

}  // namespace regdisk::store
