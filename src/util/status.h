// Status and Result<T>: the one error type of regdisk.
//
// A Status is either OK (cheap: no allocation) or carries a Code and a
// message. Messages are plain sentences meant for users; context is added as
// the error travels up with Annotate(), giving "pulling docker://x: fetching
// blob sha256:...: connection refused".
//
//   Result<int> ParsePort(std::string_view s);
//   ASSIGN_OR_RETURN(int port, ParsePort(text));
//   RETURN_IF_ERROR(WriteFile(path, data));
//
// Never put a credential or token into a Status message.
#pragma once

#include <cerrno>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace regdisk {

enum class Code {
  kOk = 0,
  kInvalidArgument,     // the caller's input is wrong (reference, flag, file)
  kNotFound,            // manifest, blob, tag, file missing
  kAlreadyExists,       // treated as success by idempotent operations
  kUnauthenticated,     // registry refused credentials
  kPermissionDenied,    // authenticated but not allowed
  kFailedPrecondition,  // state does not allow the operation
  kUnavailable,         // transient: network, 5xx, 429; retryable
  kDeadlineExceeded,    // an attempt took too long
  kDataLoss,            // digest or size mismatch, truncated data
  kResourceExhausted,   // a size or count cap was hit, or memory/fds ran out
  kNoSpace,             // the local file system is full (ENOSPC, EDQUOT):
                        // nobody's input is wrong; partial work is kept
  kUnimplemented,       // valid but unsupported (algorithm, media type)
  kInternal,            // a bug or an unexpected system failure
  kCancelled,           // the other side of a pipeline gave up
  kAborted,             // a concurrency conflict: a precondition on the
                        // current version (resourceVersion, uid) failed;
                        // re-read and retry (HTTP 409 Conflict)
  kOutOfRange,          // asked for history that is no longer kept, e.g.
                        // a watch from a compacted resourceVersion (HTTP 410)
};

std::string_view CodeName(Code code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }

  // Returns a copy whose message is "context: message". OK stays OK.
  Status Annotate(std::string_view context) const&;
  Status Annotate(std::string_view context) &&;

  std::string ToString() const;

 private:
  Code code_ = Code::kOk;
  std::string message_;
};

inline Status OkStatus() { return Status(); }
inline Status InvalidArgument(std::string m) { return {Code::kInvalidArgument, std::move(m)}; }
inline Status NotFound(std::string m) { return {Code::kNotFound, std::move(m)}; }
inline Status AlreadyExists(std::string m) { return {Code::kAlreadyExists, std::move(m)}; }
inline Status Unauthenticated(std::string m) { return {Code::kUnauthenticated, std::move(m)}; }
inline Status PermissionDenied(std::string m) { return {Code::kPermissionDenied, std::move(m)}; }
inline Status FailedPrecondition(std::string m) { return {Code::kFailedPrecondition, std::move(m)}; }
inline Status Unavailable(std::string m) { return {Code::kUnavailable, std::move(m)}; }
inline Status DeadlineExceeded(std::string m) { return {Code::kDeadlineExceeded, std::move(m)}; }
inline Status DataLoss(std::string m) { return {Code::kDataLoss, std::move(m)}; }
inline Status ResourceExhausted(std::string m) { return {Code::kResourceExhausted, std::move(m)}; }
inline Status NoSpace(std::string m) { return {Code::kNoSpace, std::move(m)}; }
inline Status Unimplemented(std::string m) { return {Code::kUnimplemented, std::move(m)}; }
inline Status Internal(std::string m) { return {Code::kInternal, std::move(m)}; }
inline Status Cancelled(std::string m) { return {Code::kCancelled, std::move(m)}; }
inline Status Aborted(std::string m) { return {Code::kAborted, std::move(m)}; }
inline Status OutOfRange(std::string m) { return {Code::kOutOfRange, std::move(m)}; }

// The single place where errno becomes a Status: "what: strerror(errno)".
Status ErrnoStatus(std::string_view what, int err = errno);

// Result<T> holds a T or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT
    if (std::get<Status>(v_).ok()) v_ = Status(Code::kInternal, "Result built from an OK status");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const& {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  Status status() && { return ok() ? Status() : std::get<Status>(std::move(v_)); }

  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T value_or(T fallback) const& { return ok() ? std::get<T>(v_) : std::move(fallback); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace regdisk

#define REGDISK_CONCAT_INNER(a, b) a##b
#define REGDISK_CONCAT(a, b) REGDISK_CONCAT_INNER(a, b)

// The status variable is named by line, so a RETURN_IF_ERROR inside a
// lambda inside another does not shadow the outer one.
#define RETURN_IF_ERROR(expr) RETURN_IF_ERROR_IMPL(REGDISK_CONCAT(_status_, __LINE__), expr)
#define RETURN_IF_ERROR_IMPL(st, expr)          \
  do {                                          \
    ::regdisk::Status st = (expr);              \
    if (!st.ok()) return st;                    \
  } while (0)

#define ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr)   \
  auto tmp = (expr);                            \
  if (!tmp.ok()) return std::move(tmp).status(); \
  lhs = std::move(tmp).value()

#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL(REGDISK_CONCAT(_res_, __LINE__), lhs, expr)
