// The node daemon's engine: it makes the VMs running on this node match
// the VirtualMachineInstances in the object store, and runs the replica
// set and VirtualMachine controllers against the store.
//
//   ASSIGN_OR_RETURN(auto store, state::ObjectStore::Open(root / "state.db"));
//   ASSIGN_OR_RETURN(auto node, Node::Start({.root = root, .store = store.get(), ...}));
//   ... serve the API ...
//   node.reset();  // the loop stops; every QEMU keeps running
//
// One loop thread, level-triggered: it wakes on a store watch event, a
// QEMU's exit, a finished start or stop, or every `resync`, and then looks
// at everything afresh:
//   - a VMI that is not final and has no QEMU gets one: Scheduling while
//     its disks are pulled (one pull per image, the store serialises
//     them), Scheduled once planned, Running once QEMU runs. A pull that
//     fails for a reason that may pass (registry down, image not there
//     yet) is retried with back-off, as a pod's ErrImagePull is; a spec
//     the node cannot run, or a QEMU that fails at once, makes it Failed;
//   - a QEMU that exits makes its VMI Succeeded (guest power-off) or
//     Failed, and its run directory is removed;
//   - every VMI it starts carries KubeVirt's finalizer
//     (controller::kVmiFinalizer), so a deleted VMI stays, with its
//     deletionTimestamp, while its QEMU stops;
//   - a QEMU whose VMI is being deleted or gone (or replaced by a newer
//     uid) is stopped (ACPI powerdown, `grace`, then SIGKILL) and its run
//     directory removed; a VMI deleted during its pull cancels the pull;
//     then the finalizer comes off (also for a final VMI), and the store
//     removes the VMI unless a user's finalizer remains;
//   - the replica set and VirtualMachine controllers' actions are applied
//     to the store.
// Start first adopts the QEMUs an earlier daemon left running (see
// instance.h) and removes the run directories whose QEMU is gone.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>

#include "state/object_store.h"
#include "util/status.h"
#include "vm/plan.h"

namespace regdisk::daemon {

struct NodeOptions {
  std::filesystem::path root;
  state::ObjectStore* store = nullptr;  // outlives the Node
  // Pull and QEMU settings (root, qemu, accel, client, platform...); the
  // run directory, cancellation and ports are the Node's.
  vm::PlanOptions plan;
  std::string node_name;  // status.nodeName; empty: the host name
  std::chrono::milliseconds grace{10000};  // powerdown to kill
  std::chrono::milliseconds resync{5000};  // a full pass at least this often
  // First and longest wait before retrying a failed pull.
  std::chrono::milliseconds pull_backoff{2000};
  std::chrono::milliseconds pull_backoff_max{300000};
  std::function<int64_t()> now;  // Unix seconds; empty: the system clock
  uint64_t name_seed = 0;        // replica names; 0: from getrandom(2)
};

class Node {
 public:
  static Result<std::unique_ptr<Node>> Start(NodeOptions options);
  // Stops the loop and cancels pulls in flight; leaves QEMUs running.
  ~Node();
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;

  // Stops every VM this node runs (what `serve --stop-vms` does at exit).
  void StopAllVms();

  // Prometheus text exposition (format 0.0.4) of the node's counters:
  // VMIs by phase, pulls by result, bytes fetched, pull time, starts and
  // exits. Thread-safe.
  std::string MetricsText();

  struct Impl;

 private:
  explicit Node(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace regdisk::daemon
