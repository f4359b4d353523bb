// Disk format detection and validation, by reading bytes, never by trusting
// a file name. regdisk runs raw and qcow2 (versions 2 and 3) disks only, and
// checks a qcow2 header the way QEMU does before QEMU ever sees it:
//
//   ASSIGN_OR_RETURN(DiskInfo info, InspectDisk(fd, 0, size, "/disk/fedora.qcow2"));
//   // info.format, info.virtual_size
//
// Refused: other formats (named, with the qemu-img command that converts
// them), qcow2 with a backing file, an external data file, encryption, the
// corrupt bit, unknown incompatible features, or tables outside the file.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "util/status.h"

namespace regdisk::disk {

enum class Format { kRaw, kQcow2 };

std::string_view FormatName(Format f);  // "raw" | "qcow2"

struct DiskInfo {
  Format format = Format::kRaw;
  uint64_t virtual_size = 0;  // what the guest sees
  uint64_t file_size = 0;     // bytes of the image itself
  int qcow2_version = 0;      // 2 or 3 for qcow2
  int cluster_bits = 0;       // qcow2
};

// Inspects `size` bytes of `fd` starting at `offset` (an image may sit inside
// a larger file, e.g. an uncompressed layer). `name` is used in messages.
Result<DiskInfo> InspectDisk(int fd, uint64_t offset, uint64_t size, std::string_view name);

}  // namespace regdisk::disk
