// Making registry disks without a container engine.
//
//   BuildOptions o;                  // gzip, OCI media types, no base
//   ASSIGN_OR_RETURN(BuildResult r, BuildDiskImage("fedora25.qcow2", dest, o, client_options));
//
// The disk is validated first (disk/format.h), then streamed once: read ->
// tar (libarchive, pax) -> compress (zlib or zstd) -> destination, hashing
// the uncompressed stream (diff_id) and the compressed one (digest) on the
// way. Nothing is held whole in memory and no temp copy is made: a registry
// receives the layer as one streamed upload.
//
// Times: file times in the layer are fixed (0, or $SOURCE_DATE_EPOCH), so
// the same disk and options always give the same layer digest. The image's
// `created` is the build time, unless $SOURCE_DATE_EPOCH is set: then it
// is that time and the same disk and options give the same manifest digest.
// A SOURCE_DATE_EPOCH that is not a number of seconds is InvalidArgument.
//
// gzip is the default compression, as buildah and skopeo write, so every
// tool reads a default image (umoci and Docker before 23 do not read zstd).
#pragma once

#include <filesystem>
#include <map>
#include <optional>
#include <string>

#include "disk/format.h"
#include "image/progress.h"
#include "image/transport.h"
#include "oci/manifest.h"
#include "registry/client.h"
#include "util/status.h"

namespace regdisk::image {

struct BuildOptions {
  std::string name;                  // file name under /disk; default: the disk's own
  std::string compression = "gzip";  // gzip | zstd | none
  std::string format = "oci";        // oci | docker (schema 2)
  // stream: one tar in one compressed stream (any disk format); chunked: the
  // disk as raw, one zstd frame per chunk_size bytes of it and a chunk
  // index (docs/chunked-format.md; zstd, OCI media types, no --base).
  std::string layout = "stream";
  uint64_t chunk_size = 0;           // 0: DefaultChunkSize(the disk's size)
  std::map<std::string, std::string> labels;
  std::optional<ImageName> base;     // default: no base, a single-layer image
  oci::Platform platform{"linux", "amd64", ""};
  // The disk read into the layer: kStart, kBytes, kDone (or kFailed), with
  // a label and no digest. May be empty.
  ProgressFn on_progress;
};

struct BuildResult {
  oci::Digest manifest;
  oci::Descriptor layer;
  oci::Digest diff_id;
  disk::DiskInfo disk;
  std::string disk_path;  // "/disk/NAME"
};

// Builds an image holding `disk_file` at /disk/NAME (107:107, 0444) and
// writes it to `dest` (a registry or an OCI layout), tagged as dest says.
Result<BuildResult> BuildDiskImage(const std::filesystem::path& disk_file, const ImageName& dest,
                                   const BuildOptions& options, const registry::ClientOptions& client_options);

// Publishes the base image for the Dockerfile workflow: one layer holding
// the /disk directory (107:107, 0555), labelled as a registry disk base, so
// that `ADD disk.qcow2 /disk` lands at /disk/disk.qcow2.
Result<BuildResult> BuildBaseImage(const ImageName& dest, const BuildOptions& options,
                                   const registry::ClientOptions& client_options);

}  // namespace regdisk::image
