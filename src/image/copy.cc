#include "image/copy.h"

#include <nlohmann/json.hpp>

#include "util/log.h"

namespace regdisk::image {

using json = nlohmann::json;

namespace {

constexpr uint64_t kMaxConfigBytes = 4 << 20;

Status CopyBlobs(ImageSource& src, ImageDestination& dst, const oci::Manifest& m, CopyResult& result) {
  std::vector<const oci::Descriptor*> blobs;
  if (m.config) blobs.push_back(&*m.config);
  for (const auto& l : m.layers) blobs.push_back(&l);
  for (const oci::Descriptor* d : blobs) {
    ASSIGN_OR_RETURN(bool present, dst.HasBlob(*d));
    if (present) {
      ++result.blobs_present;
      continue;
    }
    log::Info("copying blob {} ({} bytes)", d->digest.Short(), d->size);
    RETURN_IF_ERROR(dst.PutBlob(*d, src).Annotate("copying blob " + d->digest.Short()));
    ++result.blobs_copied;
    result.bytes_copied += static_cast<uint64_t>(d->size);
  }
  return OkStatus();
}

Result<oci::Manifest> ParseChild(const oci::RawManifest& raw) {
  ASSIGN_OR_RETURN(oci::Manifest m, oci::Manifest::Parse(raw.bytes, raw.media_type));
  if (m.is_index()) {
    return Unimplemented("manifest " + raw.digest.Short() + " is an index nested inside an index, which regdisk does not copy");
  }
  return m;
}

}  // namespace

Result<ResolvedImage> ResolveImage(ImageSource& src, const oci::Platform& platform) {
  ResolvedImage r;
  ASSIGN_OR_RETURN(r.raw, src.GetManifest());
  ASSIGN_OR_RETURN(r.manifest, oci::Manifest::Parse(r.raw.bytes, r.raw.media_type));
  if (r.manifest.is_index()) {
    ASSIGN_OR_RETURN(oci::Descriptor d, oci::SelectPlatform(r.manifest, platform));
    r.index = std::move(r.raw);
    ASSIGN_OR_RETURN(r.raw, src.GetManifestByDigest(d));
    ASSIGN_OR_RETURN(r.manifest, ParseChild(r.raw));
  }
  return r;
}

Result<CopyResult> Copy(ImageSource& src, ImageDestination& dst, const CopyOptions& options) {
  CopyResult result;
  const std::string tag = dst.Tag();
  ASSIGN_OR_RETURN(oci::RawManifest top, src.GetManifest());
  ASSIGN_OR_RETURN(oci::Manifest m, oci::Manifest::Parse(top.bytes, top.media_type));
  if (m.is_index() && options.all) {
    // Children first, so the registry never holds an index with dangling
    // references.
    for (const auto& child : m.manifests) {
      ASSIGN_OR_RETURN(oci::RawManifest raw, src.GetManifestByDigest(child));
      ASSIGN_OR_RETURN(oci::Manifest cm, ParseChild(raw));
      RETURN_IF_ERROR(CopyBlobs(src, dst, cm, result));
      RETURN_IF_ERROR(dst.PutManifest(raw, "", false));
    }
    RETURN_IF_ERROR(dst.PutManifest(top, tag, true));
    result.digest = top.digest;
    result.media_type = top.media_type;
    return result;
  }
  if (m.is_index()) {
    ASSIGN_OR_RETURN(oci::Descriptor d, oci::SelectPlatform(m, options.platform));
    ASSIGN_OR_RETURN(top, src.GetManifestByDigest(d));
    ASSIGN_OR_RETURN(m, ParseChild(top));
  }
  RETURN_IF_ERROR(CopyBlobs(src, dst, m, result));
  RETURN_IF_ERROR(dst.PutManifest(top, tag, true));
  result.digest = top.digest;
  result.media_type = top.media_type;
  return result;
}

Result<std::string> FetchConfig(ImageSource& src, const oci::Descriptor& config) {
  if (config.size < 0 || static_cast<uint64_t>(config.size) > kMaxConfigBytes) {
    return ResourceExhausted("the image config is " + std::to_string(config.size) + " bytes, over the limit of " +
                             std::to_string(kMaxConfigBytes) + "; the image is malformed");
  }
  std::string bytes;
  RETURN_IF_ERROR(src.FetchBlob(config, [&](std::string_view chunk) {
    bytes.append(chunk);
    return OkStatus();
  }).Annotate("fetching the image config"));
  return bytes;
}

Result<json> Inspect(ImageSource& src, const oci::Platform& platform) {
  ASSIGN_OR_RETURN(ResolvedImage img, ResolveImage(src, platform));
  json out;
  out["name"] = src.Name();
  out["digest"] = img.raw.digest.str();
  out["mediaType"] = img.raw.media_type;
  if (img.index) {
    out["index"] = {{"digest", img.index->digest.str()}, {"mediaType", img.index->media_type}};
  }
  json layers = json::array();
  int64_t total = 0;
  for (const auto& l : img.manifest.layers) {
    layers.push_back(l.ToJson());
    total += l.size;
  }
  out["config"] = img.manifest.config->ToJson();
  out["layers"] = layers;
  out["size"] = total;
  if (!img.manifest.annotations.empty()) out["annotations"] = img.manifest.annotations;

  ASSIGN_OR_RETURN(std::string cfg_bytes, FetchConfig(src, *img.manifest.config));
  json config = json::parse(cfg_bytes, nullptr, false);
  if (config.is_object()) {
    for (const char* key : {"os", "architecture", "variant", "created", "author"}) {
      if (config.contains(key) && config[key].is_string()) out[key] = config[key];
    }
    if (auto c = config.find("config"); c != config.end() && c->is_object()) {
      if (auto labels = c->find("Labels"); labels != c->end() && labels->is_object()) out["labels"] = *labels;
    }
  }
  return out;
}

}  // namespace regdisk::image
