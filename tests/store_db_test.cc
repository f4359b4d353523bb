// The store's database (store/db.h): names moving from refs.json into
// store.db, once, whatever crashes or runs beside it; a damaged refs.json
// or database; older and newer schemas; and names written by several
// processes at once.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "harness/harness.h"
#include "image/transport.h"
#include "state/sqlite.h"
#include "store/db.h"
#include "store/store.h"

namespace regdisk::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using Type = TarEntry::Type;
namespace fs = std::filesystem;
using json = nlohmann::json;

// Schema version 1, as released (the chunk table alone).
constexpr const char* kSchemaV1 = R"sql(
CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL);
CREATE TABLE chunk_disks (dir TEXT PRIMARY KEY, file TEXT NOT NULL, chunk_shift INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE chunks (dir TEXT NOT NULL, chunk INTEGER NOT NULL, chunk_shift INTEGER NOT NULL, digest TEXT NOT NULL,
                     PRIMARY KEY (dir, chunk)) WITHOUT ROWID;
CREATE INDEX chunks_by_digest ON chunks (chunk_shift, digest);
INSERT INTO schema_migrations VALUES (1, 0);
)sql";

class StoreDbTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    root_ = tmp() / "root";
    for (const auto& [tag, seed] : std::vector<std::pair<std::string, uint32_t>>{{"a", 1}, {"b", 2}}) {
      const std::vector<TarEntry> entries = {{"disk", Type::kDir, "", "", 107, 107, 0555},
                                             {"disk/disk.img", Type::kFile, RandomBytes(64 << 10, seed), "", 107, 107, 0444}};
      ASSERT_OK(MakeImageFromLayers(tmp() / "layout", tag, {{LayerMediaType("gzip"), MakeTar(entries, "gzip")}}));
    }
  }
  std::string Layout(const std::string& tag) const { return "oci:" + (tmp() / "layout").string() + ":" + tag; }
  // The name a pull of Layout(tag) is stored as.
  std::string Name(const std::string& tag) const { return image::ImageName::Parse(Layout(tag)).value().String(); }
  RunResult Regdisk(std::vector<std::string> args) {
    args.insert(args.begin(), {"--root", root_.string()});
    return RunRegdisk(args);
  }
  json Images() {
    RunResult r = Regdisk({"images", "-o", "json"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.exit_code == 0 ? json::parse(r.out) : json::array();
  }
  // name -> platform of each stored image, as `images` lists them.
  std::map<std::string, std::string> Names() {
    std::map<std::string, std::string> out;
    for (const auto& img : Images()) out[img["name"].get<std::string>()] = img["platform"].get<std::string>();
    return out;
  }
  // One integer from store.db, read without migrating it.
  int64_t Query(const std::string& sql) {
    auto db = state::Db::Open(root_ / "store.db");
    EXPECT_OK(db);
    if (!db.ok()) return -1;
    auto v = db->QueryInt(sql);
    EXPECT_OK(v);
    return v.ok() ? *v : -1;
  }
  void Exec(const std::string& sql) {
    auto db = state::Db::Open(root_ / "store.db");
    ASSERT_OK(db);
    ASSERT_OK(db->Exec(sql));
  }
  void RemoveDb() {
    for (const char* suffix : {"", "-wal", "-shm"}) fs::remove(root_.string() + "/store.db" + suffix);
  }
  // A store as an older regdisk left it: a and b pulled (and a once more
  // with --path), no store.db, the names in refs.json as that regdisk
  // wrote them (both of its forms), plus an entry that is not a digest.
  void MakeOldStore() {
    for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
             {"pull", "--path", "/disk/disk.img", Layout("a")}, {"pull", Layout("a")}, {"pull", Layout("b")}}) {
      RunResult r = Regdisk(args);
      ASSERT_EQ(r.exit_code, 0) << r.err;
    }
    for (const auto& img : Images()) digest_[img["name"].get<std::string>()] = img["digest"].get<std::string>();
    ASSERT_EQ(digest_.size(), 2u);
    RemoveDb();
    json refs = {{Name("a"), {{"linux/amd64", digest_[Name("a")]}}},
                 {"docker://example.com/vm/alias:1", {{"unknown", digest_[Name("a")] + "#/disk/disk.img"}}},
                 {Name("b"), digest_[Name("b")]},  // before platforms were recorded
                 {"docker://example.com/vm/junk:1", 42}};
    old_refs_ = refs.dump(2) + "\n";
    ASSERT_OK(WriteFileAtomic(root_ / "refs.json", old_refs_, 0600));
  }
  // refs.json is valid JSON but not the object an older regdisk reads
  // names from: it refuses the store instead of seeing it empty.
  bool HoldsTheMarker() const {
    auto text = ReadFileCapped(root_ / "refs.json", 1 << 20);
    if (!text.ok()) return false;
    const json j = json::parse(*text, nullptr, false);
    return !j.is_discarded() && !j.is_object();
  }
  int CountMigratedFiles() {
    int n = 0;
    for (const auto& e : fs::directory_iterator(root_)) n += e.path().filename().string().rfind("refs.json.migrated", 0) == 0;
    return n;
  }

  fs::path root_;
  std::map<std::string, std::string> digest_;  // name -> manifest digest
  std::string old_refs_;
};

TEST_F(StoreDbTest, ARefsJsonWrittenTheOldWayIsImportedOnFirstOpen) {
  MakeOldStore();
  RunResult r = Regdisk({"images", "-o", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("junk"));  // warned about, not imported
  const json images = json::parse(r.out);
  ASSERT_EQ(images.size(), 3u) << images.dump();
  EXPECT_EQ(images[0]["name"], "docker://example.com/vm/alias:1");
  EXPECT_EQ(images[0]["platform"], "linux/amd64");  // "unknown": the stored config says
  EXPECT_EQ(images[0]["disk"]["path"], "/disk/disk.img");
  EXPECT_EQ(images[0]["digest"], digest_[Name("a")]);
  EXPECT_EQ(Names(), (std::map<std::string, std::string>{{"docker://example.com/vm/alias:1", "linux/amd64"},
                                                         {Name("a"), "linux/amd64"},
                                                         {Name("b"), "linux/amd64"}}));
  // The file is kept beside, as it was; the database holds the names, and
  // refs.json is now what an older regdisk refuses as damaged (so its prune
  // finds no names and removes nothing, rather than removing every disk).
  EXPECT_TRUE(HoldsTheMarker());
  EXPECT_EQ(ReadFileCapped(root_ / "refs.json.migrated", 1 << 20).value(), old_refs_);
  EXPECT_EQ(Query("SELECT MAX(version) FROM schema_migrations"), store::StoreDbSchemaVersion());
  EXPECT_EQ(Query("SELECT COUNT(*) FROM refs"), 3);
  EXPECT_EQ(Query("SELECT COUNT(*) FROM refs WHERE platform = ''"), 0);  // resolved on import
  // Through the API too, and fsck finds nothing wrong.
  auto st = store::Store::Open(root_);
  ASSERT_OK(st);
  auto found = st->Lookup(Name("b"), oci::Platform{"linux", "amd64", ""});
  ASSERT_OK(found);
  ASSERT_TRUE(found->has_value());
  EXPECT_EQ((*found)->manifest_digest.str(), digest_[Name("b")]);
  r = Regdisk({"fsck"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  // The next pull of a name replaces its row; the rest stay.
  r = Regdisk({"pull", Layout("b")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Images().size(), 3u);
}

TEST_F(StoreDbTest, ASecondOpenIsANoOpAndACrashAfterTheCommitOnlyRenames) {
  MakeOldStore();
  const json first = Images();
  ASSERT_EQ(first.size(), 3u);
  EXPECT_EQ(Images(), first);
  EXPECT_EQ(Query("SELECT COUNT(*) FROM refs_imports"), 1);
  EXPECT_EQ(CountMigratedFiles(), 1);

  RunResult r = Regdisk({"rmi", Name("b")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // Killed after the import's commit, before the rename: the file is still
  // there. It is not imported again (b stays removed), only set aside.
  ASSERT_OK(WriteFileAtomic(root_ / "refs.json", old_refs_, 0600));
  EXPECT_EQ(Names().count(Name("b")), 0u);
  EXPECT_TRUE(HoldsTheMarker());
  EXPECT_EQ(CountMigratedFiles(), 2);
  EXPECT_EQ(Query("SELECT COUNT(*) FROM refs_imports"), 1);

  // A refs.json an older regdisk wrote since is imported: its names win.
  const json newer = {{"docker://example.com/vm/alias2:1", {{"linux/amd64", digest_[Name("a")]}}}};
  ASSERT_OK(WriteFileAtomic(root_ / "refs.json", newer.dump(), 0600));
  EXPECT_EQ(Names().count("docker://example.com/vm/alias2:1"), 1u);
  EXPECT_EQ(Query("SELECT COUNT(*) FROM refs_imports"), 2);
  EXPECT_TRUE(HoldsTheMarker());
  EXPECT_EQ(CountMigratedFiles(), 3);
}

TEST_F(StoreDbTest, ACorruptRefsJsonIsRefusedWithTheFixAndNothingChanges) {
  MakeOldStore();
  const std::string corrupt = old_refs_.substr(0, old_refs_.size() / 2);
  ASSERT_OK(WriteFileAtomic(root_ / "refs.json", corrupt, 0600));
  const size_t disks = std::distance(fs::directory_iterator(root_ / "disks"), fs::directory_iterator());
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{{"images"}, {"pull", Layout("a")}, {"rmi", Name("a")}, {"prune"}}) {
    RunResult r = Regdisk(args);
    EXPECT_EQ(r.exit_code, 1) << args[0] << ": " << r.err;
    EXPECT_THAT(r.err, HasSubstr((root_ / "refs.json").string())) << args[0];
    EXPECT_THAT(r.err, HasSubstr("regdisk fsck --repair")) << args[0];
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  EXPECT_EQ(ReadFileCapped(root_ / "refs.json", 1 << 20).value(), corrupt);
  EXPECT_FALSE(fs::exists(root_ / "store.db"));
  EXPECT_EQ(static_cast<size_t>(std::distance(fs::directory_iterator(root_ / "disks"), fs::directory_iterator())),
            disks);

  RunResult r = Regdisk({"fsck"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, HasSubstr("broken: the node store's names file " + (root_ / "refs.json").string()));
  EXPECT_EQ(ReadFileCapped(root_ / "refs.json", 1 << 20).value(), corrupt);
  r = Regdisk({"fsck", "--repair"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_THAT(r.out, HasSubstr("set aside as refs.json.damaged"));
  EXPECT_EQ(ReadFileCapped(root_ / "refs.json.damaged", 1 << 20).value(), corrupt);
  EXPECT_TRUE(Images().empty());
  r = Regdisk({"pull", Layout("a")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Images().size(), 1u);
}

TEST_F(StoreDbTest, TwoProcessesNamingImagesAtOnceLoseNone) {
  MakeOldStore();  // and both race to import it
  constexpr int kEach = 8;
  std::vector<pid_t> children;
  for (int k = 0; k < 2; ++k) {
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      Status st = [&]() -> Status {
        ASSIGN_OR_RETURN(auto name, image::ImageName::Parse(Layout(k == 0 ? "a" : "b")));
        ASSIGN_OR_RETURN(auto src, image::OpenSource(name, registry::ClientOptions{}));
        ASSIGN_OR_RETURN(store::Store s, store::Store::Open(root_));
        for (int i = 0; i < kEach; ++i) {
          RETURN_IF_ERROR(s.Pull(*src, "docker://example.com/p" + std::to_string(k) + ":" + std::to_string(i),
                                  store::PullOptions{})
                              .status());
        }
        return OkStatus();
      }();
      if (!st.ok()) std::fprintf(stderr, "child %d: %s\n", k, st.ToString().c_str());
      ::_exit(st.ok() ? 0 : 1);
    }
    children.push_back(pid);
  }
  for (pid_t pid : children) {
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  }
  const auto names = Names();
  EXPECT_EQ(names.size(), 3u + 2 * kEach);
  for (int k = 0; k < 2; ++k) {
    for (int i = 0; i < kEach; ++i) {
      EXPECT_EQ(names.count("docker://example.com/p" + std::to_string(k) + ":" + std::to_string(i)), 1u) << k << i;
    }
  }
  EXPECT_EQ(Query("SELECT COUNT(*) FROM refs_imports"), 1);
  EXPECT_TRUE(HoldsTheMarker());
  EXPECT_EQ(CountMigratedFiles(), 1);
}

TEST_F(StoreDbTest, AnOlderSchemaIsMigratedKeepingItsRowsAndANewerOneIsRefused) {
  MakeOldStore();
  // What a regdisk with the chunk table but without names in it left.
  Exec(kSchemaV1);
  Exec("INSERT INTO chunk_disks VALUES ('0000kept', 'disk.raw', 16)");
  EXPECT_EQ(Names().size(), 3u);
  EXPECT_EQ(Query("SELECT COUNT(*) FROM schema_migrations"), store::StoreDbSchemaVersion());
  EXPECT_EQ(Query("SELECT COUNT(*) FROM chunk_disks WHERE dir = '0000kept'"), 1);
  EXPECT_TRUE(HoldsTheMarker());

  // A newer regdisk's database: refused, and fsck --repair leaves it alone.
  Exec("INSERT INTO schema_migrations VALUES (99, 0)");
  RunResult r = Regdisk({"images"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("store.db: its schema version 99 is newer than this regdisk knows"));
  r = Regdisk({"fsck", "--repair"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, HasSubstr("newer than this regdisk knows"));
  EXPECT_EQ(Query("SELECT MAX(version) FROM schema_migrations"), 99);
  EXPECT_EQ(Query("SELECT COUNT(*) FROM refs"), 3);
}

TEST_F(StoreDbTest, FsckChecksTheNamesInTheDatabaseAndRepairDropsBadOnes) {
  for (const char* t : {"a", "b"}) ASSERT_EQ(Regdisk({"pull", Layout(t)}).exit_code, 0);
  Exec("INSERT INTO refs VALUES ('docker://example.com/vm/bogus:1', 'linux/amd64', 'not a digest', '')");
  Exec("INSERT INTO refs VALUES ('docker://example.com/vm/gone:1', 'linux/amd64', 'sha256:" + std::string(64, '0') +
       "', '')");
  EXPECT_EQ(Images().size(), 2u);  // neither is listed
  RunResult r = Regdisk({"fsck"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, HasSubstr("vm/bogus:1\" (\"linux/amd64\") is not a digest"));
  EXPECT_THAT(r.out, HasSubstr("vm/gone:1\" (\"linux/amd64\") points to the disk 0000"));
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 2) << r.out;
  r = Regdisk({"fsck", "--repair"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(Query("SELECT COUNT(*) FROM refs"), 2);
  r = Regdisk({"fsck"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(Images().size(), 2u);
}

TEST_F(StoreDbTest, ADamagedDatabaseIsSetAsideByRepair) {
  ASSERT_EQ(Regdisk({"pull", Layout("a")}).exit_code, 0);
  RemoveDb();
  ASSERT_OK(WriteFileAtomic(root_ / "store.db", std::string(8192, 'x'), 0600));
  RunResult r = Regdisk({"images"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr((root_ / "store.db").string()));
  r = Regdisk({"fsck"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, HasSubstr("broken: the store's database " + (root_ / "store.db").string()));
  EXPECT_THAT(r.out, HasSubstr("file is not a database"));
  r = Regdisk({"fsck", "--repair"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_THAT(r.out, HasSubstr("set aside as store.db.damaged (its names are lost"));
  EXPECT_EQ(ReadFileCapped(root_ / "store.db.damaged", 1 << 20).value(), std::string(8192, 'x'));
  EXPECT_TRUE(Images().empty());
  EXPECT_EQ(Regdisk({"fsck"}).exit_code, 0);
}

}  // namespace
}  // namespace regdisk::testing
