#include "store/chunk_bitmap.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <bit>
#include <cstring>
#include <vector>

#include <openssl/evp.h>

#include "store/chunk_bitmap_format.h"
#include "util/fs.h"

namespace regdisk::store {

namespace fs = std::filesystem;

namespace {

void KeyBytes(const oci::Digest& key, unsigned char out[32]) {
  const std::string text = key.str();
  EVP_Digest(text.data(), text.size(), out, nullptr, EVP_sha256(), nullptr);
}

void PutBootId(char* header) {
  std::memset(header + REGDISK_CHUNKMAP_OFF_BOOT_ID, 0, REGDISK_CHUNKMAP_BOOT_ID_BYTES);
  const std::string id = CurrentBootId();
  std::memcpy(header + REGDISK_CHUNKMAP_OFF_BOOT_ID, id.data(),
              std::min<size_t>(id.size(), REGDISK_CHUNKMAP_BOOT_ID_BYTES - 1));
}

}  // namespace

std::string CurrentBootId() {
  Result<std::string> id = ReadFileCapped("/proc/sys/kernel/random/boot_id", 64);
  if (!id.ok()) return "";
  std::string s = *id;
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

Result<ChunkBitmapCounts> PeekChunkBitmap(const fs::path& path) {
  ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(path, O_RDONLY));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus("stat " + path.string());
  char header[REGDISK_CHUNKMAP_HEADER_BYTES];
  if (static_cast<size_t>(st.st_size) < sizeof header ||
      ::pread(fd.get(), header, sizeof header, 0) != static_cast<ssize_t>(sizeof header) ||
      std::memcmp(header, REGDISK_CHUNKMAP_MAGIC, REGDISK_CHUNKMAP_MAGIC_BYTES) != 0) {
    return InvalidArgument(path.string() + " is not a chunk bitmap");
  }
  ChunkBitmapCounts out;
  std::memcpy(&out.chunks, header + REGDISK_CHUNKMAP_OFF_COUNT, 8);
  const uint64_t words = (out.chunks + 63) / 64;
  if (out.chunks > (uint64_t{1} << 40) ||
      static_cast<uint64_t>(st.st_size) != REGDISK_CHUNKMAP_HEADER_BYTES + words * 8) {
    return InvalidArgument(path.string() + " is not a whole chunk bitmap");
  }
  std::vector<uint64_t> buf(std::min<uint64_t>(words, 8192));
  for (uint64_t w = 0; w < words;) {
    const uint64_t n = std::min<uint64_t>(buf.size(), words - w);
    const ssize_t got = ::pread(fd.get(), buf.data(), n * 8, static_cast<off_t>(REGDISK_CHUNKMAP_HEADER_BYTES + w * 8));
    if (got != static_cast<ssize_t>(n * 8)) return DataLoss("reading " + path.string());
    for (uint64_t i = 0; i < n; ++i) out.present += std::popcount(buf[i]);
    w += n;
  }
  return out;
}

Result<ChunkBitmap> ChunkBitmap::Open(const fs::path& path, uint64_t chunks, int chunk_shift,
                                      const oci::Digest& key) {
  if (chunk_shift < 9 || chunk_shift > 40) return InvalidArgument("chunk bitmap: chunk shift out of range");
  const uint64_t words = (chunks + 63) / 64;
  const size_t bytes = REGDISK_CHUNKMAP_HEADER_BYTES + words * 8;
  ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(path, O_RDWR | O_CREAT, 0600));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus("stat " + path.string());
  const bool empty = st.st_size == 0;

  unsigned char key_bytes[32];
  KeyBytes(key, key_bytes);
  // An existing bitmap is kept only if it is this index's, whole.
  bool fresh = static_cast<size_t>(st.st_size) != bytes;
  if (!fresh) {
    char header[REGDISK_CHUNKMAP_HEADER_BYTES];
    if (::pread(fd.get(), header, sizeof header, 0) != static_cast<ssize_t>(sizeof header)) {
      fresh = true;
    } else {
      uint32_t version = 0, shift = 0;
      uint64_t count = 0;
      std::memcpy(&version, header + REGDISK_CHUNKMAP_OFF_VERSION, 4);
      std::memcpy(&shift, header + REGDISK_CHUNKMAP_OFF_SHIFT, 4);
      std::memcpy(&count, header + REGDISK_CHUNKMAP_OFF_COUNT, 8);
      fresh = std::memcmp(header, REGDISK_CHUNKMAP_MAGIC, REGDISK_CHUNKMAP_MAGIC_BYTES) != 0 ||
              version != REGDISK_CHUNKMAP_VERSION || shift != static_cast<uint32_t>(chunk_shift) ||
              count != chunks || std::memcmp(header + REGDISK_CHUNKMAP_OFF_KEY, key_bytes, 32) != 0;
    }
  }
  if (fresh && !empty) {
    // Another process (the nbdkit plugin) may map the old bitmap: it keeps
    // the old file, whole, and the new one is renamed into place.
    const fs::path next = path.string() + ".new";
    ASSIGN_OR_RETURN(fd, OpenFile(next, O_RDWR | O_CREAT | O_TRUNC, 0600));
    if (::rename(next.c_str(), path.c_str()) != 0) return ErrnoStatus("renaming " + next.string());
  }
  if (fresh) {
    // Header last, so that a bitmap cut short by a crash reads as damaged.
    if (::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) return ErrnoStatus("sizing " + path.string());
    char header[REGDISK_CHUNKMAP_HEADER_BYTES] = {};
    std::memcpy(header, REGDISK_CHUNKMAP_MAGIC, REGDISK_CHUNKMAP_MAGIC_BYTES);
    const uint32_t version = REGDISK_CHUNKMAP_VERSION, shift = static_cast<uint32_t>(chunk_shift);
    std::memcpy(header + REGDISK_CHUNKMAP_OFF_VERSION, &version, 4);
    std::memcpy(header + REGDISK_CHUNKMAP_OFF_SHIFT, &shift, 4);
    std::memcpy(header + REGDISK_CHUNKMAP_OFF_COUNT, &chunks, 8);
    std::memcpy(header + REGDISK_CHUNKMAP_OFF_KEY, key_bytes, 32);
    PutBootId(header);
    RETURN_IF_ERROR(PWriteAll(fd.get(), std::string_view(header, sizeof header), 0).Annotate(path.string()));
  }
  void* map = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (map == MAP_FAILED) return ErrnoStatus("mapping " + path.string());
  ChunkBitmap out;
  out.path_ = path;
  out.map_ = map;
  out.map_bytes_ = bytes;
  out.chunks_ = chunks;
  out.created_ = fresh;
  if (!fresh) {
    const std::string now = CurrentBootId();
    const char* was = static_cast<const char*>(map) + REGDISK_CHUNKMAP_OFF_BOOT_ID;
    out.previous_boot_ = now.empty() || std::string(was, strnlen(was, REGDISK_CHUNKMAP_BOOT_ID_BYTES)) != now;
  }
  return out;
}

ChunkBitmap::ChunkBitmap(ChunkBitmap&& o) noexcept { *this = std::move(o); }

ChunkBitmap& ChunkBitmap::operator=(ChunkBitmap&& o) noexcept {
  if (this != &o) {
    Unmap();
    path_ = std::move(o.path_);
    map_ = std::exchange(o.map_, nullptr);
    map_bytes_ = std::exchange(o.map_bytes_, 0);
    chunks_ = std::exchange(o.chunks_, 0);
    previous_boot_ = o.previous_boot_;
    created_ = o.created_;
  }
  return *this;
}

ChunkBitmap::~ChunkBitmap() { Unmap(); }

void ChunkBitmap::Unmap() {
  if (map_ != nullptr) ::munmap(map_, map_bytes_);
  map_ = nullptr;
}

uint64_t* ChunkBitmap::words() const {
  return reinterpret_cast<uint64_t*>(static_cast<char*>(map_) + REGDISK_CHUNKMAP_HEADER_BYTES);
}

bool ChunkBitmap::Test(uint64_t k) const {
  if (k >= chunks_) return false;
  return (std::atomic_ref<uint64_t>(words()[k / 64]).load(std::memory_order_acquire) >> (k % 64)) & 1;
}

void ChunkBitmap::Set(uint64_t k) {
  if (k >= chunks_) return;
  std::atomic_ref<uint64_t>(words()[k / 64]).fetch_or(uint64_t{1} << (k % 64), std::memory_order_release);
}

void ChunkBitmap::Clear(uint64_t k) {
  if (k >= chunks_) return;
  std::atomic_ref<uint64_t>(words()[k / 64]).fetch_and(~(uint64_t{1} << (k % 64)), std::memory_order_release);
}

uint64_t ChunkBitmap::Count() const {
  uint64_t n = 0;
  for (uint64_t w = 0; w < (chunks_ + 63) / 64; ++w) {
    n += std::popcount(std::atomic_ref<uint64_t>(words()[w]).load(std::memory_order_acquire));
  }
  return n;
}

uint64_t ChunkBitmap::NextClear(uint64_t k) const {
  while (k < chunks_) {
    const uint64_t word = ~std::atomic_ref<uint64_t>(words()[k / 64]).load(std::memory_order_acquire) >> (k % 64);
    if (word != 0) return std::min(chunks_, k + std::countr_zero(word));
    k = (k / 64 + 1) * 64;
  }
  return chunks_;
}

Status ChunkBitmap::Revalidate(const std::function<bool(uint64_t)>& still_good) {
  for (uint64_t k = 0; k < chunks_; ++k) {
    if (Test(k) && !still_good(k)) Clear(k);
  }
  RETURN_IF_ERROR(Sync());
  PutBootId(static_cast<char*>(map_));
  previous_boot_ = false;
  return Sync();
}

Status ChunkBitmap::Sync() {
  if (map_ != nullptr && ::msync(map_, map_bytes_, MS_SYNC) != 0) {
    return ErrnoStatus("writing back " + path_.string());
  }
  return OkStatus();
}

}  // namespace regdisk::store
