#include "disk/format.h"

#include <fmt/core.h>
#include <unistd.h>

#include <cstring>
#include <string>

namespace regdisk::disk {

namespace {

// Field offsets in the qcow2 header (QEMU docs/interop/qcow2.txt).
constexpr size_t kQcow2V2HeaderLength = 72;
constexpr size_t kQcow2V3MinHeaderLength = 104;
constexpr int kMinClusterBits = 9;
constexpr int kMaxClusterBits = 21;
constexpr uint64_t kIncompatDirty = 1ull << 0;
constexpr uint64_t kIncompatCorrupt = 1ull << 1;
constexpr uint64_t kIncompatDataFile = 1ull << 2;
constexpr uint64_t kIncompatCompression = 1ull << 3;
constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
constexpr uint64_t kKnownIncompat =
    kIncompatDirty | kIncompatCorrupt | kIncompatDataFile | kIncompatCompression | kIncompatExtendedL2;
constexpr uint64_t kMaxVirtualSize = 1ull << 55;  // 32 PiB, far above any real disk

uint32_t Be32(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}
uint64_t Be64(const unsigned char* p) { return (uint64_t{Be32(p)} << 32) | Be32(p + 4); }

Result<std::string> ReadAt(int fd, uint64_t offset, size_t len) {
  std::string buf(len, '\0');
  size_t got = 0;
  while (got < len) {
    ssize_t n = ::pread(fd, buf.data() + got, len - got, static_cast<off_t>(offset + got));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("reading the disk image");
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  buf.resize(got);
  return buf;
}

struct Foreign {
  const char* name;      // for qemu-img -f
  const char* label;     // for people
};

// Formats QEMU knows by a signature at the start of the image.
const Foreign* DetectForeign(std::string_view head) {
  static const Foreign kVmdk{"vmdk", "VMDK"}, kVhdx{"vhdx", "VHDX"}, kVdi{"vdi", "VDI"}, kVpc{"vpc", "VHD"},
      kQed{"qed", "QED"}, kLuks{"luks", "LUKS"}, kParallels{"parallels", "Parallels"}, kBochs{"bochs", "Bochs"},
      kCloop{"cloop", "cloop"};
  auto at = [&](size_t off, std::string_view magic) { return head.size() >= off + magic.size() && head.substr(off, magic.size()) == magic; };
  if (at(0, "KDMV") || at(0, "COWD") || at(0, "# Disk DescriptorFile")) return &kVmdk;
  if (at(0, "vhdxfile")) return &kVhdx;
  if (at(0, "conectix")) return &kVpc;
  if (at(0, std::string_view("QED\0", 4))) return &kQed;
  if (at(0, std::string_view("LUKS\xba\xbe", 6))) return &kLuks;
  if (at(0, "WithoutFreeSpace") || at(0, "WithouFreSpacExt")) return &kParallels;
  if (at(0, "Bochs Virtual HD Image")) return &kBochs;
  if (at(0, "#!/bin/sh\n#V2.0 Format") || head.find("#V2.0 Format\nmodprobe cloop") != std::string_view::npos) return &kCloop;
  if (at(0x40, "\x7f\x10\xda\xbe")) return &kVdi;  // 0xbeda107f, little-endian
  return nullptr;
}

std::string Convert(std::string_view name, const char* fmt) {
  std::string base(name.substr(name.rfind('/') + 1));
  std::string stem = base.substr(0, base.rfind('.'));
  return "qemu-img convert -f " + std::string(fmt) + " -O qcow2 " + base + " " + (stem.empty() ? base : stem) + ".qcow2";
}

Status CheckQcow2(int fd, uint64_t offset, uint64_t size, std::string_view name, DiskInfo& info) {
  const std::string what = "disk " + std::string(name);
  auto bad = [&](const std::string& why) {
    return InvalidArgument(what + " is not a usable qcow2 image: " + why + "; check it with qemu-img check");
  };
  // Never past the image's end: an image may sit inside a larger file.
  ASSIGN_OR_RETURN(std::string hdr,
                   ReadAt(fd, offset, static_cast<size_t>(std::min<uint64_t>(size, kQcow2V3MinHeaderLength + 8))));
  if (hdr.size() < kQcow2V2HeaderLength) return bad("the header is truncated");
  const auto* h = reinterpret_cast<const unsigned char*>(hdr.data());
  uint32_t version = Be32(h + 4);
  if (version == 1) {
    return InvalidArgument(what + " is qcow version 1, which regdisk does not run; convert it with: " + Convert(name, "qcow"));
  }
  if (version != 2 && version != 3) return bad("version " + std::to_string(version) + " is unknown");
  info.qcow2_version = static_cast<int>(version);
  uint64_t backing_offset = Be64(h + 8);
  uint32_t cluster_bits = Be32(h + 20);
  uint64_t vsize = Be64(h + 24);
  uint32_t crypt = Be32(h + 32);
  uint32_t l1_size = Be32(h + 36);
  uint64_t l1_offset = Be64(h + 40);
  uint64_t refcount_offset = Be64(h + 48);
  uint32_t refcount_clusters = Be32(h + 56);
  uint32_t nb_snapshots = Be32(h + 60);
  uint64_t snapshots_offset = Be64(h + 64);

  if (cluster_bits < kMinClusterBits || cluster_bits > kMaxClusterBits) {
    return bad("cluster_bits " + std::to_string(cluster_bits) + " is outside 9..21");
  }
  info.cluster_bits = static_cast<int>(cluster_bits);
  const uint64_t cluster = 1ull << cluster_bits;
  if (vsize > kMaxVirtualSize) return bad("the virtual size " + std::to_string(vsize) + " is implausible");
  info.virtual_size = vsize;

  uint64_t header_length = kQcow2V2HeaderLength;
  uint64_t incompat = 0;
  if (version == 3) {
    if (hdr.size() < kQcow2V3MinHeaderLength) return bad("the version 3 header is truncated");
    incompat = Be64(h + 72);
    uint32_t refcount_order = Be32(h + 96);
    header_length = Be32(h + 100);
    if (header_length < kQcow2V3MinHeaderLength || header_length % 8 != 0 || header_length > cluster) {
      return bad("header_length " + std::to_string(header_length) + " is invalid");
    }
    if (refcount_order > 6) return bad("refcount_order " + std::to_string(refcount_order) + " is above 6");
  }
  if (header_length > size) return bad("the header is truncated");

  if (incompat & kIncompatCorrupt) {
    return InvalidArgument(what + " is marked corrupt by QEMU; repair it with qemu-img check -r all and publish it again");
  }
  if (incompat & kIncompatDataFile) {
    return InvalidArgument(what + " keeps its data in an external data file, which a registry disk cannot carry; "
                           "convert it to a self-contained image with: " + Convert(name, "qcow2"));
  }
  if (uint64_t unknown = incompat & ~kKnownIncompat) {
    return InvalidArgument(fmt::format("{} uses incompatible qcow2 features regdisk does not know (bits {:#x}); "
                                       "convert it with: {}",
                                       what, unknown, Convert(name, "qcow2")));
  }
  if (backing_offset != 0) {
    return InvalidArgument(what + " has a backing file, so it is not self-contained and could read files on the host; "
                           "flatten it with: " + Convert(name, "qcow2"));
  }
  if (crypt != 0) {
    return InvalidArgument(what + " is encrypted, which regdisk does not support; decrypt it with qemu-img convert "
                           "(giving --object secret and --image-opts) before publishing");
  }

  // Tables must lie within the image, aligned to clusters.
  auto within = [&](uint64_t off, uint64_t len, const char* table) -> Status {
    if (off % cluster != 0) return bad(std::string(table) + " is not cluster-aligned");
    if (off > size || len > size - off) return bad(std::string(table) + " lies beyond the end of the file");
    return OkStatus();
  };
  if (l1_size > (32u << 20) / 8) return bad("the L1 table is implausibly large");
  uint64_t l2_entries = cluster / 8;
  uint64_t needed_l1 = (vsize + cluster * l2_entries - 1) / (cluster * l2_entries);
  if (l1_size < needed_l1) return bad("the L1 table is too small for the virtual size");
  if (l1_size > 0) RETURN_IF_ERROR(within(l1_offset, uint64_t{l1_size} * 8, "the L1 table"));
  if (refcount_clusters == 0) return bad("the refcount table is empty");
  if (refcount_clusters > (1u << 23)) return bad("the refcount table is implausibly large");
  RETURN_IF_ERROR(within(refcount_offset, uint64_t{refcount_clusters} * cluster, "the refcount table"));
  if (nb_snapshots > 65536) return bad("it claims too many snapshots");
  if (nb_snapshots > 0) RETURN_IF_ERROR(within(snapshots_offset, 1, "the snapshot table"));
  return OkStatus();
}

}  // namespace

std::string_view FormatName(Format f) { return f == Format::kQcow2 ? "qcow2" : "raw"; }

Result<DiskInfo> InspectDisk(int fd, uint64_t offset, uint64_t size, std::string_view name) {
  DiskInfo info;
  info.file_size = size;
  ASSIGN_OR_RETURN(std::string head, ReadAt(fd, offset, static_cast<size_t>(std::min<uint64_t>(size, 4096))));
  if (head.size() >= 4 && std::memcmp(head.data(), "QFI\xfb", 4) == 0) {
    info.format = Format::kQcow2;
    RETURN_IF_ERROR(CheckQcow2(fd, offset, size, name, info));
    return info;
  }
  if (const Foreign* f = DetectForeign(head)) {
    return InvalidArgument("disk " + std::string(name) + " is in " + f->label +
                           " format; regdisk runs qcow2 and raw disks only, convert it with: " + Convert(name, f->name));
  }
  if (size == 0) return InvalidArgument("disk " + std::string(name) + " is empty");
  info.format = Format::kRaw;
  info.virtual_size = size;
  return info;
}

}  // namespace regdisk::disk
