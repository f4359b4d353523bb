// The node store: the disks materialised from registry disk images, shared
// by every VM on the node, and the small verified blobs that describe them.
//
//   ROOT/blobs/sha256/<hex>     manifests and configs: verified, read-only
//   ROOT/ingest/sha256-<hex>    a layer being downloaded; a killed pull
//                               resumes from it with Range
//   ROOT/ingest/chunked-sha256-<hex>/
//                               a chunked layer being pulled: disk.raw and
//                               chunks.map; a killed pull fetches the rest
//   ROOT/disks/<hex>[-<p>]/     one materialised disk, by manifest digest (and,
//                               when a --path was given, a hash of that path):
//                                 <file>       the disk, read-only
//                                 meta.json    what it is (see StoredImage)
//   ROOT/by-name/<h>-<platform> a link to the disk a name (hashed: h) was
//                               last pulled as for --platform, replaced by
//                               each pull and removed with the name; what
//                               domxml names, so a libvirt domain outlives
//                               a new pull of its tag
//   ROOT/store.db               SQLite (WAL; schema_migrations versions it,
//                               store/db.h): the names (table refs: image
//                               name and platform -> manifest digest [and
//                               path]) and the chunk table, every non-zero
//                               chunk's SHA-256 of each chunked disk, for
//                               delta pulls (store/chunk_table.h)
//   ROOT/refs.json.migrated     where the names were kept before store.db
//                               held them (ROOT/refs.json): imported on the
//                               first open, then renamed (store/db.h)
//   ROOT/locks/, ROOT/tmp/      locks and staging on the same file system;
//                               a pull stages in tmp/<disk dir>.staging, so
//                               the next pull of that image (under the same
//                               image lock) removes what a killed one left
//
// Layers are streamed, not stored: one thread downloads and hashes a layer
// (appending it to its ingest file), another decompresses it and writes
// the disk's blocks into staging as they arrive. The ingest file goes once
// the layer is verified and applied, so the node keeps one copy of the
// disk, not a compressed and an extracted one.
//
// Removing images: Remove (regdisk rmi) drops names, Prune (regdisk prune)
// deletes what no name refers to: disks, their manifests and configs,
// leftovers of killed pulls. A disk a running VM uses is kept: every VM
// holds a shared lock on its disks (Use) for as long as it runs, and
// deleting needs that lock exclusively. Pulls and VM planning hold the
// store lock shared; Remove and Prune take it exclusively, so they never
// delete a disk between a pull's commit and its name, or between a VM's
// lookup and its Use. Names are written in SQLite transactions (so pulls
// naming images side by side, in several processes, lose none) and read
// without any lock of the store's.
//
// Nothing becomes visible before it is complete: a disk directory is
// renamed into place after every layer's digest has checked and the disk
// has been validated. Pulling an image already present is a no-op; two
// processes pulling the same image serialise on a per-image lock, so it is
// fetched once and both succeed.
#pragma once

#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "disk/format.h"
#include "image/progress.h"
#include "image/transport.h"
#include "oci/manifest.h"
#include "store/chunked_pull.h"
#include "store/lazy_dir.h"
#include "store/unpack.h"
#include "util/cancel.h"
#include "util/fs.h"
#include "util/status.h"

namespace regdisk::state {
class Db;
}

namespace regdisk::store {

struct StoredImage {
  std::string name;             // what it was pulled as ("docker://...")
  std::string platform;         // the image's own, "linux/amd64" ("" when unknown)
  oci::Digest manifest_digest;
  std::optional<oci::Digest> config_digest;  // the image ID, as podman shows it
  std::string created;          // the config's "created" (RFC 3339), may be empty
  int64_t stored_at = 0;        // when the disk was committed (seconds since the epoch)
  std::string disk_path;        // inside the image: "/disk/fedora25.qcow2"
  std::filesystem::path disk_file;  // in the store
  disk::DiskInfo disk;

  nlohmann::json ToJson() const;
};

struct PullOptions {
  oci::Platform platform{"linux", "amd64", ""};
  std::string path;  // the disk's path inside the image; empty: discover
  // Per-layer progress (image/progress.h), called from the downloading
  // thread: kStart (done: a resumed prefix), kBytes every few MiB, kDone
  // once the layer is verified and applied. Layers already in the store
  // (the image is there) report nothing.
  image::ProgressFn on_progress;
  // Caps on what a layer may make the store write; max_file_bytes is also
  // the largest virtual size a disk may declare.
  DiskTree::Limits limits;
  // Stops the pull between blocks when cancelled (partial downloads stay
  // for the next pull; the staging directory goes).
  std::shared_ptr<const CancelToken> cancel;
  // Materialises a chunked layer in place of the parallel full pull (lazy
  // boot: blockserve::LazyPull has served and filled the disk already, and
  // hands it over here). It gets the layer, where its index is, and the
  // staging directory, and returns the verified raw disk in a file on the
  // store's file system, which the store then commits as it commits any
  // pull.
  // Its arguments: the source, the image's manifest digest, the layer, its
  // index and the ingest directory the store would use.
  std::function<Result<ChunkedDisk>(image::ImageSource&, const oci::Digest&, const oci::Descriptor&,
                                    const oci::ChunkIndexLocation&, const std::filesystem::path&)>
      chunked_puller;
};

// One thing fsck found wrong, in one line ("blob sha256:ab…: its content
// hashes to sha256:cd…"), and whether --repair removed it.
struct Problem {
  std::string what;
  bool repaired = false;
};

struct GcResult {
  int disks_removed = 0;
  std::vector<std::string> disks_in_use;  // kept: a running VM uses them (or an export serves them)
  int blobs_removed = 0;
  uint64_t bytes_freed = 0;
  // lazy/<name> directories (store/lazy_dir.h) removed, each "NAME: why"
  // ("committed", "no record", "image removed"), and those kept because an
  // export serves them, or because they are fills a later run resumes.
  std::vector<std::string> lazy_removed;
  std::vector<std::string> lazy_in_use;
  int lazy_kept = 0;
};

class Store {
 public:
  // Opens ROOT, creating its directories (mode 0700) when missing.
  static Result<Store> Open(const std::filesystem::path& root);
  // Opens ROOT for reading only (images, inspect, domxml): creates
  // nothing; a store that does not exist reads as empty. Pull, Remove,
  // Prune and Check need Open.
  static Store OpenForReading(const std::filesystem::path& root) { return Store(root); }

  const std::filesystem::path& root() const { return root_; }

  // Pulls `src` (named `name` in the store's names) and materialises its
  // disk. A store whose database cannot be opened (a damaged refs.json to
  // import, say) fails before anything is fetched.
  Result<StoredImage> Pull(image::ImageSource& src, const std::string& name, const PullOptions& options);

  // The image a name was last pulled as for `platform` (an image whose
  // platform matches it: os and architecture, and variant when `platform`
  // names one); nullopt when unknown or its disk is gone.
  Result<std::optional<StoredImage>> Lookup(const std::string& name, const oci::Platform& platform) const;
  // Every named image, sorted by name, then platform.
  Result<std::vector<StoredImage>> List() const;
  // The disks still filling (lazy/, store/lazy_dir.h) that have a record
  // and were not committed yet, by directory name. Reads only.
  Result<std::vector<FillingDisk>> Filling() const;

  // The stable path of the disk `name` was pulled as for `platform` (see
  // by-name/ above); it exists only once such a pull happened.
  std::filesystem::path StablePath(const std::string& name, const oci::Platform& platform) const;

  // Held (shared) by whoever looks a disk up to use it, until it holds the
  // disk's Use lock; Remove and Prune wait for it.
  Result<FileLock> Share() const;
  // A running VM's claim on its disk (shared); fails with NotFound when the
  // disk is gone.
  Result<FileLock> Use(const StoredImage& img) const;

  // Drops the names (as `images` lists them; every platform of each) and
  // then prunes. Unknown names fail (NotFound) before anything is removed.
  Result<GcResult> Remove(const std::vector<std::string>& names);
  // Drops these images' names (name and platform, as List gives them) and
  // then prunes. Without `force`, an image whose disk a running VM uses and
  // no other name keeps is refused (FailedPrecondition) before anything is
  // removed; with it, its name goes now and its disk once its VMs stop
  // (the next rmi or prune), reported in disks_in_use.
  Result<GcResult> RemoveImages(const std::vector<StoredImage>& images, bool force);
  // Deletes disks no name refers to (unless a VM uses them), blobs of no
  // kept disk, staging left by killed pulls and partial downloads.
  Result<GcResult> Prune();
  // Removes the filling disks (lazy/, store/lazy_dir.h) recorded as pulled
  // for `image` that no export serves; FailedPrecondition, removing
  // nothing, when one is served. How many went (0: none was recorded).
  Result<int> RemoveFilling(const std::string& image, GcResult* gc);

  // Checks the store: every manifest and config blob against its digest,
  // every disk's record, file, size, mode and format header (the disk's
  // bytes were checked against the layer digests when pulled; no digest of
  // a flattened qcow2 is kept, but a chunked disk's chunks are checked
  // against the chunk table), the chunk table against the disks, and every
  // name against its disk. With `repair`, removes what is broken (a disk a
  // running VM uses is only reported) and the names that pointed to it,
  // drops the table's rows of disks that are gone and records chunked disks
  // it lacks.
  Result<std::vector<Problem>> Check(bool repair);

 private:
  explicit Store(std::filesystem::path root) : root_(std::move(root)) {}
  // One name for one platform (a row of store.db's refs).
  struct Ref {
    std::string name, platform;
    oci::Digest manifest;
    std::string path;
  };
  Result<StoredImage> Load(const Ref& ref) const;
  // Stores a small verified blob (a manifest, a config) unless it is there,
  // adding its path to *stored_now when this call stored it.
  Status KeepBlob(const oci::Digest& digest, std::string_view bytes, std::vector<std::filesystem::path>* stored_now);
  // Streams every layer from src into a staging tree and commits the disk.
  // *resumed is set when a partial download of an earlier pull was reused.
  Status Materialise(image::ImageSource& src, const std::vector<oci::Descriptor>& layers, const oci::Digest& manifest,
                     const PullOptions& options, bool* resumed);
  Status StreamLayer(image::ImageSource& src, const oci::Descriptor& desc, DiskTree& tree, const std::string& label,
                     bool* resumed, const image::ProgressFn& progress, const CancelToken* cancel);
  void RemovePartials(const std::vector<oci::Descriptor>& layers);
  // Drops the chunk table's rows of disks that are no longer in disks/
  // (with the store lock held exclusively); a failure is only logged.
  void ForgetMissingChunks();
  Result<GcResult> CollectLocked();  // with the store lock held exclusively
  // The layers of a stored disk (from its manifest), empty when unknown.
  std::vector<oci::Digest> LayersOfDisk(const std::filesystem::path& dir) const;
  // True when an export (a lazily-pulled disk's nbdkit) still serves one of
  // the disk's layers: its locks/lazy-<name> is held.
  Result<bool> ServedLazily(const std::filesystem::path& dir) const;
  // The lazy names (LazyName) of every stored disk's layers.
  std::set<std::string> CommittedLazyNames() const;
  // Lazy directories nobody serves that are committed or have no record
  // (removed with `repair`), for prune and fsck: "NAME: why" each.
  Result<std::vector<std::string>> CollectLazy(bool remove, GcResult* gc);
  // Check's parts (store/fsck.cc).
  std::optional<std::string> CheckDisk(const std::filesystem::path& dir) const;
  void CheckBlobs(bool repair, std::vector<Problem>* out);
  void CheckChunkTable(bool repair, std::set<std::string>* broken, std::vector<Problem>* out);
  // Opens the database (false when it cannot be: problems say why), with
  // `repair` setting aside a damaged refs.json or store.db first.
  Result<bool> CheckDatabase(bool repair, std::vector<Problem>* out);
  Status CheckRefs(bool repair, const std::set<std::string>& broken, std::vector<Problem>* out);
  // Removes a broken disk unless a VM uses it (then says so in p->what);
  // true when removed.
  bool RemoveBrokenDisk(const std::filesystem::path& dir, Problem* p);
  std::filesystem::path UseLockPath(const std::filesystem::path& disk_dir) const;
  // The store's database, or nullopt (nothing created) when the store has
  // neither store.db nor a refs.json to import: it has no names.
  Result<std::optional<state::Db>> OpenDbIfAny() const;
  // Every name, sorted by name, then platform; rows that are not digests
  // are skipped (fsck reports them). `name`: only that name's.
  Result<std::vector<Ref>> ReadRefList(const std::string* name = nullptr) const;
  Result<std::vector<Ref>> RefsIn(state::Db& db, const std::string* name) const;
  // Replaces every name by `refs` (in the caller's transaction).
  static Status ReplaceRefs(state::Db& db, const std::vector<Ref>& refs);
  // The platform of a stored manifest's config ("" when unknown).
  std::string StoredPlatform(const oci::Digest& manifest) const;
  static Status SetRef(state::Db& db, const Ref& ref);
  // Points StablePath(name, platform) at `disk_file` (replaced atomically).
  Status SetStableLink(const std::string& name, const oci::Platform& platform, const std::filesystem::path& disk_file);
  // Removes links whose name no longer refers to the disk they point to,
  // and temp links a killed pull left. Only with the exclusive store lock.
  void DropStaleLinks(const std::vector<Ref>& refs);
  std::filesystem::path BlobPath(const oci::Digest& d) const;
  // One directory per image digest and requested disk path (empty: the
  // disk found under /disk), so one image can serve several of its disks.
  std::filesystem::path DiskDir(const oci::Digest& manifest, const std::string& path) const;

  std::filesystem::path root_;
};

}  // namespace regdisk::store
