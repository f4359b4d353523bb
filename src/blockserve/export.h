// A block export of a LazyDisk: nbdkit, with regdisk's plugin
// (nbdkit_plugin.c), serving the disk read-only over NBD on a unix socket,
// and the control server that fetches the chunks the plugin asks for.
// QEMU opens it as the read-only backing node of each VM's overlay
// (`nbd+unix:///?socket=DIR/nbd.sock`, format raw); any number of VMs and
// connections share one export.
//
//   ASSIGN_OR_RETURN(std::unique_ptr<Export> e, Export::Start(*disk, ExportOptions{}));
//   ... qemu -drive ...backing=e->uri() ...
//   e.reset();  // stops nbdkit and the control server
//
// The NBD protocol is nbdkit's; what regdisk adds is the plugin (serve a
// chunk only once its bit is set) and the control server (fetch, verify,
// set the bit: LazyDisk::Ensure). Files, in the disk's directory:
//   nbd.sock      the NBD socket (0600)
//   control.sock  the plugin's requests (0600, control_protocol.h)
//   nbdkit.log    nbdkit's own messages (a chunk it could not serve...)
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "blockserve/lazy_disk.h"
#include "util/fs.h"
#include "util/process.h"
#include "util/status.h"

namespace regdisk::blockserve {

struct ExportOptions {
  // The plugin; FindNbdkitPlugin() when empty.
  std::filesystem::path plugin;
  std::string nbdkit = "nbdkit";
  // The most control requests (guest reads of missing chunks) served at
  // once, each on a thread of its own; more wait in the socket's backlog.
  // A request waiting on a slow registry holds its thread no longer than
  // the disk's read deadline.
  int workers = 64;
  // A guest read that cannot be served in this time fails with EIO.
  std::chrono::seconds deadline{60};
  // How long to wait for nbdkit to listen.
  std::chrono::milliseconds start_timeout{10000};
  // For the node daemon, whose VMs outlive it: nbdkit is started detached
  // (a child of init, not of this process: it sets a parent-death signal
  // of its own) and recorded in DIR/nbdkit.pid, Release() leaves
  // it serving, and a later Start on the same disk adopts a live one
  // (starting only the control server) instead of starting another. Off
  // (`regdisk run`): nbdkit dies with the thread that started it.
  bool outlive_owner = false;
};

// The control server alone: answers the plugin's requests for `disk` on
// `socket` until destroyed. (Export runs one, next to the nbdkit it
// starts.) Each connection is answered on a thread of its own, at most
// `workers` at once, so requests stuck on a stalled registry never hold
// up requests for chunks that can be served.
class ControlServer {
 public:
  static Result<std::unique_ptr<ControlServer>> Start(LazyDisk& disk, const std::filesystem::path& socket,
                                                      int workers);
  // Requests being answered now.
  int active() const;
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;
  uint64_t requests() const { return requests_.load(); }

 private:
  ControlServer(LazyDisk& disk, std::filesystem::path socket, UniqueFd listener, UniqueFd stop, int max_active);
  void Serve();
  void Answer(int fd);
  void Reap();  // joins the threads of answered connections (holding mu_)

  LazyDisk& disk_;
  const std::filesystem::path socket_;
  UniqueFd listener_, stop_;
  const int max_active_;
  std::thread acceptor_;
  mutable std::mutex mu_;
  std::condition_variable cv_;                          // a connection was answered
  std::map<std::thread::id, std::thread> answering_;    // guarded by mu_
  std::vector<std::thread::id> answered_;               // guarded by mu_: to join
  bool stopping_ = false;                               // guarded by mu_
  std::atomic<uint64_t> requests_{0};
};

class Export {
 public:
  static Result<std::unique_ptr<Export>> Start(LazyDisk& disk, const ExportOptions& options);
  ~Export();  // nbdkit is stopped first (unless released), then the control server
  Export(const Export&) = delete;
  Export& operator=(const Export&) = delete;

  const std::filesystem::path& socket() const { return socket_; }
  // The NBD URI QEMU and nbd tools take: nbd+unix:///?socket=PATH
  std::string uri() const;
  uint64_t control_requests() const { return control_->requests(); }
  pid_t nbdkit_pid() const { return pid_; }
  // True when Start found this disk's nbdkit running and took it over.
  bool adopted() const { return adopted_; }

  // With ExportOptions::outlive_owner: leaves nbdkit serving the VMs that
  // read from it when this object goes (the control server stops; nbdkit's
  // reads of present chunks go on, and its reads of missing ones wait for
  // the next owner up to the deadline).
  void Release() { released_ = true; }

 private:
  Export() = default;
  static Result<std::unique_ptr<Export>> Adopt(LazyDisk& disk, const ExportOptions& options);

  std::filesystem::path socket_;
  std::unique_ptr<ControlServer> control_;
  std::optional<Process> nbdkit_;  // a child of this process
  UniqueFd pidfd_;                 // one adopted from an earlier process
  pid_t pid_ = 0;
  bool adopted_ = false;
  bool released_ = false;
};

// The plugin: $REGDISK_NBDKIT_PLUGIN, else nbdkit-regdisk-plugin.so next to
// the running executable, else in ../lib/regdisk/ from it. NotFound (naming
// the places looked) when none exists.
Result<std::filesystem::path> FindNbdkitPlugin();

// Whether the unix socket at PATH accepts a connection (an export serves
// there now).
bool CanConnect(const std::filesystem::path& path);

// The last line of nbdkit's log with anything in it, trimmed, printable and
// at most 300 bytes: what goes into a one-line error.
std::string LastLogLine(std::string_view log);

}  // namespace regdisk::blockserve
