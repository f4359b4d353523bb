// The cloud-init NoCloud seed, read back by readers that share no code with
// the writer: isoinfo (cdrkit) for the ISO 9660, Rock Ridge and Joliet
// trees, and yaml-cpp and PyYAML (the parser cloud-init itself uses) for
// meta-data.
#include "vm/cloudinit.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "harness/harness.h"
#include "util/env.h"
#include "util/fs.h"
#include "util/text.h"

namespace regdisk::vm {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::UnorderedElementsAre;
using json = nlohmann::json;

std::string Slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<std::string> Entries(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  return names;
}

// isoinfo's view of one image.
class IsoInfo {
 public:
  explicit IsoInfo(fs::path iso) : iso_(std::move(iso)) {}

  std::string VolumeId() const {
    auto r = Run({"-d"});
    const std::string key = "Volume id: ";
    size_t at = r.find(key);
    if (at == std::string::npos) return "<no volume id in isoinfo -d>";
    return r.substr(at + key.size(), r.find('\n', at) - at - key.size());
  }
  // The file names of the root directory in one tree: "-R" (Rock Ridge),
  // "-J" (Joliet) or "" (plain ISO 9660).
  std::vector<std::string> Files(const std::string& tree) const {
    std::vector<std::string> names;
    std::istringstream lines(Run(tree.empty() ? std::vector<std::string>{"-f"} : std::vector<std::string>{tree, "-f"}));
    for (std::string line; std::getline(lines, line);) {
      if (!line.empty()) names.push_back(line);
    }
    return names;
  }
  std::string Read(const std::string& tree, const std::string& name) const { return Run({tree, "-x", name}); }
  // `isoinfo -l` in a tree: one line per entry.
  std::string Listing(const std::string& tree) const { return Run({tree, "-l"}); }

 private:
  std::string Run(std::vector<std::string> args) const {
    std::vector<std::string> argv = {"isoinfo", "-i", iso_.string()};
    argv.insert(argv.end(), args.begin(), args.end());
    auto r = testing::RunProgram(argv);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.out;
  }
  fs::path iso_;
};

// Each YAML text as PyYAML's safe_load (what cloud-init calls) reads it, as
// JSON; one python3 for all of them.
json PyYamlLoad(const std::vector<std::string>& texts) {
  auto r = testing::RunProgram({"python3", "-c",
                                "import json, sys, yaml\n"
                                "texts = json.loads(sys.stdin.buffer.read().decode('utf-8'))\n"
                                "print(json.dumps([yaml.safe_load(t) for t in texts]))\n"},
                               json(texts).dump());
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.exit_code == 0 ? json::parse(r.out) : json::array();
}

// The label and type blkid (util-linux) finds in an image: what cloud-init
// looks the seed up by (blkid -t LABEL=cidata).
std::string Blkid(const fs::path& image, const std::string& tag) {
  const std::string blkid = fs::exists("/usr/sbin/blkid") ? "/usr/sbin/blkid" : "blkid";
  auto r = testing::RunProgram({blkid, "-p", "-o", "value", "-s", tag, image.string()});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

// Every byte value, several times over, and no newline at the end.
std::string BinaryBytes() {
  std::string s;
  for (int round = 0; round < 5; ++round) {
    for (int b = 255; b >= 0; --b) s.push_back(static_cast<char>(b));
  }
  return s;
}

class CloudInitTest : public testing::TempDirTest {
 protected:
  // Writes `seed` to a fresh file and checks what every reader sees.
  void WriteAndCheck(const NoCloudSeed& seed, const std::string& name = "seed.iso") {
    const fs::path iso = tmp() / name;
    ASSERT_OK(WriteNoCloudSeed(iso, seed));
    CheckSeed(iso, seed);
  }

  void CheckSeed(const fs::path& iso, const NoCloudSeed& seed) {
    IsoInfo info(iso);
    EXPECT_EQ(info.VolumeId(), "cidata");
    EXPECT_EQ(Blkid(iso, "LABEL"), "cidata\n");
    EXPECT_EQ(Blkid(iso, "TYPE"), "iso9660\n");
    std::vector<std::string> want = {"/user-data", "/meta-data"};
    if (seed.network_config) want.push_back("/network-config");
    for (const std::string tree : {"-R", "-J"}) {
      SCOPED_TRACE(tree);
      EXPECT_THAT(info.Files(tree), ::testing::UnorderedElementsAreArray(want));
      EXPECT_TRUE(info.Read(tree, "/user-data") == seed.user_data)
          << "user-data differs (" << seed.user_data.size() << " bytes given)";
      EXPECT_EQ(info.Read(tree, "/meta-data"), NoCloudMetaData(seed));
      if (seed.network_config) {
        EXPECT_EQ(info.Read(tree, "/network-config"), *seed.network_config);
      }
    }
    struct stat st;
    ASSERT_EQ(::stat(iso.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 07777, 0600u);
    EXPECT_EQ(st.st_size % 2048, 0);
  }
};

TEST_F(CloudInitTest, SeedHoldsTheThreeFilesUnderLabelCidata) {
  NoCloudSeed seed{.instance_id = "6a1f0c9e-2b7d-4e0a-9c1e-3f5d7b9a1c2e",
                   .local_hostname = "web-1",
                   .user_data = "#cloud-config\npassword: hunter2\nchpasswd: { expire: False }\n",
                   .network_config = "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n"};
  WriteAndCheck(seed);
  EXPECT_EQ(NoCloudMetaData(seed),
            "instance-id: \"6a1f0c9e-2b7d-4e0a-9c1e-3f5d7b9a1c2e\"\nlocal-hostname: \"web-1\"\n");
  // Nothing but the seed in the directory: the temp name is gone.
  EXPECT_THAT(Entries(tmp()), UnorderedElementsAre("seed.iso"));
  // Rock Ridge: root-owned, readable by root only, inside the guest too.
  const std::string listing = IsoInfo(tmp() / "seed.iso").Listing("-R");
  EXPECT_THAT(listing, HasSubstr("-r--------"));
  EXPECT_THAT(listing, Not(HasSubstr("-r--r--r--")));
}

TEST_F(CloudInitTest, NetworkConfigOnlyWhenGiven) {
  WriteAndCheck({.instance_id = "uid-1", .local_hostname = "vm", .user_data = "#!/bin/sh\necho hi\n"});
  EXPECT_THAT(IsoInfo(tmp() / "seed.iso").Files("-J"), Not(::testing::Contains("/network-config")));
  // Given but empty: the file exists, empty.
  WriteAndCheck({.instance_id = "uid-2", .local_hostname = "vm", .user_data = "x", .network_config = ""}, "b.iso");
}

TEST_F(CloudInitTest, UserDataIsStoredByteForByte) {
  WriteAndCheck({.instance_id = "u", .local_hostname = "h", .user_data = ""}, "empty.iso");
  WriteAndCheck({.instance_id = "u", .local_hostname = "h", .user_data = BinaryBytes()}, "binary.iso");
  std::string mib;
  for (size_t i = 0; mib.size() < (size_t{1} << 20); ++i) mib += "line " + std::to_string(i) + "\n";
  mib.resize(size_t{1} << 20);
  WriteAndCheck({.instance_id = "u", .local_hostname = "h", .user_data = mib, .network_config = BinaryBytes()},
                "mib.iso");
}

TEST_F(CloudInitTest, SixteenMibIsTheLimit) {
  NoCloudSeed seed{.instance_id = "u", .local_hostname = "h", .user_data = std::string(kMaxNoCloudFileBytes, 'a')};
  seed.user_data.back() = 'z';
  WriteAndCheck(seed, "max.iso");

  seed.user_data.push_back('!');
  Status st = WriteNoCloudSeed(tmp() / "user.iso", seed);
  EXPECT_EQ(st.code(), Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("user-data is 16777217 bytes"));
  EXPECT_THAT(st.message(), HasSubstr("16 MiB"));
  EXPECT_THAT(st.message(), Not(HasSubstr("\n")));
  EXPECT_THAT(st.message(), Not(HasSubstr("aaaa")));

  NoCloudSeed net{.instance_id = "u",
                  .local_hostname = "h",
                  .user_data = "",
                  .network_config = std::string(kMaxNoCloudFileBytes + 1, 'n')};
  st = WriteNoCloudSeed(tmp() / "net.iso", net);
  EXPECT_EQ(st.code(), Code::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("network-config"));
  // Neither the seed nor a temp file of it.
  EXPECT_THAT(Entries(tmp()), UnorderedElementsAre("max.iso"));
}

TEST_F(CloudInitTest, SameSeedSameBytes) {
  NoCloudSeed seed{.instance_id = "uid", .local_hostname = "h", .user_data = "#cloud-config\n", .network_config = "v"};
  ASSERT_OK(WriteNoCloudSeed(tmp() / "a.iso", seed));
  // A second later, in another directory, under another name: every
  // timestamp is fixed and no path goes into the image.
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  ASSERT_OK(MakeDirs(tmp() / "other"));
  ASSERT_OK(WriteNoCloudSeed(tmp() / "other" / "b.iso", seed));
  const std::string a = Slurp(tmp() / "a.iso"), b = Slurp(tmp() / "other" / "b.iso");
  ASSERT_FALSE(a.empty());
  EXPECT_TRUE(a == b) << "two writes of one seed differ";
  // The volume descriptor's creation and modification dates are the fixed
  // one (ECMA-119 8.4.26-27: 16 digits and a zone byte at 813 and 830).
  ASSERT_GT(a.size(), 16u * 2048 + 847);
  EXPECT_EQ(a.substr(16 * 2048 + 813, 16), "2000010100000000");
  EXPECT_EQ(a.substr(16 * 2048 + 830, 16), "2000010100000000");

  NoCloudSeed other = seed;
  other.user_data = "#cloud-config\n#";
  ASSERT_OK(WriteNoCloudSeed(tmp() / "c.iso", other));
  EXPECT_FALSE(Slurp(tmp() / "c.iso") == a);
}

TEST_F(CloudInitTest, AnExistingFileIsNeverTouched) {
  const fs::path iso = tmp() / "seed.iso";
  ASSERT_OK(WriteFileAtomic(iso, "precious", 0644));
  Status st = WriteNoCloudSeed(iso, {.instance_id = "u", .local_hostname = "h", .user_data = "new"});
  EXPECT_EQ(st.code(), Code::kAlreadyExists);
  EXPECT_THAT(st.message(), HasSubstr(iso.string()));
  EXPECT_EQ(Slurp(iso), "precious");
  struct stat s;
  ASSERT_EQ(::stat(iso.c_str(), &s), 0);
  EXPECT_EQ(s.st_mode & 07777, 0644u);

  // Nor is what a symbolic link there points to.
  ASSERT_EQ(::symlink((tmp() / "target").c_str(), (tmp() / "link.iso").c_str()), 0);
  EXPECT_EQ(WriteNoCloudSeed(tmp() / "link.iso", {.instance_id = "u", .local_hostname = "h"}).code(),
            Code::kAlreadyExists);
  EXPECT_FALSE(fs::exists(tmp() / "target"));
  EXPECT_THAT(Entries(tmp()), UnorderedElementsAre("seed.iso", "link.iso"));
}

// A file that appears at the path while the seed is being written (after
// the first check) is kept too: the seed is linked, never renamed, into place.
class CreateAtSyncEnv : public EnvWrapper {
 public:
  CreateAtSyncEnv(Env* target, fs::path path) : EnvWrapper(target), path_(std::move(path)) {}
  Status Sync(int fd) override {
    if (!created_) {
      created_ = true;
      RETURN_IF_ERROR(WriteFileAtomic(path_, "raced", 0644));
    }
    return EnvWrapper::Sync(fd);
  }

 private:
  fs::path path_;
  bool created_ = false;
};

TEST_F(CloudInitTest, AFileThatAppearsMeanwhileIsKept) {
  const fs::path iso = tmp() / "seed.iso";
  {
    CreateAtSyncEnv env(Env::Default(), iso);
    ScopedDefaultEnv use(&env);
    EXPECT_EQ(WriteNoCloudSeed(iso, {.instance_id = "u", .local_hostname = "h", .user_data = "d"}).code(),
              Code::kAlreadyExists);
  }
  EXPECT_EQ(Slurp(iso), "raced");
  EXPECT_THAT(Entries(tmp()), UnorderedElementsAre("seed.iso"));
}

TEST_F(CloudInitTest, MissingDirectoryIsAnError) {
  Status st = WriteNoCloudSeed(tmp() / "no-such-dir" / "seed.iso", {.instance_id = "u", .local_hostname = "h"});
  EXPECT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("no-such-dir"));
}

// A hostname or UID with YAML syntax in it stays one string value: both
// yaml-cpp and PyYAML (cloud-init's parser) read back exactly the value,
// and meta-data keeps exactly its two keys.
TEST_F(CloudInitTest, MetaDataValuesAreDataNotYaml) {
  const std::vector<std::string> hostile = {
      "evil\"\ninstance-id: hijacked",
      "a'b\"c\\d",
      "line1\nline2\r\n\tend",
      "#comment",
      "- item",
      "{a: b}",
      "key: value",
      "yes",
      "null",
      "0x1F",
      "  spaced  ",
      "*alias",
      "!!binary aGk=",
      "...",
      "---",
      std::string("nul\0byte", 8),
      "bell\x07 esc\x1b del\x7f",
      "caf\xc3\xa9 \xe2\x80\xa8 next \xc2\x85 bom \xef\xbb\xbf",  // é, U+2028, U+0085 (line breaks to YAML 1.1), BOM
      "emoji \xf0\x9f\x98\x80",
  };
  std::vector<std::string> metas;
  for (const std::string& value : hostile) {
    SCOPED_TRACE(Printable(value));
    NoCloudSeed seed{.instance_id = "id-" + value, .local_hostname = value};
    const std::string meta = NoCloudMetaData(seed);
    metas.push_back(meta);
    // Two lines, printable ASCII only.
    EXPECT_EQ(std::count(meta.begin(), meta.end(), '\n'), 2);
    for (char c : meta) EXPECT_TRUE(c == '\n' || (c >= 0x20 && c < 0x7f)) << static_cast<int>(c);

    YAML::Node doc = YAML::Load(meta);
    ASSERT_TRUE(doc.IsMap());
    EXPECT_EQ(doc.size(), 2u);
    EXPECT_EQ(doc["local-hostname"].as<std::string>(), value);
    EXPECT_EQ(doc["instance-id"].as<std::string>(), "id-" + value);
  }
  const json py = PyYamlLoad(metas);
  ASSERT_EQ(py.size(), hostile.size()) << py.dump();
  for (size_t i = 0; i < hostile.size(); ++i) {
    SCOPED_TRACE(Printable(hostile[i]));
    ASSERT_TRUE(py[i].is_object()) << py[i].dump();
    EXPECT_EQ(py[i].size(), 2u);
    EXPECT_EQ(py[i]["local-hostname"], hostile[i]);
    EXPECT_EQ(py[i]["instance-id"], "id-" + hostile[i]);
  }
  // And in a real seed.
  WriteAndCheck({.instance_id = "evil\"\ninstance-id: x", .local_hostname = "a\nb", .user_data = "u"});
}

TEST_F(CloudInitTest, BadMetaDataValuesAreRefused) {
  struct Case {
    NoCloudSeed seed;
    std::string want;
  };
  const std::vector<Case> cases = {
      {{.instance_id = "", .local_hostname = "h"}, "instance-id is empty"},
      {{.instance_id = "u", .local_hostname = ""}, "local-hostname is empty"},
      {{.instance_id = "u", .local_hostname = "bad\xff"}, "local-hostname \"bad\\xff\" is not valid UTF-8"},
      {{.instance_id = "\xc0\xaf", .local_hostname = "h"}, "not valid UTF-8"},      // overlong '/'
      {{.instance_id = "\xed\xa0\x80", .local_hostname = "h"}, "not valid UTF-8"},  // a surrogate
      {{.instance_id = std::string(kMaxNoCloudMetaValueBytes + 1, 'u'), .local_hostname = "h"}, "4097 bytes"},
  };
  for (const Case& c : cases) {
    Status st = WriteNoCloudSeed(tmp() / "seed.iso", c.seed);
    EXPECT_EQ(st.code(), Code::kInvalidArgument) << st.ToString();
    EXPECT_THAT(st.message(), HasSubstr(c.want));
    EXPECT_THAT(st.message(), Not(HasSubstr("\n")));
  }
  EXPECT_THAT(Entries(tmp()), ::testing::IsEmpty());
}

TEST_F(CloudInitTest, ConcurrentWritersEachGetTheirOwnSeed) {
  constexpr int kPerThread = 3;
  auto seed_for = [](int t, int i) {
    const std::string tag = std::to_string(t) + "-" + std::to_string(i);
    return NoCloudSeed{.instance_id = "uid-" + tag,
                       .local_hostname = "vm-" + tag,
                       .user_data = "#cloud-config\n# " + tag + "\n" + std::string(100000 * (i + 1), 'a' + t),
                       .network_config = "net " + tag};
  };
  std::vector<Status> results(2 * kPerThread);
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        results[t * kPerThread + i] =
            WriteNoCloudSeed(tmp() / ("t" + std::to_string(t) + "-" + std::to_string(i) + ".iso"), seed_for(t, i));
      }
    });
  }
  for (auto& th : threads) th.join();
  for (const Status& st : results) ASSERT_OK(st);
  for (int t = 0; t < 2; ++t) {
    for (int i = 0; i < kPerThread; ++i) {
      SCOPED_TRACE(std::to_string(t) + "-" + std::to_string(i));
      const fs::path iso = tmp() / ("t" + std::to_string(t) + "-" + std::to_string(i) + ".iso");
      CheckSeed(iso, seed_for(t, i));
      // The same bytes as a seed written alone.
      ASSERT_OK(WriteNoCloudSeed(tmp() / "alone.iso", seed_for(t, i)));
      EXPECT_TRUE(Slurp(iso) == Slurp(tmp() / "alone.iso"));
      fs::remove(tmp() / "alone.iso");
    }
  }
}

// Faults injected through the Env seam: a failed write or fsync leaves
// neither the seed nor its temp file.
class FailingEnv : public EnvWrapper {
 public:
  enum class What { kWrite, kSync };
  FailingEnv(Env* target, What what) : EnvWrapper(target), what_(what) {}
  Result<size_t> Write(int fd, const void* p, size_t n, std::optional<uint64_t> at) override {
    if (what_ == What::kWrite && ++writes_ == 2) return ErrnoStatus("writing", ENOSPC);
    return EnvWrapper::Write(fd, p, n, at);
  }
  Status Sync(int fd) override {
    if (what_ == What::kSync) return ErrnoStatus("fsync", EIO);
    return EnvWrapper::Sync(fd);
  }

 private:
  What what_;
  int writes_ = 0;
};

TEST_F(CloudInitTest, FailedWriteOrSyncLeavesNothing) {
  const NoCloudSeed seed{.instance_id = "u", .local_hostname = "h", .user_data = std::string(300000, 'x')};
  {
    FailingEnv env(Env::Default(), FailingEnv::What::kWrite);
    ScopedDefaultEnv use(&env);
    Status st = WriteNoCloudSeed(tmp() / "seed.iso", seed);
    EXPECT_EQ(st.code(), Code::kNoSpace) << st.ToString();
    EXPECT_THAT(st.message(), HasSubstr("seed.iso"));
  }
  EXPECT_THAT(Entries(tmp()), ::testing::IsEmpty());
  {
    FailingEnv env(Env::Default(), FailingEnv::What::kSync);
    ScopedDefaultEnv use(&env);
    EXPECT_FALSE(WriteNoCloudSeed(tmp() / "seed.iso", seed).ok());
  }
  EXPECT_THAT(Entries(tmp()), ::testing::IsEmpty());
  // And the next attempt works.
  WriteAndCheck(seed);
}

// The module writes nothing to stdout or stderr, secrets or otherwise, and
// its errors never quote user-data.
TEST_F(CloudInitTest, UserDataNeverReachesOutputOrErrors) {
  const std::string secret = "s3cr3t-token-7d1e";
  ::testing::internal::CaptureStderr();
  ::testing::internal::CaptureStdout();
  Status ok = WriteNoCloudSeed(tmp() / "seed.iso", {.instance_id = "u", .local_hostname = "h", .user_data = secret});
  Status exists =
      WriteNoCloudSeed(tmp() / "seed.iso", {.instance_id = "u", .local_hostname = "h", .user_data = secret});
  Status big = WriteNoCloudSeed(
      tmp() / "big.iso",
      {.instance_id = "u", .local_hostname = "h", .user_data = secret + std::string(kMaxNoCloudFileBytes, ' ')});
  const std::string err = ::testing::internal::GetCapturedStderr();
  const std::string out = ::testing::internal::GetCapturedStdout();
  ASSERT_OK(ok);
  EXPECT_EQ(err, "");
  EXPECT_EQ(out, "");
  EXPECT_THAT(exists.ToString(), Not(HasSubstr(secret)));
  EXPECT_FALSE(big.ok());
  EXPECT_THAT(big.ToString(), Not(HasSubstr(secret)));
}

}  // namespace
}  // namespace regdisk::vm
