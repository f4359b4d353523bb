// regdisk serve: the node daemon's API over the object store
// (ROOT/state.db), on a unix socket and optionally TLS, until SIGTERM or
// SIGINT. The API server itself is src/api/server.h.
#include <fcntl.h>
#include <poll.h>
#include <sys/file.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "api/server.h"
#include "cli/common.h"
#include "daemon/instance.h"
#include "daemon/node.h"
#include "state/object_store.h"
#include "util/fs.h"
#include "util/log.h"

namespace regdisk::cli {

namespace fs = std::filesystem;

namespace {

// Where a VMI's console and log are, for the API's subresources: its run
// directory's record (vm.json, see daemon/instance.h) while its QEMU holds
// the directory's lock; afterwards only the log, which outlives the run.
api::VmiRuntime FindVmiRuntime(const fs::path& root, const std::string& ns, const std::string& name,
                               const std::string& uid) {
  api::VmiRuntime rt;
  rt.log_file = root / "logs" / (ns + "_" + name + ".log");
  if (uid.empty()) return rt;
  const fs::path dir = daemon::InstanceDir(root, uid);
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd.valid() || ::flock(fd.get(), LOCK_SH | LOCK_NB) == 0) return rt;  // not locked: no QEMU
  auto text = ReadFileCapped(dir / "vm.json", 1 << 20);
  if (!text.ok()) return rt;  // still starting
  nlohmann::json j = nlohmann::json::parse(*text, nullptr, false);
  if (!j.is_object() || j.value("namespace", "") != ns || j.value("name", "") != name) return rt;
  if (std::string log = j.value("logFile", ""); !log.empty()) rt.log_file = log;
  rt.console_socket = j.value("consoleSocket", "");
  return rt;
}

}  // namespace

int RunServe(const Globals& g, const ServeFlags& f) {
  const fs::path root = g.root;
  if (f.socket.empty() && f.listen.empty()) {
    return Fail(InvalidArgument("regdisk serve needs a --socket path or a --listen address"));
  }
  if (Status st = MakeDirs(root / "locks"); !st.ok()) return Fail(st.Annotate("creating the root " + root.string()));
  // One daemon per root: two would both run every VM.
  Result<std::optional<FileLock>> serving = FileLock::TryAcquire(root / "locks" / "serve");
  if (!serving.ok()) return Fail(serving.status());
  if (!*serving) {
    std::string pid = ReadFileCapped(root / "locks" / "serve", 64).value_or("");
    return Fail(FailedPrecondition("another regdisk serve" + (pid.empty() ? "" : " (pid " + pid + ")") + " is using " +
                                   root.string() + "; stop it first, or give this one another --root"));
  }
  if (::ftruncate((*serving)->fd(), 0) == 0) (void)WriteAll((*serving)->fd(), std::to_string(::getpid()));
  Result<std::unique_ptr<state::ObjectStore>> store = state::ObjectStore::Open(root / "state.db");
  if (!store.ok()) return Fail(store.status().Annotate("opening " + (root / "state.db").string()));
  api::Server::Options options;
  options.store = store->get();
  options.root = root;
  options.socket_path = f.socket;
  options.listen = f.listen;
  options.auth = f.auth == "cert" ? api::AuthMode::kClientCert : api::AuthMode::kToken;
  // The engine first: it adopts the VMs an earlier daemon left before the
  // API takes requests.
  daemon::NodeOptions node_options;
  node_options.root = root;
  node_options.store = store->get();
  node_options.plan.qemu = f.qemu;
  node_options.plan.accel = f.accel;
  node_options.node_name = f.node_name;
  Result<registry::ClientOptions> client = MakeClientOptions(g);
  if (!client.ok()) return Fail(client.status());
  node_options.plan.client = std::move(*client);
  Result<oci::Platform> platform = oci::Platform::Parse(g.platform);
  if (!platform.ok()) return Fail(platform.status());
  node_options.plan.platform = *platform;
  Result<store::DiskTree::Limits> limits = MakeDiskLimits(g);
  if (!limits.ok()) return Fail(limits.status());
  node_options.plan.disk_limits = *limits;
  node_options.plan.lazy = f.lazy;
  std::unique_ptr<daemon::Node> node;
  if (!f.api_only) {
    Result<std::unique_ptr<daemon::Node>> started = daemon::Node::Start(std::move(node_options));
    if (!started.ok()) return Fail(started.status().Annotate("starting the node daemon"));
    node = std::move(*started);
    daemon::Node* engine = node.get();
    options.metrics = [engine] { return engine->MetricsText(); };
    options.vmi_runtime = [root](const std::string& ns, const std::string& name, const std::string& uid) {
      return FindVmiRuntime(root, ns, name, uid);
    };
  }
  Result<std::unique_ptr<api::Server>> server = api::Server::Start(std::move(options));
  if (!server.ok()) return Fail(server.status().Annotate("starting the API server"));
  if (!g.quiet) {
    if (!f.socket.empty()) std::fprintf(stderr, "regdisk: serving the API on unix:%s\n", f.socket.c_str());
    if (!f.listen.empty()) {
      std::fprintf(stderr, "regdisk: serving the API on %s (port %d); kubeconfig %s\n", (*server)->url().c_str(),
                   (*server)->tls_port(), (*server)->kubeconfig().c_str());
    }
  }
  // Until the first SIGTERM, SIGINT or SIGHUP (CancelOnSignals).
  while (!g.cancel->cancelled()) {
    pollfd pfd{g.cancel->poll_fd(), POLLIN, 0};
    poll(&pfd, pfd.fd >= 0 ? 1 : 0, 1000);
  }
  (*server)->Stop();
  if (node && f.stop_vms) {
    log::Info("stopping every VM (--stop-vms)");
    node->StopAllVms();
  }
  node.reset();  // without --stop-vms the VMs keep running; the next daemon adopts them
  log::Info("API server stopped ({})", g.cancel->status().message());
  return 0;
}

}  // namespace regdisk::cli
