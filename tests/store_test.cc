// The node store: pulling registry disks, flattening layers, and refusing
// hostile images without leaving anything behind.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>
#include <map>
#include <thread>

#include "harness/harness.h"
#include "image/layout.h"
#include "image/transport.h"
#include "store/store.h"
#include "util/process.h"

namespace regdisk::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using Type = TarEntry::Type;
namespace fs = std::filesystem;
using json = nlohmann::json;

class StoreTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    root_ = (tmp() / "root").string();
  }
  std::string Layout(const std::string& tag) { return "oci:" + (tmp() / "layout").string() + ":" + tag; }
  RunResult Regdisk(std::vector<std::string> args, std::vector<std::string> env = {}) {
    args.insert(args.begin(), {"--root", root_});
    return RunRegdisk(args, {}, env);
  }
  // A qcow2 made by qemu-img with recognisable data, and its bytes.
  std::string MakeQcow2(const std::string& name, const std::string& size = "8M") {
    std::string p = (tmp() / name).string();
    EXPECT_EQ(RunProgram({"qemu-img", "create", "-q", "-f", "qcow2", p, size}).exit_code, 0);
    EXPECT_EQ(RunProgram({"qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 64k", p}).exit_code, 0);
    return ReadFileCapped(p, 1 << 26).value();
  }
  // An image whose single layer holds /disk (107:107, 0555) and the files.
  std::string PushDiskImage(const std::string& tag, const std::vector<std::pair<std::string, std::string>>& files,
                            const std::string& compression = "gzip") {
    std::vector<TarEntry> entries = {{"disk", Type::kDir, "", "", 107, 107, 0555}};
    for (const auto& [name, data] : files) entries.push_back({"disk/" + name, Type::kFile, data, "", 107, 107, 0444});
    return PushLayers(tag, {MakeTar(entries, compression)}, compression);
  }
  std::string PushLayers(const std::string& tag, const std::vector<std::string>& layers, const std::string& compression) {
    std::vector<std::pair<std::string, std::string>> ls;
    for (const auto& l : layers) ls.emplace_back(LayerMediaType(compression), l);
    auto img = MakeImageFromLayers(tmp() / "layout", tag, ls);
    EXPECT_TRUE(img.ok());
    return img.ok() ? img->manifest_digest.str() : "";
  }
  // Pulls, and answers with the stored image as images -o json describes it
  // (name, digest, disk: path, format, virtualSize, size, file) in out. The
  // arguments are those of the "inspect --disk" that once did both.
  RunResult PullDescribe(std::vector<std::string> args) {
    auto at = std::find(args.begin(), args.end(), "inspect");
    *at = "pull";
    args.erase(at + 1);  // --disk
    RunResult r = Regdisk(args);
    if (r.exit_code != 0) return r;
    const std::string name = image::ImageName::Parse(args.back()).value().String();
    RunResult list = Regdisk({"images", "-o", "json"});
    r.out.clear();
    for (const auto& img : json::parse(list.out)) {
      if (img["name"] == name) r.out = img.dump();
    }
    return r;
  }
  // The store holds no image, no blob, no staging and no partial download.
  void ExpectStoreEmpty() {
    for (const char* sub : {"disks", "blobs/sha256", "tmp", "ingest"}) {
      fs::path p = fs::path(root_) / sub;
      if (fs::exists(p)) {
        EXPECT_TRUE(fs::is_empty(p)) << sub << " is not empty";
      }
    }
  }
  // A pull of a 4 MiB disk through a proxy that cuts the layer after 1 MiB;
  // the pull then waits `backoff_ms` before retrying. Returns once the
  // ingest file holds exactly that first MiB, with the pull still running.
  struct CutPull {
    std::unique_ptr<TestRegistry> reg;
    std::unique_ptr<FaultProxy> proxy;
    std::string remote;
    std::optional<Process> pull;
  };
  void StartCutPull(CutPull& c, uint32_t seed, int backoff_ms, Process::Stdio stderr_mode) {
    auto reg = TestRegistry::Start(RegistryMode::kPlain);
    ASSERT_OK(reg);
    c.reg = std::move(*reg);
    PushDiskImage("v1", {{"disk.img", RandomBytes(4 << 20, seed)}});
    ASSERT_EQ(RunRegdisk({"copy", Layout("v1"), "docker://" + c.reg->host() + "/vm/cut:v1"}).exit_code, 0);
    auto proxy = FaultProxy::Start(c.reg->port());
    ASSERT_OK(proxy);
    c.proxy = std::move(*proxy);
    c.remote = "docker://" + c.proxy->host() + "/vm/cut:v1";
    FaultProxy::Rule cut;
    cut.method = "GET";
    cut.path_contains = "/blobs/";
    cut.action = FaultProxy::Rule::Action::kCutAfter;
    cut.cut_after = 1 << 20;
    c.proxy->AddRule(cut);  // the config
    c.proxy->AddRule(cut);  // the layer
    std::vector<std::string> env = {"REGDISK_BACKOFF_MS=" + std::to_string(backoff_ms)};
    for (char** e = environ; *e; ++e) env.emplace_back(*e);
    Process::Options opt;
    opt.env = env;
    opt.stderr_mode = stderr_mode;
    auto pull = Process::Spawn({REGDISK_BIN, "--root", root_, "pull", c.remote}, opt);
    ASSERT_OK(pull);
    c.pull.emplace(std::move(*pull));
    uint64_t have = 0;
    for (int i = 0; i < 500 && have < (1u << 20); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      std::error_code ec;
      for (const auto& e : fs::directory_iterator(fs::path(root_) / "ingest", ec)) {
        have = std::max<uint64_t>(have, fs::file_size(e.path()));
      }
    }
    ASSERT_EQ(have, 1u << 20) << "the ingest file should hold exactly what arrived before the cut";
  }
  std::string root_;
};

TEST_F(StoreTest, PullsQcow2FromARegistryOnceAndDescribesIt) {
  auto reg = TestRegistry::Start(RegistryMode::kPlain);
  ASSERT_OK(reg);
  std::string disk = MakeQcow2("fedora25.qcow2");
  std::string digest = PushDiskImage("v1", {{"fedora25.qcow2", disk}});
  std::string remote = "docker://" + (*reg)->host() + "/vmdisks/fedora25:latest";
  ASSERT_EQ(RunRegdisk({"copy", Layout("v1"), remote}).exit_code, 0);

  RunResult r = Regdisk({"-v", "pull", remote});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, digest + "\n");
  EXPECT_THAT(r.err, HasSubstr("streaming layer 1"));
  // One copy of the disk: the layer was streamed into it, not kept.
  EXPECT_TRUE(fs::is_empty(fs::path(root_) / "ingest"));
  for (const auto& e : fs::directory_iterator(fs::path(root_) / "blobs/sha256")) {
    EXPECT_LT(fs::file_size(e.path()), 4096u) << "a layer blob was kept: " << e.path();
  }

  r = Regdisk({"images", "-o", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json j = json::parse(r.out)[0];
  EXPECT_EQ(j["digest"], digest);
  EXPECT_EQ(j["disk"]["path"], "/disk/fedora25.qcow2");
  EXPECT_EQ(j["disk"]["format"], "qcow2");
  EXPECT_EQ(j["disk"]["virtualSize"], 8 << 20);
  EXPECT_EQ(j["disk"]["size"], disk.size());
  std::string stored = j["disk"]["file"];
  EXPECT_EQ(RunProgram({"qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", stored, (tmp() / "fedora25.qcow2").string()}).exit_code, 0);
  struct stat st;
  ASSERT_EQ(::stat(stored.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0444u);  // read-only once committed

  // Pulling again is a no-op: nothing is fetched.
  r = Regdisk({"-v", "pull", remote});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, ::testing::Not(HasSubstr("streaming layer")));

  r = Regdisk({"images"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr((*reg)->host() + "/vmdisks/fedora25  latest"));
  EXPECT_THAT(r.out, HasSubstr("qcow2"));
  r = Regdisk({"images", "-o", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)[0]["digest"], digest);
}

TEST_F(StoreTest, LayerCompressionsAndSparseRawDisks) {
  // 4 MiB raw disk: a boot sector, then zeros.
  std::string raw(4 << 20, '\0');
  raw.replace(0, 5, "HELLO");
  raw[510] = '\x55';
  raw[511] = '\xaa';
  for (const char* c : {"gzip", "zstd", ""}) {
    std::string tag = std::string("raw-") + (*c ? c : "none");
    PushDiskImage(tag, {{"disk.img", raw}}, c);
    RunResult r = PullDescribe({"inspect", "--disk", Layout(tag)});
    ASSERT_EQ(r.exit_code, 0) << c << ": " << r.err;
    json j = json::parse(r.out);
    EXPECT_EQ(j["disk"]["format"], "raw");
    EXPECT_EQ(j["disk"]["virtualSize"], 4 << 20);
    std::string file = j["disk"]["file"];
    EXPECT_EQ(ReadFileCapped(file, 8 << 20).value(), raw);
    struct stat st;
    ASSERT_EQ(::stat(file.c_str(), &st), 0);
    // (file systems may preallocate a little around the one data block)
    EXPECT_LT(st.st_blocks * 512, 1 << 20) << "zero blocks were written as data";
  }
}

TEST_F(StoreTest, WhiteoutsAndDiskAsAFile) {
  std::string a = MakeQcow2("a.qcow2", "1M"), b = MakeQcow2("b.qcow2", "2M"), c = MakeQcow2("c.qcow2", "3M");
  std::string l1 = MakeTar({{"disk", Type::kDir, "", "", 107, 107, 0555},
                            {"disk/a.qcow2", Type::kFile, a},
                            {"disk/b.qcow2", Type::kFile, b}},
                           "gzip");
  // .wh.b.qcow2 deletes b: a is left.
  PushLayers("whiteout", {l1, MakeTar({{"disk/.wh.b.qcow2", Type::kFile, ""}}, "gzip")}, "gzip");
  RunResult r = PullDescribe({"inspect", "--disk", Layout("whiteout")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["disk"]["path"], "/disk/a.qcow2");
  // An opaque directory hides everything below it: only c is left.
  PushLayers("opaque", {l1, MakeTar({{"disk/.wh..wh..opq", Type::kFile, ""}, {"disk/c.qcow2", Type::kFile, c}}, "gzip")},
             "gzip");
  r = PullDescribe({"inspect", "--disk", Layout("opaque")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["disk"]["path"], "/disk/c.qcow2");
  EXPECT_EQ(json::parse(r.out)["disk"]["virtualSize"], 3 << 20);
  // Without --path two disks are an error that lists them; with it, fine.
  PushLayers("two", {l1}, "gzip");
  r = PullDescribe({"inspect", "--disk", Layout("two")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("holds 2 files under /disk (\"/disk/a.qcow2\", \"/disk/b.qcow2\"); name one with --path"));
  r = PullDescribe({"inspect", "--disk", "--path", "/disk/b.qcow2", Layout("two")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["disk"]["virtualSize"], 2 << 20);
  // The same image's other disk is a disk of its own, not the one pulled before.
  r = PullDescribe({"inspect", "--disk", "--path", "/disk/a.qcow2", Layout("two")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["disk"]["path"], "/disk/a.qcow2");
  EXPECT_EQ(json::parse(r.out)["disk"]["virtualSize"], 1 << 20);
  // /disk itself as a file (ADD disk.qcow2 /disk onto a base without /disk).
  PushLayers("file", {MakeTar({{"disk", Type::kFile, a}}, "gzip")}, "gzip");
  r = PullDescribe({"inspect", "--disk", Layout("file")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["disk"]["path"], "/disk");
}

TEST_F(StoreTest, HostileImagesAreRefusedAndLeaveNothing) {
  std::string good = MakeQcow2("good.qcow2", "1M");
  std::string host = (tmp() / "host-secret").string();
  ASSERT_OK(WriteFileAtomic(host, "secret"));
  std::string backed = (tmp() / "backed.qcow2").string();
  ASSERT_EQ(RunProgram({"qemu-img", "create", "-q", "-f", "qcow2", "-b", host, "-F", "raw", backed}).exit_code, 0);
  std::string datafile = (tmp() / "external.qcow2").string();
  ASSERT_EQ(RunProgram({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=" + (tmp() / "ext.raw").string(), datafile, "1M"}).exit_code, 0);
  std::string vmdk = (tmp() / "disk.vmdk").string();
  ASSERT_EQ(RunProgram({"qemu-img", "convert", "-f", "qcow2", "-O", "vmdk", (tmp() / "good.qcow2").string(), vmdk}).exit_code, 0);
  const TarEntry dir{"disk", Type::kDir, "", "", 107, 107, 0555};

  struct Case {
    std::string name;
    std::vector<TarEntry> entries;
    std::string message;
  };
  const Case cases[] = {
      {"symlink", {dir, {"disk/disk.img", Type::kSymlink, "", "/etc/passwd"}}, "has a symlink at \"/disk/disk.img\" pointing to \"/etc/passwd\""},
      {"symlinked dir", {{"disk", Type::kSymlink, "", "/etc"}}, "has a symlink at \"/disk\" pointing to \"/etc\""},
      {"hard link", {{"etc/passwd", Type::kFile, "root:x:0:0"}, dir, {"disk/disk.img", Type::kHardlink, "", "etc/passwd"}},
       "has a hard link at \"/disk/disk.img\""},
      {"dotdot", {dir, {"disk/../../escape", Type::kFile, good}}, "climbs out with \"..\""},
      {"absolute", {{"/disk/disk.qcow2", Type::kFile, good}}, "absolute path \"/disk/disk.qcow2\""},
      {"fifo", {dir, {"disk/disk.img", Type::kFifo}}, "has a device, FIFO or socket at \"/disk/disk.img\""},
      {"device", {dir, {"disk/disk.img", Type::kCharDevice}}, "has a device, FIFO or socket at \"/disk/disk.img\""},
      {"backing file", {dir, {"disk/backed.qcow2", Type::kFile, ReadFileCapped(backed, 1 << 20).value()}}, "has a backing file"},
      {"external data", {dir, {"disk/ext.qcow2", Type::kFile, ReadFileCapped(datafile, 1 << 20).value()}}, "external data file"},
      {"truncated", {dir, {"disk/short.qcow2", Type::kFile, good.substr(0, 50)}}, "the header is truncated"},
      {"vmdk", {dir, {"disk/disk.vmdk", Type::kFile, ReadFileCapped(vmdk, 1 << 22).value()}},
       "is in VMDK format; regdisk runs qcow2 and raw disks only, convert it with: qemu-img convert -f vmdk -O qcow2 disk.vmdk disk.qcow2"},
      {"two disks", {dir, {"disk/a.img", Type::kFile, good}, {"disk/b.img", Type::kFile, good}}, "files under /disk"},
      {"no disk", {dir, {"etc/hostname", Type::kFile, "x"}}, "the image holds no disk"},
  };
  for (const auto& c : cases) {
    std::string tag = "bad-" + std::to_string(&c - cases);
    PushLayers(tag, {MakeTar(c.entries, "gzip")}, "gzip");
    RunResult r = Regdisk({"pull", Layout(tag)});
    EXPECT_NE(r.exit_code, 0) << c.name;
    EXPECT_LT(r.exit_code, 128) << c.name << " crashed";
    EXPECT_THAT(r.err, HasSubstr(c.message)) << c.name;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << c.name << ": " << r.err;
    ExpectStoreEmpty();
  }
  EXPECT_FALSE(fs::exists("/escape"));
  EXPECT_FALSE(fs::exists(tmp() / "escape"));

  // A layer declared gzip that is not, and a layer whose bytes do not match
  // their digest.
  auto img = MakeImageFromLayers(tmp() / "layout", "liar", {{LayerMediaType("gzip"), MakeTar({dir, {"disk/a", Type::kFile, good}}, "")}});
  ASSERT_OK(img);
  RunResult r = Regdisk({"pull", Layout("liar")});
  EXPECT_THAT(r.err, HasSubstr("is declared gzip but its bytes say otherwise"));
  ExpectStoreEmpty();
  PushDiskImage("corrupt", {{"a.qcow2", good}});
  auto corrupt = image::OciLayout::Open(tmp() / "layout").value().Resolve("corrupt");
  ASSERT_OK(corrupt);
  auto m = oci::Manifest::Parse(ReadFileCapped(tmp() / "layout/blobs/sha256" / corrupt->digest.hex(), 1 << 20).value());
  fs::path blob = tmp() / "layout/blobs/sha256" / m->layers[0].digest.hex();
  ::chmod(blob.c_str(), 0644);
  std::string bytes = ReadFileCapped(blob, 1 << 24).value();
  bytes[bytes.size() / 2] ^= 0x40;
  ASSERT_OK(WriteFileAtomic(blob, bytes));
  r = Regdisk({"pull", Layout("corrupt")});
  EXPECT_THAT(r.err, HasSubstr("failed verification"));
  ExpectStoreEmpty();

  // A manifest whose config claims 5 GB: refused before fetching anything.
  json manifest = json::parse(ReadFileCapped(tmp() / "layout/blobs/sha256" / corrupt->digest.hex(), 1 << 20).value());
  manifest["config"]["size"] = 5000000000LL;
  const std::string mbytes = manifest.dump();
  const oci::Digest md = oci::Digest::Sha256Of(mbytes);
  ASSERT_OK(WriteFileAtomic(tmp() / "layout/blobs/sha256" / md.hex(), mbytes));
  json index = json::parse(ReadFileCapped(tmp() / "layout/index.json", 1 << 20).value());
  index["manifests"].push_back({{"mediaType", manifest.value("mediaType", "application/vnd.oci.image.manifest.v1+json")},
                                {"digest", md.str()},
                                {"size", mbytes.size()},
                                {"annotations", {{"org.opencontainers.image.ref.name", "huge-config"}}}});
  ASSERT_OK(WriteFileAtomic(tmp() / "layout/index.json", index.dump()));
  r = Regdisk({"pull", Layout("huge-config")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("the image config is 5000000000 bytes, over the limit"));
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  ExpectStoreEmpty();
}

TEST_F(StoreTest, ConcurrentPullsFetchOnceAndBothSucceed) {
  auto reg = TestRegistry::Start(RegistryMode::kPlain);
  ASSERT_OK(reg);
  std::string disk = MakeQcow2("disk.qcow2", "16M") + RandomBytes(2 << 20, 5);  // trailing bytes are fine for qcow2
  PushDiskImage("v1", {{"disk.qcow2", disk}});
  ASSERT_EQ(RunRegdisk({"copy", Layout("v1"), "docker://" + (*reg)->host() + "/vm/shared:v1"}).exit_code, 0);
  auto proxy = FaultProxy::Start((*reg)->port());
  ASSERT_OK(proxy);
  std::string remote = "docker://" + (*proxy)->host() + "/vm/shared:v1";
  RunResult r1, r2;
  std::thread t1([&] { r1 = Regdisk({"pull", remote}); });
  std::thread t2([&] { r2 = Regdisk({"pull", remote}); });
  t1.join();
  t2.join();
  ASSERT_EQ(r1.exit_code, 0) << r1.err;
  ASSERT_EQ(r2.exit_code, 0) << r2.err;
  EXPECT_EQ(r1.out, r2.out);
  int layer_gets = 0;
  for (const auto& s : (*proxy)->seen()) {
    if (s.method == "GET" && s.path.find("/blobs/") != std::string::npos) ++layer_gets;
  }
  EXPECT_EQ(layer_gets, 2);  // the config and the layer, once each
}

TEST_F(StoreTest, GzipLayersWithSeveralMembersAndBrokenStreams) {
  std::string disk = MakeQcow2("m.qcow2", "2M");
  std::string tar = MakeTar({{"disk", Type::kDir, "", "", 107, 107, 0555}, {"disk/m.qcow2", Type::kFile, disk}}, "");
  auto gz = [&](const std::string& data) { return RunProgram({"gzip", "-c", "-n"}, data).out; };
  // pigz-style: the tar stream split across two concatenated gzip members.
  std::string two = gz(tar.substr(0, 70001)) + gz(tar.substr(70001));
  PushLayers("members", {two}, "gzip");
  RunResult r = PullDescribe({"inspect", "--disk", Layout("members")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ReadFileCapped(json::parse(r.out)["disk"]["file"].get<std::string>(), 1 << 24).value(), disk);
  // Truncated and corrupted gzip streams are refused cleanly (in a store of
  // their own, to check that they leave nothing).
  root_ = (tmp() / "root-broken").string();
  std::string whole = gz(tar);
  PushLayers("truncated", {whole.substr(0, whole.size() / 2)}, "gzip");
  r = Regdisk({"pull", Layout("truncated")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("layer 1"));
  ExpectStoreEmpty();
  std::string bad = whole;
  for (size_t i = 100; i < 400; ++i) bad[i] = static_cast<char>(bad[i] ^ 0x5a);
  PushLayers("corrupt", {bad}, "gzip");
  r = Regdisk({"pull", Layout("corrupt")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("layer 1"));
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  ExpectStoreEmpty();
}

TEST_F(StoreTest, InterruptedDownloadResumesFromTheIngestFile) {
  auto reg = TestRegistry::Start(RegistryMode::kPlain);
  ASSERT_OK(reg);
  std::string disk = RandomBytes(3 << 20, 11);  // raw; incompressible
  PushDiskImage("v1", {{"disk.img", disk}});
  ASSERT_EQ(RunRegdisk({"copy", Layout("v1"), "docker://" + (*reg)->host() + "/vm/resume:v1"}).exit_code, 0);
  auto layout = image::OciLayout::Open(tmp() / "layout").value();
  auto m = oci::Manifest::Parse(layout.ReadBlob(layout.Resolve("v1").value(), 1 << 20).value()).value();
  const oci::Descriptor& layer = m.layers[0];
  std::string bytes = layout.ReadBlob(layer, 1 << 24).value();
  // What a killed pull leaves: the first half of the layer in ingest/.
  const uint64_t half = bytes.size() / 2;
  ASSERT_OK(MakeDirs(fs::path(root_) / "ingest"));
  ASSERT_OK(WriteFileAtomic(fs::path(root_) / "ingest" / ("sha256-" + layer.digest.hex()), bytes.substr(0, half), 0600));
  auto proxy = FaultProxy::Start((*reg)->port());
  ASSERT_OK(proxy);
  RunResult r = Regdisk({"pull", "docker://" + (*proxy)->host() + "/vm/resume:v1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  bool resumed = false;
  for (const auto& s : (*proxy)->seen()) {
    if (s.path.find(layer.digest.hex()) == std::string::npos) continue;
    EXPECT_EQ(s.range, "bytes=" + std::to_string(half) + "-");
    EXPECT_EQ(s.body_bytes, bytes.size() - half);
    resumed = true;
  }
  EXPECT_TRUE(resumed);
  r = PullDescribe({"inspect", "--disk", "docker://" + (*proxy)->host() + "/vm/resume:v1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ReadFileCapped(json::parse(r.out)["disk"]["file"].get<std::string>(), 1 << 24).value(), disk);
  // A partial file with the wrong bytes is detected, and the blob fetched
  // again from the start.
  root_ = (tmp() / "root2").string();
  ASSERT_OK(MakeDirs(fs::path(root_) / "ingest"));
  ASSERT_OK(WriteFileAtomic(fs::path(root_) / "ingest" / ("sha256-" + layer.digest.hex()), std::string(half, 'x'), 0600));
  r = PullDescribe({"inspect", "--disk", "docker://" + (*proxy)->host() + "/vm/resume:v1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("did not verify; fetching it again from the start"));
  EXPECT_EQ(ReadFileCapped(json::parse(r.out)["disk"]["file"].get<std::string>(), 1 << 24).value(), disk);
}

TEST_F(StoreTest, AStreamedLayerSurvivesCutsAndAWrongDigestLeavesNothing) {
  auto reg = TestRegistry::Start(RegistryMode::kPlain);
  ASSERT_OK(reg);
  std::string disk = RandomBytes(4 << 20, 21);  // raw; incompressible, so the cut lands mid-disk
  PushDiskImage("v1", {{"disk.img", disk}});
  ASSERT_EQ(RunRegdisk({"copy", Layout("v1"), "docker://" + (*reg)->host() + "/vm/cut:v1"}).exit_code, 0);
  auto layout = image::OciLayout::Open(tmp() / "layout").value();
  auto m = oci::Manifest::Parse(layout.ReadBlob(layout.Resolve("v1").value(), 1 << 20).value()).value();
  const std::string layer_path = "/blobs/" + m.layers[0].digest.str();
  auto proxy = FaultProxy::Start((*reg)->port());
  ASSERT_OK(proxy);
  FaultProxy::Rule cut;
  cut.method = "GET";
  cut.path_contains = layer_path;
  cut.action = FaultProxy::Rule::Action::kCutAfter;
  cut.cut_after = 1 << 20;
  cut.times = 2;
  (*proxy)->AddRule(cut);
  RunResult r = PullDescribe({"inspect", "--disk", "docker://" + (*proxy)->host() + "/vm/cut:v1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ReadFileCapped(json::parse(r.out)["disk"]["file"].get<std::string>(), 1 << 24).value(), disk);
  std::vector<std::string> ranges;
  for (const auto& s : (*proxy)->seen()) {
    if (s.path.find(layer_path) != std::string::npos) ranges.push_back(s.range);
  }
  ASSERT_EQ(ranges.size(), 3u);
  EXPECT_EQ(ranges[0], "");
  EXPECT_EQ(ranges[1], "bytes=" + std::to_string(1 << 20) + "-");
  EXPECT_EQ(ranges[2], "bytes=" + std::to_string(2 << 20) + "-");
  EXPECT_TRUE(fs::is_empty(fs::path(root_) / "ingest"));

  // A registry that serves other bytes under the layer's digest: the disk
  // written so far is discarded, nothing is left behind.
  fs::path blob = tmp() / "layout/blobs/sha256" / m.layers[0].digest.hex();
  std::string bytes = ReadFileCapped(blob, 1 << 24).value();
  bytes[bytes.size() - 100] ^= 0x01;  // late in the stream: the disk is nearly written
  fs::permissions(blob, fs::perms::owner_write, fs::perm_options::add);
  ASSERT_OK(WriteFileAtomic(blob, bytes, 0444));
  root_ = (tmp() / "root-liar").string();
  r = Regdisk({"pull", Layout("v1")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("failed verification"));
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  ExpectStoreEmpty();
}

TEST_F(StoreTest, APullKilledMidLayerResumesWhereItStopped) {
  // Killed while it waits a minute to retry after the cut.
  CutPull c;
  ASSERT_NO_FATAL_FAILURE(StartCutPull(c, 31, 60000, Process::Stdio::kNull));
  auto& pull = c.pull;
  const std::string remote = c.remote;
  auto& proxy = c.proxy;
  const fs::path ingest = fs::path(root_) / "ingest";
  const std::string disk = RandomBytes(4 << 20, 31);  // as StartCutPull made it
  pull->Signal(SIGKILL);
  EXPECT_TRUE(pull->Wait(std::chrono::seconds(10)).has_value());
  EXPECT_FALSE(fs::is_empty(fs::path(root_) / "tmp")) << "the killed pull's staging should be there";

  RunResult r = PullDescribe({"inspect", "--disk", remote});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(ReadFileCapped(json::parse(r.out)["disk"]["file"].get<std::string>(), 1 << 24).value(), disk);
  auto seen = proxy->seen();
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen.back().range, "bytes=" + std::to_string(1 << 20) + "-");
  EXPECT_TRUE(fs::is_empty(ingest));
  EXPECT_TRUE(fs::is_empty(fs::path(root_) / "tmp")) << "the re-pull should reclaim the killed pull's staging";
}

TEST_F(StoreTest, SigintStopsAPullAtOnceKeepsThePartialAndRemovesStaging) {
  // The pull waits ten minutes to retry after the cut: only the signal can
  // end it before the test's time is up.
  CutPull c;
  ASSERT_NO_FATAL_FAILURE(StartCutPull(c, 33, 600000, Process::Stdio::kPipe));
  auto& pull = c.pull;
  const std::string remote = c.remote;
  auto& proxy = c.proxy;
  const fs::path ingest = fs::path(root_) / "ingest";
  const std::string disk = RandomBytes(4 << 20, 33);  // as StartCutPull made it
  ::kill(pull->pid(), SIGINT);
  auto out = pull->Communicate(std::chrono::seconds(60));
  ASSERT_OK(out);
  EXPECT_EQ(out->exit_code, 130) << out->err;
  EXPECT_THAT(out->err, HasSubstr("interrupted"));
  EXPECT_EQ(std::count(out->err.begin(), out->err.end(), '\n'), 1) << out->err;
  EXPECT_TRUE(fs::is_empty(fs::path(root_) / "tmp")) << "the interrupted pull's staging should be gone";
  EXPECT_FALSE(fs::is_empty(ingest)) << "the partial download should be kept for a resume";

  RunResult r = Regdisk({"pull", remote});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(proxy->seen().back().range, "bytes=" + std::to_string(1 << 20) + "-");
}

TEST_F(StoreTest, FsckFindsEachKindOfDamageAndRepairRemovesIt) {
  PushDiskImage("a", {{"a.qcow2", MakeQcow2("a.qcow2")}});
  PushDiskImage("b", {{"b.img", RandomBytes(1 << 20, 51)}});
  PushDiskImage("c", {{"c.img", RandomBytes(1 << 20, 52)}});
  PushDiskImage("d", {{"d.img", RandomBytes(1 << 20, 53)}});
  std::map<std::string, json> disk;
  for (const char* t : {"a", "b", "c", "d"}) {
    RunResult r = PullDescribe({"inspect", "--disk", Layout(t)});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    disk[t] = json::parse(r.out);
  }
  RunResult r = Regdisk({"fsck"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_THAT(r.out, HasSubstr("is whole"));

  auto writable = [](const fs::path& p) {
    ::chmod(p.parent_path().c_str(), 0755);
    ::chmod(p.c_str(), 0644);
  };
  // a: a bit flipped in the qcow2 header's magic; b: its manifest blob
  // damaged; c: the disk file truncated; d: its directory gone, name left.
  const fs::path a = disk["a"]["disk"]["file"].get<std::string>();
  writable(a);
  std::string bytes = ReadFileCapped(a, 1 << 26).value();
  bytes[0] ^= 1;
  ASSERT_OK(WriteFileAtomic(a, bytes, 0444));
  const fs::path b_manifest = fs::path(root_) / "blobs/sha256" / disk["b"]["digest"].get<std::string>().substr(7);
  ::chmod(b_manifest.c_str(), 0644);
  ASSERT_OK(WriteFileAtomic(b_manifest, "{}", 0444));
  const fs::path c = disk["c"]["disk"]["file"].get<std::string>();
  writable(c);
  ASSERT_EQ(::truncate(c.c_str(), 4096), 0);
  ::chmod(c.c_str(), 0444);
  const fs::path d = fs::path(disk["d"]["disk"]["file"].get<std::string>()).parent_path();
  ::chmod(d.c_str(), 0755);
  fs::remove_all(d);

  r = Regdisk({"fsck"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, HasSubstr("its disk is raw, the record says qcow2"));  // no qcow2 magic: raw bytes
  EXPECT_THAT(r.out, HasSubstr("blob \"" + b_manifest.filename().string() + "\" hashes to sha256:"));
  EXPECT_THAT(r.out, HasSubstr("its manifest sha256:"));
  EXPECT_THAT(r.out, HasSubstr("its disk file is 4096 bytes, the record says 1048576"));
  EXPECT_THAT(r.out, HasSubstr("which is missing"));
  EXPECT_THAT(r.err, HasSubstr("regdisk fsck --repair removes what is broken"));
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 8) << r.out;  // 1 blob, 3 disks, 4 names

  r = Regdisk({"fsck", "--repair"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_THAT(r.out, HasSubstr("removed: "));
  EXPECT_THAT(r.out, Not(HasSubstr("broken: ")));
  r = Regdisk({"fsck"});
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_TRUE(fs::is_empty(fs::path(root_) / "disks"));
  r = Regdisk({"images"});
  EXPECT_THAT(r.out, Not(HasSubstr("oci:")));
  // Pulling again brings them back whole.
  for (const char* t : {"a", "b", "c", "d"}) ASSERT_EQ(Regdisk({"pull", Layout(t)}).exit_code, 0) << t;
  EXPECT_EQ(Regdisk({"fsck"}).exit_code, 0);
}

TEST_F(StoreTest, AKillAfterTheWholeLayerArrivedResumesWithoutAskingForMore) {
  // Found by KillTest: the ingest file held every byte of the layer (the
  // pull was killed after its download, before the layer was applied), and
  // the resume asked docker-registry for an empty range, which it answers
  // with a body libcurl calls a broken transfer, six times over.
  auto reg = TestRegistry::Start(RegistryMode::kPlain);
  ASSERT_OK(reg);
  const std::string disk = RandomBytes(1 << 20, 71);
  const std::string digest = PushDiskImage("v1", {{"disk.img", disk}});
  const std::string remote = "docker://" + (*reg)->host() + "/vm/whole:v1";
  ASSERT_EQ(RunRegdisk({"copy", Layout("v1"), remote}).exit_code, 0);
  auto m = oci::Manifest::Parse(ReadFileCapped(tmp() / "layout/blobs/sha256" / digest.substr(7), 1 << 20).value());
  ASSERT_OK(m);
  const oci::Digest layer = m->layers[0].digest;
  ASSERT_OK(MakeDirs(fs::path(root_) / "ingest"));
  ASSERT_OK(WriteFileAtomic(fs::path(root_) / "ingest" / ("sha256-" + layer.hex()),
                            ReadFileCapped(tmp() / "layout/blobs/sha256" / layer.hex(), 1 << 24).value()));
  RunResult r = PullDescribe({"-v", "inspect", "--disk", remote});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("resuming layer " + layer.Short()));
  EXPECT_EQ(ReadFileCapped(json::parse(r.out)["disk"]["file"].get<std::string>(), 1 << 24).value(), disk);
}

TEST_F(StoreTest, DiskSizesAreCapped) {
  // A qcow2 of a few KiB that declares 2 TiB, over the default 1 TiB.
  const std::string huge = P("huge.qcow2");
  ASSERT_EQ(RunProgram({"qemu-img", "create", "-q", "-f", "qcow2", huge, "2T"}).exit_code, 0);
  PushDiskImage("huge", {{"huge.qcow2", ReadFileCapped(huge, 1 << 20).value()}});
  RunResult r = Regdisk({"pull", Layout("huge")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("\"/disk/huge.qcow2\" declares a virtual size of 2199023255552 bytes, over the maximum "
                               "disk size of 1099511627776 bytes; raise it with --max-disk-size"));
  ExpectStoreEmpty();
  r = Regdisk({"--max-disk-size", "3Ti", "pull", Layout("huge")});
  EXPECT_EQ(r.exit_code, 0) << r.err;

  // A raw disk larger than the flag allows, and a flag that is no size.
  PushDiskImage("raw", {{"disk.img", std::string(2 << 20, 'r')}});
  r = Regdisk({"--max-disk-size", "1Mi", "pull", Layout("raw")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("\"/disk/disk.img\" of 2.0 MiB (2097152 bytes), over the maximum disk size of 1.0 MiB"));
  EXPECT_TRUE(fs::is_empty(fs::path(root_) / "tmp"));
  r = Regdisk({"--max-disk-size", "lots", "pull", Layout("raw")});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("--max-disk-size takes a size such as 500Gi or 2Ti, not \"lots\""));
}

TEST_F(StoreTest, RmiAndPruneRemoveWhatNoNameRefersTo) {
  std::string a = MakeQcow2("a.qcow2");
  PushDiskImage("a", {{"a.qcow2", a}});
  PushDiskImage("b", {{"b.img", RandomBytes(1 << 20, 41)}});
  // Two names for image a, one for b.
  ASSERT_EQ(Regdisk({"pull", Layout("a")}).exit_code, 0);
  ASSERT_EQ(RunRegdisk({"copy", Layout("a"), Layout("a2")}).exit_code, 0);
  ASSERT_EQ(Regdisk({"pull", Layout("a2")}).exit_code, 0);
  ASSERT_EQ(Regdisk({"pull", Layout("b")}).exit_code, 0);
  auto count = [&](const char* sub) {
    return std::distance(fs::directory_iterator(fs::path(root_) / sub), fs::directory_iterator());
  };
  ASSERT_EQ(count("disks"), 2);

  // An unknown name: nothing is removed.
  RunResult r = Regdisk({"rmi", Layout("a"), Layout("nope")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_THAT(r.err, HasSubstr("no image named"));
  EXPECT_EQ(json::parse(Regdisk({"images", "-o", "json"}).out).size(), 3u);

  // One of a's names: its disk stays for the other.
  r = Regdisk({"rmi", Layout("a")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("0 disks"));
  EXPECT_EQ(count("disks"), 2);
  // Both gone: a's disk, manifest and config go; b is untouched and usable.
  ASSERT_OK(MakeDirs(fs::path(root_) / "tmp" / "left-by-a-killed-pull"));
  ASSERT_OK(WriteFileAtomic(fs::path(root_) / "ingest" / "sha256-partial", "x", 0600));
  r = Regdisk({"rmi", Layout("a2")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("1 disks, 2 blobs"));
  EXPECT_EQ(count("disks"), 1);
  EXPECT_EQ(count("blobs/sha256"), 2);  // b's manifest and config
  EXPECT_EQ(count("tmp"), 0);
  EXPECT_EQ(count("ingest"), 0);
  json images = json::parse(Regdisk({"images", "-o", "json"}).out);
  ASSERT_EQ(images.size(), 1u);
  EXPECT_EQ(images[0]["name"], Layout("b"));
  r = PullDescribe({"inspect", "--disk", Layout("b")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // Nothing left to prune; pulling a again works.
  EXPECT_THAT(Regdisk({"prune"}).out, HasSubstr("0 disks, 0 blobs"));
  ASSERT_EQ(Regdisk({"pull", Layout("a")}).exit_code, 0);
}

TEST_F(StoreTest, PullReportsProgressPerLayer) {
  PushDiskImage("v1", {{"disk.img", RandomBytes(12 << 20, 51)}});
  auto st = store::Store::Open(root_);
  ASSERT_OK(st);
  auto name = image::ImageName::Parse(Layout("v1"));
  ASSERT_OK(name);
  auto src = image::OpenSource(*name, {});
  ASSERT_OK(src);
  using Kind = image::ProgressEvent::Kind;
  std::vector<image::ProgressEvent> calls;
  store::PullOptions po;
  po.on_progress = [&](const image::ProgressEvent& e) { calls.push_back(e); };
  ASSERT_OK(st->Pull(**src, name->String(), po));
  // Start, every 4 MiB of a 12 MiB layer, and done.
  ASSERT_GE(calls.size(), 4u);
  EXPECT_EQ(calls.front().kind, Kind::kStart);
  EXPECT_EQ(calls.front().done, 0u);
  EXPECT_EQ(calls.back().kind, Kind::kDone);
  for (size_t i = 0; i < calls.size(); ++i) {
    EXPECT_EQ(calls[i].blob, calls[0].blob);
    if (i > 0 && i + 1 < calls.size()) {
      EXPECT_EQ(calls[i].kind, Kind::kBytes);
      EXPECT_GT(calls[i].done, calls[i - 1].done);
    }
  }
  EXPECT_EQ(calls.back().done, calls.back().total);
  EXPECT_EQ(calls.back().total, 0u + static_cast<uint64_t>(fs::file_size(tmp() / "layout" / "blobs" / "sha256" / calls[0].blob.hex())));
}

}  // namespace
}  // namespace regdisk::testing
