// The store under injected faults (through the Env seam): every write of a
// pull failing with ENOSPC or EIO, every fsync failing, and a crash at
// every rename that loses whatever was not synced. After each, nothing
// half-made is visible, and the next pull succeeds with the same bytes.
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <map>
#include <mutex>

#include "harness/harness.h"
#include "image/transport.h"
#include "store/store.h"
#include "util/env.h"

namespace regdisk::testing {
namespace {

namespace fs = std::filesystem;
using Type = TarEntry::Type;

// Counts writes, syncs and renames, fails the one numbered `fail_at` of
// the chosen kind, and can "crash": cut every file written since its last
// sync back to what was synced, as a power loss may.
class FaultEnv : public EnvWrapper {
 public:
  enum class Kind { kNone, kWrite, kSync, kCrashAtRename };
  FaultEnv(Kind kind, int fail_at, int err) : EnvWrapper(Env::Default()), kind_(kind), fail_at_(fail_at), err_(err) {}

  Result<size_t> Write(int fd, const void* data, size_t len, std::optional<uint64_t> offset) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (kind_ == Kind::kWrite && ++writes_ == fail_at_) return ErrnoStatus("writing", err_);
      if (kind_ != Kind::kWrite) ++writes_;
      if (auto path = PathOf(fd); !path.empty() && !synced_.count(path)) synced_[path] = 0;
    }
    return EnvWrapper::Write(fd, data, len, offset);
  }
  Status Sync(int fd) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (kind_ == Kind::kSync && ++syncs_ == fail_at_) return ErrnoStatus("syncing", err_);
      if (kind_ != Kind::kSync) ++syncs_;
    }
    RETURN_IF_ERROR(EnvWrapper::Sync(fd));
    std::lock_guard<std::mutex> lock(mu_);
    struct stat st;
    if (auto path = PathOf(fd); !path.empty() && ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
      synced_[path] = static_cast<uint64_t>(st.st_size);
    }
    return OkStatus();
  }
  Status Rename(const fs::path& from, const fs::path& to) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (kind_ == Kind::kCrashAtRename && ++renames_ == fail_at_) {
        // The machine stops here: unsynced data is lost, nothing else runs.
        for (const auto& [path, size] : synced_) ::truncate(path.c_str(), static_cast<off_t>(size));
        return Internal("simulated crash before renaming " + from.string());
      }
      if (kind_ != Kind::kCrashAtRename) ++renames_;
      // A renamed file keeps its sync state under its new name.
      if (auto it = synced_.find(from.string()); it != synced_.end()) {
        synced_[to.string()] = it->second;
        synced_.erase(it);
      }
    }
    return EnvWrapper::Rename(from, to);
  }

  int writes() const { return writes_; }
  int syncs() const { return syncs_; }
  int renames() const { return renames_; }

 private:
  static std::string PathOf(int fd) {
    char buf[4096];
    ssize_t n = ::readlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), buf, sizeof buf - 1);
    return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
  }
  std::mutex mu_;
  Kind kind_;
  int fail_at_, err_;
  int writes_ = 0, syncs_ = 0, renames_ = 0;
  std::map<std::string, uint64_t> synced_;  // written files -> bytes known to be on disk
};

class CrashTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    // Two layers: the first puts a disk that the second whites out and
    // replaces; the disk has data, zero blocks and a tail.
    disk_ = RandomBytes(3 << 20, 5) + std::string(1 << 20, '\0') + RandomBytes(12345, 6);
    const TarEntry dir{"disk", Type::kDir, "", "", 107, 107, 0555};
    auto img = MakeImageFromLayers(
        tmp() / "layout", "v1",
        {{LayerMediaType("gzip"), MakeTar({dir, {"disk/old.img", Type::kFile, RandomBytes(1 << 20, 7)}}, "gzip")},
         {LayerMediaType("zstd"), MakeTar({{"disk/.wh.old.img", Type::kFile}, {"disk/disk.img", Type::kFile, disk_}}, "zstd")}});
    ASSERT_OK(img);
  }

  // Pulls the image into `root` with whatever Env is the default now.
  Result<store::StoredImage> Pull(const fs::path& root) {
    ASSIGN_OR_RETURN(auto name, image::ImageName::Parse("oci:" + (tmp() / "layout").string() + ":v1"));
    ASSIGN_OR_RETURN(auto src, image::OpenSource(name, registry::ClientOptions{}));
    ASSIGN_OR_RETURN(auto st, store::Store::Open(root));
    return st.Pull(*src, "disk:v1", store::PullOptions{});
  }

  // What a failed or crashed pull may leave: no name for a disk that is not
  // whole, and nothing that stops the next pull, which must give exactly
  // the disk.
  void ExpectRecovers(const fs::path& root, const std::string& what) {
    auto st = store::Store::Open(root);
    ASSERT_OK(st);
    auto found = st->Lookup("disk:v1", oci::Platform{"linux", "amd64", ""});
    ASSERT_OK(found);
    if (found->has_value()) {
      // The failure came after the commit (syncing the name's directory):
      // the name may stand, but only for the whole, verified disk.
      EXPECT_EQ(ReadFileCapped((*found)->disk_file, 8 << 20).value_or(""), disk_) << what;
    }
    auto again = Pull(root);
    ASSERT_TRUE(again.ok()) << what << ": " << again.status().ToString();
    EXPECT_EQ(ReadFileCapped(again->disk_file, 8 << 20).value(), disk_) << what;
    EXPECT_TRUE(fs::is_empty(root / "tmp")) << what;
    EXPECT_TRUE(fs::is_empty(root / "ingest")) << what;
  }

  // Up to `most` fault positions out of 1..n, spread evenly, first and last
  // included: the same every run.
  static std::vector<int> Positions(int n, int most) {
    std::vector<int> out;
    for (int i = 0; i < most && i < n; ++i) out.push_back(1 + static_cast<int>(int64_t{i} * (n - 1) / std::max(1, std::min(most, n) - 1)));
    out.erase(std::unique(out.begin(), out.end()), out.end());
    return out;
  }

  // How many writes, syncs and renames a clean pull makes.
  struct Counts {
    int writes, syncs, renames;
  };
  Counts Census() {
    FaultEnv counting(FaultEnv::Kind::kNone, 0, 0);
    {
      ScopedDefaultEnv use(&counting);
      auto r = Pull(tmp() / "census");
      EXPECT_TRUE(r.ok()) << r.status().ToString();
    }
    EXPECT_GT(counting.writes(), 10);
    EXPECT_GT(counting.syncs(), 3);
    EXPECT_GT(counting.renames(), 3);
    return {counting.writes(), counting.syncs(), counting.renames()};
  }

  std::string disk_;
};

TEST_F(CrashTest, AFailedWriteAnywhereLeavesAStoreThatRecovers) {
  const int writes = Census().writes;
  for (int err : {ENOSPC, EIO}) {
    for (int at : Positions(writes, 25)) {
      const fs::path root = tmp() / ("w" + std::to_string(err) + "-" + std::to_string(at));
      const std::string what = std::string(err == ENOSPC ? "ENOSPC" : "EIO") + " at write " + std::to_string(at);
      {
        FaultEnv faulty(FaultEnv::Kind::kWrite, at, err);
        ScopedDefaultEnv use(&faulty);
        auto r = Pull(root);
        ASSERT_FALSE(r.ok()) << what;
        if (err == ENOSPC) {
          EXPECT_EQ(r.status().code(), Code::kNoSpace) << what << ": " << r.status().ToString();
        }
      }
      ExpectRecovers(root, what);
    }
  }
}

TEST_F(CrashTest, AFailedSyncAnywhereLeavesAStoreThatRecovers) {
  const int syncs = Census().syncs;
  for (int at = 1; at <= syncs; ++at) {
    const fs::path root = tmp() / ("s" + std::to_string(at));
    {
      FaultEnv faulty(FaultEnv::Kind::kSync, at, EIO);
      ScopedDefaultEnv use(&faulty);
      ASSERT_FALSE(Pull(root).ok()) << "sync " << at;
    }
    ExpectRecovers(root, "EIO at sync " + std::to_string(at));
  }
}

TEST_F(CrashTest, ACrashAtAnyRenameLosesOnlyUnsyncedWorkAndRecovers) {
  const int renames = Census().renames;
  for (int at = 1; at <= renames; ++at) {
    const fs::path root = tmp() / ("r" + std::to_string(at));
    {
      FaultEnv crashing(FaultEnv::Kind::kCrashAtRename, at, 0);
      ScopedDefaultEnv use(&crashing);
      ASSERT_FALSE(Pull(root).ok()) << "rename " << at;
    }
    ExpectRecovers(root, "crash at rename " + std::to_string(at));
  }
}

}  // namespace
}  // namespace regdisk::testing
