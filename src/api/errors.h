// Kubernetes metav1.Status errors: the JSON body and HTTP code an API error
// answers with, and the mapping from regdisk's Status codes.
//
//   ApiError e = ApiError::NotFound(resource, "web");
//   return Reply(e);  // 404 {"kind":"Status",...,"reason":"NotFound",...}
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "api/resources.h"
#include "util/status.h"

namespace regdisk::api {

struct ApiError {
  int code = 500;
  std::string reason;   // metav1.StatusReason: "NotFound", "Invalid", ...
  std::string message;
  nlohmann::json details = nullptr;  // metav1.StatusDetails, when known

  nlohmann::json ToJson() const;

  static ApiError BadRequest(std::string message);
  static ApiError NotFound(const Resource& r, const std::string& name);
  static ApiError MethodNotAllowed(std::string message);
  static ApiError UnsupportedMediaType(const std::string& content_type);
  static ApiError Unauthorized();
  static ApiError Expired(std::string message);  // 410 Gone
  // A store or library error about object `name` of `r`: NotFound 404,
  // AlreadyExists 409, Aborted 409 Conflict, OutOfRange 410, InvalidArgument
  // 400, anything else 500 (with the message: it holds no secrets).
  static ApiError FromStatus(const Status& st, const Resource& r, const std::string& name);
};

}  // namespace regdisk::api
