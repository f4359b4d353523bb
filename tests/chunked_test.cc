// Chunked disk layers (docs/chunked-format.md), end to end with real tools:
// regdisk build --layout chunked, plain zstd+tar reading it, regdisk pull
// (ranged and parallel, from a registry and from a layout), and hostile
// layers whose index or frames lie, which must leave nothing in the store.
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <functional>

#include <nlohmann/json.hpp>

#include "harness/harness.h"
#include "image/chunked_build.h"
#include "image/layout.h"
#include "oci/chunk_index.h"
#include "util/fs.h"

namespace regdisk::testing {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr uint64_t kMiB = 1 << 20;

uint64_t Le(const std::string& b, size_t at, size_t n) {
  uint64_t v = 0;
  for (size_t i = 0; i < n; ++i) v |= uint64_t{static_cast<uint8_t>(b[at + i])} << (8 * i);
  return v;
}

class ChunkedTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    root_ = P("root");
    // 5 MiB + 4 KiB: data in chunks 0 and 3 (1 MiB chunks), the last chunk
    // short and zero, the rest zero.
    std::string raw(5 * kMiB + 4096, '\0');
    std::string a = RandomBytes(300000, 11), b = RandomBytes(70000, 12);
    raw.replace(0, a.size(), a);
    raw.replace(3 * kMiB + 4096, b.size(), b);
    raw_ = raw;
    ASSERT_OK(WriteFileAtomic(tmp() / "d.raw", raw));
    ASSERT_EQ(RunProgram({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", P("d.raw"), P("d.qcow2")}).exit_code, 0);
  }

  // Builds DISK into oci:DIR:v1 with --layout chunked; returns the layer.
  oci::Descriptor Build(const std::string& disk, const std::string& dir, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"build", P(disk), "-t", "oci:" + P(dir) + ":v1", "--layout", "chunked", "-q"};
    args.insert(args.end(), extra.begin(), extra.end());
    RunResult r = RunRegdisk(args);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.exit_code == 0 ? Layer(dir) : oci::Descriptor{};
  }
  json Manifest(const std::string& dir) {
    auto layout = image::OciLayout::Open(P(dir)).value();
    auto d = layout.Resolve("v1").value();
    return json::parse(layout.ReadBlob(d, 1 << 20).value());
  }
  oci::Descriptor Layer(const std::string& dir) { return oci::Descriptor::FromJson(Manifest(dir)["layers"][0]).value(); }
  std::string Blob(const std::string& dir, const oci::Descriptor& d) {
    return ReadFileCapped(fs::path(P(dir)) / "blobs/sha256" / d.digest.hex(), 1 << 28).value();
  }
  // What a plain zstd + tar reader makes of the layer: disk/NAME's bytes.
  std::string Unpack(const std::string& dir, const oci::Descriptor& layer, const std::string& name) {
    fs::path out = tmp() / ("unpacked-" + dir);
    fs::create_directories(out);
    fs::path tar = out / "layer.tar";
    RunResult r = RunProgram({"zstd", "-q", "-d", "-f", (fs::path(P(dir)) / "blobs/sha256" / layer.digest.hex()).string(),
                              "-o", tar.string()});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    r = RunProgram({"tar", "-x", "-f", tar.string(), "-C", out.string()});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return ReadFileCapped(out / "disk" / name, 1 << 28).value_or("");
  }
  RunResult Pull(const std::string& ref) { return RunRegdisk({"--root", root_, "pull", ref}); }
  fs::path StoredDisk() {
    for (const auto& e : fs::recursive_directory_iterator(fs::path(root_) / "disks")) {
      if (e.path().filename() == "disk.raw") return e.path();
    }
    return {};
  }
  // Nothing of a refused pull may stay: no disk, no blob, no staging.
  void ExpectStoreEmpty() {
    for (const char* sub : {"disks", "blobs/sha256", "tmp", "ingest"}) {
      fs::path p = fs::path(root_) / sub;
      if (fs::exists(p)) {
        EXPECT_TRUE(fs::is_empty(p)) << sub << " is not empty";
      }
    }
    EXPECT_FALSE(fs::exists(fs::path(root_) / "refs.json") &&
                 ReadFileCapped(fs::path(root_) / "refs.json", 1 << 20).value().find("hostile") != std::string::npos);
  }

  std::string root_;
  std::string raw_;
};

TEST_F(ChunkedTest, PlainZstdAndTarReadTheRawDisk) {
  oci::Descriptor layer = Build("d.qcow2", "q");
  EXPECT_EQ(layer.media_type, oci::media::kOciLayerZstd);
  EXPECT_EQ(layer.annotations.at("io.regdisk.chunked.version"), "1");
  EXPECT_EQ(Unpack("q", layer, "d.raw"), raw_) << "a qcow2 is carried as its guest-visible raw bytes";
  // A raw input gives the same layer as its qcow2: chunks are guest bytes.
  oci::Descriptor from_raw = Build("d.raw", "r");
  EXPECT_EQ(from_raw.digest, layer.digest);
  json config = json::parse(Blob("q", oci::Descriptor::FromJson(Manifest("q")["config"]).value()));
  EXPECT_EQ(config["config"]["Labels"]["io.regdisk.disk.format"], "raw");
  EXPECT_EQ(config["config"]["Labels"]["io.regdisk.disk.path"], "/disk/d.raw");
}

TEST_F(ChunkedTest, TheLayerIsASeekableStreamWithTheIndexWhereTheAnnotationsSay) {
  oci::Descriptor layer = Build("d.raw", "r", {"--chunk-size", "1M"});
  const std::string blob = Blob("r", layer);
  // The seek table: footer magic, one entry per frame, sizes that add up.
  ASSERT_GT(blob.size(), 17u);
  EXPECT_EQ(Le(blob, blob.size() - 4, 4), 0x8F92EAB1u);
  const uint64_t frames = Le(blob, blob.size() - 9, 4);
  EXPECT_EQ(frames, 6u + 3u);  // header, 6 chunks, tail, index
  const size_t table = blob.size() - 9 - frames * 8 - 8;
  EXPECT_EQ(Le(blob, table, 4), 0x184D2A5Eu);
  uint64_t compressed = 0, decompressed = 0;
  for (uint64_t i = 0; i < frames; ++i) {
    compressed += Le(blob, table + 8 + i * 8, 4);
    decompressed += Le(blob, table + 8 + i * 8 + 4, 4);
  }
  EXPECT_EQ(compressed, table);
  EXPECT_EQ(decompressed % 512, 0u);
  // The index, verified against the annotations.
  auto loc = oci::ChunkIndexLocationOf(layer);
  ASSERT_OK(loc);
  ASSERT_TRUE(loc->has_value());
  auto idx = oci::ParseChunkIndex(blob.substr((*loc)->offset, (*loc)->length), **loc, blob.size());
  ASSERT_OK(idx);
  EXPECT_EQ(idx->disk_size, raw_.size());
  ASSERT_EQ(idx->chunks.size(), 6u);
  EXPECT_FALSE(idx->chunks[0].zero);
  EXPECT_TRUE(idx->chunks[1].zero);
  EXPECT_FALSE(idx->chunks[3].zero);
  EXPECT_TRUE(idx->chunks[5].zero);
}

TEST_F(ChunkedTest, TheSameDiskGivesTheSameLayerWhateverTheThreads) {
  auto fd = OpenFile(tmp() / "d.raw", O_RDONLY);
  ASSERT_OK(fd);
  std::string outs[2];
  for (int t : {1, 3}) {
    const fs::path out = tmp() / ("layer-" + std::to_string(t));
    auto o = OpenFile(out, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ASSERT_OK(o);
    image::ChunkedLayerOptions co;
    co.name = "d.raw";
    co.chunk_size = 64 << 10;
    co.threads = t;
    co.label = "d.raw";
    ASSERT_OK(image::WriteChunkedLayer(fd->get(), raw_.size(), co, o->get()));
    outs[t == 1 ? 0 : 1] = ReadFileCapped(out, 1 << 28).value();
  }
  EXPECT_EQ(outs[0], outs[1]);
  // And the CLI twice: the same layer digest.
  EXPECT_EQ(Build("d.qcow2", "a").digest, Build("d.qcow2", "b").digest);
}

TEST_F(ChunkedTest, BadFlagsAreUsageErrors) {
  for (auto args : std::vector<std::vector<std::string>>{
           {"--layout", "chunked", "--chunk-size", "3M"},
           {"--layout", "chunked", "--chunk-size", "32K"},
           {"--layout", "chunked", "--compression", "gzip"},
           {"--layout", "chunked", "--format", "docker"},
           {"--chunk-size", "1M"}}) {
    std::vector<std::string> cmd = {"build", P("d.raw"), "-t", "oci:" + P("bad") + ":v1"};
    cmd.insert(cmd.end(), args.begin(), args.end());
    RunResult r = RunRegdisk(cmd);
    EXPECT_EQ(r.exit_code, 2) << args[args.size() - 1] << ": " << r.err;
    EXPECT_FALSE(fs::exists(P("bad")));
  }
}


}  // namespace
}  // namespace regdisk::testing
