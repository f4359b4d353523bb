// HttpServer: HTTP/1.1 over a unix socket and, optionally, TLS on a TCP
// address, served by GNU libmicrohttpd (thread per connection). This layer
// knows nothing of Kubernetes: it parses nothing by hand, checks who is
// calling, bounds request bodies, and hands each complete request to one
// handler function, which answers with a whole body or a stream.
//
//   HttpServer::Options o;
//   o.unix_socket = "/run/regdisk/regdisk.sock";
//   o.handler = [](const HttpRequest& req) { return HttpResponse::Json(200, "{}"); };
//   ASSIGN_OR_RETURN(auto server, HttpServer::Start(std::move(o)));
//   ... server->tcp_port() ...   // the bound port (for ":0")
//
// Who may call:
//   - unix socket: created here with mode 0600 (a stale socket file is
//     replaced); each connection's peer is checked with SO_PEERCRED and
//     only the server's own uid or root is served (others get 403 before
//     the handler runs);
//   - TLS: the handler sees the Authorization header and whether the
//     client presented a certificate that tls_client_ca_pem signed (with
//     the clientAuth purpose, verified by GnuTLS), and decides (401).
//     Clients are asked for a certificate only when tls_client_ca_pem is
//     set; one that presents none, or another CA's, still gets its
//     request through to the handler, unverified.
// Bodies larger than max_body_bytes are refused with 413 (before they are
// read when the client sends Content-Length); the handler never sees them.
//
// Threads: the handler runs on the connection's thread, concurrently with
// other connections; a stream's Next() runs there too and may block.
// Stop() (and the destructor) cancels `stop`, which streams and upgraded
// connections must watch, waits for every upgraded connection to end and
// joins every connection thread.
//
// Upgrades: a response with `upgrade` set answers 101 Switching Protocols
// (with the `Upgrade` header the handler names, e.g. "tcp" as Docker's
// attach does) and then hands the raw connection to `upgrade`, on a thread
// of its own: a byte stream in both directions, no framing. It returns
// when either side is done, and the connection is closed. Only on the
// unix socket (on TLS the socket would be libmicrohttpd's plaintext side
// of a socketpair, which works the same way but is untested).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "util/cancel.h"
#include "util/status.h"

namespace regdisk::api {

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string path;    // URL path, percent-decoded by libmicrohttpd
  std::multimap<std::string, std::string> query;   // decoded query arguments
  std::map<std::string, std::string> headers;     // names lower-cased
  std::string body;
  bool tls = false;  // arrived on the TLS endpoint (else the unix socket)
  // TLS only: the client proved it holds a certificate issued by
  // Options::tls_client_ca_pem.
  bool client_cert_verified = false;
  int fd = -1;       // the connection's socket, for noticing a hung-up peer
  const CancelToken* stop = nullptr;  // cancelled when the server stops

  // The first value of a query argument, or "" when absent.
  std::string Query(const std::string& name) const;
  // A header by lower-case name, or "".
  std::string Header(const std::string& name) const;
};

// A stream of chunks (chunked transfer encoding). Next() blocks until it
// has bytes; returning "" ends the response normally, an error aborts the
// connection.
class HttpStream {
 public:
  virtual ~HttpStream() = default;
  virtual Result<std::string> Next() = 0;
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;
  std::unique_ptr<HttpStream> stream;  // when set, body is ignored
  // When set: 101, then the raw connection (see "Upgrades" above). `fd` is
  // the connection, `early` what the client sent after its request head,
  // `stop` the server's token. status, body and stream are ignored.
  std::function<void(int fd, const std::string& early, const CancelToken& stop)> upgrade;
  std::string upgrade_protocol = "tcp";

  static HttpResponse Json(int status, std::string body);
};

using HttpHandler = std::function<HttpResponse(const HttpRequest&)>;

class HttpServer {
 public:
  struct Options {
    std::string unix_socket;  // "" for none
    // TLS endpoint: "" for none; "127.0.0.1:6443", ":0" picks a free port.
    std::string tls_listen;
    std::string tls_cert_pem;
    std::string tls_key_pem;
    // When set, TLS clients are asked for a certificate and one this CA
    // issued sets HttpRequest::client_cert_verified.
    std::string tls_client_ca_pem;
    size_t max_body_bytes = 3 * 1024 * 1024;
    unsigned max_connections = 1000;
    HttpHandler handler;
  };

  // Binds and starts serving. Errors name the socket or address.
  static Result<std::unique_ptr<HttpServer>> Start(Options options);
  ~HttpServer();  // Stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  void Stop();
  int tcp_port() const { return tcp_port_; }  // 0 without TLS endpoint

  struct Impl;

 private:
  HttpServer() = default;
  std::unique_ptr<Impl> impl_;
  int tcp_port_ = 0;
};

// "127.0.0.1:6443" -> {"127.0.0.1", 6443}; ":0" -> {"0.0.0.0", 0}. Only
// IPv4 literals; InvalidArgument otherwise.
Result<std::pair<std::string, int>> ParseListenAddress(const std::string& text);

}  // namespace regdisk::api
