#include "image/transport.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "image/layout.h"
#include "util/fs.h"

namespace regdisk::image {

namespace fs = std::filesystem;

Result<ImageName> ImageName::Parse(std::string_view text) {
  ImageName n;
  if (text.rfind("oci:", 0) == 0) {
    n.transport = Transport::kOciLayout;
    std::string_view rest = text.substr(4);
    // As in skopeo, the directory ends at the first ':'.
    size_t colon = rest.find(':');
    n.dir = std::string(rest.substr(0, colon));
    if (colon != std::string_view::npos) n.tag = std::string(rest.substr(colon + 1));
    if (n.dir.empty()) return InvalidArgument("\"" + std::string(text) + "\" names no directory; use oci:DIR[:TAG]");
    if (colon != std::string_view::npos && !oci::IsValidTag(n.tag)) {
      return InvalidArgument("\"" + std::string(text) + "\" has an invalid tag \"" + n.tag +
                             "\"; tags are up to 128 letters, digits, '_', '.' and '-'");
    }
    return n;
  }
  std::string_view ref = text;
  if (ref.rfind("docker://", 0) == 0) {
    ref.remove_prefix(9);
  } else if (size_t p = ref.find("://"); p != std::string_view::npos) {
    return InvalidArgument("transport \"" + std::string(ref.substr(0, p)) + "://\" in \"" + std::string(text) +
                           "\" is not supported; use docker://HOST/REPO[:TAG] or oci:DIR[:TAG]");
  } else if (size_t c = ref.find(':'); c != std::string_view::npos) {
    std::string_view prefix = ref.substr(0, c);
    if (prefix == "dir" || prefix == "docker-archive" || prefix == "oci-archive" || prefix == "containers-storage" ||
        prefix == "docker-daemon") {
      return InvalidArgument("transport \"" + std::string(prefix) + ":\" is not supported; use docker:// or oci:");
    }
  }
  ASSIGN_OR_RETURN(n.ref, oci::Reference::Parse(ref));
  return n;
}

Result<std::vector<ImageName>> CandidateNames(std::string_view text, const registry::RegistriesConf* conf) {
  const bool explicit_transport = text.find("://") != std::string_view::npos || text.rfind("oci:", 0) == 0;
  if (explicit_transport || !conf || !registry::IsShortName(text)) {
    ASSIGN_OR_RETURN(ImageName n, ImageName::Parse(text));
    return std::vector<ImageName>{n};
  }
  ASSIGN_OR_RETURN(ImageName checked, ImageName::Parse(text));  // the short name itself must be well formed
  (void)checked;
  ASSIGN_OR_RETURN(std::vector<std::string> qualified, registry::ResolveShortName(*conf, text));
  std::vector<ImageName> out;
  for (const auto& q : qualified) {
    ASSIGN_OR_RETURN(ImageName n, ImageName::Parse(q));
    out.push_back(std::move(n));
  }
  return out;
}

std::string ImageName::String() const {
  if (transport == Transport::kOciLayout) return "oci:" + dir.string() + (tag.empty() ? "" : ":" + tag);
  return "docker://" + ref.String();
}

namespace {

// Verified streaming read of a local file, from `offset` on (the hasher has
// seen the bytes before it).
Status StreamFile(const fs::path& path, const oci::Descriptor& desc, const registry::BlobSink& sink, uint64_t offset,
                  oci::Hasher& h) {
  auto fd = OpenFile(path, O_RDONLY);
  if (!fd.ok()) {
    if (fd.status().code() == Code::kNotFound) return NotFound("blob " + desc.digest.str() + " is missing at " + path.string());
    return fd.status();
  }
  if (offset > 0 && ::lseek(fd->get(), static_cast<off_t>(offset), SEEK_SET) < 0) {
    return ErrnoStatus("seeking in " + path.string());
  }
  std::string buf(1 << 20, '\0');
  for (;;) {
    ssize_t n = ::read(fd->get(), buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("reading " + path.string());
    }
    if (n == 0) break;
    RETURN_IF_ERROR(oci::CheckBlobGrowth("blob " + desc.digest.Short() + " at " + path.string(), h.bytes(),
                                         static_cast<uint64_t>(n), static_cast<uint64_t>(desc.size)));
    h.Update(buf.data(), static_cast<size_t>(n));
    RETURN_IF_ERROR(sink(std::string_view(buf.data(), static_cast<size_t>(n))));
  }
  const uint64_t got_size = h.bytes();
  return oci::VerifyBlob("blob " + desc.digest.Short() + " at " + path.string(), desc.digest,
                         static_cast<uint64_t>(desc.size), got_size, h.Finish());
}

Result<oci::RawManifest> ToRaw(std::string bytes, const oci::Descriptor& desc) {
  auto parsed = oci::Manifest::Parse(bytes, desc.media_type);
  if (!parsed.ok()) return std::move(parsed).status().Annotate("manifest " + desc.digest.Short());
  oci::RawManifest m;
  m.bytes = std::move(bytes);
  m.media_type = parsed->media_type;
  m.digest = desc.digest;
  return m;
}

class FileRangeReader : public BlobRangeReader {
 public:
  explicit FileRangeReader(OciLayout layout) : layout_(std::move(layout)) {}
  Status Read(const oci::Descriptor& desc, uint64_t offset, uint64_t length, const registry::BlobSink& sink) override {
    const fs::path path = layout_.BlobPath(desc.digest);
    ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(path, O_RDONLY));
    struct stat st;
    if (::fstat(fd.get(), &st) != 0) return ErrnoStatus("reading " + path.string());
    const uint64_t size = static_cast<uint64_t>(st.st_size);
    if (size != static_cast<uint64_t>(desc.size) || offset > size || size - offset < length) {
      return InvalidArgument("bytes " + std::to_string(offset) + "+" + std::to_string(length) + " of blob " +
                             desc.digest.Short() + " lie outside its " + std::to_string(size) + " bytes");
    }
    std::string buf(static_cast<size_t>(std::min<uint64_t>(length, 1 << 20)), '\0');
    for (uint64_t done = 0; done < length;) {
      ssize_t n = ::pread(fd.get(), buf.data(), std::min<uint64_t>(buf.size(), length - done), static_cast<off_t>(offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return n < 0 ? ErrnoStatus("reading " + path.string()) : DataLoss(path.string() + " shrank");
      RETURN_IF_ERROR(sink(std::string_view(buf.data(), static_cast<size_t>(n))));
      done += static_cast<uint64_t>(n);
    }
    return OkStatus();
  }

 private:
  OciLayout layout_;
};

class LayoutSource : public ImageSource {
 public:
  LayoutSource(OciLayout layout, std::string tag) : layout_(std::move(layout)), tag_(std::move(tag)) {}
  std::string Name() const override { return "oci:" + layout_.dir().string() + (tag_.empty() ? "" : ":" + tag_); }

  Result<oci::RawManifest> GetManifest() override {
    ASSIGN_OR_RETURN(oci::Descriptor d, layout_.Resolve(tag_));
    return GetManifestByDigest(d);
  }
  Result<oci::RawManifest> GetManifestByDigest(const oci::Descriptor& desc) override {
    ASSIGN_OR_RETURN(std::string bytes, layout_.ReadBlob(desc, oci::kMaxManifestBytes));
    return ToRaw(std::move(bytes), desc);
  }
  Status FetchBlob(const oci::Descriptor& desc, const registry::BlobSink& sink) override {
    oci::Hasher h(desc.digest.algorithm());
    return StreamFile(layout_.BlobPath(desc.digest), desc, sink, 0, h);
  }
  Status FetchBlobFrom(const oci::Descriptor& desc, uint64_t offset, oci::Hasher& hasher,
                       const registry::BlobSink& sink) override {
    return StreamFile(layout_.BlobPath(desc.digest), desc, sink, offset, hasher);
  }
  Result<std::unique_ptr<BlobRangeReader>> OpenRangeReader() override {
    return std::unique_ptr<BlobRangeReader>(std::make_unique<FileRangeReader>(layout_));
  }
  std::optional<fs::path> LocalBlobPath(const oci::Descriptor& desc) override {
    if (!layout_.HasBlob(desc.digest)) return std::nullopt;
    return layout_.BlobPath(desc.digest);
  }

 private:
  OciLayout layout_;
  std::string tag_;
};

class LayoutDestination : public ImageDestination {
 public:
  LayoutDestination(OciLayout layout, std::string tag) : layout_(std::move(layout)), tag_(std::move(tag)) {}
  std::string Name() const override { return "oci:" + layout_.dir().string() + (tag_.empty() ? "" : ":" + tag_); }
  std::string Tag() const override { return tag_; }
  Result<bool> HasBlob(const oci::Descriptor& desc) override { return layout_.HasBlob(desc.digest); }
  Status PutBlob(const oci::Descriptor& desc, ImageSource& src) override {
    return layout_.WriteBlob(desc, [&](const registry::BlobSink& sink) { return src.FetchBlob(desc, sink); });
  }
  Status PutBlobBytes(const oci::Descriptor& desc, std::string_view bytes) override {
    return layout_.WriteBlobBytes(desc, bytes);
  }
  Result<oci::Descriptor> PutBlobStream(const std::function<Result<oci::Descriptor>(int fd)>& produce) override {
    return layout_.WriteBlobStream(produce);
  }
  Status PutManifest(const oci::RawManifest& m, const std::string& tag, bool top_level) override {
    oci::Descriptor d;
    d.media_type = m.media_type;
    d.digest = m.digest;
    d.size = static_cast<int64_t>(m.bytes.size());
    RETURN_IF_ERROR(layout_.WriteBlobBytes(d, m.bytes));
    // Only the top-level image is recorded in index.json; children of an
    // index stay reachable through their parent.
    if (!top_level) return OkStatus();
    return layout_.AddToIndex(d, tag);
  }

 private:
  OciLayout layout_;
  std::string tag_;
};

class RegistryRangeReader : public BlobRangeReader {
 public:
  RegistryRangeReader(oci::Reference ref, const registry::ClientOptions& opt)
      : ref_(std::move(ref)), client_(ref_.registry, opt) {}
  Status Read(const oci::Descriptor& desc, uint64_t offset, uint64_t length, const registry::BlobSink& sink) override {
    return client_.FetchBlobRange(ref_.repository, desc, offset, length, sink);
  }
  Status ReadCancellable(const oci::Descriptor& desc, uint64_t offset, uint64_t length, const registry::BlobSink& sink,
                         const CancelToken& cancel) override {
    return client_.FetchBlobRange(ref_.repository, desc, offset, length, sink, &cancel);
  }

 private:
  oci::Reference ref_;
  registry::RegistryClient client_;
};

class DockerSource : public ImageSource {
 public:
  DockerSource(oci::Reference ref, const registry::ClientOptions& opt)
      : ref_(std::move(ref)), options_(opt), client_(ref_.registry, opt) {}
  Result<std::unique_ptr<BlobRangeReader>> OpenRangeReader() override {
    return std::unique_ptr<BlobRangeReader>(std::make_unique<RegistryRangeReader>(ref_, options_));
  }
  std::string Name() const override { return "docker://" + ref_.String(); }
  const oci::Reference* RegistryRef() const override { return &ref_; }
  Result<std::vector<std::string>> RepoTags() override { return client_.ListTags(ref_.repository); }
  std::string RepoName() const override { return ref_.registry + "/" + ref_.repository; }

  Result<oci::RawManifest> GetManifest() override { return client_.GetManifest(ref_.repository, ref_.ManifestRef()); }
  Result<oci::RawManifest> GetManifestByDigest(const oci::Descriptor& desc) override {
    return client_.GetManifest(ref_.repository, desc.digest.str());
  }
  Status FetchBlob(const oci::Descriptor& desc, const registry::BlobSink& sink) override {
    return client_.FetchBlob(ref_.repository, desc, sink);
  }
  Status FetchBlobFrom(const oci::Descriptor& desc, uint64_t offset, oci::Hasher& hasher,
                       const registry::BlobSink& sink) override {
    return client_.FetchBlob(ref_.repository, desc, sink, offset, &hasher);
  }

 private:
  oci::Reference ref_;
  registry::ClientOptions options_;
  registry::RegistryClient client_;
};

class DockerDestination : public ImageDestination {
 public:
  DockerDestination(oci::Reference ref, const registry::ClientOptions& opt) : ref_(std::move(ref)), client_(ref_.registry, opt) {}
  std::string Name() const override { return "docker://" + ref_.String(); }
  std::string Tag() const override { return ref_.tag; }
  Result<bool> HasBlob(const oci::Descriptor& desc) override { return client_.BlobExists(ref_.repository, desc.digest); }

  Status PutBlob(const oci::Descriptor& desc, ImageSource& src) override {
    if (const oci::Reference* from = src.RegistryRef(); from && from->registry == ref_.registry) {
      ASSIGN_OR_RETURN(bool mounted, client_.MountBlob(ref_.repository, desc, from->repository));
      if (mounted) return OkStatus();
    }
    if (auto path = src.LocalBlobPath(desc)) {
      ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(*path, O_RDONLY));
      return client_.PushBlob(ref_.repository, desc, fd.get());
    }
    // A remote source: stage the verified blob in a temp file, then upload.
    ASSIGN_OR_RETURN(TempDir tmp, TempDir::Create("regdisk-copy"));
    fs::path staged = tmp.path() / desc.digest.hex();
    ASSIGN_OR_RETURN(UniqueFd out, OpenFile(staged, O_RDWR | O_CREAT | O_EXCL, 0600));
    RETURN_IF_ERROR(src.FetchBlob(desc, [&](std::string_view chunk) { return WriteAll(out.get(), chunk); }));
    return client_.PushBlob(ref_.repository, desc, out.get());
  }

  Status PutBlobBytes(const oci::Descriptor& desc, std::string_view bytes) override {
    ASSIGN_OR_RETURN(bool present, client_.BlobExists(ref_.repository, desc.digest));
    if (present) return OkStatus();
    return client_.PushBlobBytes(ref_.repository, desc, bytes);
  }
  Result<oci::Descriptor> PutBlobStream(const std::function<Result<oci::Descriptor>(int fd)>& produce) override {
    return client_.PushBlobStream(ref_.repository, produce);
  }
  Status PutManifest(const oci::RawManifest& m, const std::string& tag, bool /*top_level*/) override {
    return client_.PutManifest(ref_.repository, tag.empty() ? m.digest.str() : tag, m);
  }

 private:
  oci::Reference ref_;
  registry::RegistryClient client_;
};

}  // namespace

Result<std::unique_ptr<ImageSource>> OpenSource(const ImageName& name, const registry::ClientOptions& options) {
  if (name.transport == ImageName::Transport::kOciLayout) {
    ASSIGN_OR_RETURN(OciLayout layout, OciLayout::Open(name.dir));
    return std::unique_ptr<ImageSource>(std::make_unique<LayoutSource>(std::move(layout), name.tag));
  }
  return std::unique_ptr<ImageSource>(std::make_unique<DockerSource>(name.ref, options));
}

Result<std::unique_ptr<ImageDestination>> OpenDestination(const ImageName& name,
                                                          const registry::ClientOptions& options) {
  if (name.transport == ImageName::Transport::kOciLayout) {
    ASSIGN_OR_RETURN(OciLayout layout, OciLayout::OpenOrCreate(name.dir));
    return std::unique_ptr<ImageDestination>(std::make_unique<LayoutDestination>(std::move(layout), name.tag));
  }
  if (name.ref.digest && name.ref.tag.empty()) {
    return InvalidArgument("destination " + name.String() + " names a digest; give a tag (the digest follows from the content)");
  }
  return std::unique_ptr<ImageDestination>(std::make_unique<DockerDestination>(name.ref, options));
}

}  // namespace regdisk::image
