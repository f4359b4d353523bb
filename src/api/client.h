// ApiClient: what regdisk's client commands (apply, get, delete, scale,
// logs, console, port) use to talk to `regdisk serve`: over its unix
// socket, or over TLS to the server a kubeconfig names (api/kubeconfig.h),
// with the kubeconfig's CA and its token or client certificate. HTTP is
// libcurl's (CURLOPT_UNIX_SOCKET_PATH, or https with the PEM blobs); this
// class only builds paths' requests and turns answers into Status.
//
//   ApiClient api("/run/regdisk/regdisk.sock");   // or ApiClient(endpoint)
//   ASSIGN_OR_RETURN(ApiClient::Response r, api.Do("GET", "/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstances"));
//   if (!r.ok()) return r.Error();   // "Error from server (NotFound): ..."
//
// Errors:
//   - the socket is missing, refuses or is not ours to use: Unavailable
//     "cannot reach the regdisk daemon at SOCKET: REASON; start it with
//     regdisk serve or set --socket/REGDISK_SOCKET"; for a kubeconfig's
//     server (refused, or its certificate not the CA's): "cannot reach
//     the API server at URL (kubeconfig FILE): REASON";
//   - an answer with an HTTP error code is a Response, not an error: its
//     Error() turns the metav1.Status body into one line as kubectl prints
//     it, with a code that says what happened (NotFound, AlreadyExists,
//     Aborted for a conflict, FailedPrecondition otherwise; never
//     InvalidArgument, which the CLI keeps for bad usage).
//
// Thread safety: one ApiClient per thread (each call has its own handle).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "api/kubeconfig.h"
#include "util/fs.h"
#include "util/status.h"

namespace regdisk::api {

class ApiClient {
 public:
  struct Response {
    long code = 0;
    std::string body;
    std::string content_type;
    bool ok() const { return code >= 200 && code < 300; }
    // The server's metav1.Status message as one line, with a Status code
    // (see above); a non-Status body is quoted (bounded).
    Status Error() const;
  };

  struct Request {
    std::string method = "GET";
    std::string path;  // "/apis/...?query", already escaped
    std::string body;
    std::string content_type = "application/json";
    std::string accept = "application/json";
  };

  explicit ApiClient(std::string socket_path);
  explicit ApiClient(Endpoint endpoint);

  // One request, the whole answer in memory.
  Result<Response> Do(const Request& request) const;
  Result<Response> Do(const std::string& method, const std::string& path) const;
  // A request with a body (POST, PUT, PATCH).
  static Request WithBody(std::string method, std::string path, std::string body,
                          std::string content_type = "application/json");

  // A request whose 2xx answer is streamed to `sink` as it arrives (watch,
  // log with follow); `sink` returns false to stop early (OK). An error
  // answer is collected and returned as a Response instead. Returns the
  // response (its body empty when it was streamed).
  Result<Response> Stream(const Request& request, const std::function<bool(std::string_view)>& sink) const;

  // A raw byte stream after an HTTP/1.1 upgrade (`Upgrade: tcp`, see
  // api/subresources.h "console"). libcurl 7.88 has no upgrade API (its
  // websockets are experimental and off in Debian's build), so libcurl
  // connects (CURLOPT_CONNECT_ONLY) and the fixed request head is sent
  // through it; the status line and headers are read back. On 101 the
  // connection's socket is the stream; otherwise the answer as a Response
  // (`upgraded` false). Over the unix socket only (a TLS connection's
  // socket carries TLS records): FailedPrecondition otherwise.
  struct Upgraded {
    bool upgraded = false;
    Response response;  // when not upgraded
    int fd = -1;        // when upgraded: read and write it; owned by the handle
    std::string early;  // bytes the server sent after its head
    std::shared_ptr<void> handle;  // keeps the connection open
  };
  Result<Upgraded> Upgrade(const std::string& path) const;

  const std::string& socket_path() const { return endpoint_.socket; }
  bool over_tls() const { return endpoint_.socket.empty(); }

 private:
  Status Unreachable(const std::string& reason) const;
  std::string Where() const;
  Endpoint endpoint_;
};

}  // namespace regdisk::api
