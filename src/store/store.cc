#include "store/store.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <optional>
#include <set>
#include <thread>

#include "image/copy.h"
#include "state/sqlite.h"
#include "store/chunk_table.h"
#include "store/chunked_pull.h"
#include "store/db.h"
#include "store/lazy_dir.h"
#include "store/unpack.h"
#include "util/byte_source.h"
#include "util/env.h"
#include "util/fs.h"
#include "util/log.h"
#include "util/text.h"

namespace regdisk::store {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr uint64_t kMaxMetaBytes = 1 << 20;
constexpr uint64_t kProgressStep = 4 << 20;

// Refusals (a hostile or broken image) remove what this pull stored;
// transient failures (the network, a full file system: kNoSpace) keep
// partial downloads for the next attempt.
bool IsRefusal(const Status& st) {
  switch (st.code()) {
    case Code::kInvalidArgument:
    case Code::kNotFound:
    case Code::kUnimplemented:
    case Code::kDataLoss:
    case Code::kResourceExhausted: return true;
    case Code::kNoSpace:
    default: return false;
  }
}

// A chunked layer's staging directory under ROOT/ingest.
std::string ChunkedIngestName(const oci::Digest& layer) { return "chunked-" + layer.algorithm() + "-" + layer.hex(); }

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

}  // namespace

json StoredImage::ToJson() const {
  return {{"name", name},
          {"platform", platform},
          {"digest", manifest_digest.str()},
          {"id", config_digest ? config_digest->str() : manifest_digest.str()},
          {"created", created},
          {"disk",
           {{"path", disk_path},
            {"format", std::string(disk::FormatName(disk.format))},
            {"virtualSize", disk.virtual_size},
            {"size", disk.file_size},
            {"file", disk_file.string()}}}};
}

Result<Store> Store::Open(const fs::path& root) {
  for (const char* sub : {"blobs/sha256", "ingest", "disks", "locks", "tmp"}) {
    Status st = MakeDirs(root / sub);
    if (!st.ok()) {
      return st.Annotate("opening the node store at " + root.string() + " (choose another with --root or REGDISK_ROOT)");
    }
  }
  ::chmod(root.c_str(), 0700);
  return Store(root);
}

fs::path Store::BlobPath(const oci::Digest& d) const { return root_ / "blobs" / d.algorithm() / d.hex(); }
fs::path Store::DiskDir(const oci::Digest& m, const std::string& path) const {
  if (path.empty()) return root_ / "disks" / m.hex();
  return root_ / "disks" / (m.hex() + "-" + oci::Digest::Sha256Of(path).hex().substr(0, 16));
}

Status Store::KeepBlob(const oci::Digest& digest, std::string_view bytes, std::vector<fs::path>* stored_now) {
  const fs::path path = BlobPath(digest);
  std::error_code ec;
  if (fs::exists(path, ec)) return OkStatus();
  RETURN_IF_ERROR(MakeDirs(path.parent_path()));
  ASSIGN_OR_RETURN(PendingFile f, PendingFile::Create(path, 0444));
  RETURN_IF_ERROR(WriteAll(f.fd(), bytes));
  RETURN_IF_ERROR(f.Commit());
  stored_now->push_back(path);
  return OkStatus();
}

Status Store::StreamLayer(image::ImageSource& src, const oci::Descriptor& desc, DiskTree& tree,
                          const std::string& label, bool* resumed, const image::ProgressFn& progress,
                          const CancelToken* cancel) {
  const std::string key = desc.digest.algorithm() + "-" + desc.digest.hex();
  // One writer per ingest, across processes.
  ASSIGN_OR_RETURN(FileLock lock, FileLock::Acquire(root_ / "locks" / (key + ".ingest")));
  const fs::path partial = root_ / "ingest" / key;
  ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(partial, O_RDWR | O_CREAT, 0600));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus("reading " + partial.string());
  uint64_t have = static_cast<uint64_t>(st.st_size);
  if (have > static_cast<uint64_t>(desc.size)) {
    RETURN_IF_ERROR(Env::Default()->Truncate(fd.get(), 0).Annotate(partial.string()));
    have = 0;
  }
  if (have > 0) {
    *resumed = true;
    log::Info("resuming layer {} at byte {}", desc.digest.Short(), have);
  }

  // The producer: replays what an earlier attempt left, then downloads the
  // rest, appending it to the ingest file (so a killed pull resumes) and
  // hashing it; FetchBlobFrom fails at the end if the digest is wrong.
  BlockPipe pipe;
  uint64_t done = have, reported = have;
  const uint64_t total = static_cast<uint64_t>(desc.size);
  auto report = [&](bool last) {
    if (progress && !last && done - reported >= kProgressStep) {
      progress({image::ProgressEvent::Kind::kBytes, desc.digest, done, total, {}});
      reported = done;
    }
  };
  if (progress) progress({image::ProgressEvent::Kind::kStart, desc.digest, have, total, {}});
  auto produce = [&]() -> Status {
    oci::Hasher hasher(desc.digest.algorithm());
    std::string buf(1 << 20, '\0');
    for (uint64_t off = 0; off < have;) {
      ssize_t n = ::pread(fd.get(), buf.data(), std::min<uint64_t>(buf.size(), have - off), static_cast<off_t>(off));
      if (n <= 0) return ErrnoStatus("reading " + partial.string());
      if (cancel) RETURN_IF_ERROR(cancel->status());
      std::string_view chunk(buf.data(), static_cast<size_t>(n));
      hasher.Update(chunk);
      RETURN_IF_ERROR(pipe.Write(chunk));
      off += static_cast<uint64_t>(n);
    }
    if (::lseek(fd.get(), static_cast<off_t>(have), SEEK_SET) < 0) return ErrnoStatus("seeking in " + partial.string());
    Status fetched = src.FetchBlobFrom(desc, have, hasher, [&](std::string_view chunk) -> Status {
      if (cancel) RETURN_IF_ERROR(cancel->status());
      if (Status w = WriteAll(fd.get(), chunk); !w.ok()) {
        return std::move(w).Annotate("writing the partial download of " + desc.digest.Short() + " in " +
                                     partial.parent_path().string() + " (kept: " + std::to_string(done) + " of " +
                                     std::to_string(desc.size) + " bytes)");
      }
      done += chunk.size();
      report(false);
      return pipe.Write(chunk);
    });
    return fetched;
  };
  std::thread producer([&] { pipe.Finish(produce()); });
  // The consumer (this thread): decompresses, reads the tar, writes the disk.
  Status applied = tree.ApplyLayer(pipe, desc.media_type, label);
  if (!applied.ok()) pipe.Cancel();
  producer.join();
  // Verified and applied: the disk now holds what matters. Wrong bytes:
  // never resume from them.
  if (applied.ok() || applied.code() == Code::kDataLoss) ::unlink(partial.c_str());
  if (progress) {
    progress({applied.ok() ? image::ProgressEvent::Kind::kDone : image::ProgressEvent::Kind::kFailed, desc.digest,
              applied.ok() ? total : done, total, {}});
  }
  return applied;
}

Status Store::Materialise(image::ImageSource& src, const std::vector<oci::Descriptor>& layers,
                          const oci::Digest& manifest, const PullOptions& options, bool* resumed) {
  // Staging has a fixed name per disk, so whatever a killed pull of this
  // image left there is reclaimed now (the caller holds the image's lock).
  const fs::path dir = DiskDir(manifest, options.path);
  ASSIGN_OR_RETURN(TempDir staging, TempDir::CreateFresh(root_ / "tmp" / (dir.filename().string() + ".staging")));
  DiskTree tree(staging.path(), options.limits);
  // Each layer's "done" waits until the disk is verified and committed.
  std::vector<image::ProgressEvent> done;
  image::ProgressFn progress;
  if (options.on_progress) {
    progress = [&](const image::ProgressEvent& e) {
      if (e.kind == image::ProgressEvent::Kind::kDone) {
        done.push_back(e);
      } else {
        options.on_progress(e);
      }
    };
  }
  // A chunked layer alone in its image: ranged, parallel, verified per chunk
  // (docs/chunked-format.md). Anything else streams layer by layer.
  std::optional<oci::ChunkIndexLocation> chunked;
  if (layers.size() == 1) {
    ASSIGN_OR_RETURN(chunked, oci::ChunkIndexLocationOf(layers[0]));
  }
  DiskTree::File file;
  std::optional<ChunkTable> table;
  std::optional<oci::ChunkIndex> chunk_index;  // recorded in the chunk table on commit
  std::optional<FileLock> chunk_ingest_lock;
  fs::path chunk_ingest;  // ROOT/ingest/chunked-<hex>: removed once the disk is committed
  if (chunked) {
    // The chunk table is a hint: a store whose table cannot be opened
    // still pulls (every chunk fetched), and fsck says why.
    if (auto t = ChunkTable::Open(root_); t.ok()) {
      table.emplace(std::move(*t));
    } else {
      log::Warn("the store's chunk table cannot be opened; fetching every chunk ({})", t.status().message());
    }
    ChunkedPullOptions co;
    co.table = table ? &*table : nullptr;
    co.disks_dir = root_ / "disks";
    co.max_gap_bytes = kDefaultMaxGapBytes;
    co.max_disk_bytes = options.limits.max_file_bytes;
    co.label = "layer 1 (" + layers[0].digest.Short() + ")";
    co.on_progress = progress;
    co.cancel = options.cancel.get();
    // Its own staging, kept across a kill or a transient failure (the disk
    // so far and its chunk bitmap), one writer at a time.
    const std::string key = ChunkedIngestName(layers[0].digest);
    ASSIGN_OR_RETURN(chunk_ingest_lock, FileLock::Acquire(root_ / "locks" / (key + ".ingest")));
    chunk_ingest = root_ / "ingest" / key;
    RETURN_IF_ERROR(MakeDirs(chunk_ingest));
    const auto t0 = std::chrono::steady_clock::now();
    auto d = options.chunked_puller ? options.chunked_puller(src, manifest, layers[0], *chunked, chunk_ingest)
                                    : PullChunkedLayer(src, layers[0], *chunked, chunk_ingest, co);
    if (d.ok() && d->resumed_chunks > 0) *resumed = true;
    if (progress) {
      progress({d.ok() ? image::ProgressEvent::Kind::kDone : image::ProgressEvent::Kind::kFailed, layers[0].digest,
                static_cast<uint64_t>(layers[0].size), static_cast<uint64_t>(layers[0].size), {}});
    }
    if (!d.ok()) return std::move(d).status();
    if (!options.path.empty() && options.path != d->image_path) {
      return NotFound("the image holds " + Printable(d->image_path) + ", not " + Printable(options.path));
    }
    log::Info("{} pulled in {:.2f} s", co.label, Seconds(t0));
    file.staged = d->file;
    file.image_path = d->image_path;
    file.size = d->size;
    chunk_index = std::move(d->index);
  }
  for (size_t i = 0; !chunked && i < layers.size(); ++i) {
    const auto& l = layers[i];
    std::string label = "layer " + std::to_string(i + 1) + " (" + l.digest.Short() + ")";
    log::Info("streaming {} ({} bytes)", label, l.size);
    const auto t0 = std::chrono::steady_clock::now();
    RETURN_IF_ERROR(StreamLayer(src, l, tree, label, resumed, progress, options.cancel.get()));
    log::Info("{} streamed in {:.2f} s", label, Seconds(t0));
  }
  disk::DiskInfo info;
  if (chunked) {
    // Raw by definition, whatever its first bytes look like: never probed.
    info.format = disk::Format::kRaw;
    info.virtual_size = info.file_size = file.size;
  } else {
    ASSIGN_OR_RETURN(file, tree.FindDisk(options.path));
    ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(file.staged, O_RDONLY));
    ASSIGN_OR_RETURN(info, disk::InspectDisk(fd.get(), 0, file.size, file.image_path));
  }
  if (info.virtual_size > options.limits.max_file_bytes) {
    return ResourceExhausted(fmt::format("{} declares a virtual size of {} bytes, over the maximum disk size of {} "
                                         "bytes; raise it with --max-disk-size if the image is trusted",
                                         Printable(file.image_path), info.virtual_size, options.limits.max_file_bytes));
  }

  // The image directory: the disk under its own name, and meta.json.
  const fs::path image_dir = staging.path() / "image";
  RETURN_IF_ERROR(MakeDirs(image_dir));
  // The store names the file by its format: a name from the image is data
  // (kept in meta.json), never part of a path QEMU or libvirt is given.
  const std::string name = "disk." + std::string(disk::FormatName(info.format));
  const fs::path disk_file = image_dir / name;
  Env* env = Env::Default();
  RETURN_IF_ERROR(env->Rename(file.staged, disk_file).Annotate("staging the disk"));
  ASSIGN_OR_RETURN(UniqueFd disk_fd, OpenFile(disk_file, O_RDONLY));
  const auto t0 = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(env->Sync(disk_fd.get()).Annotate("the disk " + disk_file.string()));
  log::Info("disk synced in {:.2f} s", Seconds(t0));
  ::fchmod(disk_fd.get(), 0444);
  json meta = {{"manifest", manifest.str()},
               {"path", file.image_path},
               {"file", name},
               {"format", std::string(disk::FormatName(info.format))},
               {"virtualSize", info.virtual_size},
               {"size", info.file_size},
               {"qcow2Version", info.qcow2_version}};
  if (chunk_index) meta["chunkSize"] = chunk_index->chunk_size();  // what fsck rebuilds the chunk table with
  RETURN_IF_ERROR(WriteFileAtomic(image_dir / "meta.json", meta.dump(2) + "\n", 0444));
  ::chmod(image_dir.c_str(), 0555);
  RETURN_IF_ERROR(env->Rename(image_dir, dir).Annotate("committing the disk"));
  RETURN_IF_ERROR(SyncDir(root_ / "disks"));
  if (!chunk_ingest.empty()) RemoveAll(chunk_ingest);  // its disk is committed; the bitmap goes
  // Its chunks, for the next pull to copy. After the commit: a row never
  // names a disk that is not there; a disk a kill left without its rows
  // is found by fsck, and costs only a fuller fetch meanwhile.
  if (table && chunk_index) {
    if (Status st = table->AddDisk(dir.filename().string(), name, *chunk_index); !st.ok()) {
      log::Warn("the disk's chunks could not be recorded in the store's chunk table (regdisk fsck --repair "
                "records them): {}",
                st.message());
    }
  }
  for (const auto& e : done) options.on_progress(e);
  return OkStatus();
}

void Store::RemovePartials(const std::vector<oci::Descriptor>& layers) {
  std::error_code ec;
  for (const auto& l : layers) {
    fs::remove(root_ / "ingest" / (l.digest.algorithm() + "-" + l.digest.hex()), ec);
    RemoveAll(root_ / "ingest" / ChunkedIngestName(l.digest));
  }
}

Result<StoredImage> Store::Load(const Ref& ref) const {
  const fs::path dir = DiskDir(ref.manifest, ref.path);
  ASSIGN_OR_RETURN(std::string text, ReadFileCapped(dir / "meta.json", kMaxMetaBytes));
  json m = json::parse(text, nullptr, false);
  if (!m.is_object() || !m.contains("file") || !m["file"].is_string()) {
    return DataLoss("the store's record " + (dir / "meta.json").string() + " is damaged; remove " + dir.string() +
                    " and pull again");
  }
  StoredImage img;
  img.name = ref.name;
  img.platform = ref.platform;
  img.manifest_digest = ref.manifest;
  img.disk_path = m.value("path", "");
  img.disk_file = dir / m["file"].get<std::string>();
  img.disk.format = m.value("format", "raw") == "qcow2" ? disk::Format::kQcow2 : disk::Format::kRaw;
  img.disk.virtual_size = m.value("virtualSize", uint64_t{0});
  img.disk.file_size = m.value("size", uint64_t{0});
  img.disk.qcow2_version = m.value("qcow2Version", 0);
  struct stat st;
  if (::stat((dir / "meta.json").c_str(), &st) == 0) img.stored_at = st.st_mtim.tv_sec;
  // The config (the image ID and its creation time), from the stored blobs.
  if (auto mt = ReadFileCapped(BlobPath(ref.manifest), 4 << 20); mt.ok()) {
    if (auto manifest = oci::Manifest::Parse(*mt); manifest.ok() && manifest->config) {
      img.config_digest = manifest->config->digest;
      if (auto ct = ReadFileCapped(BlobPath(manifest->config->digest), 4 << 20); ct.ok()) {
        json c = json::parse(*ct, nullptr, false);
        if (c.is_object() && c.contains("created") && c["created"].is_string()) img.created = c["created"].get<std::string>();
      }
    }
  }
  return img;
}

std::string Store::StoredPlatform(const oci::Digest& manifest) const { return StoredPlatformOf(root_, manifest); }

Result<std::optional<state::Db>> Store::OpenDbIfAny() const {
  std::error_code ec;
  if (!fs::exists(root_ / "store.db", ec) && !fs::exists(root_ / "refs.json", ec)) {
    return std::optional<state::Db>();
  }
  ASSIGN_OR_RETURN(state::Db db, OpenStoreDb(root_));
  return std::optional<state::Db>(std::move(db));
}

Result<std::vector<Store::Ref>> Store::RefsIn(state::Db& db, const std::string* name) const {
  ASSIGN_OR_RETURN(state::Stmt st, db.Prepare(name ? "SELECT name, platform, manifest, path FROM refs WHERE name = ?1"
                                                   : "SELECT name, platform, manifest, path FROM refs"));
  if (name) RETURN_IF_ERROR(st.Bind(1, *name));
  std::vector<Ref> out;
  for (;;) {
    ASSIGN_OR_RETURN(bool row, st.Step());
    if (!row) break;
    auto d = oci::Digest::Parse(st.Text(2));
    if (!d.ok()) continue;
    Ref r{st.Text(0), st.Text(1), *d, st.Text(3)};
    // Imported from a refs.json that did not say: the stored config may.
    if (r.platform.empty()) r.platform = StoredPlatform(r.manifest);
    out.push_back(std::move(r));
  }
  std::sort(out.begin(), out.end(), [](const Ref& a, const Ref& b) {
    return a.name != b.name ? a.name < b.name : a.platform < b.platform;
  });
  return out;
}

Result<std::vector<Store::Ref>> Store::ReadRefList(const std::string* name) const {
  ASSIGN_OR_RETURN(std::optional<state::Db> db, OpenDbIfAny());
  if (!db) return std::vector<Ref>();
  return RefsIn(*db, name);
}

Status Store::SetRef(state::Db& db, const Ref& ref) {
  ASSIGN_OR_RETURN(state::Stmt st, db.Prepare("INSERT OR REPLACE INTO refs (name, platform, manifest, path) "
                                              "VALUES (?1, ?2, ?3, ?4)"));
  RETURN_IF_ERROR(st.Bind(1, ref.name));
  RETURN_IF_ERROR(st.Bind(2, ref.platform));
  RETURN_IF_ERROR(st.Bind(3, ref.manifest.str()));
  RETURN_IF_ERROR(st.Bind(4, ref.path));
  return st.Run();
}

Status Store::ReplaceRefs(state::Db& db, const std::vector<Ref>& refs) {
  RETURN_IF_ERROR(db.Exec("DELETE FROM refs"));
  for (const Ref& r : refs) RETURN_IF_ERROR(SetRef(db, r));
  return OkStatus();
}

Result<std::optional<StoredImage>> Store::Lookup(const std::string& name, const oci::Platform& platform) const {
  ASSIGN_OR_RETURN(std::vector<Ref> refs, ReadRefList(&name));
  for (const auto& r : refs) {
    if (r.name != name) continue;
    auto p = oci::Platform::Parse(r.platform);
    if (!p.ok() || !p->Matches(platform)) continue;
    std::error_code ec;
    if (!fs::exists(DiskDir(r.manifest, r.path), ec)) continue;
    ASSIGN_OR_RETURN(StoredImage img, Load(r));
    return std::optional<StoredImage>(std::move(img));
  }
  return std::optional<StoredImage>();
}

Result<std::vector<StoredImage>> Store::List() const {
  ASSIGN_OR_RETURN(std::vector<Ref> refs, ReadRefList());
  std::vector<StoredImage> out;
  for (const auto& r : refs) {
    std::error_code ec;
    if (!fs::exists(DiskDir(r.manifest, r.path), ec)) continue;
    ASSIGN_OR_RETURN(StoredImage img, Load(r));
    out.push_back(std::move(img));
  }
  return out;
}

Result<StoredImage> Store::Pull(image::ImageSource& src, const std::string& name, const PullOptions& options) {
  // Where the name goes, opened (migrated) before anything is fetched.
  ASSIGN_OR_RETURN(state::Db db, OpenStoreDb(root_));
  ASSIGN_OR_RETURN(FileLock sharing, Share());  // no Prune between the commit and the name
  ASSIGN_OR_RETURN(image::ResolvedImage img, image::ResolveImage(src, options.platform));
  const oci::Digest digest = img.raw.digest;
  std::error_code ec;
  auto present = [&] { return fs::exists(DiskDir(digest, options.path) / "meta.json", ec); };
  if (!present()) {
    // One pull per image at a time; a second one waits, then finds it done.
    const std::string key = DiskDir(digest, options.path).filename().string();
    ASSIGN_OR_RETURN(FileLock lock, FileLock::Acquire(root_ / "locks" / (key + ".image")));
    if (!present()) {
      std::vector<fs::path> stored_now;
      bool resumed = false;
      auto attempt = [&]() -> Status {
        RETURN_IF_ERROR(KeepBlob(digest, img.raw.bytes, &stored_now));
        if (!fs::exists(BlobPath(img.manifest.config->digest), ec)) {
          ASSIGN_OR_RETURN(std::string config, image::FetchConfig(src, *img.manifest.config));  // verified, capped
          RETURN_IF_ERROR(KeepBlob(img.manifest.config->digest, config, &stored_now));
        }
        return Materialise(src, img.manifest.layers, digest, options, &resumed);
      };
      Status st = attempt();
      // Only bytes that failed to verify or to parse can be blamed on the
      // partial download; a cap the image itself exceeds stays exceeded.
      const bool partial_suspect = st.code() == Code::kDataLoss || st.code() == Code::kInvalidArgument;
      if (!st.ok() && resumed && partial_suspect) {
        // The partial download an earlier pull left may hold wrong bytes
        // (not ours to trust): start over once, from nothing.
        log::Warn("a partial download did not verify; fetching it again from the start ({})", st.message());
        RemovePartials(img.manifest.layers);
        resumed = false;
        st = attempt();
      }
      if (!st.ok()) {
        if (IsRefusal(st)) {
          for (const auto& p : stored_now) fs::remove(p, ec);
          RemovePartials(img.manifest.layers);
        }
        return st;
      }
    }
  }
  // The image's own platform, as its config states it (what a later
  // lookup for a platform matches against).
  std::string platform = StoredPlatform(digest);
  if (platform.empty()) platform = options.platform.String();
  if (auto p = oci::Platform::Parse(platform); p.ok() && !p->Matches(options.platform)) {
    log::Warn("{} is for {}, not {}; it is stored as {}", Printable(name), platform, options.platform.String(), platform);
  }
  const Ref ref{name, platform, digest, options.path};
  RETURN_IF_ERROR(SetRef(db, ref));
  ASSIGN_OR_RETURN(StoredImage stored, Load(ref));
  RETURN_IF_ERROR(SetStableLink(name, options.platform, stored.disk_file));
  return stored;
}

namespace {

std::string NameHash(const std::string& name) { return oci::Digest::Sha256Of(name).hex().substr(0, 32); }

}  // namespace

fs::path Store::StablePath(const std::string& name, const oci::Platform& platform) const {
  std::string p = platform.os + "-" + platform.architecture + (platform.variant.empty() ? "" : "-" + platform.variant);
  return root_ / "by-name" / (NameHash(name) + "-" + p);
}

Status Store::SetStableLink(const std::string& name, const oci::Platform& platform, const fs::path& disk_file) {
  const fs::path link = StablePath(name, platform);
  RETURN_IF_ERROR(MakeDirs(link.parent_path()));
  const fs::path target = fs::path("..") / "disks" / disk_file.parent_path().filename() / disk_file.filename();
  // A temp name of this pull's own: pulls of one name run side by side
  // (under the shared store lock), and each renames its link into place.
  static std::atomic<uint64_t> serial{0};
  const fs::path tmp = link.string() + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(serial++);
  if (::symlink(target.c_str(), tmp.c_str()) != 0) return ErrnoStatus("linking " + link.string());
  RETURN_IF_ERROR(Env::Default()->Rename(tmp, link).Annotate("linking " + link.string()));
  return OkStatus();
}

void Store::DropStaleLinks(const std::vector<Ref>& refs) {
  std::set<std::string> wanted;  // "<name hash> <disk dir>"
  for (const auto& r : refs) wanted.insert(NameHash(r.name) + " " + DiskDir(r.manifest, r.path).filename().string());
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root_ / "by-name", ec)) {
    const std::string file = e.path().filename().string();
    // Under the exclusive store lock no pull is linking: a temp link is a
    // leftover of a killed one.
    if (file.find(".tmp-") != std::string::npos) {
      ::unlink(e.path().c_str());
      continue;
    }
    const fs::path target = fs::read_symlink(e.path(), ec);
    const std::string dir = ec ? "" : target.parent_path().filename().string();
    if (!ec && file.size() > 32 && wanted.count(file.substr(0, 32) + " " + dir) &&
        fs::exists(root_ / "disks" / dir, ec)) {
      continue;
    }
    ::unlink(e.path().c_str());
  }
}

fs::path Store::UseLockPath(const fs::path& disk_dir) const {
  return root_ / "locks" / (disk_dir.filename().string() + ".use");
}

Result<FileLock> Store::Share() const {
  return FileLock::Acquire(root_ / "locks" / "store", FileLock::Mode::kShared);
}

Result<FileLock> Store::Use(const StoredImage& img) const {
  ASSIGN_OR_RETURN(FileLock lock, FileLock::Acquire(UseLockPath(img.disk_file.parent_path()), FileLock::Mode::kShared));
  std::error_code ec;
  if (!fs::exists(img.disk_file, ec)) {
    return NotFound("the disk of " + img.name + " was removed from the node store; pull it again");
  }
  return lock;
}

Result<GcResult> Store::Remove(const std::vector<std::string>& names) {
  std::vector<StoredImage> images;
  {
    ASSIGN_OR_RETURN(std::vector<Ref> refs, ReadRefList());
    for (const auto& n : names) {
      bool found = false;
      for (const auto& r : refs) {
        if (r.name != n) continue;
        found = true;
        StoredImage img;
        img.name = r.name;
        img.platform = r.platform;
        img.manifest_digest = r.manifest;
        images.push_back(std::move(img));
      }
      if (!found) return NotFound("the node store has no image named " + Printable(n) + "; regdisk images lists them");
    }
  }
  return RemoveImages(images, true);
}

Result<GcResult> Store::RemoveImages(const std::vector<StoredImage>& images, bool force) {
  ASSIGN_OR_RETURN(FileLock exclusive, FileLock::Acquire(root_ / "locks" / "store"));
  {
    // One transaction: no name another process adds meanwhile is lost.
    ASSIGN_OR_RETURN(state::Db db, OpenStoreDb(root_));
    ASSIGN_OR_RETURN(state::Transaction txn, state::Transaction::Begin(db));
    ASSIGN_OR_RETURN(std::vector<Ref> refs, RefsIn(db, nullptr));
    auto is_target = [&](const Ref& r) {
      for (const auto& img : images) {
        if (img.name == r.name && img.platform == r.platform) return true;
      }
      return false;
    };
    for (const auto& img : images) {
      bool found = std::any_of(refs.begin(), refs.end(),
                               [&](const Ref& r) { return r.name == img.name && r.platform == img.platform; });
      if (!found) return NotFound("the node store has no image named " + Printable(img.name) + "; regdisk images lists them");
    }
    std::vector<Ref> kept;
    std::set<std::string> kept_dirs, dropped_dirs;
    for (const auto& r : refs) {
      const std::string dir = DiskDir(r.manifest, r.path).filename().string();
      if (is_target(r)) {
        dropped_dirs.insert(dir);
      } else {
        kept.push_back(r);
        kept_dirs.insert(dir);
      }
    }
    if (!force) {
      // A disk that loses its last name while a VM runs on it.
      for (const auto& dir : dropped_dirs) {
        if (kept_dirs.count(dir)) continue;
        ASSIGN_OR_RETURN(std::optional<FileLock> unused, FileLock::TryAcquire(UseLockPath(root_ / "disks" / dir)));
        ASSIGN_OR_RETURN(const bool served, ServedLazily(root_ / "disks" / dir));
        if (!unused || served) {
          return FailedPrecondition("the disk " + dir + " is in use by a running VM" +
                                    (served ? " (booted while it was pulled, and still served to it)" : "") +
                                    "; stop the VM first, or use --force to remove the name now (the disk stays "
                                    "until its VMs stop, then regdisk prune removes it)");
        }
      }
    }
    RETURN_IF_ERROR(ReplaceRefs(db, kept));
    RETURN_IF_ERROR(txn.Commit());
  }
  return CollectLocked();
}

std::vector<oci::Digest> Store::LayersOfDisk(const fs::path& dir) const {
  auto meta = ReadFileCapped(dir / "meta.json", kMaxMetaBytes);
  if (!meta.ok()) return {};
  const json m = json::parse(*meta, nullptr, false);
  if (!m.is_object() || !m.contains("manifest") || !m["manifest"].is_string()) return {};
  auto d = oci::Digest::Parse(m["manifest"].get<std::string>());
  if (!d.ok()) return {};
  auto text = ReadFileCapped(BlobPath(*d), 4 << 20);
  if (!text.ok()) return {};
  auto manifest = oci::Manifest::Parse(*text);
  if (!manifest.ok()) return {};
  std::vector<oci::Digest> out;
  for (const auto& l : manifest->layers) out.push_back(l.digest);
  return out;
}

Result<bool> Store::ServedLazily(const fs::path& dir) const {
  for (const oci::Digest& layer : LayersOfDisk(dir)) {
    ASSIGN_OR_RETURN(const bool held, LazyInUse(root_, LazyName(layer)));
    if (held) return true;
  }
  return false;
}

std::set<std::string> Store::CommittedLazyNames() const {
  std::error_code ec;
  std::set<std::string> out;  // lazy names of every stored disk's layers
  for (const auto& e : fs::directory_iterator(root_ / "disks", ec)) {
    for (const oci::Digest& layer : LayersOfDisk(e.path())) out.insert(LazyName(layer));
  }
  return out;
}

Result<std::vector<FillingDisk>> Store::Filling() const {
  ASSIGN_OR_RETURN(std::vector<FillingDisk> all, ListFilling(root_));
  const std::set<std::string> committed = CommittedLazyNames();
  std::erase_if(all, [&](const FillingDisk& d) { return !d.record || committed.count(d.name) > 0; });
  return all;
}

Result<std::vector<std::string>> Store::CollectLazy(bool remove, GcResult* gc) {
  std::vector<std::string> found;
  const std::set<std::string> committed = CommittedLazyNames();
  ASSIGN_OR_RETURN(std::vector<FillingDisk> filling, ListFilling(root_));
  for (const FillingDisk& d : filling) {
    if (d.in_use) {
      if (gc) gc->lazy_in_use.push_back(d.name);
      continue;
    }
    std::string why;
    if (committed.count(d.name)) {
      why = "committed to the store";
    } else if (!d.record) {
      why = "no readable lazy.json";
    } else {
      if (gc) ++gc->lazy_kept;  // a fill the next run of its image resumes
      continue;
    }
    found.push_back(d.name + ": " + why);
    if (!remove) continue;
    // Under the lock, so that no export starts on it meanwhile.
    ASSIGN_OR_RETURN(std::optional<FileLock> lock, FileLock::TryAcquire(LazyLockPath(root_, d.name)));
    if (!lock) continue;  // an export started after all
    ASSIGN_OR_RETURN(std::optional<FileLock> readers, FileLock::TryAcquire(LazyReadersLockPath(root_, d.name)));
    if (!readers) continue;  // a VM of another process joined an export of it
    const fs::path trash = root_ / "tmp" / ("removed-lazy-" + d.name);
    RemoveAll(trash);
    if (::rename(d.dir.c_str(), trash.c_str()) != 0) return ErrnoStatus("removing " + d.dir.string());
    RemoveAll(trash);
    // The lock file stays (it is empty): a `run` may be waiting on it, and
    // one that got a lock on an unlinked file would serve beside another.
    if (gc) {
      gc->lazy_removed.push_back(found.back());
      gc->bytes_freed += d.bytes;
    }
    log::Info("removed the lazily-pulled disk lazy/{} ({})", d.name, why);
  }
  return found;
}

Result<int> Store::RemoveFilling(const std::string& image, GcResult* gc) {
  ASSIGN_OR_RETURN(FileLock exclusive, FileLock::Acquire(root_ / "locks" / "store"));
  ASSIGN_OR_RETURN(std::vector<FillingDisk> filling, ListFilling(root_));
  std::vector<const FillingDisk*> targets;
  for (const FillingDisk& d : filling) {
    if (!d.record || d.record->image != image) continue;
    if (d.in_use) {
      return FailedPrecondition("the disk of " + Printable(image) + " is being pulled for a running VM (lazy/" + d.name +
                                "); stop the VM first");
    }
    targets.push_back(&d);
  }
  int removed = 0;
  for (const FillingDisk* d : targets) {
    ASSIGN_OR_RETURN(std::optional<FileLock> lock, FileLock::TryAcquire(LazyLockPath(root_, d->name)));
    std::optional<FileLock> readers;
    if (lock) {
      ASSIGN_OR_RETURN(readers, FileLock::TryAcquire(LazyReadersLockPath(root_, d->name)));
    }
    if (!lock || !readers) {
      return FailedPrecondition("the disk of " + Printable(image) + " is being pulled for a running VM (lazy/" +
                                d->name + "); stop the VM first");
    }
    const fs::path trash = root_ / "tmp" / ("removed-lazy-" + d->name);
    RemoveAll(trash);
    if (::rename(d->dir.c_str(), trash.c_str()) != 0) return ErrnoStatus("removing " + d->dir.string());
    RemoveAll(trash);
    ++removed;
    if (gc) {
      gc->lazy_removed.push_back(d->name + ": image removed");
      gc->bytes_freed += d->bytes;
    }
  }
  return removed;
}

Result<GcResult> Store::Prune() {
  ASSIGN_OR_RETURN(FileLock exclusive, FileLock::Acquire(root_ / "locks" / "store"));
  return CollectLocked();
}

namespace {

uint64_t UsedBytes(const fs::path& p) {
  std::error_code ec;
  uint64_t total = 0;
  struct stat st;
  if (::lstat(p.c_str(), &st) == 0) total += static_cast<uint64_t>(st.st_blocks) * 512;
  if (fs::is_directory(fs::symlink_status(p, ec))) {
    for (const auto& e : fs::recursive_directory_iterator(p, ec)) {
      if (::lstat(e.path().c_str(), &st) == 0) total += static_cast<uint64_t>(st.st_blocks) * 512;
    }
  }
  return total;
}

}  // namespace

void Store::ForgetMissingChunks() {
  std::error_code ec;
  if (!fs::exists(root_ / "store.db", ec)) return;
  Status st = [&]() -> Status {
    ASSIGN_OR_RETURN(ChunkTable table, ChunkTable::Open(root_));
    ASSIGN_OR_RETURN(auto disks, table.Disks());
    for (const auto& [dir, shift] : disks) {
      if (!fs::exists(root_ / "disks" / dir, ec)) RETURN_IF_ERROR(table.RemoveDisk(dir));
    }
    return OkStatus();
  }();
  if (!st.ok()) log::Warn("the store's chunk table could not be updated (regdisk fsck --repair does it): {}", st.message());
}

Result<GcResult> Store::CollectLocked() {
  GcResult r;
  std::error_code ec;
  ASSIGN_OR_RETURN(std::vector<Ref> refs, ReadRefList());
  std::set<std::string> named;  // disk directory names some name refers to
  for (const auto& ref : refs) named.insert(DiskDir(ref.manifest, ref.path).filename().string());

  // Disks: kept when named or in use; the blobs describing kept disks stay.
  std::set<std::string> keep_blobs;
  auto keep_blobs_of = [&](const fs::path& dir) {
    auto meta = ReadFileCapped(dir / "meta.json", kMaxMetaBytes);
    if (!meta.ok()) return;
    json m = json::parse(*meta, nullptr, false);
    if (!m.is_object() || !m["manifest"].is_string()) return;
    auto d = oci::Digest::Parse(m["manifest"].get<std::string>());
    if (!d.ok()) return;
    keep_blobs.insert(d->hex());
    auto text = ReadFileCapped(BlobPath(*d), 4 << 20);
    if (!text.ok()) return;
    auto manifest = oci::Manifest::Parse(*text);
    if (manifest.ok() && manifest->config) keep_blobs.insert(manifest->config->digest.hex());
  };
  for (const auto& e : fs::directory_iterator(root_ / "disks", ec)) {
    const std::string name = e.path().filename().string();
    if (named.count(name)) {
      keep_blobs_of(e.path());
      continue;
    }
    ASSIGN_OR_RETURN(std::optional<FileLock> unused, FileLock::TryAcquire(UseLockPath(e.path())));
    ASSIGN_OR_RETURN(const bool served, ServedLazily(e.path()));
    if (!unused || served) {
      r.disks_in_use.push_back(name);
      keep_blobs_of(e.path());
      continue;
    }
    const uint64_t bytes = UsedBytes(e.path());
    // Out of disks/ first, so no one ever sees half a disk directory.
    const fs::path trash = root_ / "tmp" / ("removed-" + name);
    RemoveAll(trash);
    if (::rename(e.path().c_str(), trash.c_str()) != 0) return ErrnoStatus("removing " + e.path().string());
    RemoveAll(trash);
    ::unlink(UseLockPath(e.path()).c_str());
    ++r.disks_removed;
    r.bytes_freed += bytes;
    log::Info("removed disk {} ({} bytes)", name, bytes);
  }
  RETURN_IF_ERROR(SyncDir(root_ / "disks"));
  DropStaleLinks(refs);
  ForgetMissingChunks();
  RETURN_IF_ERROR(CollectLazy(true, &r).status());

  for (const auto& e : fs::directory_iterator(root_ / "blobs" / "sha256", ec)) {
    if (keep_blobs.count(e.path().filename().string())) continue;
    r.bytes_freed += UsedBytes(e.path());
    fs::remove(e.path(), ec);
    ++r.blobs_removed;
  }
  // No pull runs while the store lock is held exclusively: what is in
  // tmp/ and ingest/ was left by killed pulls.
  for (const char* sub : {"tmp", "ingest"}) {
    for (const auto& e : fs::directory_iterator(root_ / sub, ec)) {
      r.bytes_freed += UsedBytes(e.path());
      RemoveAll(e.path());
    }
  }
  return r;
}

}  // namespace regdisk::store
