#include "disk/overlay.h"

#include <fcntl.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "util/fs.h"

namespace regdisk::disk {

namespace {

constexpr uint32_t kClusterBits = 16;
constexpr uint64_t kClusterSize = uint64_t{1} << kClusterBits;
constexpr uint32_t kRefcountOrder = 4;  // 16-bit refcounts, QEMU's default
constexpr uint32_t kHeaderLength = 112;  // v3 header up to the compression type, padded
constexpr uint32_t kBackingFormatExtension = 0xe2792aca;
constexpr size_t kMaxBackingName = 1023;  // QEMU refuses longer names

void Put32(std::vector<uint8_t>& b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[at + i] = static_cast<uint8_t>(v >> (24 - 8 * i));
}
void Put64(std::vector<uint8_t>& b, size_t at, uint64_t v) {
  for (int i = 0; i < 8; ++i) b[at + i] = static_cast<uint8_t>(v >> (56 - 8 * i));
}

}  // namespace

Status CreateOverlay(const std::filesystem::path& overlay, const std::filesystem::path& backing, Format backing_format,
                     uint64_t virtual_size) {
  const std::string name = backing.string();
  if (!backing.is_absolute() || name.size() > kMaxBackingName) {
    return InvalidArgument("the backing disk path " + name + " must be absolute and at most 1023 bytes; " +
                           "choose a shorter --root");
  }
  if (virtual_size == 0 || virtual_size % 512 != 0) {
    return InvalidArgument("the disk's virtual size " + std::to_string(virtual_size) +
                           " is not a positive multiple of 512 bytes");
  }
  // Each L1 entry maps one L2 table, which maps cluster_size / 8 clusters.
  const uint64_t per_l1_entry = kClusterSize * (kClusterSize / 8);
  const uint64_t l1_entries = (virtual_size + per_l1_entry - 1) / per_l1_entry;
  const uint64_t l1_clusters = (l1_entries * 8 + kClusterSize - 1) / kClusterSize;
  const uint64_t clusters = 3 + l1_clusters;  // header, refcount table, refcount block, L1
  if (l1_entries > (32u << 20) / 8 || clusters > kClusterSize * 8 / 16) {
    return InvalidArgument("the disk's virtual size " + std::to_string(virtual_size) + " is too large for an overlay");
  }

  // Cluster 0: header, extensions, backing file name.
  const std::string format(FormatName(backing_format));
  std::vector<uint8_t> head(kClusterSize, 0);
  Put32(head, 0, 0x514649fb);  // "QFI\xfb"
  Put32(head, 4, 3);
  Put32(head, 20, kClusterBits);
  Put64(head, 24, virtual_size);
  Put32(head, 36, static_cast<uint32_t>(l1_entries));
  Put64(head, 40, 3 * kClusterSize);  // L1 table
  Put64(head, 48, 1 * kClusterSize);  // refcount table
  Put32(head, 56, 1);                 // refcount table clusters
  Put32(head, 96, kRefcountOrder);
  Put32(head, 100, kHeaderLength);
  size_t at = kHeaderLength;
  Put32(head, at, kBackingFormatExtension);
  Put32(head, at + 4, static_cast<uint32_t>(format.size()));
  std::copy(format.begin(), format.end(), head.begin() + static_cast<std::ptrdiff_t>(at + 8));
  at += 8 + (format.size() + 7) / 8 * 8;
  at += 8;  // the end-of-extensions marker: type 0, length 0
  Put64(head, 8, at);  // backing file name offset
  Put32(head, 16, static_cast<uint32_t>(name.size()));
  std::copy(name.begin(), name.end(), head.begin() + static_cast<std::ptrdiff_t>(at));
  const size_t head_used = at + name.size();

  // Cluster 1: the refcount table, pointing at the refcount block in cluster 2.
  uint8_t table[8];
  for (int i = 0; i < 8; ++i) table[i] = static_cast<uint8_t>((2 * kClusterSize) >> (56 - 8 * i));
  // Cluster 2: every metadata cluster is used once.
  std::vector<uint8_t> refcounts(clusters * 2, 0);
  for (uint64_t c = 0; c < clusters; ++c) refcounts[2 * c + 1] = 1;

  ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(overlay, O_WRONLY | O_CREAT | O_EXCL, 0600));
  auto write_at = [&](const void* data, size_t len, uint64_t off) -> Status {
    ssize_t n = ::pwrite(fd.get(), data, len, static_cast<off_t>(off));
    if (n != static_cast<ssize_t>(len)) return ErrnoStatus("writing the ephemeral disk " + overlay.string());
    return OkStatus();
  };
  Status st = write_at(head.data(), head_used, 0);
  if (st.ok()) st = write_at(table, sizeof table, kClusterSize);
  if (st.ok()) st = write_at(refcounts.data(), refcounts.size(), 2 * kClusterSize);
  // The L1 table is all zeros: the file's length makes it, as a hole.
  if (st.ok() && ::ftruncate(fd.get(), static_cast<off_t>(clusters * kClusterSize)) != 0) {
    st = ErrnoStatus("sizing the ephemeral disk " + overlay.string());
  }
  if (!st.ok()) ::unlink(overlay.c_str());
  return st;
}

}  // namespace regdisk::disk
