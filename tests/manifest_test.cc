#include "oci/manifest.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "oci/digest.h"

namespace regdisk::oci {
namespace {

using ::testing::HasSubstr;

const std::string kHexA(64, 'a');
const std::string kHexB(64, 'b');

std::string OciManifest() {
  return R"({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
    "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:)" + kHexA + R"(","size":10},
    "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:)" + kHexB + R"(","size":20}]})";
}

TEST(DigestTest, ParseAndHash) {
  auto d = Digest::Parse("sha256:" + kHexA);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->algorithm(), "sha256");
  EXPECT_EQ(d->Short(), "sha256:aaaaaaaaaaaa");
  EXPECT_EQ(Digest::Sha256Of("").str(), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  Hasher h("sha512");
  h.Update("abc");
  EXPECT_EQ(h.Finish().hex().substr(0, 16), "ddaf35a193617aba");
  EXPECT_THAT(Digest::Parse("sha256:" + std::string(64, 'A')).status().message(), HasSubstr("lowercase hex"));
  EXPECT_EQ(Digest::Parse("blake3:" + kHexA).status().code(), Code::kUnimplemented);
  EXPECT_THAT(Digest::Parse("nocolon").status().message(), HasSubstr("is not a digest"));
}

TEST(ManifestTest, ParsesOciManifest) {
  auto m = Manifest::Parse(OciManifest());
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_FALSE(m->is_index());
  ASSERT_TRUE(m->config);
  EXPECT_EQ(m->config->size, 10);
  ASSERT_EQ(m->layers.size(), 1u);
  EXPECT_EQ(m->layers[0].digest.hex(), kHexB);
}

TEST(ManifestTest, InfersMediaTypeWhenAbsent) {
  std::string doc = R"({"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:)" + kHexA +
                    R"(","size":1},"layers":[]})";
  auto m = Manifest::Parse(doc);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->media_type, media::kOciManifest);
  m = Manifest::Parse(doc, media::kDockerManifest);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->media_type, media::kDockerManifest);
}

TEST(ManifestTest, IndexAndPlatformSelection) {
  std::string doc = R"({"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json",
    "manifests":[
      {"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"sha256:)" + kHexA +
                    R"(","size":5,"platform":{"os":"linux","architecture":"arm64","variant":"v8"}},
      {"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"sha256:)" + kHexB +
                    R"(","size":6,"platform":{"os":"linux","architecture":"amd64"}}]})";
  auto m = Manifest::Parse(doc);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_TRUE(m->is_index());
  auto d = SelectPlatform(*m, {"linux", "amd64", ""});
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->digest.hex(), kHexB);
  d = SelectPlatform(*m, *Platform::Parse("linux/arm64"));
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->digest.hex(), kHexA);
  d = SelectPlatform(*m, *Platform::Parse("linux/s390x"));
  ASSERT_FALSE(d.ok());
  EXPECT_THAT(d.status().message(), HasSubstr("offers: linux/arm64/v8, linux/amd64"));
  EXPECT_FALSE(Platform::Parse("linux").ok());
}

TEST(ManifestTest, RefusesBadDocuments) {
  struct Bad {
    std::string doc;
    std::string message;
  };
  const Bad bad[] = {
      {"not json", "not a JSON object"},
      {"<html><body>Sign in</body></html>", "HTML"},
      {"[1,2]", "not a JSON object"},
      {R"({"mediaType":"application/vnd.oci.image.manifest.v1+json"})", "no integer schemaVersion"},
      {R"({"schemaVersion":1,"name":"x","fsLayers":[]})", "schema 1"},
      {R"({"schemaVersion":3})", "schemaVersion 3"},
      {R"({"schemaVersion":2,"mediaType":"text/plain"})", "media type \"text/plain\" is not supported"},
      {R"({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]})", "no \"config\""},
      {R"({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"x","digest":"md5:00","size":1},"layers":[]})",
       "digest algorithm \"md5\""},
      {R"({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"x","digest":"sha256:)" +
           kHexA + R"(","size":-1},"layers":[]})",
       "non-negative"},
      {R"({"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"})", "no \"manifests\""},
  };
  for (const auto& b : bad) {
    auto m = Manifest::Parse(b.doc);
    ASSERT_FALSE(m.ok()) << b.doc;
    EXPECT_THAT(m.status().message(), HasSubstr(b.message)) << b.doc;
  }
  std::string huge(kMaxManifestBytes + 1, ' ');
  auto m = Manifest::Parse(huge);
  EXPECT_EQ(m.status().code(), Code::kResourceExhausted);
  EXPECT_THAT(m.status().message(), HasSubstr("over the limit"));
}

TEST(ManifestTest, DescriptorRoundTrip) {
  auto m = Manifest::Parse(OciManifest());
  ASSERT_TRUE(m.ok());
  auto back = Descriptor::FromJson(m->layers[0].ToJson());
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->digest, m->layers[0].digest);
  EXPECT_EQ(back->size, 20);
  EXPECT_EQ(back->media_type, m->layers[0].media_type);
}

}  // namespace
}  // namespace regdisk::oci
