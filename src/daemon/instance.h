// One VM that the node daemon runs: QEMU started detached from the daemon
// so that it outlives a daemon crash, restart or upgrade, its run
// directory, and the record a restarted daemon adopts it from.
//
//   fs::path dir = InstanceDir(root, vmi_uid);
//   ASSIGN_OR_RETURN(VmPlan plan, vm::PlanVm(vm, secrets, plan_options, dir));
//   ASSIGN_OR_RETURN(auto inst, Instance::Launch(std::move(plan), {vmi_uid, now}));
//   ... poll(inst->exit_fd()) ...; if (auto exit = inst->Poll()) ...;
//   // after a restart:
//   for (const auto& d : ListInstanceDirs(root)) { auto inst = Instance::Adopt(d); ... }
//
// Why no per-VM shim (containerd-shim, conmon): QEMU already is the
// long-lived process that holds everything a VM needs: it writes the
// console log itself, serves the console and QMP on sockets in the run
// directory, and holds the disk leases and the run directory's lock as
// inherited descriptors. The daemon only needs to find it again, which the
// record (pid plus the kernel's start time of that pid, so a reused pid is
// never mistaken for it) and a pidfd give; docs/architecture.md has the
// full reasoning.
//
// Exit status: for a QEMU this daemon process started, waitid(2) on the
// pidfd gives it (0 is a guest power-off: Succeeded; anything else or a
// signal: Failed). For an adopted QEMU (started by an earlier daemon
// process) the kernel does not report it to a non-parent; such an exit
// counts as Failed (KubeVirt, too, calls a VMI whose end it did not see
// Failed).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "util/cancel.h"
#include "util/fs.h"
#include "util/status.h"
#include "vm/plan.h"

namespace regdisk::daemon {

// What a run directory's vm.json says about its VM. The fields namespace,
// name, qemuPid, ip and ports are also read by `regdisk port` (vm/runner.h
// ListRunningVms); the rest is the daemon's own.
struct InstanceRecord {
  std::string namespace_;
  std::string name;
  std::string uid;  // the VirtualMachineInstance's metadata.uid
  pid_t pid = 0;
  uint64_t start_ticks = 0;  // /proc/PID/stat starttime: pid + this names one process
  int64_t started_at = 0;    // Unix seconds, the daemon's clock
  std::filesystem::path run_dir;
  std::filesystem::path qmp_socket;
  std::filesystem::path console_socket;
  std::filesystem::path log_file;
  std::string ip;
  std::vector<vm::PublishedPort> ports;
  // Each registry disk's image as the spec names it -> the manifest digest
  // it runs ("sha256:...").
  std::map<std::string, std::string> images;
  // The images (as the store knows them, digest-pinned) whose disks QEMU
  // reads from a lazy-boot export while they fill: a restarted daemon
  // serves them again (blockserve::LazyPool).
  std::vector<std::string> lazy_images;
};

struct InstanceExit {
  bool succeeded = false;  // the guest powered off
  std::string reason;      // one line for the VMI's status and events
};

// ROOT/run/vmi-UID: every instance's run directory (overlays, seeds,
// sockets, record). The prefix keeps it apart from `regdisk run`'s.
std::filesystem::path InstanceDir(const std::filesystem::path& root, std::string_view uid);

// The instance directories under ROOT/run, whatever their state.
std::vector<std::filesystem::path> ListInstanceDirs(const std::filesystem::path& root);


class Instance {
 public:
  struct LaunchOptions {
    std::string uid;         // the VMI's uid
    int64_t now_seconds = 0;
  };

  // Creates plan.run_dir (0700, locked for as long as QEMU lives), the
  // overlays and seeds, starts QEMU without a parent-death signal, waits
  // for its console socket (QEMU holds the guest until a client connects
  // once) and writes the record. On failure nothing is left: QEMU is
  // killed and the directory removed.
  static Result<std::unique_ptr<Instance>> Launch(vm::VmPlan plan, const LaunchOptions& options);

  // Takes over the QEMU that the record in `run_dir` names. NotFound when
  // the record is missing or unreadable, or its process is gone or is
  // another process (pid reused): the caller then removes the directory.
  static Result<std::unique_ptr<Instance>> Adopt(const std::filesystem::path& run_dir);

  ~Instance();  // leaves QEMU running
  Instance(const Instance&) = delete;
  Instance& operator=(const Instance&) = delete;

  const InstanceRecord& record() const { return record_; }
  bool adopted() const { return adopted_; }

  // Readable (POLLIN) once QEMU has exited: a pidfd.
  int exit_fd() const { return pidfd_.get(); }
  // The exit once QEMU has exited; nullopt while it runs.
  std::optional<InstanceExit> Poll();

  // Asks the guest to power off (ACPI over QMP), waits up to `grace`, then
  // kills QEMU; returns once it is gone. `cancel` cuts the grace short.
  void Stop(std::chrono::milliseconds grace, const CancelToken* cancel = nullptr);

  // Removes the run directory; QEMU must have exited.
  void Remove();

  // The lazy pulls QEMU's disks read from (InstanceRecord::lazy_images):
  // held for as long as this object lives. A restarted daemon hands them
  // back once it has acquired them again.
  void HoldLazy(std::vector<std::shared_ptr<blockserve::LazyPull>> pulls) { lazy_ = std::move(pulls); }

 private:
  Instance() = default;
  InstanceRecord record_;
  UniqueFd pidfd_;
  bool adopted_ = false;
  std::optional<InstanceExit> exit_;
  std::vector<std::shared_ptr<blockserve::LazyPull>> lazy_;
};

}  // namespace regdisk::daemon
