// A VM's ephemeral disk: an empty qcow2 (version 3) image whose backing
// file is the store's read-only disk. Written here, in a few microseconds,
// instead of by spawning `qemu-img create` (tens of milliseconds): it is
// four clusters of metadata, of which only a few hundred bytes are not zero.
//
//   RETURN_IF_ERROR(disk::CreateOverlay("/run/vm/vda.qcow2", stored_disk, Format::kQcow2, virtual_size));
//
// The layout follows QEMU's docs/interop/qcow2.txt: cluster 0 holds the
// header, the backing format extension and the backing file name; cluster
// 1 the refcount table; cluster 2 its one refcount block (16-bit counts);
// cluster 3 on the L1 table (all zero: nothing allocated yet).
#pragma once

#include <cstdint>
#include <filesystem>

#include "disk/format.h"
#include "util/status.h"

namespace regdisk::disk {

// Creates `overlay` (it must not exist; mode 0600). `backing` must be an
// absolute path of at most 1023 bytes; `virtual_size` a multiple of 512.
Status CreateOverlay(const std::filesystem::path& overlay, const std::filesystem::path& backing, Format backing_format,
                     uint64_t virtual_size);

}  // namespace regdisk::disk
