// Delta pulls of chunked disks (docs/chunked-format.md, "Delta pulls"): the
// store's chunk table, chunks copied from disks already in the store, and
// only the changed frames fetched, counted in the registry's access log.
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <set>

#include <nlohmann/json.hpp>

#include "blockserve/lazy_pull.h"
#include "harness/harness.h"
#include "image/layout.h"
#include "oci/chunk_index.h"
#include "image/transport.h"
#include "registry/client.h"
#include "store/chunk_bitmap.h"
#include "store/chunk_fetch.h"
#include "store/chunk_table.h"
#include "store/store.h"
#include "util/fs.h"

namespace regdisk::testing {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr uint64_t kChunk = 64 << 10;
constexpr size_t kChunks = 64;  // a 4 MiB disk

// Chunk k of a disk: pseudo-random bytes from a fixed seed.
std::string ChunkData(uint32_t seed) { return RandomBytes(kChunk, seed); }

class DeltaTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    root_ = P("root");
    auto reg = TestRegistry::Start(RegistryMode::kPlain, {}, TestRegistry::Extra{.access_log = true});
    ASSERT_OK(reg);
    reg_ = std::move(*reg);
    for (size_t k = 0; k < kChunks; ++k) v1_ += ChunkData(1000 + static_cast<uint32_t>(k));
    v2_ = v1_;
    for (size_t k : kChanged) v2_.replace(k * kChunk, kChunk, ChunkData(5000 + static_cast<uint32_t>(k)));
  }

  // Builds `raw` as a chunked image (64 KiB chunks) pushed to the registry
  // as vm/REPO:TAG, and into an OCI layout to read its index; returns the
  // layer's index and descriptor.
  struct Built {
    oci::Descriptor layer;
    oci::ChunkIndex index;
    oci::ChunkIndexLocation loc;
  };
  Built Build(const std::string& raw, const std::string& repo, const std::string& tag) {
    const std::string name = repo + "-" + tag;
    EXPECT_TRUE(WriteFileAtomic(tmp() / (name + ".raw"), raw).ok());
    for (const std::string& dest : {Ref(repo, tag), "oci:" + P(name + ".oci") + ":v1"}) {
      RunResult r = RunRegdisk({"build", P(name + ".raw"), "-t", dest, "--layout", "chunked", "--chunk-size", "64K", "-q"});
      EXPECT_EQ(r.exit_code, 0) << r.err;
    }
    auto layout = image::OciLayout::Open(P(name + ".oci")).value();
    json manifest = json::parse(layout.ReadBlob(layout.Resolve("v1").value(), 1 << 20).value());
    Built b;
    b.layer = oci::Descriptor::FromJson(manifest["layers"][0]).value();
    b.loc = oci::ChunkIndexLocationOf(b.layer).value().value();
    const std::string blob = layout.ReadBlob(b.layer, 1 << 28).value();
    b.index = oci::ParseChunkIndex(blob.substr(b.loc.offset, b.loc.length), b.loc, blob.size()).value();
    return b;
  }
  std::string Ref(const std::string& repo, const std::string& tag) {
    return "docker://" + reg_->host() + "/vm/" + repo + ":" + tag;
  }

  // Pulls, and returns the bytes the registry sent for `layer` meanwhile
  // (the access log's size field of each GET of that blob).
  uint64_t PullCounting(const std::string& ref, const oci::Descriptor& layer, RunResult* r) {
    const size_t before = reg_->log().size();
    *r = RunRegdisk({"--root", root_, "--log-level", "info", "pull", ref});
    return LayerBytes(reg_->log().substr(before), layer);
  }

  // Flips one byte of chunk k of the stored disk `file` (whose bytes were
  // `raw`), as a disk that rotted would.
  static void FlipAByteOfChunk(const fs::path& file, const std::string& raw, size_t k) {
    const uint64_t at = k * kChunk + 77;
    ASSERT_EQ(::chmod(file.c_str(), 0644), 0);
    auto fd = OpenFile(file, O_WRONLY);
    ASSERT_OK(fd);
    ASSERT_OK(PWriteAll(fd->get(), std::string(1, static_cast<char>(raw[at] ^ 1)), at));
    ASSERT_EQ(::chmod(file.c_str(), 0444), 0);
  }

  // v1 pulled, then one byte of its chunk 10 flipped on the node's disk:
  // a pull of v2 must fetch kChanged and chunk 10 (RottedFetches()).
  void PullV1AndRotItsChunk10(const Built& b1) {
    RunResult r;
    PullCounting(Ref("delta", "v1"), b1.layer, &r);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    ASSERT_NO_FATAL_FAILURE(FlipAByteOfChunk(DiskOf(Ref("delta", "v1")), v1_, 10));
  }
  std::set<size_t> RottedFetches() const {
    std::set<size_t> fetched = kChanged;
    fetched.insert(10);
    return fetched;
  }

  // Pulls `ref` lazily (blockserve::LazyPull: the fill, no export) until
  // it is committed; returns the bytes the registry sent for b's layer.
  uint64_t LazyPullCounting(const std::string& ref, const Built& b) {
    const size_t before = reg_->log().size();
    auto st = store::Store::Open(root_).value();
    blockserve::LazyPullOptions lo;
    lo.disk_options.readahead_bytes = 0;
    auto pull = blockserve::LazyPull::Start(st, image::OpenSource(image::ImageName::Parse(ref).value(), {}).value(),
                                            ref, store::PullOptions{}, lo)
                    .value();
    EXPECT_OK(pull->Wait().status());
    pull.reset();
    return LayerBytes(reg_->log().substr(before), b.layer);
  }
  // The bytes of `layer` in an access log's GETs (its size field).
  static uint64_t LayerBytes(const std::string& log, const oci::Descriptor& layer) {
    uint64_t bytes = 0;
    for (size_t at = 0; (at = log.find("GET /v2/", at)) != std::string::npos;) {
      const size_t eol = log.find('\n', at);
      const std::string line = log.substr(at, eol == std::string::npos ? std::string::npos : eol - at);
      at = eol == std::string::npos ? log.size() : eol;
      if (line.find("/blobs/" + layer.digest.str()) == std::string::npos) continue;
      // "GET /v2/... HTTP/1.1" STATUS BYTES "referer" "agent"
      const size_t q = line.find('"');
      int status = 0;
      unsigned long long n = 0;
      if (q != std::string::npos && std::sscanf(line.c_str() + q + 1, "%d %llu", &status, &n) == 2 &&
          (status == 200 || status == 206)) {
        bytes += n;
      }
    }
    return bytes;
  }
  // A lazy start reads the blob's first bytes beside the index, for the
  // tar header (store::kHeadGuessBytes, or less before an index that
  // starts sooner), where a pull reads the header frame alone.
  static uint64_t HeadExtra(const Built& b) {
    const uint64_t head = std::min<uint64_t>(store::kHeadGuessBytes, b.loc.offset);
    const uint64_t frame = b.index.HeaderFrameLength();
    return head > frame ? head - frame : 0;
  }

  // What a pull of `b` must fetch of its layer when it holds every chunk
  // but `fetched`: the index, the tar header frame and those frames.
  static uint64_t Expected(const Built& b, const std::set<size_t>& fetched) {
    uint64_t n = b.loc.length + b.index.HeaderFrameLength();
    for (size_t k : fetched) n += b.index.chunks[k].frame_length;
    return n;
  }

  static std::set<size_t> AllOf(const Built& b) {
    std::set<size_t> all;
    for (size_t k = 0; k < b.index.chunks.size(); ++k) all.insert(k);
    return all;
  }

  fs::path DiskOf(const std::string& ref) {
    RunResult r = RunRegdisk({"--root", root_, "images", "-o", "json"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    for (const auto& img : json::parse(r.out)) {
      if (img["name"] == ref) return img["disk"]["file"].get<std::string>();
    }
    return {};
  }
  std::set<std::string> TableDisks() {
    auto t = store::ChunkTable::Open(root_);
    EXPECT_TRUE(t.ok()) << t.status().message();
    std::set<std::string> out;
    if (!t.ok()) return out;
    const std::map<std::string, int> disks = t->Disks().value();
    for (const auto& [dir, shift] : disks) out.insert(dir);
    return out;
  }

  const std::set<size_t> kChanged = {5, 6, 30, 63};
  std::string root_, v1_, v2_;
  std::unique_ptr<TestRegistry> reg_;
};

TEST_F(DeltaTest, ASecondVersionFetchesOnlyItsChangedFrames) {
  const Built b1 = Build(v1_, "delta", "v1"), b2 = Build(v2_, "delta", "v2");
  RunResult r;
  EXPECT_EQ(PullCounting(Ref("delta", "v1"), b1.layer, &r), Expected(b1, AllOf(b1)))
      << "an empty store fetches every frame";
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const uint64_t got = PullCounting(Ref("delta", "v2"), b2.layer, &r);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(got, Expected(b2, kChanged)) << r.err;
  EXPECT_LT(got, uint64_t{kChanged.size() + 1} * (kChunk + 1024));
  EXPECT_THAT(r.err, HasSubstr("60 reused from the store"));
  const fs::path disk = DiskOf(Ref("delta", "v2"));
  ASSERT_FALSE(disk.empty());
  EXPECT_EQ(ReadFileCapped(disk, 1 << 28).value(), v2_);
  r = RunProgram({"qemu-img", "compare", "-f", "raw", "-F", "raw", disk.string(), P("delta-v2.raw")});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(TableDisks().size(), 2u);
  // rmi v1: its rows go with it; v2's stay.
  r = RunRegdisk({"--root", root_, "rmi", Ref("delta", "v1")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::set<std::string> left = TableDisks();
  ASSERT_EQ(left.size(), 1u);
  EXPECT_EQ(fs::path(root_) / "disks" / *left.begin(), disk.parent_path());
  r = RunRegdisk({"--root", root_, "fsck"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

// Lazy boot of a new version: the chunks an earlier version left in the
// store are copied from its disk and verified, not fetched; only the
// changed frames move. The fill takes the path a guest read takes
// (LazyDisk::Fetch); this test runs the fill alone.
TEST_F(DeltaTest, ALazilyPulledSecondVersionFetchesOnlyItsChangedFrames) {
  const Built b1 = Build(v1_, "delta", "v1"), b2 = Build(v2_, "delta", "v2");
  RunResult r;
  PullCounting(Ref("delta", "v1"), b1.layer, &r);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(LazyPullCounting(Ref("delta", "v2"), b2), Expected(b2, kChanged) + HeadExtra(b2))
      << "only the index, the tar header and the changed frames are fetched";
  const fs::path file = DiskOf(Ref("delta", "v2"));
  ASSERT_FALSE(file.empty());
  EXPECT_EQ(ReadFileCapped(file, 1 << 28).value(), v2_);
  r = RunProgram({"qemu-img", "compare", "-f", "raw", "-F", "raw", file.string(), P("delta-v2.raw")});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  r = RunRegdisk({"--root", root_, "fsck"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

// A store disk whose chunk no longer matches the table: the lazy disk
// hashes the copy before it writes it, fetches that chunk instead, and
// ends equal to the new version.
TEST_F(DeltaTest, ALazilyPulledVersionFetchesAChunkThatRottedInTheStore) {
  const Built b1 = Build(v1_, "delta", "v1"), b2 = Build(v2_, "delta", "v2");
  ASSERT_NO_FATAL_FAILURE(PullV1AndRotItsChunk10(b1));
  const std::set<size_t> fetched = RottedFetches();
  EXPECT_EQ(LazyPullCounting(Ref("delta", "v2"), b2), Expected(b2, fetched) + HeadExtra(b2));
  EXPECT_EQ(ReadFileCapped(DiskOf(Ref("delta", "v2")), 1 << 28).value(), v2_);
}

TEST_F(DeltaTest, AnotherImageSharingChunksAtOtherOffsetsReusesThem) {
  const Built b1 = Build(v1_, "delta", "v1");
  // Another repository's disk: v1's second half first, then 8 new chunks
  // and two zero chunks.
  std::string other = v1_.substr(32 * kChunk);
  std::set<size_t> fresh;
  for (size_t k = 0; k < 8; ++k) {
    fresh.insert(32 + k);
    other += ChunkData(9000 + static_cast<uint32_t>(k));
  }
  other += std::string(2 * kChunk, '\0');
  const Built bo = Build(other, "other", "v1");
  RunResult r;
  PullCounting(Ref("delta", "v1"), b1.layer, &r);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const uint64_t got = PullCounting(Ref("other", "v1"), bo.layer, &r);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // The zero chunks' frames (a few dozen bytes each) follow the new chunks
  // and come in the same read.
  EXPECT_EQ(got, Expected(bo, fresh) + bo.index.chunks[40].frame_length + bo.index.chunks[41].frame_length);
  EXPECT_THAT(r.err, HasSubstr("32 reused from the store"));
  EXPECT_EQ(ReadFileCapped(DiskOf(Ref("other", "v1")), 1 << 28).value(), other);
  struct stat st;
  ASSERT_EQ(::stat(DiskOf(Ref("other", "v1")).c_str(), &st), 0);
  EXPECT_LE(static_cast<uint64_t>(st.st_blocks) * 512, 40 * kChunk + 4096) << "zero chunks stay holes";
}

TEST_F(DeltaTest, ALocalChunkThatRottedIsFetchedAndFsckFindsIt) {
  const Built b1 = Build(v1_, "delta", "v1"), b2 = Build(v2_, "delta", "v2");
  ASSERT_NO_FATAL_FAILURE(PullV1AndRotItsChunk10(b1));  // one byte of v1's chunk 10 flips on the node's disk
  const std::set<size_t> fetched = RottedFetches();
  RunResult r;
  const uint64_t got = PullCounting(Ref("delta", "v2"), b2.layer, &r);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(got, Expected(b2, fetched));
  EXPECT_THAT(r.err, HasSubstr("chunk 10 of the disk"));
  EXPECT_EQ(ReadFileCapped(DiskOf(Ref("delta", "v2")), 1 << 28).value(), v2_);
  // fsck sees the damage through the chunk table, and repair removes v1.
  r = RunRegdisk({"--root", root_, "fsck"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.out + r.err, HasSubstr("its chunk 10 no longer hashes to the digest it was pulled with"));
  r = RunRegdisk({"--root", root_, "fsck", "--repair"});
  EXPECT_EQ(TableDisks().size(), 1u);
  r = RunRegdisk({"--root", root_, "fsck"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

TEST_F(DeltaTest, FsckRebuildsALostChunkTable) {
  const Built b1 = Build(v1_, "delta", "v1"), b2 = Build(v2_, "delta", "v2");
  RunResult r;
  PullCounting(Ref("delta", "v1"), b1.layer, &r);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const char* suffix : {"", "-wal", "-shm"}) fs::remove(root_ + "/store.db" + suffix);
  r = RunRegdisk({"--root", root_, "fsck"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.out + r.err, HasSubstr("is not listed"));
  r = RunRegdisk({"--root", root_, "fsck", "--repair"});
  EXPECT_EQ(TableDisks().size(), 1u) << r.out << r.err;
  // A stale row (a disk that is gone) is found and dropped too.
  {
    auto t = store::ChunkTable::Open(root_);
    ASSERT_OK(t);
    oci::ChunkIndex idx = b1.index;
    ASSERT_OK(t->AddDisk("0000gone", "disk.raw", idx));
  }
  r = RunRegdisk({"--root", root_, "fsck"});
  EXPECT_THAT(r.out + r.err, HasSubstr("0000gone"));
  r = RunRegdisk({"--root", root_, "fsck", "--repair"});
  EXPECT_EQ(TableDisks().size(), 1u);
  // And the rebuilt table serves a delta.
  EXPECT_EQ(PullCounting(Ref("delta", "v2"), b2.layer, &r), Expected(b2, kChanged)) << r.err;
}

// A source that passes everything through, counts the bytes read of one
// blob by range, and fails (as a network would) every ranged read of it
// after the first `allowed` ones.
class FlakySource : public image::ImageSource {
 public:
  FlakySource(std::unique_ptr<image::ImageSource> inner, oci::Digest blob, int allowed)
      : inner_(std::move(inner)), blob_(std::move(blob)), allowed_(allowed) {}
  std::string Name() const override { return inner_->Name(); }
  Result<oci::RawManifest> GetManifest() override { return inner_->GetManifest(); }
  Result<oci::RawManifest> GetManifestByDigest(const oci::Descriptor& d) override { return inner_->GetManifestByDigest(d); }
  Status FetchBlob(const oci::Descriptor& d, const registry::BlobSink& sink) override {
    return inner_->FetchBlob(d, sink);
  }
  Status FetchBlobFrom(const oci::Descriptor& d, uint64_t offset, oci::Hasher& h, const registry::BlobSink& sink) override {
    return inner_->FetchBlobFrom(d, offset, h, sink);
  }
  Result<std::unique_ptr<image::BlobRangeReader>> OpenRangeReader() override {
    ASSIGN_OR_RETURN(std::unique_ptr<image::BlobRangeReader> r, inner_->OpenRangeReader());
    return std::unique_ptr<image::BlobRangeReader>(new Reader(this, std::move(r)));
  }
  uint64_t bytes() const { return bytes_; }

 private:
  struct Reader : image::BlobRangeReader {
    Reader(FlakySource* s, std::unique_ptr<image::BlobRangeReader> r) : src(s), inner(std::move(r)) {}
    Status Read(const oci::Descriptor& d, uint64_t offset, uint64_t length, const registry::BlobSink& sink) override {
      if (d.digest == src->blob_ && src->reads_.fetch_add(1) >= src->allowed_) {
        return Unavailable("the connection was reset (injected)");
      }
      if (d.digest == src->blob_) src->bytes_ += length;
      return inner->Read(d, offset, length, sink);
    }
    FlakySource* src;
    std::unique_ptr<image::BlobRangeReader> inner;
  };
  std::unique_ptr<image::ImageSource> inner_;
  oci::Digest blob_;
  int allowed_;
  std::atomic<int> reads_{0};
  std::atomic<uint64_t> bytes_{0};
};

TEST_F(DeltaTest, APullCutOffMidwayResumesFromTheChunksItVerified) {
  // 12 MiB: two reads of at most 8 MiB of frames.
  std::string raw;
  for (uint32_t k = 0; k < 192; ++k) raw += ChunkData(20000 + k);
  ASSERT_TRUE(WriteFileAtomic(tmp() / "big.raw", raw).ok());
  RunResult r = RunRegdisk({"build", P("big.raw"), "-t", "oci:" + P("big") + ":v1", "--layout", "chunked",
                            "--chunk-size", "64K", "-q"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto layout = image::OciLayout::Open(P("big")).value();
  const json manifest = json::parse(layout.ReadBlob(layout.Resolve("v1").value(), 1 << 20).value());
  const oci::Descriptor layer = oci::Descriptor::FromJson(manifest["layers"][0]).value();
  const oci::ChunkIndexLocation loc = oci::ChunkIndexLocationOf(layer).value().value();
  const std::string blob = layout.ReadBlob(layer, 1 << 28).value();
  const oci::ChunkIndex idx = oci::ParseChunkIndex(blob.substr(loc.offset, loc.length), loc, blob.size()).value();

  auto store = store::Store::Open(root_);
  ASSERT_OK(store);
  const std::string ref = "oci:" + P("big") + ":v1";
  auto source = [&](int allowed) {
    return std::make_unique<FlakySource>(
        image::OpenSource(image::ImageName::Parse(ref).value(), registry::ClientOptions{}).value(), layer.digest,
        allowed);
  };
  // The index, the tar header and one read of frames get through; the
  // other read fails, and the pull with it.
  auto cut = source(3);
  auto failed = store->Pull(*cut, ref, store::PullOptions{});
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), Code::kUnavailable) << failed.status().message();
  const fs::path staging = fs::path(root_) / "ingest" / ("chunked-sha256-" + layer.digest.hex());
  std::set<size_t> missing;
  {
    auto map = store::ChunkBitmap::Open(staging / "chunks.map", idx.chunks.size(), idx.chunk_shift, loc.digest);
    ASSERT_OK(map);
    EXPECT_GT(map->Count(), 0u);
    EXPECT_LT(map->Count(), idx.chunks.size());
    for (size_t k = 0; k < idx.chunks.size(); ++k) {
      if (!map->Test(k)) missing.insert(k);
    }
  }
  // Again: only the chunks the first pull did not verify are fetched.
  auto again = source(1000);
  auto img = store->Pull(*again, ref, store::PullOptions{});
  ASSERT_OK(img);
  EXPECT_EQ(again->bytes(), Expected(Built{layer, idx, loc}, missing));
  EXPECT_EQ(ReadFileCapped(img->disk_file, 1 << 28).value(), raw);
  EXPECT_FALSE(fs::exists(staging)) << "the staging goes once the disk is committed";
}

}  // namespace
}  // namespace regdisk::testing
