// The registry client against Debian's docker-registry in its three modes
// (plain, TLS + htpasswd, token auth), and against small fake registries
// for the answers a real one never gives.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <future>
#include <httplib.h>

#include <nlohmann/json.hpp>

#include "harness/harness.h"
#include "image/copy.h"
#include "image/layout.h"
#include "registry/client.h"

namespace regdisk::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;

class RegistryTest : public TempDirTest {
 protected:
  std::string Layout(const std::string& name, const std::string& tag) { return "oci:" + (tmp() / name).string() + ":" + tag; }
};

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

// Every blob of `a` is in `b` with the same bytes.
void ExpectSameBlobs(const fs::path& a, const fs::path& b) {
  for (const auto& e : fs::directory_iterator(a / "blobs/sha256")) {
    fs::path other = b / "blobs/sha256" / e.path().filename();
    ASSERT_TRUE(fs::exists(other)) << other;
    EXPECT_EQ(ReadFileCapped(e.path(), 1 << 26).value(), ReadFileCapped(other, 1 << 26).value());
  }
}

TEST_F(RegistryTest, PlainRoundTripKeepsDigests) {
  auto reg = TestRegistry::Start(RegistryMode::kPlain);
  ASSERT_OK(reg);
  auto img = MakeTestImage(tmp() / "src", "v1", {{"disk/disk.img", RandomBytes(300000, 1)}});
  ASSERT_OK(img);
  std::string remote = "docker://" + (*reg)->host() + "/vmdisks/fedora25:latest";

  RunResult push = RunRegdisk({"copy", Layout("src", "v1"), remote});
  ASSERT_EQ(push.exit_code, 0) << push.err;
  EXPECT_EQ(Trim(push.out), img->manifest_digest.str());

  RunResult inspect = RunRegdisk({"inspect", remote});
  ASSERT_EQ(inspect.exit_code, 0) << inspect.err;
  json j = json::parse(inspect.out);
  EXPECT_EQ(j["Digest"], img->manifest_digest.str());
  EXPECT_EQ(j["LayersData"][0]["MIMEType"], img->layers[0].media_type);
  EXPECT_EQ(j["Layers"][0], img->layers[0].digest.str());
  EXPECT_EQ(j["Labels"]["org.example.test"], "v1");
  EXPECT_EQ(j["Architecture"], "amd64");

  RunResult pull = RunRegdisk({"copy", remote, Layout("back", "fedora25")});
  ASSERT_EQ(pull.exit_code, 0) << pull.err;
  EXPECT_EQ(Trim(pull.out), img->manifest_digest.str());
  ExpectSameBlobs(tmp() / "back", tmp() / "src");

  // Pushing again skips every blob; a digest reference resolves the same.
  RunResult again = RunRegdisk({"-v", "copy", Layout("src", "v1"), remote});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_THAT(again.err, HasSubstr("0 blobs (0 bytes), 2 already present"));
  RunResult by_digest = RunRegdisk({"inspect", "--raw", "docker://" + (*reg)->host() + "/vmdisks/fedora25@" +
                                                            img->manifest_digest.str()});
  ASSERT_EQ(by_digest.exit_code, 0) << by_digest.err;
  EXPECT_EQ(oci::Digest::Sha256Of(by_digest.out), img->manifest_digest);

  // Tags and HEAD resolution through the library.
  ASSERT_EQ(RunRegdisk({"copy", Layout("src", "v1"), "docker://" + (*reg)->host() + "/vmdisks/fedora25:v2"}).exit_code, 0);
  registry::RegistryClient client((*reg)->host(), {});
  auto tags = client.ListTags("vmdisks/fedora25");
  ASSERT_OK(tags);
  EXPECT_THAT(*tags, ::testing::UnorderedElementsAre("latest", "v2"));
  auto resolved = client.ResolveManifest("vmdisks/fedora25", "v2");
  ASSERT_OK(resolved);
  EXPECT_EQ(*resolved, img->manifest_digest);
  EXPECT_EQ(client.ResolveManifest("vmdisks/fedora25", "nope").status().code(), Code::kNotFound);
}

TEST_F(RegistryTest, FilesThatAreNotRegularFilesAndEmptyOrNegativeFlags) {
  // A FIFO would block a plain open; /dev/zero never ends.
  const std::string fifo = P("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  const Case cases[] = {
      {{"validate", "-f", fifo}, fifo + " is not a regular file (a FIFO); give a regular file"},
      {{"--authfile", fifo, "inspect", "docker://127.0.0.1:1/a/b:c"}, fifo + " is not a regular file (a FIFO)"},
      {{"--authfile", "/dev/zero", "inspect", "docker://127.0.0.1:1/a/b:c"}, "/dev/zero is not a regular file (a device"},
      {{"--root", "", "images"}, "--root needs a directory (it is empty)"},
      {{"run", "-f", fifo, "--timeout", "-1"}, "--timeout takes a duration such as 30s, 5m, 1h30m or 500ms (a bare number is seconds), not \"-1\""},
      {{"run", "-f", fifo, "--grace", "-5"}, "--grace takes a duration such as 30s"},
  };
  for (const auto& c : cases) {
    RunResult r = RunRegdisk(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.message << ": " << r.err;
    EXPECT_THAT(r.err, HasSubstr(c.message));
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  EXPECT_FALSE(fs::exists("refs.json")) << "an empty --root must not make a store in the current directory";

  // A 100 kB reference full of terminal escapes: one short, escaped line.
  std::string evil = "docker://127.0.0.1:1/a\x1b[2J\x1b]0;owned\x07";
  evil += std::string(100000, 'b');
  RunResult r = RunRegdisk({"inspect", evil});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_EQ(r.err.find('\x1b'), std::string::npos);
  EXPECT_EQ(r.err.find('\x07'), std::string::npos);
  EXPECT_LT(r.err.size(), 2100u);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1);
}

TEST_F(RegistryTest, MissingImagesAndBadFlagsAreClearErrors) {
  auto reg = TestRegistry::Start(RegistryMode::kPlain);
  ASSERT_OK(reg);
  RunResult r = RunRegdisk({"inspect", "docker://" + (*reg)->host() + "/nothing/here:v1"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("manifest nothing/here:v1: not found on " + (*reg)->host()));
  r = RunRegdisk({"inspect", "docker://" + (*reg)->host() + "/Bad/Name"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("must be lowercase"));
  r = RunRegdisk({"--tls-verify=maybe", "inspect", "docker://" + (*reg)->host() + "/a/b"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("--tls-verify takes true or false"));
  r = RunRegdisk({"--platform", "linux", "inspect", "docker://" + (*reg)->host() + "/a/b"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("OS/ARCH"));
  r = RunRegdisk({"copy", "oci:" + (tmp() / "none").string() + ":x", "docker://" + (*reg)->host() + "/a/b"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("does not exist"));
}

TEST_F(RegistryTest, TlsAndBasicAuth) {
  auto reg = TestRegistry::Start(RegistryMode::kTlsBasic);
  ASSERT_OK(reg);
  auto img = MakeTestImage(tmp() / "src", "v1", {{"disk/disk.img", RandomBytes(100000, 2)}});
  ASSERT_OK(img);
  std::string remote = "docker://" + (*reg)->host() + "/vm/disk:v1";
  std::string creds = (*reg)->user() + ":" + (*reg)->password();
  std::string certs = (*reg)->ca_dir().string();

  // Untrusted certificate: refused, with the fix in the message.
  RunResult r = RunRegdisk({"copy", Layout("src", "v1"), remote, "--creds", creds});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("is not trusted"));
  EXPECT_THAT(r.err, HasSubstr("--cert-dir"));

  // No credentials: told to log in.
  r = RunRegdisk({"copy", Layout("src", "v1"), remote, "--cert-dir", certs});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("requires a login"));

  // Wrong password: refused, and the password is never printed.
  r = RunRegdisk({"-v", "copy", Layout("src", "v1"), remote, "--cert-dir", certs, "--creds", "alice:wrong-password-xyz"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, Not(HasSubstr("wrong-password-xyz")));
  EXPECT_THAT(r.err, HasSubstr("refused the credentials for user \"alice\" (from --creds)"));
  EXPECT_THAT(r.err, Not(HasSubstr("requires a login")));

  // Right credentials and CA.
  r = RunRegdisk({"-v", "copy", Layout("src", "v1"), remote, "--cert-dir", certs, "--creds", creds});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, Not(HasSubstr((*reg)->password())));
  EXPECT_THAT(r.err, Not(HasSubstr("plain HTTP")));

  // Password on stdin rather than the command line.
  r = RunRegdisk({"inspect", remote, "--cert-dir", certs, "--creds", (*reg)->user()}, (*reg)->password() + "\n");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["Digest"], img->manifest_digest.str());

  // An auth file, as podman writes it.
  std::string authfile = (tmp() / "auth.json").string();
  ASSERT_OK(WriteFileAtomic(authfile, json{{"auths", {{(*reg)->host(), {{"auth", registry::Base64Encode(creds)}}}}}}.dump()));
  r = RunRegdisk({"inspect", remote, "--cert-dir", certs, "--authfile", authfile});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // And through $REGISTRY_AUTH_FILE.
  r = RunRegdisk({"inspect", remote, "--cert-dir", certs}, {}, {"REGISTRY_AUTH_FILE=" + authfile});
  ASSERT_EQ(r.exit_code, 0) << r.err;

  // CA certificates from a certs.d directory named after the registry.
  registry::ClientOptions copts;
  copts.certs_d_roots = {tmp() / "certs.d"};
  copts.auth.explicit_creds = registry::Credentials{(*reg)->user(), (*reg)->password()};
  ASSERT_OK(MakeDirs(tmp() / "certs.d" / (*reg)->host()));
  ASSERT_OK(WriteFileAtomic(tmp() / "certs.d" / (*reg)->host() / "ca.crt",
                            ReadFileCapped((*reg)->ca_dir() / "ca.crt", 1 << 20).value()));
  registry::RegistryClient via_certs_d((*reg)->host(), copts);
  auto m = via_certs_d.GetManifest("vm/disk", "v1");
  ASSERT_OK(m);
  EXPECT_EQ(m->digest, img->manifest_digest);

  // --tls-verify=false skips verification but still authenticates.
  r = RunRegdisk({"--tls-verify=false", "inspect", remote, "--creds", creds});
  ASSERT_EQ(r.exit_code, 0) << r.err;
}

TEST_F(RegistryTest, RegistryToLayoutToAuthenticatedTlsRegistry) {
  auto plain = TestRegistry::Start(RegistryMode::kPlain);
  ASSERT_OK(plain);
  auto secure = TestRegistry::Start(RegistryMode::kTlsBasic);
  ASSERT_OK(secure);
  auto img = MakeTestImage(tmp() / "src", "v1", {{"disk/disk.img", RandomBytes(200000, 3)}});
  ASSERT_OK(img);
  std::string a = "docker://" + (*plain)->host() + "/vmdisks/fedora25:latest";
  std::string b = "docker://" + (*secure)->host() + "/team/fedora25:v1";
  ASSERT_EQ(RunRegdisk({"copy", Layout("src", "v1"), a}).exit_code, 0);
  RunResult r = RunRegdisk({"copy", a, Layout("mid", "fedora25")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = RunRegdisk({"copy", Layout("mid", "fedora25"), b, "--cert-dir", (*secure)->ca_dir().string(), "--creds",
                  (*secure)->user() + ":" + (*secure)->password()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Trim(r.out), img->manifest_digest.str());
  // Registry to registry directly, staged through a temp file.
  std::string c = "docker://" + (*secure)->host() + "/team/direct:v1";
  r = RunRegdisk({"copy", a, c, "--cert-dir", (*secure)->ca_dir().string(), "--creds",
                  (*secure)->user() + ":" + (*secure)->password()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Trim(r.out), img->manifest_digest.str());
}

TEST_F(RegistryTest, ClientCertificatesFromTheCertDirectory) {
  auto reg = TestRegistry::Start(RegistryMode::kMutualTls);
  ASSERT_OK(reg);
  auto img = MakeTestImage(tmp() / "src", "v1", {{"disk/disk.img", RandomBytes(50000, 4)}});
  ASSERT_OK(img);
  std::string remote = "docker://" + (*reg)->host() + "/vm/mtls:v1";
  // The CA alone: the registry wants a client certificate, and says so.
  fs::path ca_only = tmp() / "ca-only";
  ASSERT_OK(MakeDirs(ca_only));
  fs::copy_file((*reg)->ca_dir() / "ca.crt", ca_only / "ca.crt");
  RunResult r = RunRegdisk({"copy", Layout("src", "v1"), remote, "--cert-dir", ca_only.string()});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_THAT(r.err, HasSubstr("client certificate"));
  // A *.cert without its *.key is named.
  fs::path half = tmp() / "half";
  ASSERT_OK(MakeDirs(half));
  fs::copy_file((*reg)->ca_dir() / "ca.crt", half / "ca.crt");
  fs::copy_file((*reg)->ca_dir() / "client.cert", half / "client.cert");
  r = RunRegdisk({"copy", Layout("src", "v1"), remote, "--cert-dir", half.string()});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("has no matching client.key"));
  // A pair the registry's CA did not sign: refused, and the file named.
  fs::path other = tmp() / "other";
  ASSERT_OK(MakeDirs(other));
  fs::copy_file((*reg)->ca_dir() / "ca.crt", other / "ca.crt");
  ASSERT_EQ(RunProgram({"openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                        "-keyout", (other / "me.key").string(), "-out", (other / "me.cert").string(), "-days", "1",
                        "-subj", "/CN=stranger"})
                .exit_code,
            0);
  r = RunRegdisk({"copy", Layout("src", "v1"), remote, "--cert-dir", other.string()});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("refused the TLS client certificate " + (other / "me.cert").string()));
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  // The pair: push and pull back, digests intact.
  r = RunRegdisk({"copy", Layout("src", "v1"), remote, "--cert-dir", (*reg)->ca_dir().string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Trim(r.out), img->manifest_digest.str());
  r = RunRegdisk({"copy", remote, Layout("back", "v1"), "--cert-dir", (*reg)->ca_dir().string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Trim(r.out), img->manifest_digest.str());
}

TEST_F(RegistryTest, IdentityTokensUseTheOAuth2RefreshTokenFlow) {
  TokenServer::Options o;
  o.anonymous_pull = false;
  auto reg = TestRegistry::Start(RegistryMode::kToken, o);
  ASSERT_OK(reg);
  TokenServer* ts = (*reg)->token_server();
  auto img = MakeTestImage(tmp() / "src", "v1", {{"disk/disk.img", RandomBytes(50000, 6)}});
  ASSERT_OK(img);
  std::string remote = "docker://" + (*reg)->host() + "/vm/idt:v1";
  // What `docker login` leaves for registries that hand out identity tokens.
  auto authfile = [&](const std::string& token) {
    json j = {{"auths", {{(*reg)->host(), {{"auth", ""}, {"identitytoken", token}}}}}};
    fs::path p = tmp() / ("auth-" + std::to_string(token.size()) + ".json");
    EXPECT_TRUE(WriteFileAtomic(p, j.dump(), 0600).ok());
    return p.string();
  };
  std::string good = authfile(o.identity_token);
  RunResult r = RunRegdisk({"copy", Layout("src", "v1"), remote, "--authfile", good});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_GE(ts->oauth_requests(), 1);
  r = RunRegdisk({"copy", remote, Layout("back", "v1"), "--authfile", good});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Trim(r.out), img->manifest_digest.str());

  std::string stale = authfile("idt-expired-or-revoked-token");
  r = RunRegdisk({"-v", "copy", remote, Layout("back2", "v1"), "--authfile", stale});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("refused the identity token from the auth file; log in again"));
  EXPECT_THAT(r.err, Not(HasSubstr("idt-expired-or-revoked-token")));
}

TEST_F(RegistryTest, TokenAuthCachesTokensAndRenewsOnExpiry) {
  auto reg = TestRegistry::Start(RegistryMode::kToken);
  ASSERT_OK(reg);
  TokenServer* ts = (*reg)->token_server();
  auto img = MakeTestImage(tmp() / "src", "v1", {{"disk/disk.img", RandomBytes(50000, 4)}});
  ASSERT_OK(img);
  std::string remote = "docker://" + (*reg)->host() + "/vm/disk:v1";

  // Anonymous push is refused with a sentence, not a stack of HTTP codes.
  RunResult r = RunRegdisk({"copy", Layout("src", "v1"), remote});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("requires a login"));
  r = RunRegdisk({"copy", Layout("src", "v1"), remote, "--creds", "alice:nope-not-it"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("refused the credentials for user \"alice\""));
  EXPECT_THAT(r.err, Not(HasSubstr("nope-not-it")));
  r = RunRegdisk({"copy", Layout("src", "v1"), remote, "--creds", "alice:s3cret-pass"});
  ASSERT_EQ(r.exit_code, 0) << r.err;

  // One token serves a whole pull (manifest, config, layer).
  registry::ClientOptions opt;
  registry::RegistryClient client((*reg)->host(), opt);
  int before = ts->requests();
  auto m = client.GetManifest("vm/disk", "v1");
  ASSERT_OK(m);
  auto parsed = oci::Manifest::Parse(m->bytes, m->media_type);
  ASSERT_OK(parsed);
  ASSERT_OK(client.FetchBlobToString("vm/disk", *parsed->config, 1 << 20));
  ASSERT_OK(client.FetchBlob("vm/disk", parsed->layers[0], [](std::string_view) { return OkStatus(); }));
  EXPECT_EQ(client.token_requests(), 1);
  EXPECT_EQ(ts->requests() - before, 1);

  // A token the registry stops accepting mid-way is fetched again.
  // Distribution accepts a JWT up to 60 s past its exp, so an exp 57 s in
  // the past leaves it valid for 3 s while the JSON still claims 300.
  ts->set_jwt_lifetime(-57);
  registry::RegistryClient short_lived((*reg)->host(), opt);
  ASSERT_OK(short_lived.GetManifest("vm/disk", "v1"));
  std::this_thread::sleep_for(4500ms);
  ASSERT_OK(short_lived.FetchBlob("vm/disk", parsed->layers[0], [](std::string_view) { return OkStatus(); }));
  EXPECT_EQ(short_lived.token_requests(), 2);
}

// A ranged read's own token (lazy boot's per-request deadline) also ends
// the token fetch it needs: a stalled token service cannot hold the read,
// and with it a guest's I/O, past its deadline.
TEST_F(RegistryTest, ARangedReadsOwnTokenEndsAStalledTokenFetch) {
  auto reg = TestRegistry::Start(RegistryMode::kToken);
  ASSERT_OK(reg);
  TokenServer* ts = (*reg)->token_server();
  auto img = MakeTestImage(tmp() / "src", "v1", {{"disk/disk.img", RandomBytes(50000, 7)}});
  ASSERT_OK(img);
  std::string remote = "docker://" + (*reg)->host() + "/vm/stall:v1";
  RunResult r = RunRegdisk({"copy", Layout("src", "v1"), remote, "--creds", "alice:s3cret-pass"});
  ASSERT_EQ(r.exit_code, 0) << r.err;

  registry::ClientOptions opt;
  registry::RegistryClient client((*reg)->host(), opt);
  const oci::Descriptor& layer = img->layers[0];
  ts->Hold(true);
  const int before = ts->requests();
  CancelToken deadline;
  auto read = std::async(std::launch::async, [&] {
    return client.FetchBlobRange("vm/stall", layer, 0, 512, [](std::string_view) { return OkStatus(); }, &deadline);
  });
  // The read is waiting on the token service; its deadline passes.
  for (int i = 0; i < 3000 && ts->requests() == before; ++i) std::this_thread::sleep_for(10ms);
  ASSERT_GT(ts->requests(), before);
  deadline.Cancel("the read's deadline passed");
  const bool ended = read.wait_for(30s) == std::future_status::ready;
  ts->Hold(false);  // lets a read that ignored its token end, for the test to finish
  ASSERT_TRUE(ended) << "the ranged read waited on the token service past its own deadline";
  Status st = read.get();
  EXPECT_FALSE(st.ok());

  // Released, the service answers and the same client reads the range.
  std::string got;
  ASSERT_OK(client.FetchBlobRange("vm/stall", layer, 0, 512, [&](std::string_view b) {
    got.append(b);
    return OkStatus();
  }));
  EXPECT_EQ(got.size(), 512u);
}

TEST_F(RegistryTest, IndexIsPushedAfterItsChildren) {
  auto reg = TestRegistry::Start(RegistryMode::kPlain);
  ASSERT_OK(reg);
  auto amd = MakeTestImage(tmp() / "src", "amd", {{"disk/disk.img", "amd64 disk"}}, "amd64");
  ASSERT_OK(amd);
  auto arm = MakeTestImage(tmp() / "src", "arm", {{"disk/disk.img", "arm64 disk"}}, "arm64");
  ASSERT_OK(arm);
  auto index = MakeTestIndex(tmp() / "src", "multi", {{&*amd, "amd64"}, {&*arm, "arm64"}});
  ASSERT_OK(index);
  const oci::Descriptor& id = *index;

  std::string remote = "docker://" + (*reg)->host() + "/vm/multi:v1";
  RunResult r = RunRegdisk({"copy", "--all", Layout("src", "multi"), remote});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Trim(r.out), id.digest.str());
  r = RunProgram({"skopeo", "inspect", "--tls-verify=false", "--raw", remote});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(oci::Digest::Sha256Of(r.out), id.digest);
  // Platform selection picks the child.
  r = RunRegdisk({"--platform", "linux/arm64", "inspect", remote});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json j = json::parse(r.out);
  EXPECT_EQ(j["Digest"], id.digest.str());  // as skopeo: the digest the name points at
  EXPECT_EQ(j["Architecture"], "arm64");
  EXPECT_EQ(j["Layers"][0], arm->layers[0].digest.str());
  r = RunRegdisk({"--platform", "linux/riscv64", "inspect", remote});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("no variant for platform linux/riscv64 (it offers: linux/amd64, linux/arm64)"));
  // Without --all only the platform's image is copied.
  r = RunRegdisk({"copy", remote, Layout("one", "x")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Trim(r.out), amd->manifest_digest.str());
}

// --- Fake registries for answers a real one never gives -----------------------------

class FakeRegistry {
 public:
  FakeRegistry() {
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
  }
  ~FakeRegistry() {
    server_.stop();
    thread_.join();
  }
  httplib::Server& server() { return server_; }
  std::string host() const { return "127.0.0.1:" + std::to_string(port_); }

 private:
  httplib::Server server_;
  std::thread thread_;
  int port_;
};

TEST_F(RegistryTest, HostileAndBrokenRegistryAnswers) {
  FakeRegistry fake;
  const std::string hex(64, 'c');
  std::string huge = "{\"schemaVersion\":2,\"pad\":\"" + std::string(5 << 20, 'x') + "\"}";
  std::string blob = "the real bytes";
  std::string wrong_media = R"({"schemaVersion":2,"mediaType":"application/vnd.example.thing+json"})";
  std::string md5_layer = R"({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"md5:0123","size":2},"layers":[]})";
  std::string liar_cfg = R"({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":")" +
                         oci::Digest::Sha256Of(blob).str() + R"(","size":14},"layers":[]})";
  auto& s = fake.server();
  s.Get("/v2/", [](const httplib::Request&, httplib::Response& res) { res.set_content("{}", "application/json"); });
  s.Get("/v2/t/notjson/manifests/v1", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("this is not json", "application/vnd.oci.image.manifest.v1+json");
  });
  s.Get("/v2/t/html/manifests/v1", [](const httplib::Request&, httplib::Response& res) {
    res.status = 500;
    res.set_content("<html><body>Gateway trouble</body></html>", "text/html");
  });
  s.Get("/v2/t/html200/manifests/v1", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("<!DOCTYPE html><html><body>Welcome</body></html>", "text/html");
  });
  s.Get("/v2/t/huge/manifests/v1", [&](const httplib::Request&, httplib::Response& res) {
    res.set_content(huge, "application/vnd.oci.image.manifest.v1+json");
  });
  s.Get("/v2/t/media/manifests/v1", [&](const httplib::Request&, httplib::Response& res) {
    res.set_content(wrong_media, "application/vnd.example.thing+json");
  });
  s.Get("/v2/t/md5/manifests/v1", [&](const httplib::Request&, httplib::Response& res) {
    res.set_content(md5_layer, "application/vnd.oci.image.manifest.v1+json");
  });
  s.Get("/v2/t/liar/manifests/v1", [&](const httplib::Request&, httplib::Response& res) {
    res.set_content(liar_cfg, "application/vnd.oci.image.manifest.v1+json");
  });
  s.Get("/v2/t/liar/blobs/.*", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("the fake bytes", "application/octet-stream");
  });
  s.Get("/v2/t/digest/manifests/.*", [&](const httplib::Request&, httplib::Response& res) {
    res.set_content(liar_cfg, "application/vnd.oci.image.manifest.v1+json");
    res.set_header("Docker-Content-Digest", "sha256:" + hex);
  });

  struct Case {
    std::string repo;
    std::string message;
  };
  const Case cases[] = {
      {"t/notjson", "is not a JSON object"},
      {"t/html", "HTML page"},
      {"t/html200", "HTML"},
      {"t/huge", "larger than the limit of 4194304 bytes"},
      {"t/media", "media type \"application/vnd.example.thing+json\" is not supported"},
      {"t/md5", "digest algorithm \"md5\" is not supported"},
      {"t/liar", "failed verification: expected " + oci::Digest::Sha256Of(blob).str() + ", got " +
                     oci::Digest::Sha256Of("the fake bytes").str()},
      {"t/digest", "failed verification: expected sha256:" + hex},
  };
  for (const auto& c : cases) {
    RunResult r = RunRegdisk({"copy", "docker://" + fake.host() + "/" + c.repo + ":v1", Layout("out", "x")});
    EXPECT_NE(r.exit_code, 0) << c.repo;
    EXPECT_LT(r.exit_code, 128) << c.repo << " crashed: " << r.err;
    EXPECT_THAT(r.err, HasSubstr(c.message)) << c.repo;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line: " << r.err;
  }
  // A refused blob leaves nothing in the layout.
  if (fs::exists(tmp() / "out/blobs/sha256")) {
    EXPECT_TRUE(fs::is_empty(tmp() / "out/blobs/sha256"));
  }
}

TEST_F(RegistryTest, CredentialsNeverFollowARedirectToAnotherHost) {
  FakeRegistry storage;  // plays a blob store on another origin
  FakeRegistry reg;
  std::string blob = "redirected blob bytes";
  oci::Digest d = oci::Digest::Sha256Of(blob);
  std::mutex mu;
  std::vector<std::string> storage_auth, registry_auth;
  storage.server().Get("/blob", [&](const httplib::Request& req, httplib::Response& res) {
    std::lock_guard<std::mutex> l(mu);
    storage_auth.push_back(req.get_header_value("Authorization"));
    res.set_content(blob, "application/octet-stream");
  });
  reg.server().Get("/v2/.*", [&](const httplib::Request& req, httplib::Response& res) {
    std::lock_guard<std::mutex> l(mu);
    std::string auth = req.get_header_value("Authorization");
    registry_auth.push_back(auth);
    if (auth.empty()) {
      res.status = 401;
      res.set_header("WWW-Authenticate", "Basic realm=\"fake\"");
      return;
    }
    res.status = 307;
    res.set_header("Location", "http://" + storage.host() + "/blob");
  });
  registry::ClientOptions opt;
  opt.tls_verify = false;
  opt.auth.explicit_creds = registry::Credentials{"bob", "hunter2"};
  registry::RegistryClient client(reg.host(), opt);
  oci::Descriptor desc;
  desc.media_type = "application/octet-stream";
  desc.digest = d;
  desc.size = static_cast<int64_t>(blob.size());
  auto got = client.FetchBlobToString("x/y", desc, 1 << 20);
  ASSERT_OK(got);
  EXPECT_EQ(*got, blob);
  std::lock_guard<std::mutex> l(mu);
  ASSERT_FALSE(storage_auth.empty());
  for (const auto& a : storage_auth) EXPECT_EQ(a, "") << "credentials leaked to the redirect target";
  EXPECT_EQ(registry_auth.back(), "Basic " + registry::Base64Encode("bob:hunter2"));
}

}  // namespace
}  // namespace regdisk::testing
