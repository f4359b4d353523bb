#include "vm/cloudinit.h"

// libisofs declares struct burn_source (the image's output stream) itself
// only when libburn is not used.
#define LIBISOFS_WITHOUT_LIBBURN
#include <libisofs.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <mutex>
#include <string_view>
#include <vector>

#include "util/env.h"
#include "util/fs.h"
#include "util/text.h"

namespace regdisk::vm {

namespace fs = std::filesystem;

namespace {

constexpr char kVolumeId[] = "cidata";
// Every timestamp in the image: 2000-01-01T00:00:00Z, as seconds and as the
// 16 digits (YYYYMMDDhhmmsscc) of the volume descriptors.
constexpr time_t kTimestamp = 946684800;
constexpr char kVolumeTime[] = "2000010100000000";
// Rock Ridge attributes: root-owned, readable by root only inside the guest.
constexpr mode_t kFileMode = 0400;
constexpr mode_t kDirMode = 0555;
constexpr off_t kIsoBlock = 2048;
// Two files at their limit, meta-data and the file system's own structures.
constexpr off_t kMaxImageBytes = 2 * static_cast<off_t>(kMaxNoCloudFileBytes) + (off_t{4} << 20);

// ---- meta-data (YAML) ----

constexpr uint32_t kInvalid = 0xFFFFFFFF;

// Decodes one UTF-8 sequence at s[*i] (strictly: no overlong forms, no
// surrogates, nothing above U+10FFFF) and advances *i past it; an invalid
// byte gives kInvalid and advances by one.
uint32_t NextCodePoint(std::string_view s, size_t* i) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char b0 = byte(*i);
  if (b0 < 0x80) {
    ++*i;
    return b0;
  }
  size_t len;
  uint32_t cp;
  uint32_t min;
  if ((b0 & 0xE0) == 0xC0) {
    len = 2, cp = b0 & 0x1F, min = 0x80;
  } else if ((b0 & 0xF0) == 0xE0) {
    len = 3, cp = b0 & 0x0F, min = 0x800;
  } else if ((b0 & 0xF8) == 0xF0) {
    len = 4, cp = b0 & 0x07, min = 0x10000;
  } else {
    ++*i;
    return kInvalid;
  }
  if (*i + len > s.size()) {
    ++*i;
    return kInvalid;
  }
  for (size_t k = 1; k < len; ++k) {
    if ((byte(*i + k) & 0xC0) != 0x80) {
      ++*i;
      return kInvalid;
    }
    cp = (cp << 6) | (byte(*i + k) & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
    ++*i;
    return kInvalid;
  }
  *i += len;
  return cp;
}

bool IsValidUtf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    if (NextCodePoint(s, &i) == kInvalid) return false;
  }
  return true;
}

void AppendHex(std::string* out, uint32_t value, int digits) {
  static constexpr char kHex[] = "0123456789abcdef";
  for (int shift = 4 * (digits - 1); shift >= 0; shift -= 4) out->push_back(kHex[(value >> shift) & 0xF]);
}

// A YAML double-quoted scalar that is pure printable ASCII: YAML 1.1
// readers (PyYAML, which cloud-init uses) and 1.2 readers agree on it, and
// no character of the value can end the scalar or fold a line.
std::string YamlQuoted(std::string_view s) {
  std::string out = "\"";
  for (size_t i = 0; i < s.size();) {
    uint32_t cp = NextCodePoint(s, &i);
    if (cp == kInvalid) cp = 0xFFFD;
    switch (cp) {
      case '"':
        out += "\\\"";
        continue;
      case '\\':
        out += "\\\\";
        continue;
      case '\n':
        out += "\\n";
        continue;
      case '\t':
        out += "\\t";
        continue;
      case '\r':
        out += "\\r";
        continue;
      default:
        break;
    }
    if (cp >= 0x20 && cp < 0x7F) {
      out.push_back(static_cast<char>(cp));
    } else if (cp < 0x100) {
      out += "\\x";
      AppendHex(&out, cp, 2);
    } else if (cp < 0x10000) {
      out += "\\u";
      AppendHex(&out, cp, 4);
    } else {
      out += "\\U";
      AppendHex(&out, cp, 8);
    }
  }
  out += '"';
  return out;
}

Status CheckMetaValue(std::string_view key, std::string_view value) {
  if (value.empty())
    return InvalidArgument("cloud-init meta-data " + std::string(key) + " is empty; give the VM a " +
                           (key == "instance-id" ? "UID" : "name"));
  if (value.size() > kMaxNoCloudMetaValueBytes) {
    return InvalidArgument("cloud-init meta-data " + std::string(key) + " is " + std::to_string(value.size()) +
                           " bytes, more than the limit of " + std::to_string(kMaxNoCloudMetaValueBytes));
  }
  if (!IsValidUtf8(value)) {
    return InvalidArgument("cloud-init meta-data " + std::string(key) + " " + Printable(value) +
                           " is not valid UTF-8; use a UTF-8 name");
  }
  return OkStatus();
}

Status CheckFileSize(std::string_view file, std::string_view field, size_t size) {
  if (size <= kMaxNoCloudFileBytes) return OkStatus();
  return InvalidArgument("cloud-init " + std::string(file) + " is " + std::to_string(size) +
                         " bytes, more than the limit of " + std::to_string(kMaxNoCloudFileBytes) + " (16 MiB); make " +
                         std::string(field) + " smaller");
}

Status CheckSeed(const NoCloudSeed& seed) {
  RETURN_IF_ERROR(CheckMetaValue("instance-id", seed.instance_id));
  RETURN_IF_ERROR(CheckMetaValue("local-hostname", seed.local_hostname));
  RETURN_IF_ERROR(CheckFileSize("user-data", "userData", seed.user_data.size()));
  if (seed.network_config) {
    RETURN_IF_ERROR(CheckFileSize("network-config", "networkData", seed.network_config->size()));
  }
  return OkStatus();
}

// ---- the ISO image (libisofs) ----

struct ImageUnref {
  void operator()(IsoImage* p) const { iso_image_unref(p); }
};
struct WriteOptsFree {
  void operator()(IsoWriteOpts* p) const { iso_write_opts_free(p); }
};
struct StreamUnref {
  void operator()(IsoStream* p) const { iso_stream_unref(p); }
};
// Stops the generator thread if it is still running, joins it and frees
// the image state it holds (libburn's burn_source_free, without libburn).
struct BurnSourceFree {
  void operator()(burn_source* p) const {
    if (--p->refcount > 0) return;
    if (p->free_data) p->free_data(p);
    std::free(p);
  }
};
using ImagePtr = std::unique_ptr<IsoImage, ImageUnref>;
using WriteOptsPtr = std::unique_ptr<IsoWriteOpts, WriteOptsFree>;
using StreamPtr = std::unique_ptr<IsoStream, StreamUnref>;
using BurnSourcePtr = std::unique_ptr<burn_source, BurnSourceFree>;

Status IsoError(std::string_view what, int code) {
  const char* text = iso_error_to_msg(code);
  return Internal("making the cloud-init seed: " + std::string(what) +
                  ": libisofs: " + (text != nullptr ? text : "error " + std::to_string(code)));
}

// libisofs is initialised once per process and never finished: iso_finish()
// is global and other threads may be making a seed.
Status InitLibisofs() {
  static std::once_flag once;
  static int result = 0;
  std::call_once(once, [] {
    // bit0: leave the process's locale alone.
    result = iso_init_with_flag(1);
    // Nothing on stderr: failures come back as return codes and become a
    // Status here.
    if (result >= 0) {
      iso_set_msgs_severities(const_cast<char*>("NEVER"), const_cast<char*>("NEVER"), const_cast<char*>("libisofs"));
    }
  });
  if (result < 0) return IsoError("initialising", result);
  return OkStatus();
}

// libisofs's stream serial numbers and message queue are process-wide and
// not all synchronised: one seed at a time.
std::mutex& LibisofsMutex() {
  static std::mutex mu;
  return mu;
}

// The node's own attributes, as the write options also force them.
void SetFixedAttributes(IsoNode* node, mode_t mode) {
  iso_node_set_permissions(node, mode);
  iso_node_set_uid(node, 0);
  iso_node_set_gid(node, 0);
  iso_node_set_mtime(node, kTimestamp);
  iso_node_set_atime(node, kTimestamp);
  iso_node_set_ctime(node, kTimestamp);
}

Status AddFile(IsoDir* root, const char* name, std::string_view content) {
  // The stream owns a malloc'ed copy (and frees it); one byte at least,
  // since libisofs refuses a null buffer even for an empty file.
  auto* buf = static_cast<unsigned char*>(std::malloc(content.empty() ? 1 : content.size()));
  if (buf == nullptr) return ResourceExhausted("making the cloud-init seed: out of memory for " + std::string(name));
  if (!content.empty()) std::memcpy(buf, content.data(), content.size());
  IsoStream* raw = nullptr;
  int rc = iso_memory_stream_new(buf, content.size(), &raw);
  if (rc < 0) {
    std::free(buf);
    return IsoError(name, rc);
  }
  StreamPtr stream(raw);
  IsoFile* file = nullptr;
  rc = iso_tree_add_new_file(root, name, stream.get(), &file);
  if (rc < 0) return IsoError(name, rc);
  stream.release();  // the file holds the reference now
  SetFixedAttributes(reinterpret_cast<IsoNode*>(file), kFileMode);
  return OkStatus();
}

Result<ImagePtr> BuildImage(const NoCloudSeed& seed) {
  IsoImage* raw = nullptr;
  int rc = iso_image_new(kVolumeId, &raw);
  if (rc < 0) return IsoError("creating the image", rc);
  ImagePtr image(raw);
  iso_image_set_volume_id(image.get(), kVolumeId);
  IsoDir* root = iso_image_get_root(image.get());
  SetFixedAttributes(reinterpret_cast<IsoNode*>(root), kDirMode);
  RETURN_IF_ERROR(AddFile(root, "user-data", seed.user_data));
  RETURN_IF_ERROR(AddFile(root, "meta-data", NoCloudMetaData(seed)));
  if (seed.network_config) RETURN_IF_ERROR(AddFile(root, "network-config", *seed.network_config));
  return image;
}

Result<WriteOptsPtr> MakeWriteOpts() {
  IsoWriteOpts* raw = nullptr;
  int rc = iso_write_opts_new(&raw, 1);  // level 3, Rock Ridge
  if (rc < 0) return IsoError("creating write options", rc);
  WriteOptsPtr opts(raw);
  IsoWriteOpts* o = opts.get();
  for (int r : {iso_write_opts_set_iso_level(o, 3), iso_write_opts_set_rockridge(o, 1), iso_write_opts_set_joliet(o, 1),
                // The label as given: "cidata", not the d-characters "CIDATA".
                iso_write_opts_set_relaxed_vol_atts(o, 1),
                // Joliet names exactly "user-data", without the ".;1" that
                // ECMA-119 names carry.
                iso_write_opts_set_omit_version_numbers(o, 2), iso_write_opts_set_no_force_dots(o, 2),
                // Modes, owners and every timestamp fixed, so equal seeds give equal bytes.
                iso_write_opts_set_replace_mode(o, 2, 2, 2, 2), iso_write_opts_set_default_dir_mode(o, kDirMode),
                iso_write_opts_set_default_file_mode(o, kFileMode), iso_write_opts_set_default_uid(o, 0),
                iso_write_opts_set_default_gid(o, 0), iso_write_opts_set_dir_rec_mtime(o, 7),
                iso_write_opts_set_replace_timestamps(o, 2), iso_write_opts_set_default_timestamp(o, kTimestamp),
                iso_write_opts_set_always_gmt(o, 1),
                iso_write_opts_set_pvd_times(o, kTimestamp, kTimestamp, 0, 0, const_cast<char*>(kVolumeTime))}) {
    if (r < 0) return IsoError("setting write options", r);
  }
  return opts;
}

// Generates the image into fd. Call with LibisofsMutex held.
Status GenerateInto(const NoCloudSeed& seed, int fd, const fs::path& path) {
  ASSIGN_OR_RETURN(ImagePtr image, BuildImage(seed));
  ASSIGN_OR_RETURN(WriteOptsPtr opts, MakeWriteOpts());
  burn_source* raw = nullptr;
  int rc = iso_image_create_burn_source(image.get(), opts.get(), &raw);
  if (rc < 0) return IsoError("starting the image writer", rc);
  BurnSourcePtr source(raw);
  const off_t total = source->get_size(source.get());
  if (total <= 0 || total % kIsoBlock != 0 || total > kMaxImageBytes) {
    return Internal("making the cloud-init seed: libisofs announced an image of " + std::to_string(total) + " bytes");
  }
  // The reader must ask for no more than is left: a read past the end
  // returns end-of-file and drops the last partial chunk.
  std::vector<unsigned char> buf(32 * kIsoBlock);
  off_t done = 0;
  while (done < total) {
    const int want = static_cast<int>(std::min<off_t>(static_cast<off_t>(buf.size()), total - done));
    const int n = source->read_xt(source.get(), buf.data(), want);
    if (n != want) {
      return Internal("making the cloud-init seed: libisofs stopped after " + std::to_string(done) + " of " +
                      std::to_string(total) + " bytes");
    }
    RETURN_IF_ERROR(WriteAll(fd, std::string_view(reinterpret_cast<const char*>(buf.data()), want))
                        .Annotate("writing " + path.string()));
    done += want;
  }
  return OkStatus();
}

Status SeedExists(const fs::path& path) {
  return AlreadyExists("cloud-init seed " + path.string() + " already exists; a seed is never overwritten");
}

// Writes the image under a temp name next to `path` (mkostemp: O_CREAT|
// O_EXCL, O_CLOEXEC, mode 0600), fsyncs it and links it to `path`; the temp
// name is removed on return, whatever happened.
Status WriteAndLink(const fs::path& path, const NoCloudSeed& seed) {
  ASSIGN_OR_RETURN(PendingFile temp, PendingFile::Create(path, 0600));
  {
    std::lock_guard<std::mutex> lock(LibisofsMutex());
    RETURN_IF_ERROR(GenerateInto(seed, temp.fd(), path));
  }
  RETURN_IF_ERROR(Env::Default()->Sync(temp.fd()).Annotate("writing " + path.string()));
  // link(2), unlike rename(2), fails when `path` exists: a file that
  // appeared there meanwhile is kept.
  if (::link(temp.temp_path().c_str(), path.c_str()) != 0) {
    if (errno == EEXIST) return SeedExists(path);
    return ErrnoStatus("creating " + path.string());
  }
  return OkStatus();
}

}  // namespace

std::string NoCloudMetaData(const NoCloudSeed& seed) {
  return "instance-id: " + YamlQuoted(seed.instance_id) + "\nlocal-hostname: " + YamlQuoted(seed.local_hostname) + "\n";
}

Status WriteNoCloudSeed(const fs::path& path, const NoCloudSeed& seed) {
  RETURN_IF_ERROR(CheckSeed(seed));
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) return SeedExists(path);
  RETURN_IF_ERROR(InitLibisofs());
  RETURN_IF_ERROR(WriteAndLink(path, seed));
  // Both the new name and the removal of the temp name made durable.
  Status synced = SyncDir(path.parent_path().empty() ? fs::path(".") : path.parent_path());
  if (!synced.ok()) {
    ::unlink(path.c_str());
    return synced;
  }
  return OkStatus();
}

}  // namespace regdisk::vm
