// Copying images between transports, and reading what an image holds.
//
//   ASSIGN_OR_RETURN(auto src, OpenSource(from, options));
//   ASSIGN_OR_RETURN(auto dst, OpenDestination(to, options));
//   ASSIGN_OR_RETURN(CopyResult r, Copy(*src, *dst, {}));
//
// Blobs already present at the destination are skipped (HEAD), same-registry
// copies use cross-repository mounts, manifests keep their exact bytes so
// digests agree byte for byte, and an index is written after its children.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "image/progress.h"
#include "image/transport.h"
#include "oci/manifest.h"
#include "util/status.h"

namespace regdisk::image {

struct CopyOptions {
  oci::Platform platform{"linux", "amd64", ""};
  // Copy every image of an index, not just the one for `platform`.
  bool all = false;
  // Per-blob progress (configs and layers); may be empty.
  ProgressFn on_progress;
};

struct CopyResult {
  oci::Digest digest;  // of the manifest written at the destination's tag
  std::string media_type;
  int blobs_copied = 0;
  int blobs_present = 0;
  uint64_t bytes_copied = 0;
};

Result<CopyResult> Copy(ImageSource& src, ImageDestination& dst, const CopyOptions& options);

// The image manifest for `platform`: the source's manifest itself, or the
// matching child of its index. index_digest is set when an index was read.
struct ResolvedImage {
  oci::RawManifest raw;
  oci::Manifest manifest;
  std::optional<oci::RawManifest> index;
};
Result<ResolvedImage> ResolveImage(ImageSource& src, const oci::Platform& platform);

// An image's config blob, verified, refused (ResourceExhausted) when its
// descriptor claims more than 4 MiB.
Result<std::string> FetchConfig(ImageSource& src, const oci::Descriptor& config);

// What `skopeo inspect` prints, field for field: Name, Tag (never set, as
// skopeo 1.9+), Digest (of the manifest the name points at: the index for a
// multi-platform image), RepoTags (the registry's tags list; [] for a layout
// or with tags = false), Created, DockerVersion, Labels, Architecture,
// Variant (only when set), Os, Layers, LayersData, Env; null where the
// config has nothing, as skopeo prints Go's nil.
struct InspectOptions {
  oci::Platform platform{"linux", "amd64", ""};
  bool tags = true;
};
struct Inspection {
  ResolvedImage image;     // the platform's manifest (and the index read)
  std::string config;      // the config blob, verified
  nlohmann::ordered_json skopeo;
};
Result<Inspection> Inspect(ImageSource& src, const InspectOptions& options);

}  // namespace regdisk::image
