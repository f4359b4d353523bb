// Lazy boot in the node store: `images` lists a disk that is still filling
// with its image's name and fill; rmi and prune never remove a disk an
// export serves (a filling one, or a committed one nbdkit still reads), and
// prune and fsck deal with lazy/ directories left behind. One export per
// layer: a second pull reads the first's, an owner stays up while another
// process reads it, and a reader takes over from an owner that went.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cctype>
#include <sstream>

#include <atomic>
#include <thread>

#include "blockserve/export.h"
#include "blockserve/lazy_disk.h"
#include "blockserve/lazy_pull.h"
#include "harness/harness.h"
#include "image/layout.h"
#include "image/transport.h"
#include "store/chunk_fetch.h"
#include "store/lazy_dir.h"
#include "store/store.h"
#include "util/fs.h"
#include "util/process.h"

namespace regdisk::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr uint64_t kKiB = 1024, kMiB = 1024 * 1024;

class LazyStoreTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    root_ = tmp() / "root";
    // 4 MiB in 64 KiB chunks.
    raw_ = RandomBytes(4 * kMiB, 11);
    ASSERT_OK(WriteFileAtomic(tmp() / "d.raw", raw_));
    reg_ = TestRegistry::Start(RegistryMode::kPlain).value();
    ref_ = "docker://" + reg_->host() + "/lazy/store:v1";
    RunResult r = RunRegdisk({"build", P("d.raw"), "-t", ref_, "--layout", "chunked", "--chunk-size", "64K", "-q"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    src_ = image::OpenSource(image::ImageName::Parse(ref_).value(), {}).value();
    const oci::RawManifest m = src_->GetManifest().value();
    const json manifest = json::parse(m.bytes);
    layer_ = oci::Descriptor::FromJson(manifest["layers"][0]).value();
    loc_ = oci::ChunkIndexLocationOf(layer_).value().value();
    name_ = store::LazyName(layer_.digest);
  }

  RunResult Regdisk(std::vector<std::string> args) {
    args.insert(args.begin(), {"--root", root_.string()});
    return RunRegdisk(args);
  }

  // A filling disk as LazyPull leaves it in the store: chunk 0 present.
  std::unique_ptr<blockserve::LazyDisk> Filling() {
    auto reader = src_->OpenRangeReader().value();
    store::ChunkedLayerHead head = store::OpenChunkedLayer(*reader, layer_, loc_, 1ull << 40, "test").value();
    const std::string image_path = head.image_path;
    blockserve::LazyDiskOptions o;
    o.label = "test layer";
    o.readahead_bytes = 0;
    auto d = blockserve::LazyDisk::Open([this] { return src_->OpenRangeReader(); }, layer_, std::move(head),
                                        loc_.digest, store::LazyDirPath(root_, name_), o)
                 .value();
    EXPECT_OK(store::WriteLazyRecord(d->dir(), {.image = ref_,
                                                .layer = layer_.digest,
                                                .index = loc_.digest,
                                                .image_path = image_path,
                                                .disk_size = d->size(),
                                                .chunks = d->index().chunks.size()}));
    EXPECT_OK(d->Ensure(0, 512));
    return d;
  }

  fs::path root_;
  std::string raw_, ref_, name_;
  std::unique_ptr<TestRegistry> reg_;
  std::unique_ptr<image::ImageSource> src_;
  oci::Descriptor layer_;
  oci::ChunkIndexLocation loc_;
};

TEST_F(LazyStoreTest, ImagesListsAFillingDiskAndRmiRemovesItOnlyWhenNotServed) {
  ASSERT_EQ(Regdisk({"images"}).exit_code, 0);
  ASSERT_OK(MakeDirs(root_ / "locks"));
  auto d = Filling();
  ASSERT_NE(d, nullptr);
  d.reset();  // the fill stopped: 1 of 64 chunks
  {
    FileLock serving = FileLock::Acquire(store::LazyLockPath(root_, name_)).value();
    RunResult r = Regdisk({"images"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_THAT(r.out, HasSubstr(reg_->host() + "/lazy/store"));
    EXPECT_THAT(r.out, HasSubstr("filling 1%"));
    EXPECT_THAT(r.out, HasSubstr("4.19 MB")) << "its virtual size";
    r = Regdisk({"images", "-o", "json"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const json j = json::parse(r.out);
    ASSERT_EQ(j.size(), 1u) << r.out;
    EXPECT_EQ(j[0]["name"], ref_);
    EXPECT_EQ(j[0]["layer"], layer_.digest.str());
    EXPECT_EQ(j[0]["filling"]["present"], 1);
    EXPECT_EQ(j[0]["filling"]["chunks"], 64);
    EXPECT_EQ(j[0]["filling"]["percent"], 1);
    EXPECT_EQ(j[0]["filling"]["served"], true);
    EXPECT_EQ(j[0]["disk"]["virtualSize"], 4 * kMiB);
    // Served: rmi refuses, prune keeps it.
    r = Regdisk({"rmi", ref_});
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_THAT(r.err, HasSubstr("being pulled for a running VM"));
    r = Regdisk({"prune"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_THAT(r.err, HasSubstr("kept lazily-pulled disk lazy/" + name_));
    EXPECT_TRUE(fs::exists(root_ / "lazy" / name_ / "disk.raw"));
  }
  // Served by no one: prune keeps a fill a later run resumes, fsck finds
  // nothing wrong with it, and rmi of its name removes it.
  RunResult r = Regdisk({"prune"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(fs::exists(root_ / "lazy" / name_ / "disk.raw"));
  r = Regdisk({"fsck"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  r = Regdisk({"rmi", ref_});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("removed lazily-pulled disk lazy/" + name_ + ": image removed"));
  EXPECT_FALSE(fs::exists(root_ / "lazy" / name_));
  r = Regdisk({"images", "-o", "json"});
  EXPECT_EQ(json::parse(r.out).size(), 0u) << r.out;
}

TEST_F(LazyStoreTest, ACommittedDiskAnExportStillServesIsNeverRemoved) {
  auto st = store::Store::Open(root_).value();
  blockserve::LazyPullOptions lo;
  lo.disk_options.readahead_bytes = 0;
  auto pull = blockserve::LazyPull::Start(st, image::OpenSource(image::ImageName::Parse(ref_).value(), {}).value(),
                                          ref_, store::PullOptions{}, lo)
                  .value();
  ASSERT_OK(pull->Wait().status());  // filled and committed; its export would still serve it
  RunResult r = Regdisk({"images"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, Not(HasSubstr("filling")));
  // rmi refuses while the disk is served; --force drops the name and keeps
  // the disk; prune keeps it too.
  r = Regdisk({"rmi", ref_});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("still served"));
  r = Regdisk({"rmi", "--force", ref_});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("kept disk"));
  r = Regdisk({"prune"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto disks = [&] {
    int n = 0;
    for ([[maybe_unused]] const auto& e : fs::directory_iterator(root_ / "disks")) ++n;
    return n;
  };
  EXPECT_EQ(disks(), 1) << "the served disk stays";
  // Once the export is gone, prune removes it.
  pull.reset();
  EXPECT_FALSE(fs::exists(root_ / "lazy" / name_)) << "a committed disk leaves nothing under lazy/";
  r = Regdisk({"prune"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(disks(), 0);
}

TEST_F(LazyStoreTest, PruneAndFsckDealWithLazyDirectoriesLeftBehind) {
  RunResult r = Regdisk({"pull", ref_});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // Left behind: a committed disk's lazy directory (its owner was killed
  // after the commit), and a directory without a record.
  ASSERT_OK(MakeDirs(root_ / "lazy" / name_));
  ASSERT_OK(WriteFileAtomic(root_ / "lazy" / name_ / "disk.raw", "x"));
  ASSERT_OK(store::WriteLazyRecord(root_ / "lazy" / name_,
                                   {.image = ref_, .layer = layer_.digest, .index = loc_.digest, .disk_size = 4 * kMiB, .chunks = 64}));
  ASSERT_OK(MakeDirs(root_ / "lazy" / "0123456789abcdef01234567"));
  r = Regdisk({"fsck"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, HasSubstr("lazy/" + name_ + ": committed to the store"));
  EXPECT_THAT(r.out, HasSubstr("lazy/0123456789abcdef01234567: no readable lazy.json"));
  r = Regdisk({"images"});
  EXPECT_THAT(r.out, Not(HasSubstr("filling"))) << "a committed disk is listed once";
  r = Regdisk({"prune"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("removed lazily-pulled disk lazy/" + name_ + ": committed to the store"));
  EXPECT_THAT(r.out, HasSubstr("removed lazily-pulled disk lazy/0123456789abcdef01234567: no readable lazy.json"));
  EXPECT_FALSE(fs::exists(root_ / "lazy" / name_));
  r = Regdisk({"fsck"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  // The named disk itself stays.
  r = Regdisk({"images", "-q"});
  EXPECT_FALSE(r.out.empty());
}


// The first `bytes` bytes of the disk served at `uri`, read with qemu-io
// (its hex dump, parsed back).
std::string ReadThroughNbd(const std::string& uri, size_t bytes) {
  RunResult r = RunProgram({"qemu-io", "-r", "-f", "raw", "-c", "read -v 0 " + std::to_string(bytes), uri});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  std::string out;
  std::istringstream lines(r.out);
  for (std::string line; std::getline(lines, line);) {
    const size_t colon = line.find(':');
    if (colon != 8) continue;  // "00000000:  ab cd ...  ascii"
    for (size_t i = 0; i < 16 && colon + 3 + i * 3 + 2 <= line.size(); ++i) {
      const std::string hex = line.substr(colon + 3 + i * 3, 2);
      if (!std::isxdigit(static_cast<unsigned char>(hex[0])) || !std::isxdigit(static_cast<unsigned char>(hex[1]))) break;
      out.push_back(static_cast<char>(std::stoi(hex, nullptr, 16)));
    }
  }
  return out;
}

class LazyShareTest : public LazyStoreTest {
 protected:
  void SetUp() override {
    LazyStoreTest::SetUp();
    owner_proxy_ = FaultProxy::Start(reg_->port()).value();
    reader_proxy_ = FaultProxy::Start(reg_->port()).value();
  }

  std::string Via(const FaultProxy& proxy) const { return "docker://" + proxy.host() + "/lazy/store:v1"; }

  // Holds the owner's fill: its requests for frames past the first 512 KiB
  // (not the index, at the end) stall for 2 s and fail, again and again.
  void HoldTheFill() {
    owner_proxy_->AddRule({.method = "GET", .path_contains = "/blobs/" + layer_.digest.str(), .times = 1 << 30,
                           .action = FaultProxy::Rule::Action::kStall, .stall = std::chrono::milliseconds(2000),
                           .range_from = 512 * kKiB, .range_below = loc_.offset});
  }

  std::unique_ptr<blockserve::LazyPull> StartPull(const std::string& ref, bool outlive) {
    blockserve::LazyPullOptions lo;
    lo.export_options.plugin = REGDISK_NBDKIT_PLUGIN;
    lo.export_options.outlive_owner = outlive;
    lo.disk_options.readahead_bytes = 0;
    lo.disk_options.fill_retry = std::chrono::milliseconds(100);
    lo.disk_options.fill_batch_bytes = 64 * kKiB;  // one chunk a request: HoldTheFill holds all but the first
    auto st = store::Store::Open(root_).value();
    store::PullOptions po;
    po.limits.max_file_bytes = 1ull << 40;
    return blockserve::LazyPull::Start(st, image::OpenSource(image::ImageName::Parse(ref).value(), {}).value(), ref,
                                       po, lo)
        .value();
  }

  size_t LayerRequests(const FaultProxy& proxy) const {
    size_t n = 0;
    for (const auto& s : proxy.seen()) n += s.path.find("/blobs/" + layer_.digest.str()) != std::string::npos;
    return n;
  }

  std::unique_ptr<FaultProxy> owner_proxy_, reader_proxy_;
};

TEST_F(LazyShareTest, ASecondPullReadsTheFirstsExportAndTakesOverWhenItGoes) {
  HoldTheFill();
  auto owner = StartPull(Via(*owner_proxy_), /*outlive=*/true);
  blockserve::LazyPull::Disk served = owner->Ready().value();
  ASSERT_FALSE(served.socket.empty());
  const pid_t nbdkit = owner->served()->nbdkit_pid();
  const std::optional<uint64_t> nbdkit_ticks = ProcessStartTicks(nbdkit);

  // Another pull of the same layer (through a registry address of its own,
  // to count its requests) reads that export and fetches nothing.
  auto reader = StartPull(Via(*reader_proxy_), /*outlive=*/false);
  blockserve::LazyPull::Disk joined = reader->Ready().value();
  EXPECT_TRUE(reader->joined());
  EXPECT_EQ(joined.socket, served.socket);
  EXPECT_EQ(joined.size, served.size);
  EXPECT_EQ(joined.image_path, served.image_path);
  EXPECT_EQ(joined.manifest, served.manifest);
  EXPECT_EQ(ReadThroughNbd("nbd+unix:///?socket=" + joined.socket.string(), 4096), raw_.substr(0, 4096));
  EXPECT_EQ(LayerRequests(*reader_proxy_), 0u) << "the reader fetched from the registry";
  // rmi and prune do not wait for the fill (it runs outside the store's
  // locks): rmi refuses the image as in use, prune keeps its disk.
  RunResult r = Regdisk({"rmi", Via(*owner_proxy_)});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("being pulled for a running VM"));
  r = Regdisk({"prune"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(fs::exists(root_ / "lazy" / name_ / "disk.raw"));

  // The owner goes, leaving its export to its readers (a daemon that exits,
  // a killed `pull --lazy`): the reader takes it over, adopts its nbdkit,
  // and fills and commits the disk itself.
  owner->KeepExport();
  owner.reset();
  Result<store::StoredImage> stored = reader->Wait();
  ASSERT_OK(stored.status());
  EXPECT_FALSE(reader->joined());
  ASSERT_NE(reader->served(), nullptr);
  EXPECT_TRUE(reader->served()->adopted());
  EXPECT_EQ(reader->served()->nbdkit_pid(), nbdkit);
  EXPECT_GT(LayerRequests(*reader_proxy_), 0u);
  EXPECT_EQ(ReadFileCapped(stored->disk_file, 8 * kMiB).value(), raw_);
  EXPECT_EQ(ReadThroughNbd("nbd+unix:///?socket=" + joined.socket.string(), 4096), raw_.substr(0, 4096));
  // Its end stops the adopted nbdkit and removes the directory.
  reader.reset();
  EXPECT_FALSE(fs::exists(root_ / "lazy" / name_));
  // (Detached, it is init's child: gone, or a zombie init has not reaped.)
  const std::string stat = ReadFileCapped("/proc/" + std::to_string(nbdkit) + "/stat", 4096).value_or("");
  const size_t paren = stat.rfind(')');
  const bool running = paren != std::string::npos && paren + 2 < stat.size() && stat[paren + 2] != 'Z' &&
                       ProcessStartTicks(nbdkit) == nbdkit_ticks;
  EXPECT_FALSE(running) << "the adopted nbdkit outlived its last owner";
}

TEST_F(LazyShareTest, AnOwnerKeepsItsExportUpWhileAnotherProcessReadsIt) {
  auto owner = StartPull(Via(*owner_proxy_), /*outlive=*/false);
  blockserve::LazyPull::Disk served = owner->Ready().value();
  ASSERT_FALSE(served.socket.empty());
  ASSERT_OK(owner->Wait().status());  // committed; the export still serves
  // A reader in another process holds the readers' lock (shared).
  std::optional<FileLock> reader =
      FileLock::Acquire(store::LazyReadersLockPath(root_, name_), FileLock::Mode::kShared).value();
  EXPECT_FALSE(owner->TryRetire()) << "a long-lived process must not drop it now";
  std::atomic<bool> gone{false};
  std::thread stopper([&] {
    owner.reset();
    gone = true;
  });
  // It cannot go while the lock is held: still serving after a while.
  for (int i = 0; i < 10 && !gone.load(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(gone.load()) << "the owner stopped its export under a reader";
  EXPECT_TRUE(blockserve::CanConnect(served.socket));
  EXPECT_EQ(ReadThroughNbd("nbd+unix:///?socket=" + served.socket.string(), 4096), raw_.substr(0, 4096));
  reader.reset();
  stopper.join();
  EXPECT_FALSE(blockserve::CanConnect(served.socket));
  EXPECT_FALSE(fs::exists(root_ / "lazy" / name_));
  // rmi and prune count a reader as a use of the disk, as they count its
  // owner.
  EXPECT_FALSE(store::LazyInUse(root_, name_).value());
  {
    FileLock another = FileLock::Acquire(store::LazyReadersLockPath(root_, name_), FileLock::Mode::kShared).value();
    EXPECT_TRUE(store::LazyInUse(root_, name_).value());
  }
}

}  // namespace
}  // namespace regdisk::testing
