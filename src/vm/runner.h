// Running one VM in the foreground on ephemeral registry disks.
//
// RunVm pulls what the spec asks for, gives each disk a fresh qcow2 overlay
// over the store's read-only copy (O(1): only a header is written), starts
// QEMU, copies its serial console to `console` as it arrives, and stops when
// the guest powers off, when `stop` is cancelled, or at the timeout: ACPI
// powerdown over QMP, then SIGKILL after the grace period. Overlays and
// sockets are removed on every way out; runs left by a crashed regdisk are
// cleaned up by the next one (CleanStaleRuns).
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
};

Status RunVm(const spec::VirtualMachine& vm, const std::vector<spec::Secret>& secrets, const RunOptions& options);

// Removes run directories whose regdisk is gone, killing their QEMU if it
// is still alive.
void CleanStaleRuns(const std::filesystem::path& root);

}  // namespace regdisk::vm
