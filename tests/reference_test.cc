#include "oci/reference.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "image/transport.h"

namespace regdisk::oci {
namespace {

using ::testing::HasSubstr;

struct Case {
  const char* input;
  const char* registry;
  const char* repository;
  const char* tag;
  const char* api_host;
};

TEST(ReferenceTest, NormalisesLikeDocker) {
  const Case cases[] = {
      {"fedora", "docker.io", "library/fedora", "latest", "registry-1.docker.io"},
      {"kubevirt/fedora-cloud:35", "docker.io", "kubevirt/fedora-cloud", "35", "registry-1.docker.io"},
      {"docker.io/fedora", "docker.io", "library/fedora", "latest", "registry-1.docker.io"},
      {"index.docker.io/library/alpine:3", "docker.io", "library/alpine", "3", "registry-1.docker.io"},
      {"127.0.0.1:5000/vmdisks/fedora25", "127.0.0.1:5000", "vmdisks/fedora25", "latest", "127.0.0.1:5000"},
      {"localhost/disk:v1", "localhost", "disk", "v1", "localhost"},
      {"localhost:5000/a/b/c:1.0-rc_1", "localhost:5000", "a/b/c", "1.0-rc_1", "localhost:5000"},
      {"[::1]:5000/vm:x", "[::1]:5000", "vm", "x", "[::1]:5000"},
      {"quay.io/org/img__a.b-c", "quay.io", "org/img__a.b-c", "latest", "quay.io"},
      {"Registry/img", "Registry", "img", "latest", "Registry"},
  };
  for (const auto& c : cases) {
    auto r = Reference::Parse(c.input);
    ASSERT_TRUE(r.ok()) << c.input << ": " << r.status().ToString();
    EXPECT_EQ(r->registry, c.registry) << c.input;
    EXPECT_EQ(r->repository, c.repository) << c.input;
    EXPECT_EQ(r->tag, c.tag) << c.input;
    EXPECT_EQ(r->ApiHost(), c.api_host) << c.input;
  }
}

TEST(ReferenceTest, DigestAndTagPlusDigest) {
  const std::string hex(64, 'a');
  auto r = Reference::Parse("127.0.0.1:5000/vm@sha256:" + hex);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->tag, "");
  EXPECT_EQ(r->ManifestRef(), "sha256:" + hex);
  EXPECT_EQ(r->String(), "127.0.0.1:5000/vm@sha256:" + hex);

  r = Reference::Parse("127.0.0.1:5000/vm:v1@sha256:" + hex);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->tag, "v1");
  EXPECT_EQ(r->ManifestRef(), "sha256:" + hex);  // the digest wins
}

TEST(ReferenceTest, Loopback) {
  EXPECT_TRUE(Reference::Parse("127.0.0.1:5000/a")->IsLoopback());
  EXPECT_TRUE(Reference::Parse("127.9.9.9/a")->IsLoopback());
  EXPECT_TRUE(Reference::Parse("localhost:1/a")->IsLoopback());
  EXPECT_TRUE(Reference::Parse("[::1]:5000/a")->IsLoopback());
  EXPECT_FALSE(Reference::Parse("10.0.0.1:5000/a")->IsLoopback());
  EXPECT_FALSE(Reference::Parse("example.org/a")->IsLoopback());
}

TEST(ReferenceTest, MalformedReferencesSayWhatIsWrong) {
  struct Bad {
    std::string input;
    std::string message;
  };
  const Bad bad[] = {
      {"", "the image reference is empty"},
      {"host:5000/UPPER", "repository names must be lowercase"},
      {"host/a//b", "invalid repository component \"\""},
      {"host/-a", "invalid repository component \"-a\""},
      {"host/a:", "invalid tag \"\""},
      {"host/a:-x", "invalid tag \"-x\""},
      {"host/a:" + std::string(129, 'x'), "invalid tag"},
      {"host/a@sha256:abc", "is not a valid sha256 digest"},
      {"host/a@md5:0123", "digest algorithm \"md5\" is not supported"},
      {"host/a b", "white space"},
      {"http://host/a", "unknown transport"},
      {"host:99999/a", "invalid registry host"},
      {"host:5000/", "has no repository name"},
      {"host/" + std::string(300, 'a'), "longer than 255"},
  };
  for (const auto& b : bad) {
    auto r = Reference::Parse(b.input);
    ASSERT_FALSE(r.ok()) << b.input;
    EXPECT_THAT(r.status().message(), HasSubstr(b.message)) << b.input;
    EXPECT_NE(r.status().code(), Code::kOk);
  }
}

TEST(ImageNameTest, Transports) {
  auto n = image::ImageName::Parse("oci:/tmp/layout:disk");
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(n->transport, image::ImageName::Transport::kOciLayout);
  EXPECT_EQ(n->dir, "/tmp/layout");
  EXPECT_EQ(n->tag, "disk");
  n = image::ImageName::Parse("oci:/tmp/layout");
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(n->tag, "");
  n = image::ImageName::Parse("docker://127.0.0.1:5000/vm/disk");
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(n->String(), "docker://127.0.0.1:5000/vm/disk:latest");
  n = image::ImageName::Parse("vm/disk");  // no transport means docker://
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(n->ref.registry, "docker.io");
  EXPECT_THAT(image::ImageName::Parse("ftp://x/y").status().message(), HasSubstr("not supported"));
  EXPECT_THAT(image::ImageName::Parse("dir:/tmp/x").status().message(), HasSubstr("not supported"));
  EXPECT_THAT(image::ImageName::Parse("oci::tag").status().message(), HasSubstr("names no directory"));
}

}  // namespace
}  // namespace regdisk::oci
