#include "vm/plan.h"

#include <fcntl.h>
#include <unistd.h>

#include <fstream>

#include <fmt/core.h>

#include "image/transport.h"
#include "util/fs.h"
#include "util/log.h"
#include "util/process.h"

namespace regdisk::vm {

namespace fs = std::filesystem;

namespace {

// MemAvailable from /proc/meminfo, in bytes; 0 when unknown.
uint64_t HostMemoryAvailable() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  std::string unit;
  while (in >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib * 1024;
  }
  return 0;
}

bool KvmUsable() {
  int fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (fd < 0) return false;
  ::close(fd);
  return true;
}

std::string XmlEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '\'': out += "&apos;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

// Resolves one registry disk volume to a disk in the node store, pulling as
// its policy says.
Result<store::StoredImage> ResolveVolume(const spec::RegistryDiskSource& src, const std::vector<spec::Secret>& secrets,
                                         const PlanOptions& o, store::Store& st) {
  ASSIGN_OR_RETURN(image::ImageName name, image::ImageName::Parse(src.image));
  const std::string key = name.String();
  if (src.image_pull_policy != "Always") {
    ASSIGN_OR_RETURN(std::optional<store::StoredImage> have, st.Lookup(key));
    if (have && (src.path.empty() || have->disk_path == src.path)) return *have;
    if (src.image_pull_policy == "Never") {
      return FailedPrecondition("image " + src.image + " is not in the node store and its imagePullPolicy is Never; run "
                                "regdisk pull " + key + " first");
    }
  }
  registry::ClientOptions copts = o.client;
  std::optional<TempDir> auth_dir;
  if (!src.image_pull_secret.empty()) {
    // The Secret's config goes to a private temp file, never to argv or env.
    for (const auto& s : secrets) {
      if (s.metadata.name != src.image_pull_secret) continue;
      ASSIGN_OR_RETURN(TempDir d, TempDir::Create("regdisk-auth"));
      auth_dir.emplace(std::move(d));
      RETURN_IF_ERROR(WriteFileAtomic(auth_dir->path() / "auth.json", s.docker_config_json, 0600));
      copts.auth.authfile = auth_dir->path() / "auth.json";
    }
  }
  ASSIGN_OR_RETURN(std::unique_ptr<image::ImageSource> source, image::OpenSource(name, copts));
  store::PullOptions po;
  po.platform = o.platform;
  po.path = src.path;
  po.on_progress = o.on_progress;
  po.limits = o.disk_limits;
  log::Info("pulling {}", key);
  auto img = st.Pull(*source, key, po);
  if (!img.ok()) return std::move(img).status().Annotate("pulling " + key);
  return img;
}

}  // namespace

Result<VmPlan> PlanVm(const spec::VirtualMachine& vm, const std::vector<spec::Secret>& secrets, const PlanOptions& o,
                      const fs::path& run_dir) {
  VmPlan plan;
  plan.name = vm.metadata.name;
  plan.namespace_ = vm.metadata.namespace_;
  plan.memory_bytes = vm.spec.memory_bytes;
  plan.cores = vm.spec.cores;
  plan.run_dir = run_dir;
  plan.qmp_socket = run_dir / "qmp.sock";
  plan.console_log = run_dir / "console.log";
  plan.log_file = fs::path(o.root) / "logs" / (vm.metadata.namespace_ + "_" + vm.metadata.name + ".log");

  plan.qemu = o.qemu.empty() ? FindExecutable("qemu-system-x86_64") : o.qemu;
  if (plan.qemu.empty() || ::access(plan.qemu.c_str(), X_OK) != 0) {
    return NotFound("QEMU (qemu-system-x86_64) was not found; install it (apt-get install qemu-system-x86) or pass --qemu PATH");
  }
  const bool kvm = KvmUsable();
  if (o.accel == "kvm" && !kvm) {
    return FailedPrecondition("--accel kvm was asked for but /dev/kvm is not usable here; enable virtualisation or use --accel tcg");
  }
  if (o.accel != "auto" && o.accel != "kvm" && o.accel != "tcg") {
    return InvalidArgument("--accel takes auto, kvm or tcg, not \"" + o.accel + "\"");
  }
  plan.accel = o.accel == "auto" ? (kvm ? "kvm" : "tcg") : o.accel;

  uint64_t available = HostMemoryAvailable();
  if (available > 0 && static_cast<uint64_t>(plan.memory_bytes) > available) {
    return ResourceExhausted(fmt::format("VM {} asks for {} MiB of memory but the host has only {} MiB available; lower "
                                         "spec.domain.resources.requests.memory or free memory",
                                         plan.name, plan.memory_bytes >> 20, available >> 20));
  }

  ASSIGN_OR_RETURN(store::Store st, store::Store::Open(o.root));
  ASSIGN_OR_RETURN(FileLock sharing, st.Share());  // no prune between a lookup and its Use
  for (const auto& d : vm.spec.disks) {
    const spec::Volume* vol = nullptr;
    for (const auto& v : vm.spec.volumes) {
      if (v.name == d.volume_name) vol = &v;
    }
    if (!vol || !vol->registry_disk) {
      return FailedPrecondition("disk " + d.name + " uses volume " + d.volume_name + ", which is not a registry disk");
    }
    ASSIGN_OR_RETURN(store::StoredImage img, ResolveVolume(*vol->registry_disk, secrets, o, st));
    ASSIGN_OR_RETURN(FileLock lease, st.Use(img));
    plan.disk_leases.push_back(std::move(lease));
    PlannedDisk pd;
    pd.name = d.name;
    pd.dev = d.dev;
    pd.bus = d.bus;
    pd.read_only = d.read_only;
    pd.boot_order = d.boot_order;
    pd.backing = img.disk_file;
    pd.backing_format = img.disk.format;
    pd.virtual_size = img.disk.virtual_size;
    pd.overlay = run_dir / (d.name + ".qcow2");
    plan.disks.push_back(std::move(pd));
  }
  return plan;
}

std::vector<std::string> QemuArgv(const VmPlan& p) {
  std::vector<std::string> a = {p.qemu.string(),
                                "-name", "guest=" + p.name + ",debug-threads=on",
                                "-nodefaults", "-no-user-config",
                                "-machine", "pc", "-accel", p.accel,
                                "-m", std::to_string((p.memory_bytes + (1 << 20) - 1) >> 20) + "M",
                                "-smp", std::to_string(p.cores),
                                "-display", "none",
                                "-chardev", "file,id=serial0,path=" + p.console_log.string(),
                                "-serial", "chardev:serial0",
                                "-qmp", "unix:" + p.qmp_socket.string() + ",server=on,wait=off",
                                "-nic", "none"};
  bool any_boot = false;
  for (const auto& d : p.disks) any_boot |= d.boot_order.has_value();
  bool ahci = false, scsi = false;
  for (size_t i = 0; i < p.disks.size(); ++i) {
    const PlannedDisk& d = p.disks[i];
    const std::string n = std::to_string(i);
    // The store's disk, read-only, with its format given (never probed)...
    a.insert(a.end(), {"-blockdev", "driver=file,node-name=base-file" + n + ",filename=" + d.backing.string() +
                                        ",read-only=on",
                       "-blockdev", std::string("driver=") + std::string(disk::FormatName(d.backing_format)) +
                                        ",node-name=base" + n + ",file=base-file" + n + ",read-only=on"});
    // ...under this VM's own qcow2 overlay.
    a.insert(a.end(), {"-blockdev", "driver=file,node-name=overlay-file" + n + ",filename=" + d.overlay.string(),
                       "-blockdev", "driver=qcow2,node-name=disk" + n + ",file=overlay-file" + n + ",backing=base" + n +
                                        (d.read_only ? ",read-only=on" : "")});
    std::string boot;
    if (d.boot_order) boot = ",bootindex=" + std::to_string(*d.boot_order);
    else if (!any_boot && i == 0) boot = ",bootindex=1";
    if (d.bus == "sata") {
      if (!ahci) a.insert(a.end(), {"-device", "ahci,id=ahci0"});
      ahci = true;
      a.insert(a.end(), {"-device", "ide-hd,bus=ahci0." + n + ",drive=disk" + n + ",id=" + d.name + boot});
    } else if (d.bus == "scsi") {
      if (!scsi) a.insert(a.end(), {"-device", "virtio-scsi-pci,id=scsi0"});
      scsi = true;
      a.insert(a.end(), {"-device", "scsi-hd,bus=scsi0.0,drive=disk" + n + ",id=" + d.name + boot});
    } else {
      a.insert(a.end(), {"-device", "virtio-blk-pci,drive=disk" + n + ",id=" + d.name + boot});
    }
  }
  return a;
}

std::string DomainXml(const VmPlan& p) {
  std::string x;
  x += "<domain type='" + std::string(p.accel == "kvm" ? "kvm" : "qemu") + "'>\n";
  x += "  <name>" + XmlEscape(p.name) + "</name>\n";
  x += "  <memory unit='KiB'>" + std::to_string((p.memory_bytes + 1023) / 1024) + "</memory>\n";
  x += "  <vcpu>" + std::to_string(p.cores) + "</vcpu>\n";
  x += "  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n  </os>\n";
  x += "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n";
  x += "  <devices>\n";
  x += "    <emulator>" + XmlEscape(p.qemu.string()) + "</emulator>\n";
  bool any_boot = false;
  for (const auto& d : p.disks) any_boot |= d.boot_order.has_value();
  for (size_t i = 0; i < p.disks.size(); ++i) {
    const PlannedDisk& d = p.disks[i];
    x += "    <disk type='file' device='disk'>\n";
    x += "      <driver name='qemu' type='qcow2'/>\n";
    x += "      <source file='" + XmlEscape(d.overlay.string()) + "'/>\n";
    x += "      <backingStore type='file'>\n";
    x += "        <format type='" + std::string(disk::FormatName(d.backing_format)) + "'/>\n";
    x += "        <source file='" + XmlEscape(d.backing.string()) + "'/>\n";
    x += "      </backingStore>\n";
    x += "      <target dev='" + XmlEscape(d.dev) + "' bus='" + XmlEscape(d.bus) + "'/>\n";
    if (d.read_only) x += "      <readonly/>\n";
    if (d.boot_order) x += "      <boot order='" + std::to_string(*d.boot_order) + "'/>\n";
    else if (!any_boot && i == 0) x += "      <boot order='1'/>\n";
    x += "    </disk>\n";
  }
  x += "    <serial type='file'>\n      <source path='" + XmlEscape(p.log_file.string()) + "'/>\n";
  x += "      <target port='0'/>\n    </serial>\n";
  x += "    <console type='file'>\n      <source path='" + XmlEscape(p.log_file.string()) + "'/>\n";
  x += "      <target type='serial' port='0'/>\n    </console>\n";
  x += "  </devices>\n</domain>\n";
  return x;
}

}  // namespace regdisk::vm
