#include "api/subresources.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>

#include <nlohmann/json.hpp>

#include "api/errors.h"
#include "api/resources.h"
#include "util/fs.h"

namespace regdisk::api {

namespace {

using json = nlohmann::json;

HttpResponse Reply(const ApiError& e) {
  return HttpResponse::Json(e.code, e.ToJson().dump(-1, ' ', false, json::error_handler_t::replace));
}

std::string PhaseOf(const json& vmi) {
  if (!vmi.contains("status") || !vmi["status"].is_object()) return "Pending";
  std::string phase = vmi["status"].value("phase", "");
  return phase.empty() ? "Pending" : phase;
}

// Writes all of `data`; false when the peer is gone.
bool SendAll(int fd, const char* data, size_t size) {
  while (size > 0) {
    ssize_t n = ::send(fd, data, size, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

Result<UniqueFd> ConnectUnix(const std::filesystem::path& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.string().size() >= sizeof addr.sun_path) return InvalidArgument("the console socket path is too long");
  std::memcpy(addr.sun_path, path.c_str(), path.string().size());
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return ErrnoStatus("socket(AF_UNIX)");
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    return ErrnoStatus("connecting to the VM's console");
  }
  return fd;
}

// Copies bytes both ways between the client and QEMU's console until one
// side closes or the server stops.
void Bridge(int client, int console, const std::string& early, const CancelToken& stop) {
  if (!early.empty() && !SendAll(console, early.data(), early.size())) return;
  char buf[16 * 1024];
  for (;;) {
    pollfd fds[3] = {{client, POLLIN, 0}, {console, POLLIN, 0}, {stop.poll_fd(), POLLIN, 0}};
    int n = ::poll(fds, stop.poll_fd() >= 0 ? 3 : 2, 500);
    if (n < 0 && errno != EINTR) return;
    if (stop.cancelled()) return;
    for (int i = 0; i < 2; ++i) {
      if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      ssize_t got = ::recv(fds[i].fd, buf, sizeof buf, 0);
      if (got < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (got <= 0) return;
      if (!SendAll(i == 0 ? console : client, buf, static_cast<size_t>(got))) return;
    }
  }
}

// The log file as chunks; with follow, also what is appended later, for as
// long as `running` says the VMI's QEMU runs.
class LogStream : public HttpStream {
 public:
  LogStream(UniqueFd file, bool follow, std::function<bool()> running, const HttpRequest& req)
      : file_(std::move(file)), follow_(follow), running_(std::move(running)), stop_(req.stop), peer_(req.fd) {}

  Result<std::string> Next() override {
    std::string buf(64 * 1024, '\0');
    for (;;) {
      ssize_t n = ::read(file_.get(), buf.data(), buf.size());
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return ErrnoStatus("reading the console log");
      if (n > 0) {
        buf.resize(static_cast<size_t>(n));
        return buf;
      }
      if (!follow_ || ended_) return std::string();
      // At the end of the file: wait for more, checking now and then
      // whether QEMU is gone (then one last read drains the rest).
      pollfd fds[2] = {{stop_ ? stop_->poll_fd() : -1, POLLIN, 0}, {peer_, POLLRDHUP, 0}};
      ::poll(fds, 2, 250);
      if (stop_ && stop_->cancelled()) return std::string();
      if (fds[1].revents & (POLLRDHUP | POLLHUP | POLLERR)) return Cancelled("the client hung up");
      if (++waits_ % 4 == 0 && !running_()) ended_ = true;
    }
  }

 private:
  UniqueFd file_;
  bool follow_;
  std::function<bool()> running_;
  const CancelToken* stop_;
  int peer_;
  bool ended_ = false;
  unsigned waits_ = 0;
};

json PortsOf(const json& vmi) {
  const json& meta = vmi["metadata"];
  if (meta.contains("annotations") && meta["annotations"].is_object() &&
      meta["annotations"].contains(kPublishedPortsAnnotation) && meta["annotations"][kPublishedPortsAnnotation].is_string()) {
    json ports = json::parse(meta["annotations"][kPublishedPortsAnnotation].get<std::string>(), nullptr, false);
    if (ports.is_array()) return ports;
  }
  return json::array();
}

}  // namespace

HttpResponse HandleVmiSubresource(const HttpRequest& req, state::ObjectStore* store, const VmiRuntimeFn& runtime,
                                  const std::string& ns, const std::string& name, const std::string& sub) {
  const Resource* r = FindResource("kubevirt.io", "v1", "virtualmachineinstances");
  if (sub != "console" && sub != "log" && sub != "ports") {
    return Reply({404, "NotFound", "the server could not find the requested resource", json::object()});
  }
  if (req.method != "GET") return Reply(ApiError::MethodNotAllowed("the " + sub + " subresource takes GET"));
  Result<json> vmi = store->Get(kVmiKey, ns, name);
  if (!vmi.ok()) return Reply(ApiError::FromStatus(vmi.status(), *r, name));
  const std::string uid = (*vmi)["metadata"].value("uid", "");
  if (sub == "ports") {
    return HttpResponse::Json(200, json({{"kind", "PublishedPortList"}, {"apiVersion", "regdisk.io/v1"},
                                         {"ports", PortsOf(*vmi)}}).dump());
  }
  const VmiRuntime rt = runtime ? runtime(ns, name, uid) : VmiRuntime{};
  if (sub == "log") {
    auto file = rt.log_file.empty() ? Result<UniqueFd>(NotFound("")) : OpenFile(rt.log_file, O_RDONLY | O_NOFOLLOW);
    if (!file.ok()) {
      return Reply(ApiError::BadRequest("VirtualMachineInstance \"" + name + "\" has no console log yet (phase " +
                                        PhaseOf(*vmi) + ")"));
    }
    HttpResponse resp;
    resp.content_type = "text/plain; charset=utf-8";
    std::function<bool()> running = [runtime, ns, name, uid] { return !runtime(ns, name, uid).console_socket.empty(); };
    resp.stream = std::make_unique<LogStream>(std::move(*file), req.Query("follow") == "true" || req.Query("follow") == "1",
                                              std::move(running), req);
    return resp;
  }
  // console
  std::string upgrade = req.Header("upgrade");
  if (upgrade.empty()) {
    return Reply(ApiError::BadRequest("the console is a connection upgrade: send Connection: Upgrade and Upgrade: tcp"));
  }
  if (rt.console_socket.empty()) {
    return Reply(ApiError::BadRequest("Unable to connect to VirtualMachineInstance \"" + name + "\" because phase is " +
                                      PhaseOf(*vmi) + " instead of Running"));
  }
  Result<UniqueFd> console = ConnectUnix(rt.console_socket);
  if (!console.ok()) {
    return Reply({500, "InternalError", "Internal error occurred: " + console.status().message()});
  }
  HttpResponse resp;
  auto shared = std::make_shared<UniqueFd>(std::move(*console));
  resp.upgrade = [shared](int fd, const std::string& early, const CancelToken& stop) {
    Bridge(fd, shared->get(), early, stop);
  };
  return resp;
}

}  // namespace regdisk::api
