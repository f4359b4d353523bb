// registries.conf mirrors, login/logout and fast failure against real
// programs: Debian's docker-registry as origin, a second one in proxy
// (pull-through cache) mode as mirror, and skopeo reading and writing the
// same auth files.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "harness/harness.h"
#include "registry/http.h"

namespace regdisk::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;
using json = nlohmann::json;

class MirrorLoginTest : public TempDirTest {
 protected:
  std::string Layout(const std::string& name, const std::string& tag) {
    return "oci:" + (tmp() / name).string() + ":" + tag;
  }
  // An environment with no credentials or registries.conf of the machine's.
  std::vector<std::string> Env(std::vector<std::string> more = {}) {
    std::vector<std::string> env = {"HOME=" + P("home"), "XDG_RUNTIME_DIR=" + P("run"),
                                    "XDG_CONFIG_HOME=" + P("home/.config")};
    env.insert(env.end(), more.begin(), more.end());
    return env;
  }
};

int CountLines(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t p = text.find(needle); p != std::string::npos; p = text.find(needle, p + 1)) ++n;
  return n;
}

// Access-log lines (one per request) that regdisk made, with a path.
int RegdiskRequests(const std::string& log, const std::string& path_part) {
  int n = 0;
  size_t start = 0;
  while (start < log.size()) {
    size_t end = log.find('\n', start);
    if (end == std::string::npos) end = log.size();
    std::string line = log.substr(start, end - start);
    if (line.find("regdisk/") != std::string::npos && line.find(path_part) != std::string::npos) ++n;
    start = end + 1;
  }
  return n;
}

TEST_F(MirrorLoginTest, PullThroughAMirrorAndByDigestWhenTheOriginIsDown) {
  auto origin = TestRegistry::Start(RegistryMode::kPlain, {}, {.access_log = true});
  ASSERT_OK(origin);
  auto img = MakeTestImage(tmp() / "src", "v1", {{"disk/disk.img", RandomBytes(200000, 7)}});
  ASSERT_OK(img);
  const std::string name = (*origin)->host() + "/vm/disk";
  RunResult r = RunRegdisk({"copy", Layout("src", "v1"), "docker://" + name + ":v1"}, {}, Env());
  ASSERT_EQ(r.exit_code, 0) << r.err;

  auto mirror = TestRegistry::Start(RegistryMode::kPlain, {},
                                    {.proxy_remote_url = "http://" + (*origin)->host(), .access_log = true});
  ASSERT_OK(mirror);
  const std::string conf = P("registries.conf");
  ASSERT_OK(WriteFileAtomic(conf, "[[registry]]\nlocation = \"" + (*origin)->host() +
                                      "\"\n\n[[registry.mirror]]\nlocation = \"" + (*mirror)->host() + "\"\n"));
  const int origin_before = RegdiskRequests((*origin)->log(), "/v2/vm/disk/");

  // By tag, through the mirror: the mirror's log shows regdisk's requests,
  // the origin's none (only the mirror's own fetches).
  r = RunRegdisk({"--registries-conf", conf, "copy", "docker://" + name + ":v1", Layout("back", "v1")}, {}, Env());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.substr(0, r.out.find('\n')), img->manifest_digest.str());
  EXPECT_EQ(RegdiskRequests((*mirror)->log(), "/v2/vm/disk/manifests/v1"), 1) << (*mirror)->log();
  EXPECT_GE(RegdiskRequests((*mirror)->log(), "/v2/vm/disk/blobs/" + img->layers[0].digest.str()), 1);
  EXPECT_EQ(RegdiskRequests((*origin)->log(), "/v2/vm/disk/"), origin_before) << (*origin)->log();

  // The origin goes away; by digest the mirror still serves it.
  (*origin)->Stop();
  const std::string by_digest = "docker://" + name + "@" + img->manifest_digest.str();
  r = RunRegdisk({"--registries-conf", conf, "copy", by_digest, Layout("again", "v1")}, {}, Env());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(RegdiskRequests((*mirror)->log(), "/v2/vm/disk/manifests/" + img->manifest_digest.str()), 1);
  // The same configuration through the environment variable.
  r = RunRegdisk({"inspect", by_digest}, {}, Env({"CONTAINERS_REGISTRIES_CONF=" + conf}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["Digest"], img->manifest_digest.str());

  // Without the mirror, the origin being down fails at once, naming it.
  r = RunRegdisk({"-v", "inspect", by_digest}, {}, Env());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("cannot reach registry " + (*origin)->host()));
  EXPECT_EQ(CountLines(r.err, "(attempt "), 1) << r.err;

  // With the mirror down too: the mirror is tried, then the origin, and the
  // error says both.
  (*mirror)->Stop();
  r = RunRegdisk({"--registries-conf", conf, "inspect", by_digest}, {}, Env());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr((*mirror)->host()));
  EXPECT_THAT(r.err, HasSubstr("cannot reach registry " + (*origin)->host()));
}

// Short names, as podman resolves them: an alias, else each
// unqualified-search registry in order; the store records the name that
// pulled, and a VM spec's short name finds it there.
TEST_F(MirrorLoginTest, ShortNamesResolveThroughAliasesAndSearchRegistries) {
  auto first = TestRegistry::Start(RegistryMode::kPlain, {}, {.access_log = true});
  auto second = TestRegistry::Start(RegistryMode::kPlain);
  ASSERT_OK(first);
  ASSERT_OK(second);
  auto img = MakeTestImage(tmp() / "src", "v1", {{"disk/disk.img", RandomBytes(100000, 11)}});
  ASSERT_OK(img);
  RunResult r = RunRegdisk({"copy", Layout("src", "v1"), "docker://" + (*second)->host() + "/vmdisks/tiny:v1"}, {}, Env());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string conf = P("registries.conf");
  ASSERT_OK(WriteFileAtomic(conf, "unqualified-search-registries = [\"" + (*first)->host() + "\", \"" +
                                      (*second)->host() + "\"]\nshort-name-mode = \"permissive\"\n[aliases]\n\"tiny\" = \"" +
                                      (*second)->host() + "/vmdisks/tiny\"\n"));
  const std::string root = P("root");
  // The first search registry has no such image; the second has.
  r = RunRegdisk({"--root", root, "--registries-conf", conf, "pull", "vmdisks/tiny:v1"}, {}, Env());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_GT(RegdiskRequests((*first)->log(), "/v2/vmdisks/tiny/manifests/v1"), 0) << "the first registry was not tried";
  RunResult images = RunRegdisk({"--root", root, "images", "--format", "{{.Repository}}:{{.Tag}}"}, {}, Env());
  EXPECT_EQ(images.out, (*second)->host() + "/vmdisks/tiny:v1\n");
  // An alias goes straight to its target.
  r = RunRegdisk({"--root", P("root2"), "--registries-conf", conf, "pull", "tiny:v1"}, {}, Env());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // A VM spec's short name finds the stored disk (domxml reads the store only).
  ASSERT_OK(WriteFileAtomic(P("vm.yaml"),
                            "apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstance\nmetadata: {name: s}\nspec:\n"
                            "  domain: {memory: {guest: 64Mi}, devices: {}}\n  volumes:\n"
                            "  - {name: root, containerDisk: {image: \"vmdisks/tiny:v1\"}}\n"));
  r = RunRegdisk({"--root", root, "--registries-conf", conf, "domxml", "-f", P("vm.yaml")}, {}, Env());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, Not(HasSubstr("is not in the node store")));
  // Nowhere to be found: every candidate's error, on one line.
  r = RunRegdisk({"--root", root, "--registries-conf", conf, "pull", "vmdisks/none:v1"}, {}, Env());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("short name \"vmdisks/none:v1\" matched no image in the unqualified-search registries"));
  EXPECT_THAT(r.err, HasSubstr((*first)->host() + "/vmdisks/none:v1"));
  EXPECT_THAT(r.err, HasSubstr((*second)->host() + "/vmdisks/none:v1"));
  EXPECT_EQ(CountLines(r.err, "\n"), 1) << r.err;
  // Enforcing mode with two candidates: an error naming both, no pull.
  ASSERT_OK(WriteFileAtomic(conf, "unqualified-search-registries = [\"" + (*first)->host() + "\", \"" +
                                      (*second)->host() + "\"]\nshort-name-mode = \"enforcing\"\n"));
  r = RunRegdisk({"--root", P("root3"), "--registries-conf", conf, "pull", "vmdisks/tiny:v1"}, {}, Env());
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("is ambiguous and short-name-mode is enforcing"));
}

TEST_F(MirrorLoginTest, BlockedAndBrokenConfigurations) {
  auto reg = TestRegistry::Start(RegistryMode::kPlain);
  ASSERT_OK(reg);
  ASSERT_OK(MakeTestImage(tmp() / "src", "v1", {{"disk/disk.img", "x"}}));
  const std::string conf = P("registries.conf");
  ASSERT_OK(WriteFileAtomic(conf, "[[registry]]\nprefix = \"" + (*reg)->host() + "/secret\"\nlocation = \"" +
                                      (*reg)->host() + "/secret\"\nblocked = true\n"));
  RunResult r = RunRegdisk(
      {"--registries-conf", conf, "copy", Layout("src", "v1"), "docker://" + (*reg)->host() + "/secret/disk:v1"}, {},
      Env());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("is blocked by registries.conf (" + conf));
  // Other repositories of the same registry are not.
  r = RunRegdisk(
      {"--registries-conf", conf, "copy", Layout("src", "v1"), "docker://" + (*reg)->host() + "/open/disk:v1"}, {},
      Env());
  EXPECT_EQ(r.exit_code, 0) << r.err;

  ASSERT_OK(WriteFileAtomic(conf, "[[registry]\nlocation = 1\n"));
  r = RunRegdisk({"--registries-conf", conf, "inspect", "docker://" + (*reg)->host() + "/open/disk:v1"}, {}, Env());
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr(conf + ":1:"));
  r = RunRegdisk({"--registries-conf", P("missing.conf"), "inspect", "docker://" + (*reg)->host() + "/open/disk:v1"},
                 {}, Env());
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("missing.conf does not exist"));
}

TEST_F(MirrorLoginTest, InsecureAppliesToTheOneRegistryItNames) {
  auto reg = TestRegistry::Start(RegistryMode::kTlsBasic);
  ASSERT_OK(reg);
  ASSERT_OK(MakeTestImage(tmp() / "src", "v1", {{"disk/disk.img", "x"}}));
  const std::string creds = (*reg)->user() + ":" + (*reg)->password();
  const std::string remote = "docker://" + (*reg)->host() + "/vm/disk:v1";
  // Untrusted certificate: refused at once, without retries.
  RunResult r = RunRegdisk({"-v", "copy", Layout("src", "v1"), remote, "--creds", creds}, {}, Env());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("is not trusted"));
  EXPECT_EQ(CountLines(r.err, "(attempt "), 1) << r.err;
  // insecure = true for that registry: unverified TLS is accepted.
  const std::string conf = P("registries.conf");
  ASSERT_OK(WriteFileAtomic(conf, "[[registry]]\nlocation = \"" + (*reg)->host() + "\"\ninsecure = true\n"));
  r = RunRegdisk({"--registries-conf", conf, "copy", Layout("src", "v1"), remote, "--creds", creds}, {}, Env());
  EXPECT_EQ(r.exit_code, 0) << r.err;
  r = RunRegdisk({"--registries-conf", conf, "inspect", remote, "--creds", creds}, {}, Env());
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST_F(MirrorLoginTest, NamesThatDoNotResolveFailAtOnce) {
  RunResult r = RunRegdisk({"-v", "inspect", "docker://no-such-host.invalid/vm/disk:v1"}, {}, Env());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("cannot reach registry no-such-host.invalid"));
  EXPECT_EQ(CountLines(r.err, "(attempt "), 1) << r.err;
}

TEST_F(MirrorLoginTest, AnUnreachableRegistryPointsAtTheStoredCopy) {
  auto reg = TestRegistry::Start(RegistryMode::kPlain);
  ASSERT_OK(reg);
  ASSERT_OK(MakeTestImage(tmp() / "src", "v1", {{"disk/disk.img", std::string(4096, 'd')}}));
  const std::string image = (*reg)->host() + "/vmdisks/tiny:latest";
  RunResult r = RunRegdisk({"copy", Layout("src", "v1"), "docker://" + image}, {}, Env());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = RunRegdisk({"--root", P("root"), "pull", image}, {}, Env());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  (*reg)->Stop();
  // ":latest" means imagePullPolicy Always: the pull fails at once, and the
  // error says what would have worked.
  ASSERT_OK(WriteFileAtomic(P("vm.yaml"),
                            "apiVersion: kubevirt.io/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: t\n"
                            "spec:\n  domain:\n    resources:\n      requests:\n        memory: 64M\n"
                            "    devices:\n      disks:\n      - name: d\n        volumeName: v\n"
                            "        disk:\n          dev: vda\n  volumes:\n  - name: v\n    registryDisk:\n"
                            "      image: " +
                                image + "\n"));
  r = RunRegdisk({"-v", "--root", P("root"), "run", "-f", P("vm.yaml"), "--timeout", "1"}, {}, Env());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("cannot reach registry " + (*reg)->host()));
  EXPECT_THAT(r.err, HasSubstr("imagePullPolicy: IfNotPresent would use"));
  EXPECT_EQ(CountLines(r.err, "(attempt "), 1) << r.err;
}

TEST_F(MirrorLoginTest, LoginWritesWhatSkopeoReadsAndLogoutRemovesIt) {
  auto reg = TestRegistry::Start(RegistryMode::kTlsBasic);
  ASSERT_OK(reg);
  auto img = MakeTestImage(tmp() / "src", "v1", {{"disk/disk.img", RandomBytes(5000, 3)}});
  ASSERT_OK(img);
  const std::string certs = (*reg)->ca_dir().string();
  const std::string host = (*reg)->host();
  const std::string authfile = P("auth/dir/auth.json");

  // A wrong password is refused by the registry, and nothing is written.
  RunResult r =
      RunRegdisk({"login", "--cert-dir", certs, "--authfile", authfile, "-u", "alice", "--password-stdin", host},
                 "wrong-password-xyz\n", Env());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("refused the credentials for user \"alice\""));
  EXPECT_THAT(r.err + r.out, Not(HasSubstr("wrong-password-xyz")));
  EXPECT_FALSE(fs::exists(authfile));

  r = RunRegdisk({"login", "--cert-dir", certs, "--authfile", authfile, "-u", "alice", "--password-stdin", host},
                 (*reg)->password() + "\n", Env());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "Login Succeeded!\n");
  struct stat st {};
  ASSERT_EQ(::stat(authfile.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(::stat(P("auth/dir").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  json j = json::parse(ReadFileCapped(authfile, 1 << 20).value());
  EXPECT_EQ(j["auths"][host]["auth"], registry::Base64Encode("alice:" + (*reg)->password()));

  // regdisk and skopeo use it.
  r = RunRegdisk(
      {"copy", Layout("src", "v1"), "docker://" + host + "/vm/disk:v1", "--cert-dir", certs, "--authfile", authfile},
      {}, Env());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  RunResult s = RunProgram(
      {"skopeo", "inspect", "--cert-dir", certs, "--authfile", authfile, "docker://" + host + "/vm/disk:v1"});
  ASSERT_EQ(s.exit_code, 0) << s.err;
  EXPECT_EQ(json::parse(s.out)["Digest"], img->manifest_digest.str());
  r = RunRegdisk({"login", "--get-login", "--authfile", authfile, host}, {}, Env());
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "alice\n");

  // logout removes it; then the registry asks for a login again.
  r = RunRegdisk({"logout", "--authfile", authfile, host}, {}, Env());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = RunRegdisk({"logout", "--authfile", authfile, host}, {}, Env());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("not logged in to " + host));
  r = RunRegdisk({"inspect", "docker://" + host + "/vm/disk:v1", "--cert-dir", certs, "--authfile", authfile}, {},
                 Env());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("requires a login; run regdisk login " + host));

  // What skopeo login writes (to REGISTRY_AUTH_FILE), regdisk reads.
  const std::string skopeo_file = P("skopeo-auth.json");
  s = RunProgram(
      {"skopeo", "login", "--cert-dir", certs, "--authfile", skopeo_file, "-u", "alice", "--password-stdin", host},
      (*reg)->password() + "\n");
  ASSERT_EQ(s.exit_code, 0) << s.err;
  r = RunRegdisk({"inspect", "docker://" + host + "/vm/disk:v1", "--cert-dir", certs}, {},
                 Env({"REGISTRY_AUTH_FILE=" + skopeo_file}));
  ASSERT_EQ(r.exit_code, 0) << r.err;

  // The default place: ${XDG_RUNTIME_DIR}/containers/auth.json, read
  // without any flag.
  r = RunRegdisk({"login", "--cert-dir", certs, "-u", "alice", "--password-stdin", host}, (*reg)->password(), Env());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(fs::exists(P("run/containers/auth.json")));
  r = RunRegdisk({"inspect", "docker://" + host + "/vm/disk:v1", "--cert-dir", certs}, {}, Env());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = RunRegdisk({"logout", "--all"}, {}, Env());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(ReadFileCapped(P("run/containers/auth.json"), 1 << 20).value())["auths"], json::object());

  // Without a terminal or --password-stdin there is no way to ask: exit 2.
  r = RunRegdisk({"login", "--cert-dir", certs, "-u", "alice", host}, {}, Env());
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("--password-stdin"));
  r = RunRegdisk({"login", "--authfile", authfile, host + "/vm/disk:v1"}, {}, Env());
  EXPECT_EQ(r.exit_code, 2);
}

TEST_F(MirrorLoginTest, TokenAuthRefusedPasswordAndNamespacedKeys) {
  auto reg = TestRegistry::Start(RegistryMode::kToken);
  ASSERT_OK(reg);
  ASSERT_OK(MakeTestImage(tmp() / "src", "v1", {{"disk/disk.img", "x"}}));
  const std::string host = (*reg)->host();
  const std::string authfile = P("auth.json");
  RunResult r = RunRegdisk({"login", "--authfile", authfile, "-u", "alice", "--password-stdin", host}, "nope\n", Env());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("refused the credentials for user \"alice\""));
  EXPECT_THAT(r.err, Not(HasSubstr("requires a login")));

  // A namespaced entry wins over the registry's: the registry-wide one is
  // wrong, the one for vm/ is right.
  ASSERT_OK(WriteFileAtomic(authfile,
                            json{{"auths",
                                  {{host, {{"auth", registry::Base64Encode("alice:wrong")}}},
                                   {host + "/vm", {{"auth", registry::Base64Encode("alice:" + (*reg)->password())}}}}}}
                                .dump()));
  r = RunRegdisk({"copy", Layout("src", "v1"), "docker://" + host + "/vm/disk:v1", "--authfile", authfile}, {}, Env());
  EXPECT_EQ(r.exit_code, 0) << r.err;
  r = RunRegdisk({"copy", Layout("src", "v1"), "docker://" + host + "/other/disk:v1", "--authfile", authfile}, {},
                 Env());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("refused the credentials for user \"alice\" (from auth file " + authfile + " (key " +
                               host + ")"));

  // login to a namespace writes a namespaced key.
  r = RunRegdisk({"login", "--authfile", P("ns.json"), "-u", "alice", "--password-stdin", host + "/team"},
                 (*reg)->password() + "\n", Env());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(json::parse(ReadFileCapped(P("ns.json"), 1 << 20).value())["auths"].contains(host + "/team"));
}

}  // namespace
}  // namespace regdisk::testing
