// The node store: the disks materialised from registry disk images, shared
// by every VM on the node, and the small verified blobs that describe them.
//
//   ROOT/blobs/sha256/<hex>     manifests and configs: verified, read-only
//   ROOT/ingest/sha256-<hex>    a layer being downloaded; a killed pull
//                               resumes from it with Range
//   ROOT/disks/<hex>[-<p>]/     one materialised disk, by manifest digest (and,
//                               when a --path was given, a hash of that path):
//                                 <file>       the disk, read-only
//                                 meta.json    what it is (see StoredImage)
//   ROOT/refs.json              image name -> manifest digest [#path]
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
// lookup and its Use.
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
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "disk/format.h"
#include "image/transport.h"
#include "oci/manifest.h"
#include "store/unpack.h"
#include "util/cancel.h"
#include "util/fs.h"
#include "util/status.h"

namespace regdisk::store {

struct StoredImage {
  std::string name;             // what it was pulled as ("docker://...")
  oci::Digest manifest_digest;
  std::string disk_path;        // inside the image: "/disk/fedora25.qcow2"
  std::filesystem::path disk_file;  // in the store
  disk::DiskInfo disk;

  nlohmann::json ToJson() const;
};

struct PullOptions {
  oci::Platform platform{"linux", "amd64", ""};
  std::string path;  // the disk's path inside the image; empty: discover
  // Called from the downloading thread as a layer's bytes arrive (at most
  // every few MiB, and once at the end of each layer): layer index from 0,
  // layer count, bytes of this layer so far (a resumed prefix included),
  // and its size.
  std::function<void(size_t layer, size_t layers, uint64_t done, uint64_t total)> on_progress;
  // Caps on what a layer may make the store write; max_file_bytes is also
  // the largest virtual size a disk may declare.
  DiskTree::Limits limits;
  // Stops the pull between blocks when cancelled (partial downloads stay
  // for the next pull; the staging directory goes).
  std::shared_ptr<const CancelToken> cancel;
};

// One thing fsck found wrong, in one line ("blob sha256:ab…: its content
// hashes to sha256:cd…"), and whether --repair removed it.
struct Problem {
  std::string what;
  bool repaired = false;
};

struct GcResult {
  int disks_removed = 0;
  std::vector<std::string> disks_in_use;  // kept: a running VM uses them
  int blobs_removed = 0;
  uint64_t bytes_freed = 0;
};

class Store {
 public:
  // Opens ROOT, creating its directories (mode 0700) when missing.
  static Result<Store> Open(const std::filesystem::path& root);

  const std::filesystem::path& root() const { return root_; }

  // Pulls `src` (named `name` in refs.json) and materialises its disk.
  Result<StoredImage> Pull(image::ImageSource& src, const std::string& name, const PullOptions& options);

  // The image a name was last pulled as; nullopt when unknown.
  Result<std::optional<StoredImage>> Lookup(const std::string& name) const;
  // Every named image, sorted by name.
  Result<std::vector<StoredImage>> List() const;

  // Held (shared) by whoever looks a disk up to use it, until it holds the
  // disk's Use lock; Remove and Prune wait for it.
  Result<FileLock> Share() const;
  // A running VM's claim on its disk (shared); fails with NotFound when the
  // disk is gone.
  Result<FileLock> Use(const StoredImage& img) const;

  // Drops the names (as `images` lists them) and then prunes. Unknown names
  // fail before anything is removed.
  Result<GcResult> Remove(const std::vector<std::string>& names);
  // Deletes disks no name refers to (unless a VM uses them), blobs of no
  // kept disk, staging left by killed pulls and partial downloads.
  Result<GcResult> Prune();

  // Checks the store: every manifest and config blob against its digest,
  // every disk's record, file, size, mode and format header (the disk's
  // bytes were checked against the layer digests when pulled; no digest of
  // the flattened disk is kept), and every name against its disk. With
  // `repair`, removes what is broken (a disk a running VM uses is only
  // reported) and the names that pointed to it.
  Result<std::vector<Problem>> Check(bool repair);

 private:
  explicit Store(std::filesystem::path root) : root_(std::move(root)) {}
  Result<StoredImage> Load(const oci::Digest& manifest, const std::string& path, const std::string& name) const;
  // Stores a small verified blob (a manifest, a config) unless it is there,
  // adding its path to *stored_now when this call stored it.
  Status KeepBlob(const oci::Digest& digest, std::string_view bytes, std::vector<std::filesystem::path>* stored_now);
  // Streams every layer from src into a staging tree and commits the disk.
  // *resumed is set when a partial download of an earlier pull was reused.
  Status Materialise(image::ImageSource& src, const std::vector<oci::Descriptor>& layers, const oci::Digest& manifest,
                     const PullOptions& options, bool* resumed);
  Status StreamLayer(image::ImageSource& src, const oci::Descriptor& desc, DiskTree& tree, const std::string& label,
                     bool* resumed, const std::function<void(uint64_t done)>& progress, const CancelToken* cancel);
  void RemovePartials(const std::vector<oci::Descriptor>& layers);
  Result<GcResult> CollectLocked();  // with the store lock held exclusively
  // Check's parts (store/fsck.cc).
  std::optional<std::string> CheckDisk(const std::filesystem::path& dir) const;
  void CheckBlobs(bool repair, std::vector<Problem>* out);
  std::filesystem::path UseLockPath(const std::filesystem::path& disk_dir) const;
  Status SetRef(const std::string& name, const oci::Digest& manifest, const std::string& path);
  Result<nlohmann::json> ReadRefs() const;
  std::filesystem::path BlobPath(const oci::Digest& d) const;
  // One directory per image digest and requested disk path (empty: the
  // disk found under /disk), so one image can serve several of its disks.
  std::filesystem::path DiskDir(const oci::Digest& manifest, const std::string& path) const;

  std::filesystem::path root_;
};

}  // namespace regdisk::store
