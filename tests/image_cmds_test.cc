// The image commands as users of skopeo and podman read them: inspect
// (against skopeo's own output), images, rmi, domxml offline, the store
// keyed by platform, progress lines, and read-only commands that create
// nothing.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <regex>

#include "harness/harness.h"
#include "image/layout.h"
#include "image/transport.h"
#include "store/store.h"
#include "util/fs.h"

namespace regdisk::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;
using json = nlohmann::json;
using Type = TarEntry::Type;

class ImageCmdsTest : public StoreAndRegistryTest {
 protected:
  RunResult Regdisk(std::vector<std::string> args) {
    args.insert(args.begin(), {"--root", root_});
    return RunRegdisk(args);
  }
  std::string Remote(const std::string& repo) { return "docker://" + reg_->host() + "/" + repo; }
  // A qcow2 disk made by qemu-img, built into an image with regdisk build
  // (labels io.regdisk.disk.*) and pushed to `ref`.
  void BuildQcow2(const std::string& ref, const std::string& size = "16M") {
    const std::string p = P("disk.qcow2");
    ASSERT_EQ(RunProgram({"qemu-img", "create", "-q", "-f", "qcow2", p, size}).exit_code, 0);
    ASSERT_EQ(RunProgram({"qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 64k", p}).exit_code, 0);
    RunResult r = RunRegdisk({"build", p, "-t", ref, "--compression", "gzip", "--label", "team=disks"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  // A two-platform index (amd64 and arm64 raw disks with different bytes)
  // at `ref`; returns the arm64 and amd64 manifest digests.
  std::pair<std::string, std::string> PushTwoPlatforms(const std::string& ref) {
    auto amd = MakeTestImage(tmp() / "src", "amd", {{"disk/disk.img", std::string(4096, 'x')}}, "amd64");
    auto arm = MakeTestImage(tmp() / "src", "arm", {{"disk/disk.img", std::string(8192, 'a')}}, "arm64");
    EXPECT_TRUE(amd.ok() && arm.ok());
    EXPECT_TRUE(MakeTestIndex(tmp() / "src", "multi", {{&*amd, "amd64"}, {&*arm, "arm64"}}).ok());
    RunResult r = RunRegdisk({"copy", "--all", "oci:" + P("src") + ":multi", ref});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return {arm->manifest_digest.str(), amd->manifest_digest.str()};
  }
  static int Lines(const std::string& s) { return static_cast<int>(std::count(s.begin(), s.end(), '\n')); }
};

TEST_F(ImageCmdsTest, InspectHasSkopeosFieldsAndValues) {
  const std::string ref = Remote("vmdisks/f25:v1");
  BuildQcow2(ref);
  ASSERT_EQ(RunRegdisk({"copy", ref, Remote("vmdisks/f25:v2")}).exit_code, 0);

  RunResult s = RunProgram({"skopeo", "inspect", "--tls-verify=false", ref});
  ASSERT_EQ(s.exit_code, 0) << s.err;
  RunResult r = RunRegdisk({"inspect", ref});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json sk = json::parse(s.out), rd = json::parse(r.out);
  // The same keys, in skopeo's order (Tag and Variant are omitted when empty
  // by both), plus Disk. Debian's skopeo 1.9 predates LayersData (1.10).
  std::vector<std::string> sk_keys, rd_keys;
  const auto sk_ordered = nlohmann::ordered_json::parse(s.out), rd_ordered = nlohmann::ordered_json::parse(r.out);
  for (const auto& [k, v] : sk_ordered.items()) sk_keys.push_back(k);
  for (const auto& [k, v] : rd_ordered.items()) {
    if (k != "Disk" && (k != "LayersData" || sk.contains("LayersData"))) rd_keys.push_back(k);
  }
  EXPECT_EQ(rd_keys, sk_keys);
  for (const char* k : {"Name", "Digest", "RepoTags", "Created", "DockerVersion", "Labels", "Architecture", "Os", "Layers",
                        "Env"}) {
    EXPECT_EQ(rd[k], sk[k]) << k;
  }
  // LayersData as skopeo 1.10+ writes it, from the manifest.
  const json manifest = json::parse(RunProgram({"skopeo", "inspect", "--tls-verify=false", "--raw", ref}).out);
  ASSERT_EQ(rd["LayersData"].size(), manifest["layers"].size());
  for (size_t i = 0; i < manifest["layers"].size(); ++i) {
    const json& l = manifest["layers"][i];
    EXPECT_EQ(rd["LayersData"][i],
              json({{"MIMEType", l["mediaType"]}, {"Digest", l["digest"]}, {"Size", l["size"]},
                    {"Annotations", l.contains("annotations") ? l["annotations"] : json(nullptr)}}));
  }
  if (sk.contains("LayersData")) {
    EXPECT_EQ(rd["LayersData"], sk["LayersData"]);
  }
  EXPECT_EQ(rd["RepoTags"], json({"v1", "v2"}));
  EXPECT_EQ(rd["Labels"]["team"], "disks");
  EXPECT_EQ(rd["Disk"]["Path"], "/disk/disk.qcow2");
  EXPECT_EQ(rd["Disk"]["Format"], "qcow2");
  EXPECT_EQ(rd["Disk"]["VirtualSize"], 16 << 20);
  EXPECT_EQ(rd["Disk"]["From"], "labels");

  // --no-tags, --raw and --config, against skopeo's.
  r = RunRegdisk({"inspect", "--no-tags", ref});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["RepoTags"], json::array());
  s = RunProgram({"skopeo", "inspect", "--tls-verify=false", "--raw", ref});
  r = RunRegdisk({"inspect", "--raw", ref});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, s.out);
  s = RunProgram({"skopeo", "inspect", "--tls-verify=false", "--config", ref});
  r = RunRegdisk({"inspect", "--config", ref});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out), json::parse(s.out));
  s = RunProgram({"skopeo", "inspect", "--tls-verify=false", "--config", "--raw", ref});
  r = RunRegdisk({"inspect", "--config", "--raw", ref});
  EXPECT_EQ(r.out, s.out);

  // Go templates, as skopeo's --format reads them.
  for (const auto& [format, want] : std::vector<std::pair<std::string, std::string>>{
           {"{{.Digest}}", sk["Digest"].get<std::string>() + "\n"},
           {"{{.Os}}/{{.Architecture}}\\n", "linux/amd64\n"},
           {"{{.Labels.team}} {{index .Labels \"io.regdisk.disk.format\"}}", "disks qcow2\n"},
           {"{{json .Layers}}", sk["Layers"].dump() + "\n"},
           {"{{.RepoTags}}", "[v1 v2]\n"},
           {"{{.Disk.Format}}", "qcow2\n"},
           {"{{index .Labels \"absent\"}}", "\n"},
           {"{{.Labels.absent}}", "<no value>\n"},
       }) {
    r = RunRegdisk({"inspect", "--format", format, ref});
    ASSERT_EQ(r.exit_code, 0) << format << ": " << r.err;
    EXPECT_EQ(r.out, want) << format;
    // skopeo 1.9's templates have no json function.
    if (format.find("Disk") == std::string::npos && format.find('\\') == std::string::npos &&
        format.find("json") == std::string::npos) {
      s = RunProgram({"skopeo", "inspect", "--tls-verify=false", "--format", format, ref});
      ASSERT_EQ(s.exit_code, 0) << format << ": " << s.err;
      std::string sk_out = s.out;
      if (sk_out.empty() || sk_out.back() != '\n') sk_out += '\n';
      EXPECT_EQ(r.out, sk_out) << format << " (skopeo: " << s.err << ")";
    }
  }
  r = RunRegdisk({"inspect", "--format", "{{json .}}", ref});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["Digest"], sk["Digest"]);
  // Bad templates: one line, exit 2.
  for (const std::string bad : {"{{.Nope}}", "{{.Digest", "{{range .Layers}}{{.}}{{end}}", "{{printf \"%s\" .Os}}"}) {
    r = RunRegdisk({"inspect", "--format", bad, ref});
    EXPECT_EQ(r.exit_code, 2) << bad;
    EXPECT_EQ(Lines(r.err), 1) << r.err;
    EXPECT_THAT(r.err, HasSubstr("regdisk: error: --format")) << bad;
  }
}

TEST_F(ImageCmdsTest, InspectOfAnIndexGivesTheIndexDigestAndThePlatformsImage) {
  const std::string ref = Remote("vm/multi:v1");
  auto [arm, amd] = PushTwoPlatforms(ref);
  for (const std::string platform : {"linux/arm64", "linux/amd64"}) {
    RunResult s = RunProgram({"skopeo", "inspect", "--tls-verify=false", "--override-arch", platform.substr(6), ref});
    ASSERT_EQ(s.exit_code, 0) << s.err;
    RunResult r = RunRegdisk({"--platform", platform, "inspect", ref});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    json sk = json::parse(s.out), rd = json::parse(r.out);
    for (const char* k : {"Digest", "Layers", "Architecture", "Os", "Labels"}) EXPECT_EQ(rd[k], sk[k]) << k << " " << platform;
  }
}

TEST_F(ImageCmdsTest, InspectDiskReadsOnlyTheFrontOfTheLayerAndStoresNothing) {
  // A 24 MiB raw disk of incompressible bytes behind a 16 MiB qcow2? No: a
  // raw disk whose layer is big, and a qcow2 one; both through a proxy that
  // counts what it relays.
  const std::string big = RandomBytes(24 << 20, 7);
  auto img = MakeImageFromLayers(tmp() / "layout", "raw",
                                 {{LayerMediaType("gzip"), MakeTar({{"disk", Type::kDir, "", "", 107, 107, 0555},
                                                                    {"disk/big.img", Type::kFile, big, "", 107, 107, 0444}},
                                                                   "gzip")}});
  ASSERT_OK(img);
  ASSERT_EQ(RunRegdisk({"copy", "oci:" + P("layout") + ":raw", Remote("vm/big:v1")}).exit_code, 0);
  auto proxy = FaultProxy::Start(reg_->port());
  ASSERT_OK(proxy);
  const std::string via = "docker://" + (*proxy)->host() + "/vm/big:v1";
  ASSERT_FALSE(fs::exists(root_));
  RunResult r = Regdisk({"inspect", "--disk", via});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(fs::exists(root_)) << "inspect --disk created the node store";
  json j = json::parse(r.out);
  EXPECT_EQ(j["Disk"]["Path"], "/disk/big.img");
  EXPECT_EQ(j["Disk"]["Format"], "raw");
  EXPECT_EQ(j["Disk"]["Size"], 24 << 20);
  EXPECT_EQ(j["Disk"]["VirtualSize"], 24 << 20);
  EXPECT_EQ(j["Disk"]["From"], "header");
  EXPECT_EQ(j["Disk"]["Verified"], false) << "the read stopped at the disk's head, so the layer was not verified";
  uint64_t layer_bytes = 0;
  for (const auto& s : (*proxy)->seen()) {
    if (s.path.find(img->layers[0].digest.str()) != std::string::npos) layer_bytes += s.body_bytes;
  }
  EXPECT_GT(layer_bytes, 0u);
  EXPECT_LT(layer_bytes, static_cast<uint64_t>(img->layers[0].size) / 3)
      << "inspect --disk moved " << layer_bytes << " of the layer's " << img->layers[0].size << " bytes";

  // A qcow2 (regdisk build, gzip): format and virtual size from its header.
  const std::string ref = Remote("vmdisks/f25:v1");
  BuildQcow2(ref, "1G");
  r = Regdisk({"inspect", "--disk", ref});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  j = json::parse(r.out);
  EXPECT_EQ(j["Disk"]["Format"], "qcow2");
  EXPECT_EQ(j["Disk"]["VirtualSize"], uint64_t{1} << 30);
  EXPECT_EQ(j["Disk"]["Qcow2Version"], 3);
  EXPECT_EQ(j["Disk"]["Verified"], true) << "a small layer is read to its end and checked";
  EXPECT_FALSE(fs::exists(root_));
  // An image without a disk says so.
  auto plain = MakeTestImage(tmp() / "layout", "plain", {{"etc/hostname", "x"}});
  ASSERT_OK(plain);
  r = Regdisk({"inspect", "--disk", "oci:" + P("layout") + ":plain"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("no file under /disk"));
  EXPECT_FALSE(fs::exists(root_));
}

// inspect --disk sees the disk a pull would: every layer applied from the
// bottom up (the top wins; whiteouts, opaque directories and replacements
// delete), the layers it reads checked against their digests. Raw disks
// of different sizes tell which file was described.
TEST_F(ImageCmdsTest, InspectDiskSeesTheLayersAsAPullDoes) {
  const std::string a(4096, 'a'), b(8192, 'b');
  const TarEntry dir{"disk", Type::kDir, "", "", 107, 107, 0555};
  const std::string base = MakeTar({dir, {"disk/a.img", Type::kFile, a}, {"disk/b.img", Type::kFile, b}}, "gzip");
  const std::string only_a = MakeTar({dir, {"disk/a.img", Type::kFile, a}}, "gzip");
  int n = 0;
  // An image of `layers` (bottom first; gzip unless a layer is given with
  // its media type) in a layout of its own; returns its oci: name.
  auto image = [&](const std::vector<std::pair<std::string, std::string>>& layers) {
    const std::string tag = "t" + std::to_string(++n);
    EXPECT_TRUE(MakeImageFromLayers(tmp() / "layout", tag, layers).ok());
    return "oci:" + P("layout") + ":" + tag;
  };
  auto gz = [](const std::string& tar) { return std::make_pair(LayerMediaType("gzip"), tar); };
  auto inspect = [&](const std::string& name, const std::string& path = "") {
    std::vector<std::string> args = {"inspect", "--disk", name};
    if (!path.empty()) args.insert(args.end(), {"--path", path});
    return Regdisk(args);
  };
  auto described = [&](const RunResult& r, const std::string& path, uint64_t size) {
    EXPECT_EQ(r.exit_code, 0) << r.err;
    if (r.exit_code != 0) return;
    json d = json::parse(r.out)["Disk"];
    EXPECT_EQ(d["Path"], path);
    EXPECT_EQ(d["VirtualSize"], size);
    EXPECT_EQ(d["Verified"], true);
  };
  auto none = [&](const RunResult& r, const std::string& what) {
    EXPECT_EQ(r.exit_code, 1) << r.out;
    EXPECT_THAT(r.err, HasSubstr(what));
  };

  // A whiteout in the top layer deletes the lower disk: no disk at all.
  const std::string wh = image({gz(only_a), gz(MakeTar({{"disk/.wh.a.img", Type::kFile, ""},
                                                       {"etc/motd", Type::kFile, "hi"}}, "gzip"))});
  none(inspect(wh), "no file under /disk");
  // ... or one of two, which leaves the other.
  const std::string wh_one = image({gz(base), gz(MakeTar({{"disk/.wh.a.img", Type::kFile, ""}}, "gzip"))});
  described(inspect(wh_one), "/disk/b.img", 8192);
  none(inspect(wh_one, "/disk/a.img"), "no file \"/disk/a.img\" under /disk");
  // Whiting out /disk itself from the root.
  none(inspect(image({gz(only_a), gz(MakeTar({{".wh.disk", Type::kFile, ""}}, "gzip"))})), "no file under /disk");
  // An opaque /disk hides the lower files, not its own.
  const std::string opq = image({gz(base), gz(MakeTar({{"disk/.wh..wh..opq", Type::kFile, ""},
                                                      {"disk/c.img", Type::kFile, std::string(12288, 'c')}}, "gzip"))});
  described(inspect(opq), "/disk/c.img", 12288);
  none(inspect(opq, "/disk/a.img"), "no file \"/disk/a.img\" under /disk");
  // A file at /disk replaces the directory and all below it.
  const std::string as_file = image({gz(only_a), gz(MakeTar({{"disk", Type::kFile, b}}, "gzip"))});
  described(inspect(as_file), "/disk", 8192);
  none(inspect(as_file, "/disk/a.img"), "no file \"/disk/a.img\" under /disk");
  // A directory replaces a lower file at its path: b is the only file left.
  described(inspect(image({gz(base), gz(MakeTar({{"disk/a.img", Type::kDir, "", "", 0, 0, 0755}}, "gzip"))})),
            "/disk/b.img", 8192);
  // Within one layer a later entry replaces an earlier one.
  described(inspect(image({gz(MakeTar({dir, {"disk/a.img", Type::kFile, a}, {"disk/a.img", Type::kFile, b}}, "gzip"))})),
            "/disk/a.img", 8192);
  // Two files under /disk that no upper layer hides: as the pull says it.
  RunResult r = inspect(image({gz(base)}));
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_THAT(r.err, HasSubstr("holds 2 files under /disk (\"/disk/a.img\", \"/disk/b.img\"); name one with --path"));
  // An upper layer with a link under /disk refuses the image, as a pull does.
  r = inspect(image({gz(only_a), gz(MakeTar({{"disk/b.img", Type::kSymlink, "", "/etc/shadow"}}, "gzip"))}));
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_THAT(r.err, HasSubstr("symlink at \"/disk/b.img\""));

  // Bytes that do not match the layer digest, in an upper layer (which
  // decides what the disk is) and in the disk's own small layer: refused.
  for (int tampered : {1, 0}) {
    const std::string tag = "tampered" + std::to_string(tampered);  // blobs of their own in each round
    auto img = MakeImageFromLayers(tmp() / "layout", tag,
                                   {{LayerMediaType(""), MakeTar({dir, {"disk/a.img", Type::kFile, a}, {"x", Type::kFile, tag}}, "")},
                                    {LayerMediaType(""), MakeTar({{"etc/motd", Type::kFile, "hello " + tag}}, "")}});
    ASSERT_OK(img);
    const fs::path blob = tmp() / "layout" / "blobs" / "sha256" / img->layers[tampered].digest.hex();
    std::string bytes = ReadFileCapped(blob, 1 << 20).value();
    const size_t at = bytes.find(tampered == 1 ? "hello" : std::string(16, 'a'));
    ASSERT_NE(at, std::string::npos);
    bytes[at] ^= 1;  // the tar stays readable; only the digest tells
    fs::permissions(blob, fs::perms::owner_write, fs::perm_options::add);
    ASSERT_OK(WriteFileAtomic(blob, bytes));
    r = inspect("oci:" + P("layout") + ":" + tag);
    EXPECT_EQ(r.exit_code, 1) << tag << ": " << r.out;
    EXPECT_THAT(r.err, HasSubstr(img->layers[tampered].digest.hex().substr(0, 12))) << tag;
  }
  EXPECT_FALSE(fs::exists(root_));
}

TEST_F(ImageCmdsTest, ReadOnlyCommandsCreateNoStore) {
  const std::string ref = Remote("vmdisks/fedora25:latest");
  BuildQcow2(ref);
  std::string spec = ReadFileCapped(REGDISK_SOURCE_DIR "/examples/vm.yaml", 1 << 20).value();
  spec = std::regex_replace(spec, std::regex("image: vmdisks/"), "image: " + reg_->host() + "/vmdisks/");
  ASSERT_OK(WriteFileAtomic(P("vm.yaml"), spec));

  RunResult r = Regdisk({"images"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "REPOSITORY  TAG  IMAGE ID  CREATED  SIZE  FORMAT  VIRTUAL SIZE\n");
  EXPECT_EQ(Regdisk({"images", "-o", "json"}).out, "[]\n");
  EXPECT_EQ(Regdisk({"images", "-q"}).out, "");
  EXPECT_EQ(Regdisk({"inspect", ref}).exit_code, 0);
  EXPECT_EQ(Regdisk({"validate", "-f", P("vm.yaml")}).exit_code, 0);
  EXPECT_EQ(Regdisk({"rmi", "--all"}).exit_code, 0);
  r = Regdisk({"domxml", "-f", P("vm.yaml")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // domxml pulls nothing: it names the image it would pull.
  EXPECT_THAT(r.err, HasSubstr(ref + " is not in the node store"));
  EXPECT_EQ(Lines(r.err), 1) << r.err;
  EXPECT_THAT(r.out, HasSubstr("<acpi/>"));
  EXPECT_FALSE(fs::exists(root_)) << "a read-only command created the node store";
}

TEST_F(ImageCmdsTest, DomxmlIsOfflineAndNamesPathsThatExist) {
  const std::string ref = Remote("vmdisks/fedora25:latest");
  BuildQcow2(ref);
  std::string spec = ReadFileCapped(REGDISK_SOURCE_DIR "/examples/vm.yaml", 1 << 20).value();
  spec = std::regex_replace(spec, std::regex("image: vmdisks/"), "image: " + reg_->host() + "/vmdisks/");
  ASSERT_OK(WriteFileAtomic(P("vm.yaml"), spec));
  ASSERT_EQ(Regdisk({"pull", ref}).exit_code, 0);
  reg_.reset();  // the registry is gone: domxml must not need it

  RunResult r = Regdisk({"domxml", "-f", P("vm.yaml")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.err, "");
  EXPECT_THAT(r.out, HasSubstr("<features>"));
  EXPECT_THAT(r.out, HasSubstr("<acpi/>"));
  EXPECT_THAT(r.out, HasSubstr("<transient shareBacking=\"yes\"/>"));
  EXPECT_THAT(r.out, HasSubstr("<driver name=\"qemu\" type=\"qcow2\"/>"));
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.out, m, std::regex("<source file=\"([^\"]+)\"/>")));
  const fs::path source = m[1].str();
  EXPECT_TRUE(fs::exists(source)) << source;  // a link to the stored disk
  EXPECT_EQ(ReadFileCapped(source, 1 << 26).value(), ReadFileCapped(P("disk.qcow2"), 1 << 26).value());
  ASSERT_OK(WriteFileAtomic(P("domain.xml"), r.out));
  RunResult v = RunProgram({"virt-xml-validate", P("domain.xml"), "domain"});
  EXPECT_EQ(v.exit_code, 0) << r.out << v.out << v.err;
  // rmi removes the name's link with it.
  ASSERT_EQ(Regdisk({"rmi", ref}).exit_code, 0);
  EXPECT_FALSE(fs::exists(fs::symlink_status(source)));
  EXPECT_EQ(Regdisk({"fsck"}).exit_code, 0);
}

TEST_F(ImageCmdsTest, ImagesShowsPodmansColumns) {
  const std::string ref = Remote("vmdisks/f25:v1");
  BuildQcow2(ref, "1G");
  RunResult r = Regdisk({"pull", ref});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string digest = r.out.substr(0, r.out.size() - 1);
  r = RunRegdisk({"inspect", "--config", "--raw", ref});
  const std::string id = oci::Digest::Sha256Of(r.out).hex().substr(0, 12);

  r = Regdisk({"images"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::istringstream lines(r.out);
  std::string head, row;
  std::getline(lines, head);
  std::getline(lines, row);
  EXPECT_THAT(head, ::testing::MatchesRegex("REPOSITORY +TAG +IMAGE ID +CREATED +SIZE +FORMAT +VIRTUAL SIZE"));
  // regdisk build without SOURCE_DATE_EPOCH: a fixed or a current time.
  EXPECT_THAT(row, ::testing::MatchesRegex(reg_->host() + "/vmdisks/f25 +v1 +" + id +
                                           " +[A-Za-z0-9 ]+ ago +[0-9.]+ kB +qcow2 +1.07 GB"));
  r = Regdisk({"images", "--digests", "--noheading"});
  EXPECT_THAT(r.out, HasSubstr(digest));
  EXPECT_EQ(Lines(r.out), 1);
  EXPECT_EQ(Regdisk({"images", "-q"}).out, id + "\n");
  r = Regdisk({"images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}} {{.Format}} {{.VirtualSize}}"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, reg_->host() + "/vmdisks/f25:v1 " + id + " qcow2 1.07 GB\n");
  r = Regdisk({"images", "-o", "json"});
  json j = json::parse(r.out);
  ASSERT_EQ(j.size(), 1u);
  EXPECT_EQ(j[0]["digest"], digest);
  EXPECT_EQ(j[0]["platform"], "linux/amd64");
  EXPECT_EQ(j[0]["id"].get<std::string>().substr(7, 12), id);
  r = Regdisk({"images", "--format", "{{.Nope}}"});
  EXPECT_EQ(r.exit_code, 2);
  r = Regdisk({"images", "-o", "yaml"});
  EXPECT_EQ(r.exit_code, 2);
}

TEST_F(ImageCmdsTest, RmiByNameIdPrefixAllAndForce) {
  // Two images under three names, whose IDs (config digests) share their
  // first hex digit: b's content is varied until they do.
  auto a = MakeTestImage(tmp() / "layout", "a", {{"disk/a.img", std::string(4096, 'a')}});
  ASSERT_OK(a);
  const std::string la = "oci:" + P("layout") + ":a";
  auto config_id = [&](const std::string& ref) {
    return oci::Digest::Sha256Of(RunRegdisk({"inspect", "--config", "--raw", ref}).out).hex();
  };
  const std::string a_id = config_id(la);
  std::string lb;
  for (int i = 0; i < 200 && lb.empty(); ++i) {
    const std::string tag = "b" + std::to_string(i);
    ASSERT_OK(MakeTestImage(tmp() / "layout", tag, {{"disk/b.img", std::string(4096, 'b') + std::to_string(i)}}));
    if (config_id("oci:" + P("layout") + ":" + tag)[0] == a_id[0]) lb = "oci:" + P("layout") + ":" + tag;
  }
  ASSERT_FALSE(lb.empty());
  ASSERT_EQ(RunRegdisk({"copy", la, "oci:" + P("layout") + ":a2"}).exit_code, 0);
  for (const auto& n : {la, lb, "oci:" + P("layout") + ":a2"}) ASSERT_EQ(Regdisk({"pull", n}).exit_code, 0);
  json images = json::parse(Regdisk({"images", "-o", "json"}).out);
  ASSERT_EQ(images.size(), 3u);
  std::map<std::string, std::string> id;  // name -> hex ID
  for (const auto& i : images) id[i["name"]] = i["id"].get<std::string>().substr(7);
  ASSERT_NE(id[la], id[lb]);
  EXPECT_EQ(id[la], a_id);

  // Usage and unknown names.
  RunResult r = Regdisk({"rmi"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_EQ(Regdisk({"rmi", "--all", la}).exit_code, 2);
  r = Regdisk({"rmi", "oci:" + P("layout") + ":nope"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("has no image named or with the ID"));
  EXPECT_EQ(Lines(r.err), 1);
  // An ID prefix both IDs share is ambiguous: the error lists them.
  size_t common = 0;
  while (id[la][common] == id[lb][common]) ++common;
  ASSERT_GT(common, 0u);
  r = Regdisk({"rmi", id[la].substr(0, common)});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_EQ(Lines(r.err), 1);
  EXPECT_THAT(r.err, HasSubstr("matches 2 images"));
  EXPECT_THAT(r.err, HasSubstr(id[la].substr(0, 12)));
  EXPECT_THAT(r.err, HasSubstr(id[lb].substr(0, 12)));

  // A disk a running VM uses (its use lock held shared, as a VM holds it).
  std::string dir;
  for (const auto& e : fs::directory_iterator(fs::path(root_) / "disks")) {
    auto meta = json::parse(ReadFileCapped(e.path() / "meta.json", 1 << 20).value());
    if (meta["path"] == "/disk/b.img") dir = e.path().filename().string();
  }
  ASSERT_FALSE(dir.empty());
  {
    auto use = FileLock::Acquire(fs::path(root_) / "locks" / (dir + ".use"), FileLock::Mode::kShared);
    ASSERT_OK(use);
    r = Regdisk({"rmi", id[lb].substr(0, 12)});
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_THAT(r.err, HasSubstr("in use by a running VM"));
    EXPECT_THAT(r.err, HasSubstr("--force"));
    EXPECT_EQ(json::parse(Regdisk({"images", "-o", "json"}).out).size(), 3u);  // nothing removed
    r = Regdisk({"rmi", "--force", id[lb].substr(0, 12)});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_THAT(r.out, HasSubstr("Untagged: " + lb));
    EXPECT_THAT(r.err, HasSubstr("kept disk " + dir));
    EXPECT_TRUE(fs::exists(fs::path(root_) / "disks" / dir));
  }
  // The VM stopped: prune removes it.
  EXPECT_THAT(Regdisk({"prune"}).out, HasSubstr("1 disks"));
  // An ID with two names removes both; then --all on an empty store.
  r = Regdisk({"rmi", "sha256:" + id[la]});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("1 disks"));
  EXPECT_EQ(json::parse(Regdisk({"images", "-o", "json"}).out).size(), 0u);
  ASSERT_EQ(Regdisk({"pull", la}).exit_code, 0);
  r = Regdisk({"rmi", "--all"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Regdisk({"images", "-q"}).out, "");
  EXPECT_EQ(Regdisk({"fsck"}).exit_code, 0);
}

TEST_F(ImageCmdsTest, TheStoreIsKeyedByPlatform) {
  const std::string ref = Remote("vm/multi:v1");
  auto [arm, amd] = PushTwoPlatforms(ref);
  RunResult r = Regdisk({"--platform", "linux/arm64", "pull", ref});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, arm + "\n");
  auto name = image::ImageName::Parse(ref);
  ASSERT_OK(name);
  auto st = store::Store::Open(root_);
  ASSERT_OK(st);
  // The arm64 pull does not answer an amd64 lookup.
  auto found = st->Lookup(name->String(), *oci::Platform::Parse("linux/amd64"));
  ASSERT_OK(found);
  EXPECT_FALSE(found->has_value());
  found = st->Lookup(name->String(), *oci::Platform::Parse("linux/arm64"));
  ASSERT_OK(found);
  ASSERT_TRUE(found->has_value());
  EXPECT_EQ((*found)->platform, "linux/arm64");
  r = Regdisk({"pull", ref});  // the default, linux/amd64
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, amd + "\n");
  found = st->Lookup(name->String(), *oci::Platform::Parse("linux/amd64"));
  ASSERT_OK(found);
  ASSERT_TRUE(found->has_value());
  EXPECT_EQ(fs::file_size((*found)->disk_file), 4096u);  // the amd64 disk, not the arm64 one
  json images = json::parse(Regdisk({"images", "-o", "json"}).out);
  ASSERT_EQ(images.size(), 2u);
  EXPECT_EQ(images[0]["platform"], "linux/amd64");
  EXPECT_EQ(images[1]["platform"], "linux/arm64");
  EXPECT_EQ(Regdisk({"fsck"}).exit_code, 0);

  // A store written before platforms were recorded (name -> digest in
  // refs.json, no store.db) reads with the platform of the stored config,
  // and fsck accepts it.
  const std::string arm_digest = images[1]["digest"].get<std::string>();
  for (const char* suffix : {"", "-wal", "-shm"}) fs::remove(fs::path(root_) / (std::string("store.db") + suffix));
  json old = {{name->String(), arm_digest}};
  ASSERT_OK(WriteFileAtomic(fs::path(root_) / "refs.json", old.dump()));
  found = st->Lookup(name->String(), *oci::Platform::Parse("linux/arm64"));
  ASSERT_OK(found);
  ASSERT_TRUE(found->has_value());
  found = st->Lookup(name->String(), *oci::Platform::Parse("linux/amd64"));
  ASSERT_OK(found);
  EXPECT_FALSE(found->has_value());
  r = Regdisk({"fsck"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  // The next pull adds its platform, keeping the old name's.
  r = Regdisk({"pull", ref});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  images = json::parse(Regdisk({"images", "-o", "json"}).out);
  ASSERT_EQ(images.size(), 2u);
  EXPECT_EQ(images[0]["platform"], "linux/amd64");
  EXPECT_EQ(images[1]["platform"], "linux/arm64");
  EXPECT_EQ(images[1]["digest"], arm_digest);
}

TEST_F(ImageCmdsTest, ProgressIsOneLinePerBlobWithoutATerminal) {
  auto img = MakeTestImage(tmp() / "layout", "v1", {{"disk/disk.img", RandomBytes(3 << 20, 3)}});
  ASSERT_OK(img);
  const std::string layout = "oci:" + P("layout") + ":v1";
  RunResult r = RunRegdisk({"copy", layout, Remote("vm/p:v1")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string layer = img->layers[0].digest.hex().substr(0, 12);
  EXPECT_THAT(r.err, ::testing::ContainsRegex("Copying blob " + layer + " done 3\\.[0-9]MiB\n"));
  EXPECT_EQ(Lines(r.err), 2) << r.err;  // the config and the layer
  EXPECT_THAT(r.err, Not(HasSubstr("\r")));
  r = RunRegdisk({"copy", layout, Remote("vm/p:v1")});
  EXPECT_THAT(r.err, HasSubstr("Copying blob " + layer + " skipped: already exists\n"));
  r = Regdisk({"pull", Remote("vm/p:v1")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, ::testing::MatchesRegex("Copying blob " + layer + " done 3\\.[0-9]MiB\n"));
  r = Regdisk({"pull", Remote("vm/p:v1")});  // present: nothing moves
  EXPECT_EQ(r.err, "");
}

}  // namespace
}  // namespace regdisk::testing
