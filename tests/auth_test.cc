#include "registry/auth.h"
#include "registry/auth_file.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include "harness/harness.h"
#include "registry/http.h"
#include "util/fs.h"

namespace regdisk::registry {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;

TEST(ChallengeTest, ParsesBearerAndBasic) {
  auto c = ParseChallenges(
      R"(Bearer realm="https://auth.example.org/token",service="registry.example.org",scope="repository:vm/disk:pull,push")");
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].scheme, "bearer");
  EXPECT_EQ(c[0].params["realm"], "https://auth.example.org/token");
  EXPECT_EQ(c[0].params["service"], "registry.example.org");
  EXPECT_EQ(c[0].params["scope"], "repository:vm/disk:pull,push");

  c = ParseChallenges(R"(Basic realm="Registry Realm", Bearer realm="https://t/x",error="invalid_token")");
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(c[0].scheme, "basic");
  EXPECT_EQ(c[0].params["realm"], "Registry Realm");
  EXPECT_EQ(c[1].scheme, "bearer");
  EXPECT_EQ(c[1].params["error"], "invalid_token");
  EXPECT_TRUE(ParseChallenges("").empty());
}

TEST(Base64Test, RoundTrip) {
  for (std::string s : {"", "a", "ab", "abc", "user:pa:ss"}) {
    auto d = Base64Decode(Base64Encode(s));
    ASSERT_TRUE(d.ok());
    EXPECT_EQ(*d, s);
  }
  EXPECT_EQ(*Base64Decode("YWJj"), "abc");
  EXPECT_EQ(*Base64Decode("YQ"), "a");  // unpadded
}

class CredentialsTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_.emplace(std::move(TempDir::Create("regdisk-auth").value())); }
  fs::path Write(const std::string& name, const std::string& text) {
    fs::path p = dir_->path() / name;
    MakeDirs(p.parent_path()).ok();
    EXPECT_TRUE(WriteFileAtomic(p, text).ok());
    return p;
  }
  std::optional<TempDir> dir_;
};

TEST_F(CredentialsTest, FlagWinsOverFiles) {
  AuthConfig cfg;
  cfg.env = std::map<std::string, std::string>{{"HOME", dir_->path().string()}};
  Write(".docker/config.json", R"({"auths":{"reg.example.org":{"auth":")" + Base64Encode("file:filepass") + R"("}}})");
  cfg.explicit_creds = Credentials{"flag", "flagpass"};
  auto c = LookupCredentials(cfg, "reg.example.org");
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(c->has_value());
  EXPECT_EQ((*c)->username, "flag");
  cfg.explicit_creds.reset();
  c = LookupCredentials(cfg, "reg.example.org");
  ASSERT_TRUE(c.ok() && c->has_value());
  EXPECT_EQ((*c)->username, "file");
  EXPECT_EQ((*c)->password, "filepass");
  c = LookupCredentials(cfg, "other.example.org");
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(c->has_value());
}

TEST_F(CredentialsTest, SearchOrder) {
  AuthConfig cfg;
  auto auth = [](const std::string& u) {
    return R"({"auths":{"https://reg.example.org/v1/":{"auth":")" + Base64Encode(u + ":pw") + R"("}}})";
  };
  fs::path xdg = Write("run/containers/auth.json", auth("xdg"));
  fs::path home = Write("home/.docker/config.json", auth("home"));
  fs::path env_file = Write("envfile.json", auth("envfile"));
  fs::path flag_file = Write("flagfile.json", auth("flagfile"));
  std::map<std::string, std::string> env = {{"HOME", (dir_->path() / "home").string()},
                                            {"XDG_RUNTIME_DIR", (dir_->path() / "run").string()},
                                            {"REGISTRY_AUTH_FILE", env_file.string()}};
  cfg.env = env;
  cfg.authfile = flag_file;
  EXPECT_EQ((*LookupCredentials(cfg, "reg.example.org"))->username, "flagfile");
  cfg.authfile.clear();
  EXPECT_EQ((*LookupCredentials(cfg, "reg.example.org"))->username, "envfile");
  env.erase("REGISTRY_AUTH_FILE");
  cfg.env = env;
  EXPECT_EQ((*LookupCredentials(cfg, "reg.example.org"))->username, "xdg");
  // Without XDG_RUNTIME_DIR: /run/containers/$UID/auth.json, then
  // ~/.config/containers/auth.json, then ~/.docker/config.json.
  env.erase("XDG_RUNTIME_DIR");
  cfg.env = env;
  cfg.per_uid_root = dir_->path() / "per-uid";
  EXPECT_EQ((*LookupCredentials(cfg, "reg.example.org"))->username, "home");
  Write("home/.config/containers/auth.json", auth("config"));
  EXPECT_EQ((*LookupCredentials(cfg, "reg.example.org"))->username, "config");
  Write("per-uid/" + std::to_string(::getuid()) + "/auth.json", auth("peruid"));
  EXPECT_EQ((*LookupCredentials(cfg, "reg.example.org"))->username, "peruid");
  EXPECT_EQ(AuthFileToWrite(cfg), dir_->path() / "per-uid" / std::to_string(::getuid()) / "auth.json");
  // A file without an entry for the registry passes the search on.
  EXPECT_EQ((*LookupCredentials(cfg, "other.example.org")), std::nullopt);
  // XDG_CONFIG_HOME moves the second file.
  env["XDG_CONFIG_HOME"] = (dir_->path() / "cfg").string();
  cfg.env = env;
  cfg.per_uid_root = dir_->path() / "none";
  EXPECT_EQ((*LookupCredentials(cfg, "reg.example.org"))->username, "home");
  // $REGISTRY_AUTH_FILE alone is read when set, and must exist.
  env["REGISTRY_AUTH_FILE"] = (dir_->path() / "missing.json").string();
  cfg.env = env;
  EXPECT_FALSE(LookupCredentials(cfg, "reg.example.org").ok());
}

TEST_F(CredentialsTest, TheMostSpecificNamespacedKeyWins) {
  AuthConfig cfg;
  cfg.env = std::map<std::string, std::string>{};
  auto entry = [](const std::string& u) { return std::string(R"({"auth":")") + Base64Encode(u + ":pw") + R"("})"; };
  cfg.authfile = Write("ns.json", R"({"auths":{"reg.example.org":)" + entry("host") + R"(,"reg.example.org/team":)" +
                                      entry("team") + R"(,"reg.example.org/team/disk":)" + entry("disk") +
                                      R"(,"https://index.docker.io/v1/":)" + entry("hub") + "}}");
  EXPECT_EQ((*LookupCredentials(cfg, "reg.example.org", "team/disk"))->username, "disk");
  EXPECT_EQ((*LookupCredentials(cfg, "reg.example.org", "team/disk2"))->username, "team");
  EXPECT_EQ((*LookupCredentials(cfg, "reg.example.org", "team/sub/disk"))->username, "team");
  EXPECT_EQ((*LookupCredentials(cfg, "reg.example.org", "teamwork/disk"))->username, "host");
  EXPECT_EQ((*LookupCredentials(cfg, "reg.example.org"))->username, "host");
  EXPECT_EQ((*LookupCredentials(cfg, "docker.io", "library/fedora"))->username, "hub");
  auto c = *LookupCredentials(cfg, "reg.example.org", "team/x");
  EXPECT_THAT(c->source, HasSubstr("ns.json (key reg.example.org/team)"));
}

TEST_F(CredentialsTest, LoginFilesAreWrittenAtomicallyPrivateAndKeepOtherEntries) {
  fs::path file = dir_->path() / "new/dir/auth.json";
  ASSERT_TRUE(StoreCredentials(file, "reg.example.org/team", Credentials{"u", "p:w", ""}).ok());
  struct stat st {};
  ASSERT_EQ(::stat(file.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(::stat(file.parent_path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  Write("keep.json", R"({"auths":{"https://old.example/v1/":{"auth":"eDp5"}},"credHelpers":{"a.example":"x"}})");
  fs::path keep = dir_->path() / "keep.json";
  ASSERT_TRUE(StoreCredentials(keep, "reg.example.org", Credentials{"u", "p", ""}).ok());
  std::string text = ReadFileCapped(keep, 1 << 20).value();
  EXPECT_THAT(text, HasSubstr("credHelpers"));
  EXPECT_THAT(text, HasSubstr("https://old.example/v1/"));
  AuthConfig cfg;
  cfg.env = std::map<std::string, std::string>{};
  cfg.authfile = keep;
  EXPECT_EQ((*LookupCredentials(cfg, "reg.example.org"))->password, "p");
  // Logout of old.example removes the URL-keyed entry too.
  EXPECT_TRUE(RemoveCredentials(keep, "old.example").value());
  EXPECT_FALSE(RemoveCredentials(keep, "old.example").value());
  EXPECT_THAT(ReadFileCapped(keep, 1 << 20).value(), Not(HasSubstr("old.example")));
  ASSERT_TRUE(RemoveAllCredentials(keep).ok());
  EXPECT_EQ(LookupCredentials(cfg, "reg.example.org").value(), std::nullopt);
  EXPECT_THAT(ReadFileCapped(keep, 1 << 20).value(), HasSubstr("credHelpers"));
  // A broken file is not overwritten.
  Write("broken.json", "{oops");
  EXPECT_FALSE(StoreCredentials(dir_->path() / "broken.json", "r", Credentials{"u", "p", ""}).ok());
  EXPECT_EQ(ReadFileCapped(dir_->path() / "broken.json", 100).value(), "{oops");

  EXPECT_EQ(LoginKey("https://quay.io/").value(), "quay.io");
  EXPECT_EQ(LoginKey("docker://127.0.0.1:5000/ns").value(), "127.0.0.1:5000/ns");
  EXPECT_FALSE(LoginKey("quay.io/ns/disk:v1").ok());
  EXPECT_FALSE(LoginKey("quay.io/ns@sha256:00").ok());
  EXPECT_FALSE(LoginKey("").ok());
}

TEST_F(CredentialsTest, BrokenFilesAreErrorsThatNameTheFile) {
  AuthConfig cfg;
  cfg.env = std::map<std::string, std::string>{};
  cfg.authfile = Write("bad.json", "{not json");
  auto c = LookupCredentials(cfg, "reg.example.org");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("bad.json is not valid JSON"));
  cfg.authfile = dir_->path() / "missing.json";
  c = LookupCredentials(cfg, "reg.example.org");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("does not exist"));
  cfg.authfile = Write("badauth.json", R"({"auths":{"reg.example.org":{"auth":"bm9jb2xvbg=="}}})");
  c = LookupCredentials(cfg, "reg.example.org");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("malformed \"auth\" entry"));
  EXPECT_THAT(c.status().message(), ::testing::Not(HasSubstr("nocolon")));
}

TEST_F(CredentialsTest, CredentialHelperGetsTheHostOnStdin) {
  fs::path bin = dir_->path() / "bin";
  fs::path helper = Write("bin/docker-credential-regdisktest",
                          "#!/bin/sh\n[ \"$1\" = get ] || exit 3\nread host\n"
                          "[ \"$host\" = reg.example.org ] || exit 4\n"
                          "printf '{\"ServerURL\":\"%s\",\"Username\":\"helperuser\",\"Secret\":\"helpersecret\"}' \"$host\"\n");
  ::chmod(helper.c_str(), 0755);
  std::string old_path = ::getenv("PATH");
  ::setenv("PATH", (bin.string() + ":" + old_path).c_str(), 1);
  AuthConfig cfg;
  cfg.env = std::map<std::string, std::string>{};
  cfg.authfile = Write("helpers.json", R"({"credHelpers":{"reg.example.org":"regdisktest"}})");
  auto c = LookupCredentials(cfg, "reg.example.org");
  ::setenv("PATH", old_path.c_str(), 1);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  ASSERT_TRUE(c->has_value());
  EXPECT_EQ((*c)->username, "helperuser");
  EXPECT_EQ((*c)->password, "helpersecret");
}

TEST(CredsFlagTest, Parses) {
  auto c = ParseCredsFlag("user:pa:ss");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->username, "user");
  EXPECT_EQ(c->password, "pa:ss");
  EXPECT_FALSE(ParseCredsFlag(":pw").ok());
  EXPECT_THAT(ParseCredsFlag(":pw").status().message(), ::testing::Not(HasSubstr("pw")));
}

}  // namespace
}  // namespace regdisk::registry
