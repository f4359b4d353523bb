// One HTTP exchange at a time over libcurl, with bodies streamed in both
// directions. Redirects are not followed here: the registry client decides
// where credentials may go (see client.cc).
//
// Thread-compatible: one HttpSession per thread; it keeps connections alive
// between requests.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "util/cancel.h"
#include "util/status.h"

namespace regdisk::registry {

struct TlsOptions {
  bool verify = true;
  // PEM bundle to trust instead of the system store (system CAs included
  // by the caller when wanted). Empty: the system store.
  std::string ca_pem;
  std::string client_cert_file;
  std::string client_key_file;
};

struct HttpRequest {
  std::string method = "GET";
  std::string url;
  std::vector<std::pair<std::string, std::string>> headers;

  // Request body: in memory, a byte range of a file, or (body_stream) all
  // that can be read from body_fd until EOF, sent with chunked encoding.
  std::string body;
  int body_fd = -1;
  uint64_t body_offset = 0;
  uint64_t body_length = 0;
  bool body_stream = false;

  // Response body: streamed to on_body when set (returning an error aborts
  // the transfer), otherwise collected up to max_body bytes.
  std::function<Status(long status, std::string_view chunk)> on_body;
  uint64_t max_body = 1 << 20;

  // When set and cancelled, the exchange stops within a fraction of a
  // second and Do returns its Cancelled status.
  const CancelToken* cancel = nullptr;
  // A second token with the same effect, for one request's own limit (a
  // per-request deadline) besides the operation's token.
  const CancelToken* request_cancel = nullptr;
};

struct HttpResponse {
  long status = 0;
  // Header names lowercased; the last value wins.
  std::map<std::string, std::string> headers;
  std::string body;  // when no on_body was given

  std::string Header(const std::string& lower_name) const {
    auto it = headers.find(lower_name);
    return it == headers.end() ? std::string() : it->second;
  }
};

// What went wrong below HTTP, for retry and fallback decisions.
enum class TransportError {
  kNone,
  kConnect,     // nothing listens, or the name does not resolve
  kTls,         // the handshake failed (e.g. the server speaks plain HTTP)
  kTlsVerify,   // the server's certificate is not trusted
  kClientCert,  // the server wants a client certificate, or refused ours
  kTimeout,     // connect or stall timeout
  kBroken,      // the connection dropped mid-exchange
  kAborted,     // our own body callback stopped the transfer
  kOther,
};

struct HttpLimits {
  std::chrono::seconds connect_timeout{30};
  // An attempt is abandoned when it moves fewer than 1 byte/s for this long.
  std::chrono::seconds stall_timeout{30};
};

class HttpSession {
 public:
  HttpSession(TlsOptions tls, HttpLimits limits);
  ~HttpSession();
  HttpSession(const HttpSession&) = delete;
  HttpSession& operator=(const HttpSession&) = delete;

  // Performs one exchange. A transport failure returns Unavailable (or the
  // on_body callback's own status; PermissionDenied when the server refused
  // the client certificate, or wanted one) and sets *transport_error.
  Result<HttpResponse> Do(const HttpRequest& req, TransportError* transport_error = nullptr);

  const TlsOptions& tls() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Percent-encodes a query value.
std::string UrlEncode(std::string_view s);
// Base64 (standard alphabet, padded).
std::string Base64Encode(std::string_view s);
Result<std::string> Base64Decode(std::string_view s);

}  // namespace regdisk::registry
