// Pulling a chunked disk layer (docs/chunked-format.md) into a sparse raw
// file: the index by one ranged read, verified against the layer's
// annotation; then, when a chunk table is given, every non-zero chunk the
// store already holds (same digest, same chunk size) is copied from its
// local disk file (copy_file_range: a reflink where the file system can)
// and verified again after the copy; the frames of the other chunks come by
// parallel ranged reads (one connection per worker), coalesced, each chunk
// decompressed and verified on the worker that fetched it and written with
// pwrite; zero chunks stay holes.
//
//   ASSIGN_OR_RETURN(std::optional<oci::ChunkIndexLocation> loc, oci::ChunkIndexLocationOf(layer));
//   ASSIGN_OR_RETURN(ChunkedDisk d, PullChunkedLayer(src, layer, *loc, staging_dir, options));
//
// STAGING holds disk.raw and chunks.map (store/chunk_bitmap.h), the chunks
// present and verified: a pull into the same directory after a kill or a
// transient failure fetches only the chunks whose bit is clear (bits an
// earlier boot wrote are verified again first). Nothing in disk.raw is to be
// trusted unless this returns OK; the caller removes STAGING after a refusal
// or once the disk is committed, and keeps it otherwise. Refusals: InvalidArgument for an index
// or frame that lies, DataLoss for a chunk whose bytes do not match its
// hash, ResourceExhausted for a disk over the size cap; NoSpace when the
// file system cannot hold the disk's data.
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include "image/progress.h"
#include "image/transport.h"
#include "oci/chunk_index.h"
#include "store/chunk_table.h"
#include "util/cancel.h"
#include "util/status.h"

namespace regdisk::store {

struct ChunkedPullOptions {
  int connections = 3;             // parallel ranged reads, each on its own worker thread
  uint64_t max_batch_bytes = 8 << 20;  // adjacent frames coalesced into one read up to this
  // Two wanted frames share a read when the frames between them (chunks
  // copied locally) add up to at most this: see kDefaultMaxGapBytes.
  uint64_t max_gap_bytes = 0;
  // The store's chunk table and its disks directory (ROOT/disks): chunks
  // found there are copied, not fetched. Null: fetch every chunk.
  ChunkTable* table = nullptr;
  std::filesystem::path disks_dir;
  uint64_t max_disk_bytes = uint64_t{1} << 40;
  std::string label;               // "layer 1 (sha256:…)"
  image::ProgressFn on_progress;   // kStart, kBytes (compressed bytes fetched); not kDone
  const CancelToken* cancel = nullptr;
};

struct ChunkedDisk {
  std::filesystem::path file;  // staging/disk.raw
  std::string image_path;      // "/disk/NAME", from the verified tar header
  uint64_t size = 0;
  uint64_t chunks = 0, zero_chunks = 0, requests = 0;
  oci::ChunkIndex index;           // verified; what the chunk table records on commit
  uint64_t resumed_chunks = 0;     // verified by a killed pull of this layer (chunks.map)
  uint64_t reused_chunks = 0;      // copied from disks in the store, verified
  uint64_t reused_bytes = 0;       // their bytes (uncompressed)
  uint64_t reused_frame_bytes = 0; // what their frames would have cost to fetch
  uint64_t rotten_chunks = 0;      // found in the table but not matching: fetched
  uint64_t fetched_bytes = 0;      // compressed bytes read from the source (frames; index and header apart)
};

// Two wanted frames are fetched in one ranged read when the frames between
// them add up to at most this. Half the smallest chunk (64 KiB): a bridge
// never re-fetches a whole incompressible chunk the store already has, so
// the bytes fetched stay close to the changed frames (the delta's measure),
// while runs of zero chunks (frames of a few dozen bytes) and well
// compressed chunks between two changed ones cost no extra request.
inline constexpr uint64_t kDefaultMaxGapBytes = 32 << 10;

Result<ChunkedDisk> PullChunkedLayer(image::ImageSource& src, const oci::Descriptor& layer,
                                     const oci::ChunkIndexLocation& loc, const std::filesystem::path& staging,
                                     const ChunkedPullOptions& options);

}  // namespace regdisk::store
