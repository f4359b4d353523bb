#include "api/server.h"

#include "api/credentials.h"
#include "api/kube_api.h"

namespace regdisk::api {

struct Server::Impl {
  std::unique_ptr<KubeApi> api;
  std::unique_ptr<HttpServer> http;
  std::string url;
  std::filesystem::path kubeconfig;
};

Result<std::unique_ptr<Server>> Server::Start(Options options) {
  if (!options.store) return InvalidArgument("the API server needs an object store");
  RETURN_IF_ERROR(KubeApi::EnsureDefaultNamespace(options.store));
  std::unique_ptr<Server> server(new Server);
  server->impl_ = std::make_unique<Impl>();
  Impl& impl = *server->impl_;
  Credentials creds;
  std::string host;
  if (!options.listen.empty()) {
    ASSIGN_OR_RETURN(auto host_port, ParseListenAddress(options.listen));
    host = host_port.first;
    ASSIGN_OR_RETURN(creds, LoadOrCreateCredentials(options.root / "api", host));
  }
  KubeApi::Options ao;
  ao.store = options.store;
  const bool cert_auth = options.auth == AuthMode::kClientCert;
  if (!cert_auth) ao.token = creds.token;
  ao.accept_client_cert = cert_auth;
  ao.metrics = options.metrics;
  ao.vmi_runtime = options.vmi_runtime;
  impl.api = std::make_unique<KubeApi>(std::move(ao));
  HttpServer::Options ho;
  ho.unix_socket = options.socket_path;
  ho.tls_listen = options.listen;
  ho.tls_cert_pem = creds.cert_pem;
  ho.tls_key_pem = creds.key_pem;
  if (cert_auth) ho.tls_client_ca_pem = creds.ca_cert_pem;
  ho.max_body_bytes = options.max_body_bytes;
  KubeApi* api = impl.api.get();
  ho.handler = [api](const HttpRequest& req) { return api->Handle(req); };
  ASSIGN_OR_RETURN(impl.http, HttpServer::Start(std::move(ho)));
  if (!options.listen.empty()) {
    const std::string client_host = host == "0.0.0.0" ? "127.0.0.1" : host;
    impl.url = "https://" + client_host + ":" + std::to_string(impl.http->tcp_port());
    impl.kubeconfig = options.root / "kubeconfig";
    RETURN_IF_ERROR(WriteKubeconfig(impl.kubeconfig, impl.url, creds, options.auth));
  }
  return server;
}

Server::~Server() { Stop(); }

void Server::Stop() {
  if (impl_ && impl_->http) impl_->http->Stop();
}

int Server::tls_port() const { return impl_->http ? impl_->http->tcp_port() : 0; }
std::string Server::url() const { return impl_->url; }
std::filesystem::path Server::kubeconfig() const { return impl_->kubeconfig; }

}  // namespace regdisk::api
