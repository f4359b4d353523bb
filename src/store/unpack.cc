#include "store/unpack.h"

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <isa-l/igzip_lib.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <set>
#include <vector>

#include "util/byte_source.h"
#include "util/env.h"
#include "util/fs.h"
#include "util/text.h"

namespace regdisk::store {

namespace fs = std::filesystem;

namespace {

constexpr size_t kZeroBlock = 4096;
constexpr uint64_t kWritebackWindow = 32 << 20;

enum class Compression { kNone, kGzip, kZstd };

Result<Compression> FromMediaType(std::string_view mt, const std::string& label) {
  auto ends = [&](std::string_view suffix) {
    return mt.size() >= suffix.size() && mt.substr(mt.size() - suffix.size()) == suffix;
  };
  if (ends("tar+gzip") || ends("tar.gzip")) return Compression::kGzip;
  if (ends("tar+zstd")) return Compression::kZstd;
  if (ends("image.layer.v1.tar") || ends("nondistributable.v1.tar") || ends("rootfs.diff.tar")) return Compression::kNone;
  return Unimplemented(label + " has media type \"" + std::string(mt) +
                       "\", which is not a tar layer (tar, tar+gzip or tar+zstd)");
}

Status CheckMagic(std::span<const uint8_t> m, Compression c, const std::string& label) {
  bool gzip = m.size() >= 2 && m[0] == 0x1f && m[1] == 0x8b;
  bool zstd = m.size() >= 4 && m[0] == 0x28 && m[1] == 0xb5 && m[2] == 0x2f && m[3] == 0xfd;
  const char* declared = c == Compression::kGzip ? "gzip" : c == Compression::kZstd ? "zstd" : "uncompressed";
  bool ok = (c == Compression::kGzip && gzip) || (c == Compression::kZstd && zstd) ||
            (c == Compression::kNone && !gzip && !zstd);
  if (!ok) {
    return InvalidArgument(label + " is declared " + declared + " but its bytes say otherwise; the image is malformed");
  }
  return OkStatus();
}

// Reads a layer's bytes for libarchive: the first chunk (already fetched
// for the magic check) and then the rest of the source. A failure of the
// source itself (a download error, a digest mismatch) is kept, so it is
// reported as what it is rather than as a broken tar.
class LayerInput {
 public:
  LayerInput(ByteSource& src, std::span<const uint8_t> first) : src_(src), first_(first) {}

  Result<std::span<const uint8_t>> Next() {
    if (!first_.empty()) {
      auto out = first_;
      first_ = {};
      return out;
    }
    if (ended_) return std::span<const uint8_t>();
    auto r = src_.Next();
    if (!r.ok()) {
      error_ = r.status();
      return r;
    }
    ended_ = r->empty();
    return r;
  }

  // Reads whatever libarchive left (tar padding, the end of the gzip
  // stream), so the source reaches its end and is verified.
  Status Drain() {
    for (;;) {
      ASSIGN_OR_RETURN(auto chunk, Next());
      if (chunk.empty()) return OkStatus();
    }
  }

  const Status& error() const { return error_; }

  static la_ssize_t Read(archive* a, void* user, const void** buf) {
    auto* self = static_cast<LayerInput*>(user);
    auto r = self->Next();
    if (!r.ok()) {
      archive_set_error(a, EIO, "%s", r.status().message().c_str());
      return -1;
    }
    *buf = r->data();
    return static_cast<la_ssize_t>(r->size());
  }

 private:
  ByteSource& src_;
  std::span<const uint8_t> first_;
  bool ended_ = false;
  Status error_;
};

// Inflates a gzip layer with isa-l (several times faster than zlib on this
// data) and hands the tar stream to libarchive through a read callback.
// Concatenated gzip members (as pigz and some registries produce) are read
// one after another.
class IsalGzipReader {
 public:
  explicit IsalGzipReader(LayerInput& in) : in_(in), out_(1 << 20) { Reset(); }

  static la_ssize_t Read(archive* a, void* user, const void** buf) {
    return static_cast<IsalGzipReader*>(user)->Next(a, buf);
  }

 private:
  void Reset() {
    isal_inflate_init(&st_);
    st_.crc_flag = ISAL_GZIP;
  }

  la_ssize_t Next(archive* a, const void** buf) {
    for (;;) {
      if (st_.avail_in == 0 && !eof_) {
        auto r = in_.Next();
        if (!r.ok()) {
          archive_set_error(a, EIO, "%s", r.status().message().c_str());
          return -1;
        }
        eof_ = r->empty();
        st_.next_in = const_cast<uint8_t*>(r->data());
        st_.avail_in = static_cast<uint32_t>(r->size());
      }
      if (st_.block_state == ISAL_BLOCK_FINISH) {
        if (st_.avail_in == 0 && eof_) return 0;  // the end of the last member
        uint8_t* next = st_.next_in;
        uint32_t left = st_.avail_in;
        Reset();  // another member follows
        st_.next_in = next;
        st_.avail_in = left;
        if (left == 0) continue;
      }
      st_.next_out = out_.data();
      st_.avail_out = static_cast<uint32_t>(out_.size());
      int rc = isal_inflate(&st_);
      if (rc != ISAL_DECOMP_OK && rc != ISAL_END_INPUT) {
        archive_set_error(a, EINVAL, "the gzip stream is corrupt (isa-l error %d)", rc);
        return -1;
      }
      size_t produced = out_.size() - st_.avail_out;
      if (produced > 0) {
        *buf = out_.data();
        return static_cast<la_ssize_t>(produced);
      }
      if (eof_ && st_.avail_in == 0 && st_.block_state != ISAL_BLOCK_FINISH) {
        archive_set_error(a, EINVAL, "the gzip stream ends early");
        return -1;
      }
    }
  }

  LayerInput& in_;
  std::vector<uint8_t> out_;
  inflate_state st_{};
  bool eof_ = false;
};

struct ArchiveCloser {
  void operator()(archive* a) const { archive_read_free(a); }
};

// libarchive reading a layer's tar stream from `input`: gzip inflated by
// isa-l, zstd by libarchive, plain as it is. libarchive keeps pointers into
// this object and `input`, so neither may move while it lives.
class LayerArchive {
 public:
  LayerArchive(LayerInput& input, Compression comp) : a_(archive_read_new()) {
    archive_read_support_format_tar(a_.get());
    archive_read_support_filter_none(a_.get());
    if (comp == Compression::kGzip) {
      gzip_ = std::make_unique<IsalGzipReader>(input);
      opened_ = archive_read_open(a_.get(), gzip_.get(), nullptr, IsalGzipReader::Read, nullptr);
    } else {
      if (comp == Compression::kZstd) archive_read_support_filter_zstd(a_.get());
      opened_ = archive_read_open(a_.get(), &input, nullptr, LayerInput::Read, nullptr);
    }
  }
  LayerArchive(const LayerArchive&) = delete;
  LayerArchive& operator=(const LayerArchive&) = delete;

  bool opened() const { return opened_ == ARCHIVE_OK; }
  archive* get() const { return a_.get(); }

 private:
  std::unique_ptr<archive, ArchiveCloser> a_;
  std::unique_ptr<IsalGzipReader> gzip_;
  int opened_ = ARCHIVE_FATAL;
};

// "./disk/x" -> "disk/x"; refuses absolute and ".." paths.
Result<std::string> CleanPath(const char* raw, const std::string& label) {
  std::string p = raw ? raw : "";
  if (!p.empty() && p.front() == '/') {
    return InvalidArgument(label + " has an entry with the absolute path " + Printable(p) + "; refusing a hostile image");
  }
  std::string out;
  size_t start = 0;
  while (start <= p.size()) {
    size_t end = p.find('/', start);
    std::string comp = p.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (comp == "..") {
      return InvalidArgument(label + " has an entry " + Printable(p) + " that climbs out with \"..\"; refusing a hostile image");
    }
    if (!comp.empty() && comp != ".") out += (out.empty() ? "" : "/") + comp;
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return out;
}

// libarchive's message for the last error; it may have none (a header cut
// short can fail with a null string).
std::string ArchiveError(archive* a) {
  const char* msg = archive_error_string(a);
  return msg ? PrintableLine(msg, 200) : "libarchive gave no reason";
}

bool UnderDisk(const std::string& p) { return p == "disk" || p.rfind("disk/", 0) == 0; }

// A layer's tar entry as the layer rules read it: outside /disk only
// whiteouts matter; under /disk only directories and regular files are
// accepted (links, devices, FIFOs and sockets refuse the image).
struct LayerEntry {
  enum class Kind { kIgnored, kWhiteout, kOpaque, kDir, kFile };
  Kind kind = Kind::kIgnored;
  std::string path;  // cleaned: "disk/a.img"; a whiteout's target; an opaque directory ("" for the root)
};

Result<LayerEntry> ClassifyEntry(archive_entry* e, const std::string& label) {
  ASSIGN_OR_RETURN(std::string path, CleanPath(archive_entry_pathname(e), label));
  if (path.empty()) return LayerEntry{};
  const size_t slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "" : path.substr(0, slash);
  std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  if (base == ".wh..wh..opq") return LayerEntry{LayerEntry::Kind::kOpaque, dir};
  if (base.rfind(".wh.", 0) == 0) {
    return LayerEntry{LayerEntry::Kind::kWhiteout, (dir.empty() ? "" : dir + "/") + base.substr(4)};
  }
  if (!UnderDisk(path)) return LayerEntry{};  // only /disk is materialised
  const mode_t type = archive_entry_filetype(e);
  if (const char* hardlink = archive_entry_hardlink(e)) {
    return InvalidArgument(label + " has a hard link at " + Printable("/" + path) + " (to " + Printable(hardlink) +
                           "); links under /disk are refused");
  }
  if (type == AE_IFLNK) {
    const char* target = archive_entry_symlink(e);
    return InvalidArgument(label + " has a symlink at " + Printable("/" + path) + " pointing to " +
                           Printable(target ? target : "?") +
                           "; links under /disk are refused, as they could expose host files to the VM");
  }
  if (type != AE_IFREG && type != AE_IFDIR) {
    return InvalidArgument(label + " has a device, FIFO or socket at " + Printable("/" + path) +
                           "; only regular files belong under /disk");
  }
  return LayerEntry{type == AE_IFDIR ? LayerEntry::Kind::kDir : LayerEntry::Kind::kFile, std::move(path)};
}

// "/disk/x" -> "disk/x".
std::string StripLeadingSlashes(const std::string& p) {
  const size_t i = p.find_first_not_of('/');
  return i == std::string::npos ? "" : p.substr(i);
}

Status TooManyDiskEntries(const std::string& label, uint64_t limit) {
  return ResourceExhausted(label + " puts more than " + std::to_string(limit) +
                           " entries under /disk, the most regdisk accepts; a registry disk holds one disk file");
}

Status TooManyEntries(const std::string& label, uint64_t limit) {
  return ResourceExhausted(label + " has more than " + std::to_string(limit) +
                           " entries, the most regdisk reads in one layer; put the disk in an image of its own");
}

// The error for several candidate disks, naming a few.
Status SeveralDisks(const std::vector<std::string>& paths) {
  std::string list;
  constexpr size_t kShown = 4;
  for (size_t i = 0; i < paths.size() && i < kShown; ++i) list += (i ? ", " : "") + Printable("/" + paths[i], 80);
  if (paths.size() > kShown) list += " and " + std::to_string(paths.size() - kShown) + " more";
  return InvalidArgument("the image holds " + std::to_string(paths.size()) + " files under /disk (" + list +
                         "); name one with --path");
}

bool AllZero(const char* p, size_t n) {
  static const char kZeros[kZeroBlock] = {};
  return n <= kZeroBlock && std::memcmp(p, kZeros, n) == 0;
}

// Writes data at `offset` of a new file, leaving every all-zero piece of a
// 4 KiB block (whole, or the part of it this call holds) as a hole: the
// file starts empty, so what is not written reads as zeros. Decompressors
// cut their output at arbitrary offsets, so partial blocks are the rule.
Status WriteSparse(int fd, const char* data, size_t len, uint64_t offset) {
  size_t i = 0;
  while (i < len) {
    // Pieces end on block boundaries of the file, so holes do too.
    auto piece = [&](size_t at) {
      return std::min(kZeroBlock - static_cast<size_t>((offset + at) % kZeroBlock), len - at);
    };
    size_t n = piece(i);
    if (AllZero(data + i, n)) {
      i += n;
      continue;
    }
    // Gather a run of pieces with data into one write.
    size_t run = n;
    while (i + run < len) {
      const size_t m = piece(i + run);
      if (AllZero(data + i + run, m)) break;
      run += m;
    }
    RETURN_IF_ERROR(PWriteAll(fd, std::string_view(data + i, run), offset + i).Annotate("writing the disk"));
    i += run;
  }
  return OkStatus();
}

// Bytes of data a tar entry carries: the sum of its sparse map when it has
// one (pax/GNU sparse files), else its size.
uint64_t DataBytes(archive_entry* e) {
  const uint64_t size = static_cast<uint64_t>(archive_entry_size(e));
  if (archive_entry_sparse_reset(e) <= 0) return size;
  uint64_t total = 0;
  la_int64_t off = 0, len = 0;
  while (archive_entry_sparse_next(e, &off, &len) == ARCHIVE_OK) total += static_cast<uint64_t>(len);
  return std::min(total, size);
}

// Free bytes for an unprivileged writer on the file system of `fd`.
uint64_t FreeBytes(int fd) {
  struct statvfs vfs;
  if (::fstatvfs(fd, &vfs) != 0) return UINT64_MAX;  // unknown: let the writes tell
  return static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
}

std::string Bytes(uint64_t n) {
  char buf[64];
  if (n >= (uint64_t{1} << 30)) {
    std::snprintf(buf, sizeof buf, "%.1f GiB", static_cast<double>(n) / (1 << 30));
  } else {
    std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(n) / (1 << 20));
  }
  return std::string(buf) + " (" + std::to_string(n) + " bytes)";
}

}  // namespace

void DiskTree::RemoveTree(const std::string& path, int below_layer) {
  auto drop = [&](std::map<std::string, Entry>::iterator it) {
    if (it->second.layer >= below_layer) return std::next(it);
    if (!it->second.staged.empty()) {
      std::error_code ec;
      fs::remove(it->second.staged, ec);
    }
    return entries_.erase(it);
  };
  // The entry itself, then the contiguous run of keys under "path/" (the
  // map is sorted, so that run starts at lower_bound and ends at the first
  // key without the prefix).
  if (!path.empty()) {
    if (auto it = entries_.find(path); it != entries_.end()) drop(it);
  }
  const std::string prefix = path.empty() ? "" : path + "/";
  for (auto it = entries_.lower_bound(prefix); it != entries_.end() && it->first.compare(0, prefix.size(), prefix) == 0;) {
    it = drop(it);
  }
}

Status DiskTree::ApplyLayer(ByteSource& src, std::string_view media_type, const std::string& label) {
  ++layer_;
  ASSIGN_OR_RETURN(Compression comp, FromMediaType(media_type, label));
  ASSIGN_OR_RETURN(auto first, src.Next());
  RETURN_IF_ERROR(CheckMagic(first, comp, label));
  LayerInput input(src, first);
  LayerArchive a(input, comp);
  Status st = a.opened()
                  ? ReadEntries(a.get(), label)
                  : InvalidArgument(label + " is not a readable tar archive: " + ArchiveError(a.get()));
  if (!input.error().ok()) return input.error();  // the source failed: say so, not "bad tar"
  RETURN_IF_ERROR(st);
  return input.Drain();
}

Status DiskTree::ReadEntries(archive* a, const std::string& label) {
  archive_entry* e = nullptr;
  std::set<std::string> whited_out;  // in this layer; "dir/" for an opaque dir
  for (uint64_t count = 1;; ++count) {
    int r = archive_read_next_header(a, &e);
    if (r == ARCHIVE_EOF) break;
    if (r < ARCHIVE_WARN) {
      return InvalidArgument(label + " is not a valid tar archive: " + ArchiveError(a));
    }
    if (count > limits_.max_layer_entries) return TooManyEntries(label, limits_.max_layer_entries);
    ASSIGN_OR_RETURN(LayerEntry entry, ClassifyEntry(e, label));
    const std::string& path = entry.path;
    switch (entry.kind) {
      case LayerEntry::Kind::kIgnored:
        break;
      // Whiteouts remove what lower layers put there. Once per path and
      // layer: a repeat would remove nothing, only walk this layer's entries.
      case LayerEntry::Kind::kOpaque:
        if (!whited_out.insert(path + "/").second) break;
        RemoveTree(path, layer_);
        // The directory itself stays; only its lower contents go.
        if (!path.empty() && UnderDisk(path)) {
          if (entries_.size() >= limits_.max_disk_entries && !entries_.count(path)) {
            return TooManyDiskEntries(label, limits_.max_disk_entries);
          }
          entries_[path] = Entry{true, {}, 0, layer_};
        }
        break;
      case LayerEntry::Kind::kWhiteout:
        if (whited_out.insert(path).second) RemoveTree(path, layer_);
        break;
      case LayerEntry::Kind::kDir: {
        if (entries_.size() >= limits_.max_disk_entries && !entries_.count(path)) {
          return TooManyDiskEntries(label, limits_.max_disk_entries);
        }
        // A directory merges with a lower directory, but replaces a lower file.
        auto lower = entries_.find(path);
        if (lower != entries_.end() && !lower->second.is_dir) RemoveTree(path, layer_);
        entries_[path] = Entry{true, {}, 0, layer_};
        break;
      }
      case LayerEntry::Kind::kFile:
        if (entries_.size() >= limits_.max_disk_entries && !entries_.count(path)) {
          return TooManyDiskEntries(label, limits_.max_disk_entries);
        }
        RemoveTree(path, layer_ + 1);  // a file replaces whatever was there, even in this layer
        RETURN_IF_ERROR(StageFile(a, e, path, label));
        break;
    }
  }
  return OkStatus();
}

// Streams a regular file's data into a new staging file, holes kept, after
// checking its size against the limit and the room left for its data.
Status DiskTree::StageFile(archive* a, archive_entry* e, const std::string& path, const std::string& label) {
  const uint64_t size = static_cast<uint64_t>(std::max<la_int64_t>(archive_entry_size(e), 0));
  const std::string shown = Printable("/" + path);
  if (size > limits_.max_file_bytes) {
    return ResourceExhausted(label + " has " + shown + " of " + Bytes(size) + ", over the maximum disk size of " +
                             Bytes(limits_.max_file_bytes) + "; raise it with --max-disk-size if the image is trusted");
  }
  fs::path staged = staging_ / ("file-" + std::to_string(next_file_++));
  ASSIGN_OR_RETURN(UniqueFd out, OpenFile(staged, O_WRONLY | O_CREAT | O_EXCL, 0600));
  // Until the entry is recorded, a failure removes the file.
  struct Unstage {
    const fs::path* path;
    ~Unstage() {
      if (path) ::unlink(path->c_str());
    }
  } unstage{&staged};
  // The room a file needs is known before writing only when its tar entry
  // maps its data (pax/GNU sparse); otherwise zero blocks become holes and
  // only the writes can tell, as ENOSPC (reported the same way).
  const bool mapped = archive_entry_sparse_count(e) > 0;
  const uint64_t needed = DataBytes(e);
  const uint64_t free = mapped ? FreeBytes(out.get()) : UINT64_MAX;
  auto no_room = [&] {
    return NoSpace("writing " + shown + " needs up to " + Bytes(needed) + " but the file system of " +
                   staging_.parent_path().string() + " has " + Bytes(FreeBytes(out.get())) +
                   " free; free space there or choose another --root");
  };
  if (needed > free) return no_room();
  const void* buf = nullptr;
  size_t len = 0;
  la_int64_t off = 0;
  uint64_t flushed = 0;  // bytes handed to writeback
  for (;;) {
    int rr = archive_read_data_block(a, &buf, &len, &off);
    if (rr == ARCHIVE_EOF) break;
    if (rr < ARCHIVE_WARN) {
      return InvalidArgument(label + " is truncated or corrupt inside " + shown + ": " + ArchiveError(a));
    }
    Status st = WriteSparse(out.get(), static_cast<const char*>(buf), len, static_cast<uint64_t>(off));
    if (st.code() == Code::kNoSpace) return no_room();
    RETURN_IF_ERROR(st);
    // Start writing back what is done while the rest streams in, so the
    // fsync before the commit has little left to do.
    const uint64_t end = static_cast<uint64_t>(off) + len;
    if (end >= flushed + kWritebackWindow) {
      ::sync_file_range(out.get(), static_cast<off_t>(flushed), static_cast<off_t>(end - flushed), SYNC_FILE_RANGE_WRITE);
      flushed = end;
    }
  }
  RETURN_IF_ERROR(Env::Default()->Truncate(out.get(), size).Annotate(staged.string()));
  entries_[path] = Entry{false, staged, size, layer_};
  unstage.path = nullptr;
  return OkStatus();
}

Result<DiskTree::File> DiskTree::FindDisk(const std::string& path) const {
  if (!path.empty()) {
    auto it = entries_.find(StripLeadingSlashes(path));
    if (it == entries_.end() || it->second.is_dir) {
      return NotFound("the image has no regular file at " + Printable(path));
    }
    return File{"/" + it->first, it->second.staged, it->second.size};
  }
  std::vector<const std::pair<const std::string, Entry>*> files;
  for (const auto& kv : entries_) {
    if (!kv.second.is_dir) files.push_back(&kv);
  }
  if (files.size() == 1) return File{"/" + files[0]->first, files[0]->second.staged, files[0]->second.size};
  if (files.empty()) {
    return NotFound("the image holds no disk: there is no regular file under /disk; add one (ADD disk.qcow2 /disk)");
  }
  std::vector<std::string> paths;
  for (const auto* f : files) paths.push_back(f->first);
  return SeveralDisks(paths);
}

DiskPeek::DiskPeek(const std::string& path, size_t head_bytes)
    : wanted_(StripLeadingSlashes(path)), head_bytes_(head_bytes) {}

bool DiskPeek::Hidden(const std::string& p, bool is_file) const {
  if (is_file && dirs_.count(p)) return true;
  if (gone_.count("")) return true;  // an opaque root
  for (size_t end = p.find('/');; end = p.find('/', end + 1)) {
    if (gone_.count(p.substr(0, end))) return true;
    if (end == std::string::npos) return false;
  }
}

Status DiskPeek::ReadLayer(ByteSource& src, std::string_view media_type, const std::string& label, bool stop_at_disk) {
  ASSIGN_OR_RETURN(Compression comp, FromMediaType(media_type, label));
  ASSIGN_OR_RETURN(auto first, src.Next());
  if (first.empty()) return InvalidArgument(label + " is empty; the image is malformed");
  RETURN_IF_ERROR(CheckMagic(first, comp, label));
  LayerInput input(src, first);
  LayerArchive a(input, comp);
  auto failed = [&](Status st) { return input.error().ok() ? st : input.error(); };  // the source's failure first
  if (!a.opened()) return failed(InvalidArgument(label + " is not a readable tar archive: " + ArchiveError(a.get())));

  // Files of this layer that no upper layer hides (and, with a path, at
  // that path); the first one's head is kept (one is the disk, several an
  // error). Within a layer, a later entry replaces an earlier one.
  std::map<std::string, DiskHead> files;
  std::vector<std::string> gone, dirs;  // this layer's effect on lower layers
  uint64_t disk_entries = 0;
  archive_entry* e = nullptr;
  for (uint64_t count = 1;; ++count) {
    int r = archive_read_next_header(a.get(), &e);
    if (r == ARCHIVE_EOF) break;
    if (r < ARCHIVE_WARN) return failed(InvalidArgument(label + " is not a valid tar archive: " + ArchiveError(a.get())));
    if (count > limits_.max_layer_entries) return TooManyEntries(label, limits_.max_layer_entries);
    ASSIGN_OR_RETURN(LayerEntry entry, ClassifyEntry(e, label));
    const std::string& p = entry.path;
    if ((entry.kind == LayerEntry::Kind::kDir || entry.kind == LayerEntry::Kind::kFile) &&
        ++disk_entries > limits_.max_disk_entries) {
      return TooManyDiskEntries(label, limits_.max_disk_entries);
    }
    switch (entry.kind) {
      case LayerEntry::Kind::kIgnored:
        continue;
      case LayerEntry::Kind::kWhiteout:
        gone.push_back(p);
        continue;
      case LayerEntry::Kind::kOpaque:
        gone.push_back(p);
        if (UnderDisk(p)) files.erase(p);  // the directory stays, as a directory (a pull does the same)
        continue;
      case LayerEntry::Kind::kDir:
        files.erase(p);
        dirs.push_back(p);
        continue;
      case LayerEntry::Kind::kFile:
        break;
    }
    // A file replaces this layer's earlier entries at its path and below.
    files.erase(p);
    for (auto it = files.lower_bound(p + "/"); it != files.end() && it->first.compare(0, p.size() + 1, p + "/") == 0;) {
      it = files.erase(it);
    }
    gone.push_back(p);
    if ((!wanted_.empty() && p != wanted_) || Hidden(p, true)) continue;
    DiskHead& h = files[p];
    h.image_path = "/" + p;
    h.size = static_cast<uint64_t>(std::max<la_int64_t>(archive_entry_size(e), 0));
    if (files.size() > 1) continue;  // several files: an error at the end, no head needed
    h.head.resize(static_cast<size_t>(std::min<uint64_t>(h.size, head_bytes_)));
    size_t got = 0;
    while (got < h.head.size()) {
      la_ssize_t n = archive_read_data(a.get(), h.head.data() + got, h.head.size() - got);
      if (n < 0) {
        return failed(InvalidArgument(label + " ends inside " + Printable(h.image_path) + ": " + ArchiveError(a.get())));
      }
      if (n == 0) break;
      got += static_cast<size_t>(n);
    }
    h.head.resize(got);
    if (stop_at_disk) {  // the rest of the layer is neither read nor verified
      disk_ = std::move(h);
      verified_ = false;
      return OkStatus();
    }
  }
  if (!input.error().ok()) return input.error();
  RETURN_IF_ERROR(input.Drain());  // to the end: the source checks the digest
  if (files.size() > 1) {
    std::vector<std::string> paths;
    for (const auto& kv : files) paths.push_back(kv.first);
    return SeveralDisks(paths);
  }
  if (files.size() == 1) {
    DiskHead& h = files.begin()->second;
    if (h.head.size() < std::min<uint64_t>(h.size, head_bytes_)) {
      // Another file took the head's place and was replaced later in the
      // layer: only a hand-made tar does this.
      return InvalidArgument(label + " lists files under /disk more than once; pull the image to use " +
                             Printable(h.image_path));
    }
    disk_ = std::move(h);
    verified_ = true;
    return OkStatus();
  }
  gone_.insert(gone.begin(), gone.end());
  dirs_.insert(dirs.begin(), dirs.end());
  return OkStatus();
}

}  // namespace regdisk::store
