#include "store/peek.h"

#include <sys/mman.h>
#include <unistd.h>

#include <thread>

#include "store/unpack.h"
#include "util/byte_source.h"
#include "util/fs.h"
#include "util/log.h"
#include "util/text.h"

namespace regdisk::store {

namespace {

constexpr size_t kHeadBytes = 64 << 10;
// The disk's layer is read to its end, and so verified, when it is no
// larger than this; a larger one only as far as the disk's head.
constexpr int64_t kVerifiedLayerBytes = 4 << 20;

// The disk's header checked by disk::InspectDisk, which reads from an fd: a
// sparse memory file of the disk's size holding its first bytes (the
// checks read the header only, and compare offsets with the size).
Result<disk::DiskInfo> InspectHead(const DiskHead& h) {
  UniqueFd fd(::memfd_create("regdisk-disk-head", MFD_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus("creating a memory file for the disk header");
  if (::ftruncate(fd.get(), static_cast<off_t>(h.size)) != 0) return ErrnoStatus("sizing the memory file");
  RETURN_IF_ERROR(WriteAll(fd.get(), h.head));
  return disk::InspectDisk(fd.get(), 0, h.size, h.image_path);
}

}  // namespace

Result<PeekedDisk> PeekDisk(image::ImageSource& src, const image::ResolvedImage& img, const std::string& path) {
  PeekedDisk out;
  DiskPeek peek(path, kHeadBytes);
  const auto& layers = img.manifest.layers;
  for (size_t i = layers.size(); i-- > 0;) {
    const oci::Descriptor& l = layers[i];
    const std::string label = "layer " + std::to_string(i + 1) + " (" + l.digest.Short() + ")";
    BlockPipe pipe(64 << 10, 4);
    uint64_t received = 0;
    std::thread producer([&] {
      pipe.Finish(src.FetchBlob(l, [&](std::string_view chunk) {
        received += chunk.size();
        return pipe.Write(chunk);
      }));
    });
    Status st = peek.ReadLayer(pipe, l.media_type, label, /*stop_at_disk=*/l.size > kVerifiedLayerBytes);
    pipe.Cancel();  // drops the rest of the transfer, if any
    producer.join();
    out.bytes_read += received;
    log::Info("{}: read {} of {} bytes", label, received, l.size);
    RETURN_IF_ERROR(st);
    if (!peek.found()) continue;
    out.image_path = peek.disk().image_path;
    out.layer = l.digest;
    out.verified = peek.verified();
    if (!out.verified) {
      log::Info("{}: the disk's header was read without reading the layer to its end, so it is not checked against "
                "the layer's digest (a pull checks it)", label);
    }
    ASSIGN_OR_RETURN(out.info, InspectHead(peek.disk()));
    return out;
  }
  if (!path.empty()) return NotFound("the image has no file " + Printable(path) + " under /disk");
  return NotFound("the image has no file under /disk; it is not a registry disk");
}

}  // namespace regdisk::store
