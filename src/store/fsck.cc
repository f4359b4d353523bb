// Store::Check (regdisk fsck): re-verifies what the store holds.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <set>

#include "disk/format.h"
#include "store/store.h"
#include "util/fs.h"
#include "util/log.h"
#include "util/text.h"

namespace regdisk::store {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr uint64_t kMaxMetaBytes = 1 << 20;

// The digest of a file's content, read in 1 MiB blocks.
Result<oci::Digest> DigestOf(const fs::path& p) {
  ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(p, O_RDONLY | O_NOFOLLOW));
  oci::Hasher h;
  std::string buf(1 << 20, '\0');
  for (;;) {
    ssize_t n = ::read(fd.get(), buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("reading " + p.string());
    }
    if (n == 0) break;
    h.Update(buf.data(), static_cast<size_t>(n));
  }
  return h.Finish();
}

}  // namespace

void Store::CheckBlobs(bool repair, std::vector<Problem>* out) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root_ / "blobs" / "sha256", ec)) {
    const std::string name = e.path().filename().string();
    if (name.find(".tmp-") != std::string::npos) continue;  // being written, or a leftover prune removes
    std::string wrong;
    auto want = oci::Digest::Parse("sha256:" + name);
    if (!want.ok()) {
      wrong = "is not named by a digest";
    } else if (auto got = DigestOf(e.path()); !got.ok()) {
      wrong = "cannot be read: " + got.status().message();
    } else if (*got != *want) {
      wrong = "hashes to " + got->str();
    }
    if (wrong.empty()) continue;
    Problem p{"blob " + Printable(name, 80) + " " + wrong, false};
    if (repair) p.repaired = fs::remove(e.path(), ec);
    out->push_back(std::move(p));
  }
}

std::optional<std::string> Store::CheckDisk(const fs::path& dir) const {
  auto text = ReadFileCapped(dir / "meta.json", kMaxMetaBytes);
  if (!text.ok()) return "its record meta.json cannot be read (" + text.status().message() + ")";
  json m = json::parse(*text, nullptr, false);
  if (!m.is_object() || !m["file"].is_string() || !m["manifest"].is_string() || !m["size"].is_number_unsigned() ||
      !m["format"].is_string()) {
    return std::string("its record meta.json is malformed");
  }
  auto manifest = oci::Digest::Parse(m["manifest"].get<std::string>());
  if (!manifest.ok() || dir.filename().string().rfind(manifest->hex(), 0) != 0) {
    return std::string("its record names another image than its directory does");
  }
  if (auto blob = DigestOf(BlobPath(*manifest)); !blob.ok() || *blob != *manifest) {
    return "its manifest " + manifest->Short() + " is missing or damaged";
  }
  const std::string file = m["file"].get<std::string>();
  if (file.find('/') != std::string::npos || file == "meta.json") return "its record names the file " + Printable(file);
  const fs::path disk = dir / file;
  struct stat st;
  if (::lstat(disk.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return "its disk file " + file + " is missing";
  if (static_cast<uint64_t>(st.st_size) != m["size"].get<uint64_t>()) {
    return "its disk file is " + std::to_string(st.st_size) + " bytes, the record says " +
           std::to_string(m["size"].get<uint64_t>());
  }
  if ((st.st_mode & 0222) != 0) return std::string("its disk file is writable (it must be read-only)");
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (n != file && n != "meta.json") return "it holds a file regdisk did not put there: " + Printable(n, 80);
  }
  auto fd = OpenFile(disk, O_RDONLY | O_NOFOLLOW);
  if (!fd.ok()) return "its disk file cannot be opened (" + fd.status().message() + ")";
  auto info = disk::InspectDisk(fd->get(), 0, static_cast<uint64_t>(st.st_size), file);
  if (!info.ok()) return "its disk is not a valid disk: " + info.status().message();
  if (std::string(disk::FormatName(info->format)) != m["format"].get<std::string>()) {
    return "its disk is " + std::string(disk::FormatName(info->format)) + ", the record says " +
           m["format"].get<std::string>();
  }
  return std::nullopt;
}

Result<std::vector<Problem>> Store::Check(bool repair) {
  // Shared: pulls may go on while we read. Exclusive to repair, as prune.
  ASSIGN_OR_RETURN(FileLock lock, repair ? FileLock::Acquire(root_ / "locks" / "store")
                                         : FileLock::Acquire(root_ / "locks" / "store", FileLock::Mode::kShared));
  std::vector<Problem> out;
  CheckBlobs(repair, &out);

  std::error_code ec;
  std::set<std::string> broken;  // disk directory names
  for (const auto& e : fs::directory_iterator(root_ / "disks", ec)) {
    const std::string name = e.path().filename().string();
    auto wrong = CheckDisk(e.path());
    if (!wrong) continue;
    broken.insert(name);
    Problem p{"disk " + Printable(name, 100) + ": " + *wrong, false};
    if (repair) {
      ASSIGN_OR_RETURN(std::optional<FileLock> unused, FileLock::TryAcquire(UseLockPath(e.path())));
      if (unused) {
        const fs::path trash = root_ / "tmp" / ("broken-" + name);
        RemoveAll(trash);
        if (::rename(e.path().c_str(), trash.c_str()) == 0) {
          RemoveAll(trash);
          p.repaired = true;
        }
      } else {
        p.what += " (a running VM uses it; stop the VM, then repair again)";
      }
    }
    out.push_back(std::move(p));
  }

  // Names: each must point to a disk that is there and whole.
  ASSIGN_OR_RETURN(FileLock refs_lock, FileLock::Acquire(root_ / "locks" / "refs"));
  ASSIGN_OR_RETURN(json refs, ReadRefs());
  bool refs_changed = false;
  // What is wrong with one value ("sha256:…[#path]"), or "".
  auto check = [&](const json& value) -> std::string {
    if (!value.is_string()) return "is not a digest";
    const std::string v = value.get<std::string>();
    const size_t hash = v.find('#');
    auto d = oci::Digest::Parse(v.substr(0, hash));
    if (!d.ok()) return "is not a digest";
    const std::string dir = DiskDir(*d, hash == std::string::npos ? "" : v.substr(hash + 1)).filename().string();
    if (broken.count(dir)) return "points to the broken disk " + dir;
    if (!fs::exists(root_ / "disks" / dir, ec)) return "points to the disk " + dir + ", which is missing";
    return "";
  };
  auto report = [&](const std::string& what) {
    Problem p{what, repair};
    refs_changed |= repair;
    out.push_back(std::move(p));
    return repair;  // erase it
  };
  for (auto it = refs.begin(); it != refs.end();) {
    bool erase = false;
    if (it->is_object()) {  // name -> platform -> digest
      for (auto p = it->begin(); p != it->end();) {
        std::string wrong = check(*p);
        if (!wrong.empty() && report("name " + Printable(it.key(), 200) + " (" + Printable(p.key(), 40) + ") " + wrong)) {
          p = it->erase(p);
        } else {
          ++p;
        }
      }
      erase = it->empty() && repair;
    } else {  // the form before platforms were recorded
      std::string wrong = check(*it);
      erase = !wrong.empty() && report("name " + Printable(it.key(), 200) + " " + wrong);
    }
    if (erase) {
      it = refs.erase(it);
      refs_changed = true;
    } else {
      ++it;
    }
  }
  if (refs_changed) RETURN_IF_ERROR(WriteFileAtomic(root_ / "refs.json", refs.dump(2) + "\n", 0600));
  return out;
}

}  // namespace regdisk::store
