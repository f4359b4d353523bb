#include "util/status.h"

#include <cstring>

namespace regdisk {

std::string_view CodeName(Code code) {
  switch (code) {
    case Code::kOk: return "OK";
    case Code::kInvalidArgument: return "InvalidArgument";
    case Code::kNotFound: return "NotFound";
    case Code::kAlreadyExists: return "AlreadyExists";
    case Code::kUnauthenticated: return "Unauthenticated";
    case Code::kPermissionDenied: return "PermissionDenied";
    case Code::kFailedPrecondition: return "FailedPrecondition";
    case Code::kUnavailable: return "Unavailable";
    case Code::kDeadlineExceeded: return "DeadlineExceeded";
    case Code::kDataLoss: return "DataLoss";
    case Code::kResourceExhausted: return "ResourceExhausted";
    case Code::kNoSpace: return "NoSpace";
    case Code::kUnimplemented: return "Unimplemented";
    case Code::kInternal: return "Internal";
    case Code::kCancelled: return "Cancelled";
    case Code::kAborted: return "Aborted";
    case Code::kOutOfRange: return "OutOfRange";
  }
  return "Unknown";
}

Status Status::Annotate(std::string_view context) const& {
  if (ok()) return *this;
  return Status(code_, std::string(context) + ": " + message_);
}

Status Status::Annotate(std::string_view context) && {
  if (ok()) return std::move(*this);
  message_.insert(0, std::string(context) + ": ");
  return std::move(*this);
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  return message_;
}

Status ErrnoStatus(std::string_view what, int err) {
  Code code = Code::kInternal;
  switch (err) {
    case ENOENT: code = Code::kNotFound; break;
    case EEXIST: code = Code::kAlreadyExists; break;
    case EACCES:
    case EPERM: code = Code::kPermissionDenied; break;
    case ENOSPC:
    case EDQUOT: code = Code::kNoSpace; break;
    case EMFILE:
    case ENFILE:
    case ENOMEM: code = Code::kResourceExhausted; break;
    case EINVAL:
    case ENOTDIR:
    case EISDIR: code = Code::kInvalidArgument; break;
    default: break;
  }
  return Status(code, std::string(what) + ": " + std::strerror(err));
}

}  // namespace regdisk
