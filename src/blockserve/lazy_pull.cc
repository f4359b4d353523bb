#include "blockserve/lazy_pull.h"

#include <unistd.h>

#include <memory>
#include <mutex>
#include <vector>

#include <fmt/core.h>

#include "blockserve/export.h"
#include "image/copy.h"
#include "oci/chunk_index.h"
#include "store/chunk_fetch.h"
#include "store/lazy_dir.h"
#include "util/log.h"
#include "util/text.h"

namespace regdisk::blockserve {

namespace fs = std::filesystem;

Result<std::unique_ptr<LazyPull>> LazyPull::Start(const store::Store& store, std::unique_ptr<image::ImageSource> source,
                                                  std::string key, store::PullOptions options, LazyPullOptions lazy) {
  auto p = std::unique_ptr<LazyPull>(new LazyPull());
  p->store_ = store;
  p->source_ = std::move(source);
  p->options_ = std::move(lazy);
  p->max_disk_bytes_ = options.limits.max_file_bytes;
  if (!options.cancel) options.cancel = p->cancel_;
  p->thread_ = std::thread([raw = p.get(), key = std::move(key), options = std::move(options)] {
    Result<store::StoredImage> r = raw->PullOrJoin(key, options);
    std::lock_guard lock(raw->mu_);
    if (!raw->ready_) {
      // Never served: not chunked (pulled in full), or failed first.
      if (r.ok()) {
        Disk d;
        d.stored = *r;
        d.size = r->disk.virtual_size;
        d.image_path = r->disk_path;
        d.manifest = r->manifest_digest;
        raw->ready_ = d;
      } else {
        raw->ready_ = r.status();
      }
    }
    raw->result_ = std::move(r);
    raw->cv_.notify_all();
  });
  return p;
}

namespace {

// The image as PullOrJoin resolved it: the first answer to GetManifest is
// kept, so Store::Pull commits the image that was served even if its tag
// moves meanwhile. Everything else goes to the source.
class PinnedSource : public image::ImageSource {
 public:
  explicit PinnedSource(image::ImageSource& inner) : inner_(inner) {}
  std::string Name() const override { return inner_.Name(); }
  Result<oci::RawManifest> GetManifest() override {
    if (!top_) {
      ASSIGN_OR_RETURN(oci::RawManifest m, inner_.GetManifest());
      top_ = std::move(m);
    }
    return *top_;
  }
  Result<oci::RawManifest> GetManifestByDigest(const oci::Descriptor& desc) override {
    return inner_.GetManifestByDigest(desc);
  }
  Status FetchBlob(const oci::Descriptor& desc, const registry::BlobSink& sink) override {
    return inner_.FetchBlob(desc, sink);
  }
  Status FetchBlobFrom(const oci::Descriptor& desc, uint64_t offset, oci::Hasher& hasher,
                       const registry::BlobSink& sink) override {
    return inner_.FetchBlobFrom(desc, offset, hasher, sink);
  }
  Result<std::unique_ptr<image::BlobRangeReader>> OpenRangeReader() override { return inner_.OpenRangeReader(); }
  std::optional<fs::path> LocalBlobPath(const oci::Descriptor& desc) override { return inner_.LocalBlobPath(desc); }
  const oci::Reference* RegistryRef() const override { return inner_.RegistryRef(); }
  Result<std::vector<std::string>> RepoTags() override { return inner_.RepoTags(); }
  std::string RepoName() const override { return inner_.RepoName(); }

 private:
  image::ImageSource& inner_;
  std::optional<oci::RawManifest> top_;
};

}  // namespace

Result<store::StoredImage> LazyPull::PullOrJoin(const std::string& key, const store::PullOptions& options) {
  // The image is resolved first: a chunked layer is served and filled
  // under its own lock, outside Store::Pull (which holds the store's shared
  // lock and the image's until it commits: rmi, prune and a reader of this
  // export must not wait there), and Store::Pull then only commits it.
  PinnedSource pinned(*source_);
  ASSIGN_OR_RETURN(image::ResolvedImage img, image::ResolveImage(pinned, options.platform));
  store::PullOptions plain = options;
  plain.chunked_puller = nullptr;
  if (img.manifest.layers.size() != 1) return store_->Pull(pinned, key, plain);
  const oci::Descriptor layer = img.manifest.layers[0];
  ASSIGN_OR_RETURN(std::optional<oci::ChunkIndexLocation> loc, oci::ChunkIndexLocationOf(layer));
  // Not chunked, or its disk is in the store already (under any name):
  // Store::Pull does the rest.
  if (!loc || Stored(img.raw.digest, options.path)) return store_->Pull(pinned, key, plain);
  const fs::path root = store_->root();
  const std::string name = store::LazyName(layer.digest);
  {
    std::lock_guard guard(mu_);
    owner_path_ = store::LazyLockPath(root, name);
    readers_path_ = store::LazyReadersLockPath(root, name);
    label_ = "layer " + layer.digest.Short();
  }
  RETURN_IF_ERROR(MakeDirs(root / "locks"));
  ASSIGN_OR_RETURN(std::optional<FileLock> owner, FileLock::TryAcquire(owner_path_));
  if (!owner) {
    ASSIGN_OR_RETURN(FileLock got, JoinOrTakeOver(label_, store::LazyDirPath(root, name), img.raw.digest));
    owner.emplace(std::move(got));
    // The owner committed the disk before it went: nothing to fill. (An
    // nbdkit it left for its readers serves them the whole disk.)
    if (Stored(img.raw.digest, options.path)) return store_->Pull(pinned, key, plain);
  }
  lock_ = std::move(owner);
  // (The disk's readers outlive this call: the source itself, not `pinned`.)
  Result<store::ChunkedDisk> filled = Serve(*source_, img.raw.digest, layer, *loc);
  if (!filled.ok()) {
    // A take-over that failed lets another process try (this pull's VMs
    // read on from the export the owner left).
    if (joined()) lock_.reset();
    return filled.status();
  }
  store::PullOptions commit = plain;
  commit.chunked_puller = [&filled, want = layer.digest](image::ImageSource&, const oci::Digest&,
                                                         const oci::Descriptor& got, const oci::ChunkIndexLocation&,
                                                         const fs::path&) -> Result<store::ChunkedDisk> {
    if (got.digest != want) {
      return Aborted("the image changed while its disk was pulled lazily (its tag names another manifest now); "
                     "pull it again");
    }
    return *filled;
  };
  return store_->Pull(pinned, key, commit);
}

bool LazyPull::Stored(const oci::Digest& manifest, const std::string& path) const {
  Result<std::vector<store::StoredImage>> all = store_->List();
  if (!all.ok()) return false;
  for (const store::StoredImage& img : *all) {
    if (img.manifest_digest == manifest && (path.empty() || img.disk_path == path)) return true;
  }
  return false;
}

Result<store::ChunkedDisk> LazyPull::Serve(image::ImageSource& src, const oci::Digest& manifest,
                                           const oci::Descriptor& layer, const oci::ChunkIndexLocation& loc) {
  // Short enough for the unix sockets in its directory (108 bytes with the
  // root); the bitmap inside is keyed by the full index digest.
  const std::string hex = layer.digest.hex().substr(0, 24);
  const fs::path root = store_->root();
  const std::string label = "layer " + layer.digest.Short();
  auto fail = [&](Status st) -> Status {
    std::lock_guard lock(mu_);
    if (!ready_) ready_ = st;
    cv_.notify_all();
    return st;
  };
  const fs::path dir = root / "lazy" / hex;
  // PullOrJoin holds the layer's lock (one process serves a layer's
  // filling disk at a time).
  if (!lock_) return fail(Internal("serving " + label + " without its lock"));
  // Two connections: the index on one, the tar header's bytes on the other,
  // at once (one round trip before anything can be served).
  Result<std::unique_ptr<image::BlobRangeReader>> reader = src.OpenRangeReader();
  if (!reader.ok()) return fail(reader.status());
  Result<std::unique_ptr<image::BlobRangeReader>> head_reader = src.OpenRangeReader();
  if (!head_reader.ok()) return fail(head_reader.status());
  Result<store::ChunkedLayerHead> head =
      store::OpenChunkedLayer(**reader, layer, loc, max_disk_bytes_, label, head_reader->get());
  if (!head.ok()) return fail(head.status());
  LazyDiskOptions o = options_.disk_options;
  o.label = label;
  o.profile = root / "profiles" / hex;
  o.store_root = root;  // chunks an earlier version left in the store are copied, not fetched
  if (Status st = MakeDirs(root / "profiles"); !st.ok()) return fail(st);
  const std::string image_path = head->image_path;
  const uint64_t size = head->index.disk_size;
  // The head's two connections have made their first requests (a TLS probe,
  // a token): the disk's first fetches take them before opening new ones.
  struct Warm {
    std::mutex mu;
    std::vector<std::unique_ptr<image::BlobRangeReader>> readers;
  };
  auto warm = std::make_shared<Warm>();
  warm->readers.push_back(std::move(*reader));
  warm->readers.push_back(std::move(*head_reader));
  auto readers = [&src, warm]() -> Result<std::unique_ptr<image::BlobRangeReader>> {
    {
      std::lock_guard guard(warm->mu);
      if (!warm->readers.empty()) {
        std::unique_ptr<image::BlobRangeReader> r = std::move(warm->readers.back());
        warm->readers.pop_back();
        return r;
      }
    }
    return src.OpenRangeReader();
  };
  Result<std::unique_ptr<LazyDisk>> disk =
      LazyDisk::Open(readers, layer, std::move(*head), loc.digest, dir, std::move(o));
  if (!disk.ok()) return fail(disk.status());
  // What it is, for `images`, prune and rmi (store/lazy_dir.h).
  if (Status st = store::WriteLazyRecord(dir, {.image = src.Name(),
                                                               .layer = layer.digest,
                                                               .index = loc.digest,
                                                               .image_path = image_path,
                                                               .disk_size = size,
                                                               .chunks = (*disk)->index().chunks.size(),
                                                               .created = {}});
      !st.ok()) {
    return fail(st);
  }
  bool took_over = false;
  {
    // Ready() starts the export, on its caller's thread: nbdkit dies with
    // the thread that started it, and this one ends with the pull.
    std::lock_guard guard(mu_);
    disk_ = std::move(*disk);
    took_over = joined_;
    if (!took_over) {
      Disk d;
      d.file = disk_->file();
      d.size = size;
      d.image_path = image_path;
      d.manifest = manifest;
      ready_ = d;
      cv_.notify_all();
    }
  }
  if (took_over) {
    // This pull's VMs read the export the owner left behind: its nbdkit
    // outlived it (a killed `pull --lazy`, a daemon that exited), and is
    // adopted; the chunks it asks for are fetched here from now on.
    ExportOptions eo = options_.export_options;
    eo.outlive_owner = true;
    Result<std::unique_ptr<Export>> e = Export::Start(*disk_, eo);
    if (!e.ok()) {
      log::Warn("{}: the process serving it went, and its export could not be taken over: {}", label,
                e.status().ToString());
      lock_.reset();  // another process may do better
      return e.status();
    }
    std::lock_guard guard(mu_);
    export_ = std::move(*e);
    joined_ = false;
    log::Info("{}: the process serving it went; this one serves it now{}", label,
              export_->adopted() ? " (its nbdkit adopted)" : "");
  }
  log::Info("{}: {} chunks, {} present; filling in the background", label, disk_->index().chunks.size(),
            disk_->present());
  disk_->StartFill();
  RETURN_IF_ERROR(disk_->WaitComplete(cancel_.get()));
  {
    // The commit renames disk.raw: an export starting now would not find
    // it. One that started already holds it open (mu_ waits for it).
    std::lock_guard guard(mu_);
    committing_ = true;
  }
  store::ChunkedDisk out;
  out.file = disk_->file();
  out.image_path = image_path;
  out.size = size;
  out.chunks = disk_->index().chunks.size();
  out.requests = disk_->requests();
  out.index = disk_->index();  // for the store's chunk table
  out.fetched_bytes = disk_->fetched_bytes();
  out.reused_chunks = disk_->reused_chunks();
  log::Info("{}: every chunk verified ({} requests); committing it to the store", label, disk_->requests());
  return out;
}

Result<FileLock> LazyPull::JoinOrTakeOver(const std::string& label, const fs::path& dir, const oci::Digest& manifest) {
  const fs::path socket = dir / "nbd.sock";
  for (bool said = false;;) {
    std::optional<FileLock> readers;
    if (!joined()) {
      // Shared, before the owner's lock is looked at: an owner takes it
      // exclusively before it stops its export, so an export found
      // answering below is not one being stopped.
      ASSIGN_OR_RETURN(FileLock r, FileLock::Acquire(readers_path_, FileLock::Mode::kShared));
      readers.emplace(std::move(r));
    }
    ASSIGN_OR_RETURN(std::optional<FileLock> owner, FileLock::TryAcquire(owner_path_));
    if (owner) {
      // The owner has gone (or never served): this pull serves the disk,
      // unless it is being destroyed.
      // (Its own reader's lock stays open until it retires: a QEMU being
      // started may be inheriting its descriptor.)
      std::lock_guard guard(mu_);
      if (stopping_) return Cancelled("the pull was stopped");
      return std::move(*owner);
    }
    if (readers && CanConnect(socket)) {
      Result<store::LazyRecord> record = store::ReadLazyRecord(dir);
      if (record.ok()) {
        std::lock_guard guard(mu_);
        Disk d;
        d.socket = socket;
        d.file = dir / "disk.raw";
        d.size = record->disk_size;
        d.image_path = record->image_path;
        d.manifest = manifest;
        readers_lock_ = std::move(readers);
        joined_ = true;
        ready_ = d;
        cv_.notify_all();
        log::Info("{}: another process serves it (lazy/{}); its VMs read that export", label,
                  dir.filename().string());
      }
    }
    if (!said && readers) {
      log::Info("{}: waiting for the process that is pulling it to serve it", label);
      said = true;
    }
    readers.reset();  // not while it sleeps: an owner may be about to retire
    if (Status st = cancel_->SleepFor(std::chrono::milliseconds(200)); !st.ok()) return st;
  }
}

void ReleaseReadersFirst(std::vector<std::shared_ptr<LazyPull>>& pulls) {
  std::erase_if(pulls, [](const std::shared_ptr<LazyPull>& p) { return p && p->joined(); });
  pulls.clear();
}

bool LazyPull::joined() {
  std::lock_guard lock(mu_);
  return joined_;
}

int LazyPull::reader_lock_fd() {
  std::lock_guard lock(mu_);
  return joined_ && readers_lock_ ? readers_lock_->fd() : -1;
}

bool LazyPull::TryRetire() {
  std::lock_guard lock(mu_);
  if (joined_ || !export_ || keep_export_ || retire_lock_ || readers_path_.empty()) return true;
  readers_lock_.reset();  // its hold from before it took the export over (its QEMU keeps its own)
  Result<std::optional<FileLock>> l = FileLock::TryAcquire(readers_path_);
  if (!l.ok() || !*l) return false;
  retire_lock_ = std::move(**l);
  return true;
}

void LazyPull::WaitForReaders() {
  fs::path readers_path;
  std::string label;
  {
    std::lock_guard lock(mu_);
    if (joined_ || !export_ || keep_export_ || retire_lock_ || readers_path_.empty()) return;
    readers_lock_.reset();  // its hold from before it took the export over
    readers_path = readers_path_;
    label = label_;
  }
  for (bool said = false;;) {
    Result<std::optional<FileLock>> l = FileLock::TryAcquire(readers_path);
    if (!l.ok()) {
      log::Warn("{}: {}", label, l.status().ToString());
      return;
    }
    if (*l) {
      std::lock_guard lock(mu_);
      retire_lock_ = std::move(**l);
      return;
    }
    if (!said) {
      log::Info("{}: VMs of another process read this disk through this export: it stays up, and the fill goes on, "
                "until they stop",
                label);
      said = true;
    }
    ::usleep(200000);
  }
}

Result<LazyPull::Disk> LazyPull::Ready(const CancelToken* cancel) {
  std::unique_lock lock(mu_);
  while (!cv_.wait_for(lock, std::chrono::milliseconds(100), [&] { return ready_.has_value(); })) {
    if (cancel && cancel->cancelled()) return cancel->status();
  }
  if (!ready_->ok() || (*ready_)->stored || joined_ || export_) return *ready_;
  if (!export_ && committing_) {
    // It arrived in full before anyone asked: boot from the store.
    cv_.wait(lock, [&] { return result_.has_value(); });
    if (!result_->ok()) return result_->status();
    Disk d;
    d.stored = **result_;
    d.size = d.stored->disk.virtual_size;
    d.image_path = d.stored->disk_path;
    d.manifest = d.stored->manifest_digest;
    d.arrived = true;
    return d;
  }
  if (!export_) {
    ASSIGN_OR_RETURN(export_, Export::Start(*disk_, options_.export_options));
    (*ready_)->socket = export_->socket();
  }
  return *ready_;
}

Result<store::StoredImage> LazyPull::Wait() {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return result_.has_value(); });
  return *result_;
}

LazyPull::Progress LazyPull::progress() {
  std::lock_guard lock(mu_);
  Progress p;
  p.ended = result_.has_value();
  p.serving = export_ != nullptr;
  p.joined = joined_;
  if (disk_) {
    p.present = disk_->present();
    p.chunks = disk_->index().chunks.size();
    p.fetched_bytes = disk_->fetched_bytes();
  }
  return p;
}

bool LazyPull::Ended() {
  std::lock_guard lock(mu_);
  return result_.has_value();
}

void LazyPull::KeepExport() {
  std::lock_guard lock(mu_);
  keep_export_ = true;
}

LazyPull::~LazyPull() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;  // a reader does not take the export over now
  }
  // Another process's VMs may still read this export (and need chunks):
  // it stays, and the fill goes on, until they have stopped.
  WaitForReaders();
  // The fill ends (Serve's wait returns Cancelled, so the pull fails and
  // its thread ends); the export goes once the thread is joined, as no one
  // else touches disk_ and export_ then.
  cancel_->Cancel("the VM using the lazily-pulled disk stopped");
  if (thread_.joinable()) thread_.join();
  // A reader that took the export over just before it was being destroyed
  // may serve other readers now: it leaves them the export (one of them
  // takes it over) rather than wait for them here.
  if (!TryRetire()) {
    std::lock_guard lock(mu_);
    keep_export_ = true;
  }
  // Guest reads still waiting on the registry give up before the control
  // server's workers are joined.
  if (disk_) disk_->Stop();
  if (export_ && keep_export_) export_->Release();
  export_.reset();
  const bool committed = result_.has_value() && result_->ok();
  fs::path dir;
  if (disk_) dir = disk_->dir();
  disk_.reset();
  // A kept export still reads from its directory (the bitmap, the sockets).
  if (committed && !dir.empty() && !keep_export_) RemoveAll(dir);
  // The layer is free; then readers may join a later owner's export.
  lock_.reset();
  retire_lock_.reset();
}

}  // namespace regdisk::blockserve
