#include "oci/manifest.h"

#include <nlohmann/json.hpp>

namespace regdisk::oci {

using json = nlohmann::json;

namespace media {

bool IsIndex(std::string_view t) { return t == kOciIndex || t == kDockerManifestList; }
bool IsImageManifest(std::string_view t) { return t == kOciManifest || t == kDockerManifest; }

std::string AcceptHeader() {
  return std::string(kOciManifest) + ", " + std::string(kOciIndex) + ", " + std::string(kDockerManifest) + ", " +
         std::string(kDockerManifestList);
}

}  // namespace media

Result<Platform> Platform::Parse(std::string_view text) {
  Platform p;
  size_t a = text.find('/');
  if (a == std::string_view::npos || a == 0 || a + 1 == text.size()) {
    return InvalidArgument("platform \"" + std::string(text) + "\" is not of the form OS/ARCH[/VARIANT], e.g. linux/amd64");
  }
  p.os = std::string(text.substr(0, a));
  std::string_view rest = text.substr(a + 1);
  size_t b = rest.find('/');
  p.architecture = std::string(rest.substr(0, b));
  if (b != std::string_view::npos) p.variant = std::string(rest.substr(b + 1));
  if (p.architecture.empty() || (b != std::string_view::npos && p.variant.empty())) {
    return InvalidArgument("platform \"" + std::string(text) + "\" is not of the form OS/ARCH[/VARIANT], e.g. linux/amd64");
  }
  return p;
}

std::string Platform::String() const {
  return os + "/" + architecture + (variant.empty() ? "" : "/" + variant);
}

bool Platform::Matches(const Platform& want) const {
  if (os != want.os || architecture != want.architecture) return false;
  return want.variant.empty() || variant == want.variant;
}

namespace {

Result<std::string> GetString(const json& j, const char* key, bool required) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) return InvalidArgument(std::string("field \"") + key + "\" is missing");
    return std::string();
  }
  if (!it->is_string()) return InvalidArgument(std::string("field \"") + key + "\" is not a string");
  return it->get<std::string>();
}

Result<std::map<std::string, std::string>> GetStringMap(const json& j, const char* key) {
  std::map<std::string, std::string> out;
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return out;
  if (!it->is_object()) return InvalidArgument(std::string("field \"") + key + "\" is not an object");
  for (auto& [k, v] : it->items()) {
    if (!v.is_string()) return InvalidArgument(std::string("field \"") + key + "." + k + "\" is not a string");
    out[k] = v.get<std::string>();
  }
  return out;
}

Result<std::vector<Descriptor>> GetDescriptors(const json& j, const char* key) {
  std::vector<Descriptor> out;
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return out;
  if (!it->is_array()) return InvalidArgument(std::string("field \"") + key + "\" is not an array");
  for (size_t i = 0; i < it->size(); ++i) {
    auto d = Descriptor::FromJson((*it)[i]);
    if (!d.ok()) return std::move(d).status().Annotate(std::string(key) + "[" + std::to_string(i) + "]");
    out.push_back(std::move(*d));
  }
  return out;
}

}  // namespace

Result<Descriptor> Descriptor::FromJson(const json& j) {
  if (!j.is_object()) return InvalidArgument("descriptor is not a JSON object");
  Descriptor d;
  ASSIGN_OR_RETURN(d.media_type, GetString(j, "mediaType", true));
  ASSIGN_OR_RETURN(std::string digest, GetString(j, "digest", true));
  ASSIGN_OR_RETURN(d.digest, Digest::Parse(digest));
  auto size = j.find("size");
  if (size == j.end() || !size->is_number_integer() || size->get<int64_t>() < 0) {
    return InvalidArgument("field \"size\" is missing or not a non-negative integer");
  }
  d.size = size->get<int64_t>();
  ASSIGN_OR_RETURN(d.annotations, GetStringMap(j, "annotations"));
  ASSIGN_OR_RETURN(d.artifact_type, GetString(j, "artifactType", false));
  if (auto u = j.find("urls"); u != j.end() && u->is_array()) {
    for (auto& x : *u) {
      if (x.is_string()) d.urls.push_back(x.get<std::string>());
    }
  }
  if (auto p = j.find("platform"); p != j.end() && p->is_object()) {
    Platform plat;
    ASSIGN_OR_RETURN(plat.os, GetString(*p, "os", false));
    ASSIGN_OR_RETURN(plat.architecture, GetString(*p, "architecture", false));
    ASSIGN_OR_RETURN(plat.variant, GetString(*p, "variant", false));
    d.platform = plat;
  }
  return d;
}

json Descriptor::ToJson() const {
  json j = {{"mediaType", media_type}, {"digest", digest.str()}, {"size", size}};
  if (!annotations.empty()) j["annotations"] = annotations;
  if (!urls.empty()) j["urls"] = urls;
  if (!artifact_type.empty()) j["artifactType"] = artifact_type;
  if (platform) {
    json p = {{"os", platform->os}, {"architecture", platform->architecture}};
    if (!platform->variant.empty()) p["variant"] = platform->variant;
    j["platform"] = p;
  }
  return j;
}

Result<Manifest> Manifest::Parse(std::string_view bytes, std::string_view content_type) {
  if (bytes.size() > kMaxManifestBytes) {
    return ResourceExhausted("the manifest is " + std::to_string(bytes.size()) + " bytes, over the limit of " +
                             std::to_string(kMaxManifestBytes) + " bytes");
  }
  json j = json::parse(bytes.begin(), bytes.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    std::string_view head = bytes.substr(0, 40);
    bool html = head.find('<') != std::string_view::npos;
    return InvalidArgument(std::string("the manifest is not a JSON object") +
                           (html ? " (the server answered with HTML; is this really a registry?)" : ""));
  }
  Manifest m;
  auto sv = j.find("schemaVersion");
  if (sv == j.end() || !sv->is_number_integer()) {
    return InvalidArgument("the manifest has no integer schemaVersion");
  }
  if (sv->get<int64_t>() == 1 || content_type == media::kDockerSchema1 || content_type == media::kDockerSchema1Signed) {
    return Unimplemented("the manifest is Docker schema 1, which is deprecated; push the image again with a current tool");
  }
  if (sv->get<int64_t>() != 2) {
    return Unimplemented("manifest schemaVersion " + std::to_string(sv->get<int64_t>()) + " is not supported");
  }
  ASSIGN_OR_RETURN(m.media_type, GetString(j, "mediaType", false));
  if (m.media_type.empty()) {
    // OCI allows the field to be absent; fall back to the transport's word
    // and then to the shape of the document.
    if (media::IsIndex(content_type) || media::IsImageManifest(content_type)) {
      m.media_type = std::string(content_type);
    } else if (j.contains("manifests")) {
      m.media_type = media::kOciIndex;
    } else if (j.contains("config") && j.contains("layers")) {
      m.media_type = media::kOciManifest;
    }
  }
  if (!media::IsIndex(m.media_type) && !media::IsImageManifest(m.media_type)) {
    return Unimplemented("manifest media type \"" + m.media_type +
                         "\" is not supported; expected an OCI or Docker schema 2 manifest or index");
  }
  ASSIGN_OR_RETURN(m.annotations, GetStringMap(j, "annotations"));
  if (m.is_index()) {
    if (!j.contains("manifests")) return InvalidArgument("the index has no \"manifests\" field");
    ASSIGN_OR_RETURN(m.manifests, GetDescriptors(j, "manifests"));
  } else {
    auto cfg = j.find("config");
    if (cfg == j.end()) return InvalidArgument("the image manifest has no \"config\" field");
    auto c = Descriptor::FromJson(*cfg);
    if (!c.ok()) return std::move(c).status().Annotate("config");
    m.config = std::move(*c);
    if (!j.contains("layers")) return InvalidArgument("the image manifest has no \"layers\" field");
    ASSIGN_OR_RETURN(m.layers, GetDescriptors(j, "layers"));
  }
  return m;
}

Result<Descriptor> SelectPlatform(const Manifest& index, const Platform& want) {
  std::string offered;
  for (const auto& d : index.manifests) {
    if (!media::IsImageManifest(d.media_type) || !d.platform) continue;
    if (d.platform->Matches(want)) return d;
    offered += (offered.empty() ? "" : ", ") + d.platform->String();
  }
  return NotFound("the image has no variant for platform " + want.String() + " (it offers: " +
                  (offered.empty() ? "none" : offered) + "); choose one with --platform");
}

}  // namespace regdisk::oci
