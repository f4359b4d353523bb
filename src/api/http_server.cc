#include "api/http_server.h"

#include <arpa/inet.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <thread>

#include "util/fs.h"
#include "util/log.h"
#include "util/text.h"

namespace regdisk::api {

namespace fs = std::filesystem;

std::string HttpRequest::Query(const std::string& name) const {
  auto it = query.find(name);
  return it == query.end() ? "" : it->second;
}

std::string HttpRequest::Header(const std::string& name) const {
  auto it = headers.find(name);
  return it == headers.end() ? "" : it->second;
}

HttpResponse HttpResponse::Json(int status, std::string body) {
  HttpResponse r;
  r.status = status;
  r.body = std::move(body);
  return r;
}

Result<std::pair<std::string, int>> ParseListenAddress(const std::string& text) {
  auto colon = text.rfind(':');
  if (colon == std::string::npos) {
    return InvalidArgument("--listen \"" + Printable(text) + "\" is not ADDRESS:PORT; use for example 127.0.0.1:6443");
  }
  std::string host = text.substr(0, colon);
  if (host.empty()) host = "0.0.0.0";
  in_addr addr{};
  if (inet_pton(AF_INET, host.c_str(), &addr) != 1) {
    return InvalidArgument("--listen \"" + Printable(text) + "\": \"" + Printable(host) +
                           "\" is not an IPv4 address; use for example 127.0.0.1:6443");
  }
  const std::string port_text = text.substr(colon + 1);
  int port = 0;
  bool ok = !port_text.empty() && port_text.size() <= 5 &&
            std::all_of(port_text.begin(), port_text.end(), [](unsigned char c) { return c >= '0' && c <= '9'; });
  if (ok) port = std::stoi(port_text);
  if (!ok || port > 65535) {
    return InvalidArgument("--listen \"" + Printable(text) + "\": the port must be a number from 0 to 65535");
  }
  return std::make_pair(host, port);
}

namespace {

// One listening endpoint: its daemon and whether it speaks TLS.
struct Listener {
  HttpServer::Impl* impl = nullptr;
  bool tls = false;
  MHD_Daemon* daemon = nullptr;
};

// Per-request state, from the first call of the access handler to the
// completion notice.
struct UpgradeState;

struct RequestState {
  std::string body;
  bool too_big = false;
  bool answered = false;
  // An upgrade's handler until libmicrohttpd calls it (or drops the
  // connection first): owned here, so neither case leaks it.
  std::shared_ptr<UpgradeState> upgrade;
};

// A stream as libmicrohttpd's content reader sees it.
struct StreamState {
  std::unique_ptr<HttpStream> stream;
  std::string pending;
  size_t offset = 0;
};

Result<UniqueFd> ListenUnix(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return InvalidArgument("--socket " + Printable(path) + ": the path is longer than " +
                           std::to_string(sizeof(addr.sun_path) - 1) + " bytes; choose a shorter one");
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  const fs::path parent = fs::path(path).parent_path();
  if (!parent.empty()) RETURN_IF_ERROR(MakeDirs(parent));
  UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return ErrnoStatus("socket(AF_UNIX)");
  struct stat st {};
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return FailedPrecondition("--socket " + Printable(path) + " exists and is not a socket; remove it or choose another path");
    }
    // A socket file: live (another server answers) or stale.
    UniqueFd probe(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (probe.valid() && connect(probe.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      return FailedPrecondition("--socket " + Printable(path) +
                                ": another server is listening there; stop it or choose another path");
    }
    if (unlink(path.c_str()) != 0 && errno != ENOENT) return ErrnoStatus("unlink " + Printable(path));
  }
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return ErrnoStatus("bind " + Printable(path));
  // Owner only, before listen(): no one can connect earlier.
  if (chmod(path.c_str(), 0600) != 0) return ErrnoStatus("chmod " + Printable(path));
  if (listen(fd.get(), 128) != 0) return ErrnoStatus("listen " + Printable(path));
  return fd;
}

Result<UniqueFd> ListenTcp(const std::string& text, int* port) {
  ASSIGN_OR_RETURN(auto host_port, ParseListenAddress(text));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(host_port.second));
  inet_pton(AF_INET, host_port.first.c_str(), &addr.sin_addr);
  UniqueFd fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return ErrnoStatus("socket(AF_INET)");
  int one = 1;
  setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return ErrnoStatus("--listen " + Printable(text) + ": bind");
  }
  if (listen(fd.get(), 128) != 0) return ErrnoStatus("--listen " + Printable(text) + ": listen");
  socklen_t len = sizeof(addr);
  if (getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) return ErrnoStatus("getsockname");
  *port = ntohs(addr.sin_port);
  return fd;
}

MHD_Result CollectHeader(void* cls, MHD_ValueKind, const char* key, const char* value) {
  auto* headers = static_cast<std::map<std::string, std::string>*>(cls);
  std::string name(key ? key : "");
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
  (*headers)[name] = value ? value : "";
  return MHD_YES;
}

MHD_Result CollectQuery(void* cls, MHD_ValueKind, const char* key, const char* value) {
  auto* query = static_cast<std::multimap<std::string, std::string>*>(cls);
  query->emplace(key ? key : "", value ? value : "");
  return MHD_YES;
}

ssize_t ReadStream(void* cls, uint64_t, char* buf, size_t max) {
  auto* s = static_cast<StreamState*>(cls);
  while (s->offset >= s->pending.size()) {
    Result<std::string> next = std::string();
    try {
      next = s->stream->Next();
    } catch (const std::exception& e) {  // never through libmicrohttpd's C frames
      log::Warn("api: a stream failed: {}", e.what());
      return MHD_CONTENT_READER_END_WITH_ERROR;
    }
    if (!next.ok()) return MHD_CONTENT_READER_END_WITH_ERROR;
    if (next->empty()) return MHD_CONTENT_READER_END_OF_STREAM;
    s->pending = std::move(*next);
    s->offset = 0;
  }
  size_t n = std::min(max, s->pending.size() - s->offset);
  std::memcpy(buf, s->pending.data() + s->offset, n);
  s->offset += n;
  return static_cast<ssize_t>(n);
}

void FreeStream(void* cls) { delete static_cast<StreamState*>(cls); }

// The upgraded connections that are still open, so that Stop() can wait
// for them: libmicrohttpd must not stop under one.
struct UpgradeTracker {
  std::mutex mu;
  std::condition_variable cv;
  int active = 0;  // guarded by mu

  void Begin() {
    std::lock_guard<std::mutex> lock(mu);
    ++active;
  }
  void End() {
    std::lock_guard<std::mutex> lock(mu);
    --active;
    cv.notify_all();
  }
  void WaitIdle() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [this] { return active == 0; });
  }
};

struct UpgradeState {
  std::function<void(int, const std::string&, const CancelToken&)> fn;
  UpgradeTracker* tracker = nullptr;
  const CancelToken* stop = nullptr;
};

// libmicrohttpd's upgrade callback: the 101 went out; the byte stream runs
// on a thread of its own so that the connection's thread stays free (on
// TLS it relays between the socketpair and the TLS session).
void OnUpgrade(void* cls, MHD_Connection*, void*, const char* extra_in, size_t extra_in_size, MHD_socket sock,
               MHD_UpgradeResponseHandle* urh) {
  // The thread takes what it needs: the state belongs to the request,
  // which libmicrohttpd may finish before the thread does.
  auto* state = static_cast<UpgradeState*>(cls);
  std::string early(extra_in ? extra_in : "", extra_in ? extra_in_size : 0);
  UpgradeTracker* tracker = state->tracker;
  const CancelToken* stop = state->stop;
  tracker->Begin();
  std::thread([fn = std::move(state->fn), tracker, stop, early = std::move(early), sock, urh] {
    try {
      fn(sock, early, *stop);
    } catch (const std::exception& e) {
      log::Warn("api: an upgraded connection failed: {}", e.what());
    }
    MHD_upgrade_action(urh, MHD_UPGRADE_ACTION_CLOSE);
    tracker->End();
  }).detach();
}

MHD_Result Queue(MHD_Connection* c, HttpResponse r, UpgradeTracker* tracker = nullptr, const CancelToken* stop = nullptr,
                 RequestState* request = nullptr) {
  MHD_Response* resp = nullptr;
  if (r.upgrade && tracker && stop && request) {
    request->upgrade = std::make_shared<UpgradeState>(UpgradeState{std::move(r.upgrade), tracker, stop});
    resp = MHD_create_response_for_upgrade(&OnUpgrade, request->upgrade.get());
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_UPGRADE, r.upgrade_protocol.c_str());
    MHD_Result ret = MHD_queue_response(c, MHD_HTTP_SWITCHING_PROTOCOLS, resp);
    MHD_destroy_response(resp);
    return ret;
  }
  if (r.stream) {
    auto* state = new StreamState{std::move(r.stream), "", 0};
    resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, ReadStream, state, FreeStream);
    if (!resp) {
      delete state;
      return MHD_NO;
    }
  } else {
    resp = MHD_create_response_from_buffer(r.body.size(), r.body.data(), MHD_RESPMEM_MUST_COPY);
    if (!resp) return MHD_NO;
  }
  MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, r.content_type.c_str());
  for (const auto& [k, v] : r.headers) MHD_add_response_header(resp, k.c_str(), v.c_str());
  MHD_Result ret = MHD_queue_response(c, static_cast<unsigned>(r.status), resp);
  MHD_destroy_response(resp);
  return ret;
}

std::string StatusBody(int code, const std::string& reason, const std::string& message) {
  // The shape of a Kubernetes metav1.Status, without a JSON library here.
  return R"({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":")" + message +
         R"(","reason":")" + reason + R"(","code":)" + std::to_string(code) + "}";
}

bool PeerAllowed(MHD_Connection* c) {
  const MHD_ConnectionInfo* info = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
  if (!info) return false;
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (getsockopt(info->connect_fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return false;
  return cred.uid == 0 || cred.uid == geteuid();
}

// Whether the TLS client presented a certificate chain that verifies
// against the trust list (the client CA libmicrohttpd loaded) for client
// authentication. The handshake already proved the client holds its key.
bool ClientCertVerified(MHD_Connection* c) {
  const MHD_ConnectionInfo* info = MHD_get_connection_info(c, MHD_CONNECTION_INFO_GNUTLS_SESSION);
  if (!info || !info->tls_session) return false;
  auto session = static_cast<gnutls_session_t>(info->tls_session);
  unsigned int listed = 0;
  if (gnutls_certificate_get_peers(session, &listed) == nullptr || listed == 0) return false;
  gnutls_typed_vdata_st purpose{};
  purpose.type = GNUTLS_DT_KEY_PURPOSE_OID;
  purpose.data = reinterpret_cast<unsigned char*>(const_cast<char*>(GNUTLS_KP_TLS_WWW_CLIENT));
  unsigned int status = 0;
  if (gnutls_certificate_verify_peers(session, &purpose, 1, &status) != GNUTLS_E_SUCCESS) return false;
  return status == 0;
}

}  // namespace

struct HttpServer::Impl {
  Options options;
  CancelToken stop;
  UniqueFd unix_fd;
  UniqueFd tcp_fd;
  Listener unix_listener;
  Listener tls_listener;
  UpgradeTracker upgrades;
  bool stopped = false;

  static MHD_Result Access(void* cls, MHD_Connection* c, const char* url, const char* method, const char*,
                           const char* upload_data, size_t* upload_size, void** con_cls);
  static void Completed(void*, MHD_Connection*, void** con_cls, MHD_RequestTerminationCode) {
    delete static_cast<RequestState*>(*con_cls);
    *con_cls = nullptr;
  }
  Status StartListener(Listener* l, int fd);
};

MHD_Result HttpServer::Impl::Access(void* cls, MHD_Connection* c, const char* url, const char* method, const char*,
                                    const char* upload_data, size_t* upload_size, void** con_cls) {
  auto* listener = static_cast<Listener*>(cls);
  Impl* self = listener->impl;
  auto* state = static_cast<RequestState*>(*con_cls);
  if (!state) {
    state = new RequestState;
    *con_cls = state;
    if (!listener->tls && !PeerAllowed(c)) {
      state->answered = true;
      return Queue(c, HttpResponse::Json(403, StatusBody(403, "Forbidden",
                                                        "the socket serves only its owner's user and root")));
    }
    const char* length = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (length && std::strtoull(length, nullptr, 10) > self->options.max_body_bytes) {
      state->answered = true;
      return Queue(c, HttpResponse::Json(413, StatusBody(413, "RequestEntityTooLarge",
                                                        "the request body is larger than " +
                                                            std::to_string(self->options.max_body_bytes) + " bytes")));
    }
    return MHD_YES;
  }
  if (*upload_size > 0) {
    if (!state->too_big && state->body.size() + *upload_size > self->options.max_body_bytes) {
      state->too_big = true;
      state->body.clear();
      state->body.shrink_to_fit();
    }
    if (!state->too_big) state->body.append(upload_data, *upload_size);
    *upload_size = 0;
    return MHD_YES;
  }
  if (state->answered) return MHD_YES;
  state->answered = true;
  if (state->too_big) {
    return Queue(c, HttpResponse::Json(413, StatusBody(413, "RequestEntityTooLarge",
                                                      "the request body is larger than " +
                                                          std::to_string(self->options.max_body_bytes) + " bytes")));
  }
  HttpRequest req;
  req.method = method ? method : "";
  req.path = url ? url : "";
  req.tls = listener->tls;
  req.client_cert_verified = listener->tls && !self->options.tls_client_ca_pem.empty() && ClientCertVerified(c);
  req.stop = &self->stop;
  req.body = std::move(state->body);
  if (const MHD_ConnectionInfo* info = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD)) {
    req.fd = info->connect_fd;
  }
  MHD_get_connection_values(c, MHD_HEADER_KIND, CollectHeader, &req.headers);
  MHD_get_connection_values(c, MHD_GET_ARGUMENT_KIND, CollectQuery, &req.query);
  HttpResponse resp;
  try {
    resp = self->options.handler(req);
  } catch (const std::exception& e) {
    log::Warn("api: {} {}: {}", Printable(req.method), Printable(req.path), e.what());
    resp = HttpResponse::Json(500, StatusBody(500, "InternalError", "internal error"));
  }
  return Queue(c, std::move(resp), &self->upgrades, &self->stop, state);
}

Status HttpServer::Impl::StartListener(Listener* l, int fd) {
  l->impl = this;
  unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_POLL | MHD_USE_ITC |
                   MHD_ALLOW_UPGRADE;
  std::vector<MHD_OptionItem> opts = {
      {MHD_OPTION_LISTEN_SOCKET, fd, nullptr},
      {MHD_OPTION_NOTIFY_COMPLETED, reinterpret_cast<intptr_t>(&Impl::Completed), nullptr},
      {MHD_OPTION_CONNECTION_LIMIT, static_cast<intptr_t>(options.max_connections), nullptr},
      {MHD_OPTION_CONNECTION_MEMORY_LIMIT, 128 * 1024, nullptr},
      {MHD_OPTION_CONNECTION_TIMEOUT, 300, nullptr},
  };
  if (l->tls) {
    flags |= MHD_USE_TLS;
    opts.push_back({MHD_OPTION_HTTPS_MEM_KEY, 0, const_cast<char*>(options.tls_key_pem.c_str())});
    opts.push_back({MHD_OPTION_HTTPS_MEM_CERT, 0, const_cast<char*>(options.tls_cert_pem.c_str())});
    if (!options.tls_client_ca_pem.empty()) {
      // Also makes libmicrohttpd ask each client for a certificate.
      opts.push_back({MHD_OPTION_HTTPS_MEM_TRUST, 0, const_cast<char*>(options.tls_client_ca_pem.c_str())});
    }
  }
  opts.push_back({MHD_OPTION_END, 0, nullptr});
  l->daemon = MHD_start_daemon(flags, 0, nullptr, nullptr, &Impl::Access, l, MHD_OPTION_ARRAY, opts.data(),
                               MHD_OPTION_END);
  if (!l->daemon) {
    return Internal(std::string("libmicrohttpd could not start the ") + (l->tls ? "TLS" : "unix socket") + " server");
  }
  return OkStatus();
}

Result<std::unique_ptr<HttpServer>> HttpServer::Start(Options options) {
  if (options.unix_socket.empty() && options.tls_listen.empty()) {
    return InvalidArgument("the API server needs a unix socket or a TLS address");
  }
  std::unique_ptr<HttpServer> server(new HttpServer);
  server->impl_ = std::make_unique<Impl>();
  Impl& impl = *server->impl_;
  impl.options = std::move(options);
  if (!impl.options.unix_socket.empty()) {
    ASSIGN_OR_RETURN(impl.unix_fd, ListenUnix(impl.options.unix_socket));
    impl.unix_listener.tls = false;
    RETURN_IF_ERROR(impl.StartListener(&impl.unix_listener, impl.unix_fd.get()));
    impl.unix_fd.release();  // libmicrohttpd closes it when it stops
  }
  if (!impl.options.tls_listen.empty()) {
    ASSIGN_OR_RETURN(impl.tcp_fd, ListenTcp(impl.options.tls_listen, &server->tcp_port_));
    impl.tls_listener.tls = true;
    RETURN_IF_ERROR(impl.StartListener(&impl.tls_listener, impl.tcp_fd.get()));
    impl.tcp_fd.release();
  }
  return server;
}

void HttpServer::Stop() {
  if (!impl_ || impl_->stopped) return;
  impl_->stopped = true;
  impl_->stop.Cancel("the API server is stopping");
  impl_->upgrades.WaitIdle();  // each watches `stop`
  if (impl_->unix_listener.daemon) {
    MHD_stop_daemon(impl_->unix_listener.daemon);
    impl_->unix_listener.daemon = nullptr;
    unlink(impl_->options.unix_socket.c_str());  // ours: it was bound by Start
  }
  if (impl_->tls_listener.daemon) {
    MHD_stop_daemon(impl_->tls_listener.daemon);
    impl_->tls_listener.daemon = nullptr;
  }
}

HttpServer::~HttpServer() { Stop(); }

}  // namespace regdisk::api
