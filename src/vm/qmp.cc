#include "vm/qmp.h"

#include <sys/socket.h>
#include <sys/un.h>

#include <cerrno>
#include <cstring>

namespace regdisk::vm {

namespace {
constexpr size_t kMaxMessage = 1 << 20;
}

Result<QmpClient> QmpClient::Connect(const std::filesystem::path& socket, std::chrono::milliseconds timeout) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket.string().size() >= sizeof addr.sun_path) return InvalidArgument("the QMP socket path is too long: " + socket.string());
  std::strcpy(addr.sun_path, socket.c_str());
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return ErrnoStatus("opening a QMP socket");
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    return ErrnoStatus("connecting to QMP at " + socket.string());
  }
  timeval tv{static_cast<time_t>(timeout.count() / 1000), static_cast<suseconds_t>((timeout.count() % 1000) * 1000)};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  QmpClient client(std::move(fd));
  ASSIGN_OR_RETURN(nlohmann::json greeting, client.ReadMessage());
  if (!greeting.contains("QMP")) return Internal("QMP at " + socket.string() + " did not greet as QEMU does");
  RETURN_IF_ERROR(client.Execute("qmp_capabilities").status());
  return client;
}

Result<nlohmann::json> QmpClient::ReadMessage() {
  for (;;) {
    size_t nl = buffer_.find('\n');
    if (nl != std::string::npos) {
      std::string line = buffer_.substr(0, nl);
      buffer_.erase(0, nl + 1);
      if (line.find_first_not_of(" \r\t") == std::string::npos) continue;
      nlohmann::json message = nlohmann::json::parse(line, nullptr, false);
      if (!message.is_object()) return Internal("QMP sent a message that is not a JSON object");
      return message;
    }
    if (buffer_.size() > kMaxMessage) return ResourceExhausted("a QMP message is larger than 1 MiB");
    char chunk[8192];
    ssize_t n = ::recv(fd_.get(), chunk, sizeof chunk, 0);
    if (n > 0) {
      buffer_.append(chunk, static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return DeadlineExceeded("QEMU did not answer on QMP in time");
    if (n == 0) return Unavailable("QEMU closed its QMP connection");
    return ErrnoStatus("reading from QMP");
  }
}

Result<nlohmann::json> QmpClient::Execute(std::string_view command, const nlohmann::json& arguments) {
  nlohmann::json request = {{"execute", command}};
  if (!arguments.is_null()) request["arguments"] = arguments;
  RETURN_IF_ERROR(WriteAll(fd_.get(), request.dump() + "\n"));
  for (;;) {
    ASSIGN_OR_RETURN(nlohmann::json message, ReadMessage());
    if (message.contains("event")) {
      events_.push_back(std::move(message));
      continue;
    }
    if (message.contains("return")) return message["return"];
    if (message.contains("error")) {
      const auto& e = message["error"];
      std::string desc = e.is_object() ? e.value("desc", std::string("unknown error")) : "unknown error";
      return FailedPrecondition("QMP " + std::string(command) + ": " + desc);
    }
  }
}

}  // namespace regdisk::vm
