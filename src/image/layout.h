// An OCI image layout directory (image-spec "image-layout"):
//
//   DIR/oci-layout            {"imageLayoutVersion": "1.0.0"}
//   DIR/index.json            an image index; tags are the annotation
//                             org.opencontainers.image.ref.name
//   DIR/blobs/<alg>/<hex>     content, named by digest
//
// Blobs are written to a temp file beside their final name, verified, and
// renamed into place; index.json is replaced atomically. Readable by skopeo
// (oci:DIR:TAG) and umoci (--image DIR:TAG).
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "image/transport.h"
#include "oci/manifest.h"
#include "util/status.h"

namespace regdisk::image {

inline constexpr const char* kRefNameAnnotation = "org.opencontainers.image.ref.name";

class OciLayout {
 public:
  // Opens an existing layout; fails when DIR is not one.
  static Result<OciLayout> Open(const std::filesystem::path& dir);
  // Opens DIR, creating an empty layout when DIR is missing or empty.
  static Result<OciLayout> OpenOrCreate(const std::filesystem::path& dir);

  const std::filesystem::path& dir() const { return dir_; }
  std::filesystem::path BlobPath(const oci::Digest& d) const;
  bool HasBlob(const oci::Digest& d) const;

  // The descriptor index.json holds for tag; with an empty tag, the only
  // entry (an error when there are several).
  Result<oci::Descriptor> Resolve(const std::string& tag) const;
  // Reads and verifies a blob of at most max_bytes into memory.
  Result<std::string> ReadBlob(const oci::Descriptor& desc, uint64_t max_bytes) const;

  // Writes a blob from a stream producer: `produce` is called with a sink
  // that appends to a temp file; the result is verified against desc and
  // renamed into place. An existing blob is kept as it is.
  Status WriteBlob(const oci::Descriptor& desc,
                   const std::function<Status(const registry::BlobSink& sink)>& produce);
  Status WriteBlobBytes(const oci::Descriptor& desc, std::string_view bytes);
  // Writes a blob whose digest is known only at the end (see
  // ImageDestination::PutBlobStream).
  Result<oci::Descriptor> WriteBlobStream(const std::function<Result<oci::Descriptor>(int fd)>& produce);

  // Records desc in index.json under tag (replacing that tag's entry);
  // with an empty tag, adds it untagged unless already present.
  Status AddToIndex(oci::Descriptor desc, const std::string& tag);

 private:
  explicit OciLayout(std::filesystem::path dir) : dir_(std::move(dir)) {}
  Result<std::vector<oci::Descriptor>> ReadIndex() const;
  std::filesystem::path dir_;
};

}  // namespace regdisk::image
