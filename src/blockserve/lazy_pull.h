// Lazy boot's pull: for a chunked image, serves the disk over NBD as soon
// as its index and tar header are verified, fills it in the background
// (outside the store's locks), and commits it to the store exactly as a
// full pull would (Store::Pull) once the last chunk is verified. Other
// images are pulled by Store::Pull in full. A VM boots from Ready()'s
// socket while the pull goes on; later VMs find an ordinary store disk.
//
//   ASSIGN_OR_RETURN(auto pull, LazyPull::Start(store, std::move(source), key, pull_options, {}));
//   ASSIGN_OR_RETURN(LazyPull::Disk disk, pull->Ready());
//   if (disk.socket.empty()) { ... not chunked: disk.stored is the pulled disk ... }
//   else { ... QEMU: driver=nbd, server.path=disk.socket, then raw ... }
//   ...the VM runs...
//   pull.reset();  // after QEMU is gone: stops the fill (it resumes next
//                  // time from its bitmap) and the export
//
// Where things live, under the store root:
//   lazy/<hex>/           (the layer digest's first 24 hex digits) the filling disk, its bitmap and sockets
//                         (blockserve/lazy_disk.h, export.h); kept across
//                         runs until the disk is committed and unused
//   profiles/<hex>        the boot profile of that layer
//   locks/lazy-<hex>      held by the one process serving it (the owner)
//   locks/lazy-<hex>.readers
//                         held (shared) by every other process whose VMs
//                         read the owner's export
//
// One export per layer per node, whichever process serves it: a pull that
// finds another process (or another LazyPull here) serving the layer joins
// it as a reader. Ready() gives the owner's socket, and this pull fetches
// nothing. When the owner goes first (killed, or a daemon that exits
// leaving its VMs), a reader takes its lock over: it adopts the nbdkit the
// owner left (ExportOptions::outlive_owner), resumes the fill from the
// bitmap and commits the disk. An owner whose VMs have stopped keeps its
// export up, and the fill going, until its readers have gone.
#pragma once

#include <condition_variable>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "blockserve/export.h"
#include "blockserve/lazy_disk.h"
#include "image/transport.h"
#include "store/store.h"
#include "util/cancel.h"
#include "util/fs.h"
#include "util/status.h"

namespace regdisk::blockserve {

struct LazyPullOptions {
  ExportOptions export_options;
  LazyDiskOptions disk_options;  // label and profile are set by LazyPull
};

class LazyPull {
 public:
  // What a VM boots from.
  struct Disk {
    // Served while it fills: the NBD socket, the raw disk's size and its
    // path inside the image. Empty socket: the image was not chunked and
    // was pulled in full; `stored` is it.
    std::filesystem::path socket;
    std::filesystem::path file;  // the filling disk (a name for the overlay's header)
    uint64_t size = 0;
    std::string image_path;
    std::optional<store::StoredImage> stored;
    bool arrived = false;  // chunked, but complete and committed before boot
    oci::Digest manifest;  // the image's manifest, the one these bytes are
  };

  // Starts pulling `key` from `source` into `store` on a thread of its own.
  // A layer that is not chunked (or an image of several layers) is pulled
  // in full, and Ready() returns once it is in the store.
  static Result<std::unique_ptr<LazyPull>> Start(const store::Store& store, std::unique_ptr<image::ImageSource> source,
                                                 std::string key, store::PullOptions options, LazyPullOptions lazy);
  // Stops the fill (a later LazyPull of the layer resumes from its bitmap)
  // and the export: call it once no VM uses the export any more. A disk
  // that was committed leaves nothing under lazy/.
  ~LazyPull();
  LazyPull(const LazyPull&) = delete;
  LazyPull& operator=(const LazyPull&) = delete;

  // Waits until the disk can be booted from, or the pull failed. The first
  // call starts the export, tied to the calling thread (nbdkit dies with
  // it) unless ExportOptions::outlive_owner: call it from the thread that
  // runs the VM.
  // With `cancel`, the wait ends (Cancelled) when it is cancelled; the
  // pull goes on.
  Result<Disk> Ready(const CancelToken* cancel = nullptr);
  // Waits until the pull ended: the stored disk, or why not.
  Result<store::StoredImage> Wait();
  // Whether the pull has ended (committed or failed), without waiting.
  bool Ended();
  // The export outlives this object (ExportOptions::outlive_owner): nbdkit
  // keeps serving the VMs that read from it, for the next owner to adopt.
  // For a daemon that stops while its VMs run on.
  void KeepExport();
  // Where the fill stands, for metrics; all zero until the disk is served.
  // Thread-safe.
  struct Progress {
    uint64_t present = 0, chunks = 0;  // chunks verified, of all
    uint64_t fetched_bytes = 0;        // from the registry, by this pull
    bool serving = false;              // an export is up
    bool ended = false;                // committed or failed
    bool joined = false;               // reads another process's export
  };
  // Whether Ready() gave (or will give) another owner's export: this pull
  // does not fill the disk and never ends by itself.
  bool joined();
  // While joined: the descriptor of this pull's hold on the owner's export
  // (a shared lock on locks/lazy-<hex>.readers), for the QEMU that reads
  // it to inherit, so that the hold lasts as long as the VM does, whatever
  // happens to this process. -1 when not joined.
  int reader_lock_fd();
  // For a long-lived process that must not block: true when this pull can
  // be destroyed at once (it serves no export, keeps it, or no other
  // process reads from it, and then none can join until it is gone).
  bool TryRetire();
  Progress progress();
  // The fill, for `images` and tests: nullptr until served.
  const LazyDisk* disk() const { return disk_.get(); }
  const Export* served() const { return export_.get(); }

 private:
  LazyPull() = default;
  Result<store::ChunkedDisk> Serve(image::ImageSource& src, const oci::Digest& manifest, const oci::Descriptor& layer,
                                   const oci::ChunkIndexLocation& loc);
  // The thread's work: resolves the image; for a chunked layer the store
  // lacks, joins the export of another pull of it, or takes its lock,
  // serves and fills it (Serve), and has Store::Pull commit it; anything
  // else is a plain Store::Pull.
  Result<store::StoredImage> PullOrJoin(const std::string& key, const store::PullOptions& options);
  // Whether the store holds the disk of `manifest` (at `path`, when given)
  // under any name.
  bool Stored(const oci::Digest& manifest, const std::string& path) const;
  // Another process serves the layer: reads its export once it answers,
  // until this pull is destroyed (Cancelled) or the owner's lock comes
  // free, which is returned held (this pull serves the disk from then on).
  Result<FileLock> JoinOrTakeOver(const std::string& label, const std::filesystem::path& dir,
                                  const oci::Digest& manifest);
  // Before an owner stops its export: waits until no other process reads
  // it, and keeps them out (retire_lock_).
  void WaitForReaders();

  std::optional<store::Store> store_;
  std::unique_ptr<image::ImageSource> source_;
  LazyPullOptions options_;
  uint64_t max_disk_bytes_ = 0;  // the pull's --max-disk-size, checked before anything is served
  // Ends the fill (and the pull, unless the caller gave a token of its
  // own) when the LazyPull goes.
  std::shared_ptr<CancelToken> cancel_ = std::make_shared<CancelToken>();

  std::mutex mu_;
  std::condition_variable cv_;
  std::optional<Result<Disk>> ready_;                      // guarded by mu_
  std::optional<Result<store::StoredImage>> result_;       // guarded by mu_
  bool committing_ = false;                                // guarded by mu_
  bool keep_export_ = false;                               // guarded by mu_
  std::optional<FileLock> lock_;
  std::filesystem::path owner_path_, readers_path_;  // guarded by mu_ (written once, by the pull's thread)
  std::optional<FileLock> readers_lock_;             // guarded by mu_: held while joined_
  std::optional<FileLock> retire_lock_;              // guarded by mu_: the owner's, exclusive
  bool joined_ = false;                              // guarded by mu_
  bool stopping_ = false;                            // guarded by mu_: being destroyed (no take-over now)
  std::string label_;                                // guarded by mu_, as the paths
  std::unique_ptr<LazyDisk> disk_;
  std::unique_ptr<Export> export_;
  std::thread thread_;
};

// Destroys `pulls` (one process's, say a VM's disks), those reading
// another's export first: an owner waits for its readers, and a reader of
// an export this same process serves must not outlive it.
void ReleaseReadersFirst(std::vector<std::shared_ptr<LazyPull>>& pulls);

}  // namespace regdisk::blockserve
