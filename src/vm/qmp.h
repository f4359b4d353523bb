// A QEMU Machine Protocol client over QEMU's unix socket: the greeting,
// capability negotiation, then one command at a time. Events that arrive
// between replies are kept for the caller.
//
//   ASSIGN_OR_RETURN(QmpClient qmp, QmpClient::Connect(plan.qmp_socket, 2s));
//   ASSIGN_OR_RETURN(json status, qmp.Execute("query-status"));  // {"running":true,...}
//   RETURN_IF_ERROR(qmp.Execute("system_powerdown").status());
//
// Every read is bounded by the timeout given to Connect; a QEMU that does
// not answer in time is DeadlineExceeded. Replies are capped at 1 MiB.
#pragma once

#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "util/fs.h"
#include "util/status.h"

namespace regdisk::vm {

class QmpClient {
 public:
  static Result<QmpClient> Connect(const std::filesystem::path& socket, std::chrono::milliseconds timeout);

  // Runs `command` (with `arguments` unless null) and returns its "return"
  // value; a QMP error reply becomes FailedPrecondition with QEMU's
  // description.
  Result<nlohmann::json> Execute(std::string_view command, const nlohmann::json& arguments = nullptr);

  // Events received so far ({"event": "SHUTDOWN", "data": {...}, ...}),
  // oldest first; taking them empties the list.
  std::vector<nlohmann::json> TakeEvents() { return std::exchange(events_, {}); }

 private:
  explicit QmpClient(UniqueFd fd) : fd_(std::move(fd)) {}
  Result<nlohmann::json> ReadMessage();

  UniqueFd fd_;
  std::string buffer_;
  std::vector<nlohmann::json> events_;
};

}  // namespace regdisk::vm
