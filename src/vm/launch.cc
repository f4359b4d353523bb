#include "vm/launch.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <cstring>
#include <thread>

#include "disk/overlay.h"
#include "util/log.h"
#include "vm/cloudinit.h"

namespace regdisk::vm {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

Status PrepareDisks(const VmPlan& plan) {
  for (const auto& d : plan.disks) {
    if (d.seed) {
      RETURN_IF_ERROR(WriteNoCloudSeed(d.backing, *d.seed).Annotate("writing the cloud-init seed for disk " + d.name));
      continue;
    }
    const auto t0 = Clock::now();
    RETURN_IF_ERROR(disk::CreateOverlay(d.overlay, d.backing, d.backing_format, d.virtual_size)
                        .Annotate("creating the ephemeral disk for " + d.name));
    log::Info("ephemeral disk for {} created in {:.2f} ms", d.name,
              std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  return OkStatus();
}

Status CreatePrivateLog(const fs::path& path, bool truncate) {
  ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(path, O_WRONLY | O_CREAT | O_NOFOLLOW | (truncate ? O_TRUNC : O_APPEND), 0600));
  if (::fchmod(fd.get(), 0600) != 0) return ErrnoStatus("making " + path.string() + " private");
  return OkStatus();
}

fs::path QemuLogPath(const fs::path& run_dir) { return run_dir / "qemu.log"; }

Process::Options QemuProcessOptions(const VmPlan& plan) {
  Process::Options popt;
  popt.stdout_mode = Process::Stdio::kFile;
  popt.stdout_file = QemuLogPath(plan.run_dir);
  popt.stderr_mode = Process::Stdio::kFile;
  popt.stderr_file = QemuLogPath(plan.run_dir);
  for (const auto& lease : plan.disk_leases) popt.inherit_fds.push_back(lease.fd());
  // A disk read from another process's export: QEMU holds that export up
  // for as long as it runs (the daemon or `run` may go first).
  for (const auto& pull : plan.lazy_pulls) {
    if (const int fd = pull->reader_lock_fd(); fd >= 0) popt.inherit_fds.push_back(fd);
  }
  return popt;
}

std::string QemuLogLastLine(const fs::path& run_dir) {
  auto t = ReadFileCapped(QemuLogPath(run_dir), 1 << 20);
  if (!t.ok()) return {};
  std::string s = *t;
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
  size_t nl = s.rfind('\n');
  return nl == std::string::npos ? s : s.substr(nl + 1);
}

Result<UniqueFd> ConnectConsole(const fs::path& socket, Process& qemu, std::chrono::milliseconds timeout) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket.string().size() >= sizeof addr.sun_path) return InvalidArgument("the console socket path is too long");
  std::strcpy(addr.sun_path, socket.c_str());
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd.valid()) return ErrnoStatus("opening a console socket");
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return fd;
    if (errno != ENOENT && errno != ECONNREFUSED) return ErrnoStatus("connecting to the console of the VM");
    if (qemu.Poll()) return UniqueFd();  // QEMU ended before it served the console
    if (timeout.count() > 0 && Clock::now() > deadline) {
      return DeadlineExceeded("QEMU did not open the VM's console within " +
                              std::to_string(std::chrono::duration_cast<std::chrono::seconds>(timeout).count()) + " s");
    }
    std::this_thread::sleep_for(10ms);
  }
}

nlohmann::json PortsToJson(const std::vector<PublishedPort>& ports) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& p : ports) {
    out.push_back({{"name", p.name}, {"protocol", p.protocol}, {"port", p.guest_port}, {"hostIP", p.host_ip},
                   {"hostPort", p.host_port}});
  }
  return out;
}

std::vector<PublishedPort> PortsFromJson(const nlohmann::json& ports) {
  std::vector<PublishedPort> out;
  if (!ports.is_array()) return out;
  for (const auto& p : ports) {
    if (!p.is_object()) continue;
    PublishedPort pp;
    pp.name = p.value("name", "");
    pp.protocol = p.value("protocol", "tcp");
    pp.guest_port = p.value("port", 0);
    pp.host_ip = p.value("hostIP", "");
    pp.host_port = p.value("hostPort", 0);
    out.push_back(pp);
  }
  return out;
}

}  // namespace regdisk::vm
