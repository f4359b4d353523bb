// Running one VM in the foreground on ephemeral registry disks.
//
// RunVm pulls what the spec asks for, gives each disk a fresh qcow2 overlay
// over the store's read-only copy (O(1): only a header is written), writes
// the VM's cloud-init seeds (0600, in its run directory), publishes its
// ports, starts QEMU, and connects to its serial console: what the guest
// writes goes to `console` as it arrives (and, by QEMU, to the VM's log,
// ROOT/logs/NS_NAME.log, whose previous runs rotate to .1, .2, .3 once the
// guest runs; a start that fails leaves them as they were); with
// `console_input`, keystrokes go to the guest. It stops when the guest
// powers off, when `stop` is cancelled, when the user types Ctrl-] on the
// console, or at the timeout: ACPI powerdown over QMP, then SIGKILL after
// the grace period. Overlays, seeds and sockets are removed on every way
// out; runs left by a crashed regdisk are cleaned up by the next one
// (CleanStaleRuns). Only one VM of a namespace and name runs at a time.
#pragma once

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <vector>

#include "spec/spec.h"
#include "util/cancel.h"
#include "util/status.h"
#include "vm/plan.h"

namespace regdisk::vm {

struct RunOptions {
  PlanOptions plan;
  std::chrono::milliseconds timeout{0};      // 0: no limit
  std::chrono::milliseconds grace{10000};    // from powerdown to kill
  // Stops the VM when cancelled (ACPI powerdown, then kill after `grace`);
  // cancelled during the pull, it ends the pull and RunVm returns OK.
  std::shared_ptr<const CancelToken> stop;
  std::FILE* console = stdout;
  // Keystrokes for the guest's console (the CLI passes stdin when it is a
  // terminal), or -1. A terminal is put in raw mode while attached (and
  // restored on every way out); Ctrl-] (0x1d) stops the VM. Input the guest
  // is not reading waits in a bounded buffer, and what does not fit is
  // dropped: the console never blocks the loop that watches for Ctrl-].
  int console_input = -1;
  // Where the published ports and the attach hint are printed; may be null.
  std::FILE* notices = stderr;
};

// A VM that a regdisk on this node is running, from its run directory.
struct RunningVm {
  std::string namespace_;
  std::string name;
  int qemu_pid = 0;
  std::string ip;  // the guest's address on its user-mode network, or ""
  std::vector<PublishedPort> ports;
  std::filesystem::path run_dir;
};

// The VMs running under `root` (run directories whose regdisk or QEMU is
// alive), in no particular order.
std::vector<RunningVm> ListRunningVms(const std::filesystem::path& root);

Status RunVm(const spec::VirtualMachine& vm, const std::vector<spec::Secret>& secrets, const RunOptions& options);

// Removes run directories whose regdisk is gone, killing their QEMU if it
// is still alive.
void CleanStaleRuns(const std::filesystem::path& root);

}  // namespace regdisk::vm
