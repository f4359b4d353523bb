#include "vm/plan.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <ctime>

#include <fstream>

#include <fmt/core.h>
#include <libxml/xmlwriter.h>
#include <nlohmann/json.hpp>

#include "image/transport.h"
#include "oci/digest.h"
#include "registry/http.h"
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
// its policy says; a short name tries its candidates (registries.conf) in
// order. `key` is the name the store knows the disk by; with offline plans
// and a disk not in the store, NotFound and the first candidate's name.
struct ResolvedVolume {
  std::string key;
  store::StoredImage image;
  std::shared_ptr<blockserve::LazyPull> lazy;  // served while it fills
  std::filesystem::path nbd_socket;
  std::string note;  // for VmPlan::notes
};

Result<ResolvedVolume> ResolveVolume(const spec::RegistryDiskSource& src, const std::vector<spec::Secret>& secrets,
                                     const PlanOptions& o, store::Store& st, std::string& first_key) {
  ASSIGN_OR_RETURN(std::vector<image::ImageName> candidates, image::CandidateNames(src.image, o.client.registries.get()));
  first_key = candidates.front().String();
  if (src.image_pull_policy != "Always" || o.offline) {
    for (const auto& name : candidates) {
      ASSIGN_OR_RETURN(std::optional<store::StoredImage> have, st.Lookup(name.String(), o.platform));
      if (have && (src.path.empty() || have->disk_path == src.path)) return ResolvedVolume{name.String(), *have, nullptr, {}, {}};
    }
    if (o.offline) return NotFound(first_key);  // PlanVm lists it as missing
    if (src.image_pull_policy == "Never") {
      return FailedPrecondition("image " + src.image + " is not in the node store and its imagePullPolicy is Never; run "
                                "regdisk pull " + first_key + " first");
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
  store::PullOptions po;
  po.platform = o.platform;
  po.path = src.path;
  po.on_progress = o.on_progress;
  po.limits = o.disk_limits;
  po.cancel = o.cancel;
  std::string tried;
  Status failed;
  for (const auto& name : candidates) {
    const std::string key = name.String();
    log::Info("pulling {}", key);
    // Lazy boot: served while it fills when chunked, else pulled in full.
    auto fully = [&]() -> Result<ResolvedVolume> {
      ASSIGN_OR_RETURN(std::unique_ptr<image::ImageSource> source, image::OpenSource(name, copts));
      ASSIGN_OR_RETURN(store::StoredImage img, st.Pull(*source, key, po));
      return ResolvedVolume{key, std::move(img), nullptr, {}, {}};
    };
    auto lazily = [&]() -> Result<ResolvedVolume> {
      // Without nbdkit or regdisk's plugin there is no export: pull in full.
      const fs::path& given = o.lazy_options.export_options.plugin;
      Result<fs::path> plugin = given.empty() ? blockserve::FindNbdkitPlugin()
                                : fs::exists(given) ? Result<fs::path>(given)
                                                    : Result<fs::path>(NotFound(given.string() + " does not exist"));
      const bool have_nbdkit = !FindExecutable(o.lazy_options.export_options.nbdkit).empty();
      if (!plugin.ok() || !have_nbdkit) {
        ASSIGN_OR_RETURN(ResolvedVolume rv, fully());
        rv.note = "lazy boot needs nbdkit and regdisk's nbdkit plugin (" +
                  (have_nbdkit ? plugin.status().message() : std::string("nbdkit is not on PATH")) +
                  "), so " + Printable(key) + " was pulled in full before boot";
        return rv;
      }
      auto start = [&]() -> Result<std::unique_ptr<blockserve::LazyPull>> {
        // A shared pull outlives this VM's start: it ends with its own
        // token when the pool lets it go, not with this start's.
        registry::ClientOptions lazy_copts = copts;
        store::PullOptions lazy_po = po;
        if (o.lazy_pool != nullptr) {
          lazy_copts.cancel = nullptr;
          lazy_po.cancel = nullptr;
          // Nor does it report to this start's progress callback, which
          // refers to the start's own state (its commit may come long
          // after the start returned).
          lazy_po.on_progress = nullptr;
        }
        ASSIGN_OR_RETURN(std::unique_ptr<image::ImageSource> source, image::OpenSource(name, lazy_copts));
        return blockserve::LazyPull::Start(st, std::move(source), key, lazy_po, o.lazy_options);
      };
      std::shared_ptr<blockserve::LazyPull> pull;
      if (o.lazy_pool != nullptr) {
        ASSIGN_OR_RETURN(pull, o.lazy_pool->Acquire(key + "@" + o.platform.String(), start));
      } else {
        ASSIGN_OR_RETURN(pull, start());
      }
      // A shared pull that has committed its disk: boot from the store, as
      // a VM started after any pull would (its export is the earlier VMs').
      if (o.lazy_pool != nullptr && pull->Ended() && pull->Wait().ok()) return fully();
      ASSIGN_OR_RETURN(blockserve::LazyPull::Disk disk, pull->Ready(copts.cancel.get()));
      if (disk.stored) {
        // A shared pull resolved another VM's path: this one pulls its own.
        if (!src.path.empty() && src.path != disk.stored->disk_path) return fully();
        ResolvedVolume rv{key, std::move(*disk.stored), nullptr, {}, {}};
        rv.note = Printable(key) + (disk.arrived ? " arrived in full before boot"
                                                 : " is not a chunked image, so it was pulled in full before boot");
        return rv;
      }
      if (!src.path.empty() && src.path != disk.image_path) {
        return NotFound("the image holds " + Printable(disk.image_path) + ", not " + Printable(src.path));
      }
      ResolvedVolume rv;
      rv.key = key;
      rv.image.name = key;
      rv.image.disk_path = disk.image_path;
      rv.image.disk_file = disk.file;
      rv.image.disk.format = disk::Format::kRaw;
      rv.image.disk.virtual_size = rv.image.disk.file_size = disk.size;
      rv.image.manifest_digest = disk.manifest;
      rv.nbd_socket = disk.socket;
      rv.note = pull->joined()
                    ? Printable(key) + " is booting while it is pulled, from the export of the regdisk process "
                                       "pulling it (lazy boot: that process fetches and verifies what the guest reads)"
                    : Printable(key) + " is booting while it is pulled (lazy boot: chunks are fetched and verified as "
                                       "the guest reads them)";
      rv.lazy = std::move(pull);
      return rv;
    };
    Result<ResolvedVolume> got = o.lazy ? lazily() : fully();
    if (got.ok()) return got;
    failed = std::move(got).status();
    // The registry is unreachable but the store has the tag: say so.
    if (failed.code() == Code::kUnavailable || failed.code() == Code::kDeadlineExceeded) {
      auto have = st.Lookup(key, o.platform);
      if (have.ok() && *have) {
        failed = Status(failed.code(), failed.message() + "; the node store has a copy of " + key +
                                           ", which imagePullPolicy: IfNotPresent would use");
      }
    }
    failed = failed.Annotate("pulling " + key);
    if (candidates.size() == 1 || failed.code() == Code::kCancelled) return failed;
    tried += (tried.empty() ? "" : "; ") + failed.message();
  }
  return Status(failed.code(), "short name " + Printable(src.image, 200) +
                                   " matched no image in the unqualified-search registries: " + tried);
}

// The instance id cloud-init keys its once-per-instance work on: fresh for
// every run, as KubeVirt gives every VMI a new UID.
std::string NewInstanceId() {
  auto uuid = ReadFileCapped("/proc/sys/kernel/random/uuid", 64);
  std::string id = uuid.ok() ? *uuid : "";
  while (!id.empty() && (id.back() == '\n' || id.back() == ' ')) id.pop_back();
  return id.empty() ? oci::Digest::Sha256Of(std::to_string(::getpid()) + std::to_string(::time(nullptr))).hex().substr(0, 32)
                    : id;
}

// The seed's contents from the spec: inline, base64 or a Secret of the file.
Result<NoCloudSeed> SeedFor(const spec::VirtualMachine& vm, const spec::CloudInitNoCloudSource& src,
                            const std::vector<spec::Secret>& secrets) {
  auto from_secret = [&](const std::string& name, bool user) -> Result<std::string> {
    for (const auto& s : secrets) {
      if (s.metadata.name != name) continue;
      if (const std::string* v = spec::CloudInitSecretData(s, user)) return *v;
    }
    return FailedPrecondition(std::string("the cloud-init ") + (user ? "user" : "network") + " data of VM " +
                              vm.metadata.name + " names Secret " + name + ", which is not in the file or has no " +
                              (user ? "userdata" : "networkdata") + " key; add it to the file");
  };
  // The one source the parser allowed: inline, base64 or a Secret; none.
  auto pick = [&](const std::string& text, const std::string& base64, const std::string& secret,
                  bool user) -> Result<std::optional<std::string>> {
    if (!text.empty()) return std::optional<std::string>(text);
    if (!base64.empty()) {
      ASSIGN_OR_RETURN(std::string decoded, registry::Base64Decode(base64));
      return std::optional<std::string>(std::move(decoded));
    }
    if (!secret.empty()) {
      ASSIGN_OR_RETURN(std::string value, from_secret(secret, user));
      return std::optional<std::string>(std::move(value));
    }
    return std::optional<std::string>();
  };
  NoCloudSeed seed;
  seed.instance_id = NewInstanceId();
  seed.local_hostname = vm.metadata.name;
  ASSIGN_OR_RETURN(std::optional<std::string> user, pick(src.user_data, src.user_data_base64, src.user_data_secret, true));
  seed.user_data = user.value_or("");
  ASSIGN_OR_RETURN(seed.network_config, pick(src.network_data, src.network_data_base64, src.network_data_secret, false));
  return seed;
}

// Binds TCP or UDP `port` on `ip` (0: a free one, as the kernel picks it)
// and returns the port with the socket that holds it: the caller keeps
// every such socket open until all of a VM's ports are chosen, so no two
// get the same one. Another program could take a port before QEMU binds
// it; QEMU then fails to start, saying so.
Result<std::pair<int, UniqueFd>> BindPort(const std::string& ip, int port, const std::string& protocol) {
  UniqueFd fd(::socket(AF_INET, (protocol == "udp" ? SOCK_DGRAM : SOCK_STREAM) | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return ErrnoStatus("opening a socket to find a free port");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  if (::inet_pton(AF_INET, ip.c_str(), &a.sin_addr) != 1) return InvalidArgument("\"" + ip + "\" is not an IPv4 address");
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    return ErrnoStatus(port == 0 ? "finding a free " + protocol + " port on " + ip : "binding it");
  }
  socklen_t len = sizeof a;
  if (::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&a), &len) != 0) return ErrnoStatus("getsockname");
  return std::make_pair(static_cast<int>(ntohs(a.sin_port)), std::move(fd));
}

// The name of a disk's files in the run directory (its overlay, or its
// seed): the spec's disk name when it is a DNS label, as KubeVirt's names
// are, else "disk_" and its index (which no DNS label can be). A name is
// data: "../x" or "a/b" must not put a file outside the run directory.
std::string DiskFileStem(const std::string& name, size_t index) {
  const bool label = !name.empty() && name.size() <= 63 && name.front() != '-' &&
                     std::all_of(name.begin(), name.end(), [](char c) {
                       return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-';
                     });
  return label ? name : "disk_" + std::to_string(index);
}

bool BridgeExists(const std::string& name) {
  std::error_code ec;
  return name.find('/') == std::string::npos && fs::is_directory(fs::path("/sys/class/net") / name / "bridge", ec);
}

// The spec's interfaces, with --publish and --network bridge= applied.
// Host ports are chosen later, by ChooseHostPorts. Two ports that name the
// same host port are refused here.
Result<std::vector<PlannedNic>> PlanNics(const spec::VirtualMachine& vm, const PlanOptions& o) {
  std::vector<PlannedNic> nics;
  std::vector<PublishedPort> extra = o.publish;
  if (vm.spec.interfaces.empty() && !extra.empty()) {
    return FailedPrecondition("--publish needs a network interface, and VM " + vm.metadata.name +
                              " has none (autoattachPodInterface: false); remove --publish or give the VM an interface");
  }
  if (!o.bridge.empty()) {
    if (!BridgeExists(o.bridge)) {
      return NotFound("--network bridge=" + o.bridge + ": there is no bridge " + Printable(o.bridge, 40) +
                      " on this host; create it (ip link add NAME type bridge) or leave --network out");
    }
    if (::geteuid() != 0 || ::access("/dev/net/tun", R_OK | W_OK) != 0) {
      return PermissionDenied("--network bridge=" + o.bridge +
                              " needs root and /dev/net/tun (regdisk makes a tap on the bridge); run as root, or leave "
                              "--network out for user-mode networking");
    }
    if (!extra.empty()) {
      return InvalidArgument("--publish applies to user-mode networking; with --network bridge= the guest is on the "
                             "bridge's network, reach it at its own address");
    }
  }
  for (size_t i = 0; i < vm.spec.interfaces.size(); ++i) {
    const spec::Interface& iface = vm.spec.interfaces[i];
    PlannedNic nic;
    nic.name = iface.name;
    nic.model = iface.model;
    nic.mac = iface.mac_address.empty() ? StableMac(vm.metadata.namespace_, vm.metadata.name, iface.name)
                                        : iface.mac_address;
    std::replace(nic.mac.begin(), nic.mac.end(), '-', ':');
    for (const auto& n : vm.spec.networks) {
      if (n.name != iface.name) continue;
      ASSIGN_OR_RETURN(nic.network, ParseIpv4Cidr(n.vm_network_cidr));
    }
    if (!o.bridge.empty()) {
      nic.bridge = o.bridge;
      nics.push_back(std::move(nic));
      continue;
    }
    for (const auto& port : iface.ports) {
      PublishedPort pp;
      pp.name = port.name;
      pp.protocol = port.protocol == "UDP" ? "udp" : "tcp";
      pp.guest_port = port.port;
      // A --publish of this port says where it goes.
      for (auto it = extra.begin(); it != extra.end(); ++it) {
        if (it->guest_port == pp.guest_port && it->protocol == pp.protocol) {
          pp.host_ip = it->host_ip;
          pp.host_port = it->host_port;
          extra.erase(it);
          break;
        }
      }
      nic.ports.push_back(pp);
    }
    if (i == 0) {  // ports the spec does not declare go to the first NIC
      for (auto& pp : extra) nic.ports.push_back(pp);
      extra.clear();
    }
    nics.push_back(std::move(nic));
  }
  std::vector<const PublishedPort*> fixed;
  for (const auto& nic : nics) {
    for (const auto& pp : nic.ports) {
      if (pp.host_port == 0) continue;
      for (const PublishedPort* other : fixed) {
        if (other->protocol == pp.protocol && other->host_port == pp.host_port &&
            (other->host_ip == pp.host_ip || other->host_ip == "0.0.0.0" || pp.host_ip == "0.0.0.0")) {
          return InvalidArgument("--publish: " + other->String() + " and " + pp.String() +
                                 " use the same host port; give each its own HOSTPORT, or leave it out for a free one");
        }
      }
      fixed.push_back(&pp);
    }
  }
  return nics;
}

// Gives every port without a host port a free one. The host ports that
// --publish named are bound first and every probe stays bound until all
// are chosen, so the kernel never hands out one of them, nor one port twice.
// A named host port that another program holds is refused here rather than
// by QEMU.
Status ChooseHostPorts(std::vector<PlannedNic>& nics) {
  std::vector<UniqueFd> probes;  // held until every port is chosen
  for (auto& nic : nics) {
    for (auto& pp : nic.ports) {
      if (pp.host_port == 0) continue;
      auto held = BindPort(pp.host_ip, pp.host_port, pp.protocol);
      if (!held.ok()) {
        return Status(held.status().code(), "--publish: host port " + pp.host_ip + ":" + std::to_string(pp.host_port) +
                                                 "/" + pp.protocol + " for guest port " + std::to_string(pp.guest_port) +
                                                 " cannot be used (" + held.status().message() +
                                                 "); choose another HOSTPORT, or leave it out for a free one");
      }
      probes.push_back(std::move(held->second));
    }
  }
  for (auto& nic : nics) {
    for (auto& pp : nic.ports) {
      if (pp.host_port != 0) continue;
      ASSIGN_OR_RETURN(auto port, BindPort(pp.host_ip, 0, pp.protocol));
      pp.host_port = port.first;
      probes.push_back(std::move(port.second));
    }
  }
  return OkStatus();
}

}  // namespace

std::string PublishedPort::String() const {
  return std::to_string(guest_port) + "/" + protocol + " -> " + host_ip + ":" + std::to_string(host_port);
}

Result<PublishedPort> ParsePublish(std::string_view text) {
  const std::string shown = Printable(text, 80);
  auto usage = [&] {
    return InvalidArgument("--publish " + shown + " is not [[IP:][HOSTPORT]:]PORT[/tcp|udp]; e.g. 8080:80 or 127.0.0.1:8080:80/tcp");
  };
  PublishedPort p;
  std::string_view rest = text;
  if (size_t slash = rest.rfind('/'); slash != std::string_view::npos) {
    std::string proto(rest.substr(slash + 1));
    std::transform(proto.begin(), proto.end(), proto.begin(), [](unsigned char c) { return std::tolower(c); });
    if (proto != "tcp" && proto != "udp") return usage();
    p.protocol = proto;
    rest = rest.substr(0, slash);
  } else {
    p.protocol = "tcp";
  }
  std::vector<std::string_view> parts;
  for (size_t start = 0;;) {
    size_t colon = rest.find(':', start);
    parts.push_back(rest.substr(start, colon == std::string_view::npos ? std::string_view::npos : colon - start));
    if (colon == std::string_view::npos) break;
    start = colon + 1;
  }
  if (parts.size() > 3) return usage();
  auto number = [](std::string_view v, int& out, bool zero_ok) {
    if (v.empty() || v.size() > 5 || !std::all_of(v.begin(), v.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      return false;
    }
    out = std::stoi(std::string(v));
    return out <= 65535 && (zero_ok || out > 0);
  };
  if (!number(parts.back(), p.guest_port, false)) return usage();
  if (parts.size() >= 2 && !parts[parts.size() - 2].empty() && !number(parts[parts.size() - 2], p.host_port, true)) {
    return usage();
  }
  if (parts.size() == 3) {
    in_addr a{};
    std::string ip(parts[0]);
    if (ip.empty()) ip = "127.0.0.1";
    if (::inet_pton(AF_INET, ip.c_str(), &a) != 1) {
      return InvalidArgument("--publish " + shown + ": " + Printable(ip, 40) + " is not an IPv4 address of this host");
    }
    p.host_ip = ip;
  }
  return p;
}

std::string StableMac(const std::string& namespace_, const std::string& vm, const std::string& interface) {
  std::string hex = oci::Digest::Sha256Of("regdisk-mac\n" + namespace_ + "\n" + vm + "\n" + interface).hex();
  // 02: locally administered, unicast.
  return "02:" + hex.substr(0, 2) + ":" + hex.substr(2, 2) + ":" + hex.substr(4, 2) + ":" + hex.substr(6, 2) + ":" +
         hex.substr(8, 2);
}

Result<VmPlan> PlanVm(const spec::VirtualMachine& vm, const std::vector<spec::Secret>& secrets, const PlanOptions& o,
                      const fs::path& run_dir) {
  VmPlan plan;
  plan.name = vm.metadata.name;
  plan.namespace_ = vm.metadata.namespace_;
  plan.memory_bytes = vm.spec.memory_bytes;
  plan.cores = vm.spec.cores;
  plan.run_dir = run_dir;
  plan.qmp_socket = run_dir / "qmp.sock";
  plan.console_socket = run_dir / "console.sock";
  plan.vnc = o.vnc;
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
  if (!o.vnc.empty()) {
    size_t colon = o.vnc.rfind(':');
    std::string host = colon == std::string::npos ? "" : o.vnc.substr(0, colon);
    std::string display = colon == std::string::npos ? "" : o.vnc.substr(colon + 1);
    in_addr a{};
    if (::inet_pton(AF_INET, host.c_str(), &a) != 1 || display.empty() || display.size() > 2 ||
        !std::all_of(display.begin(), display.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      return InvalidArgument("--vnc takes IPV4ADDRESS:DISPLAY (display 0-99, port 5900+display), such as 127.0.0.1:0, not " +
                             Printable(o.vnc, 60));
    }
    // VNC asks for no password: on any address but loopback, whoever
    // reaches the port sees and drives the guest.
    if ((ntohl(a.s_addr) >> 24) != 127) {
      log::Warn("--vnc {}: VNC has no password, and {} is not a loopback address: anyone who can reach port {} there "
                "sees and controls the guest's screen; use 127.0.0.1:{} (with an SSH tunnel for a remote viewer) "
                "unless that network is trusted",
                o.vnc, host, 5900 + std::stoi(display), display);
    }
  }

  uint64_t available = HostMemoryAvailable();
  if (available > 0 && static_cast<uint64_t>(plan.memory_bytes) > available) {
    return ResourceExhausted(fmt::format("VM {} asks for {} MiB of memory but the host has only {} MiB available; lower "
                                         "spec.domain.resources.requests.memory or free memory",
                                         plan.name, plan.memory_bytes >> 20, available >> 20));
  }

  // Before any pull: a bad --publish is refused with nothing fetched.
  ASSIGN_OR_RETURN(plan.nics, PlanNics(vm, o));

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
  for (size_t index = 0; index < vm.spec.disks.size(); ++index) {
    const spec::Disk& d = vm.spec.disks[index];
    const std::string stem = DiskFileStem(d.name, index);
    const spec::Volume* vol = nullptr;
    for (const auto& v : vm.spec.volumes) {
      if (v.name == d.volume_name) vol = &v;
    }
    if (vol && vol->empty_disk) {
      return FailedPrecondition("disk " + d.name + " uses volume " + d.volume_name + " (" + vol->SourceField() +
                                "), which regdisk validates but cannot run yet; remove that disk and volume from the "
                                "spec to run the VM with regdisk");
    }
    if (vol && vol->cloud_init_no_cloud) {
      ASSIGN_OR_RETURN(NoCloudSeed seed, SeedFor(vm, *vol->cloud_init_no_cloud, secrets));
      PlannedDisk pd;
      pd.name = d.name;
      pd.device = d.device;
      pd.dev = d.dev;
      pd.bus = d.bus;
      pd.read_only = d.read_only;
      pd.boot_order = d.boot_order;
      pd.backing = run_dir / (stem + ".cidata.iso");
      pd.stable = pd.backing;
      pd.backing_format = disk::Format::kRaw;
      pd.seed = std::move(seed);
      plan.disks.push_back(std::move(pd));
      continue;
    }
    if (!vol || !vol->registry_disk) {
      return FailedPrecondition("disk " + d.name + " uses volume " + d.volume_name + ", which is not a registry disk");
    }
    std::string first_key;
    auto resolved = ResolveVolume(*vol->registry_disk, secrets, o, st, first_key);
    PlannedDisk pd;
    store::StoredImage img;
    if (o.offline && !resolved.ok() && resolved.status().code() == Code::kNotFound && !first_key.empty()) {
      pd.stable = st.StablePath(first_key, o.platform);
      plan.missing.push_back(first_key);
      pd.in_store = false;
      img.disk_file = pd.stable;
      img.disk.format = disk::Format::kQcow2;
    } else {
      if (!resolved.ok()) return std::move(resolved).status();
      pd.stable = st.StablePath(resolved->key, o.platform);
      img = std::move(resolved->image);
      pd.image = vol->registry_disk->image;
      pd.manifest_digest = img.manifest_digest;
      if (!resolved->note.empty()) plan.notes.push_back("disk " + d.name + ": " + resolved->note);
      if (resolved->lazy) {
        // Served while it fills: there is no store disk to lease yet.
        pd.nbd_socket = resolved->nbd_socket;
        // Readers of another's export first: destroyed first if planning
        // fails (an owner waits for its readers; another disk of this VM
        // may read this one's export). A planned VM's pulls go through
        // ReleaseReadersFirst.
        const bool reader = resolved->lazy->joined();
        plan.lazy_pulls.insert(reader ? plan.lazy_pulls.begin() : plan.lazy_pulls.end(), std::move(resolved->lazy));
        plan.lazy_images.insert(reader ? plan.lazy_images.begin() : plan.lazy_images.end(), resolved->key);
      } else if (!o.offline) {
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
    pd.overlay = run_dir / (stem + ".qcow2");
    plan.disks.push_back(std::move(pd));
  }
  // Chosen last, so the ports are free as close as can be to QEMU's start.
  if (!o.offline) RETURN_IF_ERROR(ChooseHostPorts(plan.nics));
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
                                // The console: a socket regdisk (or a later
                                // attach) connects to, and everything the guest
                                // writes in the VM's log, by QEMU itself. QEMU
                                // waits for the first connection before it starts
                                // the guest, so no early line is missed.
                                "-chardev", "socket,id=serial0,path=" + OptValue(p.console_socket.string()) +
                                                ",server=on,wait=on,logfile=" + OptValue(p.log_file.string()) +
                                                ",logappend=on",
                                "-serial", "chardev:serial0",
                                "-chardev", "socket,id=qmp,path=" + OptValue(p.qmp_socket.string()) + ",server=on,wait=off",
                                "-mon", "chardev=qmp,mode=control"};
  if (p.vnc.empty()) {
    a.insert(a.end(), {"-display", "none"});
  } else {
    a.insert(a.end(), {"-display", "none", "-vnc", OptValue(p.vnc), "-device", "VGA"});
  }
  if (p.nics.empty()) a.insert(a.end(), {"-nic", "none"});
  for (size_t i = 0; i < p.nics.size(); ++i) {
    const PlannedNic& nic = p.nics[i];
    const std::string id = "net" + std::to_string(i);
    nlohmann::json netdev = {{"id", id}};
    if (!nic.bridge.empty()) {
      // The runner opens the tap on the bridge and QEMU inherits it.
      netdev["type"] = "tap";
      netdev["fd"] = std::to_string(nic.tap_fd);
    } else {
      const Ipv4Network& n = nic.network;
      netdev["type"] = "user";
      netdev["net"] = n.String();
      netdev["host"] = Ipv4String(n.Host(1));
      netdev["dhcpstart"] = Ipv4String(n.Host(2));
      netdev["dns"] = Ipv4String(n.Host(3));
      netdev["hostname"] = p.name;
      netdev["ipv6"] = false;
      nlohmann::json fwd = nlohmann::json::array();
      for (const auto& port : nic.ports) {
        fwd.push_back({{"str", port.protocol + ":" + port.host_ip + ":" + std::to_string(port.host_port) + "-" +
                                   nic.GuestAddress() + ":" + std::to_string(port.guest_port)}});
      }
      if (!fwd.empty()) netdev["hostfwd"] = fwd;
    }
    static const std::map<std::string, std::string> kDevices = {{"virtio", "virtio-net-pci"}, {"e1000", "e1000"},
                                                                {"e1000e", "e1000e"}, {"rtl8139", "rtl8139"},
                                                                {"ne2k_pci", "ne2k_pci"}, {"pcnet", "pcnet"}};
    auto dev = kDevices.find(nic.model);
    a.insert(a.end(), {"-netdev", Json(netdev), "-device",
                       Json({{"driver", dev == kDevices.end() ? "virtio-net-pci" : dev->second}, {"netdev", id},
                             {"mac", nic.mac}, {"id", "nic-" + nic.name}})});
  }
  bool any_boot = false;
  for (const auto& d : p.disks) any_boot |= d.boot_order.has_value();
  bool ahci = false, scsi = false;
  int ahci_port = 0;  // an AHCI controller has 6 ports
  for (size_t i = 0; i < p.disks.size(); ++i) {
    const PlannedDisk& d = p.disks[i];
    const std::string n = std::to_string(i);
    if (d.seed) {
      // The VM's own cloud-init seed: raw, no overlay (it is removed with the VM).
      nlohmann::json seed = {{"driver", "raw"}, {"node-name", "disk" + n}, {"file", "seed-file" + n}};
      if (d.read_only) seed["read-only"] = true;
      a.insert(a.end(), {"-blockdev", Json({{"driver", "file"}, {"node-name", "seed-file" + n},
                                            {"filename", d.backing.string()}, {"read-only", d.read_only}}),
                         "-blockdev", Json(seed)});
    } else {
      // The store's disk, read-only, with its format given (never probed)
      // (or, while it is still being pulled, its NBD export)...
      nlohmann::json base = {{"driver", "file"}, {"node-name", "base-file" + n},
                             {"filename", d.backing.string()}, {"read-only", true}};
      if (!d.nbd_socket.empty()) {
        // reconnect-delay: when the export's nbdkit is replaced (its owner
        // died with it and a reader of the export took over, starting
        // another on the same socket), QEMU reconnects, and the guest's
        // reads wait for it up to the lazy read deadline.
        base = {{"driver", "nbd"},
                {"node-name", "base-file" + n},
                {"server", {{"type", "unix"}, {"path", d.nbd_socket.string()}}},
                {"reconnect-delay", 60},
                {"read-only", true}};
      }
      a.insert(a.end(), {"-blockdev", Json(base),
                         "-blockdev", Json({{"driver", std::string(disk::FormatName(d.backing_format))},
                                            {"node-name", "base" + n}, {"file", "base-file" + n}, {"read-only", true}})});
      // ...under this VM's own qcow2 overlay.
      nlohmann::json overlay = {{"driver", "qcow2"}, {"node-name", "disk" + n}, {"file", "overlay-file" + n},
                                {"backing", "base" + n}};
      if (d.read_only) overlay["read-only"] = true;
      a.insert(a.end(), {"-blockdev", Json({{"driver", "file"}, {"node-name", "overlay-file" + n},
                                            {"filename", d.overlay.string()}}),
                         "-blockdev", Json(overlay)});
    }
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
    } else if (!d.seed) {  // a seed is the VM's own file
      x.Empty("transient", {{"shareBacking", "yes"}});
    }
    if (d.boot_order) x.Empty("boot", {{"order", std::to_string(*d.boot_order)}});
    else if (!any_boot && i == 0) x.Empty("boot", {{"order", "1"}});
    x.Close();
  }
  for (const auto& nic : p.nics) {
    x.Open("interface").Attr("type", nic.bridge.empty() ? "user" : "bridge");
    if (!nic.bridge.empty()) x.Empty("source", {{"bridge", nic.bridge}});
    x.Empty("mac", {{"address", nic.mac}});
    x.Empty("model", {{"type", nic.model}});
    if (nic.bridge.empty()) {
      x.Empty("ip", {{"family", "ipv4"}, {"address", Ipv4String(nic.network.network)},
                     {"prefix", std::to_string(nic.network.prefix)}});
    }
    x.Close();
  }
  if (!p.vnc.empty()) {
    size_t colon = p.vnc.rfind(':');
    int display = colon == std::string::npos ? 0 : std::atoi(p.vnc.c_str() + colon + 1);
    x.Empty("graphics", {{"type", "vnc"}, {"port", std::to_string(5900 + display)},
                         {"listen", colon == std::string::npos ? p.vnc : p.vnc.substr(0, colon)}});
    x.Open("video").Empty("model", {{"type", "vga"}}).Close();
  }
  x.Open("serial").Attr("type", "file").Empty("source", {{"path", p.log_file.string()}});
  x.Empty("target", {{"port", "0"}}).Close();
  x.Open("console").Attr("type", "file").Empty("source", {{"path", p.log_file.string()}});
  x.Empty("target", {{"type", "serial"}, {"port", "0"}}).Close();
  x.Close().Close();  // devices, domain
  return x.Finish();
}

}  // namespace regdisk::vm
