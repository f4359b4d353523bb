// Describing a registry disk without pulling it (regdisk inspect --disk):
// the layers are read from the top one down (store::DiskPeek) with the
// layer rules a pull applies (later layers win, whiteouts and opaque
// directories delete), each layer above the disk's read to its end and so
// checked against its digest. The disk's own layer is read to its end too
// when it is at most 4 MiB; a larger one only up to the disk's tar entry
// and first 64 KiB, and the transfer is then dropped: those bytes are not
// checked against the layer digest (`verified` is false; a pull checks
// every byte), and what follows them in that layer is not seen. Layers
// below the disk's are not read. The disk's header is checked as a pull
// checks it (disk::InspectDisk). Nothing is written to the node store or
// anywhere else.
//
//   ASSIGN_OR_RETURN(image::ResolvedImage img, image::ResolveImage(*src, platform));
//   ASSIGN_OR_RETURN(PeekedDisk d, PeekDisk(*src, img, ""));
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
  bool verified = false;    // the disk's layer was read to its end and matched its digest
};

Result<PeekedDisk> PeekDisk(image::ImageSource& src, const image::ResolvedImage& img, const std::string& path);

}  // namespace regdisk::store
