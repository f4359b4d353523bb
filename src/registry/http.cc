#include "registry/http.h"

#include <curl/curl.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <mutex>

namespace regdisk::registry {

namespace {

void GlobalInitOnce() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

struct Exchange {
  const HttpRequest* req = nullptr;
  HttpResponse* resp = nullptr;
  uint64_t sent = 0;
  Status body_status;  // set when on_body aborted the transfer
  bool body_too_large = false;
};

size_t OnHeader(char* data, size_t size, size_t n, void* user) {
  auto* ex = static_cast<Exchange*>(user);
  std::string_view line(data, size * n);
  if (line.rfind("HTTP/", 0) == 0) {
    // A new response (after 100 Continue, or a new hop): start afresh.
    ex->resp->headers.clear();
    size_t sp = line.find(' ');
    if (sp != std::string_view::npos) ex->resp->status = std::strtol(line.data() + sp + 1, nullptr, 10);
    return size * n;
  }
  size_t colon = line.find(':');
  if (colon == std::string_view::npos) return size * n;
  std::string name(line.substr(0, colon));
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
  std::string_view value = line.substr(colon + 1);
  while (!value.empty() && (value.front() == ' ' || value.front() == '\t')) value.remove_prefix(1);
  while (!value.empty() && (value.back() == '\r' || value.back() == '\n' || value.back() == ' ')) value.remove_suffix(1);
  ex->resp->headers[name] = std::string(value);
  return size * n;
}

// The request's token that was cancelled, if any.
const CancelToken* Fired(const HttpRequest& req) {
  if (req.cancel && req.cancel->cancelled()) return req.cancel;
  if (req.request_cancel && req.request_cancel->cancelled()) return req.request_cancel;
  return nullptr;
}

int OnProgress(void* req, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
  return Fired(*static_cast<const HttpRequest*>(req)) ? 1 : 0;
}

size_t OnBody(char* data, size_t size, size_t n, void* user) {
  auto* ex = static_cast<Exchange*>(user);
  size_t len = size * n;
  if (ex->req->on_body) {
    Status st = ex->req->on_body(ex->resp->status, std::string_view(data, len));
    if (!st.ok()) {
      ex->body_status = std::move(st);
      return 0;  // aborts the transfer
    }
    return len;
  }
  if (ex->resp->body.size() + len > ex->req->max_body) {
    ex->body_too_large = true;
    return 0;
  }
  ex->resp->body.append(data, len);
  return len;
}

size_t OnRead(char* buf, size_t size, size_t n, void* user) {
  auto* ex = static_cast<Exchange*>(user);
  const HttpRequest& r = *ex->req;
  size_t want = size * n;
  if (r.body_stream) {
    ssize_t got;
    do {
      got = ::read(r.body_fd, buf, want);
    } while (got < 0 && errno == EINTR);
    if (got < 0) return CURL_READFUNC_ABORT;
    ex->sent += static_cast<uint64_t>(got);
    return static_cast<size_t>(got);
  }
  if (r.body_fd >= 0) {
    uint64_t left = r.body_length - ex->sent;
    want = static_cast<size_t>(std::min<uint64_t>(want, left));
    if (want == 0) return 0;
    ssize_t got;
    do {
      got = ::pread(r.body_fd, buf, want, static_cast<off_t>(r.body_offset + ex->sent));
    } while (got < 0 && errno == EINTR);
    if (got <= 0) return CURL_READFUNC_ABORT;
    ex->sent += static_cast<uint64_t>(got);
    return static_cast<size_t>(got);
  }
  size_t left = r.body.size() - static_cast<size_t>(ex->sent);
  want = std::min(want, left);
  std::copy_n(r.body.data() + ex->sent, want, buf);
  ex->sent += want;
  return want;
}

int OnSeek(void* user, curl_off_t offset, int origin) {
  auto* ex = static_cast<Exchange*>(user);
  if (origin != SEEK_SET) return CURL_SEEKFUNC_CANTSEEK;
  ex->sent = static_cast<uint64_t>(offset);
  return CURL_SEEKFUNC_OK;
}

// OpenSSL's names for the alerts a server sends when it requires a client
// certificate and got none, or does not accept the one it got.
bool IsClientCertAlert(std::string_view detail) {
  for (std::string_view alert : {"alert certificate required", "alert bad certificate", "alert unknown ca",
                                 "alert certificate unknown", "alert certificate expired"}) {
    if (detail.find(alert) != std::string_view::npos) return true;
  }
  return false;
}

TransportError Classify(CURLcode rc) {
  switch (rc) {
    case CURLE_OK: return TransportError::kNone;
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY: return TransportError::kConnect;
    case CURLE_PEER_FAILED_VERIFICATION: return TransportError::kTlsVerify;
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE: return TransportError::kTls;
    case CURLE_OPERATION_TIMEDOUT: return TransportError::kTimeout;
    case CURLE_WRITE_ERROR:
    case CURLE_ABORTED_BY_CALLBACK: return TransportError::kAborted;
    case CURLE_PARTIAL_FILE:
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM: return TransportError::kBroken;
    default: return TransportError::kOther;
  }
}

// What the TLS handshake of the current request showed about client
// certificates. Under TLS 1.3 a server that refuses our certificate (or
// wanted one) sends its alert after the handshake; when the request was
// already on its way the alert can be lost to a connection reset, so
// "asked for a certificate, then dropped us" is the same verdict.
struct HandshakeSeen {
  bool cert_requested = false;
  std::string alert;  // the last alert the server sent, OpenSSL's long name
};

void OnTlsInfo(const SSL* ssl, int where, int ret) {
  SSL_CTX* ctx = SSL_get_SSL_CTX(ssl);
  auto* seen = static_cast<HandshakeSeen*>(SSL_CTX_get_app_data(ctx));
  if (seen == nullptr) return;
  // The SSL_CB_* flags share bits: a combination matches only as a whole.
  auto is = [where](int flags) { return (where & flags) == flags; };
  if (is(SSL_CB_CONNECT_LOOP) && SSL_get_state(ssl) == TLS_ST_CR_CERT_REQ) seen->cert_requested = true;
  if (is(SSL_CB_READ_ALERT)) seen->alert = SSL_alert_desc_string_long(ret);
}

CURLcode OnSslContext(CURL*, void* ssl_ctx, void* user) {
  auto* ctx = static_cast<SSL_CTX*>(ssl_ctx);
  SSL_CTX_set_app_data(ctx, user);
  SSL_CTX_set_info_callback(ctx, OnTlsInfo);
  return CURLE_OK;
}

bool IsClientCertAlertName(std::string_view alert) {
  for (std::string_view a : {"certificate required", "bad certificate", "unknown CA", "certificate unknown",
                             "certificate expired", "unsupported certificate", "certificate revoked"}) {
    if (alert == a) return true;
  }
  return false;
}

}  // namespace

// The session owns the observer, so a connection libcurl keeps alive
// never points at a finished request.
struct HttpSession::Impl {
  CURL* curl = nullptr;
  TlsOptions tls;
  HttpLimits limits;
  char errbuf[CURL_ERROR_SIZE] = {0};
  HandshakeSeen handshake;
};

const TlsOptions& HttpSession::tls() const { return impl_->tls; }

HttpSession::HttpSession(TlsOptions tls, HttpLimits limits) : impl_(std::make_unique<Impl>()) {
  GlobalInitOnce();
  impl_->curl = curl_easy_init();
  impl_->tls = std::move(tls);
  impl_->limits = limits;
}

HttpSession::~HttpSession() { curl_easy_cleanup(impl_->curl); }

Result<HttpResponse> HttpSession::Do(const HttpRequest& req, TransportError* transport_error) {
  CURL* c = impl_->curl;
  curl_easy_reset(c);
  HttpResponse resp;
  Exchange ex{&req, &resp, 0, {}, false};
  impl_->errbuf[0] = 0;

  curl_easy_setopt(c, CURLOPT_URL, req.url.c_str());
  curl_easy_setopt(c, CURLOPT_ERRORBUFFER, impl_->errbuf);
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
  curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(c, CURLOPT_USERAGENT, "regdisk/0.1");
  curl_easy_setopt(c, CURLOPT_ACCEPT_ENCODING, nullptr);  // blobs are compressed already
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, static_cast<long>(impl_->limits.connect_timeout.count()));
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, static_cast<long>(impl_->limits.stall_timeout.count()));
  curl_easy_setopt(c, CURLOPT_BUFFERSIZE, 512L * 1024L);
  curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, OnHeader);
  curl_easy_setopt(c, CURLOPT_HEADERDATA, &ex);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, OnBody);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &ex);
  if (req.cancel || req.request_cancel) {
    if (const CancelToken* fired = Fired(req)) {
      if (transport_error) *transport_error = TransportError::kAborted;
      return fired->status();
    }
    // libcurl calls this about once a second while idle, and on every
    // chunk: a cancelled token aborts the transfer.
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, OnProgress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, &req);
  }

  const TlsOptions& tls = impl_->tls;
  impl_->handshake = HandshakeSeen{};
  curl_easy_setopt(c, CURLOPT_SSL_CTX_FUNCTION, OnSslContext);
  curl_easy_setopt(c, CURLOPT_SSL_CTX_DATA, &impl_->handshake);
  curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, tls.verify ? 1L : 0L);
  curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, tls.verify ? 2L : 0L);
  curl_blob ca_blob;
  if (!tls.ca_pem.empty()) {
    ca_blob.data = const_cast<char*>(tls.ca_pem.data());
    ca_blob.len = tls.ca_pem.size();
    ca_blob.flags = CURL_BLOB_NOCOPY;
    curl_easy_setopt(c, CURLOPT_CAINFO_BLOB, &ca_blob);
  }
  if (!tls.client_cert_file.empty()) {
    curl_easy_setopt(c, CURLOPT_SSLCERT, tls.client_cert_file.c_str());
    curl_easy_setopt(c, CURLOPT_SSLKEY, tls.client_key_file.c_str());
  }

  bool has_body = req.body_fd >= 0 || !req.body.empty() || req.method == "PUT" || req.method == "PATCH" ||
                  req.method == "POST";
  uint64_t body_len = req.body_fd >= 0 ? req.body_length : req.body.size();
  if (req.method == "HEAD") {
    curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
  } else if (has_body) {
    curl_easy_setopt(c, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(c, CURLOPT_READFUNCTION, OnRead);
    curl_easy_setopt(c, CURLOPT_READDATA, &ex);
    curl_easy_setopt(c, CURLOPT_SEEKFUNCTION, OnSeek);
    curl_easy_setopt(c, CURLOPT_SEEKDATA, &ex);
    if (!req.body_stream) curl_easy_setopt(c, CURLOPT_INFILESIZE_LARGE, static_cast<curl_off_t>(body_len));
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, req.method.c_str());
  } else if (req.method != "GET") {
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, req.method.c_str());
  }

  curl_slist* headers = nullptr;
  for (const auto& [k, v] : req.headers) headers = curl_slist_append(headers, (k + ": " + v).c_str());
  if (req.body_stream) headers = curl_slist_append(headers, "Transfer-Encoding: chunked");
  headers = curl_slist_append(headers, "Expect:");
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers);

  CURLcode rc = curl_easy_perform(c);
  curl_slist_free_all(headers);
  // Forget the header list (it may hold a token) before the next request.
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, nullptr);

  TransportError te = Classify(rc);
  if (transport_error) *transport_error = te;
  if (const CancelToken* fired = rc != CURLE_OK ? Fired(req) : nullptr) {
    if (transport_error) *transport_error = TransportError::kAborted;
    return fired->status();
  }
  if (rc != CURLE_OK) {
    if (!ex.body_status.ok()) {
      if (transport_error) *transport_error = TransportError::kAborted;
      return ex.body_status;
    }
    if (ex.body_too_large) {
      if (transport_error) *transport_error = TransportError::kAborted;
      return ResourceExhausted("the response from " + req.url + " is larger than " + std::to_string(req.max_body) +
                               " bytes");
    }
    std::string detail = impl_->errbuf[0] ? impl_->errbuf : curl_easy_strerror(rc);
    const HandshakeSeen& hs = impl_->handshake;
    if (IsClientCertAlert(detail) || IsClientCertAlertName(hs.alert) ||
        (hs.cert_requested && te == TransportError::kBroken)) {
      // With TLS 1.3 the server's verdict on our (missing) certificate
      // arrives after the handshake: as an alert on the first read, or as
      // a reset when our request was still being sent.
      if (transport_error) *transport_error = TransportError::kClientCert;
      return PermissionDenied(req.method + " " + req.url + " failed: " + detail);
    }
    if (te == TransportError::kTimeout) {
      return DeadlineExceeded(req.method + " " + req.url + " timed out: " + detail);
    }
    return Unavailable(req.method + " " + req.url + " failed: " + detail);
  }
  long code = 0;
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
  resp.status = code;
  return resp;
}

std::string UrlEncode(std::string_view s) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char ch : s) {
    if (std::isalnum(ch) || ch == '-' || ch == '_' || ch == '.' || ch == '~') {
      out.push_back(static_cast<char>(ch));
    } else {
      out.push_back('%');
      out.push_back(kHex[ch >> 4]);
      out.push_back(kHex[ch & 15]);
    }
  }
  return out;
}

std::string Base64Encode(std::string_view s) {
  std::string out(4 * ((s.size() + 2) / 3), '\0');
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(s.data()), static_cast<int>(s.size()));
  out.resize(static_cast<size_t>(n));
  return out;
}

Result<std::string> Base64Decode(std::string_view s) {
  std::string in(s);
  while (!in.empty() && (in.back() == '\n' || in.back() == '\r')) in.pop_back();
  while (in.size() % 4 != 0) in.push_back('=');
  size_t pad = 0;
  if (!in.empty() && in.back() == '=') ++pad;
  if (in.size() > 1 && in[in.size() - 2] == '=') ++pad;
  std::string out(3 * in.size() / 4, '\0');
  int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(in.data()), static_cast<int>(in.size()));
  if (n < 0) return InvalidArgument("the value is not valid base64");
  out.resize(static_cast<size_t>(n) - pad);
  return out;
}

}  // namespace regdisk::registry
