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

#include <algorithm>
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

  // Builds DISK into oci:DIR:v1 with --layout chunked (1 MiB chunks, which
  // the disk above is laid out for, unless `extra` names a chunk size);
  // returns the layer.
  oci::Descriptor Build(const std::string& disk, const std::string& dir, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"build", P(disk), "-t", "oci:" + P(dir) + ":v1", "--layout", "chunked", "-q"};
    if (std::find(extra.begin(), extra.end(), "--chunk-size") == extra.end()) extra.insert(extra.begin(), {"--chunk-size", "1M"});
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

TEST_F(ChunkedTest, WithoutAChunkSizeBuildUses256KChunksOrWhatTheIndexHolds) {
  RunResult r = RunRegdisk({"build", P("d.raw"), "-t", "oci:" + P("dflt") + ":v1", "--layout", "chunked", "-q"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const oci::Descriptor layer = Layer("dflt");
  const oci::ChunkIndexLocation loc = oci::ChunkIndexLocationOf(layer).value().value();
  const std::string blob = Blob("dflt", layer);
  auto index = oci::ParseChunkIndex(blob.substr(loc.offset, loc.length), loc, blob.size());
  ASSERT_OK(index);
  EXPECT_EQ(index->chunk_shift, 18);
  EXPECT_EQ(index->chunks.size(), raw_.size() / (256 << 10) + 1);
  // Larger disks get the smallest chunk size whose index fits in 64 MiB
  // (32 + 48 bytes per chunk): 1398100 chunks at most.
  EXPECT_EQ(image::DefaultChunkSize(1), 256u << 10);
  EXPECT_EQ(image::DefaultChunkSize(uint64_t{1398100} << 18), 256u << 10);
  EXPECT_EQ(image::DefaultChunkSize((uint64_t{1398100} << 18) + 1), 512u << 10);
  EXPECT_EQ(image::DefaultChunkSize(uint64_t{1} << 40), 1u << 20);
  EXPECT_EQ(image::DefaultChunkSize(uint64_t{1} << 60), 16u << 20);
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


// --- Pulls -------------------------------------------------------------------

TEST_F(ChunkedTest, PullFromARegistryIsRangedVerifiedAndSparse) {
  auto reg = TestRegistry::Start(RegistryMode::kPlain, {}, TestRegistry::Extra{.access_log = true});
  ASSERT_OK(reg);
  const std::string ref = "docker://" + (*reg)->host() + "/vm/chunked:v1";
  RunResult r = RunRegdisk({"build", P("d.qcow2"), "-t", ref, "--layout", "chunked", "--chunk-size", "64K", "-q"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Pull(ref);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const fs::path disk = StoredDisk();
  ASSERT_FALSE(disk.empty());
  EXPECT_EQ(ReadFileCapped(disk, 1 << 28).value(), raw_);
  r = RunProgram({"qemu-img", "compare", "-f", "raw", "-F", "qcow2", disk.string(), P("d.qcow2")});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  // Zero chunks are holes: the file holds about the data, not the disk.
  struct stat st;
  ASSERT_EQ(::stat(disk.c_str(), &st), 0);
  EXPECT_LT(static_cast<uint64_t>(st.st_blocks) * 512, 1 * kMiB);
  json meta = json::parse(ReadFileCapped(disk.parent_path() / "meta.json", 1 << 20).value());
  EXPECT_EQ(meta["format"], "raw");
  EXPECT_EQ(meta["path"], "/disk/d.raw");
  // The layer came in ranged requests (the index, the header, the frames).
  const std::string log = (*reg)->log();
  int blob_gets = 0;
  for (size_t at = log.find("GET /v2/vm/chunked/blobs/"); at != std::string::npos;
       at = log.find("GET /v2/vm/chunked/blobs/", at + 1)) {
    ++blob_gets;
  }
  EXPECT_GE(blob_gets, 3 + 1) << log;  // config, index, header, frames
  // Pulling again does nothing.
  r = Pull(ref);
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST_F(ChunkedTest, PullFromALayoutGivesTheSameDisk) {
  Build("d.qcow2", "q");
  RunResult r = Pull("oci:" + P("q") + ":v1");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ReadFileCapped(StoredDisk(), 1 << 28).value(), raw_);
}

TEST_F(ChunkedTest, RangedReadsSurviveCutsRetriesAndServersThatIgnoreRange) {
  auto reg = TestRegistry::Start(RegistryMode::kPlain);
  ASSERT_OK(reg);
  auto proxy = FaultProxy::Start((*reg)->port());
  ASSERT_OK(proxy);
  RunResult r = RunRegdisk({"build", P("d.raw"), "-t", "docker://" + (*reg)->host() + "/vm/faults:v1", "--layout",
                            "chunked", "--chunk-size", "64K", "-q"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  Build("d.raw", "same", {"--chunk-size", "64K"});
  const std::string layer = Layer("same").digest.hex();
  using Action = FaultProxy::Rule::Action;
  (*proxy)->AddRule({.method = "GET", .path_contains = layer, .action = Action::kCutAfter, .cut_after = 100});
  (*proxy)->AddRule({.method = "GET", .path_contains = layer, .action = Action::kStatus, .status = 503});
  (*proxy)->AddRule({.method = "GET", .path_contains = layer, .action = Action::kIgnoreRange});
  r = Pull("docker://" + (*proxy)->host() + "/vm/faults:v1");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ReadFileCapped(StoredDisk(), 1 << 28).value(), raw_);
  int faulted = 0, ranged = 0, whole = 0;
  for (const auto& s : (*proxy)->seen()) {
    faulted += s.faulted;  // the cut and the 503 (a dropped Range is not marked)
    ranged += s.path.find(layer) != std::string::npos && !s.range.empty();
    whole += s.path.find(layer) != std::string::npos && s.body_bytes == static_cast<uint64_t>(Layer("same").size);
  }
  EXPECT_EQ(faulted, 2);
  EXPECT_GE(ranged, 3);
  EXPECT_EQ(whole, 1) << "the server that ignored Range sent the whole blob once";
}

// Rewrites the chunked image in oci:SRC:v1 into oci:DST:v1 after `frames`
// changed the frames (offsets are then laid out again), `index` the encoded
// index and `annotations` the layer's annotations: a layer that lies, with
// digests that hold, as a hostile registry would serve it.
struct Lies {
  std::function<void(oci::ChunkIndex&, std::vector<std::string>&)> frames;
  std::function<void(std::string&)> index;
  std::function<void(std::map<std::string, std::string>&)> annotations;
};

void Rewrite(const fs::path& src, const fs::path& dst, const Lies& lies) {
  auto in = image::OciLayout::Open(src).value();
  json manifest = json::parse(in.ReadBlob(in.Resolve("v1").value(), 1 << 20).value());
  oci::Descriptor layer = oci::Descriptor::FromJson(manifest["layers"][0]).value();
  const std::string blob = in.ReadBlob(layer, 1 << 28).value();
  auto loc = oci::ChunkIndexLocationOf(layer).value().value();
  oci::ChunkIndex idx = oci::ParseChunkIndex(blob.substr(loc.offset, loc.length), loc, blob.size()).value();
  const std::string head = blob.substr(0, idx.HeaderFrameLength());
  std::vector<std::string> frames;
  for (const auto& c : idx.chunks) frames.push_back(blob.substr(c.frame_offset, c.frame_length));
  const uint64_t last = idx.chunks.back().frame_offset + idx.chunks.back().frame_length;
  const std::string tail = blob.substr(last, loc.offset - last);
  const std::string seek = blob.substr(loc.offset + loc.length);
  if (lies.frames) lies.frames(idx, frames);
  uint64_t at = head.size();
  std::string out = head;
  for (size_t k = 0; k < frames.size(); ++k) {
    idx.chunks[k].frame_offset = at;
    idx.chunks[k].frame_length = static_cast<uint32_t>(frames[k].size());
    at += frames[k].size();
    out += frames[k];
  }
  out += tail;
  std::string index = oci::EncodeChunkIndex(idx);
  if (lies.index) lies.index(index);
  layer.annotations["io.regdisk.chunked.index.offset"] = std::to_string(out.size());
  layer.annotations["io.regdisk.chunked.index.length"] = std::to_string(index.size());
  layer.annotations["io.regdisk.chunked.index.digest"] = oci::Digest::Sha256Of(index).str();
  out += index + seek;
  layer.size = static_cast<int64_t>(out.size());
  layer.digest = oci::Digest::Sha256Of(out);
  if (lies.annotations) lies.annotations(layer.annotations);

  auto dest = image::OciLayout::OpenOrCreate(dst).value();
  ASSERT_OK(dest.WriteBlobBytes(layer, out));
  oci::Descriptor config = oci::Descriptor::FromJson(manifest["config"]).value();
  ASSERT_OK(dest.WriteBlobBytes(config, in.ReadBlob(config, 1 << 20).value()));
  manifest["layers"][0] = layer.ToJson();
  const std::string bytes = manifest.dump();
  oci::Descriptor md;
  md.media_type = std::string(oci::media::kOciManifest);
  md.digest = oci::Digest::Sha256Of(bytes);
  md.size = static_cast<int64_t>(bytes.size());
  ASSERT_OK(dest.WriteBlobBytes(md, bytes));
  ASSERT_OK(dest.AddToIndex(md, "v1"));
}

std::string Compressed(const std::string& data) {
  std::string out(ZSTD_compressBound(data.size()), '\0');
  out.resize(ZSTD_compress(out.data(), out.size(), data.data(), data.size(), 3));
  return out;
}

void PutLe(std::string& b, size_t at, uint64_t v, size_t n) {
  for (size_t i = 0; i < n; ++i) b[at + i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

TEST_F(ChunkedTest, HostileLayersAreRefusedAndLeaveNothing) {
  Build("d.raw", "good");
  const size_t entries = 8 + oci::chunked::kHeaderBytes;  // in the index frame
  struct Case {
    std::string name;
    Lies lies;
    std::string words;
  };
  const std::vector<Case> cases = {
      {"wrong chunk hash",
       {.frames = [](oci::ChunkIndex&, std::vector<std::string>& f) { f[3] = Compressed(RandomBytes(kMiB, 99)); }},
       "chunk 3 of layer 1"},
      {"data in a zero chunk",
       {.frames = [](oci::ChunkIndex&, std::vector<std::string>& f) { f[1] = Compressed(RandomBytes(kMiB, 98)); }},
       "marks it zero but it holds data"},
      {"frame expanding past its chunk",
       {.frames = [](oci::ChunkIndex&, std::vector<std::string>& f) { f[0] = Compressed(std::string(kMiB + 1, 'x')); }},
       "declares 1048577 bytes for a chunk of 1048576"},
      {"overlapping frames",
       {.index = [&](std::string& b) { PutLe(b, entries + 2 * 48, Le(b, entries + 2 * 48, 8) - 1, 8); }},
       "overlaps the frame before it"},
      {"chunk count not matching the disk size",
       {.index = [](std::string& b) { PutLe(b, 8 + 8, Le(b, 8 + 8, 8) + kMiB, 8); }},
       "lists 6 chunks, but a disk of"},
      {"frame past the index",
       {.index = [&](std::string& b) { PutLe(b, entries + 5 * 48 + 8, 4000, 4); }},
       "past the index"},
      {"annotation outside the blob",
       {.annotations = [](std::map<std::string, std::string>& a) { a["io.regdisk.chunked.index.offset"] = "99999999"; }},
       "outside the blob"},
      {"index not matching its annotated digest",
       {.annotations =
            [](std::map<std::string, std::string>& a) {
              a["io.regdisk.chunked.index.digest"] = oci::Digest::Sha256Of("another index").str();
            }},
       "the chunk index failed verification"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(cases[i].name);
    const std::string dir = "hostile" + std::to_string(i);
    Rewrite(P("good"), P(dir), cases[i].lies);
    RunResult r = Pull("oci:" + P(dir) + ":v1");
    EXPECT_NE(r.exit_code, 0);
    EXPECT_THAT(r.err, HasSubstr(cases[i].words));
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    ExpectStoreEmpty();
  }
  // The untouched image pulls (the rewrite itself is faithful).
  Rewrite(P("good"), P("faithful"), {});
  RunResult r = Pull("oci:" + P("faithful") + ":v1");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ReadFileCapped(StoredDisk(), 1 << 28).value(), raw_);
}

}  // namespace
}  // namespace regdisk::testing
