// Flattening image layers, in order, into the files that end up under
// /disk. Only /disk is materialised (nothing else of the image is needed),
// into staging files named by this code, never by the tar entry's path, so
// no entry can write outside the staging directory.
//
//   DiskTree tree(staging_dir);
//   for (each layer) RETURN_IF_ERROR(tree.ApplyLayer(layer_bytes, media_type, "layer 1"));
//   ASSIGN_OR_RETURN(DiskTree::File disk, tree.FindDisk(requested_path));
//
// Hostile layers are refused: absolute or ".." entry paths anywhere; and
// under /disk (or for /disk itself) symlinks, hard links, devices, FIFOs
// and sockets. Whiteouts (.wh.NAME and .wh..wh..opq) are honoured.
// Zero-filled blocks are written as holes, so sparse disks stay sparse.
//
// Sizes and counts from a layer are bounded (Limits): entries per layer,
// entries under /disk, bytes per file; and a file is written only when the
// staging file system has room for its data. Work per entry is O(log n)
// plus what it removes, so a layer of n entries costs O(n log n).
#pragma once

#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>

#include "util/byte_source.h"
#include "util/status.h"

struct archive;
struct archive_entry;

namespace regdisk::store {

class DiskTree {
 public:
  struct File {
    std::string image_path;           // "/disk/fedora25.qcow2"
    std::filesystem::path staged;     // where its bytes are
    uint64_t size = 0;
  };

  struct Limits {
    uint64_t max_layer_entries = 1'000'000;  // entries of any kind in one layer
    uint64_t max_disk_entries = 10'000;      // files and directories under /disk
    uint64_t max_file_bytes = uint64_t{1} << 40;  // one file under /disk (1 TiB)
  };

  explicit DiskTree(std::filesystem::path staging) : staging_(std::move(staging)) {}
  DiskTree(std::filesystem::path staging, Limits limits) : staging_(std::move(staging)), limits_(limits) {}

  // Applies one layer blob (its compression follows from media_type and is
  // checked against the blob's magic bytes). `label` names the layer in
  // messages.
  // The layer is read from `src` to its end (so a streamed, verified
  // download reports its digest check); a failure of the source is returned
  // as it is.
  Status ApplyLayer(ByteSource& src, std::string_view media_type, const std::string& label);

  // The disk: `path` when given (absolute, inside the image), else the only
  // regular file under /disk (or /disk itself when it is a file).
  Result<File> FindDisk(const std::string& path) const;

 private:
  struct Entry {
    bool is_dir = false;
    std::filesystem::path staged;  // regular files
    uint64_t size = 0;
    int layer = 0;
  };
  // Drops `path` and everything below it that lower layers (layer <
  // below_layer) put there.
  void RemoveTree(const std::string& path, int below_layer);
  Status ReadEntries(archive* a, const std::string& label);
  Status StageFile(archive* a, archive_entry* e, const std::string& path, const std::string& label);
  std::filesystem::path staging_;
  Limits limits_;
  std::map<std::string, Entry> entries_;  // "disk", "disk/a.img", ...
  int layer_ = 0;
  int next_file_ = 0;
};

// Describing a disk without pulling it (inspect --disk): the layers are
// read from the top one down, and each entry is read with the rules a pull
// applies bottom-up (OCI image-spec layers): an upper layer wins, a
// `.wh.NAME` entry deletes NAME and what is below it in lower layers, a
// `.wh..wh..opq` entry empties its directory of lower layers' contents, a
// file replaces a lower file or directory at its path (and everything
// below it), a directory replaces a lower file. Entries are checked as a
// pull checks them (no absolute or ".." paths; no links or devices under
// /disk). Nothing is written anywhere.
//
//   DiskPeek peek("", 64 << 10);
//   for (each layer, top first) {
//     RETURN_IF_ERROR(peek.ReadLayer(layer_bytes, media_type, label, /*stop_at_disk=*/big));
//     if (peek.found()) break;
//   }
//
// The disk is the topmost file under /disk (or at `path`) that no upper
// layer hides. Every layer above the disk's layer is read to its end, so
// its digest is checked by the source (a streamed, verified download) and
// a failure of the source is returned as it is. The disk's own layer is
// read to its end too unless `stop_at_disk`: then reading stops after the
// disk's first `head_bytes` (a big layer is not downloaded to describe
// it), and those bytes are not verified (verified() is false); nor are the
// entries after the disk in that layer seen.
//
// Layers below the disk's layer are not read (the topmost visible file is
// the one a pull uses); a pull may still refuse the image for what they
// hold (a hostile entry, or without `path` a second visible file under
// /disk).
struct DiskHead {
  std::string image_path;  // "/disk/fedora25.qcow2"
  uint64_t size = 0;       // the file's size in the tar
  std::string head;        // its first bytes (up to head_bytes)
};

class DiskPeek {
 public:
  // `path`: "/disk/x.qcow2", or "" for the only file under /disk.
  DiskPeek(const std::string& path, size_t head_bytes);

  // Reads the next layer down (the top layer first). Errors: the layer is
  // not a tar layer or is hostile; without `path`, it holds several files
  // under /disk that no upper layer hides (as a pull says it).
  Status ReadLayer(ByteSource& src, std::string_view media_type, const std::string& label, bool stop_at_disk);

  bool found() const { return disk_.has_value(); }
  const DiskHead& disk() const { return *disk_; }
  // Every byte of the layers read, the disk's included, was checked
  // against its layer's digest (false after a read stopped at the disk).
  bool verified() const { return verified_; }

 private:
  // Whether a lower layer's entry at `p` is hidden by the layers read.
  bool Hidden(const std::string& p, bool is_file) const;

  std::string wanted_;  // "disk/x.qcow2", or ""
  size_t head_bytes_;
  DiskTree::Limits limits_;
  std::set<std::string> gone_;  // whited out, opaque, or replaced by a file: it and all below
  std::set<std::string> dirs_;  // a directory: hides a lower file at the same path
  std::optional<DiskHead> disk_;
  bool verified_ = false;
};

}  // namespace regdisk::store
