#include "api/errors.h"

namespace regdisk::api {

using json = nlohmann::json;

json ApiError::ToJson() const {
  json j = {{"kind", "Status"},   {"apiVersion", "v1"}, {"metadata", json::object()}, {"status", "Failure"},
            {"message", message}, {"reason", reason},   {"code", code}};
  if (!details.is_null()) j["details"] = details;
  return j;
}

ApiError ApiError::BadRequest(std::string message) { return {400, "BadRequest", std::move(message)}; }

ApiError ApiError::NotFound(const Resource& r, const std::string& name) {
  return {404, "NotFound", r.qualified() + " \"" + name + "\" not found",
          {{"name", name}, {"group", r.group}, {"kind", r.plural}}};
}

ApiError ApiError::MethodNotAllowed(std::string message) { return {405, "MethodNotAllowed", std::move(message)}; }

ApiError ApiError::UnsupportedMediaType(const std::string& content_type) {
  return {415, "UnsupportedMediaType", "the body of the request was in an unknown format - accepted media types include: "
                                       "application/json, application/merge-patch+json, application/json-patch+json, "
                                       "application/strategic-merge-patch+json (got \"" + content_type + "\")"};
}

ApiError ApiError::Unauthorized() { return {401, "Unauthorized", "Unauthorized"}; }

ApiError ApiError::Expired(std::string message) { return {410, "Expired", std::move(message)}; }

ApiError ApiError::FromStatus(const Status& st, const Resource& r, const std::string& name) {
  json details = {{"name", name}, {"group", r.group}, {"kind", r.plural}};
  switch (st.code()) {
    case Code::kNotFound:
      return NotFound(r, name);
    case Code::kAlreadyExists:
      return {409, "AlreadyExists", r.qualified() + " \"" + name + "\" already exists", details};
    case Code::kAborted:
      return {409, "Conflict",
              "Operation cannot be fulfilled on " + r.qualified() + " \"" + name +
                  "\": the object has been modified; please apply your changes to the latest version and try again",
              details};
    case Code::kFailedPrecondition:  // the store's: a create under an owner missing or being deleted
      return {409, "Conflict", "Operation cannot be fulfilled on " + r.qualified() + " \"" + name + "\": " + st.message(),
              details};
    case Code::kOutOfRange:
      return Expired(st.message());
    case Code::kInvalidArgument:
      return BadRequest(st.message());
    default:
      return {500, "InternalError", "Internal error occurred: " + st.message()};
  }
}

}  // namespace regdisk::api
