// Describing a registry disk without pulling it (regdisk inspect --disk):
// the layers are read from the top one down, each only as far as the
// first regular file under /disk (or the file at `path`) and that file's
// first 64 KiB, and the transfer is then dropped. The disk's header is
// checked as a pull checks it (disk::InspectDisk). Nothing is written to
// the node store or anywhere else.
//
//   ASSIGN_OR_RETURN(image::ResolvedImage img, image::ResolveImage(*src, platform));
//   ASSIGN_OR_RETURN(PeekedDisk d, PeekDisk(*src, img, ""));
//
// What it reads is not verified against the layer digest (that needs the
// whole layer); a pull verifies every byte. A whiteout in an upper layer
// that removes a lower layer's disk is not seen; the pull sees it.
#pragma once

#include <cstdint>
#include <string>

#include "disk/format.h"
#include "image/copy.h"
#include "image/transport.h"
#include "util/status.h"

namespace regdisk::store {

struct PeekedDisk {
  std::string image_path;  // "/disk/fedora25.qcow2"
  disk::DiskInfo info;
  oci::Digest layer;       // the layer that holds it
  uint64_t bytes_read = 0;  // of the layer blobs, in all
};

Result<PeekedDisk> PeekDisk(image::ImageSource& src, const image::ResolvedImage& img, const std::string& path);

}  // namespace regdisk::store
