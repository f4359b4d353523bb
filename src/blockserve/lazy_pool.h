// The lazy pulls of one long-lived process (the node daemon), shared by
// image: every VM that boots an image while it fills uses the same
// LazyPull, so the node has one export and fetches each chunk once,
// however many VMs read it.
//
//   LazyPool pool;
//   ASSIGN_OR_RETURN(std::shared_ptr<LazyPull> pull,
//                    pool.Acquire(key, [&] { return LazyPull::Start(store, OpenSource(...), key, po, lazy); }));
//   ASSIGN_OR_RETURN(LazyPull::Disk disk, pull->Ready());
//   ...the VM holds `pull` for as long as QEMU runs...
//   pool.Sweep();  // now and then: drops the pulls that have ended and that no VM holds
//
// The pool keeps a pull it started until the pull has ended, VMs or not:
// the fill goes on in the background and commits the disk to the store.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "blockserve/lazy_pull.h"
#include "util/status.h"

namespace regdisk::blockserve {

class LazyPool {
 public:
  using StartFn = std::function<Result<std::unique_ptr<LazyPull>>()>;

  LazyPool() = default;
  // Ends every pull no VM holds; with KeepExports() first, the exports
  // that VMs read from stay up for the next process to adopt.
  ~LazyPool();
  LazyPool(const LazyPool&) = delete;
  LazyPool& operator=(const LazyPool&) = delete;

  // The pull serving `key` (an image reference, digest-pinned where the
  // caller pins), started with `start` when there is none or the last one
  // failed. Thread-safe; two callers for one key get one pull.
  Result<std::shared_ptr<LazyPull>> Acquire(const std::string& key, const StartFn& start);

  // Drops the pulls that have ended (the disk is committed, or the pull
  // failed) or that read another process's export, and that nobody else
  // holds, unless another process still reads their export. Returns how
  // many remain.
  size_t Sweep();

  // The node's lazy pulls at a glance, for /metrics.
  struct Stats {
    uint64_t exports = 0;  // exports serving VMs now
    uint64_t filling = 0;  // pulls not yet committed (or failed)
    uint64_t present = 0, missing = 0;  // chunks of the filling ones
    uint64_t fetched_bytes = 0;         // by the pulls the pool holds
  };
  Stats stats();

  // Every pull that someone besides the pool holds (a running VM) leaves
  // its export serving when it goes (LazyPull::KeepExport): call before a
  // daemon that leaves its VMs running exits.
  void KeepExports();

 private:
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<LazyPull>> pulls_;  // guarded by mu_
};

}  // namespace regdisk::blockserve
