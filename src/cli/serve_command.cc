// regdisk serve: the node daemon's API over the object store
// (ROOT/state.db), on a unix socket and optionally TLS, until SIGTERM or
// SIGINT. The API server itself is src/api/server.h.
#include <poll.h>

#include <cstdio>
#include <filesystem>

#include "api/server.h"
#include "cli/common.h"
#include "state/object_store.h"
#include "util/fs.h"
#include "util/log.h"

namespace regdisk::cli {

namespace fs = std::filesystem;

int RunServe(const Globals& g, const ServeFlags& f) {
  const fs::path root = g.root;
  if (f.socket.empty() && f.listen.empty()) {
    return Fail(InvalidArgument("regdisk serve needs a --socket path or a --listen address"));
  }
  if (Status st = MakeDirs(root); !st.ok()) return Fail(st.Annotate("creating the root " + root.string()));
  Result<std::unique_ptr<state::ObjectStore>> store = state::ObjectStore::Open(root / "state.db");
  if (!store.ok()) return Fail(store.status().Annotate("opening " + (root / "state.db").string()));
  api::Server::Options options;
  options.store = store->get();
  options.root = root;
  options.socket_path = f.socket;
  options.listen = f.listen;
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
  log::Info("API server stopped ({})", g.cancel->status().message());
  return 0;
}

}  // namespace regdisk::cli
