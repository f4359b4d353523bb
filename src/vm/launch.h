// What every way of running a VM does around QEMU, shared by the
// foreground runner (vm/runner.cc) and the node daemon
// (daemon/instance.cc): the VM's disks before QEMU starts, QEMU's process
// options and log, the console connection QEMU waits for, and the port
// list of the run records.
//
//   RETURN_IF_ERROR(PrepareDisks(plan));
//   RETURN_IF_ERROR(CreatePrivateLog(plan.log_file, /*truncate=*/true));
//   ASSIGN_OR_RETURN(Process qemu, Env::Default()->Spawn(QemuArgv(plan), QemuProcessOptions(plan)));
//   ASSIGN_OR_RETURN(UniqueFd console, ConnectConsole(plan.console_socket, qemu, 60s));
//   if (qemu.Poll()) return Internal("QEMU could not run VM: " + QemuLogLastLine(plan.run_dir));
#pragma once

#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "util/fs.h"
#include "util/process.h"
#include "util/status.h"
#include "vm/plan.h"

namespace regdisk::vm {

// Writes each cloud-init disk's seed (the VM's own, 0600) and gives each
// store disk a fresh qcow2 overlay over the store's read-only copy, with
// its format given explicitly (O(1): only a header is written; the disk is
// not read). Errors name the disk.
Status PrepareDisks(const VmPlan& plan);

// Creates `path` 0600 (whatever the umask; QEMU would create it 0644, and
// the console can show what the guest prints of its user-data), emptied
// when `truncate`, else kept for QEMU to append to. Refuses a symlink.
Status CreatePrivateLog(const std::filesystem::path& path, bool truncate);

// QEMU's own messages (stdout and stderr): run_dir/qemu.log.
std::filesystem::path QemuLogPath(const std::filesystem::path& run_dir);

// Options for spawning QEMU: stdout and stderr to QemuLogPath(plan.run_dir),
// and the disks' leases inherited (QEMU holds them for as long as it
// lives). Callers add their own fds and parent-death behaviour.
Process::Options QemuProcessOptions(const VmPlan& plan);

// The last line of QEMU's log in `run_dir` (its reason for failing), or ""
// when there is none.
std::string QemuLogLastLine(const std::filesystem::path& run_dir);

// Connects to the VM's serial console socket, waiting for QEMU to create
// it (QEMU, serving it with wait=on, starts the guest once a client has
// connected). Returns an invalid fd when QEMU ends first (the caller
// reports why, from qemu.Poll()); DeadlineExceeded after `timeout`
// (0: no limit).
Result<UniqueFd> ConnectConsole(const std::filesystem::path& socket, Process& qemu, std::chrono::milliseconds timeout);

// Published ports as the run records (vm.json) hold them:
// [{"name", "protocol", "port", "hostIP", "hostPort"}]. Reading is
// lenient: a missing field takes PublishedPort's default ("tcp" for the
// protocol, "" for the host address).
nlohmann::json PortsToJson(const std::vector<PublishedPort>& ports);
std::vector<PublishedPort> PortsFromJson(const nlohmann::json& ports);

}  // namespace regdisk::vm
