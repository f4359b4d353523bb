// regdisk: VM disks in container image registries.
//
// This file declares the command-line flags and hands each command to its
// Run* function (cli/image_commands.cc, cli/vm_commands.cc).
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli/common.h"
#include "cli/docgen.h"
#include "cli/flags.h"
#include "cli/usage.h"
#include "util/log.h"
#include "util/process.h"

namespace regdisk::cli {
namespace {

// Overwrites the password of --creds in our own argv, so that it does not
// linger in /proc/PID/cmdline while a long transfer runs.
void ScrubCredsFromArgv(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    char* value = nullptr;
    if (std::strncmp(argv[i], "--creds=", 8) == 0) {
      value = argv[i] + 8;
    } else if (std::strcmp(argv[i], "--creds") == 0 && i + 1 < argc) {
      value = argv[i + 1];
    }
    if (value == nullptr) continue;
    if (char* colon = std::strchr(value, ':')) std::memset(colon + 1, 'x', std::strlen(colon + 1));
  }
}

// The flags build and base share: how the image is made.
void AddImageFlags(CLI::App* cmd, BuildFlags& f) {
  cmd->add_option("--compression", f.compression, "layer compression: gzip (default), zstd or none")
      ->check(OneOf({"gzip", "zstd", "none"}));
  cmd->add_option("--format", f.format, "oci (default) or docker (schema 2, gzip layers)")->check(OneOf({"oci", "docker"}));
  // One value per flag, so `--label a=b disk.qcow2` leaves the disk alone.
  cmd->add_option("--label", f.labels, "KEY=VALUE label on the image (repeat the flag for more)")
      ->expected(1)
      ->allow_extra_args(false)  // a vector option otherwise takes every word up to the next flag
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->fallthrough();
}

// --timeout and --grace: a duration (cli/flags.h), checked while parsing.
CLI::Option* AddDuration(CLI::App* cmd, const std::string& name, std::chrono::milliseconds& out,
                         const std::string& description) {
  return cmd->add_option_function<std::string>(
      name,
      [name, &out](const std::string& text) {
        auto d = ParseDuration(name, text);
        if (!d.ok()) throw CLI::ValidationError(d.status().message());
        out = *d;
      },
      description);
}

// What `regdisk run` says on stderr when a signal arrives.
std::string RunStopNotice(const RunFlags& f) {
  return "shutting the VM down: ACPI powerdown, then killed if it is still running after " + FormatDuration(f.grace) +
         " (--grace); press Ctrl-C again to stop it at once";
}

int Main(int argc, char** argv) {
  EnsureStdioOpen();
  ::signal(SIGPIPE, SIG_IGN);
  Globals g;
  // Held back until we know whether this command handles them (below), so
  // none lands in the window before the handling thread starts.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&stop_signals, sig);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  CLI::App app{"regdisk: store virtual machine disks in container image registries and boot VMs from them"};
  app.name("regdisk");
  app.require_subcommand(0, 1);
  bool show_version = false;
  app.add_flag("--version", show_version, "print regdisk's version, the API versions it speaks and QEMU's, as regdisk version does");
  if (const char* root = ::getenv("REGDISK_ROOT")) g.root = root;
  if (g.root.empty()) g.root = "/var/lib/regdisk";
  app.add_option("--root", g.root, "node store directory (env REGDISK_ROOT)")->capture_default_str();
  app.add_option("--tls-verify", g.tls_verify,
                 "verify TLS certificates (true|false; false also allows plain HTTP)")
      ->expected(0, 1)
      ->default_str("true");
  app.add_option("--creds", g.creds, "registry credentials USER[:PASS]; without PASS it is read from stdin");
  app.add_option("--authfile", g.authfile, "auth file (containers auth.json or docker config.json)");
  app.add_option("--cert-dir", g.cert_dir, "directory of CA certificates (*.crt) and client keys (*.cert/*.key)");
  app.add_option("--registries-conf", g.registries_conf,
                 "registries.conf to use instead of the standard ones (env CONTAINERS_REGISTRIES_CONF)");
  app.add_option("--platform", g.platform, "OS/ARCH[/VARIANT] to select from an index")->capture_default_str();
  app.add_option("--max-disk-size", g.max_disk_size,
                 "largest disk a pull accepts, file or virtual size (default 1Ti)");
  app.add_option("--log-level", g.log_level, "what to log on stderr: error, warn (default), info or debug")
      ->check(OneOf({"error", "warn", "info", "debug"}));
  app.add_flag("-v,--verbose", g.verbose, "log what happens (--log-level debug)");
  app.add_flag("-q,--quiet", g.quiet, "no progress display and no informational lines");

  std::string from, to;
  bool all = false;
  CLI::App* copy = app.add_subcommand("copy", "copy an image between registries and OCI layouts");
  copy->add_option("source", from, "docker://HOST/REPO[:TAG|@DIGEST] or oci:DIR[:TAG]")->required();
  copy->add_option("destination", to, "docker://HOST/REPO[:TAG] or oci:DIR[:TAG]")->required();
  copy->add_flag("--all,-a", all, "copy every image of an index, not only --platform's");
  copy->fallthrough();

  InspectFlags inspect_flags;
  CLI::App* inspect = app.add_subcommand("inspect", "describe an image as skopeo inspect does, plus its Disk (JSON)");
  inspect->add_option("image", inspect_flags.image, "docker://HOST/REPO[:TAG|@DIGEST] or oci:DIR[:TAG]")->required();
  inspect->add_flag("--raw", inspect_flags.raw, "print the manifest bytes as stored (with --config: the config's)");
  inspect->add_flag("--config", inspect_flags.config, "print the image's config blob");
  inspect->add_flag("--disk", inspect_flags.disk,
                    "read the disk's header (ranged reads of its layer, nothing stored) for the Disk object");
  inspect->add_flag("--no-tags", inspect_flags.no_tags, "do not list the repository's tags (RepoTags stays [])");
  inspect->add_option("-f,--format", inspect_flags.format, "a Go template: {{.Digest}}, {{json .Labels}}, ...");
  inspect->add_option("--path", inspect_flags.path, "with --disk: the disk's path inside the image, when /disk holds several files");
  inspect->fallthrough();
  std::string disk_path;

  std::string pull_ref;
  CLI::App* pull = app.add_subcommand("pull", "pull a registry disk into the node store (--root) and validate it");
  pull->add_option("image", pull_ref, "docker://HOST/REPO[:TAG|@DIGEST] or oci:DIR[:TAG]")->required();
  pull->add_option("--path", disk_path, "the disk's path inside the image, when /disk holds several files");
  bool pull_lazy = false;
  pull->add_flag("--lazy", pull_lazy,
                 "return once the disk is usable (a chunked image is served over NBD at once, and a background "
                 "regdisk fills it and commits it to the store); other images are pulled in full");
  int lazy_owner_fd = -1;
  pull->add_option("--lazy-owner-fd", lazy_owner_fd, "internal: the background owner of a pull --lazy")->group("");
  pull->fallthrough();

  ImagesFlags images_flags;
  CLI::App* images = app.add_subcommand("images", "list the registry disks in the node store (creates nothing)");
  images->add_option("-o,--output", images_flags.output, "text (default) or json");
  images->add_option("--format", images_flags.format, "a Go template per image: {{.Repository}}:{{.Tag}} {{.ID}}, ...");
  images->add_flag("-q,--quiet", images_flags.quiet, "print image IDs only");
  images->add_flag("--digests", images_flags.digests, "add a DIGEST column (the manifest digest)");
  images->add_flag("-n,--noheading", images_flags.no_heading, "leave out the heading line");
  images->fallthrough();

  RmiFlags rmi_flags;
  CLI::App* rmi = app.add_subcommand("rmi", "remove images from the node store by name or ID prefix");
  rmi->add_option("image", rmi_flags.images, "names or IDs (a unique prefix) as regdisk images lists them");
  rmi->add_flag("-a,--all", rmi_flags.all, "remove every image");
  rmi->add_flag("-f,--force", rmi_flags.force,
                "remove names even when a running VM uses the disk (the disk stays until its VMs stop)");
  rmi->fallthrough();
  CLI::App* prune = app.add_subcommand("prune", "delete from the node store what no name refers to and no VM uses");
  prune->fallthrough();

  bool repair = false;
  CLI::App* fsck = app.add_subcommand("fsck", "verify the node store: blobs against their digests, disks, names");
  fsck->add_flag("--repair", repair, "remove what is broken (and names that point to it)");
  fsck->fallthrough();

  BuildFlags bf;
  std::string disk_file;
  CLI::App* build = app.add_subcommand("build", "make a registry disk from a qcow2 or raw disk, without a container engine");
  build->add_option("disk", disk_file, "the qcow2 or raw disk image")->required();
  build->add_option("-t,--tag", bf.tag, "where to put it: docker://HOST/REPO:TAG or oci:DIR:TAG")->required();
  build->add_option("--base", bf.base, "an image to build on (default: none, a single-layer image)");
  build->add_option("--name", bf.name, "file name under /disk (default: the disk's own name)");
  AddImageFlags(build, bf);
  build->add_option("--layout", bf.layout, "stream (default: one compressed stream) or chunked (raw disk, zstd frames "
                    "per chunk, pulled in parallel; docs/chunked-format.md)")->check(OneOf({"stream", "chunked"}));
  build->add_option("--chunk-size", bf.chunk_size, "chunk size with --layout chunked: a power of two, 64K..16M "
                    "(default 256K; more for disks over 341 GiB, whose index would not fit)");

  RunFlags rf;
  CLI::App* run = app.add_subcommand("run", "run a VM from a spec on ephemeral registry disks, console on stdout");
  run->add_option("-f,--filename", rf.file, "the VM spec (one VirtualMachine, and the Secrets it names)")->required();
  AddDuration(run, "--timeout", rf.timeout, "stop the VM after this long, such as 90s, 10m or 1h (default: run until it powers off)");
  AddDuration(run, "--grace", rf.grace, "time from ACPI powerdown to kill when stopping (default 10s)");
  run->add_option("--qemu", rf.qemu, "the QEMU binary (default: qemu-system-x86_64 on PATH)");
  run->add_option("--accel", rf.accel, "auto (default: KVM when usable, else TCG), kvm or tcg")->check(OneOf({"auto", "kvm", "tcg"}));
  run->add_option("-p,--publish", rf.publish,
                  "publish a guest port on the host: [[IP:][HOSTPORT]:]PORT[/tcp|udp] (repeatable; declared ports get a "
                  "free loopback port by default)");
  run->add_option("--network", rf.network, "bridge=NAME: put the VM's interface on a host bridge with a tap (root)");
  run->add_option("--vnc", rf.vnc,
                  "a VNC display for the guest's screen, IPV4ADDRESS:DISPLAY (port 5900+DISPLAY), such as 127.0.0.1:0; "
                  "VNC has no password: keep it on 127.0.0.1 (regdisk warns about any other address)");
  run->add_flag("--lazy,!--no-lazy", rf.lazy,
                "boot a chunked image that is not in the store before it has arrived, from a verified on-demand "
                "export, while it fills in the background (default); --no-lazy pulls every disk in full first");
  run->fallthrough();
  CLI::App* domxml = app.add_subcommand("domxml", "print the libvirt domain XML of a VM spec, offline (no pulls)");
  domxml->add_option("-f,--filename", rf.file, "the VM spec")->required();
  domxml->add_option("--qemu", rf.qemu, "the QEMU binary to name as emulator");
  domxml->add_option("--accel", rf.accel, "auto, kvm or tcg")->check(OneOf({"auto", "kvm", "tcg"}));
  domxml->add_option("--network", rf.network, "bridge=NAME: the interface on a host bridge");
  domxml->add_option("--vnc", rf.vnc,
                     "a VNC display, IPV4ADDRESS:DISPLAY, such as 127.0.0.1:0 (no password: regdisk warns about any "
                     "address but loopback)");
  domxml->fallthrough();

  // The client commands: the daemon's API over its unix socket.
  ClientFlags client;
  std::vector<std::pair<CLI::Option*, CLI::Option*>> client_opts;  // --socket and -n of each client command
  auto add_client_flags = [&client, &client_opts](CLI::App* cmd) {
    CLI::Option* socket = cmd->add_option("--socket", client.socket, "the daemon's unix socket (env REGDISK_SOCKET)")
                              ->envname("REGDISK_SOCKET")
                              ->capture_default_str();
    cmd->add_option("--kubeconfig", client.kubeconfig,
                    "talk to the API server this kubeconfig names over TLS, such as ROOT/kubeconfig from regdisk serve "
                    "--listen (env REGDISK_KUBECONFIG, used when neither --socket nor REGDISK_SOCKET is given; KUBECONFIG is "
                    "not read)");
    CLI::Option* ns = cmd->add_option("-n,--namespace", client.namespace_,
                                      "the namespace (default: the kubeconfig context's, else default)");
    client_opts.emplace_back(socket, ns);
    cmd->fallthrough();
  };
  std::string port_vm, port_port;
  CLI::App* port = app.add_subcommand(
      "port", "list a VM's published ports, as podman port does: a foreground regdisk run VM, else the daemon's VMI");
  port->add_option("vm", port_vm, "the VM's metadata.name (default: every foreground VM under --root)");
  port->add_option("port", port_port, "PORT[/tcp|udp]: print only the host address it is published on");
  add_client_flags(port);

  std::string apply_file;
  CLI::App* apply = app.add_subcommand("apply", "create or update objects from YAML or JSON in the daemon, as kubectl apply");
  apply->add_option("-f,--filename", apply_file, "the file (several documents allowed), or - for stdin")->required();
  add_client_flags(apply);

  GetFlags get_flags;
  CLI::App* get = app.add_subcommand("get", "list or show objects of the daemon, as kubectl get (kubectl's columns)");
  get->add_option("kind", get_flags.kind, "vmi, vm, vmirs, secret... (names, short names and plurals as kubectl)")
      ->required();
  get->add_option("names", get_flags.names, "the objects' names (default: all)");
  get->add_option("-o,--output", get_flags.output, "wide, json, yaml or name (default: a table)")
      ->check(OneOf({"wide", "json", "yaml", "name"}));
  get->add_option("-l,--selector", get_flags.selector, "a label selector, such as app=web");
  get->add_option("--field-selector", get_flags.field_selector,
                  "a field selector, such as metadata.name=web-x7k2p or status.phase!=Running (VMIs); =, == and !=");
  get->add_flag("-A,--all-namespaces", get_flags.all_namespaces, "list the objects of every namespace");
  get->add_flag("-w,--watch", get_flags.watch, "after listing, print changes as they happen (until interrupted)");
  add_client_flags(get);

  DeleteFlags delete_flags;
  CLI::App* del = app.add_subcommand("delete", "delete objects of the daemon by kind and name or by file, as kubectl delete");
  del->add_option("args", delete_flags.args, "KIND NAME...");
  del->add_option("-f,--filename", delete_flags.file, "delete the objects a file names (- for stdin)");
  del->add_flag("--wait", delete_flags.wait,
                "wait until each object is gone, its finalizers done (the default; --wait=false returns at once)");
  del->add_option("--cascade", delete_flags.cascade,
                  "background (the default), foreground (the owner goes after its VMIs) or orphan (its VMIs stay)")
      ->check(CLI::IsMember({"background", "foreground", "orphan"}));
  add_client_flags(del);

  std::string scale_kind, scale_name;
  int64_t scale_replicas = -1;
  CLI::App* scale = app.add_subcommand("scale", "set a replica set's replicas, as kubectl scale");
  scale->add_option("kind", scale_kind, "vmirs (or another kind with a scale subresource)")->required();
  scale->add_option("name", scale_name, "the replica set")->required();
  scale->add_option("--replicas", scale_replicas, "the number of VMIs to keep running")->required();
  add_client_flags(scale);

  std::string logs_vmi;
  bool logs_follow = false;
  CLI::App* logs = app.add_subcommand("logs", "print a daemon VMI's serial console log");
  logs->add_option("vmi", logs_vmi, "the VirtualMachineInstance")->required();
  logs->add_flag("-f,--follow", logs_follow, "keep printing what the guest writes until the VMI stops");
  add_client_flags(logs);

  std::string console_vmi;
  CLI::App* console = app.add_subcommand("console", "attach to a daemon VMI's serial console (Ctrl-] detaches)");
  console->add_option("vmi", console_vmi, "the VirtualMachineInstance")->required();
  add_client_flags(console);

  ServeFlags serve_flags;
  CLI::App* serve = app.add_subcommand("serve", "serve the node's Kubernetes-shaped API (kubectl) on a unix socket and TLS");
  serve->add_option("--socket", serve_flags.socket, "the API's unix socket, owner only (env REGDISK_SOCKET)")
      ->envname("REGDISK_SOCKET")
      ->capture_default_str();
  serve->add_option("--listen", serve_flags.listen,
                    "also serve TLS on ADDR:PORT (port 0: any free one); writes ROOT/kubeconfig for kubectl");
  serve->add_option("--auth", serve_flags.auth,
                    "what the TLS endpoint accepts and ROOT/kubeconfig carries: token (a bearer token, the default) "
                    "or cert (a client certificate its own CA issued)")
      ->check(OneOf({"token", "cert"}));
  serve->add_option("--qemu", serve_flags.qemu, "the QEMU binary for the node's VMs (default: qemu-system-x86_64 on PATH)");
  serve->add_option("--accel", serve_flags.accel, "auto (KVM when usable, else TCG), kvm or tcg")
      ->check(CLI::IsMember({"auto", "kvm", "tcg"}));
  serve->add_option("--node-name", serve_flags.node_name, "the name VMIs report as status.nodeName (default: the host name)");
  serve->add_flag("--stop-vms", serve_flags.stop_vms,
                  "stop every VM when the daemon exits (default: VMs keep running and the next daemon adopts them)");
  serve->add_flag("--lazy,!--no-lazy", serve_flags.lazy,
                  "boot VMs from a chunked image while it is pulled, one export per image shared by the node's VMs "
                  "(default); --no-lazy pulls every disk in full first");
  serve->add_flag("--api-only", serve_flags.api_only,
                  "serve the API over the store and run no VM and no controller (to inspect or edit a node's state)");
  serve->fallthrough();

  BuildFlags base_flags;
  CLI::App* base = app.add_subcommand("base", "publish the base image for the Dockerfile workflow (FROM it, ADD disk /disk)");
  base->add_option("-t,--tag", base_flags.tag, "where to put it: docker://HOST/REPO:TAG or oci:DIR:TAG")->required();
  AddImageFlags(base, base_flags);

  std::string spec_file, output = "text";
  CLI::App* validate = app.add_subcommand("validate", "check VM specs (KubeVirt YAML or JSON) and apply defaults");
  validate->add_option("-f,--filename", spec_file, "the spec file, or - for stdin")->required();
  validate->add_option("-o,--output", output, "text (default), json or yaml: the parsed objects with defaults, quantities as written");
  validate->fallthrough();

  LoginFlags login_flags;
  CLI::App* login = app.add_subcommand("login", "check credentials with a registry and store them in the auth file");
  login->add_option("registry", login_flags.registry, "HOST[:PORT][/NAMESPACE]")->required();
  login->add_option("-u,--username", login_flags.username, "user name (asked on a terminal when left out)");
  login->add_flag("--password-stdin", login_flags.password_stdin, "read the password from stdin");
  login->add_flag("--get-login", login_flags.get_login, "print the user name stored for the registry");
  login->fallthrough();
  CLI::App* logout = app.add_subcommand("logout", "remove a registry's credentials from the auth file");
  logout->add_option("registry", login_flags.registry, "HOST[:PORT][/NAMESPACE]");
  logout->add_flag("-a,--all", login_flags.all, "remove the credentials of every registry");
  logout->fallthrough();

  std::string version_output = "text";
  CLI::App* version = app.add_subcommand("version", "print regdisk's version, the OCI and KubeVirt API versions it speaks, and QEMU's");
  version->add_option("-o,--output", version_output, "text (default) or json")->check(OneOf({"text", "json"}));
  version->fallthrough();

  std::string shell;
  CLI::App* completion = app.add_subcommand("completion", "print the shell completion script for bash, zsh or fish");
  completion->add_option("shell", shell, "the shell: bash, zsh or fish")->required()->check(OneOf({"bash", "zsh", "fish"}));
  completion->fallthrough();

  // Hidden (no group): the build writes the man pages and completion files
  // that cmake --install installs with it.
  std::string docs_dir;
  CLI::App* gendocs = app.add_subcommand("generate-docs", "write man pages and completion scripts into a directory");
  gendocs->group("");
  gendocs->add_option("dir", docs_dir, "the directory")->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return ReportParseError(app, e);
  }
  ScrubCredsFromArgv(argc, argv);
  if (show_version) return RunVersion("text");
  if (app.get_subcommands().empty()) {
    return Fail(InvalidArgument("regdisk needs a command, such as regdisk pull IMAGE; regdisk --help lists them"));
  }
  if (g.root.empty()) {
    return Fail(InvalidArgument("--root needs a directory (it is empty); leave it out for /var/lib/regdisk"));
  }
  // "--tls-verify" alone means true.
  if (app.get_option("--tls-verify")->count() > 0 && g.tls_verify.empty()) g.tls_verify = "true";
  log::SetLevel(g.verbose ? log::Level::kDebug : *log::ParseLevel(g.log_level));
  log::SetQuiet(g.quiet);

  // Commands whose long work checks the cancellation token; before any
  // thread starts.
  if (*copy || *inspect || *pull || *run || *serve) {
    if (*run) SetStopNotice(RunStopNotice(rf));
    CancelOnSignals(g.cancel);
  } else {
    pthread_sigmask(SIG_UNBLOCK, &stop_signals, nullptr);  // the default: a signal ends the command
  }

  if (*copy) return RunCopy(g, from, to, all);
  if (*inspect) return RunInspect(g, inspect_flags);
  if (*pull && lazy_owner_fd != -1 && (!pull_lazy || lazy_owner_fd < 3)) {
    return Fail(InvalidArgument("--lazy-owner-fd is regdisk's own (pull --lazy passes it to its background copy); "
                                "leave it out"));
  }
  if (*pull) return pull_lazy ? RunPullLazy(g, pull_ref, disk_path, lazy_owner_fd) : RunPull(g, pull_ref, disk_path);
  if (*images) return RunImages(g, images_flags);
  if (*rmi) return RunRmi(g, rmi_flags);
  if (*prune) return RunPrune(g);
  if (*fsck) return RunFsck(g, repair);
  if (*validate) return RunValidate(spec_file, output);
  bf.compression_given = build->get_option("--compression")->count() > 0;
  if (*build) return RunBuild(g, bf, disk_file);
  if (*run) return RunRun(g, rf);
  if (*domxml) return RunDomxml(g, rf);
  for (const auto& [socket, ns] : client_opts) {
    client.socket_set = client.socket_set || socket->count() > 0;
    client.namespace_set = client.namespace_set || ns->count() > 0;
  }
  if (*port) return RunPortCommand(g, client, port_vm, port_port);
  if (*apply) return RunApply(g, client, apply_file);
  if (*get) return RunGet(g, client, get_flags);
  if (*del) return RunDelete(g, client, delete_flags);
  if (*scale) return RunScale(g, client, scale_kind, scale_name, scale_replicas);
  if (*logs) return RunLogs(g, client, logs_vmi, logs_follow);
  if (*console) return RunConsole(g, client, console_vmi);
  if (*serve) return RunServe(g, serve_flags);
  if (*base) return RunBuild(g, base_flags, "");
  if (*login) return RunLogin(g, login_flags);
  if (*logout) return RunLogout(g, login_flags);
  if (*version) return RunVersion(version_output);
  if (*completion) {
    std::fputs(CompletionScript(app, shell).c_str(), stdout);
    return 0;
  }
  if (*gendocs) {
    Status st = WriteDocs(app, docs_dir, Version());
    return st.ok() ? 0 : Fail(st.Annotate("writing the documentation"));
  }
  return 2;
}

}  // namespace
}  // namespace regdisk::cli

int main(int argc, char** argv) { return regdisk::cli::Main(argc, argv); }
