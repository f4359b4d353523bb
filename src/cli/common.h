// What the commands share: global flags, the flag structs CLI11 fills,
// and how a Status becomes an exit code. Each Run* function turns flags
// into library calls and returns the process's exit code.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "registry/client.h"
#include "store/unpack.h"
#include "util/cancel.h"
#include "util/status.h"

namespace regdisk::cli {

struct Globals {
  std::string root;
  std::string tls_verify;  // "", "true" or "false"
  std::string creds;
  std::string authfile;
  std::string cert_dir;
  std::string platform = "linux/amd64";
  std::string max_disk_size = "1Ti";  // a Kubernetes quantity
  bool verbose = false;        // -v: --log-level debug
  std::string log_level = "warn";
  bool quiet = false;          // -q: no progress, no informational lines
  // Cancelled by SIGINT, SIGTERM or SIGHUP (see CancelOnSignals).
  std::shared_ptr<CancelToken> cancel = std::make_shared<CancelToken>();
};

struct BuildFlags {
  std::string tag;
  std::string base;
  std::string name;
  std::string compression = "gzip";
  std::string format = "oci";
  std::vector<std::string> labels;
};

struct RunFlags {
  std::string file;
  std::chrono::milliseconds timeout{0};  // 0: no limit
  std::chrono::milliseconds grace{10000};
  std::string qemu;
  std::string accel = "auto";
};

// Registry options from the global flags (and the test-only environment).
Result<registry::ClientOptions> MakeClientOptions(const Globals& g);
// Blocks SIGINT, SIGTERM and SIGHUP and cancels `token` when the first
// arrives ("interrupted" or "terminated"), from a thread of its own; a
// second one ends the process at once. Only for commands whose work checks
// the token (the others keep the default: a signal ends them). Call before
// any other thread starts, so that all inherit the mask.
void CancelOnSignals(std::shared_ptr<CancelToken> token);
// The line (without "regdisk: ") CancelOnSignals prints on stderr when the
// first signal arrives, saying what stopping means now; none by default.
void SetStopNotice(std::string notice);
// The signal that cancelled the token of CancelOnSignals; 0 before one.
int StopSignal();
// "10s", "1m30s", "250ms": a duration as --grace and --timeout take them.
std::string FormatDuration(std::chrono::milliseconds d);
// What a pull may write, from --max-disk-size.
Result<store::DiskTree::Limits> MakeDiskLimits(const Globals& g);
// Prints "regdisk: error: MESSAGE" (control characters escaped, length
// bounded); returns 2 for bad input, 130 for an operation cancelled by a
// signal, else 1.
int Fail(const Status& st);
// A pull progress reporter for stderr when it is a terminal and -q is not
// given, else empty.
std::function<void(size_t layer, size_t layers, uint64_t done, uint64_t total)> TerminalProgress();

// Image commands (image_commands.cc).
int RunCopy(const Globals& g, const std::string& from, const std::string& to, bool all);
int RunPull(const Globals& g, const std::string& ref, const std::string& path);
int RunImages(const Globals& g, const std::string& output);
int RunRemove(const Globals& g, const std::vector<std::string>& refs, bool prune);
int RunFsck(const Globals& g, bool repair);
int RunInspect(const Globals& g, const std::string& ref, bool raw, bool disk, const std::string& path);
int RunBuild(const Globals& g, const BuildFlags& f, const std::string& disk_file);

// version and --version (version_command.cc): regdisk's version, the API
// versions it speaks and QEMU's; output is text or json.
int RunVersion(const std::string& output);
// regdisk's own version, from the CMake project.
const char* Version();

// VM commands (vm_commands.cc).
int RunValidate(const std::string& file, const std::string& output);
int RunRun(const Globals& g, const RunFlags& f);
int RunDomxml(const Globals& g, const RunFlags& f);

}  // namespace regdisk::cli
