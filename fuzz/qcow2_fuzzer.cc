// libFuzzer target for the disk format check (disk::InspectDisk): any bytes,
// as a whole image, give a DiskInfo or an error without crashing; and the
// same bytes inside a larger file (behind a prefix, before a suffix) give
// exactly the same answer, so the check never reads outside the image.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "disk/format.h"

namespace {

using namespace regdisk;

constexpr size_t kPrefix = 4096;  // bytes before the image in the larger file
constexpr size_t kSuffix = 4096;  // and after it

// An empty memory file; aborts on failure.
int MemFile(const char* name) {
  int fd = ::memfd_create(name, MFD_CLOEXEC);
  if (fd < 0) {
    std::perror("memfd_create");
    std::abort();
  }
  return fd;
}

void Fill(int fd, const std::string& bytes) {
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, bytes.data(), bytes.size(), 0) != static_cast<ssize_t>(bytes.size())) {
    std::perror("writing the memory file");
    std::abort();
  }
}

std::string Describe(const Result<disk::DiskInfo>& r) {
  if (!r.ok()) return r.status().ToString();
  return std::string(disk::FormatName(r->format)) + " virtual_size=" + std::to_string(r->virtual_size) +
         " file_size=" + std::to_string(r->file_size) + " version=" + std::to_string(r->qcow2_version) +
         " cluster_bits=" + std::to_string(r->cluster_bits);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int alone = MemFile("regdisk-fuzz-disk");
  static const int inside = MemFile("regdisk-fuzz-layer");
  std::string image(reinterpret_cast<const char*>(data), size);
  Fill(alone, image);
  // A qcow2 magic in the suffix, to catch a read past the image's end.
  Fill(inside, std::string(kPrefix, '\xaa') + image + "QFI\xfb" + std::string(kSuffix - 4, '\xff'));
  auto a = disk::InspectDisk(alone, 0, size, "/disk/fuzz.qcow2");
  auto b = disk::InspectDisk(inside, kPrefix, size, "/disk/fuzz.qcow2");
  std::string da = Describe(a), db = Describe(b);
  if (da != db) {
    std::fprintf(stderr, "the answer depends on bytes outside the image:\n  alone:  %s\n  inside: %s\n", da.c_str(),
                 db.c_str());
    std::abort();
  }
  if (a.ok() && a->format == disk::Format::kQcow2 &&
      (a->qcow2_version < 2 || a->qcow2_version > 3 || a->cluster_bits < 9 || a->cluster_bits > 21)) {
    std::fprintf(stderr, "accepted an impossible qcow2 header: %s\n", da.c_str());
    std::abort();
  }
  return 0;
}
