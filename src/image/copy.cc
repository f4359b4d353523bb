#include "image/copy.h"

#include <nlohmann/json.hpp>

#include "util/log.h"

namespace regdisk::image {

using json = nlohmann::json;

namespace {

constexpr uint64_t kMaxConfigBytes = 4 << 20;

// Hands out the source's blobs unchanged, reporting the bytes that pass
// (every 4 MiB) to on_progress.
class ReportingSource : public ImageSource {
 public:
  ReportingSource(ImageSource& src, const ProgressFn& fn) : src_(src), fn_(fn) {}
  std::string Name() const override { return src_.Name(); }
  Result<oci::RawManifest> GetManifest() override { return src_.GetManifest(); }
  Result<oci::RawManifest> GetManifestByDigest(const oci::Descriptor& d) override { return src_.GetManifestByDigest(d); }
  Status FetchBlob(const oci::Descriptor& d, const registry::BlobSink& sink) override {
    return src_.FetchBlob(d, Wrap(d, 0, sink));
  }
  Status FetchBlobFrom(const oci::Descriptor& d, uint64_t offset, oci::Hasher& hasher,
                       const registry::BlobSink& sink) override {
    return src_.FetchBlobFrom(d, offset, hasher, Wrap(d, offset, sink));
  }
  std::optional<std::filesystem::path> LocalBlobPath(const oci::Descriptor& d) override { return src_.LocalBlobPath(d); }
  const oci::Reference* RegistryRef() const override { return src_.RegistryRef(); }

 private:
  registry::BlobSink Wrap(const oci::Descriptor& d, uint64_t offset, const registry::BlobSink& sink) {
    return [this, d, done = offset, shown = offset, &sink](std::string_view chunk) mutable -> Status {
      done += chunk.size();
      if (done - shown >= (4u << 20)) {
        shown = done;
        fn_({ProgressEvent::Kind::kBytes, d.digest, done, static_cast<uint64_t>(d.size), {}});
      }
      return sink(chunk);
    };
  }
  ImageSource& src_;
  const ProgressFn& fn_;
};

Status CopyBlobs(ImageSource& src, ImageDestination& dst, const oci::Manifest& m, const ProgressFn& progress,
                 CopyResult& result) {
  // Layers, then the config (the order podman shows).
  std::vector<const oci::Descriptor*> blobs;
  for (const auto& l : m.layers) blobs.push_back(&l);
  if (m.config) blobs.push_back(&*m.config);
  ReportingSource reporting(src, progress);
  ImageSource& from = progress ? static_cast<ImageSource&>(reporting) : src;
  auto report = [&](ProgressEvent::Kind kind, const oci::Descriptor& d, uint64_t done) {
    if (progress) progress({kind, d.digest, done, static_cast<uint64_t>(d.size), {}});
  };
  for (const oci::Descriptor* d : blobs) {
    ASSIGN_OR_RETURN(bool present, dst.HasBlob(*d));
    if (present) {
      ++result.blobs_present;
      report(ProgressEvent::Kind::kSkipped, *d, static_cast<uint64_t>(d->size));
      continue;
    }
    log::Info("copying blob {} ({} bytes)", d->digest.Short(), d->size);
    report(ProgressEvent::Kind::kStart, *d, 0);
    if (Status st = dst.PutBlob(*d, from); !st.ok()) {
      report(ProgressEvent::Kind::kFailed, *d, 0);
      return std::move(st).Annotate("copying blob " + d->digest.Short());
    }
    report(ProgressEvent::Kind::kDone, *d, static_cast<uint64_t>(d->size));
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
      RETURN_IF_ERROR(CopyBlobs(src, dst, cm, options.on_progress, result));
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
  RETURN_IF_ERROR(CopyBlobs(src, dst, m, options.on_progress, result));
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

Result<Inspection> Inspect(ImageSource& src, const InspectOptions& options) {
  using ojson = nlohmann::ordered_json;
  Inspection r;
  ASSIGN_OR_RETURN(r.image, ResolveImage(src, options.platform));
  ASSIGN_OR_RETURN(r.config, FetchConfig(src, *r.image.manifest.config));
  json config = json::parse(r.config, nullptr, false);
  if (!config.is_object()) config = json::object();
  json inner = config.value("config", json::object());
  if (!inner.is_object()) inner = json::object();
  auto str = [](const json& o, const char* key) -> std::string {
    auto it = o.find(key);
    return it != o.end() && it->is_string() ? it->get<std::string>() : "";
  };
  auto or_null = [](const json& o, const char* key, json::value_t type) -> ojson {
    auto it = o.find(key);
    if (it == o.end() || it->type() != type) return nullptr;
    return ojson::parse(it->dump());
  };

  ojson& out = r.skopeo;
  out["Name"] = src.RepoName();
  out["Digest"] = (r.image.index ? r.image.index->digest : r.image.raw.digest).str();
  ojson tags = ojson::array();
  if (options.tags) {
    auto list = src.RepoTags();
    if (!list.ok()) return std::move(list).status().Annotate("listing the tags of " + src.Name() + " (--no-tags skips this)");
    for (auto& t : *list) tags.push_back(std::move(t));
  }
  out["RepoTags"] = tags;
  const std::string created = str(config, "created");
  out["Created"] = created.empty() ? ojson(nullptr) : ojson(created);
  out["DockerVersion"] = str(config, "docker_version");
  out["Labels"] = or_null(inner, "Labels", json::value_t::object);
  out["Architecture"] = str(config, "architecture");
  if (!str(config, "variant").empty()) out["Variant"] = str(config, "variant");
  out["Os"] = str(config, "os");
  ojson layers = ojson::array(), data = ojson::array();
  for (const auto& l : r.image.manifest.layers) {
    layers.push_back(l.digest.str());
    ojson annotations = nullptr;
    for (const auto& [k, v] : l.annotations) annotations[k] = v;
    data.push_back({{"MIMEType", l.media_type}, {"Digest", l.digest.str()}, {"Size", l.size},
                    {"Annotations", annotations}});
  }
  out["Layers"] = layers;
  out["LayersData"] = data;
  out["Env"] = or_null(inner, "Env", json::value_t::array);
  return r;
}

}  // namespace regdisk::image
