// Writing a chunked disk layer (docs/chunked-format.md): the guest-visible
// bytes of a disk as a raw file in a tar, compressed as a zstd seekable
// stream with one frame per guest-aligned chunk and a chunk index.
//
//   ASSIGN_OR_RETURN(RawDisk raw, OpenRawDisk(path, info));  // qemu-img for qcow2
//   ASSIGN_OR_RETURN(ChunkedLayer l, WriteChunkedLayer(raw.fd(), raw.size, options, out_fd));
//
// Chunks are compressed on `threads` worker threads (each frame on its own,
// at zstd level 3), while the calling thread writes the frames in order and
// hashes the tar (diff_id) and the blob (digest). The output does not depend
// on the number of threads: the same disk and options give the same layer.
// Memory: a few chunks per thread.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

#include "disk/format.h"
#include "image/progress.h"
#include "oci/manifest.h"
#include "util/fs.h"
#include "util/status.h"

namespace regdisk::image {

// The chunk size `build --layout chunked` uses unless told otherwise. A
// delta moves whole chunks; smaller chunks cost layer size, decompression
// CPU, index size and requests. docs/benchmarks.md ("Chunked layers") has
// the figures that chose it.
inline constexpr uint64_t kDefaultChunkSize = 256 << 10;

// The default chunk size for a disk of `disk_size` bytes: kDefaultChunkSize,
// or the smallest larger power of two whose chunk index stays within the
// index's limit (disks over about 341 GiB at 256 KiB chunks); 16 MiB at most.
uint64_t DefaultChunkSize(uint64_t disk_size);

// Parses --chunk-size: a power of two from 64K to 16M, as bytes or with a
// K/KiB/M/MiB suffix ("1M", "256KiB", "65536").
Result<uint64_t> ParseChunkSize(std::string_view text);

// The guest-visible bytes of a validated disk as a raw file: the disk itself
// when it is raw, else a sparse copy that `qemu-img convert -O raw` made in a
// temporary directory (removed with this object).
struct RawDisk {
  std::optional<TempDir> dir;
  UniqueFd owned;
  int fd = -1;
  uint64_t size = 0;
};
Result<RawDisk> OpenRawDisk(const std::filesystem::path& disk_file, int disk_fd, const disk::DiskInfo& info);

struct ChunkedLayerOptions {
  std::string name;         // the file under disk/
  uint64_t chunk_size = kDefaultChunkSize;  // a power of two, 64 KiB..16 MiB
  int64_t mtime = 0;
  int threads = 2;
  ProgressFn on_progress;   // kStart/kBytes/kDone with `label`
  std::string label;
};

struct ChunkedLayer {
  oci::Descriptor desc;  // tar+zstd, with the index annotations
  oci::Digest diff_id;
  uint64_t chunks = 0, zero_chunks = 0;
};

// Writes the layer for `size` bytes of raw disk from `raw_fd` to `out_fd`.
Result<ChunkedLayer> WriteChunkedLayer(int raw_fd, uint64_t size, const ChunkedLayerOptions& options, int out_fd);

}  // namespace regdisk::image
