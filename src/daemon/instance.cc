#include "daemon/instance.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <poll.h>
#include <unistd.h>

#include <cstring>
#include <nlohmann/json.hpp>
#include <thread>

#include "util/env.h"
#include "util/log.h"
#include "util/process.h"
#include "vm/launch.h"
#include "vm/qmp.h"

namespace regdisk::daemon {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

constexpr char kPrefix[] = "vmi-";
constexpr char kRecordFile[] = "vm.json";

UniqueFd OpenPidfd(pid_t pid) { return UniqueFd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0))); }

nlohmann::json RecordToJson(const InstanceRecord& r) {
  return {{"namespace", r.namespace_}, {"name", r.name}, {"uid", r.uid}, {"qemuPid", r.pid},
          {"qemuStartTicks", r.start_ticks}, {"startedAt", r.started_at}, {"qmpSocket", r.qmp_socket.string()},
          {"consoleSocket", r.console_socket.string()}, {"logFile", r.log_file.string()}, {"ip", r.ip},
          {"ports", vm::PortsToJson(r.ports)}, {"images", r.images}, {"lazyImages", r.lazy_images}};
}

Result<InstanceRecord> RecordFromJson(const nlohmann::json& j, const fs::path& run_dir) {
  if (!j.is_object()) return InvalidArgument("not a JSON object");
  try {
    InstanceRecord r;
    r.namespace_ = j.at("namespace").get<std::string>();
    r.name = j.at("name").get<std::string>();
    r.uid = j.at("uid").get<std::string>();
    r.pid = j.at("qemuPid").get<pid_t>();
    r.start_ticks = j.at("qemuStartTicks").get<uint64_t>();
    r.started_at = j.value("startedAt", int64_t{0});
    r.run_dir = run_dir;
    r.qmp_socket = j.at("qmpSocket").get<std::string>();
    r.console_socket = j.at("consoleSocket").get<std::string>();
    r.log_file = j.at("logFile").get<std::string>();
    r.ip = j.value("ip", "");
    r.ports = vm::PortsFromJson(j.value("ports", nlohmann::json::array()));
    const nlohmann::json images = j.value("images", nlohmann::json::object());
    for (const auto& [image, digest] : images.items()) {
      if (digest.is_string()) r.images[image] = digest.get<std::string>();
    }
    for (const auto& image : j.value("lazyImages", nlohmann::json::array())) {
      if (image.is_string()) r.lazy_images.push_back(image.get<std::string>());
    }
    if (r.pid <= 1) return InvalidArgument("no QEMU pid");
    return r;
  } catch (const nlohmann::json::exception& e) {
    return InvalidArgument(e.what());
  }
}

}  // namespace

fs::path InstanceDir(const fs::path& root, std::string_view uid) { return root / "run" / (kPrefix + std::string(uid)); }

std::vector<fs::path> ListInstanceDirs(const fs::path& root) {
  std::vector<fs::path> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root / "run", ec)) {
    if (e.path().filename().string().rfind(kPrefix, 0) == 0 && e.is_directory(ec)) out.push_back(e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

Result<std::unique_ptr<Instance>> Instance::Launch(vm::VmPlan plan, const LaunchOptions& options) {
  const fs::path dir = plan.run_dir;
  RETURN_IF_ERROR(MakeDirs(dir));
  // Everything below is undone unless QEMU is running at the end.
  struct Cleanup {
    fs::path dir;
    bool armed = true;
    ~Cleanup() {
      std::error_code ec;
      if (armed) fs::remove_all(dir, ec);
    }
  } cleanup{dir};
  if (::chmod(dir.c_str(), 0700) != 0) return ErrnoStatus("making " + dir.string() + " private");
  ASSIGN_OR_RETURN(UniqueFd dir_lock, OpenFile(dir, O_RDONLY | O_DIRECTORY));
  if (::flock(dir_lock.get(), LOCK_EX | LOCK_NB) != 0) return ErrnoStatus("locking " + dir.string());

  RETURN_IF_ERROR(vm::PrepareDisks(plan));
  for (const auto& nic : plan.nics) {
    if (!nic.bridge.empty()) return Unimplemented("the node daemon runs VMs on the pod network only (NIC " + nic.name + ")");
  }
  RETURN_IF_ERROR(MakeDirs(plan.log_file.parent_path()));
  RETURN_IF_ERROR(vm::CreatePrivateLog(plan.log_file, /*truncate=*/true));  // a new VMI of an old name: a fresh log

  // QEMU keeps the disks' leases and the run directory's lock for as long
  // as it lives, whatever happens to the daemon; no parent-death signal.
  Process::Options popt = vm::QemuProcessOptions(plan);
  popt.inherit_fds.push_back(dir_lock.get());
  ASSIGN_OR_RETURN(Process qemu, Env::Default()->Spawn(vm::QemuArgv(plan), popt));
  UniqueFd pidfd = OpenPidfd(qemu.pid());
  if (!pidfd.valid()) return ErrnoStatus("opening a pidfd for QEMU");
  auto ticks = ProcessStartTicks(qemu.pid());
  if (!ticks) return Internal("QEMU (pid " + std::to_string(qemu.pid()) + ") vanished as it started");

  std::unique_ptr<Instance> inst(new Instance());
  InstanceRecord& r = inst->record_;
  r.namespace_ = plan.namespace_;
  r.name = plan.name;
  r.uid = options.uid;
  r.pid = qemu.pid();
  r.start_ticks = *ticks;
  r.started_at = options.now_seconds;
  r.run_dir = dir;
  r.qmp_socket = plan.qmp_socket;
  r.console_socket = plan.console_socket;
  r.log_file = plan.log_file;
  for (const auto& d : plan.disks) {
    if (!d.image.empty() && d.manifest_digest) r.images[d.image] = d.manifest_digest->str();
  }
  r.lazy_images = plan.lazy_images;
  for (const auto& nic : plan.nics) {
    if (r.ip.empty()) r.ip = nic.GuestAddress();
    r.ports.insert(r.ports.end(), nic.ports.begin(), nic.ports.end());
  }
  RETURN_IF_ERROR(WriteFileAtomic(dir / kRecordFile, RecordToJson(r).dump(), 0600));
  // QEMU starts the guest once a client has connected to the console:
  // connect once and let go (QEMU keeps logging the console to the VM's
  // log without a client).
  RETURN_IF_ERROR(vm::ConnectConsole(plan.console_socket, qemu, 60s).status());
  if (auto code = qemu.Poll()) {
    std::string detail = vm::QemuLogLastLine(dir);
    return Internal("QEMU could not run VM " + plan.name + (detail.empty() ? "" : ": " + detail));
  }
  qemu.Release();  // reaped through the pidfd (waitid) by Poll
  inst->pidfd_ = std::move(pidfd);
  inst->lazy_ = std::move(plan.lazy_pulls);
  cleanup.armed = false;
  log::Info("VMI {}/{} started (QEMU pid {})", r.namespace_, r.name, r.pid);
  return inst;
}

Result<std::unique_ptr<Instance>> Instance::Adopt(const fs::path& run_dir) {
  auto text = ReadFileCapped(run_dir / kRecordFile, 1 << 20);
  if (!text.ok()) return NotFound("no record in " + run_dir.string());
  auto record = RecordFromJson(nlohmann::json::parse(*text, nullptr, false), run_dir);
  if (!record.ok()) return NotFound("the record in " + run_dir.string() + " is unreadable: " + record.status().message());
  UniqueFd pidfd = OpenPidfd(record->pid);
  // The pidfd first, then the start time: if the start time still matches,
  // the pidfd refers to that very process.
  auto ticks = ProcessStartTicks(record->pid);
  if (!pidfd.valid() || !ticks || *ticks != record->start_ticks) {
    return NotFound("the QEMU of " + run_dir.string() + " (pid " + std::to_string(record->pid) + ") is gone");
  }
  std::unique_ptr<Instance> inst(new Instance());
  inst->record_ = std::move(*record);
  inst->pidfd_ = std::move(pidfd);
  inst->adopted_ = true;
  return inst;
}

Instance::~Instance() = default;

std::optional<InstanceExit> Instance::Poll() {
  if (exit_) return exit_;
  pollfd p{pidfd_.get(), POLLIN, 0};
  if (::poll(&p, 1, 0) <= 0) return std::nullopt;
  siginfo_t info{};
  if (::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(pidfd_.get()), &info, WEXITED | WNOHANG) == 0 &&
      info.si_pid != 0) {
    if (info.si_code == CLD_EXITED && info.si_status == 0) {
      exit_ = InstanceExit{true, "the guest powered off"};
    } else if (info.si_code == CLD_EXITED) {
      std::string detail = vm::QemuLogLastLine(record_.run_dir);
      exit_ = InstanceExit{false, "QEMU exited with status " + std::to_string(info.si_status) +
                                      (detail.empty() ? "" : ": " + detail)};
    } else {
      exit_ = InstanceExit{false, std::string("QEMU was killed by signal ") + ::sigabbrev_np(info.si_status)};
    }
  } else {
    // Not our child (adopted): the kernel keeps the status from us.
    exit_ = InstanceExit{false, "QEMU (pid " + std::to_string(record_.pid) + ") ended while an earlier daemon ran it"};
  }
  return exit_;
}

void Instance::Stop(std::chrono::milliseconds grace, const CancelToken* cancel) {
  if (Poll()) return;
  auto qmp = vm::QmpClient::Connect(record_.qmp_socket, 2s);
  if (qmp.ok()) {
    auto st = qmp->Execute("system_powerdown");
    if (!st.ok()) log::Debug("QMP powerdown of {}: {}", record_.name, st.status().message());
  }
  const auto deadline = Clock::now() + grace;
  const int cancel_fd = cancel ? cancel->poll_fd() : -1;
  while (!Poll() && Clock::now() < deadline && !(cancel && cancel->cancelled())) {
    pollfd fds[2] = {{pidfd_.get(), POLLIN, 0}, {cancel_fd, POLLIN, 0}};
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    ::poll(fds, 2, static_cast<int>(std::clamp<int64_t>(left, 0, 1000)));
  }
  if (!Poll()) {
    ::syscall(SYS_pidfd_send_signal, pidfd_.get(), SIGKILL, nullptr, 0);
    pollfd p{pidfd_.get(), POLLIN, 0};
    ::poll(&p, 1, 10000);
    Poll();
  }
}

void Instance::Remove() {
  std::error_code ec;
  fs::remove_all(record_.run_dir, ec);
  if (ec) log::Warn("removing {}: {}", record_.run_dir.string(), ec.message());
}

}  // namespace regdisk::daemon
