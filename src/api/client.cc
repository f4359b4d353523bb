#include "api/client.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include <curl/curl.h>
#include <nlohmann/json.hpp>

#include "util/text.h"

namespace regdisk::api {

namespace {

using json = nlohmann::json;

struct CurlDeleter {
  void operator()(CURL* c) const { curl_easy_cleanup(c); }
};
using CurlPtr = std::unique_ptr<CURL, CurlDeleter>;

struct SlistDeleter {
  void operator()(curl_slist* l) const { curl_slist_free_all(l); }
};
using SlistPtr = std::unique_ptr<curl_slist, SlistDeleter>;

// What the write callback feeds: the sink for a 2xx answer, else `body`.
struct Sink {
  CURL* curl = nullptr;
  const std::function<bool(std::string_view)>* stream = nullptr;
  std::string body;
  bool stopped = false;  // the stream's sink asked to stop
};

size_t Write(char* data, size_t size, size_t n, void* cls) {
  auto* s = static_cast<Sink*>(cls);
  const size_t bytes = size * n;
  long code = 0;
  curl_easy_getinfo(s->curl, CURLINFO_RESPONSE_CODE, &code);
  if (s->stream && code >= 200 && code < 300) {
    if (!(*s->stream)(std::string_view(data, bytes))) {
      s->stopped = true;
      return 0;  // CURLE_WRITE_ERROR: ends the transfer
    }
    return bytes;
  }
  if (s->body.size() < (16u << 20)) s->body.append(data, bytes);
  return bytes;
}

// Why connect(2) to the socket fails now, for the unreachable message.
std::string ConnectError(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) return "the path is too long for a unix socket";
  std::memcpy(addr.sun_path, path.data(), path.size());
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return std::strerror(errno);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return "the connection failed";
  return std::strerror(errno);
}

// A handle for `path` at the endpoint: the unix socket, or the https
// server with the kubeconfig's CA and client certificate (the token goes
// in a header: AuthHeader).
CurlPtr NewHandle(const Endpoint& e, const std::string& path) {
  CurlPtr c(curl_easy_init());
  if (!c) return c;
  std::string url;
  if (!e.socket.empty()) {
    curl_easy_setopt(c.get(), CURLOPT_UNIX_SOCKET_PATH, e.socket.c_str());
    // The host is a placeholder: the socket is the server.
    url = "http://localhost" + path;
  } else {
    url = e.server + path;
    curl_easy_setopt(c.get(), CURLOPT_PROTOCOLS_STR, "https");
    if (!e.ca_pem.empty()) {
      curl_blob ca{const_cast<char*>(e.ca_pem.data()), e.ca_pem.size(), CURL_BLOB_COPY};
      curl_easy_setopt(c.get(), CURLOPT_CAINFO_BLOB, &ca);
    }
    if (!e.client_cert_pem.empty()) {
      curl_blob cert{const_cast<char*>(e.client_cert_pem.data()), e.client_cert_pem.size(), CURL_BLOB_COPY};
      curl_blob key{const_cast<char*>(e.client_key_pem.data()), e.client_key_pem.size(), CURL_BLOB_COPY};
      curl_easy_setopt(c.get(), CURLOPT_SSLCERTTYPE, "PEM");
      curl_easy_setopt(c.get(), CURLOPT_SSLCERT_BLOB, &cert);
      curl_easy_setopt(c.get(), CURLOPT_SSLKEYTYPE, "PEM");
      curl_easy_setopt(c.get(), CURLOPT_SSLKEY_BLOB, &key);
    }
  }
  curl_easy_setopt(c.get(), CURLOPT_URL, url.c_str());
  curl_easy_setopt(c.get(), CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c.get(), CURLOPT_CONNECTTIMEOUT, 10L);
  return c;
}

// Connecting failed before any answer (refused, TLS, certificate).
bool IsConnectFailure(CURLcode rc) {
  return rc == CURLE_COULDNT_CONNECT || rc == CURLE_COULDNT_RESOLVE_HOST || rc == CURLE_SSL_CONNECT_ERROR ||
         rc == CURLE_PEER_FAILED_VERIFICATION || rc == CURLE_SSL_CERTPROBLEM || rc == CURLE_SSL_CACERT_BADFILE ||
         rc == CURLE_OPERATION_TIMEDOUT;
}

}  // namespace

Status ApiClient::Response::Error() const {
  const json status = json::parse(body, nullptr, false);
  std::string message, reason;
  if (status.is_object() && status.value("kind", "") == "Status") {
    message = status.value("message", "");
    reason = status.value("reason", "");
  } else {
    message = "the server answered HTTP " + std::to_string(code) + (body.empty() ? "" : ": " + PrintableLine(body, 200));
  }
  const std::string line = "Error from server" + (reason.empty() ? "" : " (" + reason + ")") + ": " + message;
  switch (code) {
    case 404:
      return NotFound(line);
    case 409:
      return reason == "AlreadyExists" ? AlreadyExists(line) : Aborted(line);
    case 401:
      return Unauthenticated(line);
    case 403:
      return PermissionDenied(line);
    default:
      return FailedPrecondition(line);
  }
}

ApiClient::ApiClient(std::string socket_path) : endpoint_(Endpoint::Socket(std::move(socket_path))) {}

ApiClient::ApiClient(Endpoint endpoint) : endpoint_(std::move(endpoint)) {}

std::string ApiClient::Where() const {
  if (!over_tls()) return "the regdisk daemon at " + endpoint_.socket;
  return "the API server at " + PrintableLine(endpoint_.server, 200) + " (kubeconfig " +
         PrintableLine(endpoint_.kubeconfig, 200) + ")";
}

Status ApiClient::Unreachable(const std::string& reason) const {
  if (over_tls()) {
    return Unavailable("cannot reach " + Where() + ": " + reason +
                       "; is regdisk serve --listen running, and is this its kubeconfig?");
  }
  return Unavailable("cannot reach " + Where() + ": " + reason +
                     "; start it with regdisk serve or set --socket/REGDISK_SOCKET");
}

Result<ApiClient::Response> ApiClient::Do(const Request& request) const { return Stream(request, nullptr); }

Result<ApiClient::Response> ApiClient::Do(const std::string& method, const std::string& path) const {
  Request r;
  r.method = method;
  r.path = path;
  return Do(r);
}

ApiClient::Request ApiClient::WithBody(std::string method, std::string path, std::string body, std::string content_type) {
  Request r;
  r.method = std::move(method);
  r.path = std::move(path);
  r.body = std::move(body);
  r.content_type = std::move(content_type);
  return r;
}

Result<ApiClient::Response> ApiClient::Stream(const Request& request,
                                              const std::function<bool(std::string_view)>& sink) const {
  CurlPtr c = NewHandle(endpoint_, request.path);
  if (!c) return Internal("libcurl could not make a handle");
  Sink s;
  s.curl = c.get();
  if (sink) s.stream = &sink;
  SlistPtr headers(curl_slist_append(nullptr, ("Accept: " + request.accept).c_str()));
  if (over_tls() && !endpoint_.token.empty()) {
    headers.reset(curl_slist_append(headers.release(), ("Authorization: Bearer " + endpoint_.token).c_str()));
  }
  if (!request.body.empty() || request.method == "POST" || request.method == "PUT" || request.method == "PATCH") {
    headers.reset(curl_slist_append(headers.release(), ("Content-Type: " + request.content_type).c_str()));
    curl_easy_setopt(c.get(), CURLOPT_POSTFIELDS, request.body.data());
    curl_easy_setopt(c.get(), CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(request.body.size()));
  }
  curl_easy_setopt(c.get(), CURLOPT_CUSTOMREQUEST, request.method.c_str());
  if (request.method == "GET") curl_easy_setopt(c.get(), CURLOPT_HTTPGET, 1L);
  curl_easy_setopt(c.get(), CURLOPT_HTTPHEADER, headers.get());
  curl_easy_setopt(c.get(), CURLOPT_WRITEFUNCTION, &Write);
  curl_easy_setopt(c.get(), CURLOPT_WRITEDATA, &s);
  char errbuf[CURL_ERROR_SIZE] = {0};
  curl_easy_setopt(c.get(), CURLOPT_ERRORBUFFER, errbuf);
  CURLcode rc = curl_easy_perform(c.get());
  if (rc == CURLE_COULDNT_CONNECT && !over_tls()) return Unreachable(ConnectError(endpoint_.socket));
  Response r;
  curl_easy_getinfo(c.get(), CURLINFO_RESPONSE_CODE, &r.code);
  if (rc != CURLE_OK && !(rc == CURLE_WRITE_ERROR && s.stopped)) {
    if (r.code == 0 || IsConnectFailure(rc)) return Unreachable(errbuf[0] ? errbuf : curl_easy_strerror(rc));
    return Unavailable(Where() + " broke off the answer: " +
                       (errbuf[0] ? std::string(errbuf) : curl_easy_strerror(rc)));
  }
  char* type = nullptr;
  if (curl_easy_getinfo(c.get(), CURLINFO_CONTENT_TYPE, &type) == CURLE_OK && type) r.content_type = type;
  r.body = std::move(s.body);
  return r;
}

namespace {

// Waits until the connection's socket is ready for `events`.
Status WaitSocket(CURL* c, short events) {
  curl_socket_t sock = CURL_SOCKET_BAD;
  if (curl_easy_getinfo(c, CURLINFO_ACTIVESOCKET, &sock) != CURLE_OK || sock == CURL_SOCKET_BAD) {
    return Unavailable("the connection is gone");
  }
  pollfd p{sock, events, 0};
  if (::poll(&p, 1, 30000) <= 0) return DeadlineExceeded("the daemon did not answer within 30 s");
  return OkStatus();
}

}  // namespace

Result<ApiClient::Upgraded> ApiClient::Upgrade(const std::string& path) const {
  if (over_tls()) {
    return FailedPrecondition("a console goes over the daemon's unix socket only, not " + Where() +
                              "; run it on the node with --socket (or without --kubeconfig)");
  }
  CurlPtr c = NewHandle(endpoint_, path);
  if (!c) return Internal("libcurl could not make a handle");
  curl_easy_setopt(c.get(), CURLOPT_CONNECT_ONLY, 1L);
  CURLcode rc = curl_easy_perform(c.get());
  if (rc == CURLE_COULDNT_CONNECT) return Unreachable(ConnectError(endpoint_.socket));
  if (rc != CURLE_OK) return Unreachable(curl_easy_strerror(rc));
  const std::string head = "GET " + path +
                           " HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
                           "Accept: application/json\r\n\r\n";
  for (size_t sent = 0; sent < head.size();) {
    size_t n = 0;
    rc = curl_easy_send(c.get(), head.data() + sent, head.size() - sent, &n);
    if (rc == CURLE_AGAIN) {
      RETURN_IF_ERROR(WaitSocket(c.get(), POLLOUT));
      continue;
    }
    if (rc != CURLE_OK) return Unreachable(curl_easy_strerror(rc));
    sent += n;
  }
  // The answer's head, then (for an error) its body up to Content-Length
  // or the end of the connection.
  std::string in;
  size_t end = std::string::npos;
  bool closed = false;
  auto read_more = [&]() -> Status {
    char buf[4096];
    size_t n = 0;
    CURLcode r = curl_easy_recv(c.get(), buf, sizeof buf, &n);
    if (r == CURLE_AGAIN) return WaitSocket(c.get(), POLLIN);
    if (r != CURLE_OK) return Unavailable(std::string("reading the daemon's answer: ") + curl_easy_strerror(r));
    if (n == 0) closed = true;
    in.append(buf, n);
    if (in.size() > (1u << 20)) return ResourceExhausted("the daemon's answer is too long");
    return OkStatus();
  };
  while ((end = in.find("\r\n\r\n")) == std::string::npos) {
    if (closed) return Unavailable(Where() + " closed the connection before answering");
    RETURN_IF_ERROR(read_more());
  }
  Upgraded u;
  const std::string status_line = in.substr(0, in.find("\r\n"));
  // "HTTP/1.1 101 Switching Protocols"
  long code = status_line.size() > 12 ? std::strtol(status_line.c_str() + 9, nullptr, 10) : 0;
  if (code == 101) {
    curl_socket_t sock = CURL_SOCKET_BAD;
    curl_easy_getinfo(c.get(), CURLINFO_ACTIVESOCKET, &sock);
    u.upgraded = true;
    u.fd = static_cast<int>(sock);
    u.early = in.substr(end + 4);
    u.handle = std::shared_ptr<void>(c.release(), [](void* h) { curl_easy_cleanup(static_cast<CURL*>(h)); });
    return u;
  }
  std::string lower = in.substr(0, end);
  for (char& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  size_t length = std::string::npos;
  if (size_t at = lower.find("\r\ncontent-length:"); at != std::string::npos) {
    length = std::strtoull(lower.c_str() + at + 17, nullptr, 10);
  }
  while (!closed && (length == std::string::npos || in.size() - end - 4 < length)) RETURN_IF_ERROR(read_more());
  u.response.code = code;
  u.response.body = in.substr(end + 4, length);
  return u;
}

}  // namespace regdisk::api
