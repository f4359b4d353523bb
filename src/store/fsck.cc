// Store::Check (regdisk fsck): re-verifies what the store holds.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <openssl/evp.h>

#include <algorithm>
#include <map>
#include <set>

#include "disk/format.h"
#include "state/sqlite.h"
#include "store/chunk_table.h"
#include "store/db.h"
#include "store/store.h"
#include "util/bytes.h"
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

// A chunked disk's chunks as the chunk table records them: every non-zero
// chunk's SHA-256, by chunk number.
Result<std::map<uint64_t, ChunkTable::Sha256>> HashChunks(const fs::path& p, int shift) {
  ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(p, O_RDONLY | O_NOFOLLOW));
  std::map<uint64_t, ChunkTable::Sha256> out;
  std::string buf(size_t{1} << shift, '\0');
  for (uint64_t k = 0;; ++k) {
    size_t got = 0;
    while (got < buf.size()) {
      const ssize_t n = ::pread(fd.get(), buf.data() + got, buf.size() - got, static_cast<off_t>((k << shift) + got));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return ErrnoStatus("reading " + p.string());
      if (n == 0) break;
      got += static_cast<size_t>(n);
    }
    if (got == 0) break;
    if (AllZero(buf.data(), got)) continue;
    ChunkTable::Sha256 sum;
    EVP_Digest(buf.data(), got, sum.data(), nullptr, EVP_sha256(), nullptr);
    out[k] = sum;
    if (got < buf.size()) break;
  }
  return out;
}

}  // namespace

bool Store::RemoveBrokenDisk(const fs::path& dir, Problem* p) {
  auto unused = FileLock::TryAcquire(UseLockPath(dir));
  if (!unused.ok()) {
    p->what += " (" + unused.status().message() + ")";
    return false;
  }
  if (!*unused) {
    p->what += " (a running VM uses it; stop the VM, then repair again)";
    return false;
  }
  const fs::path trash = root_ / "tmp" / ("broken-" + dir.filename().string());
  RemoveAll(trash);
  if (::rename(dir.c_str(), trash.c_str()) != 0) return false;
  RemoveAll(trash);
  p->repaired = true;
  return true;
}

void Store::CheckChunkTable(bool repair, std::set<std::string>* broken, std::vector<Problem>* out) {
  std::error_code ec;
  // The chunked disks (their record names a chunk size), broken ones apart.
  struct Chunked {
    std::string file;
    int shift = 0;
  };
  std::map<std::string, Chunked> chunked;
  for (const auto& e : fs::directory_iterator(root_ / "disks", ec)) {
    const std::string dir = e.path().filename().string();
    if (broken->count(dir)) continue;
    auto text = ReadFileCapped(e.path() / "meta.json", kMaxMetaBytes);
    if (!text.ok()) continue;
    json m = json::parse(*text, nullptr, false);
    if (!m.is_object() || !m["chunkSize"].is_number_unsigned() || !m["file"].is_string()) continue;
    const uint64_t size = m["chunkSize"].get<uint64_t>();
    int shift = 0;
    while (shift < 63 && (uint64_t{1} << shift) < size) ++shift;
    if ((uint64_t{1} << shift) != size || shift < oci::chunked::kMinChunkShift || shift > oci::chunked::kMaxChunkShift) {
      continue;
    }
    chunked[dir] = Chunked{m["file"].get<std::string>(), shift};
  }
  // CheckDatabase opened it (setting aside a damaged one) before.
  auto table = ChunkTable::Open(root_);
  if (!table.ok()) {
    out->push_back(Problem{"the store's chunk table cannot be read: " + table.status().message(), false});
    return;
  }
  auto recorded = table->Disks();
  if (!recorded.ok()) {
    out->push_back(Problem{"the store's chunk table cannot be read: " + recorded.status().message(), false});
    return;
  }
  for (const auto& [dir, shift] : *recorded) {
    if (chunked.count(dir)) continue;
    if (broken->count(dir)) {  // reported with its disk
      if (repair) (void)table->RemoveDisk(dir);
      continue;
    }
    Problem p{"chunk table: it lists the chunks of " + Printable(dir, 100) + ", which is not a chunked disk of the store",
              false};
    if (repair) p.repaired = table->RemoveDisk(dir).ok();
    out->push_back(std::move(p));
  }
  for (const auto& [dir, c] : chunked) {
    const fs::path path = root_ / "disks" / dir;
    auto hashed = HashChunks(path / c.file, c.shift);
    if (!hashed.ok()) continue;  // CheckDisk reported the file
    auto it = recorded->find(dir);
    if (it == recorded->end() || it->second != c.shift) {
      // A pull killed between its commit and its rows: the disk passed
      // every check when it was committed, so its chunks are recorded as
      // they are.
      Problem p{"chunk table: the chunked disk " + Printable(dir, 100) + " is not listed (repair records its chunks)", false};
      if (repair) {
        oci::ChunkIndex idx;
        idx.chunk_shift = c.shift;
        struct stat st;
        if (::stat((path / c.file).c_str(), &st) == 0) idx.disk_size = static_cast<uint64_t>(st.st_size);
        idx.chunks.resize(oci::ChunkCount(idx.disk_size, c.shift));
        for (auto& e : idx.chunks) e.zero = true;
        for (const auto& [k, sum] : *hashed) {
          if (k < idx.chunks.size()) idx.chunks[k] = oci::ChunkEntry{0, 0, false, sum};
        }
        p.repaired = table->AddDisk(dir, c.file, idx).ok();
      }
      out->push_back(std::move(p));
      continue;
    }
    // Listed: the disk must still hold the chunks it was pulled with.
    auto rows = table->DiskChunks(dir);
    if (!rows.ok() || *rows == *hashed) continue;
    std::string wrong = "its content no longer matches the chunk digests it was pulled with";
    for (const auto& [k, sum] : *rows) {
      auto h = hashed->find(k);
      if (h == hashed->end() || h->second != sum) {
        wrong = "its chunk " + std::to_string(k) + " no longer hashes to the digest it was pulled with";
        break;
      }
    }
    broken->insert(dir);
    Problem p{"disk " + Printable(dir, 100) + ": " + wrong, false};
    if (repair && RemoveBrokenDisk(path, &p)) (void)table->RemoveDisk(dir);
    out->push_back(std::move(p));
  }
}

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

namespace {

// Renames `from` to the first of TO, TO.1, TO.2... that does not exist.
Result<fs::path> MoveAside(const fs::path& from, const fs::path& to) {
  std::error_code ec;
  fs::path target = to;
  for (int i = 1; fs::exists(target, ec); ++i) target = to.string() + "." + std::to_string(i);
  if (::rename(from.c_str(), target.c_str()) != 0) return ErrnoStatus("renaming " + from.string());
  return target;
}

}  // namespace

Result<bool> Store::CheckDatabase(bool repair, std::vector<Problem>* out) {
  const fs::path db = root_ / "store.db";
  for (;;) {
    auto opened = OpenStoreDb(root_);
    if (opened.ok()) return true;
    const Status& why = opened.status();
    if (Status legacy = CheckLegacyRefs(root_); !legacy.ok()) {
      // A refs.json that cannot be read now (permissions, I/O) is said and
      // left alone: its names may be fine.
      if (legacy.code() != Code::kDataLoss) {
        out->push_back(Problem{legacy.message(), false});
        return false;
      }
      // One that cannot be imported: its names are lost.
      Problem p{legacy.message(), false};
      if (repair) {
        ASSIGN_OR_RETURN(fs::path to, MoveAside(root_ / "refs.json", root_ / "refs.json.damaged"));
        p = Problem{"the names file " + (root_ / "refs.json").string() + " (written by an older regdisk) was damaged; " +
                        "set aside as " + to.filename().string() + " (its names are lost: pull those images again)",
                    true};
      }
      out->push_back(std::move(p));
      if (!repair) return false;
      continue;
    }
    if (why.code() != Code::kDataLoss) {
      // Newer than this regdisk (left alone), or busy, or unreadable: said.
      out->push_back(Problem{why.message(), false});
      return false;
    }
    // Damaged: kept aside for sqlite3's .recover, and started afresh (the
    // chunk table is rebuilt from the disks; the names are lost).
    Problem p{why.message(), false};
    if (repair) {
      // Its log first: a fresh database must never find the old one's log
      // beside it (SQLite would replay it into the new file).
      std::error_code ec;
      fs::path to = root_ / "store.db.damaged";
      for (int i = 1; fs::exists(to, ec) || fs::exists(to.string() + "-wal", ec); ++i) {
        to = root_ / ("store.db.damaged." + std::to_string(i));
      }
      const fs::path wal = db.string() + "-wal";
      if (fs::exists(wal, ec) && ::rename(wal.c_str(), (to.string() + "-wal").c_str()) != 0) {
        return ErrnoStatus("renaming " + wal.string());
      }
      if (::rename(db.c_str(), to.c_str()) != 0) return ErrnoStatus("renaming " + db.string());
      fs::remove(db.string() + "-shm", ec);
      p = Problem{p.what + "; set aside as " + to.filename().string() +
                      " (its names are lost: pull those images again, or recover them with sqlite3's .recover)",
                  true};
    }
    out->push_back(std::move(p));
    if (!repair) return false;
    // One attempt: a fresh database that cannot be opened either is said.
    auto fresh = OpenStoreDb(root_);
    if (!fresh.ok()) {
      out->push_back(Problem{fresh.status().message(), false});
      return false;
    }
    return true;
  }
}

Status Store::CheckRefs(bool repair, const std::set<std::string>& broken, std::vector<Problem>* out) {
  ASSIGN_OR_RETURN(state::Db db, OpenStoreDb(root_));
  // Read and repaired in one transaction (only with `repair`: a check does
  // not hold up the pulls that go on meanwhile).
  std::optional<state::Transaction> txn;
  if (repair) {
    ASSIGN_OR_RETURN(state::Transaction t, state::Transaction::Begin(db));
    txn.emplace(std::move(t));
  }
  struct Row {
    std::string name, platform, manifest, path;
  };
  std::vector<Row> rows;
  {
    ASSIGN_OR_RETURN(state::Stmt st,
                     db.Prepare("SELECT name, platform, manifest, path FROM refs ORDER BY name, platform"));
    for (;;) {
      ASSIGN_OR_RETURN(bool row, st.Step());
      if (!row) break;
      rows.push_back(Row{st.Text(0), st.Text(1), st.Text(2), st.Text(3)});
    }
  }
  std::error_code ec;
  for (const Row& r : rows) {
    std::string wrong;
    auto d = oci::Digest::Parse(r.manifest);
    const std::string dir = d.ok() ? DiskDir(*d, r.path).filename().string() : "";
    if (!d.ok()) {
      wrong = "is not a digest";
    } else if (broken.count(dir)) {
      wrong = "points to the broken disk " + dir;
    } else if (!fs::exists(root_ / "disks" / dir, ec)) {
      wrong = "points to the disk " + dir + ", which is missing";
    }
    if (wrong.empty()) continue;
    Problem p{"name " + Printable(r.name, 200) + " (" + Printable(r.platform.empty() ? "unknown" : r.platform, 40) +
                  ") " + wrong,
              false};
    if (repair) {
      ASSIGN_OR_RETURN(state::Stmt del, db.Prepare("DELETE FROM refs WHERE name = ?1 AND platform = ?2"));
      RETURN_IF_ERROR(del.Bind(1, r.name));
      RETURN_IF_ERROR(del.Bind(2, r.platform));
      RETURN_IF_ERROR(del.Run());
      p.repaired = true;
    }
    out->push_back(std::move(p));
  }
  if (txn) RETURN_IF_ERROR(txn->Commit());
  return OkStatus();
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
    if (repair) RemoveBrokenDisk(e.path(), &p);
    out.push_back(std::move(p));
  }
  // The database (names and chunk table); a damaged one is set aside with
  // `repair`, and then rebuilt as far as the disks tell.
  ASSIGN_OR_RETURN(const bool have_db, CheckDatabase(repair, &out));
  // Chunked disks against the chunk digests they were pulled with, and the
  // chunk table against the disks (rows of removed disks go).
  if (have_db) CheckChunkTable(repair, &broken, &out);

  // Lazily-pulled disks left behind: committed, or without a record, and
  // served by no export (a fill that can resume is not a problem).
  {
    GcResult gc;
    ASSIGN_OR_RETURN(std::vector<std::string> left, CollectLazy(repair, &gc));
    for (const std::string& what : left) {
      const bool removed = std::find(gc.lazy_removed.begin(), gc.lazy_removed.end(), what) != gc.lazy_removed.end();
      out.push_back({"lazily-pulled disk lazy/" + what + ", and no export serves it (regdisk prune removes it)", removed});
    }
  }

  // Names: each must point to a disk that is there and whole.
  if (have_db) RETURN_IF_ERROR(CheckRefs(repair, broken, &out));
  return out;
}

}  // namespace regdisk::store
