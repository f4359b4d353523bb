#include "image/layout.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "util/fs.h"

namespace regdisk::image {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {
constexpr uint64_t kMaxIndexBytes = 16 << 20;
// Blobs are written beside the layout's index, not in blobs/ (where a
// killed writer's temp file would break tools that expect only digests
// there), and renamed into blobs/ once verified. Leftovers are removed by
// the next writer.
constexpr const char* kStaging = ".regdisk-blob";
constexpr const char* kLayoutFileText = "{\"imageLayoutVersion\":\"1.0.0\"}";
}  // namespace

Result<OciLayout> OciLayout::Open(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return NotFound("OCI layout " + dir.string() + " does not exist; check the oci: path");
  }
  auto text = ReadFileCapped(dir / "oci-layout", 4096);
  if (!text.ok()) {
    return InvalidArgument(dir.string() + " is not an OCI image layout (no readable oci-layout file)");
  }
  json j = json::parse(*text, nullptr, false);
  if (!j.is_object() || !j.contains("imageLayoutVersion") || !j["imageLayoutVersion"].is_string()) {
    return InvalidArgument(dir.string() + "/oci-layout is malformed; expected {\"imageLayoutVersion\":\"1.0.0\"}");
  }
  return OciLayout(dir);
}

Result<OciLayout> OciLayout::OpenOrCreate(const fs::path& dir) {
  std::error_code ec;
  if (fs::exists(dir / "oci-layout", ec)) {
    ASSIGN_OR_RETURN(OciLayout layout, Open(dir));
    PendingFile::RemoveStale(dir / kStaging);
    // Left in blobs/ by regdisk versions that staged there.
    PendingFile::RemoveStale(dir / "blobs" / "sha256" / "stream");
    return layout;
  }
  if (fs::exists(dir, ec) && !fs::is_empty(dir, ec)) {
    return FailedPrecondition(dir.string() + " exists and is not an OCI layout; name an empty or new directory");
  }
  // Made whole beside DIR and renamed onto it (rename replaces an empty
  // directory), so a process killed half-way never leaves DIR half a layout.
  const fs::path parent = dir.parent_path().empty() ? fs::path(".") : dir.parent_path();
  RETURN_IF_ERROR(MakeDirs(parent));
  ASSIGN_OR_RETURN(TempDir fresh, TempDir::Create("." + dir.filename().string() + ".regdisk-new", parent));
  RETURN_IF_ERROR(MakeDirs(fresh.path() / "blobs" / "sha256"));
  RETURN_IF_ERROR(WriteFileAtomic(fresh.path() / "index.json",
                                  json{{"schemaVersion", 2}, {"mediaType", oci::media::kOciIndex},
                                       {"manifests", json::array()}}
                                      .dump()));
  RETURN_IF_ERROR(WriteFileAtomic(fresh.path() / "oci-layout", kLayoutFileText));
  ::chmod(fresh.path().c_str(), 0755);
  if (::rename(fresh.path().c_str(), dir.c_str()) != 0) {
    return ErrnoStatus("creating the OCI layout " + dir.string());
  }
  RETURN_IF_ERROR(SyncDir(parent));
  return OciLayout(dir);
}

fs::path OciLayout::BlobPath(const oci::Digest& d) const { return dir_ / "blobs" / d.algorithm() / d.hex(); }

bool OciLayout::HasBlob(const oci::Digest& d) const {
  std::error_code ec;
  return fs::is_regular_file(BlobPath(d), ec);
}

Result<std::vector<oci::Descriptor>> OciLayout::ReadIndex() const {
  auto text = ReadFileCapped(dir_ / "index.json", kMaxIndexBytes);
  if (!text.ok()) return std::move(text).status().Annotate("reading the layout's index.json");
  auto m = oci::Manifest::Parse(*text, oci::media::kOciIndex);
  if (!m.ok() || !m->is_index()) {
    return InvalidArgument(dir_.string() + "/index.json is not a valid image index" +
                           (m.ok() ? std::string() : ": " + m.status().message()));
  }
  return m->manifests;
}

Result<oci::Descriptor> OciLayout::Resolve(const std::string& tag) const {
  ASSIGN_OR_RETURN(std::vector<oci::Descriptor> entries, ReadIndex());
  if (tag.empty()) {
    if (entries.size() == 1) return entries[0];
    if (entries.empty()) return NotFound("OCI layout " + dir_.string() + " holds no images");
  }
  std::string tags;
  for (const auto& d : entries) {
    auto it = d.annotations.find(kRefNameAnnotation);
    if (it == d.annotations.end()) continue;
    if (it->second == tag) return d;
    tags += (tags.empty() ? "" : ", ") + it->second;
  }
  if (tag.empty()) {
    return InvalidArgument("OCI layout " + dir_.string() + " holds several images; name one as oci:" + dir_.string() +
                           ":TAG (tags: " + tags + ")");
  }
  return NotFound("OCI layout " + dir_.string() + " has no image tagged \"" + tag + "\" (tags: " +
                  (tags.empty() ? "none" : tags) + ")");
}

Result<std::string> OciLayout::ReadBlob(const oci::Descriptor& desc, uint64_t max_bytes) const {
  if (static_cast<uint64_t>(desc.size) > max_bytes) {
    return ResourceExhausted("blob " + desc.digest.Short() + " is " + std::to_string(desc.size) +
                             " bytes, over the limit of " + std::to_string(max_bytes));
  }
  auto data = ReadFileCapped(BlobPath(desc.digest), max_bytes);
  if (!data.ok()) {
    if (data.status().code() == Code::kNotFound) {
      return NotFound("OCI layout " + dir_.string() + " is missing blob " + desc.digest.str());
    }
    return data.status();
  }
  oci::Hasher h(desc.digest.algorithm());
  h.Update(*data);
  RETURN_IF_ERROR(oci::VerifyBlob("blob " + desc.digest.Short() + " in " + dir_.string(), desc.digest,
                                  static_cast<uint64_t>(desc.size), data->size(), h.Finish()));
  return data;
}

Status OciLayout::WriteBlob(const oci::Descriptor& desc,
                            const std::function<Status(const registry::BlobSink& sink)>& produce) {
  if (HasBlob(desc.digest)) return OkStatus();
  fs::path final_path = BlobPath(desc.digest);
  RETURN_IF_ERROR(MakeDirs(final_path.parent_path()));
  ASSIGN_OR_RETURN(PendingFile pending, PendingFile::Create(dir_ / kStaging, 0444));
  oci::Hasher h(desc.digest.algorithm());
  const uint64_t limit = static_cast<uint64_t>(desc.size);
  const std::string what = "blob " + desc.digest.Short();
  RETURN_IF_ERROR(produce([&](std::string_view chunk) -> Status {
    RETURN_IF_ERROR(oci::CheckBlobGrowth(what, h.bytes(), chunk.size(), limit));
    h.Update(chunk);
    return WriteAll(pending.fd(), chunk);
  }));
  const uint64_t written = h.bytes();
  RETURN_IF_ERROR(oci::VerifyBlob(what, desc.digest, limit, written, h.Finish()));
  return pending.CommitAs(final_path);
}

Status OciLayout::WriteBlobBytes(const oci::Descriptor& desc, std::string_view bytes) {
  return WriteBlob(desc, [&](const registry::BlobSink& sink) { return sink(bytes); });
}

Result<oci::Descriptor> OciLayout::WriteBlobStream(const std::function<Result<oci::Descriptor>(int fd)>& produce) {
  const fs::path dir = dir_ / "blobs" / "sha256";
  RETURN_IF_ERROR(MakeDirs(dir));
  // The final name is not known yet: write under a temp name, then rename.
  ASSIGN_OR_RETURN(PendingFile pending, PendingFile::Create(dir_ / kStaging, 0444));
  ASSIGN_OR_RETURN(oci::Descriptor desc, produce(pending.fd()));
  const fs::path final_path = BlobPath(desc.digest);
  if (HasBlob(desc.digest)) return desc;  // identical content is already there; the temp file goes
  RETURN_IF_ERROR(pending.CommitAs(final_path));
  return desc;
}

Status OciLayout::AddToIndex(oci::Descriptor desc, const std::string& tag) {
  ASSIGN_OR_RETURN(std::vector<oci::Descriptor> entries, ReadIndex());
  std::vector<oci::Descriptor> kept;
  for (auto& d : entries) {
    auto it = d.annotations.find(kRefNameAnnotation);
    bool same_tag = !tag.empty() && it != d.annotations.end() && it->second == tag;
    bool same_untagged = tag.empty() && it == d.annotations.end() && d.digest == desc.digest;
    if (!same_tag && !same_untagged) kept.push_back(std::move(d));
  }
  if (!tag.empty()) desc.annotations[kRefNameAnnotation] = tag;
  kept.push_back(std::move(desc));
  json manifests = json::array();
  for (const auto& d : kept) manifests.push_back(d.ToJson());
  json index = {{"schemaVersion", 2}, {"mediaType", oci::media::kOciIndex}, {"manifests", manifests}};
  return WriteFileAtomic(dir_ / "index.json", index.dump());
}

}  // namespace regdisk::image
