// Pulling a chunked disk layer (docs/chunked-format.md) into a sparse raw
// file: the index by one ranged read, verified against the layer's
// annotation; then the frames by parallel ranged reads (one connection per
// worker), each chunk decompressed and verified on the worker that fetched
// it and written with pwrite; zero chunks stay holes.
//
//   ASSIGN_OR_RETURN(std::optional<oci::ChunkIndexLocation> loc, oci::ChunkIndexLocationOf(layer));
//   ASSIGN_OR_RETURN(ChunkedDisk d, PullChunkedLayer(src, layer, *loc, staging_dir, options));
//
// Nothing it writes is to be trusted unless it returns OK: the caller stages
// the file and removes it on failure. Refusals: InvalidArgument for an index
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
#include "util/cancel.h"
#include "util/status.h"

namespace regdisk::store {

struct ChunkedPullOptions {
  int connections = 3;             // parallel ranged reads, each on its own worker thread
  uint64_t max_batch_bytes = 8 << 20;  // adjacent frames coalesced into one read up to this
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
};

Result<ChunkedDisk> PullChunkedLayer(image::ImageSource& src, const oci::Descriptor& layer,
                                     const oci::ChunkIndexLocation& loc, const std::filesystem::path& staging,
                                     const ChunkedPullOptions& options);

}  // namespace regdisk::store
