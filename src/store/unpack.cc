#include "store/unpack.h"

#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <isa-l/igzip_lib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <vector>

#include "util/byte_source.h"
#include "util/fs.h"

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

// "./disk/x" -> "disk/x"; refuses absolute and ".." paths.
Result<std::string> CleanPath(const char* raw, const std::string& label) {
  std::string p = raw ? raw : "";
  if (!p.empty() && p.front() == '/') {
    return InvalidArgument(label + " has an entry with the absolute path \"" + p + "\"; refusing a hostile image");
  }
  std::string out;
  size_t start = 0;
  while (start <= p.size()) {
    size_t end = p.find('/', start);
    std::string comp = p.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (comp == "..") {
      return InvalidArgument(label + " has an entry \"" + p + "\" that climbs out with \"..\"; refusing a hostile image");
    }
    if (!comp.empty() && comp != ".") out += (out.empty() ? "" : "/") + comp;
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return out;
}

bool UnderDisk(const std::string& p) { return p == "disk" || p.rfind("disk/", 0) == 0; }

// Writes data at `offset`, leaving all-zero 4 KiB blocks as holes.
Status WriteSparse(int fd, const char* data, size_t len, uint64_t offset) {
  static const char kZeros[kZeroBlock] = {};
  size_t i = 0;
  while (i < len) {
    // Align blocks to file offsets so holes land on block boundaries.
    size_t in_block = kZeroBlock - static_cast<size_t>((offset + i) % kZeroBlock);
    size_t n = std::min(in_block, len - i);
    if (n == kZeroBlock && std::memcmp(data + i, kZeros, kZeroBlock) == 0) {
      i += n;
      continue;
    }
    // Gather a run of non-zero blocks into one write.
    size_t run = n;
    while (i + run < len) {
      size_t m = std::min(kZeroBlock, len - i - run);
      if (m == kZeroBlock && std::memcmp(data + i + run, kZeros, kZeroBlock) == 0) break;
      run += m;
    }
    size_t done = 0;
    while (done < run) {
      ssize_t w = ::pwrite(fd, data + i + done, run - done, static_cast<off_t>(offset + i + done));
      if (w < 0) {
        if (errno == EINTR) continue;
        return ErrnoStatus("writing the disk");
      }
      done += static_cast<size_t>(w);
    }
    i += run;
  }
  return OkStatus();
}

}  // namespace

void DiskTree::RemoveTree(const std::string& path, int below_layer) {
  for (auto it = entries_.begin(); it != entries_.end();) {
    bool inside = path.empty() || it->first == path || it->first.rfind(path + "/", 0) == 0;
    if (inside && it->second.layer < below_layer) {
      if (!it->second.staged.empty()) {
        std::error_code ec;
        fs::remove(it->second.staged, ec);
      }
      it = entries_.erase(it);
    } else {
      ++it;
    }
  }
}

Status DiskTree::ApplyLayer(ByteSource& src, std::string_view media_type, const std::string& label) {
  ++layer_;
  ASSIGN_OR_RETURN(Compression comp, FromMediaType(media_type, label));
  ASSIGN_OR_RETURN(auto first, src.Next());
  RETURN_IF_ERROR(CheckMagic(first, comp, label));
  LayerInput input(src, first);
  std::unique_ptr<archive, ArchiveCloser> a(archive_read_new());
  archive_read_support_format_tar(a.get());
  archive_read_support_filter_none(a.get());
  std::unique_ptr<IsalGzipReader> gzip;
  int opened;
  if (comp == Compression::kGzip) {
    gzip = std::make_unique<IsalGzipReader>(input);
    opened = archive_read_open(a.get(), gzip.get(), nullptr, IsalGzipReader::Read, nullptr);
  } else {
    if (comp == Compression::kZstd) archive_read_support_filter_zstd(a.get());
    opened = archive_read_open(a.get(), &input, nullptr, LayerInput::Read, nullptr);
  }
  Status st = opened == ARCHIVE_OK
                  ? ReadEntries(a.get(), label)
                  : InvalidArgument(label + " is not a readable tar archive: " + archive_error_string(a.get()));
  if (!input.error().ok()) return input.error();  // the source failed: say so, not "bad tar"
  RETURN_IF_ERROR(st);
  return input.Drain();
}

Status DiskTree::ReadEntries(archive* a, const std::string& label) {
  archive_entry* e = nullptr;
  for (;;) {
    int r = archive_read_next_header(a, &e);
    if (r == ARCHIVE_EOF) break;
    if (r < ARCHIVE_WARN) {
      return InvalidArgument(label + " is not a valid tar archive: " + archive_error_string(a));
    }
    ASSIGN_OR_RETURN(std::string path, CleanPath(archive_entry_pathname(e), label));
    if (path.empty()) continue;
    std::string dir = path.substr(0, path.rfind('/') == std::string::npos ? 0 : path.rfind('/'));
    std::string base = path.substr(path.rfind('/') == std::string::npos ? 0 : path.rfind('/') + 1);

    // Whiteouts remove what lower layers put there.
    if (base == ".wh..wh..opq") {
      RemoveTree(dir, layer_);
      // The directory itself stays; only its lower contents go.
      if (!dir.empty() && UnderDisk(dir)) entries_[dir] = Entry{true, {}, 0, layer_};
      continue;
    }
    if (base.rfind(".wh.", 0) == 0) {
      std::string target = (dir.empty() ? "" : dir + "/") + base.substr(4);
      RemoveTree(target, layer_);
      continue;
    }
    // Anything placed at a path also replaces what lower layers had there.
    bool disk_related = UnderDisk(path);
    mode_t type = archive_entry_filetype(e);
    const char* hardlink = archive_entry_hardlink(e);
    if (!disk_related) continue;  // only /disk is materialised

    if (hardlink != nullptr) {
      return InvalidArgument(label + " has a hard link at /" + path + " (to " + hardlink +
                             "); links under /disk are refused");
    }
    if (type == AE_IFLNK) {
      const char* target = archive_entry_symlink(e);
      return InvalidArgument(label + " has a symlink at /" + path + " pointing to " + (target ? target : "?") +
                             "; links under /disk are refused, as they could expose host files to the VM");
    }
    if (type != AE_IFREG && type != AE_IFDIR) {
      return InvalidArgument(label + " has a device, FIFO or socket at /" + path + "; only regular files belong under /disk");
    }
    if (type == AE_IFDIR) {
      // A directory merges with a lower directory, but replaces a lower file.
      auto lower = entries_.find(path);
      if (lower != entries_.end() && !lower->second.is_dir) RemoveTree(path, layer_);
      entries_[path] = Entry{true, {}, 0, layer_};
      continue;
    }
    RemoveTree(path, layer_ + 1);  // a file replaces whatever was there, even in this layer
    // A regular file: stream its data into a staging file, holes kept.
    fs::path staged = staging_ / ("file-" + std::to_string(next_file_++));
    ASSIGN_OR_RETURN(UniqueFd out, OpenFile(staged, O_WRONLY | O_CREAT | O_EXCL, 0600));
    const void* buf = nullptr;
    size_t len = 0;
    la_int64_t off = 0;
    uint64_t flushed = 0;  // bytes handed to writeback
    for (;;) {
      int rr = archive_read_data_block(a, &buf, &len, &off);
      if (rr == ARCHIVE_EOF) break;
      if (rr < ARCHIVE_WARN) {
        return InvalidArgument(label + " is truncated or corrupt inside /" + path + ": " + archive_error_string(a));
      }
      RETURN_IF_ERROR(WriteSparse(out.get(), static_cast<const char*>(buf), len, static_cast<uint64_t>(off)));
      // Start writing back what is done while the rest streams in, so the
      // fsync before the commit has little left to do.
      const uint64_t end = static_cast<uint64_t>(off) + len;
      if (end >= flushed + kWritebackWindow) {
        ::sync_file_range(out.get(), static_cast<off_t>(flushed), static_cast<off_t>(end - flushed),
                          SYNC_FILE_RANGE_WRITE);
        flushed = end;
      }
    }
    uint64_t size = static_cast<uint64_t>(archive_entry_size(e));
    if (::ftruncate(out.get(), static_cast<off_t>(size)) != 0) return ErrnoStatus("sizing " + staged.string());
    entries_[path] = Entry{false, staged, size, layer_};
  }
  return OkStatus();
}

Result<DiskTree::File> DiskTree::FindDisk(const std::string& path) const {
  if (!path.empty()) {
    std::string key = path.substr(path.find_first_not_of('/') == std::string::npos ? path.size() : path.find_first_not_of('/'));
    auto it = entries_.find(key);
    if (it == entries_.end() || it->second.is_dir) {
      return NotFound("the image has no regular file at " + path);
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
  std::string list;
  for (const auto* f : files) list += (list.empty() ? "/" : ", /") + f->first;
  return InvalidArgument("the image holds several files under /disk (" + list + "); name one with --path");
}

}  // namespace regdisk::store
