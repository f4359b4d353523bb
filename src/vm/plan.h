// From a validated VirtualMachine spec to what QEMU (or libvirt) needs:
// each disk's verified backing file in the node store, its ephemeral
// overlay, memory, CPUs and accelerator, and the command line or domain XML.
//
//   ASSIGN_OR_RETURN(VmPlan plan, PlanVm(vm, secrets, store, options));
//   std::vector<std::string> argv = QemuArgv(plan);
//   ASSIGN_OR_RETURN(std::string xml, DomainXml(plan));
#pragma once

#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "disk/format.h"
#include "registry/client.h"
#include "spec/spec.h"
#include "store/store.h"
#include "util/fs.h"
#include "util/ipv4.h"
#include "util/status.h"
#include "blockserve/lazy_pool.h"
#include "blockserve/lazy_pull.h"
#include "vm/cloudinit.h"

namespace regdisk::vm {

struct PlannedDisk {
  std::string name;
  // A cloudInitNoCloud disk: the VM's own seed image (raw ISO 9660), made
  // by the runner in run_dir from these contents; no store disk, no
  // overlay. The contents may hold secrets: never logged.
  std::optional<NoCloudSeed> seed;
  std::string device = "disk";  // disk | cdrom
  std::string dev;  // vda, sda, ...
  std::string bus;  // virtio | sata | scsi (a cdrom: sata | scsi)
  bool read_only = false;  // a cdrom always is
  std::optional<int> boot_order;
  std::filesystem::path backing;  // the store's read-only disk
  // A disk still being pulled (lazy boot): its NBD export, which QEMU reads
  // as the backing node instead of `backing` (then the filling file, named
  // in the overlay's header only).
  std::filesystem::path nbd_socket;
  disk::Format backing_format = disk::Format::kRaw;
  uint64_t virtual_size = 0;
  std::filesystem::path overlay;  // qcow2, per VM, mode 0600
  // The store's stable name for this image and platform (a link to the
  // disk that Store::Pull keeps current); domxml names it, so a libvirt
  // domain stays valid when the image is pulled again.
  std::filesystem::path stable;
  bool in_store = true;  // false: offline, and the disk has not been pulled
  // The volume's image as the spec names it, and the manifest it resolved
  // to (for a tag: what the tag named when it was pulled or looked up).
  std::string image;
  std::optional<oci::Digest> manifest_digest;
};

// A host port forwarded to the guest.
struct PublishedPort {
  std::string name;      // the spec's port name, or empty
  std::string protocol;  // tcp | udp
  int guest_port = 0;
  std::string host_ip = "127.0.0.1";
  int host_port = 0;     // 0 in offline plans: chosen when the VM runs
  std::string String() const;  // "80/tcp -> 127.0.0.1:34567", as podman port prints it
};

// A NIC and its backend: QEMU's user-mode network of its own (no root, no
// host configuration; the guest gets address .2 of the network by DHCP,
// the gateway is .1 and DNS .3, as KubeVirt's masquerade binding lays it
// out), or a tap on a host bridge.
struct PlannedNic {
  std::string name;
  std::string model;  // the spec's: virtio, e1000, ...
  std::string mac;    // aa:bb:cc:dd:ee:ff
  std::string bridge;  // a host bridge (run --network bridge=NAME); empty: user-mode
  int tap_fd = -1;     // bridge: the tap the runner opened (QEMU inherits it)
  Ipv4Network network;  // user-mode only
  std::vector<PublishedPort> ports;  // user-mode only
  std::string GuestAddress() const { return Ipv4String(network.Host(2)); }
};

struct VmPlan {
  std::string name;       // metadata.name
  std::string namespace_;
  int64_t memory_bytes = 0;
  int cores = 1;
  std::string accel;      // kvm | tcg
  std::filesystem::path qemu;
  std::filesystem::path run_dir;      // overlays and sockets
  std::filesystem::path qmp_socket;
  std::filesystem::path console_socket;  // the serial console (run_dir/console.sock)
  std::filesystem::path log_file;  // ROOT/logs/NS_NAME.log: QEMU logs the console here
  std::vector<PlannedDisk> disks;
  std::vector<PlannedNic> nics;
  std::string vnc;  // QEMU -vnc display ("127.0.0.1:0"); empty: none
  // The VM's claims on its disks in the node store (Store::Use): held for
  // as long as the plan lives, so rmi and prune keep those disks.
  std::vector<FileLock> disk_leases;
  // Disks served while they fill (PlanOptions::lazy): each stops its fill
  // and export when the plan goes, so the plan must outlive QEMU.
  std::vector<std::shared_ptr<blockserve::LazyPull>> lazy_pulls;
  // The images (as the store knows them) that lazy_pulls serve, in order.
  std::vector<std::string> lazy_images;
  // What the runner tells the user once, before the console: how each
  // registry disk was pulled when that is not the usual (lazy boot).
  std::vector<std::string> notes;
  // Offline plans: the images that are not in the store (a pull would be needed).
  std::vector<std::string> missing;
};

struct PlanOptions {
  std::filesystem::path root;      // node store
  std::filesystem::path qemu;      // empty: qemu-system-x86_64 on PATH
  std::string accel = "auto";      // auto | kvm | tcg
  registry::ClientOptions client;  // for pulls
  oci::Platform platform{"linux", "amd64", ""};
  // Pull progress (see store::PullOptions); may be empty.
  image::ProgressFn on_progress;
  store::DiskTree::Limits disk_limits;  // for pulls
  std::shared_ptr<const CancelToken> cancel;  // ends a pull early
  // Ports to publish beyond (or instead of the automatic host port of) the
  // ones the spec declares: --publish [[IP:][HOSTPORT]:]PORT[/PROTO].
  std::vector<PublishedPort> publish;
  std::string bridge;  // --network bridge=NAME
  std::string vnc;     // --vnc ADDRESS:DISPLAY
  // domxml: read the store only (no pulls, no locks, nothing created);
  // a disk not in the store is planned at its stable path with the format
  // assumed qcow2 and listed in VmPlan::missing.
  bool offline = false;
  // Lazy boot: a chunked image that is not in the store is served over NBD
  // as soon as its index is verified, and fills in the background; other
  // images are pulled in full first (and the plan logs so, once).
  bool lazy = false;
  blockserve::LazyPullOptions lazy_options;
  // Shares one pull and export per image among the plans that use the
  // pool (the node daemon's VMs); without one, each plan pulls its own.
  blockserve::LazyPool* lazy_pool = nullptr;
};

// Pulls what the pull policies ask for and fills in every path. The Secrets
// are those of the same file (imagePullSecret, cloud-init secretRef).
// Creates nothing under run_dir. Every declared port without a --publish of
// its own gets a free loopback port (not in offline plans). A disk on an
// emptyDisk volume is a FailedPrecondition naming it.
Result<VmPlan> PlanVm(const spec::VirtualMachine& vm, const std::vector<spec::Secret>& secrets, const PlanOptions& options,
                      const std::filesystem::path& run_dir);

// Parses one --publish value: [[IP:][HOSTPORT]:]PORT[/tcp|udp] (podman's
// form); HOSTPORT 0 or absent: a free port chosen at run time.
Result<PublishedPort> ParsePublish(std::string_view text);

// The MAC regdisk gives an interface without macAddress: locally
// administered, unicast, and the same for the same namespace, VM and
// interface names (so a VM keeps its MAC across runs, and replicas, whose
// names differ, get different ones).
std::string StableMac(const std::string& namespace_, const std::string& vm, const std::string& interface);

// The QEMU command line: -nodefaults, -blockdev with explicit formats, the
// store's disk opened read-only under a qcow2 overlay, the serial console on
// a unix socket (logged to console_log by QEMU itself), QMP on a unix
// socket, the NICs as planned. Disks are virtio-blk, ide-hd on an AHCI
// controller (sata) or scsi-hd on virtio-scsi; a cdrom is ide-cd (sata) or
// scsi-cd, read-only, as KubeVirt attaches one.
std::vector<std::string> QemuArgv(const VmPlan& plan);

// The equivalent libvirt domain XML, written with libxml2 (every value
// escaped); a value XML cannot carry is an error. Each disk is the store's
// read-only disk at its stable path as a <transient shareBacking='yes'/>
// disk: libvirt puts a per-VM overlay over it and discards it when the VM
// stops, as regdisk run does. ACPI is on (so a shutdown request reaches
// the guest).
Result<std::string> DomainXml(const VmPlan& plan);

}  // namespace regdisk::vm
