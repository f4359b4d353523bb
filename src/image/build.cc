#include "image/build.h"

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <isa-l/igzip_lib.h>
#include <zstd.h>

#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <ctime>
#include <memory>
#include <functional>
#include <optional>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "image/chunked_build.h"
#include "image/copy.h"
#include "util/fs.h"
#include "util/log.h"
#include "util/text.h"

namespace regdisk::image {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr int kQemuUid = 107;  // the qemu user, as KubeVirt's disks have it
constexpr size_t kReadChunk = 1 << 20;
constexpr int kZstdWorkers = 2;

// $SOURCE_DATE_EPOCH (reproducible-builds.org): seconds since 1970, or
// nullopt when unset. A value that is not a plain non-negative integer is
// an error rather than silently a different time.
Result<std::optional<int64_t>> SourceDateEpoch() {
  const char* e = ::getenv("SOURCE_DATE_EPOCH");
  if (e == nullptr || *e == '\0') return std::optional<int64_t>();
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(e, &end, 10);
  if (*end != '\0' || errno != 0 || v < 0 || !std::isdigit(static_cast<unsigned char>(*e))) {
    return InvalidArgument("SOURCE_DATE_EPOCH must be seconds since 1970 (such as 1700000000), not " +
                           Printable(e, 40) + "; unset it to use the build time");
  }
  return std::optional<int64_t>(v);
}

std::string Rfc3339(int64_t t) {
  time_t tt = static_cast<time_t>(t);
  tm utc{};
  gmtime_r(&tt, &utc);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return buf;
}

// The compressed half of the pipeline: bytes in, compressed bytes to fd,
// both hashed.
class Compressor {
 public:
  static Result<std::unique_ptr<Compressor>> Create(const std::string& kind, int fd) {
    auto c = std::unique_ptr<Compressor>(new Compressor(kind, fd));
    if (kind == "gzip") {
      // isa-l's deflate, level 1: several times faster than zlib's default
      // for a slightly larger layer. Its gzip header has mtime 0, so the
      // output is reproducible.
      isal_deflate_init(&c->gz_);
      c->gz_.gzip_flag = IGZIP_GZIP;
      c->gz_.level = 1;
      c->level_buf_.resize(ISAL_DEF_LVL1_DEFAULT);
      c->gz_.level_buf = c->level_buf_.data();
      c->gz_.level_buf_size = static_cast<uint32_t>(c->level_buf_.size());
    } else if (kind == "zstd") {
      c->zs_ = ZSTD_createCCtx();
      ZSTD_CCtx_setParameter(c->zs_, ZSTD_c_compressionLevel, 3);
      // Two workers whatever the machine, so the output does not depend on
      // the core count (zstd's multi-threaded output is deterministic for a
      // given worker count); libzstd without threads ignores this.
      ZSTD_CCtx_setParameter(c->zs_, ZSTD_c_nbWorkers, kZstdWorkers);
    } else if (kind != "none") {
      return InvalidArgument("--compression takes gzip, zstd or none, not \"" + kind + "\"");
    }
    return c;
  }
  ~Compressor() { ZSTD_freeCCtx(zs_); }

  Status Write(const void* data, size_t len) {
    raw_.Update(data, len);
    return Feed(static_cast<const char*>(data), len, false);
  }
  Status Finish() { return Feed(nullptr, 0, true); }
  oci::Digest DiffId() { return raw_.Finish(); }
  oci::Descriptor Blob(const std::string& media_type) {
    oci::Descriptor d;
    d.media_type = media_type;
    d.size = static_cast<int64_t>(out_.bytes());
    d.digest = out_.Finish();
    return d;
  }

 private:
  Compressor(std::string kind, int fd) : kind_(std::move(kind)), fd_(fd), buf_(kReadChunk, '\0') {}

  Status Emit(const char* p, size_t n) {
    out_.Update(p, n);
    return WriteAll(fd_, std::string_view(p, n)).Annotate("writing the layer");
  }

  Status Feed(const char* data, size_t len, bool end) {
    if (kind_ == "none") return end ? OkStatus() : Emit(data, len);
    if (kind_ == "gzip") {
      gz_.next_in = reinterpret_cast<uint8_t*>(const_cast<char*>(data));
      gz_.avail_in = static_cast<uint32_t>(len);
      gz_.end_of_stream = end ? 1 : 0;
      for (;;) {
        gz_.next_out = reinterpret_cast<uint8_t*>(buf_.data());
        gz_.avail_out = static_cast<uint32_t>(buf_.size());
        if (isal_deflate(&gz_) != COMP_OK) return Internal("isa-l failed while compressing the layer");
        RETURN_IF_ERROR(Emit(buf_.data(), buf_.size() - gz_.avail_out));
        if (end ? gz_.internal_state.state == ZSTATE_END : gz_.avail_in == 0) return OkStatus();
      }
    }
    ZSTD_inBuffer in{data, len, 0};
    for (;;) {
      ZSTD_outBuffer out{buf_.data(), buf_.size(), 0};
      size_t left = ZSTD_compressStream2(zs_, &out, &in, end ? ZSTD_e_end : ZSTD_e_continue);
      if (ZSTD_isError(left)) return Internal(std::string("zstd failed: ") + ZSTD_getErrorName(left));
      RETURN_IF_ERROR(Emit(buf_.data(), out.pos));
      if (end ? left == 0 : in.pos == in.size && out.pos < out.size) return OkStatus();
    }
  }

  std::string kind_;
  int fd_;
  std::string buf_;
  isal_zstream gz_{};
  std::vector<uint8_t> level_buf_;
  ZSTD_CCtx* zs_ = nullptr;
  oci::Hasher raw_, out_;
};

struct ArchiveWriterFree {
  void operator()(archive* a) const { archive_write_free(a); }
};

// One tar entry of the layer: the /disk directory, or the disk file.
struct LayerEntry {
  std::string path;     // "disk" or "disk/NAME"
  int fd = -1;          // the disk, already open and validated; -1 for the directory
  uint64_t size = 0;
  std::string label;    // for messages
};

struct LayerBlob {
  oci::Descriptor desc;
  oci::Digest diff_id;
};

Result<LayerBlob> WriteLayer(const std::vector<LayerEntry>& entries, const std::string& compression,
                             const std::string& media_type, int64_t mtime, int out_fd, const ProgressFn& progress) {
  ASSIGN_OR_RETURN(std::unique_ptr<Compressor> comp, Compressor::Create(compression, out_fd));
  std::unique_ptr<archive, ArchiveWriterFree> a(archive_write_new());
  archive_write_set_format_pax_restricted(a.get());
  archive_write_set_bytes_in_last_block(a.get(), 1);
  struct Sink {
    Compressor* comp;
    Status status;
  } sink{comp.get(), {}};
  auto write_cb = [](archive*, void* user, const void* buf, size_t n) -> la_ssize_t {
    auto* s = static_cast<Sink*>(user);
    s->status = s->comp->Write(buf, n);
    return s->status.ok() ? static_cast<la_ssize_t>(n) : -1;
  };
  if (archive_write_open(a.get(), &sink, nullptr, write_cb, nullptr) != ARCHIVE_OK) {
    const char* msg = archive_error_string(a.get());
    return Internal(std::string("libarchive could not start: ") + (msg ? msg : "unknown error"));
  }
  auto failed = [&](const std::string& what) -> Status {
    if (!sink.status.ok()) return sink.status;
    return Internal(what + ": " + (archive_error_string(a.get()) ? archive_error_string(a.get()) : "unknown error"));
  };
  std::string buf(kReadChunk, '\0');
  for (const auto& e : entries) {
    std::unique_ptr<archive_entry, decltype(&archive_entry_free)> ent(archive_entry_new(), archive_entry_free);
    archive_entry_set_pathname(ent.get(), e.path.c_str());
    archive_entry_set_uid(ent.get(), kQemuUid);
    archive_entry_set_gid(ent.get(), kQemuUid);
    archive_entry_set_mtime(ent.get(), mtime, 0);
    if (e.fd < 0) {
      archive_entry_set_filetype(ent.get(), AE_IFDIR);
      archive_entry_set_perm(ent.get(), 0555);
    } else {
      archive_entry_set_filetype(ent.get(), AE_IFREG);
      archive_entry_set_perm(ent.get(), 0444);
      archive_entry_set_size(ent.get(), static_cast<la_int64_t>(e.size));
    }
    if (archive_write_header(a.get(), ent.get()) != ARCHIVE_OK) return failed("writing the layer");
    if (e.fd < 0) continue;
    // Read the very file that was validated (pread: no reopen, no seek).
    ::posix_fadvise(e.fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    auto report = [&](ProgressEvent::Kind kind, uint64_t done) {
      if (progress) progress({.kind = kind, .blob = {}, .done = done, .total = e.size, .label = e.label});
    };
    report(ProgressEvent::Kind::kStart, 0);
    uint64_t left = e.size, reported = 0;
    Status st = [&]() -> Status {
      while (left > 0) {
        ssize_t n = ::pread(e.fd, buf.data(), std::min<uint64_t>(buf.size(), left), static_cast<off_t>(e.size - left));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return ErrnoStatus("reading " + e.label);
        if (n == 0) return DataLoss(e.label + " shrank while it was being read");
        if (archive_write_data(a.get(), buf.data(), static_cast<size_t>(n)) < 0) return failed("writing the layer");
        left -= static_cast<uint64_t>(n);
        if (e.size - left - reported >= (uint64_t{4} << 20)) {
          reported = e.size - left;
          report(ProgressEvent::Kind::kBytes, reported);
        }
      }
      return OkStatus();
    }();
    report(st.ok() ? ProgressEvent::Kind::kDone : ProgressEvent::Kind::kFailed, e.size - left);
    RETURN_IF_ERROR(st);
  }
  if (archive_write_close(a.get()) != ARCHIVE_OK) return failed("finishing the layer");
  RETURN_IF_ERROR(comp->Finish());
  LayerBlob out;
  out.diff_id = comp->DiffId();
  out.desc = comp->Blob(media_type);
  return out;
}

std::string LayerMediaType(const std::string& format, const std::string& compression) {
  if (format == "docker") return std::string(oci::media::kDockerLayerGzip);
  if (compression == "gzip") return std::string(oci::media::kOciLayerGzip);
  if (compression == "zstd") return std::string(oci::media::kOciLayerZstd);
  return std::string(oci::media::kOciLayerTar);
}

Status CheckOptions(const BuildOptions& o) {
  if (o.format != "oci" && o.format != "docker") {
    return InvalidArgument("--format takes oci or docker, not \"" + o.format + "\"");
  }
  if (o.compression != "zstd" && o.compression != "gzip" && o.compression != "none") {
    return InvalidArgument("--compression takes gzip, zstd or none, not \"" + o.compression + "\"");
  }
  if (o.layout != "stream" && o.layout != "chunked") {
    return InvalidArgument("--layout takes stream or chunked, not \"" + o.layout + "\"");
  }
  if (o.layout == "chunked" && (o.compression != "zstd" || o.format != "oci" || o.base)) {
    return InvalidArgument("a chunked layer is zstd in an OCI image of one layer; drop --compression, --format and --base with --layout chunked");
  }
  if (o.format == "docker" && o.compression != "gzip") {
    return InvalidArgument("Docker schema 2 images carry gzip layers only; pass --compression gzip with --format docker");
  }
  return OkStatus();
}

using LayerWriter = std::function<Result<LayerBlob>(int fd, int64_t mtime)>;

// The single-stream layer of these entries, as the options say.
LayerWriter StreamLayer(std::vector<LayerEntry> entries, const BuildOptions& o) {
  return [entries = std::move(entries), &o](int fd, int64_t mtime) -> Result<LayerBlob> {
    const std::string compression = o.format == "docker" ? "gzip" : o.compression;
    return WriteLayer(entries, compression, LayerMediaType(o.format, o.compression), mtime, fd, o.on_progress);
  };
}

// Assembles config and manifest around the new layer (after the base's
// layers, when there is a base) and writes everything to dest.
Result<BuildResult> Assemble(const LayerWriter& write_layer, const ImageName& dest_name,
                             const BuildOptions& o, const registry::ClientOptions& copts,
                             std::map<std::string, std::string> labels) {
  RETURN_IF_ERROR(CheckOptions(o));
  // File times in the layer are SOURCE_DATE_EPOCH or 0, so the same disk
  // always gives the same layer; the image's creation time is the build
  // time unless SOURCE_DATE_EPOCH pins it (then the whole image repeats).
  ASSIGN_OR_RETURN(std::optional<int64_t> epoch, SourceDateEpoch());
  const int64_t mtime = epoch.value_or(0);
  const int64_t created = epoch ? *epoch : static_cast<int64_t>(::time(nullptr));
  ASSIGN_OR_RETURN(std::unique_ptr<ImageDestination> dst, OpenDestination(dest_name, copts));

  json config = {{"architecture", o.platform.architecture},
                 {"os", o.platform.os},
                 {"config", json::object()},
                 {"rootfs", {{"type", "layers"}, {"diff_ids", json::array()}}},
                 {"history", json::array()}};
  std::vector<oci::Descriptor> layers;
  if (o.base) {
    ASSIGN_OR_RETURN(std::unique_ptr<ImageSource> base, OpenSource(*o.base, copts));
    ASSIGN_OR_RETURN(ResolvedImage img, ResolveImage(*base, o.platform));
    auto bytes = FetchConfig(*base, *img.manifest.config);
    if (!bytes.ok()) return std::move(bytes).status().Annotate("reading the base image");
    json base_config = json::parse(*bytes, nullptr, false);
    if (!base_config.is_object()) return InvalidArgument("the base image's config is not JSON");
    config = base_config;
    if (!config.contains("rootfs") || !config["rootfs"].is_object()) config["rootfs"] = {{"type", "layers"}};
    if (!config["rootfs"].contains("diff_ids") || !config["rootfs"]["diff_ids"].is_array()) {
      config["rootfs"]["diff_ids"] = json::array();
    }
    if (!config.contains("history") || !config["history"].is_array()) config["history"] = json::array();
    if (!config.contains("config") || !config["config"].is_object()) config["config"] = json::object();
    for (const auto& l : img.manifest.layers) {
      oci::Descriptor d = l;
      if (o.format == "docker") {
        if (d.media_type == oci::media::kOciLayerGzip) d.media_type = oci::media::kDockerLayerGzip;
        if (d.media_type != oci::media::kDockerLayerGzip) {
          return InvalidArgument("the base has a " + d.media_type + " layer, which Docker schema 2 cannot carry; use --format oci");
        }
      } else if (d.media_type == oci::media::kDockerLayerGzip) {
        d.media_type = oci::media::kOciLayerGzip;
      }
      ASSIGN_OR_RETURN(bool present, dst->HasBlob(d));
      if (!present) RETURN_IF_ERROR(dst->PutBlob(l, *base).Annotate("copying base layer " + l.digest.Short()));
      layers.push_back(d);
    }
    log::Info("base {}: {} layers", o.base->String(), layers.size());
  }
  LayerBlob layer;
  ASSIGN_OR_RETURN(oci::Descriptor ld, dst->PutBlobStream([&](int fd) -> Result<oci::Descriptor> {
    ASSIGN_OR_RETURN(layer, write_layer(fd, mtime));
    return layer.desc;
  }));
  ld.annotations = layer.desc.annotations;
  layers.push_back(ld);

  config["created"] = Rfc3339(created);
  config["rootfs"]["diff_ids"].push_back(layer.diff_id.str());
  config["history"].push_back({{"created", Rfc3339(created)}, {"created_by", "regdisk build"}});
  json& cfg_labels = config["config"]["Labels"];
  if (!cfg_labels.is_object()) cfg_labels = json::object();
  for (const auto& [k, v] : labels) cfg_labels[k] = v;
  for (const auto& [k, v] : o.labels) cfg_labels[k] = v;
  std::string config_bytes = config.dump();
  oci::Descriptor cd;
  cd.media_type = o.format == "docker" ? oci::media::kDockerConfig : oci::media::kOciConfig;
  cd.digest = oci::Digest::Sha256Of(config_bytes);
  cd.size = static_cast<int64_t>(config_bytes.size());
  RETURN_IF_ERROR(dst->PutBlobBytes(cd, config_bytes).Annotate("writing the image config"));

  json layer_json = json::array();
  for (const auto& l : layers) layer_json.push_back(l.ToJson());
  json manifest = {{"schemaVersion", 2},
                   {"mediaType", o.format == "docker" ? oci::media::kDockerManifest : oci::media::kOciManifest},
                   {"config", cd.ToJson()},
                   {"layers", layer_json}};
  oci::RawManifest raw;
  raw.bytes = manifest.dump();
  raw.media_type = manifest["mediaType"];
  raw.digest = oci::Digest::Sha256Of(raw.bytes);
  RETURN_IF_ERROR(dst->PutManifest(raw, dst->Tag(), true));
  BuildResult r;
  r.manifest = raw.digest;
  r.layer = ld;
  r.diff_id = layer.diff_id;
  return r;
}

}  // namespace

Result<BuildResult> BuildDiskImage(const fs::path& disk_file, const ImageName& dest, const BuildOptions& options,
                                   const registry::ClientOptions& client_options) {
  std::string name = options.name;
  if (name.empty()) {
    // A chunked layer holds the disk as raw: a qcow2's default name says so.
    fs::path own = disk_file.filename();
    if (options.layout == "chunked" && own.extension() == ".qcow2") own.replace_extension(".raw");
    name = own.string();
  }
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos) {
    return InvalidArgument("--name \"" + name + "\" is not a plain file name; give one such as fedora25.qcow2");
  }
  auto fd = OpenFile(disk_file, O_RDONLY);
  if (!fd.ok()) return std::move(fd).status().Annotate("reading the disk");
  struct stat st;
  if (::fstat(fd->get(), &st) != 0) return ErrnoStatus("reading " + disk_file.string());
  if (!S_ISREG(st.st_mode)) return InvalidArgument(disk_file.string() + " is not a regular file; give a qcow2 or raw disk image");
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  ASSIGN_OR_RETURN(disk::DiskInfo info, disk::InspectDisk(fd->get(), 0, size, disk_file.string()));
  const std::string path = "disk/" + name;
  const bool chunked = options.layout == "chunked";
  std::map<std::string, std::string> labels = {
      {"io.regdisk.disk.path", "/" + path},
      {"io.regdisk.disk.format", chunked ? "raw" : std::string(disk::FormatName(info.format))},
      {"io.regdisk.disk.virtual-size", std::to_string(info.virtual_size)},
  };
  LayerWriter writer;
  std::optional<RawDisk> raw;
  if (chunked) {
    RETURN_IF_ERROR(CheckOptions(options));
    auto opened = OpenRawDisk(disk_file, fd->get(), info);
    if (!opened.ok()) return std::move(opened).status();
    raw.emplace(std::move(*opened));
    writer = [&](int out, int64_t mtime) -> Result<LayerBlob> {
      ChunkedLayerOptions co;
      co.name = name;
      co.chunk_size = options.chunk_size != 0 ? options.chunk_size : DefaultChunkSize(raw->size);
      co.mtime = mtime;
      co.threads = static_cast<int>(std::max(2u, std::thread::hardware_concurrency()));
      co.on_progress = options.on_progress;
      co.label = disk_file.string();
      ASSIGN_OR_RETURN(ChunkedLayer l, WriteChunkedLayer(raw->fd, raw->size, co, out));
      log::Info("{} chunks of {} bytes, {} of them zero", l.chunks, co.chunk_size, l.zero_chunks);
      return LayerBlob{l.desc, l.diff_id};
    };
  } else {
    writer = StreamLayer({{"disk", -1, 0, ""}, {path, fd->get(), size, disk_file.string()}}, options);
  }
  ASSIGN_OR_RETURN(BuildResult r, Assemble(writer, dest, options, client_options, labels));
  // The disk must not have changed while it was streamed.
  struct stat after;
  if (::fstat(fd->get(), &after) != 0 || after.st_size != st.st_size || after.st_mtim.tv_sec != st.st_mtim.tv_sec ||
      after.st_mtim.tv_nsec != st.st_mtim.tv_nsec) {
    return DataLoss(disk_file.string() + " changed while it was being built into the image; build it again");
  }
  r.disk = info;
  r.disk_path = "/" + path;
  return r;
}

Result<BuildResult> BuildBaseImage(const ImageName& dest, const BuildOptions& options,
                                   const registry::ClientOptions& client_options) {
  BuildOptions o = options;
  o.base.reset();
  std::map<std::string, std::string> labels = {
      {"org.opencontainers.image.title", "regdisk registry disk base"},
      {"org.opencontainers.image.description",
       "Base image for registry disks: ADD a qcow2 or raw disk to /disk and push the result"},
      {"io.regdisk.base", "v1"},
  };
  o.layout = "stream";
  return Assemble(StreamLayer({{"disk", -1, 0, ""}}, o), dest, o, client_options, labels);
}

}  // namespace regdisk::image
