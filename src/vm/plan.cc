#include "vm/plan.h"

#include <fcntl.h>
#include <unistd.h>

#include <fstream>

#include <fmt/core.h>
#include <libxml/xmlwriter.h>
#include <nlohmann/json.hpp>

#include "image/transport.h"
#include "util/fs.h"
#include "util/log.h"
#include "util/text.h"
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

// Resolves one registry disk volume to a disk in the node store, pulling as
// its policy says.
Result<store::StoredImage> ResolveVolume(const spec::RegistryDiskSource& src, const std::vector<spec::Secret>& secrets,
                                         const PlanOptions& o, store::Store& st) {
  ASSIGN_OR_RETURN(image::ImageName name, image::ImageName::Parse(src.image));
  const std::string key = name.String();
  if (src.image_pull_policy != "Always" || o.offline) {
    ASSIGN_OR_RETURN(std::optional<store::StoredImage> have, st.Lookup(key, o.platform));
    if (have && (src.path.empty() || have->disk_path == src.path)) return *have;
    if (o.offline) return NotFound(key);  // PlanVm lists it as missing
    if (src.image_pull_policy == "Never") {
      return FailedPrecondition("image " + src.image + " is not in the node store and its imagePullPolicy is Never; run "
                                "regdisk pull " + key + " first");
    }
  }
  registry::ClientOptions copts = o.client;
  copts.cancel = o.cancel;
  if (!src.image_pull_secret.empty()) {
    // The Secret's config stays in memory: never in a file, argv or env.
    for (const auto& s : secrets) {
      if (s.metadata.name != src.image_pull_secret) continue;
      copts.auth.authfile_json = s.docker_config_json;
      copts.auth.authfile_name = "the .dockerconfigjson of Secret " + s.metadata.name;
    }
  }
  ASSIGN_OR_RETURN(std::unique_ptr<image::ImageSource> source, image::OpenSource(name, copts));
  store::PullOptions po;
  po.platform = o.platform;
  po.path = src.path;
  po.on_progress = o.on_progress;
  po.limits = o.disk_limits;
  po.cancel = o.cancel;
  log::Info("pulling {}", key);
  auto img = st.Pull(*source, key, po);
  if (!img.ok()) {
    Status failed = std::move(img).status();
    // The registry is unreachable but the store has the tag: say so.
    if (failed.code() == Code::kUnavailable || failed.code() == Code::kDeadlineExceeded) {
      auto have = st.Lookup(key, o.platform);
      if (have.ok() && *have) {
        failed = Status(failed.code(), failed.message() + "; the node store has a copy of " + key +
                                           ", which imagePullPolicy: IfNotPresent would use");
      }
    }
    return failed.Annotate("pulling " + key);
  }
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

  std::optional<store::Store> opened;
  std::optional<FileLock> sharing;
  if (o.offline) {
    opened.emplace(store::Store::OpenForReading(o.root));
  } else {
    ASSIGN_OR_RETURN(store::Store s, store::Store::Open(o.root));
    opened.emplace(std::move(s));
    ASSIGN_OR_RETURN(FileLock lock, opened->Share());  // no prune between a lookup and its Use
    sharing.emplace(std::move(lock));
  }
  store::Store& st = *opened;
  for (const auto& d : vm.spec.disks) {
    const spec::Volume* vol = nullptr;
    for (const auto& v : vm.spec.volumes) {
      if (v.name == d.volume_name) vol = &v;
    }
    if (vol && (vol->cloud_init_no_cloud || vol->empty_disk)) {
      return FailedPrecondition("disk " + d.name + " uses volume " + d.volume_name + " (" + vol->SourceField() +
                                "), which regdisk validates but cannot run yet; remove that disk and volume from the "
                                "spec to run the VM with regdisk");
    }
    if (!vol || !vol->registry_disk) {
      return FailedPrecondition("disk " + d.name + " uses volume " + d.volume_name + ", which is not a registry disk");
    }
    auto resolved = ResolveVolume(*vol->registry_disk, secrets, o, st);
    PlannedDisk pd;
    ASSIGN_OR_RETURN(image::ImageName name, image::ImageName::Parse(vol->registry_disk->image));
    pd.stable = st.StablePath(name.String(), o.platform);
    store::StoredImage img;
    if (o.offline && !resolved.ok() && resolved.status().code() == Code::kNotFound) {
      plan.missing.push_back(name.String());
      pd.in_store = false;
      img.disk_file = pd.stable;
      img.disk.format = disk::Format::kQcow2;
    } else {
      if (!resolved.ok()) return std::move(resolved).status();
      img = std::move(*resolved);
      if (!o.offline) {
        ASSIGN_OR_RETURN(FileLock lease, st.Use(img));
        plan.disk_leases.push_back(std::move(lease));
      }
      // A store written before stable paths (or a pull for another
      // --platform) has no link for this name: name the disk itself.
      std::error_code ec;
      if (!fs::exists(pd.stable, ec)) pd.stable = img.disk_file;
    }
    pd.name = d.name;
    pd.device = d.device;
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

namespace {

// A value inside QEMU's "key=value,..." option syntax: commas are doubled,
// so a path cannot end the value and add options of its own.
std::string OptValue(std::string_view v) {
  std::string out;
  for (char c : v) {
    out += c;
    if (c == ',') out += ',';
  }
  return out;
}

// Block nodes and devices go to QEMU as JSON objects, so paths and names
// are strings, never option syntax.
std::string Json(const nlohmann::json& j) { return j.dump(); }

}  // namespace

std::vector<std::string> QemuArgv(const VmPlan& p) {
  std::vector<std::string> a = {p.qemu.string(),
                                "-name", "guest=" + OptValue(p.name) + ",debug-threads=on",
                                "-nodefaults", "-no-user-config",
                                "-machine", "pc", "-accel", p.accel,
                                "-m", std::to_string((p.memory_bytes + (1 << 20) - 1) >> 20) + "M",
                                "-smp", std::to_string(p.cores),
                                "-display", "none",
                                "-chardev", "file,id=serial0,path=" + OptValue(p.console_log.string()),
                                "-serial", "chardev:serial0",
                                "-chardev", "socket,id=qmp,path=" + OptValue(p.qmp_socket.string()) + ",server=on,wait=off",
                                "-mon", "chardev=qmp,mode=control",
                                "-nic", "none"};
  bool any_boot = false;
  for (const auto& d : p.disks) any_boot |= d.boot_order.has_value();
  bool ahci = false, scsi = false;
  int ahci_port = 0;  // an AHCI controller has 6 ports
  for (size_t i = 0; i < p.disks.size(); ++i) {
    const PlannedDisk& d = p.disks[i];
    const std::string n = std::to_string(i);
    // The store's disk, read-only, with its format given (never probed)...
    a.insert(a.end(), {"-blockdev", Json({{"driver", "file"}, {"node-name", "base-file" + n},
                                          {"filename", d.backing.string()}, {"read-only", true}}),
                       "-blockdev", Json({{"driver", std::string(disk::FormatName(d.backing_format))},
                                          {"node-name", "base" + n}, {"file", "base-file" + n}, {"read-only", true}})});
    // ...under this VM's own qcow2 overlay.
    nlohmann::json overlay = {{"driver", "qcow2"}, {"node-name", "disk" + n}, {"file", "overlay-file" + n},
                              {"backing", "base" + n}};
    if (d.read_only) overlay["read-only"] = true;
    a.insert(a.end(), {"-blockdev", Json({{"driver", "file"}, {"node-name", "overlay-file" + n},
                                          {"filename", d.overlay.string()}}),
                       "-blockdev", Json(overlay)});
    nlohmann::json dev = {{"drive", "disk" + n}, {"id", d.name}};
    if (d.boot_order) dev["bootindex"] = *d.boot_order;
    else if (!any_boot && i == 0) dev["bootindex"] = 1;
    const bool cdrom = d.device == "cdrom";
    if (d.bus == "sata") {
      if (!ahci) a.insert(a.end(), {"-device", Json({{"driver", "ahci"}, {"id", "ahci0"}})});
      ahci = true;
      dev["driver"] = cdrom ? "ide-cd" : "ide-hd";
      dev["bus"] = "ahci0." + std::to_string(ahci_port++);
    } else if (d.bus == "scsi") {
      if (!scsi) a.insert(a.end(), {"-device", Json({{"driver", "virtio-scsi-pci"}, {"id", "scsi0"}})});
      scsi = true;
      dev["driver"] = cdrom ? "scsi-cd" : "scsi-hd";
      dev["bus"] = "scsi0.0";
    } else {
      dev["driver"] = "virtio-blk-pci";
    }
    a.insert(a.end(), {"-device", Json(dev)});
  }
  return a;
}

namespace {

// Builds an XML document with libxml2's writer, which escapes every value;
// a string XML 1.0 cannot carry at all (control characters) makes the
// document fail instead of producing something libvirt would misread.
class XmlWriter {
 public:
  XmlWriter() : buf_(xmlBufferCreate()), w_(xmlNewTextWriterMemory(buf_, 0)) {
    xmlTextWriterSetIndent(w_, 1);
    xmlTextWriterSetIndentString(w_, BAD_CAST "  ");
  }
  ~XmlWriter() {
    if (w_) xmlFreeTextWriter(w_);
    xmlBufferFree(buf_);
  }
  XmlWriter(const XmlWriter&) = delete;
  XmlWriter& operator=(const XmlWriter&) = delete;

  XmlWriter& Open(const char* name) { return Check(xmlTextWriterStartElement(w_, BAD_CAST name)); }
  XmlWriter& Attr(const char* name, const std::string& value) {
    if (!Valid(value)) bad_ = value;
    return Check(xmlTextWriterWriteAttribute(w_, BAD_CAST name, BAD_CAST value.c_str()));
  }
  XmlWriter& Text(const std::string& value) {
    if (!Valid(value)) bad_ = value;
    return Check(xmlTextWriterWriteString(w_, BAD_CAST value.c_str()));
  }
  XmlWriter& Close() { return Check(xmlTextWriterEndElement(w_)); }
  // <name attr='value'/> and <name>text</name> in one call.
  XmlWriter& Empty(const char* name, std::initializer_list<std::pair<const char*, std::string>> attrs) {
    Open(name);
    for (const auto& [k, v] : attrs) Attr(k, v);
    return Close();
  }
  XmlWriter& Element(const char* name, const std::string& text) { return Open(name).Text(text).Close(); }

  Result<std::string> Finish() {
    Check(xmlTextWriterEndDocument(w_));
    xmlFreeTextWriter(w_);
    w_ = nullptr;
    if (bad_) return InvalidArgument("the value " + Printable(*bad_, 80) + " cannot be written in XML");
    if (failed_) return Internal("libxml2 could not write the domain XML");
    return std::string(reinterpret_cast<const char*>(xmlBufferContent(buf_)), xmlBufferLength(buf_));
  }

 private:
  XmlWriter& Check(int rc) {
    failed_ |= rc < 0;
    return *this;
  }
  // XML 1.0 has no way to write C0 controls other than tab, CR and LF, and
  // libxml2 expects UTF-8.
  static bool Valid(const std::string& v) {
    for (unsigned char c : v) {
      if (c < 0x20 && c != '\t' && c != '\n' && c != '\r') return false;
    }
    return xmlCheckUTF8(BAD_CAST v.c_str()) != 0;
  }
  xmlBufferPtr buf_;
  xmlTextWriterPtr w_;
  bool failed_ = false;
  std::optional<std::string> bad_;
};

}  // namespace

Result<std::string> DomainXml(const VmPlan& p) {
  XmlWriter x;
  x.Open("domain").Attr("type", p.accel == "kvm" ? "kvm" : "qemu");
  x.Element("name", p.name);
  x.Open("memory").Attr("unit", "KiB").Text(std::to_string((p.memory_bytes + 1023) / 1024)).Close();
  x.Element("vcpu", std::to_string(p.cores));
  x.Open("os").Open("type").Attr("arch", "x86_64").Attr("machine", "pc").Text("hvm").Close().Close();
  x.Open("features").Open("acpi").Close().Close();
  x.Element("on_poweroff", "destroy").Element("on_reboot", "restart").Element("on_crash", "destroy");
  x.Open("devices");
  x.Element("emulator", p.qemu.string());
  bool any_boot = false;
  for (const auto& d : p.disks) any_boot |= d.boot_order.has_value();
  for (size_t i = 0; i < p.disks.size(); ++i) {
    const PlannedDisk& d = p.disks[i];
    // The store's read-only disk; libvirt's transient overlay takes the
    // writes and is discarded when the VM stops (shared backing: any
    // number of VMs use one stored disk).
    x.Open("disk").Attr("type", "file").Attr("device", d.device);
    x.Empty("driver", {{"name", "qemu"}, {"type", std::string(disk::FormatName(d.backing_format))}});
    x.Empty("source", {{"file", (d.stable.empty() ? d.backing : d.stable).string()}});
    x.Empty("target", {{"dev", d.dev}, {"bus", d.bus}});
    if (d.read_only) {
      x.Open("readonly").Close();
    } else {
      x.Empty("transient", {{"shareBacking", "yes"}});
    }
    if (d.boot_order) x.Empty("boot", {{"order", std::to_string(*d.boot_order)}});
    else if (!any_boot && i == 0) x.Empty("boot", {{"order", "1"}});
    x.Close();
  }
  x.Open("serial").Attr("type", "file").Empty("source", {{"path", p.log_file.string()}});
  x.Empty("target", {{"port", "0"}}).Close();
  x.Open("console").Attr("type", "file").Empty("source", {{"path", p.log_file.string()}});
  x.Empty("target", {{"type", "serial"}, {"port", "0"}}).Close();
  x.Close().Close();  // devices, domain
  return x.Finish();
}

}  // namespace regdisk::vm
