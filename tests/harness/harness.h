// The test harness: real programs on 127.0.0.1 with ephemeral ports and
// temp directories, stopped when the owning object goes away.
//
//   auto reg = TestRegistry::Start(RegistryMode::kTlsBasic);
//   RunResult r = RunRegdisk({"copy", ..., "--cert-dir", reg->ca_dir()});
//
// Everything here is for tests only; none of it ships in regdisk.
#pragma once

#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "oci/digest.h"
#include "oci/manifest.h"
#include "util/fs.h"
#include "util/process.h"
#include "util/status.h"

namespace regdisk::testing {

// Aborts the test with the status message when not OK.
#define ASSERT_OK(expr)                                        \
  do {                                                         \
    const auto& _s = (expr);                                   \
    ASSERT_TRUE(_s.ok()) << ::regdisk::testing::StatusText(_s); \
  } while (0)
// Fails the test with the status message when not OK, and goes on.
#define EXPECT_OK(expr)                                        \
  do {                                                         \
    const auto& _s = (expr);                                   \
    EXPECT_TRUE(_s.ok()) << ::regdisk::testing::StatusText(_s); \
  } while (0)

template <typename T>
std::string StatusText(const T& s) {
  return s.status().ToString();
}
inline std::string StatusText(const Status& s) { return s.ToString(); }

// A test with a temp directory of its own, removed afterwards. Fixtures
// derive from it and call TempDirTest::SetUp() first.
class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override { tmp_.emplace(std::move(TempDir::Create("regdisk-test").value())); }
  const std::filesystem::path& tmp() const { return tmp_->path(); }
  std::string P(const std::string& name) const { return (tmp() / name).string(); }

 private:
  std::optional<TempDir> tmp_;
};

class TestRegistry;

// A TempDirTest with a node store to be, root_ (tmp()/root, not created),
// and a plain registry, reg_, started for each test. Fixtures derive from
// it and call StoreAndRegistryTest::SetUp() first.
class StoreAndRegistryTest : public TempDirTest {
 protected:
  void SetUp() override;
  std::string root_;
  std::unique_ptr<TestRegistry> reg_;
};

// A free TCP port on 127.0.0.1 (bound and released; callers retry on a
// lost race).
int FreePort();

// Runs a program to completion with a timeout; stdin from `input`.
struct RunResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};
RunResult RunProgram(const std::vector<std::string>& argv, std::string_view input = {},
                     const std::vector<std::string>& extra_env = {},
                     std::chrono::seconds timeout = std::chrono::seconds(120));
// Runs the regdisk binary under test.
RunResult RunRegdisk(const std::vector<std::string>& args, std::string_view input = {},
                     const std::vector<std::string>& extra_env = {});

// --- Token issuer ------------------------------------------------------------

// A Docker-style token service (the "realm"): answers GET /token with a JWT
// signed RS256 whose x5c header carries a certificate the registry trusts.
class TokenServer {
 public:
  struct Options {
    std::string user = "alice";
    std::string password = "s3cret-pass";
    bool anonymous_pull = true;
    int expires_in = 300;       // what the JSON answer claims
    int jwt_lifetime = 300;     // what the JWT's exp allows
    // The OAuth2 refresh token POST /token accepts (an auth file's
    // "identitytoken"); it grants what the user may do.
    std::string identity_token = "idt-6f1c2b0e-regdisk-test";
  };
  static Result<std::unique_ptr<TokenServer>> Start(const std::filesystem::path& dir, Options options);
  ~TokenServer();
  std::string realm() const;
  const std::filesystem::path& cert_path() const { return cert_; }
  int requests() const { return requests_.load(); }
  int oauth_requests() const { return oauth_requests_.load(); }
  void set_jwt_lifetime(int seconds) { options_.jwt_lifetime = seconds; }
  // While held, GET and POST /token do not answer: they wait until
  // released (or the server stops), as a stalled token service would.
  void Hold(bool held);

 private:
  TokenServer() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  Options options_;
  std::filesystem::path cert_, key_;
  std::atomic<int> requests_{0};
  std::atomic<int> oauth_requests_{0};
  int port_ = 0;
};

// --- Registry ----------------------------------------------------------------

// kMutualTls: TLS that requires a client certificate signed by the test CA
// (ca_dir() holds the CA and such a pair, client.cert and client.key).
enum class RegistryMode { kPlain, kTlsBasic, kToken, kMutualTls };

struct TestRegistryExtra {
  // Non-empty: a pull-through cache (docker-registry's proxy mode) of the
  // registry at this URL ("http://127.0.0.1:PORT").
  std::string proxy_remote_url;
  // Log one line per request (Apache combined format, with the user agent)
  // to log().
  bool access_log = false;
};

// Debian's docker-registry (Distribution v2) in a temp dir.
class TestRegistry {
 public:
  using Extra = TestRegistryExtra;
  static Result<std::unique_ptr<TestRegistry>> Start(RegistryMode mode, TokenServer::Options token_options = {},
                                                     Extra extra = {});
  ~TestRegistry();
  // Stops the registry; its port then refuses connections.
  void Stop();

  // "127.0.0.1:PORT"
  std::string host() const { return "127.0.0.1:" + std::to_string(port_); }
  int port() const { return port_; }
  // Directory with ca.crt, for --cert-dir (TLS mode).
  std::filesystem::path ca_dir() const { return dir_.path() / "certs-client"; }
  const std::filesystem::path& dir() const { return dir_.path(); }
  std::string user() const { return "alice"; }
  std::string password() const { return "s3cret-pass"; }
  TokenServer* token_server() { return token_.get(); }
  std::string log() const;

 private:
  explicit TestRegistry(TempDir dir) : dir_(std::move(dir)) {}
  TempDir dir_;
  int port_ = 0;
  std::unique_ptr<TokenServer> token_;
  std::optional<Process> proc_;
};

// --- Fault-injecting proxy ------------------------------------------------------

// An HTTP-aware TCP proxy between client and registry. Each request is
// forwarded on a fresh upstream connection ("Connection: close"), unless a
// rule matches it: answer a status, cut the response after N body bytes,
// stall without answering, or drop the request's Range header.
class FaultProxy {
 public:
  struct Rule {
    std::string method;          // empty: any
    std::string path_contains;   // empty: any
    int times = 1;               // how many matching requests it affects
    // kIgnoreRange forwards without the Range header, as a server that
    // answers 200 with the whole blob would.
    enum class Action { kStatus, kCutAfter, kStall, kIgnoreRange } action = Action::kStatus;
    int status = 503;
    std::string retry_after;     // header value, with kStatus
    uint64_t cut_after = 0;      // body bytes, with kCutAfter
    std::chrono::milliseconds stall{0};
    // Only requests whose Range starts in [range_from, range_below)
    // ("bytes=N-..."); both 0: any request, with or without a Range.
    uint64_t range_from = 0, range_below = 0;
  };
  struct Seen {
    std::string method, path, range;
    bool faulted = false;
    uint64_t body_bytes = 0;  // response body bytes relayed to the client
  };

  static Result<std::unique_ptr<FaultProxy>> Start(int upstream_port);
  ~FaultProxy();
  std::string host() const { return "127.0.0.1:" + std::to_string(port_); }
  void AddRule(Rule r);
  void ClearRules();
  std::vector<Seen> seen() const;

 private:
  FaultProxy() = default;
  void AcceptLoop();
  void Serve(int client_fd);
  std::optional<Rule> Match(const std::string& method, const std::string& path, const std::string& range);

  int listen_fd_ = -1;
  int port_ = 0;
  int upstream_port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread acceptor_;
  mutable std::mutex mu_;
  std::vector<Rule> rules_;
  std::vector<Seen> seen_;
  std::vector<std::thread> workers_;
};

// --- Images --------------------------------------------------------------------

// Builds a small OCI layout with one image (config + layers of given
// contents; layers are real tar files so umoci can unpack them).
struct TestImage {
  std::filesystem::path layout;
  std::string tag;
  oci::Digest manifest_digest;
  std::vector<oci::Descriptor> layers;
};
Result<TestImage> MakeTestImage(const std::filesystem::path& layout, const std::string& tag,
                                const std::map<std::string, std::string>& files, const std::string& arch = "amd64",
                                int extra_random_bytes = 0);

// An OCI index in `layout`, tagged `tag`, over images already there (each
// given the platform linux/ARCH); returns the index's descriptor.
Result<oci::Descriptor> MakeTestIndex(const std::filesystem::path& layout, const std::string& tag,
                                      const std::vector<std::pair<const TestImage*, std::string>>& images);

std::string RandomBytes(size_t n, uint32_t seed);

// One entry of a hand-made tar layer; anything a hostile image could hold.
struct TarEntry {
  enum class Type { kFile, kDir, kSymlink, kHardlink, kFifo, kCharDevice };
  std::string path;
  Type type = Type::kFile;
  std::string data;  // kFile
  std::string link;  // kSymlink, kHardlink
  int uid = 0, gid = 0;
  int mode = 0644;
};
// A tar stream (libarchive, pax) compressed with "gzip", "zstd" or "" (none).
std::string MakeTar(const std::vector<TarEntry>& entries, const std::string& compression);
// The layer media type for a compression ("gzip" -> ...tar+gzip).
std::string LayerMediaType(const std::string& compression);
// An image in an OCI layout from ready-made layers (media type, bytes).
Result<TestImage> MakeImageFromLayers(const std::filesystem::path& layout, const std::string& tag,
                                      const std::vector<std::pair<std::string, std::string>>& layers,
                                      const std::string& arch = "amd64");

// --- A program on a terminal ---------------------------------------------------

// A program whose stdin, stdout and stderr are a new pseudo-terminal, as a
// shell starts one; the test holds the terminal's other side. Killed and
// reaped when it goes away.
//
//   auto s = PtySession::Spawn({REGDISK_BIN, "run", "-f", spec});
//   ASSERT_TRUE(s->ReadUntil("attached", 0, 60s)) << s->seen();
//   s->Write("\x1d");
//   int status = s->Wait();
class PtySession {
 public:
  // Runs argv on the terminal.
  static Result<std::unique_ptr<PtySession>> Spawn(const std::vector<std::string>& argv);
  // Runs `child` in the forked child (which leads the terminal's session)
  // and exits with what it returns; for tests that play the shell.
  static Result<std::unique_ptr<PtySession>> SpawnWith(const std::function<int()>& child);
  ~PtySession();
  PtySession(const PtySession&) = delete;
  PtySession& operator=(const PtySession&) = delete;

  // Reads until `marker` appears in seen() at or after `from`, the terminal
  // closes, or `limit` runs out (a hang guard); whether it appeared.
  bool ReadUntil(const std::string& marker, size_t from, std::chrono::seconds limit);
  // Reads until the terminal closes (or `limit` runs out).
  void ReadToEnd(std::chrono::seconds limit);
  // Writes all of `data` to the terminal; DeadlineExceeded when the
  // program has not read it within `limit` (a hang guard: never blocks
  // longer). May run on another thread than the reads.
  Status Write(std::string_view data, std::chrono::seconds limit = std::chrono::seconds(60));
  // Everything the program wrote to the terminal so far.
  const std::string& seen() const { return seen_; }
  int master() const { return master_.get(); }
  pid_t pid() const { return pid_; }
  // waitpid's status (once); -1 on error.
  int Wait();

 private:
  PtySession(UniqueFd master, pid_t pid) : master_(std::move(master)), pid_(pid) {}
  UniqueFd master_;
  pid_t pid_;
  bool reaped_ = false;
  std::string seen_;
};

}  // namespace regdisk::testing
