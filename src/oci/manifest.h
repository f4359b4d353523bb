// Manifests and indexes: OCI image-spec v1 and Docker schema 2.
//
// A manifest's bytes are what its digest covers, so they are kept as
// received and never re-serialised when copied. Parsing validates what
// regdisk relies on: schemaVersion 2, a known media type, well-formed
// descriptors (digest, size >= 0).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "oci/digest.h"
#include "util/status.h"

namespace regdisk::oci {

namespace media {
inline constexpr std::string_view kOciManifest = "application/vnd.oci.image.manifest.v1+json";
inline constexpr std::string_view kOciIndex = "application/vnd.oci.image.index.v1+json";
inline constexpr std::string_view kOciConfig = "application/vnd.oci.image.config.v1+json";
inline constexpr std::string_view kOciLayerTar = "application/vnd.oci.image.layer.v1.tar";
inline constexpr std::string_view kOciLayerGzip = "application/vnd.oci.image.layer.v1.tar+gzip";
inline constexpr std::string_view kOciLayerZstd = "application/vnd.oci.image.layer.v1.tar+zstd";
inline constexpr std::string_view kDockerManifest = "application/vnd.docker.distribution.manifest.v2+json";
inline constexpr std::string_view kDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json";
inline constexpr std::string_view kDockerConfig = "application/vnd.docker.container.image.v1+json";
inline constexpr std::string_view kDockerLayerGzip = "application/vnd.docker.image.rootfs.diff.tar.gzip";
inline constexpr std::string_view kDockerSchema1 = "application/vnd.docker.distribution.manifest.v1+json";
inline constexpr std::string_view kDockerSchema1Signed = "application/vnd.docker.distribution.manifest.v1+prettyjws";

bool IsIndex(std::string_view media_type);
bool IsImageManifest(std::string_view media_type);
// The Accept header value listing every manifest type regdisk reads.
std::string AcceptHeader();
}  // namespace media

// Manifests larger than this are refused before they are parsed (the same
// limit Distribution applies when they are pushed).
inline constexpr uint64_t kMaxManifestBytes = 4 << 20;

struct Platform {
  std::string os;
  std::string architecture;
  std::string variant;

  // Parses "os/arch[/variant]".
  static Result<Platform> Parse(std::string_view text);
  std::string String() const;
  bool Matches(const Platform& want) const;
};

struct Descriptor {
  std::string media_type;
  Digest digest;
  int64_t size = 0;
  std::optional<Platform> platform;
  std::map<std::string, std::string> annotations;
  std::vector<std::string> urls;
  // Any further fields, kept so that writing an index loses nothing.
  std::string artifact_type;

  static Result<Descriptor> FromJson(const nlohmann::json& j);
  nlohmann::json ToJson() const;
};

struct Manifest {
  std::string media_type;  // as declared, or inferred for OCI documents without one
  // For image manifests:
  std::optional<Descriptor> config;
  std::vector<Descriptor> layers;
  // For indexes and manifest lists:
  std::vector<Descriptor> manifests;
  std::map<std::string, std::string> annotations;

  bool is_index() const { return media::IsIndex(media_type); }

  // Parses manifest bytes. content_type is the registry's Content-Type (or
  // the descriptor's media type) and is used when the document has none.
  static Result<Manifest> Parse(std::string_view bytes, std::string_view content_type = {});
};

// A manifest as stored: the exact bytes, their media type and digest.
struct RawManifest {
  std::string bytes;
  std::string media_type;
  Digest digest;
};

// Picks the entry for `want` from an index; the error lists what it offers.
Result<Descriptor> SelectPlatform(const Manifest& index, const Platform& want);

}  // namespace regdisk::oci
