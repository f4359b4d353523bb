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

#include "image/progress.h"
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
  std::string registries_conf;  // --registries-conf
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
  bool compression_given = false;
  std::string format = "oci";
  std::vector<std::string> labels;
  std::string layout = "stream";  // build only: stream | chunked
  std::string chunk_size;         // build only, with --layout chunked
};

struct RunFlags {
  std::string file;
  std::chrono::milliseconds timeout{0};  // 0: no limit
  std::chrono::milliseconds grace{10000};
  std::string qemu;
  std::string accel = "auto";
  std::vector<std::string> publish;  // --publish
  std::string network;               // --network bridge=NAME
  std::string vnc;                   // --vnc
  bool lazy = true;                  // --lazy / --no-lazy (run)
};

struct LoginFlags {
  std::string registry;
  std::string username;
  bool password_stdin = false;
  bool get_login = false;
  bool all = false;  // logout
};

// Registry options from the global flags (and the test-only environment),
// registries.conf included (--registries-conf, CONTAINERS_REGISTRIES_CONF or
// the standard places).
Result<registry::ClientOptions> MakeClientOptions(const Globals& g);
// Reads a secret from stdin: after `prompt` on stderr and without echo when
// stdin is a terminal; one line otherwise.
std::string ReadSecret(const std::string& prompt);
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
// Blob progress on stderr for pull, copy and run, as podman shows it: on a
// terminal a bar redrawn in place ("Copying blob 9a8e8a62dd02 [====>---]
// 76.0MiB / 300.0MiB 355MiB/s"), otherwise one line per finished blob
// ("Copying blob 9a8e8a62dd02 done 300.0MiB", "... skipped: already
// exists"). Empty when quiet.
image::ProgressFn TerminalProgress(bool quiet);
// Sizes as podman's progress shows them: "300.0MiB", "512B".
std::string ProgressSize(uint64_t bytes);

// Image commands (image_commands.cc).
int RunCopy(const Globals& g, const std::string& from, const std::string& to, bool all);
int RunPull(const Globals& g, const std::string& ref, const std::string& path);
// pull --lazy (pull_lazy.cc): returns once the disk is served while a
// background copy of regdisk fills it. owner_fd >= 0: this is that copy
// (--lazy-owner-fd), reporting on the descriptor.
int RunPullLazy(const Globals& g, const std::string& ref, const std::string& path, int owner_fd);
struct ImagesFlags {
  std::string output = "text";  // text | json
  std::string format;           // Go template, one line per image
  bool quiet = false;           // -q: IDs only
  bool digests = false;         // a DIGEST column
  bool no_heading = false;
};
struct RmiFlags {
  std::vector<std::string> images;  // names or ID prefixes
  bool all = false;
  bool force = false;
};
struct InspectFlags {
  std::string image;
  bool raw = false;     // the manifest bytes as stored
  bool config = false;  // the config blob
  bool disk = false;    // the Disk object from the disk's header (ranged reads)
  bool no_tags = false;
  std::string format;   // Go template
  std::string path;     // the disk's path inside the image
};
int RunImages(const Globals& g, const ImagesFlags& f);
int RunRmi(const Globals& g, const RmiFlags& f);
int RunPrune(const Globals& g);
int RunFsck(const Globals& g, bool repair);
int RunInspect(const Globals& g, const InspectFlags& f);
int RunBuild(const Globals& g, const BuildFlags& f, const std::string& disk_file);

// Credentials (login_commands.cc).
int RunLogin(const Globals& g, const LoginFlags& f);
int RunLogout(const Globals& g, const LoginFlags& f);
// version and --version (version_command.cc): regdisk's version, the API
// versions it speaks and QEMU's; output is text or json.
int RunVersion(const std::string& output);
// regdisk's own version, from the CMake project.
const char* Version();

// VM commands (vm_commands.cc).
int RunValidate(const std::string& file, const std::string& output);
int RunRun(const Globals& g, const RunFlags& f);
int RunDomxml(const Globals& g, const RunFlags& f);

// The node daemon's API server (serve_command.cc).
struct ServeFlags {
  std::string socket = "/run/regdisk/regdisk.sock";  // --socket, env REGDISK_SOCKET; "" for none
  std::string listen;  // --listen ADDR:PORT for TLS; "" for none
  std::string auth = "token";  // --auth token|cert: what the TLS endpoint takes and the kubeconfig holds
  std::string qemu;    // --qemu: the QEMU binary for the node's VMs
  std::string accel = "auto";  // --accel auto|kvm|tcg
  std::string node_name;       // --node-name: status.nodeName (default: the host name)
  bool stop_vms = false;       // --stop-vms: stop every VM at exit (default: they keep running)
  bool api_only = false;       // --api-only: serve the API and run no VM or controller
  bool lazy = true;            // --lazy/--no-lazy: boot chunked images while they fill
};
int RunServe(const Globals& g, const ServeFlags& f);

// Client commands (client_commands.cc): kubectl's and virtctl's verbs
// against `regdisk serve` over its unix socket or, with a kubeconfig, its
// TLS endpoint (api/client.h).
struct ClientFlags {
  std::string socket = "/run/regdisk/regdisk.sock";  // --socket, env REGDISK_SOCKET
  std::string namespace_ = "default";                // -n, --namespace
  // --kubeconfig: talk TLS to the server it names (env REGDISK_KUBECONFIG
  // when neither --socket nor REGDISK_SOCKET is set; never KUBECONFIG);
  // "" for the socket.
  std::string kubeconfig;
  bool socket_set = false;     // --socket or REGDISK_SOCKET was given
  bool namespace_set = false;  // -n was given (else the kubeconfig context's)
};
struct GetFlags {
  std::string kind;
  std::vector<std::string> names;
  std::string output;    // "" (a table), wide, json, yaml or name
  std::string selector;  // -l
  std::string field_selector;  // --field-selector
  bool all_namespaces = false;  // -A, --all-namespaces
  bool watch = false;    // -w
};
struct DeleteFlags {
  std::vector<std::string> args;  // KIND NAME...
  std::string file;               // -f
  bool wait = true;               // --wait: until each object is gone (finalizers done)
  std::string cascade = "background";  // --cascade: background | foreground | orphan
};
int RunApply(const Globals& g, const ClientFlags& c, const std::string& file);
int RunGet(const Globals& g, const ClientFlags& c, const GetFlags& f);
int RunDelete(const Globals& g, const ClientFlags& c, const DeleteFlags& f);
int RunScale(const Globals& g, const ClientFlags& c, const std::string& kind, const std::string& name, int64_t replicas);
int RunLogs(const Globals& g, const ClientFlags& c, const std::string& vmi, bool follow);
int RunConsole(const Globals& g, const ClientFlags& c, const std::string& vmi);
// port [VM [PORT]]: a foreground `regdisk run` VM under --root first, then
// the daemon's VMI of that name; without VM, every foreground VM's ports.
int RunPortCommand(const Globals& g, const ClientFlags& c, const std::string& vm, const std::string& port);

}  // namespace regdisk::cli
