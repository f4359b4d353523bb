#include "registry/client.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <poll.h>

#include <algorithm>
#include <random>
#include <thread>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "registry/mirrors.h"
#include "util/fs.h"
#include "util/log.h"

namespace regdisk::registry {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

constexpr const char* kSystemCaBundle = "/etc/ssl/certs/ca-certificates.crt";
constexpr uint64_t kMaxErrorBody = 64 << 10;
constexpr int kMaxRedirects = 5;

bool IsLoopbackHost(std::string_view registry) {
  std::string host(registry);
  if (!host.empty() && host.front() == '[') {
    host = host.substr(1, host.find(']') - 1);
  } else if (size_t c = host.rfind(':'); c != std::string::npos) {
    host = host.substr(0, c);
  }
  if (host == "localhost" || host == "::1") return true;
  in_addr a4;
  return inet_pton(AF_INET, host.c_str(), &a4) == 1 && (ntohl(a4.s_addr) >> 24) == 127;
}

// scheme://host[:port] of an absolute URL.
std::string Origin(std::string_view url) {
  size_t p = url.find("://");
  if (p == std::string_view::npos) return {};
  size_t end = url.find_first_of("/?#", p + 3);
  return std::string(url.substr(0, end));
}

std::string ResolveLocation(const std::string& base_url, const std::string& location) {
  if (location.find("://") != std::string::npos) return location;
  if (!location.empty() && location.front() == '/') return Origin(base_url) + location;
  std::string dir = base_url.substr(0, base_url.rfind('/') + 1);
  return dir + location;
}

// The message a Distribution error body carries, if any.
std::string RegistryErrorText(std::string_view body) {
  json j = json::parse(body, nullptr, false);
  if (j.is_object() && j.contains("errors") && j["errors"].is_array() && !j["errors"].empty()) {
    const json& e = j["errors"][0];
    std::string code = e.value("code", "");
    std::string msg = e.value("message", "");
    return code.empty() ? msg : code + ": " + msg;
  }
  std::string_view head = body.substr(0, 200);
  if (head.find("<html") != std::string_view::npos || head.find("<!DOCTYPE") != std::string_view::npos ||
      head.find("<HTML") != std::string_view::npos) {
    return "the server answered with an HTML page, not a registry response";
  }
  return {};
}

bool IsRetryableStatus(long s) { return s == 408 || s == 429 || (s >= 500 && s <= 599 && s != 501 && s != 505); }

std::chrono::milliseconds ParseRetryAfter(const std::string& v, std::chrono::milliseconds cap) {
  if (v.empty() || !std::all_of(v.begin(), v.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return std::chrono::milliseconds(-1);
  }
  long long secs = v.size() > 6 ? 1000000 : std::stoll(v);
  return std::min<std::chrono::milliseconds>(std::chrono::seconds(secs), cap);
}

std::string Scope(const std::string& repo, bool push) {
  return "repository:" + repo + (push ? ":pull,push" : ":pull");
}

// Collects the CA certificates to trust for a registry: the system bundle
// plus *.crt from --cert-dir or certs.d/HOST; and a client key pair.
Result<TlsOptions> BuildTls(const ClientOptions& o, const std::string& registry) {
  TlsOptions tls;
  tls.verify = o.tls_verify.value_or(true);
  std::vector<fs::path> dirs;
  if (!o.cert_dir.empty()) {
    std::error_code ec;
    if (!fs::is_directory(o.cert_dir, ec)) {
      return InvalidArgument("--cert-dir " + o.cert_dir.string() + " is not a directory");
    }
    dirs.push_back(o.cert_dir);
  } else {
    for (const auto& root : o.certs_d_roots) dirs.push_back(root / registry);
  }
  std::string extra;
  for (const auto& dir : dirs) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) continue;
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(dir, ec)) files.push_back(e.path());
    std::sort(files.begin(), files.end());
    for (const auto& f : files) {
      if (f.extension() == ".crt") {
        ASSIGN_OR_RETURN(std::string pem, ReadFileCapped(f, 1 << 20));
        extra += pem + "\n";
      } else if (f.extension() == ".cert" && tls.client_cert_file.empty()) {
        fs::path key = f;
        key.replace_extension(".key");
        if (!fs::exists(key, ec)) {
          return InvalidArgument("client certificate " + f.string() + " has no matching " + key.filename().string());
        }
        tls.client_cert_file = f.string();
        tls.client_key_file = key.string();
      }
    }
  }
  if (!extra.empty()) {
    auto system = ReadFileCapped(kSystemCaBundle, 16 << 20);
    tls.ca_pem = (system.ok() ? *system + "\n" : std::string()) + extra;
  }
  return tls;
}

struct Token {
  std::string value;
  Clock::time_point expires;
};

}  // namespace

struct RegistryClient::State {
  ClientOptions opt;
  bool loopback = false;
  std::string api_host;
  std::string scheme = "https";
  bool scheme_settled = false;
  std::unique_ptr<HttpSession> http;
  Status init_status;

  // Authentication state, learnt from the first 401.
  std::optional<Challenge> challenge;
  // Credentials may differ per repository (namespaced auth.json keys).
  std::string repo;  // the repository of the current request
  std::map<std::string, std::optional<Credentials>> creds_by_repo;
  std::optional<Credentials> creds;  // for `repo`, once loaded
  std::map<std::string, Token> tokens;  // by scope list
  int token_requests = 0;
  std::mt19937 rng{std::random_device{}()};

  std::string BaseUrl() const { return scheme + "://" + api_host; }

  bool MayUsePlainHttp() const { return loopback || (opt.tls_verify.has_value() && !*opt.tls_verify); }

  // A back-off wait; cut short (Cancelled) when the operation is cancelled,
  // or when `call_cancel` (one request's own deadline) is.
  Status Sleep(std::chrono::milliseconds d, const CancelToken* call_cancel = nullptr) {
    if (call_cancel && opt.cancel) {
      // Either token ends the wait (a poll that misses a token's
      // descriptor still wakes each 100 ms to look).
      const auto until = std::chrono::steady_clock::now() + d;
      for (;;) {
        RETURN_IF_ERROR(opt.cancel->status());
        RETURN_IF_ERROR(call_cancel->status());
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
        if (left.count() <= 0) return OkStatus();
        pollfd fds[2] = {{opt.cancel->poll_fd(), POLLIN, 0}, {call_cancel->poll_fd(), POLLIN, 0}};
        ::poll(fds, 2, static_cast<int>(std::min<int64_t>(left.count(), 100)));
      }
    }
    if (call_cancel) return call_cancel->SleepFor(d);
    if (opt.cancel) return opt.cancel->SleepFor(d);
    std::this_thread::sleep_for(d);
    return OkStatus();
  }

  std::chrono::milliseconds Backoff(int attempt) {
    auto base = opt.backoff_base * (1LL << std::min(attempt, 10));
    auto capped = std::min<std::chrono::milliseconds>(base, opt.backoff_max);
    std::uniform_int_distribution<long long> jitter(0, capped.count() / 2);
    return capped / 2 + std::chrono::milliseconds(jitter(rng));
  }

  Status LoadCreds(const std::string& registry) {
    auto it = creds_by_repo.find(repo);
    if (it == creds_by_repo.end()) {
      auto c = LookupCredentials(opt.auth, registry, repo);
      if (!c.ok()) return std::move(c).status().Annotate("reading credentials for " + registry);
      if (*c) log::Debug("using credentials for {} from {}", registry, (*c)->source);
      it = creds_by_repo.emplace(repo, *c).first;
    }
    creds = it->second;
    return OkStatus();
  }

  // The message for credentials the registry or its token service refused.
  Status Refused(const std::string& registry) const {
    return Unauthenticated("registry " + registry + " refused the credentials for user \"" + creds->username +
                           "\" (from " + creds->source + "); check them, or log in again with regdisk login " +
                           registry);
  }

  // Authorization header value for the given scopes, if any is known.
  std::string AuthHeader(const std::string& scope_key) {
    if (!challenge) return {};
    if (challenge->scheme == "basic") {
      if (!creds) return {};
      return "Basic " + Base64Encode(creds->username + ":" + creds->password);
    }
    auto it = tokens.find(scope_key);
    if (it == tokens.end() || Clock::now() >= it->second.expires) return {};
    return "Bearer " + it->second.value;
  }

  // Answers a 401: learns the challenge and fetches a token for scopes.
  // `call_cancel`, the request's own token (its deadline), bounds the token
  // fetch too: a stalled token service does not outlast it.
  Status Authenticate(const std::string& registry, const std::string& www_authenticate,
                      const std::vector<std::string>& scopes, const std::string& scope_key,
                      const CancelToken* call_cancel) {
    auto challenges = ParseChallenges(www_authenticate);
    const Challenge* chosen = nullptr;
    for (const auto& c : challenges) {
      if (c.scheme == "bearer") chosen = &c;
    }
    if (!chosen) {
      for (const auto& c : challenges) {
        if (c.scheme == "basic") chosen = &c;
      }
    }
    if (!chosen) {
      return Unauthenticated("registry " + registry + " asks for an unsupported authentication scheme (" +
                             (www_authenticate.empty() ? std::string("none given") : www_authenticate.substr(0, 60)) + ")");
    }
    challenge = *chosen;
    RETURN_IF_ERROR(LoadCreds(registry));
    if (challenge->scheme == "basic") {
      if (!creds) {
        return Unauthenticated("registry " + registry + " requires a login; run regdisk login " + registry +
                               ", or pass --creds USER or --authfile FILE");
      }
      return OkStatus();
    }
    return FetchToken(registry, scopes, scope_key, call_cancel);
  }

  Status FetchToken(const std::string& registry, const std::vector<std::string>& scopes, const std::string& scope_key,
                    const CancelToken* call_cancel) {
    std::string realm = challenge->params["realm"];
    if (realm.empty() || (realm.rfind("https://", 0) != 0 && realm.rfind("http://", 0) != 0)) {
      return Unauthenticated("registry " + registry + " sent a Bearer challenge without a usable realm");
    }
    const bool identity_token = creds && creds->username == "<token>";
    std::string form;  // "k=v&k=v"
    auto add = [&](const std::string& k, const std::string& v) {
      form += (form.empty() ? "" : "&") + k + "=" + UrlEncode(v);
    };
    std::string service;
    if (auto s = challenge->params.find("service"); s != challenge->params.end()) service = s->second;
    HttpRequest req;
    req.max_body = 1 << 20;
    req.cancel = opt.cancel.get();
    req.request_cancel = call_cancel;
    if (identity_token) {
      // An identity token (docker login's "identitytoken") is an OAuth2
      // refresh token: POSTed to the realm, never sent as Basic auth.
      add("grant_type", "refresh_token");
      add("refresh_token", creds->password);
      add("service", service);
      add("client_id", "regdisk");
      std::string scope;
      for (const auto& s : scopes) scope += (scope.empty() ? "" : " ") + s;
      add("scope", scope);
      req.method = "POST";
      req.url = realm;
      req.body = form;
      req.headers.emplace_back("Content-Type", "application/x-www-form-urlencoded");
    } else {
      if (!service.empty()) add("service", service);
      for (const auto& s : scopes) add("scope", s);
      if (creds) add("account", creds->username);
      req.url = realm + (realm.find('?') == std::string::npos ? "?" : "&") + form;
      if (creds) {
        req.headers.emplace_back("Authorization", "Basic " + Base64Encode(creds->username + ":" + creds->password));
      }
    }
    ++token_requests;
    Result<HttpResponse> resp = Unavailable("not attempted");
    for (int attempt = 0; attempt < opt.max_attempts; ++attempt) {
      TransportError te = TransportError::kNone;
      resp = http->Do(req, &te);
      if (resp.ok() && !IsRetryableStatus(resp->status)) break;
      if (te == TransportError::kAborted) break;
      if (attempt + 1 < opt.max_attempts) RETURN_IF_ERROR(Sleep(Backoff(attempt), call_cancel));
    }
    if (!resp.ok()) return std::move(resp).status().Annotate("requesting a token for " + registry);
    if (identity_token && (resp->status == 400 || resp->status == 401 || resp->status == 403)) {
      return Unauthenticated("registry " + registry +
                             " refused the identity token from the auth file; log in again to renew it");
    }
    if (resp->status == 401 || resp->status == 403) {
      if (creds) return Refused(registry);
      return Unauthenticated("registry " + registry + " requires a login; run regdisk login " + registry +
                             ", or pass --creds USER or --authfile FILE");
    }
    if (resp->status != 200) {
      return Unavailable("the token service of " + registry + " answered HTTP " + std::to_string(resp->status));
    }
    json j = json::parse(resp->body, nullptr, false);
    if (!j.is_object()) return Unavailable("the token service of " + registry + " did not answer with JSON");
    std::string token = j.value("token", "");
    if (token.empty()) token = j.value("access_token", "");
    if (token.empty()) return Unavailable("the token service of " + registry + " answered without a token");
    long long expires_in = 60;
    if (auto e = j.find("expires_in"); e != j.end() && e->is_number_integer() && e->get<long long>() > 0) {
      expires_in = e->get<long long>();
    }
    // Renew a little early so a token does not expire mid-request.
    auto lifetime = std::chrono::seconds(expires_in);
    auto margin = std::min<std::chrono::seconds>(std::chrono::seconds(10), lifetime / 4);
    tokens[scope_key] = Token{token, Clock::now() + lifetime - margin};
    return OkStatus();
  }
};

RegistryClient::RegistryClient(std::string registry, ClientOptions options)
    : s_(std::make_unique<State>()), registry_(std::move(registry)) {
  s_->opt = std::move(options);
  s_->loopback = IsLoopbackHost(registry_);
  s_->api_host = registry_ == "docker.io" ? "registry-1.docker.io" : registry_;
  auto tls = BuildTls(s_->opt, registry_);
  if (!tls.ok()) {
    s_->init_status = tls.status();
    tls = TlsOptions{};
  }
  s_->http = std::make_unique<HttpSession>(*tls, s_->opt.limits);
  if (s_->opt.registries && !s_->opt.registries->registries.empty()) {
    router_ = std::make_unique<MirrorRouter>(registry_, s_->opt);
  }
}

RegistryClient::~RegistryClient() = default;

int RegistryClient::token_requests() const {
  return s_->token_requests + (router_ ? router_->token_requests() : 0);
}

namespace {

// One logical request to the registry, with authentication, redirects,
// retries and plain-HTTP fallback. `path` is relative to the registry
// origin ("/v2/...") or an absolute URL (an upload Location).
struct Call {
  Call() { req.max_body = kMaxErrorBody; }
  HttpRequest req;  // url: relative to the registry origin, or absolute
  std::vector<std::string> scopes;
  // Called before each attempt (to set Range on a resumed download).
  std::function<void(HttpRequest&)> before_attempt;
  // Retrying a non-idempotent step (an upload PATCH) is the caller's call.
  bool retry = true;
  // This call's own token (a per-request deadline), besides the client's:
  // either stops its transfers and back-off waits.
  const CancelToken* cancel = nullptr;
};

}  // namespace

// The repository a request is about, from its first scope
// ("repository:NAME:pull").
static std::string RepoOfScopes(const std::vector<std::string>& scopes) {
  if (scopes.empty() || scopes[0].rfind("repository:", 0) != 0) return {};
  std::string r = scopes[0].substr(11);
  return r.substr(0, r.rfind(':'));
}

static Result<HttpResponse> Send(RegistryClient::State& s, const std::string& registry, const Call& call) {
  RETURN_IF_ERROR(s.init_status);
  if (std::string repo = RepoOfScopes(call.scopes); repo != s.repo) {
    s.repo = repo;
    if (s.challenge) RETURN_IF_ERROR(s.LoadCreds(registry));
  }
  std::string scope_key;
  for (const auto& sc : call.scopes) scope_key += sc + " ";
  int attempt = 0;
  int auth_tries = 0;
  int redirects = 0;
  std::string url;  // set when following a redirect
  for (;;) {
    std::string target = !url.empty() ? url
                         : call.req.url.find("://") != std::string::npos ? call.req.url
                                                                      : s.BaseUrl() + call.req.url;
    HttpRequest req = call.req;
    req.url = target;
    req.cancel = s.opt.cancel.get();
    req.request_cancel = call.cancel;
    if (call.before_attempt) call.before_attempt(req);
    // Credentials only ever go to the registry's own origin.
    bool own_origin = Origin(target) == s.BaseUrl();
    if (own_origin) {
      std::string auth = s.AuthHeader(scope_key);
      if (!auth.empty()) req.headers.emplace_back("Authorization", auth);
    }
    // One line per attempt (without the query, which may hold upload state).
    log::Debug("{} {} (attempt {})", req.method, target.substr(0, target.find('?')), attempt + 1);
    TransportError te = TransportError::kNone;
    auto resp = s.http->Do(req, &te);
    if (!resp.ok()) {
      if (own_origin && s.scheme == "https" && !s.scheme_settled && te == TransportError::kTls &&
          s.MayUsePlainHttp()) {
        log::Debug("{} does not speak TLS; using plain HTTP", registry);
        s.scheme = "http";
        s.scheme_settled = true;
        if (call.req.url.find("://") != std::string::npos) return resp;  // absolute URL: caller restarts
        continue;
      }
      if (te == TransportError::kTlsVerify) {
        return Unavailable("the TLS certificate of " + registry +
                           " is not trusted; put its CA certificate in --cert-dir or /etc/containers/certs.d/" +
                           registry + "/, or pass --tls-verify=false");
      }
      if (te == TransportError::kClientCert) {
        const std::string& cert = s.http->tls().client_cert_file;
        if (cert.empty()) {
          return PermissionDenied("the registry " + registry +
                                  " requires a TLS client certificate; put NAME.cert and NAME.key (PEM) in --cert-dir "
                                  "or /etc/containers/certs.d/" + registry + "/");
        }
        return PermissionDenied("the registry " + registry + " refused the TLS client certificate " + cert +
                                "; use one signed by a CA it trusts and not expired");
      }
      if (te == TransportError::kConnect) {
        // Nothing listens, or the name does not resolve: asking again will
        // not change that, so fail at once and name the host.
        return Unavailable("cannot reach registry " + registry + ": " + resp.status().message() +
                           "; check the name and that the registry is running");
      }
      if (te == TransportError::kAborted || !call.retry) return resp;
      if (++attempt >= s.opt.max_attempts) {
        return std::move(resp).status().Annotate("giving up after " + std::to_string(attempt) + " attempts");
      }
      auto wait = s.Backoff(attempt);
      log::Debug("{} (attempt {}); retrying in {} ms", resp.status().message(), attempt, wait.count());
      RETURN_IF_ERROR(s.Sleep(wait, call.cancel));
      continue;
    }
    if (own_origin) s.scheme_settled = true;
    long st = resp->status;
    if (st == 401 && own_origin && auth_tries < 2) {
      ++auth_tries;
      // A token that was refused mid-transfer is dropped and fetched again.
      s.tokens.erase(scope_key);
      RETURN_IF_ERROR(s.Authenticate(registry, resp->Header("www-authenticate"), call.scopes, scope_key, call.cancel));
      continue;
    }
    if (st == 401 && own_origin && s.challenge && s.challenge->scheme == "basic" && s.creds) {
      return s.Refused(registry);
    }
    if ((st == 301 || st == 302 || st == 303 || st == 307 || st == 308) && !resp->Header("location").empty()) {
      if (++redirects > kMaxRedirects) return Unavailable("too many redirects from " + registry);
      url = ResolveLocation(target, resp->Header("location"));
      log::Debug("redirected to {}", Origin(url));
      continue;
    }
    if (IsRetryableStatus(st) && call.retry && ++attempt < s.opt.max_attempts) {
      auto wait = ParseRetryAfter(resp->Header("retry-after"), s.opt.retry_after_max);
      if (wait.count() < 0) wait = s.Backoff(attempt);
      log::Debug("{} {} answered HTTP {}; retrying in {} ms", call.req.method, registry, st, wait.count());
      RETURN_IF_ERROR(s.Sleep(wait, call.cancel));
      url.clear();
      continue;
    }
    return resp;
  }
}

namespace {

// Turns an unexpected HTTP status into a sentence.
Status StatusError(const std::string& what, const std::string& registry, const HttpResponse& r) {
  std::string detail = RegistryErrorText(r.body);
  std::string suffix = detail.empty() ? "" : " (" + detail + ")";
  switch (r.status) {
    case 401:
      return Unauthenticated(what + ": registry " + registry + " requires a login; run regdisk login " + registry +
                             ", or pass --creds USER or --authfile FILE" + suffix);
    case 403:
      return PermissionDenied(what + ": access denied by " + registry + suffix);
    case 404:
      return NotFound(what + ": not found on " + registry + suffix);
    case 429:
      return Unavailable(what + ": " + registry + " is rate-limiting requests; try again later" + suffix);
    default:
      return Unavailable(what + ": " + registry + " answered HTTP " + std::to_string(r.status) + suffix);
  }
}

}  // namespace

namespace {
bool IsDigestRef(const std::string& ref) { return ref.find(':') != std::string::npos; }
}  // namespace

// Through the mirror router, when there is one: the same call on the client
// of each source it picks.
#define REGDISK_VIA_MIRRORS(T, repo, by_digest, what, CALL)                                              \
  if (router_) {                                                                                         \
    Result<T> routed_ = Internal("no source tried");                                                     \
    Status routed_st_ = router_->Pull(repo, by_digest, what,                                              \
                                      [&](RegistryClient& c, const std::string& r, const PullSource&) {  \
                                        routed_ = c.CALL;                                                \
                                        return routed_.status();                                         \
                                      });                                                                \
    if (!routed_st_.ok()) return routed_st_;                                                             \
    return routed_;                                                                                      \
  }
#define REGDISK_VIA_PUSH_TARGET(repo, CALL)                 \
  if (router_) {                                             \
    ASSIGN_OR_RETURN(auto target_, router_->PushTarget(repo)); \
    const std::string& r = target_.second;                   \
    return target_.first->CALL;                              \
  }

Result<oci::RawManifest> RegistryClient::GetManifest(const std::string& repo, const std::string& ref) {
  REGDISK_VIA_MIRRORS(oci::RawManifest, repo, IsDigestRef(ref), "manifest " + repo + ":" + ref, GetManifest(r, ref));
  const std::string what = "manifest " + repo + ":" + ref;
  Call c;
  c.req.url = "/v2/" + repo + "/manifests/" + ref;
  c.scopes = {Scope(repo, false)};
  c.req.headers = {{"Accept", oci::media::AcceptHeader()}};
  c.req.max_body = oci::kMaxManifestBytes;
  auto resp = Send(*s_, registry_, c);
  if (!resp.ok()) {
    if (resp.status().code() == Code::kResourceExhausted) {
      return ResourceExhausted(what + " is larger than the limit of " + std::to_string(oci::kMaxManifestBytes) +
                               " bytes; refusing it");
    }
    return std::move(resp).status().Annotate("fetching " + what);
  }
  if (resp->status != 200) return StatusError("fetching " + what, registry_, *resp);
  oci::RawManifest m;
  m.bytes = std::move(resp->body);
  m.media_type = resp->Header("content-type");
  if (size_t semi = m.media_type.find(';'); semi != std::string::npos) m.media_type.resize(semi);
  oci::Digest expected;
  if (auto d = oci::Digest::Parse(ref); d.ok()) {
    expected = *d;
  } else if (std::string h = resp->Header("docker-content-digest"); !h.empty()) {
    auto hd = oci::Digest::Parse(h);
    if (hd.ok()) expected = *hd;
  }
  oci::Hasher hasher(expected.empty() ? "sha256" : expected.algorithm());
  hasher.Update(m.bytes);
  m.digest = hasher.Finish();
  if (!expected.empty() && m.digest != expected) {
    return DataLoss(what + " from " + registry_ + " failed verification: expected " + expected.str() + ", got " +
                    m.digest.str());
  }
  if (expected.empty() || expected.algorithm() != "sha256") m.digest = oci::Digest::Sha256Of(m.bytes);
  // The document's own mediaType is authoritative when present.
  auto parsed = oci::Manifest::Parse(m.bytes, m.media_type);
  if (!parsed.ok()) return std::move(parsed).status().Annotate(what + " from " + registry_);
  m.media_type = parsed->media_type;
  return m;
}

Result<oci::Digest> RegistryClient::ResolveManifest(const std::string& repo, const std::string& ref) {
  REGDISK_VIA_MIRRORS(oci::Digest, repo, IsDigestRef(ref), "manifest " + repo + ":" + ref, ResolveManifest(r, ref));
  Call c;
  c.req.method = "HEAD";
  c.req.url = "/v2/" + repo + "/manifests/" + ref;
  c.scopes = {Scope(repo, false)};
  c.req.headers = {{"Accept", oci::media::AcceptHeader()}};
  ASSIGN_OR_RETURN(HttpResponse resp, Send(*s_, registry_, c));
  if (resp.status != 200) return StatusError("resolving " + repo + ":" + ref, registry_, resp);
  std::string h = resp.Header("docker-content-digest");
  if (h.empty()) {
    ASSIGN_OR_RETURN(oci::RawManifest m, GetManifest(repo, ref));
    return m.digest;
  }
  return oci::Digest::Parse(h);
}

Result<bool> RegistryClient::BlobExists(const std::string& repo, const oci::Digest& digest) {
  REGDISK_VIA_PUSH_TARGET(repo, BlobExists(r, digest));
  Call c;
  c.req.method = "HEAD";
  c.req.url = "/v2/" + repo + "/blobs/" + digest.str();
  c.scopes = {Scope(repo, false)};
  ASSIGN_OR_RETURN(HttpResponse resp, Send(*s_, registry_, c));
  if (resp.status == 200) return true;
  if (resp.status == 404) return false;
  return StatusError("checking blob " + digest.Short() + " in " + repo, registry_, resp);
}

Status RegistryClient::FetchBlob(const std::string& repo, const oci::Descriptor& desc, const BlobSink& sink,
                                 uint64_t offset, oci::Hasher* resumed) {
  if (router_) return router_->FetchBlob(repo, desc, sink, offset, resumed);
  const std::string what = "blob " + desc.digest.Short() + " of " + repo;
  oci::Hasher own(desc.digest.algorithm());
  oci::Hasher& hasher = resumed ? *resumed : own;
  uint64_t received = offset;  // bytes hashed so far (and, past offset, handed to the sink)
  uint64_t skip = 0;           // bytes of a 200 answer to drop after a resume
  std::string error_body;
  const uint64_t size = static_cast<uint64_t>(desc.size);
  // A resumed download that already holds every byte (the process was
  // killed after the download, before the bytes were used) asks nothing:
  // an empty Range is unsatisfiable, and registries answer it in ways
  // libcurl counts as a broken transfer.
  if (offset >= size) return oci::VerifyBlob(what, desc.digest, size, offset, hasher.Finish());

  Call c;
  c.req.url = "/v2/" + repo + "/blobs/" + desc.digest.str();
  c.scopes = {Scope(repo, false)};
  c.before_attempt = [&](HttpRequest& req) {
    error_body.clear();
    skip = received;
    if (received > 0) req.headers.emplace_back("Range", "bytes=" + std::to_string(received) + "-");
  };
  c.req.on_body = [&](long status, std::string_view chunk) -> Status {
    if (status == 206 && skip > 0) skip = 0;  // the server honoured Range
    if (status != 200 && status != 206) {
      if (error_body.size() < kMaxErrorBody) error_body.append(chunk.substr(0, kMaxErrorBody - error_body.size()));
      return OkStatus();
    }
    if (skip > 0) {
      size_t drop = static_cast<size_t>(std::min<uint64_t>(skip, chunk.size()));
      chunk.remove_prefix(drop);
      skip -= drop;
      if (chunk.empty()) return OkStatus();
    }
    RETURN_IF_ERROR(oci::CheckBlobGrowth(what, received, chunk.size(), size));
    hasher.Update(chunk);
    received += chunk.size();
    return sink(chunk);
  };

  // A dropped connection is resumed: Send retries transport failures and
  // before_attempt asks for the rest with Range.
  for (int round = 0;; ++round) {
    auto resp = Send(*s_, registry_, c);
    if (!resp.ok()) return std::move(resp).status().Annotate("fetching " + what);
    if (resp->status == 416 && received == size) break;  // nothing left to send
    if (resp->status != 200 && resp->status != 206) {
      HttpResponse r = *resp;
      r.body = error_body;
      return StatusError("fetching " + what, registry_, r);
    }
    if (received == size) break;
    // The body ended early without a transport error (a proxy closed a
    // Content-Length-less response): ask again for the rest.
    if (round + 1 >= s_->opt.max_attempts) break;
  }
  return oci::VerifyBlob(what, desc.digest, size, received, hasher.Finish());
}

Status RegistryClient::FetchBlobRange(const std::string& repo, const oci::Descriptor& desc, uint64_t offset,
                                      uint64_t length, const BlobSink& sink, const CancelToken* cancel) {
  const std::string what = "bytes " + std::to_string(offset) + "+" + std::to_string(length) + " of blob " +
                           desc.digest.Short() + " of " + repo;
  const uint64_t size = static_cast<uint64_t>(desc.size);
  if (length == 0 || offset > size || size - offset < length) {
    return InvalidArgument(what + " lie outside its " + std::to_string(size) + " bytes");
  }
  if (router_) {
    return router_->Pull(repo, true, what, [&](RegistryClient& c, const std::string& r, const PullSource&) {
      return c.FetchBlobRange(r, desc, offset, length, sink, cancel);
    });
  }
  uint64_t received = 0;  // bytes handed to the sink
  uint64_t skip = 0;      // bytes of a 200 answer before the range
  bool whole = false;     // the current answer is the whole blob (200)
  std::string error_body;
  Call c;
  c.req.url = "/v2/" + repo + "/blobs/" + desc.digest.str();
  c.scopes = {Scope(repo, false)};
  c.cancel = cancel;
  c.before_attempt = [&](HttpRequest& req) {
    error_body.clear();
    whole = false;
    req.headers.emplace_back("Range", "bytes=" + std::to_string(offset + received) + "-" +
                                          std::to_string(offset + length - 1));
  };
  c.req.on_body = [&](long status, std::string_view chunk) -> Status {
    if (status != 200 && status != 206) {
      if (error_body.size() < kMaxErrorBody) error_body.append(chunk.substr(0, kMaxErrorBody - error_body.size()));
      return OkStatus();
    }
    if (status == 200 && !whole) {
      whole = true;
      skip = offset + received;
    }
    if (skip > 0) {
      size_t drop = static_cast<size_t>(std::min<uint64_t>(skip, chunk.size()));
      chunk.remove_prefix(drop);
      skip -= drop;
    }
    chunk = chunk.substr(0, static_cast<size_t>(std::min<uint64_t>(chunk.size(), length - received)));
    if (chunk.empty()) return OkStatus();
    received += chunk.size();
    return sink(chunk);
  };
  for (int round = 0;; ++round) {
    auto resp = Send(*s_, registry_, c);
    if (!resp.ok()) return std::move(resp).status().Annotate("fetching " + what);
    if (resp->status != 200 && resp->status != 206) {
      HttpResponse r = *resp;
      r.body = error_body;
      return StatusError("fetching " + what, registry_, r);
    }
    if (received == length) return OkStatus();
    if (round + 1 >= s_->opt.max_attempts) break;
  }
  return DataLoss("fetching " + what + ": the registry sent " + std::to_string(received) + " of " +
                  std::to_string(length) + " bytes");
}

Result<std::string> RegistryClient::FetchBlobToString(const std::string& repo, const oci::Descriptor& desc,
                                                      uint64_t max_bytes) {
  if (static_cast<uint64_t>(desc.size) > max_bytes) {
    return ResourceExhausted("blob " + desc.digest.Short() + " is " + std::to_string(desc.size) +
                             " bytes, over the limit of " + std::to_string(max_bytes));
  }
  std::string out;
  RETURN_IF_ERROR(FetchBlob(repo, desc, [&](std::string_view chunk) {
    out.append(chunk);
    return OkStatus();
  }));
  return out;
}

namespace {

std::string WithDigest(const std::string& location, const oci::Digest& d) {
  return location + (location.find('?') == std::string::npos ? "?" : "&") + "digest=" + UrlEncode(d.str());
}

}  // namespace

Result<bool> RegistryClient::MountBlob(const std::string& repo, const oci::Descriptor& desc,
                                       const std::string& from_repo) {
  if (router_) {
    ASSIGN_OR_RETURN(auto from, router_->PushTarget(from_repo));
    ASSIGN_OR_RETURN(auto to, router_->PushTarget(repo));
    if (from.first != to.first) return false;  // the location moved it to another host
    return to.first->MountBlob(to.second, desc, from.second);
  }
  Call c;
  c.req.method = "POST";
  c.req.url = "/v2/" + repo + "/blobs/uploads/?mount=" + UrlEncode(desc.digest.str()) + "&from=" + UrlEncode(from_repo);
  c.scopes = {Scope(repo, true), Scope(from_repo, false)};
  ASSIGN_OR_RETURN(HttpResponse resp, Send(*s_, registry_, c));
  if (resp.status == 201) return true;
  if (resp.status == 202) {
    // The registry opened an upload session instead; abandon it.
    if (std::string loc = resp.Header("location"); !loc.empty()) {
      Call del;
      del.req.method = "DELETE";
      del.req.url = ResolveLocation(s_->BaseUrl() + c.req.url, loc);
      del.scopes = {Scope(repo, true)};
      (void)Send(*s_, registry_, del);
    }
    return false;
  }
  return StatusError("mounting blob " + desc.digest.Short() + " into " + repo, registry_, resp);
}

Status RegistryClient::PushBlobBytes(const std::string& repo, const oci::Descriptor& desc, std::string_view bytes) {
  REGDISK_VIA_PUSH_TARGET(repo, PushBlobBytes(r, desc, bytes));
  auto file = TempDir::Create("regdisk-blob");
  if (!file.ok()) return file.status();
  fs::path p = file->path() / "blob";
  RETURN_IF_ERROR(WriteFileAtomic(p, bytes));
  ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(p, O_RDONLY));
  return PushBlob(repo, desc, fd.get(), 0);
}

Status RegistryClient::PushBlob(const std::string& repo, const oci::Descriptor& desc, int fd, uint64_t offset) {
  REGDISK_VIA_PUSH_TARGET(repo, PushBlob(r, desc, fd, offset));
  const std::string what = "uploading blob " + desc.digest.Short() + " to " + repo;
  const uint64_t size = static_cast<uint64_t>(desc.size);
  const std::vector<std::string> scopes = {Scope(repo, true)};

  // One step of an upload session: the request must get `want` back.
  auto step = [&](Call call, long want) -> Result<HttpResponse> {
    call.scopes = scopes;
    ASSIGN_OR_RETURN(HttpResponse r, Send(*s_, registry_, call));
    if (r.status != want) return StatusError(call.req.method + " of the upload session", registry_, r);
    return r;
  };
  // One whole session: POST, then PUT the body, or PATCH it in chunks and
  // PUT to close.
  auto upload_once = [&]() -> Status {
    Call start;
    start.req.method = "POST";
    start.req.url = "/v2/" + repo + "/blobs/uploads/";
    ASSIGN_OR_RETURN(HttpResponse began, step(start, 202));
    if (began.Header("location").empty()) return Unavailable("the registry gave no upload location");
    std::string location = ResolveLocation(s_->BaseUrl() + start.req.url, began.Header("location"));
    uint64_t chunk = s_->opt.chunk_size;
    if (std::string m = began.Header("oci-chunk-min-length"); !m.empty()) {
      chunk = std::max<uint64_t>(chunk, std::strtoull(m.c_str(), nullptr, 10));
    }
    Call put;
    put.req.method = "PUT";
    put.retry = false;
    put.req.headers = {{"Content-Type", "application/octet-stream"}};
    if (size > s_->opt.chunk_threshold) {
      for (uint64_t sent = 0; sent < size;) {
        uint64_t n = std::min(chunk, size - sent);
        Call patch;
        patch.req.method = "PATCH";
        patch.req.url = location;
        patch.retry = false;
        patch.req.body_fd = fd;
        patch.req.body_offset = offset + sent;
        patch.req.body_length = n;
        patch.req.headers = {{"Content-Type", "application/octet-stream"},
                         {"Content-Range", std::to_string(sent) + "-" + std::to_string(sent + n - 1)}};
        ASSIGN_OR_RETURN(HttpResponse r, step(patch, 202));
        if (!r.Header("location").empty()) location = ResolveLocation(location, r.Header("location"));
        sent += n;
      }
    } else {
      put.req.body_fd = fd;
      put.req.body_offset = offset;
      put.req.body_length = size;
    }
    put.req.url = WithDigest(location, desc.digest);
    return step(put, 201).status();
  };

  // A failed session is abandoned and started again from scratch.
  Status last;
  for (int round = 0; round < 3; ++round) {
    last = upload_once();
    if (last.ok()) return OkStatus();
    if (last.code() != Code::kUnavailable && last.code() != Code::kDeadlineExceeded) break;
    log::Debug("{}: {}; starting the upload again", what, last.message());
    RETURN_IF_ERROR(s_->Sleep(s_->Backoff(round + 1)).Annotate(what));
  }
  return last.Annotate(what);
}

Result<oci::Descriptor> RegistryClient::PushBlobStream(
    const std::string& repo, const std::function<Result<oci::Descriptor>(int fd)>& produce) {
  REGDISK_VIA_PUSH_TARGET(repo, PushBlobStream(r, produce));
  const std::string what = "uploading a blob to " + repo;
  const std::vector<std::string> scopes = {Scope(repo, true)};
  Call start;
  start.req.method = "POST";
  start.req.url = "/v2/" + repo + "/blobs/uploads/";
  start.scopes = scopes;
  ASSIGN_OR_RETURN(HttpResponse began, Send(*s_, registry_, start));
  if (began.status != 202 || began.Header("location").empty()) return StatusError(what, registry_, began);
  std::string location = ResolveLocation(s_->BaseUrl() + start.req.url, began.Header("location"));

  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return ErrnoStatus("creating a pipe");
  UniqueFd read_end(fds[0]), write_end(fds[1]);
  Result<oci::Descriptor> produced = Internal("the producer did not run");
  std::thread producer([&] {
    produced = produce(write_end.get());
    write_end.reset();  // EOF for the upload
  });
  Call patch;
  patch.req.method = "PATCH";
  patch.req.url = location;
  patch.scopes = scopes;
  patch.retry = false;
  patch.req.body_fd = read_end.get();
  patch.req.body_stream = true;
  patch.req.headers = {{"Content-Type", "application/octet-stream"}};
  auto sent = Send(*s_, registry_, patch);
  read_end.reset();  // a producer blocked on a dead upload gets EPIPE
  producer.join();
  if (!produced.ok()) return std::move(produced).status().Annotate(what);
  if (!sent.ok()) return std::move(sent).status().Annotate(what);
  if (sent->status != 202) return StatusError(what, registry_, *sent);
  if (!sent->Header("location").empty()) location = ResolveLocation(location, sent->Header("location"));
  Call put;
  put.req.method = "PUT";
  put.req.url = WithDigest(location, produced->digest);
  put.scopes = scopes;
  put.retry = false;
  ASSIGN_OR_RETURN(HttpResponse done, Send(*s_, registry_, put));
  if (done.status != 201) return StatusError(what, registry_, done);
  return produced;
}

Status RegistryClient::PutManifest(const std::string& repo, const std::string& ref, const oci::RawManifest& m) {
  REGDISK_VIA_PUSH_TARGET(repo, PutManifest(r, ref, m));
  Call c;
  c.req.method = "PUT";
  c.req.url = "/v2/" + repo + "/manifests/" + ref;
  c.scopes = {Scope(repo, true)};
  c.req.body = m.bytes;
  c.req.headers = {{"Content-Type", m.media_type}};
  const std::string what = "pushing manifest " + repo + ":" + ref;
  ASSIGN_OR_RETURN(HttpResponse resp, Send(*s_, registry_, c));
  if (resp.status != 201 && resp.status != 200) return StatusError(what, registry_, resp);
  if (std::string h = resp.Header("docker-content-digest"); !h.empty() && h != m.digest.str()) {
    return DataLoss(what + ": the registry stored digest " + h + " but the manifest is " + m.digest.str());
  }
  return OkStatus();
}

Status RegistryClient::CheckLogin() {
  Call c;
  c.req.url = "/v2/";
  ASSIGN_OR_RETURN(HttpResponse resp, Send(*s_, registry_, c));
  if (resp.status == 200) return OkStatus();
  if (resp.status == 401 && s_->creds) return s_->Refused(registry_);
  return StatusError("checking the login", registry_, resp);
}

Result<std::vector<std::string>> RegistryClient::ListTags(const std::string& repo) {
  REGDISK_VIA_MIRRORS(std::vector<std::string>, repo, false, "tags of " + repo, ListTags(r));
  std::vector<std::string> tags;
  std::string path = "/v2/" + repo + "/tags/list";
  for (int page = 0; page < 1000 && !path.empty(); ++page) {
    Call c;
    c.req.url = path;
    c.scopes = {Scope(repo, false)};
    c.req.max_body = 16 << 20;
    ASSIGN_OR_RETURN(HttpResponse resp, Send(*s_, registry_, c));
    if (resp.status != 200) return StatusError("listing tags of " + repo, registry_, resp);
    json j = json::parse(resp.body, nullptr, false);
    if (!j.is_object()) return Unavailable("listing tags of " + repo + ": the answer is not JSON");
    if (auto t = j.find("tags"); t != j.end() && t->is_array()) {
      for (auto& x : *t) {
        if (x.is_string()) tags.push_back(x.get<std::string>());
      }
    }
    // Link: </v2/...?n=...&last=...>; rel="next"
    std::string link = resp.Header("link");
    path.clear();
    if (size_t lt = link.find('<'), gt = link.find('>'); lt != std::string::npos && gt != std::string::npos && gt > lt) {
      path = link.substr(lt + 1, gt - lt - 1);
    }
  }
  return tags;
}

}  // namespace regdisk::registry
