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
#pragma once

#include <filesystem>
#include <map>
#include <string>
#include <string_view>

#include "util/byte_source.h"
#include "util/status.h"

struct archive;

namespace regdisk::store {

class DiskTree {
 public:
  struct File {
    std::string image_path;           // "/disk/fedora25.qcow2"
    std::filesystem::path staged;     // where its bytes are
    uint64_t size = 0;
  };

  explicit DiskTree(std::filesystem::path staging) : staging_(std::move(staging)) {}

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
  void RemoveTree(const std::string& path, int below_layer);
  Status ReadEntries(archive* a, const std::string& label);
  std::filesystem::path staging_;
  std::map<std::string, Entry> entries_;  // "disk", "disk/a.img", ...
  int layer_ = 0;
  int next_file_ = 0;
};

}  // namespace regdisk::store
