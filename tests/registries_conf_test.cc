// containers-registries.conf(5) parsing, merging, mirror selection and
// short-name resolution (registry/registries_conf.h).
#include "registry/registries_conf.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "harness/harness.h"
#include "util/fs.h"

namespace regdisk::registry {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

constexpr const char* kConf = R"(
unqualified-search-registries = ["quay.io", "docker.io"]
short-name-mode = "enforcing"

[aliases]
"fedora" = "registry.fedoraproject.org/fedora"

[[registry]]
prefix = "example.com/team"
location = "registry.internal:5000/mirrored/team"
insecure = true

[[registry.mirror]]
location = "mirror-a.local/ns"

[[registry.mirror]]
location = "mirror-digests.local"
pull-from-mirror = "digest-only"
insecure = true

[[registry.mirror]]
location = "mirror-tags.local"
pull-from-mirror = "tag-only"

[[registry]]
location = "blocked.example.org"
blocked = true

[[registry]]
prefix = "*.corp.example"
)";

std::vector<std::string> Names(const std::vector<PullSource>& s) {
  std::vector<std::string> out;
  for (const auto& p : s)
    out.push_back(p.registry + "/" + p.repository + (p.insecure ? " insecure" : "") + (p.mirror ? " mirror" : ""));
  return out;
}

TEST(RegistriesConfTest, MirrorsInOrderByKindOfPullThenTheRewrittenOrigin) {
  auto c = RegistriesConf::Parse(kConf, "test.conf");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto tag = c->PullSources("example.com", "team/vm/disk", false);
  ASSERT_TRUE(tag.ok());
  EXPECT_THAT(Names(*tag), ElementsAre("mirror-a.local/ns/vm/disk mirror", "mirror-tags.local/vm/disk mirror",
                                       "registry.internal:5000/mirrored/team/vm/disk insecure"));
  auto digest = c->PullSources("example.com", "team/vm/disk", true);
  ASSERT_TRUE(digest.ok());
  EXPECT_THAT(Names(*digest),
              ElementsAre("mirror-a.local/ns/vm/disk mirror", "mirror-digests.local/vm/disk insecure mirror",
                          "registry.internal:5000/mirrored/team/vm/disk insecure"));
  // Pushes go to the location, never to a mirror.
  auto push = c->PushTarget("example.com", "team/vm/disk");
  ASSERT_TRUE(push.ok());
  EXPECT_EQ(push->registry, "registry.internal:5000");
  EXPECT_EQ(push->repository, "mirrored/team/vm/disk");
  // A prefix matches whole path components only.
  auto other = c->PullSources("example.com", "teamwork/disk", false);
  ASSERT_TRUE(other.ok());
  EXPECT_THAT(Names(*other), ElementsAre("example.com/teamwork/disk"));
  // A wildcard prefix without a location keeps the name.
  auto wild = c->PullSources("reg.corp.example", "a/b", false);
  ASSERT_TRUE(wild.ok());
  EXPECT_THAT(Names(*wild), ElementsAre("reg.corp.example/a/b"));
  EXPECT_EQ(c->Find("corp.example/a"), nullptr);
}

TEST(RegistriesConfTest, BlockedRegistriesAreRefusedNamingTheFile) {
  auto c = RegistriesConf::Parse(kConf, "/etc/x/test.conf");
  ASSERT_TRUE(c.ok());
  for (bool digest : {false, true}) {
    auto s = c->PullSources("blocked.example.org", "vm/disk", digest);
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.status().code(), Code::kPermissionDenied);
    EXPECT_THAT(s.status().message(),
                HasSubstr("\"blocked.example.org/vm/disk\" is blocked by registries.conf (/etc/x/test.conf"));
  }
  EXPECT_FALSE(c->PushTarget("blocked.example.org", "x").ok());
}

TEST(RegistriesConfTest, MirrorByDigestOnlyOnTheRegistry) {
  auto c = RegistriesConf::Parse(R"(
[[registry]]
location = "origin.example"
mirror-by-digest-only = true
[[registry.mirror]]
location = "m.example"
)",
                                 "t.conf");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_THAT(Names(*c->PullSources("origin.example", "r", false)), ElementsAre("origin.example/r"));
  EXPECT_THAT(Names(*c->PullSources("origin.example", "r", true)),
              ElementsAre("m.example/r mirror", "origin.example/r"));
}

TEST(RegistriesConfTest, MalformedFilesAreOneLineErrorsNamingFileAndFix) {
  struct Case {
    const char* text;
    const char* want;
  } cases[] = {
      {"unqualified-search-registries = [\"a\"", "bad.conf:1:"},
      {"[registries.search]\nregistries = [\"docker.io\"]\n", "version 1 format"},
      {"[[registry]]\nlocation = \"a\"\n[[registry.mirror]]\nlocation = \"b\"\npull-from-mirror = \"sometimes\"\n",
       "use all, digest-only or tag-only"},
      {"[[registry]]\nlocation = \"https://a.example\"\n", "must not have a URL scheme"},
      {"[[registry]]\nprefix = \"a.example/x\"\n", "has no location"},
      {"[[registry]]\ninsecure = true\n", "neither prefix nor location"},
      {"[[registry]]\nlocation = \"a\"\ninsecure = \"yes\"\n", "insecure must be true or false"},
      {"short-name-mode = \"strict\"\n", "use enforcing, permissive or disabled"},
      {"[aliases]\n\"x\" = \"y\"\n", "must be a fully qualified name"},
      {"[aliases]\n\"quay.io/x\" = \"quay.io/y\"\n", "an alias must be a short name"},
      {"[[registry]]\nlocation = \"a\"\n[[registry]]\nlocation = \"a\"\n", "defined twice"},
      {"[[registry]]\nlocation = \"a\"\npull-from-mirror = \"all\"\n", "belongs in a [[registry.mirror]]"},
  };
  for (const auto& c : cases) {
    auto r = RegistriesConf::Parse(c.text, "bad.conf");
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr(c.want)) << c.text;
    EXPECT_THAT(r.status().message(), HasSubstr("bad.conf")) << c.text;
    EXPECT_EQ(r.status().message().find('\n'), std::string::npos) << c.text;
  }
}

TEST(RegistriesConfTest, DropInsReplaceRegistriesByPrefixAndMergeAliases) {
  auto tmp = TempDir::Create("regdisk-conf").value();
  const fs::path main = tmp.path() / "registries.conf";
  const fs::path d = tmp.path() / "registries.conf.d";
  ASSERT_TRUE(MakeDirs(d).ok());
  ASSERT_TRUE(WriteFileAtomic(main, R"(
unqualified-search-registries = ["one.example"]
[aliases]
"a" = "one.example/a"
"b" = "one.example/b"
[[registry]]
location = "one.example"
[[registry.mirror]]
location = "old-mirror.example"
)")
                  .ok());
  ASSERT_TRUE(WriteFileAtomic(d / "20-late.conf", "[aliases]\n\"b\" = \"two.example/b-late\"\n").ok());
  ASSERT_TRUE(WriteFileAtomic(d / "10-early.conf", R"(
unqualified-search-registries = ["two.example", "three.example"]
[aliases]
"b" = "two.example/b"
[[registry]]
location = "one.example"
[[registry.mirror]]
location = "new-mirror.example"
)")
                  .ok());
  ASSERT_TRUE(WriteFileAtomic(d / "ignored.txt", "not toml [[[").ok());
  RegistriesConfPaths paths;
  paths.file = main;
  paths.dirs = {d, tmp.path() / "missing.d"};
  auto c = LoadRegistriesConf(paths);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_THAT(c->files, ElementsAre(main.string(), (d / "10-early.conf").string(), (d / "20-late.conf").string()));
  EXPECT_THAT(*c->unqualified_search_registries, ElementsAre("two.example", "three.example"));
  EXPECT_EQ(c->aliases.at("a"), "one.example/a");
  EXPECT_EQ(c->aliases.at("b"), "two.example/b-late");
  EXPECT_THAT(Names(*c->PullSources("one.example", "r", false)),
              ElementsAre("new-mirror.example/r mirror", "one.example/r"));

  // An explicit file must exist; the standard ones may be missing.
  paths.file = tmp.path() / "nope.conf";
  paths.file_must_exist = true;
  auto missing = LoadRegistriesConf(paths);
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.status().message(), HasSubstr("--registries-conf"));
}

TEST(RegistriesConfTest, StandardPlaces) {
  auto tmp = TempDir::Create("regdisk-conf").value();
  std::map<std::string, std::string> env = {{"HOME", tmp.path().string()}};
  auto p = RegistriesConfPaths::Standard("", env);
  EXPECT_EQ(p.file, "/etc/containers/registries.conf");
  EXPECT_THAT(p.dirs,
              ElementsAre("/etc/containers/registries.conf.d", tmp.path() / ".config/containers/registries.conf.d"));
  ASSERT_TRUE(MakeDirs(tmp.path() / ".config/containers").ok());
  ASSERT_TRUE(WriteFileAtomic(tmp.path() / ".config/containers/registries.conf", "").ok());
  p = RegistriesConfPaths::Standard("", env);
  EXPECT_EQ(p.file, tmp.path() / ".config/containers/registries.conf");
  EXPECT_THAT(p.dirs, ElementsAre(tmp.path() / ".config/containers/registries.conf.d"));
  env["CONTAINERS_REGISTRIES_CONF"] = "/x/env.conf";
  p = RegistriesConfPaths::Standard("", env);
  EXPECT_EQ(p.file, "/x/env.conf");
  EXPECT_TRUE(p.file_must_exist);
  p = RegistriesConfPaths::Standard("/x/flag.conf", env);
  EXPECT_EQ(p.file, "/x/flag.conf");
}

TEST(ShortNameTest, AliasesSearchRegistriesAndModes) {
  EXPECT_TRUE(IsShortName("fedora"));
  EXPECT_TRUE(IsShortName("vmdisks/fedora:1"));
  EXPECT_FALSE(IsShortName("quay.io/fedora"));
  EXPECT_FALSE(IsShortName("localhost/fedora"));
  EXPECT_FALSE(IsShortName("127.0.0.1:5000/fedora"));

  auto c = RegistriesConf::Parse(kConf, "test.conf").value();
  // An alias wins, keeping the tag or digest.
  EXPECT_THAT(ResolveShortName(c, "fedora:39").value(), ElementsAre("registry.fedoraproject.org/fedora:39"));
  // Enforcing with several search registries: an error naming them.
  auto amb = ResolveShortName(c, "vmdisks/disk:v1");
  ASSERT_FALSE(amb.ok());
  EXPECT_EQ(amb.status().code(), Code::kInvalidArgument);
  EXPECT_THAT(amb.status().message(), HasSubstr("quay.io/vmdisks/disk:v1, docker.io/vmdisks/disk:v1"));
  // Permissive: every candidate, in order.
  c.short_name_mode = ShortNameMode::kPermissive;
  EXPECT_THAT(
      ResolveShortName(c, "disk@sha256:" + std::string(64, 'a')).value(),
      ElementsAre("quay.io/disk@sha256:" + std::string(64, 'a'), "docker.io/disk@sha256:" + std::string(64, 'a')));
  // One search registry is not ambiguous, even when enforcing.
  c.short_name_mode = ShortNameMode::kEnforcing;
  c.unqualified_search_registries = std::vector<std::string>{"quay.io"};
  EXPECT_THAT(ResolveShortName(c, "disk").value(), ElementsAre("quay.io/disk"));
  // An empty list is set, and gives nothing to try.
  c.unqualified_search_registries = std::vector<std::string>{};
  EXPECT_THAT(ResolveShortName(c, "disk").status().message(), HasSubstr("no unqualified-search-registries"));
  // No file sets the list: Docker's default.
  EXPECT_THAT(ResolveShortName(RegistriesConf{}, "disk").value(), ElementsAre("docker.io/disk"));
}

}  // namespace
}  // namespace regdisk::registry
