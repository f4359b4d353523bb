// api::Server: the node daemon's API server, the one thing the daemon
// starts from src/api. It serves api/kube_api.h over the unix socket and,
// when asked, over TLS, with credentials kept under the root.
//
//   ASSIGN_OR_RETURN(auto store, state::ObjectStore::Open(root / "state.db"));
//   ASSIGN_OR_RETURN(auto api, api::Server::Start({.store = store.get(), .root = root,
//                                                  .socket_path = "/run/regdisk/regdisk.sock",
//                                                  .listen = "127.0.0.1:6443"}));
//   ... run the controllers against the same store ...
//   api->Stop();  // or destroy it; before the store
//
// Start creates the "default" namespace if missing and, with `listen`:
// ROOT/api/{ca,tls,client}.{crt,key} and ROOT/api/token (generated once,
// 0600; api/credentials.h) and ROOT/kubeconfig (0600, rewritten at every
// start with the bound port, so "127.0.0.1:0" works, and with the
// credential `auth` names). With kClientCert the endpoint accepts only a
// certificate the CA issued, with kToken only the token. The server only reads and writes the store; it
// runs no controller. The store must outlive the server.
#pragma once

#include <filesystem>
#include <functional>
#include <memory>
#include <string>

#include "api/credentials.h"
#include "api/http_server.h"
#include "api/subresources.h"
#include "state/object_store.h"
#include "util/status.h"

namespace regdisk::api {

class Server {
 public:
  struct Options {
    state::ObjectStore* store = nullptr;
    std::filesystem::path root;  // for ROOT/api and ROOT/kubeconfig
    std::string socket_path;     // "" for no unix socket
    std::string listen;          // "" for no TLS endpoint; "ADDR:PORT"
    // What the TLS endpoint accepts and the kubeconfig carries: the bearer
    // token, or the client certificate (api/credentials.h).
    AuthMode auth = AuthMode::kToken;
    size_t max_body_bytes = 3 * 1024 * 1024;
    // GET /metrics (Prometheus text); unset: not served.
    std::function<std::string()> metrics;
    // A VMI's console socket and log, for the console and log
    // subresources (api/subresources.h); unset: they answer 400.
    VmiRuntimeFn vmi_runtime;
  };

  static Result<std::unique_ptr<Server>> Start(Options options);
  ~Server();
  void Stop();

  int tls_port() const;  // 0 without TLS
  std::string url() const;  // "https://127.0.0.1:PORT", "" without TLS
  std::filesystem::path kubeconfig() const;  // "" without TLS

 private:
  Server() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace regdisk::api
