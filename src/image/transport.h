// Where images live: transports, sources and destinations.
//
//   docker://HOST/REPO[:TAG|@DIGEST]   a registry (Distribution API v2)
//   oci:DIR[:TAG]                      an OCI image layout directory
//   HOST/REPO[:TAG]                    no prefix means docker://
//
// A source hands out manifests and verified blob streams; a destination
// takes blobs and manifests. Copy (copy.h) moves images between any two.
#pragma once

#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "oci/manifest.h"
#include "oci/reference.h"
#include "registry/client.h"
#include "util/status.h"

namespace regdisk::image {

struct ImageName {
  enum class Transport { kDocker, kOciLayout };
  Transport transport = Transport::kDocker;
  oci::Reference ref;         // kDocker
  std::filesystem::path dir;  // kOciLayout
  std::string tag;            // kOciLayout; may be empty

  static Result<ImageName> Parse(std::string_view text);
  std::string String() const;
};

// Reads byte ranges of a source's blobs, unverified (see
// RegistryClient::FetchBlobRange): the caller checks what it reads. One
// reader per thread; several readers of one source may run at once.
class BlobRangeReader {
 public:
  virtual ~BlobRangeReader() = default;
  virtual Status Read(const oci::Descriptor& desc, uint64_t offset, uint64_t length, const registry::BlobSink& sink) = 0;
  // Read, stopped by `cancel` as well (a per-request deadline): a registry
  // that accepts and then stalls holds the caller no longer than that.
  // Readers of local files, which do not stall, may ignore it.
  virtual Status ReadCancellable(const oci::Descriptor& desc, uint64_t offset, uint64_t length,
                                 const registry::BlobSink& sink, const CancelToken& cancel) {
    RETURN_IF_ERROR(cancel.status());
    return Read(desc, offset, length, sink);
  }
};

class ImageSource {
 public:
  virtual ~ImageSource() = default;
  virtual std::string Name() const = 0;
  // The manifest the name points at (a tag, a digest, or the layout's only
  // image when no tag was given).
  virtual Result<oci::RawManifest> GetManifest() = 0;
  // A manifest by digest (children of an index); verified.
  virtual Result<oci::RawManifest> GetManifestByDigest(const oci::Descriptor& desc) = 0;
  // Streams a blob to sink, verified by size and digest.
  virtual Status FetchBlob(const oci::Descriptor& desc, const registry::BlobSink& sink) = 0;
  // Continues a partial download: `hasher` has seen the first `offset`
  // bytes; the rest goes to sink, and the whole is verified.
  virtual Status FetchBlobFrom(const oci::Descriptor& desc, uint64_t offset, oci::Hasher& hasher,
                               const registry::BlobSink& sink) = 0;
  // A reader of blob ranges for one thread (its own registry connection).
  virtual Result<std::unique_ptr<BlobRangeReader>> OpenRangeReader() {
    return Unimplemented(Name() + " cannot read parts of blobs");
  }
  // A blob that already lives in a local file, if this source has one.
  virtual std::optional<std::filesystem::path> LocalBlobPath(const oci::Descriptor&) { return std::nullopt; }
  // For registries: the registry and repository (for cross-repo mounts).
  virtual const oci::Reference* RegistryRef() const { return nullptr; }
  // The repository's tags (the registry's tags list API); none for an OCI
  // layout, as skopeo reports.
  virtual Result<std::vector<std::string>> RepoTags() { return std::vector<std::string>{}; }
  // The repository as skopeo names it ("127.0.0.1:5000/vmdisks/fedora25");
  // empty for an OCI layout.
  virtual std::string RepoName() const { return ""; }
};

class ImageDestination {
 public:
  virtual ~ImageDestination() = default;
  virtual std::string Name() const = 0;
  virtual Result<bool> HasBlob(const oci::Descriptor& desc) = 0;
  // Copies one blob from src, verifying it on the way.
  virtual Status PutBlob(const oci::Descriptor& desc, ImageSource& src) = 0;
  // Stores a blob held in memory (a config).
  virtual Status PutBlobBytes(const oci::Descriptor& desc, std::string_view bytes) = 0;
  // Stores a blob whose digest is known only once written: `produce` writes
  // it to the fd it is given and returns its descriptor.
  virtual Result<oci::Descriptor> PutBlobStream(const std::function<Result<oci::Descriptor>(int fd)>& produce) = 0;
  // Stores a manifest and tags it when tag is not empty. top_level is false
  // for the children of an index, which are stored by digest only.
  virtual Status PutManifest(const oci::RawManifest& m, const std::string& tag, bool top_level) = 0;
  // The tag the destination name carries (may be empty).
  virtual std::string Tag() const = 0;
};

Result<std::unique_ptr<ImageSource>> OpenSource(const ImageName& name, const registry::ClientOptions& options);

// The images a name given to pull or in a VM spec may mean, in the order to
// try them, as podman resolves short names: an oci: layout, a docker://
// name, or a name whose first component is a registry host is just itself;
// a short name ("fedora:40", "vmdisks/disk@sha256:...") becomes its alias
// from registries.conf, else one name per unqualified-search registry, else
// (no registries.conf sets a search list) Docker Hub's (docker.io/library/).
// Enforcing short-name-mode with several candidates is an error listing
// them. `conf` may be null (no registries.conf).
Result<std::vector<ImageName>> CandidateNames(std::string_view text, const registry::RegistriesConf* conf);
Result<std::unique_ptr<ImageDestination>> OpenDestination(const ImageName& name,
                                                          const registry::ClientOptions& options);

}  // namespace regdisk::image
