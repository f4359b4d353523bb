#include "blockserve/lazy_pull.h"

#include <memory>
#include <mutex>
#include <vector>

#include <fmt/core.h>

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
  options.chunked_puller = [raw = p.get()](image::ImageSource& src, const oci::Digest& manifest,
                                           const oci::Descriptor& layer, const oci::ChunkIndexLocation& loc,
                                           const fs::path&) { return raw->Serve(src, manifest, layer, loc); };
  p->thread_ = std::thread([raw = p.get(), key = std::move(key), options = std::move(options)] {
    Result<store::StoredImage> r = raw->store_->Pull(*raw->source_, key, options);
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
  // One process serves a layer's filling disk at a time.
  Result<FileLock> lock = FileLock::Acquire(root / "locks" / ("lazy-" + hex));
  if (!lock.ok()) return fail(lock.status());
  lock_ = std::move(*lock);
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
      LazyDisk::Open(readers, layer, std::move(*head), loc.digest, root / "lazy" / hex, std::move(o));
  if (!disk.ok()) return fail(disk.status());
  // What it is, for `images`, prune and rmi (store/lazy_dir.h).
  if (Status st = store::WriteLazyRecord(root / "lazy" / hex, {.image = src.Name(),
                                                               .layer = layer.digest,
                                                               .index = loc.digest,
                                                               .image_path = image_path,
                                                               .disk_size = size,
                                                               .chunks = (*disk)->index().chunks.size(),
                                                               .created = {}});
      !st.ok()) {
    return fail(st);
  }
  {
    // Ready() starts the export, on its caller's thread: nbdkit dies with
    // the thread that started it, and this one ends with the pull.
    std::lock_guard guard(mu_);
    disk_ = std::move(*disk);
    Disk d;
    d.file = disk_->file();
    d.size = size;
    d.image_path = image_path;
    d.manifest = manifest;
    ready_ = d;
    cv_.notify_all();
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

Result<LazyPull::Disk> LazyPull::Ready(const CancelToken* cancel) {
  std::unique_lock lock(mu_);
  while (!cv_.wait_for(lock, std::chrono::milliseconds(100), [&] { return ready_.has_value(); })) {
    if (cancel && cancel->cancelled()) return cancel->status();
  }
  if (!ready_->ok() || (*ready_)->stored) return *ready_;
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
  // The fill ends (Serve's wait returns Cancelled, so the pull fails and
  // its thread ends); the export goes once the thread is joined, as no one
  // else touches disk_ and export_ then.
  cancel_->Cancel("the VM using the lazily-pulled disk stopped");
  if (thread_.joinable()) thread_.join();
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
}

}  // namespace regdisk::blockserve
