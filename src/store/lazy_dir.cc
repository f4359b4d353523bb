#include "store/lazy_dir.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <ctime>

#include <nlohmann/json.hpp>

#include "store/chunk_bitmap.h"
#include "util/fs.h"

namespace regdisk::store {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr uint64_t kMaxRecordBytes = 64 << 10;

std::string NowRfc3339() {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  ::gmtime_r(&now, &utc);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return buf;
}

uint64_t UsedBytes(const fs::path& p) {
  std::error_code ec;
  uint64_t total = 0;
  struct stat st {};
  for (const auto& e : fs::recursive_directory_iterator(p, ec)) {
    if (::lstat(e.path().c_str(), &st) == 0) total += static_cast<uint64_t>(st.st_blocks) * 512;
  }
  return total;
}

}  // namespace

std::string LazyName(const oci::Digest& layer) { return layer.hex().substr(0, 24); }

fs::path LazyDirPath(const fs::path& root, const std::string& name) { return root / "lazy" / name; }

fs::path LazyLockPath(const fs::path& root, const std::string& name) { return root / "locks" / ("lazy-" + name); }
fs::path LazyReadersLockPath(const fs::path& root, const std::string& name) {
  return root / "locks" / ("lazy-" + name + ".readers");
}

Status WriteLazyRecord(const fs::path& dir, LazyRecord r) {
  if (r.created.empty()) {
    // A resumed fill keeps the time it began.
    Result<LazyRecord> was = ReadLazyRecord(dir);
    r.created = was.ok() && was->layer == r.layer && !was->created.empty() ? was->created : NowRfc3339();
  }
  const json j = {{"image", r.image},           {"layer", r.layer.str()},   {"index", r.index.str()},
                  {"imagePath", r.image_path},  {"diskSize", r.disk_size},  {"chunks", r.chunks},
                  {"created", r.created}};
  return WriteFileAtomic(dir / "lazy.json", j.dump(2) + "\n", 0600);
}

Result<LazyRecord> ReadLazyRecord(const fs::path& dir) {
  const fs::path path = dir / "lazy.json";
  ASSIGN_OR_RETURN(std::string text, ReadFileCapped(path, kMaxRecordBytes));
  const json j = json::parse(text, nullptr, false);
  auto str = [&](const char* k) -> std::optional<std::string> {
    if (!j.is_object() || !j.contains(k) || !j[k].is_string()) return std::nullopt;
    return j[k].get<std::string>();
  };
  auto num = [&](const char* k) -> std::optional<uint64_t> {
    if (!j.is_object() || !j.contains(k) || !j[k].is_number_unsigned()) return std::nullopt;
    return j[k].get<uint64_t>();
  };
  const auto image = str("image"), layer = str("layer"), index = str("index");
  const auto size = num("diskSize"), chunks = num("chunks");
  if (!image || !layer || !index || !size || !chunks) {
    return InvalidArgument(path.string() + " is not a lazily-pulled disk's record; regdisk prune removes the directory");
  }
  LazyRecord r;
  r.image = *image;
  ASSIGN_OR_RETURN(r.layer, oci::Digest::Parse(*layer));
  ASSIGN_OR_RETURN(r.index, oci::Digest::Parse(*index));
  r.image_path = str("imagePath").value_or("");
  r.disk_size = *size;
  r.chunks = *chunks;
  r.created = str("created").value_or("");
  return r;
}

namespace {

// Whether someone holds PATH in a way that `op` (a non-blocking flock
// operation) conflicts with; the lock, if taken, is let go at once.
Result<bool> LockHeld(const fs::path& path, int op) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) {
    if (errno == ENOENT) return false;
    return ErrnoStatus("opening " + path.string());
  }
  while (::flock(fd.get(), op | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) return true;
    if (errno != EINTR) return ErrnoStatus("locking " + path.string());
  }
  return false;
}

}  // namespace

Result<bool> LazyInUse(const fs::path& root, const std::string& name) {
  // The owner's lock is exclusive: a shared try fails only while it is
  // held. Readers share theirs: only an exclusive try sees them.
  ASSIGN_OR_RETURN(const bool served, LockHeld(LazyLockPath(root, name), LOCK_SH));
  if (served) return true;
  return LockHeld(LazyReadersLockPath(root, name), LOCK_EX);
}

int FillingDisk::Percent() const {
  if (chunks == 0) return 0;
  if (present >= chunks) return 100;
  return static_cast<int>(present * 100 / chunks);
}

Result<std::vector<FillingDisk>> ListFilling(const fs::path& root) {
  std::vector<FillingDisk> out;
  std::error_code ec;
  const fs::path lazy = root / "lazy";
  if (!fs::is_directory(lazy, ec)) return out;
  for (const auto& e : fs::directory_iterator(lazy, ec)) {
    if (!e.is_directory(ec)) continue;
    FillingDisk d;
    d.name = e.path().filename().string();
    d.dir = e.path();
    if (Result<LazyRecord> r = ReadLazyRecord(d.dir); r.ok()) d.record = std::move(*r);
    if (Result<ChunkBitmapCounts> c = PeekChunkBitmap(d.dir / "chunks.map"); c.ok()) {
      d.chunks = c->chunks;
      d.present = c->present;
    }
    ASSIGN_OR_RETURN(d.in_use, LazyInUse(root, d.name));
    d.bytes = UsedBytes(d.dir);
    out.push_back(std::move(d));
  }
  std::sort(out.begin(), out.end(), [](const FillingDisk& a, const FillingDisk& b) { return a.name < b.name; });
  return out;
}

}  // namespace regdisk::store
