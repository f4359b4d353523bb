#include "harness/harness.h"

#include <archive.h>
#include <archive_entry.h>
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <httplib.h>

#include <ctime>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "image/layout.h"
#include "registry/http.h"

namespace regdisk::testing {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;

int FreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  int port = ntohs(a.sin_port);
  ::close(fd);
  return port;
}

RunResult RunProgram(const std::vector<std::string>& argv, std::string_view input,
                     const std::vector<std::string>& extra_env, std::chrono::seconds timeout) {
  Process::Options opt;
  if (!extra_env.empty()) {
    std::vector<std::string> env;
    for (char** e = environ; *e; ++e) env.emplace_back(*e);
    for (const auto& e : extra_env) env.push_back(e);
    opt.env = env;
  }
  auto out = Process::Run(argv, timeout, input, &opt);
  RunResult r;
  if (!out.ok()) {
    r.err = out.status().ToString();
    return r;
  }
  r.exit_code = out->exit_code;
  r.out = std::move(out->out);
  r.err = std::move(out->err);
  return r;
}

RunResult RunRegdisk(const std::vector<std::string>& args, std::string_view input,
                     const std::vector<std::string>& extra_env) {
  std::vector<std::string> argv = {REGDISK_BIN};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<std::string> env = {"REGDISK_BACKOFF_MS=20"};
  env.insert(env.end(), extra_env.begin(), extra_env.end());
  return RunProgram(argv, input, env);
}

namespace {

Status Run(const std::vector<std::string>& argv, std::string_view input = {}) {
  auto out = Process::Run(argv, 60s, input);
  if (!out.ok()) return out.status();
  if (out->exit_code != 0) return Internal(argv[0] + " failed: " + out->err);
  return OkStatus();
}

std::string Base64Url(std::string_view s) {
  std::string b = registry::Base64Encode(s);
  for (char& c : b) {
    if (c == '+') c = '-';
    if (c == '/') c = '_';
  }
  while (!b.empty() && b.back() == '=') b.pop_back();
  return b;
}

// Waits until GET /v2/ answers at all (200 or 401).
bool WaitReady(const std::string& url, bool tls, const fs::path& ca) {
  registry::TlsOptions t;
  if (tls) t.ca_pem = ReadFileCapped(ca, 1 << 20).value();
  if (fs::path cert = ca.parent_path() / "client.cert"; fs::exists(cert)) {
    t.client_cert_file = cert.string();
    t.client_key_file = (ca.parent_path() / "client.key").string();
  }
  registry::HttpSession http(t, {});
  for (int i = 0; i < 200; ++i) {
    registry::HttpRequest req;
    req.url = url;
    auto r = http.Do(req);
    if (r.ok() && (r->status == 200 || r->status == 401)) return true;
    std::this_thread::sleep_for(25ms);
  }
  return false;
}

}  // namespace

// --- TokenServer ---------------------------------------------------------------

struct TokenServer::Impl {
  httplib::Server server;
  std::thread thread;
  std::string x5c;
  EVP_PKEY* key = nullptr;
  std::mutex mu;
  std::condition_variable cv;
  bool held = false;      // guarded by mu
  bool stopping = false;  // guarded by mu
  // Returns once the server is not held (or is stopping).
  void WaitWhileHeld() {
    std::unique_lock lock(mu);
    cv.wait(lock, [this] { return !held || stopping; });
  }
  ~Impl() { EVP_PKEY_free(key); }
};

void TokenServer::Hold(bool held) {
  std::lock_guard lock(impl_->mu);
  impl_->held = held;
  impl_->cv.notify_all();
}

Result<std::unique_ptr<TokenServer>> TokenServer::Start(const fs::path& dir, Options options) {
  std::unique_ptr<TokenServer> ts(new TokenServer());
  ts->options_ = options;
  ts->impl_ = std::make_unique<Impl>();
  ts->cert_ = dir / "token.crt";
  ts->key_ = dir / "token.key";
  RETURN_IF_ERROR(Run({"openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ts->key_.string(), "-out",
                       ts->cert_.string(), "-days", "2", "-subj", "/CN=regdisk-test-token-issuer"}));
  {
    FILE* f = std::fopen(ts->key_.c_str(), "re");
    ts->impl_->key = PEM_read_PrivateKey(f, nullptr, nullptr, nullptr);
    std::fclose(f);
    f = std::fopen(ts->cert_.c_str(), "re");
    X509* cert = PEM_read_X509(f, nullptr, nullptr, nullptr);
    std::fclose(f);
    unsigned char* der = nullptr;
    int len = i2d_X509(cert, &der);
    ts->impl_->x5c = registry::Base64Encode(std::string_view(reinterpret_cast<char*>(der), static_cast<size_t>(len)));
    OPENSSL_free(der);
    X509_free(cert);
  }
  TokenServer* self = ts.get();
  // Answers with a JWT granting `scopes` (repository:NAME:ACTIONS) as the
  // user may: everything when authed, else pull when anonymous pulls are on.
  auto issue = [self](bool authed, const std::vector<std::string>& scopes, const std::string& service,
                      const char* token_field, httplib::Response& res) {
    json access = json::array();
    for (const std::string& scope : scopes) {
      size_t a = scope.find(':'), b = scope.rfind(':');
      if (a == std::string::npos || b == a) continue;
      std::string actions = scope.substr(b + 1);
      json granted = json::array();
      std::stringstream ss(actions);
      for (std::string act; std::getline(ss, act, ',');) {
        if (authed || (act == "pull" && self->options_.anonymous_pull)) granted.push_back(act);
      }
      access.push_back({{"type", scope.substr(0, a)}, {"name", scope.substr(a + 1, b - a - 1)}, {"actions", granted}});
    }
    if (!authed && !self->options_.anonymous_pull) {
      res.status = 401;
      return;
    }
    long now = static_cast<long>(std::time(nullptr));
    json header = {{"typ", "JWT"}, {"alg", "RS256"}, {"x5c", json::array({self->impl_->x5c})}};
    json claims = {{"iss", "regdisk-test-issuer"},
                   {"sub", authed ? self->options_.user : ""},
                   {"aud", service},
                   {"exp", now + self->options_.jwt_lifetime},
                   {"nbf", now - 10},
                   {"iat", now},
                   {"jti", std::to_string(self->requests_.load()) + "-" + std::to_string(now)},
                   {"access", access}};
    std::string signing_input = Base64Url(header.dump()) + "." + Base64Url(claims.dump());
    EVP_MD_CTX* md = EVP_MD_CTX_new();
    EVP_DigestSignInit(md, nullptr, EVP_sha256(), nullptr, self->impl_->key);
    size_t sig_len = 0;
    EVP_DigestSign(md, nullptr, &sig_len, reinterpret_cast<const unsigned char*>(signing_input.data()),
                   signing_input.size());
    std::string sig(sig_len, '\0');
    EVP_DigestSign(md, reinterpret_cast<unsigned char*>(sig.data()), &sig_len,
                   reinterpret_cast<const unsigned char*>(signing_input.data()), signing_input.size());
    EVP_MD_CTX_free(md);
    sig.resize(sig_len);
    json body = {{token_field, signing_input + "." + Base64Url(sig)}, {"expires_in", self->options_.expires_in}};
    res.set_content(body.dump(), "application/json");
  };
  // The Docker token flow: GET with Basic credentials, or anonymous.
  ts->impl_->server.Get("/token", [self, issue](const httplib::Request& req, httplib::Response& res) {
    self->requests_++;
    self->impl_->WaitWhileHeld();
    std::string auth = req.get_header_value("Authorization");
    bool authed = false;
    if (!auth.empty()) {
      auto decoded = registry::Base64Decode(auth.substr(auth.find(' ') + 1));
      authed = decoded.ok() && *decoded == self->options_.user + ":" + self->options_.password;
      if (!authed) {
        res.status = 401;
        res.set_content(R"({"details":"wrong user name or password"})", "application/json");
        return;
      }
    }
    std::vector<std::string> scopes;
    for (size_t i = 0; i < req.get_param_value_count("scope"); ++i) scopes.push_back(req.get_param_value("scope", i));
    issue(authed, scopes, req.get_param_value("service"), "token", res);
  });
  // The OAuth2 flow: POST a form with a refresh token (never Basic auth).
  ts->impl_->server.Post("/token", [self, issue](const httplib::Request& req, httplib::Response& res) {
    self->requests_++;
    self->oauth_requests_++;
    self->impl_->WaitWhileHeld();
    if (req.has_header("Authorization") || req.get_param_value("grant_type") != "refresh_token" ||
        req.get_param_value("refresh_token") != self->options_.identity_token ||
        req.get_param_value("client_id").empty()) {
      res.status = 401;
      res.set_content(R"({"error":"invalid_grant"})", "application/json");
      return;
    }
    std::vector<std::string> scopes;
    std::stringstream ss(req.get_param_value("scope"));
    for (std::string s; std::getline(ss, s, ' ');) {
      if (!s.empty()) scopes.push_back(s);
    }
    issue(true, scopes, req.get_param_value("service"), "access_token", res);
  });
  ts->port_ = ts->impl_->server.bind_to_any_port("127.0.0.1");
  if (ts->port_ <= 0) return Internal("token server could not bind");
  ts->impl_->thread = std::thread([self] { self->impl_->server.listen_after_bind(); });
  return ts;
}

TokenServer::~TokenServer() {
  if (impl_) {
    {
      std::lock_guard lock(impl_->mu);
      impl_->stopping = true;
      impl_->cv.notify_all();
    }
    impl_->server.stop();
    if (impl_->thread.joinable()) impl_->thread.join();
  }
}

std::string TokenServer::realm() const { return "http://127.0.0.1:" + std::to_string(port_) + "/token"; }

// --- TestRegistry ----------------------------------------------------------------

Result<std::unique_ptr<TestRegistry>> TestRegistry::Start(RegistryMode mode, TokenServer::Options token_options,
                                                          Extra extra) {
  ASSIGN_OR_RETURN(TempDir dir, TempDir::Create("regdisk-registry"));
  std::unique_ptr<TestRegistry> reg(new TestRegistry(std::move(dir)));
  const fs::path d = reg->dir_.path();
  std::string auth_yaml, tls_yaml;
  const bool tls = mode == RegistryMode::kTlsBasic || mode == RegistryMode::kMutualTls;
  if (tls) {
    RETURN_IF_ERROR(MakeDirs(d / "certs-client"));
    RETURN_IF_ERROR(Run({"openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                         "-nodes", "-keyout", (d / "ca.key").string(), "-out", (d / "certs-client/ca.crt").string(),
                         "-days", "2", "-subj", "/CN=regdisk-test-ca"}));
    RETURN_IF_ERROR(Run({"openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                         "-keyout", (d / "server.key").string(), "-out", (d / "server.csr").string(), "-subj",
                         "/CN=127.0.0.1"}));
    RETURN_IF_ERROR(WriteFileAtomic(d / "ext.cnf", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"));
    RETURN_IF_ERROR(Run({"openssl", "x509", "-req", "-in", (d / "server.csr").string(), "-CA",
                         (d / "certs-client/ca.crt").string(), "-CAkey", (d / "ca.key").string(), "-CAcreateserial",
                         "-out", (d / "server.crt").string(), "-days", "2", "-extfile", (d / "ext.cnf").string()}));
    tls_yaml = "  tls:\n    certificate: " + (d / "server.crt").string() + "\n    key: " + (d / "server.key").string() + "\n";
  }
  if (mode == RegistryMode::kTlsBasic) {
    // htpasswd reads the password from stdin (-i), so it is on no command line.
    auto hp = Process::Run({"htpasswd", "-niB", reg->user()}, 30s, reg->password() + "\n");
    if (!hp.ok() || hp->exit_code != 0) return Internal("htpasswd failed");
    RETURN_IF_ERROR(WriteFileAtomic(d / "htpasswd", hp->out));
    auth_yaml = "auth:\n  htpasswd:\n    realm: regdisk-test\n    path: " + (d / "htpasswd").string() + "\n";
  } else if (mode == RegistryMode::kMutualTls) {
    // A client key pair signed by the same CA, named as certs.d expects.
    const fs::path c = d / "certs-client";
    RETURN_IF_ERROR(Run({"openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                         "-keyout", (c / "client.key").string(), "-out", (d / "client.csr").string(), "-subj",
                         "/CN=regdisk-test-client"}));
    RETURN_IF_ERROR(Run({"openssl", "x509", "-req", "-in", (d / "client.csr").string(), "-CA", (c / "ca.crt").string(),
                         "-CAkey", (d / "ca.key").string(), "-CAcreateserial", "-out", (c / "client.cert").string(),
                         "-days", "2"}));
    tls_yaml += "    clientcas:\n      - " + (c / "ca.crt").string() + "\n";
  } else if (mode == RegistryMode::kToken) {
    ASSIGN_OR_RETURN(reg->token_, TokenServer::Start(d, token_options));
    auth_yaml = "auth:\n  token:\n    realm: " + reg->token_->realm() +
                "\n    service: regdisk-test-registry\n    issuer: regdisk-test-issuer\n    rootcertbundle: " +
                reg->token_->cert_path().string() + "\n";
  }
  for (int attempt = 0; attempt < 5; ++attempt) {
    reg->port_ = FreePort();
    std::string config = "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: " +
                         std::string(extra.access_log ? "false" : "true") + "\nstorage:\n  filesystem:\n"
                         "    rootdirectory: " + (d / "data").string() +
                         "\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:" + std::to_string(reg->port_) +
                         "\n  secret: regdisk-test-secret\n" + tls_yaml + auth_yaml;
    if (!extra.proxy_remote_url.empty()) config += "proxy:\n  remoteurl: " + extra.proxy_remote_url + "\n";
    RETURN_IF_ERROR(WriteFileAtomic(d / "config.yml", config));
    Process::Options opt;
    opt.stdout_mode = Process::Stdio::kFile;
    opt.stdout_file = d / "registry.log";
    opt.stderr_mode = Process::Stdio::kFile;
    opt.stderr_file = d / "registry.log";
    ASSIGN_OR_RETURN(Process p, Process::Spawn({"docker-registry", "serve", (d / "config.yml").string()}, opt));
    std::string url = std::string(tls ? "https" : "http") + "://127.0.0.1:" + std::to_string(reg->port_) + "/v2/";
    if (WaitReady(url, tls, d / "certs-client/ca.crt")) {
      reg->proc_.emplace(std::move(p));
      return reg;
    }
    p.Terminate(1s);
  }
  return Unavailable("docker-registry did not start: " + reg->log());
}

TestRegistry::~TestRegistry() { Stop(); }

void TestRegistry::Stop() {
  if (proc_) proc_->Terminate(3s);
  proc_.reset();
}

std::string TestRegistry::log() const {
  auto l = ReadFileCapped(dir_.path() / "registry.log", 1 << 20);
  return l.ok() ? *l : std::string();
}

// --- FaultProxy ---------------------------------------------------------------------

Result<std::unique_ptr<FaultProxy>> FaultProxy::Start(int upstream_port) {
  std::unique_ptr<FaultProxy> p(new FaultProxy());
  p->upstream_port_ = upstream_port;
  p->listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  ::setsockopt(p->listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(p->listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(p->listen_fd_, 64) != 0) {
    return ErrnoStatus("proxy bind");
  }
  socklen_t len = sizeof a;
  ::getsockname(p->listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
  p->port_ = ntohs(a.sin_port);
  FaultProxy* self = p.get();
  p->acceptor_ = std::thread([self] { self->AcceptLoop(); });
  return p;
}

FaultProxy::~FaultProxy() {
  stop_ = true;
  ::shutdown(listen_fd_, SHUT_RDWR);
  if (acceptor_.joinable()) acceptor_.join();
  ::close(listen_fd_);
  std::vector<std::thread> workers;
  {
    std::lock_guard<std::mutex> l(mu_);
    workers.swap(workers_);
  }
  for (auto& t : workers) t.join();
}

void FaultProxy::AddRule(Rule r) {
  std::lock_guard<std::mutex> l(mu_);
  rules_.push_back(std::move(r));
}

void FaultProxy::ClearRules() {
  std::lock_guard<std::mutex> l(mu_);
  rules_.clear();
}

std::vector<FaultProxy::Seen> FaultProxy::seen() const {
  std::lock_guard<std::mutex> l(mu_);
  return seen_;
}

void FaultProxy::AcceptLoop() {
  while (!stop_) {
    pollfd pfd{listen_fd_, POLLIN, 0};
    if (::poll(&pfd, 1, 100) <= 0) continue;
    int c = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) continue;
    std::lock_guard<std::mutex> l(mu_);
    workers_.emplace_back([this, c] { Serve(c); });
  }
}

std::optional<FaultProxy::Rule> FaultProxy::Match(const std::string& method, const std::string& path,
                                                  const std::string& range) {
  std::lock_guard<std::mutex> l(mu_);
  for (auto& r : rules_) {
    if (r.times <= 0) continue;
    if (!r.method.empty() && r.method != method) continue;
    if (!r.path_contains.empty() && path.find(r.path_contains) == std::string::npos) continue;
    if (r.range_from != 0 || r.range_below != 0) {
      unsigned long long start = 0;
      if (std::sscanf(range.c_str(), "bytes=%llu-", &start) != 1 || start < r.range_from || start >= r.range_below) continue;
    }
    --r.times;
    return r;
  }
  return std::nullopt;
}

namespace {

bool SendAll(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n <= 0) return false;
    data.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

// Reads until "\r\n\r\n"; returns head and leaves any extra bytes in `rest`.
bool ReadHead(int fd, std::string& head, std::string& rest) {
  std::string buf;
  char tmp[65536];
  for (;;) {
    size_t end = buf.find("\r\n\r\n");
    if (end != std::string::npos) {
      head = buf.substr(0, end + 4);
      rest = buf.substr(end + 4);
      return true;
    }
    ssize_t n = ::recv(fd, tmp, sizeof tmp, 0);
    if (n <= 0) return false;
    // A TLS ClientHello: this proxy speaks plain HTTP only, so hang up as a
    // plain-HTTP server would and let the client fall back.
    if (buf.empty() && static_cast<unsigned char>(tmp[0]) == 0x16) return false;
    buf.append(tmp, static_cast<size_t>(n));
  }
}

std::string HeaderValue(const std::string& head, const std::string& lower_name) {
  std::istringstream in(head);
  std::string line;
  while (std::getline(in, line)) {
    size_t c = line.find(':');
    if (c == std::string::npos) continue;
    std::string name = line.substr(0, c);
    for (auto& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (name != lower_name) continue;
    std::string v = line.substr(c + 1);
    while (!v.empty() && (v.front() == ' ')) v.erase(0, 1);
    while (!v.empty() && (v.back() == '\r' || v.back() == ' ')) v.pop_back();
    return v;
  }
  return {};
}

}  // namespace

void FaultProxy::Serve(int client) {
  UniqueFd client_fd(client);
  for (;;) {
    std::string head, body;
    if (!ReadHead(client, head, body)) return;
    std::string method = head.substr(0, head.find(' '));
    size_t p1 = head.find(' ') + 1;
    std::string path = head.substr(p1, head.find(' ', p1) - p1);
    uint64_t content_length = std::strtoull(HeaderValue(head, "content-length").c_str(), nullptr, 10);
    char tmp[65536];
    while (body.size() < content_length) {
      ssize_t n = ::recv(client, tmp, sizeof tmp, 0);
      if (n <= 0) return;
      body.append(tmp, static_cast<size_t>(n));
    }
    Seen seen{method, path, HeaderValue(head, "range"), false, 0};
    auto rule = Match(method, path, seen.range);
    auto record = [&] {
      std::lock_guard<std::mutex> l(mu_);
      seen_.push_back(seen);
    };
    if (rule && rule->action == Rule::Action::kStatus) {
      seen.faulted = true;
      record();
      std::string resp = "HTTP/1.1 " + std::to_string(rule->status) + " Injected\r\nContent-Length: 0\r\n";
      if (!rule->retry_after.empty()) resp += "Retry-After: " + rule->retry_after + "\r\n";
      resp += "Connection: close\r\n\r\n";
      SendAll(client, resp);
      return;
    }
    if (rule && rule->action == Rule::Action::kStall) {
      seen.faulted = true;
      record();
      auto until = std::chrono::steady_clock::now() + rule->stall;
      while (!stop_ && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(20ms);
      return;
    }
    // Forward with Connection: close so the upstream ends its answer with EOF.
    std::string fwd;
    std::istringstream in(head);
    std::string line;
    while (std::getline(in, line)) {
      if (line == "\r" || line.empty()) break;
      std::string lower = line.substr(0, line.find(':'));
      for (auto& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      if (lower == "connection") continue;
      if (lower == "range" && rule && rule->action == Rule::Action::kIgnoreRange) continue;
      fwd += line + "\n";
    }
    fwd += "Connection: close\r\n\r\n";
    int up = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    UniqueFd up_fd(up);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(upstream_port_));
    if (::connect(up, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return;
    if (!SendAll(up, fwd) || !SendAll(up, body)) return;
    std::string resp_head, resp_rest;
    if (!ReadHead(up, resp_head, resp_rest)) return;
    if (!SendAll(client, resp_head)) return;
    bool cut = rule && rule->action == Rule::Action::kCutAfter;
    seen.faulted = cut;
    auto relay = [&](std::string_view chunk) -> bool {
      if (cut && seen.body_bytes + chunk.size() > rule->cut_after) {
        chunk = chunk.substr(0, static_cast<size_t>(rule->cut_after - seen.body_bytes));
        SendAll(client, chunk);
        seen.body_bytes += chunk.size();
        return false;
      }
      seen.body_bytes += chunk.size();
      return SendAll(client, chunk);
    };
    bool ok = relay(resp_rest);
    while (ok) {
      ssize_t n = ::recv(up, tmp, sizeof tmp, 0);
      if (n <= 0) break;
      ok = relay(std::string_view(tmp, static_cast<size_t>(n)));
    }
    record();
    // On a cut the connection closes with the answer incomplete; the client
    // has received exactly cut_after body bytes.
    return;  // one request per connection (the answer said Connection: close)
  }
}

// --- Images ----------------------------------------------------------------------------

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (size_t i = 0; i < n; i += 4) {
    uint32_t v = rng();
    for (size_t k = 0; k < 4 && i + k < n; ++k) s[i + k] = static_cast<char>(v >> (8 * k));
  }
  return s;
}

Result<TestImage> MakeTestImage(const fs::path& layout_dir, const std::string& tag,
                                const std::map<std::string, std::string>& files, const std::string& arch,
                                int extra_random_bytes) {
  ASSIGN_OR_RETURN(TempDir work, TempDir::Create("regdisk-img"));
  fs::path root = work.path() / "root";
  for (const auto& [path, content] : files) {
    fs::path p = root / path;
    RETURN_IF_ERROR(MakeDirs(p.parent_path()));
    RETURN_IF_ERROR(WriteFileAtomic(p, content));
  }
  if (extra_random_bytes > 0) {
    RETURN_IF_ERROR(MakeDirs(root / "data"));
    RETURN_IF_ERROR(WriteFileAtomic(root / "data/random.bin",
                                    RandomBytes(static_cast<size_t>(extra_random_bytes), static_cast<uint32_t>(tag.size()))));
  }
  RETURN_IF_ERROR(MakeDirs(root));
  fs::path tar = work.path() / "layer.tar";
  // GNU tar here, so that these layers come from an independent writer.
  RETURN_IF_ERROR(Run({"tar", "--sort=name", "--owner=0", "--group=0", "--numeric-owner", "--mtime=@0", "-cf",
                       tar.string(), "-C", root.string(), "."}));
  ASSIGN_OR_RETURN(std::string layer, ReadFileCapped(tar, 1ull << 31));
  return MakeImageFromLayers(layout_dir, tag, {{std::string(oci::media::kOciLayerTar), layer}}, arch);
}

namespace {

// Writes `bytes` as a blob of `media_type` into the layout.
Result<oci::Descriptor> WriteTestBlob(image::OciLayout& layout, std::string_view media_type, const std::string& bytes) {
  oci::Descriptor d;
  d.media_type = std::string(media_type);
  d.digest = oci::Digest::Sha256Of(bytes);
  d.size = static_cast<int64_t>(bytes.size());
  RETURN_IF_ERROR(layout.WriteBlobBytes(d, bytes));
  return d;
}

}  // namespace

Result<TestImage> MakeImageFromLayers(const fs::path& layout_dir, const std::string& tag,
                                      const std::vector<std::pair<std::string, std::string>>& layers,
                                      const std::string& arch) {
  ASSIGN_OR_RETURN(image::OciLayout layout, image::OciLayout::OpenOrCreate(layout_dir));
  TestImage out{layout_dir, tag, {}, {}};
  json diff_ids = json::array();
  json layer_json = json::array();
  for (const auto& [media_type, bytes] : layers) {
    ASSIGN_OR_RETURN(oci::Descriptor ld, WriteTestBlob(layout, media_type, bytes));
    diff_ids.push_back(ld.digest.str());  // (not the uncompressed digest; nothing here checks it)
    layer_json.push_back(ld.ToJson());
    out.layers.push_back(ld);
  }
  json config = {{"architecture", arch},
                 {"os", "linux"},
                 {"created", "1970-01-01T00:00:00Z"},
                 {"config", {{"Labels", {{"org.example.test", tag}}}}},
                 {"rootfs", {{"type", "layers"}, {"diff_ids", diff_ids}}}};
  ASSIGN_OR_RETURN(oci::Descriptor cd, WriteTestBlob(layout, oci::media::kOciConfig, config.dump()));
  json manifest = {{"schemaVersion", 2}, {"mediaType", oci::media::kOciManifest}, {"config", cd.ToJson()}, {"layers", layer_json}};
  ASSIGN_OR_RETURN(oci::Descriptor md, WriteTestBlob(layout, oci::media::kOciManifest, manifest.dump()));
  RETURN_IF_ERROR(layout.AddToIndex(md, tag));
  out.manifest_digest = md.digest;
  return out;
}

std::string LayerMediaType(const std::string& compression) {
  if (compression == "gzip") return std::string(oci::media::kOciLayerGzip);
  if (compression == "zstd") return std::string(oci::media::kOciLayerZstd);
  return std::string(oci::media::kOciLayerTar);
}

std::string MakeTar(const std::vector<TarEntry>& entries, const std::string& compression) {
  std::string out;
  archive* a = archive_write_new();
  archive_write_set_format_pax_restricted(a);
  if (compression == "gzip") archive_write_add_filter_gzip(a);
  if (compression == "zstd") archive_write_add_filter_zstd(a);
  archive_write_set_bytes_in_last_block(a, 1);
  archive_write_open(
      a, &out, nullptr,
      [](archive*, void* user, const void* buf, size_t n) -> la_ssize_t {
        static_cast<std::string*>(user)->append(static_cast<const char*>(buf), n);
        return static_cast<la_ssize_t>(n);
      },
      nullptr);
  for (const auto& t : entries) {
    archive_entry* e = archive_entry_new();
    archive_entry_set_pathname(e, t.path.c_str());
    archive_entry_set_uid(e, t.uid);
    archive_entry_set_gid(e, t.gid);
    archive_entry_set_perm(e, static_cast<mode_t>(t.mode));
    archive_entry_set_mtime(e, 0, 0);
    switch (t.type) {
      case TarEntry::Type::kFile:
        archive_entry_set_filetype(e, AE_IFREG);
        archive_entry_set_size(e, static_cast<la_int64_t>(t.data.size()));
        break;
      case TarEntry::Type::kDir: archive_entry_set_filetype(e, AE_IFDIR); break;
      case TarEntry::Type::kSymlink:
        archive_entry_set_filetype(e, AE_IFLNK);
        archive_entry_set_symlink(e, t.link.c_str());
        break;
      case TarEntry::Type::kHardlink:
        archive_entry_set_filetype(e, AE_IFREG);
        archive_entry_set_hardlink(e, t.link.c_str());
        break;
      case TarEntry::Type::kFifo: archive_entry_set_filetype(e, AE_IFIFO); break;
      case TarEntry::Type::kCharDevice:
        archive_entry_set_filetype(e, AE_IFCHR);
        archive_entry_set_rdevmajor(e, 1);
        archive_entry_set_rdevminor(e, 3);
        break;
    }
    archive_write_header(a, e);
    if (t.type == TarEntry::Type::kFile && !t.data.empty()) archive_write_data(a, t.data.data(), t.data.size());
    archive_entry_free(e);
  }
  archive_write_close(a);
  archive_write_free(a);
  return out;
}

Result<oci::Descriptor> MakeTestIndex(const fs::path& layout_dir, const std::string& tag,
                                      const std::vector<std::pair<const TestImage*, std::string>>& images) {
  ASSIGN_OR_RETURN(image::OciLayout layout, image::OciLayout::Open(layout_dir));
  json manifests = json::array();
  for (const auto& [img, arch] : images) {
    ASSIGN_OR_RETURN(oci::Descriptor d, layout.Resolve(img->tag));
    d.annotations.clear();
    d.platform = oci::Platform{"linux", arch, ""};
    manifests.push_back(d.ToJson());
  }
  json index = {{"schemaVersion", 2}, {"mediaType", oci::media::kOciIndex}, {"manifests", manifests}};
  ASSIGN_OR_RETURN(oci::Descriptor id, WriteTestBlob(layout, oci::media::kOciIndex, index.dump()));
  RETURN_IF_ERROR(layout.AddToIndex(id, tag));
  return id;
}

// --- PtySession -------------------------------------------------------------------

Result<std::unique_ptr<PtySession>> PtySession::SpawnWith(const std::function<int()>& child) {
  int master = -1;
  pid_t pid = ::forkpty(&master, nullptr, nullptr, nullptr);
  if (pid < 0) return ErrnoStatus("forkpty");
  if (pid == 0) ::_exit(child());
  // Non-blocking, so a write to a program that does not read cannot hang
  // the test (reads and writes wait in poll()).
  ::fcntl(master, F_SETFD, FD_CLOEXEC);
  ::fcntl(master, F_SETFL, ::fcntl(master, F_GETFL) | O_NONBLOCK);
  return std::unique_ptr<PtySession>(new PtySession(UniqueFd(master), pid));
}

Result<std::unique_ptr<PtySession>> PtySession::Spawn(const std::vector<std::string>& argv) {
  // Built before the fork: the child only execs.
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  return SpawnWith([&args] {
    ::execv(args[0], args.data());
    return 127;
  });
}

PtySession::~PtySession() {
  if (!reaped_) {
    ::kill(pid_, SIGKILL);
    Wait();
  }
}

bool PtySession::ReadUntil(const std::string& marker, size_t from, std::chrono::seconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (seen_.find(marker, from) == std::string::npos && std::chrono::steady_clock::now() < deadline) {
    pollfd p{master_.get(), POLLIN, 0};
    if (::poll(&p, 1, 500) <= 0) continue;
    char buf[4096];
    ssize_t n = ::read(master_.get(), buf, sizeof buf);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) break;  // EIO: every holder of the terminal closed it
    seen_.append(buf, static_cast<size_t>(n));
  }
  return seen_.find(marker, from) != std::string::npos;
}

void PtySession::ReadToEnd(std::chrono::seconds limit) { ReadUntil(std::string("\x01never\x01"), 0, limit); }

Status PtySession::Write(std::string_view data, std::chrono::seconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!data.empty()) {
    if (std::chrono::steady_clock::now() >= deadline) return DeadlineExceeded("the program is not reading its terminal");
    pollfd p{master_.get(), POLLOUT, 0};
    if (::poll(&p, 1, 500) <= 0) continue;
    ssize_t n = ::write(master_.get(), data.data(), data.size());
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return ErrnoStatus("writing to the terminal");
    data.remove_prefix(static_cast<size_t>(n));
  }
  return OkStatus();
}

int PtySession::Wait() {
  if (reaped_) return -1;
  int status = 0;
  pid_t r;
  do {
    r = ::waitpid(pid_, &status, 0);
  } while (r < 0 && errno == EINTR);
  reaped_ = true;
  return r == pid_ ? status : -1;
}


void StoreAndRegistryTest::SetUp() {
  TempDirTest::SetUp();
  root_ = (tmp() / "root").string();
  auto reg = TestRegistry::Start(RegistryMode::kPlain);
  ASSERT_OK(reg);
  reg_ = std::move(*reg);
}

}  // namespace regdisk::testing
