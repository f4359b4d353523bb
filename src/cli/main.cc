// regdisk: VM disks in container image registries.
//
// This file wires command-line flags to the library; each command is a
// short function that turns flags into library calls and a Status into an
// exit code and one sentence on stderr.
#include <signal.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "image/build.h"
#include "image/copy.h"
#include "image/transport.h"
#include "registry/auth.h"
#include "registry/client.h"
#include "spec/spec.h"
#include "store/store.h"
#include "util/fs.h"
#include "util/log.h"
#include "vm/plan.h"
#include "vm/runner.h"

namespace regdisk::cli {
namespace {

using json = nlohmann::json;

struct Globals {
  std::string root;
  std::string tls_verify;  // "", "true" or "false"
  std::string creds;
  std::string authfile;
  std::string cert_dir;
  std::string platform = "linux/amd64";
  bool verbose = false;
};

// --creds USER without a password: read it from stdin (without echo on a
// terminal), so it never has to appear on a command line.
Result<registry::Credentials> ResolveCreds(const std::string& flag) {
  ASSIGN_OR_RETURN(registry::Credentials c, registry::ParseCredsFlag(flag));
  if (flag.find(':') != std::string::npos) return c;
  bool tty = ::isatty(STDIN_FILENO) != 0;
  termios old{};
  if (tty) {
    std::fprintf(stderr, "Password for %s: ", c.username.c_str());
    ::tcgetattr(STDIN_FILENO, &old);
    termios quiet = old;
    quiet.c_lflag &= ~static_cast<tcflag_t>(ECHO);
    ::tcsetattr(STDIN_FILENO, TCSANOW, &quiet);
  }
  std::getline(std::cin, c.password);
  if (tty) {
    ::tcsetattr(STDIN_FILENO, TCSANOW, &old);
    std::fprintf(stderr, "\n");
  }
  if (!c.password.empty() && c.password.back() == '\r') c.password.pop_back();
  return c;
}

Result<registry::ClientOptions> MakeClientOptions(const Globals& g) {
  registry::ClientOptions o;
  if (g.tls_verify == "false") {
    o.tls_verify = false;
  } else if (g.tls_verify == "true") {
    o.tls_verify = true;
  } else if (!g.tls_verify.empty()) {
    return InvalidArgument("--tls-verify takes true or false, not \"" + g.tls_verify + "\"");
  }
  o.cert_dir = g.cert_dir;
  o.auth.authfile = g.authfile;
  if (!g.creds.empty()) {
    ASSIGN_OR_RETURN(registry::Credentials c, ResolveCreds(g.creds));
    o.auth.explicit_creds = c;
  }
  // Test hooks: shorter timeouts and back-off, so fault tests stay quick.
  if (const char* s = ::getenv("REGDISK_STALL_TIMEOUT_SECONDS")) o.limits.stall_timeout = std::chrono::seconds(std::atoi(s));
  if (const char* s = ::getenv("REGDISK_BACKOFF_MS")) o.backoff_base = std::chrono::milliseconds(std::atoi(s));
  if (const char* s = ::getenv("REGDISK_CHUNK_THRESHOLD")) o.chunk_threshold = std::strtoull(s, nullptr, 10);
  if (const char* s = ::getenv("REGDISK_CHUNK_SIZE")) o.chunk_size = std::strtoull(s, nullptr, 10);
  return o;
}

int Fail(const Status& st) {
  std::fprintf(stderr, "regdisk: error: %s\n", st.message().c_str());
  return st.code() == Code::kInvalidArgument ? 2 : 1;
}

int RunCopy(const Globals& g, const std::string& from, const std::string& to, bool all) {
  auto opts = MakeClientOptions(g);
  if (!opts.ok()) return Fail(opts.status());
  auto platform = oci::Platform::Parse(g.platform);
  if (!platform.ok()) return Fail(platform.status());
  auto src_name = image::ImageName::Parse(from);
  if (!src_name.ok()) return Fail(src_name.status());
  auto dst_name = image::ImageName::Parse(to);
  if (!dst_name.ok()) return Fail(dst_name.status());
  auto src = image::OpenSource(*src_name, *opts);
  if (!src.ok()) return Fail(src.status());
  // A layout this copy creates is removed again if the copy fails.
  std::error_code ec;
  bool new_layout = dst_name->transport == image::ImageName::Transport::kOciLayout &&
                    !std::filesystem::exists(dst_name->dir, ec);
  auto discard = [&] {
    if (new_layout) std::filesystem::remove_all(dst_name->dir, ec);
  };
  auto dst = image::OpenDestination(*dst_name, *opts);
  if (!dst.ok()) {
    discard();
    return Fail(dst.status());
  }
  image::CopyOptions copts;
  copts.platform = *platform;
  copts.all = all;
  auto r = image::Copy(**src, **dst, copts);
  if (!r.ok()) {
    discard();
    return Fail(r.status().Annotate("copying " + src_name->String() + " to " + dst_name->String()));
  }
  std::printf("%s\n", r->digest.str().c_str());
  log::Info("copied {} blobs ({} bytes), {} already present", r->blobs_copied, r->bytes_copied, r->blobs_present);
  return 0;
}

// A progress line on stderr for pulls, redrawn in place, when stderr is a
// terminal (logs and pipes get none).
std::function<void(size_t, size_t, uint64_t, uint64_t)> TerminalProgress() {
  if (!::isatty(STDERR_FILENO)) return {};
  struct State {
    std::chrono::steady_clock::time_point start, shown;
    uint64_t start_bytes = 0;
    size_t layer = SIZE_MAX;
  };
  auto st = std::make_shared<State>();
  return [st](size_t layer, size_t layers, uint64_t done, uint64_t total) {
    const auto now = std::chrono::steady_clock::now();
    const bool last = done >= total;
    if (layer != st->layer) {  // the rate counts from a layer's first report
      st->layer = layer;
      st->start = st->shown = now;
      st->start_bytes = done;
      if (!last) return;
    }
    if (!last && now - st->shown < std::chrono::milliseconds(200)) return;
    st->shown = now;
    const double secs = std::chrono::duration<double>(now - st->start).count();
    std::string rate;
    if (secs > 0.05) rate = fmt::format(" ({:.0f} MiB/s)", static_cast<double>(done - st->start_bytes) / (1 << 20) / secs);
    std::fprintf(stderr, "\rlayer %zu/%zu: %.1f of %.1f MiB%s%s", layer + 1, layers,
                 static_cast<double>(done) / (1 << 20), static_cast<double>(total) / (1 << 20), rate.c_str(),
                 last ? "\n" : "   ");
  };
}

// Pulls `ref` into the node store under --root; used by pull and inspect --disk.
Result<store::StoredImage> PullToStore(const Globals& g, const std::string& ref, const std::string& path) {
  ASSIGN_OR_RETURN(registry::ClientOptions opts, MakeClientOptions(g));
  ASSIGN_OR_RETURN(oci::Platform platform, oci::Platform::Parse(g.platform));
  ASSIGN_OR_RETURN(image::ImageName name, image::ImageName::Parse(ref));
  ASSIGN_OR_RETURN(store::Store st, store::Store::Open(g.root));
  ASSIGN_OR_RETURN(std::unique_ptr<image::ImageSource> src, image::OpenSource(name, opts));
  store::PullOptions po;
  po.platform = platform;
  po.path = path;
  po.on_progress = TerminalProgress();
  auto img = st.Pull(*src, name.String(), po);
  if (!img.ok()) return std::move(img).status().Annotate("pulling " + name.String());
  return img;
}

int RunPull(const Globals& g, const std::string& ref, const std::string& path) {
  auto img = PullToStore(g, ref, path);
  if (!img.ok()) return Fail(img.status());
  std::printf("%s\n", img->manifest_digest.str().c_str());
  log::Info("{}: {} disk {} ({} bytes virtual)", img->name, disk::FormatName(img->disk.format), img->disk_path,
            img->disk.virtual_size);
  return 0;
}

int RunImages(const Globals& g, const std::string& output) {
  auto st = store::Store::Open(g.root);
  if (!st.ok()) return Fail(st.status());
  auto list = st->List();
  if (!list.ok()) return Fail(list.status());
  if (output == "json") {
    json out = json::array();
    for (const auto& img : *list) out.push_back(img.ToJson());
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  if (output != "text") return Fail(InvalidArgument("-o takes text or json, not \"" + output + "\""));
  std::printf("%-60s %-19s %-6s %14s %14s\n", "IMAGE", "DIGEST", "FORMAT", "VIRTUAL SIZE", "SIZE");
  for (const auto& img : *list) {
    std::printf("%-60s %-19s %-6s %14llu %14llu\n", img.name.c_str(), img.manifest_digest.Short().c_str(),
                std::string(disk::FormatName(img.disk.format)).c_str(),
                static_cast<unsigned long long>(img.disk.virtual_size), static_cast<unsigned long long>(img.disk.file_size));
  }
  return 0;
}

// rmi (names given) and prune (none).
int RunRemove(const Globals& g, const std::vector<std::string>& refs, bool prune) {
  auto st = store::Store::Open(g.root);
  if (!st.ok()) return Fail(st.status());
  std::vector<std::string> names;
  for (const auto& ref : refs) {
    auto name = image::ImageName::Parse(ref);
    if (!name.ok()) return Fail(name.status());
    names.push_back(name->String());
  }
  auto r = prune ? st->Prune() : st->Remove(names);
  if (!r.ok()) return Fail(r.status());
  for (const auto& n : names) std::printf("removed %s\n", n.c_str());
  for (const auto& d : r->disks_in_use) {
    std::fprintf(stderr, "regdisk: kept disk %s: a running VM uses it (regdisk prune removes it once the VM stops)\n",
                 d.c_str());
  }
  std::printf("freed %.1f MiB: %d disks, %d blobs\n", static_cast<double>(r->bytes_freed) / (1 << 20), r->disks_removed,
              r->blobs_removed);
  return 0;
}

int RunInspect(const Globals& g, const std::string& ref, bool raw, bool disk, const std::string& path) {
  if (disk) {
    auto img = PullToStore(g, ref, path);
    if (!img.ok()) return Fail(img.status());
    std::printf("%s\n", img->ToJson().dump(2).c_str());
    return 0;
  }
  auto opts = MakeClientOptions(g);
  if (!opts.ok()) return Fail(opts.status());
  auto platform = oci::Platform::Parse(g.platform);
  if (!platform.ok()) return Fail(platform.status());
  auto name = image::ImageName::Parse(ref);
  if (!name.ok()) return Fail(name.status());
  auto src = image::OpenSource(*name, *opts);
  if (!src.ok()) return Fail(src.status());
  if (raw) {
    auto m = (*src)->GetManifest();
    if (!m.ok()) return Fail(m.status().Annotate("inspecting " + name->String()));
    std::fwrite(m->bytes.data(), 1, m->bytes.size(), stdout);
    return 0;
  }
  auto j = image::Inspect(**src, *platform);
  if (!j.ok()) return Fail(j.status().Annotate("inspecting " + name->String()));
  std::printf("%s\n", j->dump(2).c_str());
  return 0;
}

struct BuildFlags {
  std::string tag;
  std::string base;
  std::string name;
  std::string compression;  // empty: zstd, or gzip with --format docker
  std::string format = "oci";
  std::vector<std::string> labels;
};

Result<image::BuildOptions> MakeBuildOptions(const Globals& g, const BuildFlags& f) {
  image::BuildOptions o;
  o.name = f.name;
  o.compression = !f.compression.empty() ? f.compression : f.format == "docker" ? "gzip" : "zstd";
  o.format = f.format;
  ASSIGN_OR_RETURN(o.platform, oci::Platform::Parse(g.platform));
  for (const auto& l : f.labels) {
    size_t eq = l.find('=');
    if (eq == std::string::npos || eq == 0) return InvalidArgument("--label \"" + l + "\" is not of the form KEY=VALUE");
    o.labels[l.substr(0, eq)] = l.substr(eq + 1);
  }
  if (!f.base.empty()) {
    ASSIGN_OR_RETURN(image::ImageName base, image::ImageName::Parse(f.base));
    o.base = base;
  }
  return o;
}

// build DISK -t DEST, and base -t DEST: prints the manifest digest.
int RunBuild(const Globals& g, const BuildFlags& f, const std::string& disk_file) {
  auto opts = MakeClientOptions(g);
  if (!opts.ok()) return Fail(opts.status());
  auto bo = MakeBuildOptions(g, f);
  if (!bo.ok()) return Fail(bo.status());
  auto dest = image::ImageName::Parse(f.tag);
  if (!dest.ok()) return Fail(dest.status().Annotate("-t"));
  std::error_code ec;
  bool new_layout = dest->transport == image::ImageName::Transport::kOciLayout && !std::filesystem::exists(dest->dir, ec);
  auto r = disk_file.empty() ? image::BuildBaseImage(*dest, *bo, *opts) : image::BuildDiskImage(disk_file, *dest, *bo, *opts);
  if (!r.ok()) {
    if (new_layout) std::filesystem::remove_all(dest->dir, ec);
    return Fail(r.status().Annotate((disk_file.empty() ? "publishing the base image to " : "building " + disk_file + " into ") +
                                    dest->String()));
  }
  std::printf("%s\n", r->manifest.str().c_str());
  log::Info("layer {} ({} bytes)", r->layer.digest.Short(), r->layer.size);
  return 0;
}

// Reads a spec file that must hold exactly one VirtualMachine (plus any
// Secrets it names). Diagnostics go to stderr.
Result<std::pair<spec::VirtualMachine, std::vector<spec::Secret>>> LoadOneVm(const std::string& file) {
  ASSIGN_OR_RETURN(std::string text, ReadFileCapped(file, (1 << 20) + 1));
  spec::ParseResult r = spec::ParseSpecs(text, file);
  for (const auto& d : r.diagnostics) std::fprintf(stderr, "%s\n", d.ToString().c_str());
  if (!r.ok()) return InvalidArgument(file + " is not a valid VM spec (see above); check it with regdisk validate -f " + file);
  std::vector<spec::VirtualMachine> vms;
  std::vector<spec::Secret> secrets;
  for (auto& o : r.objects) {
    if (auto* vm = std::get_if<spec::VirtualMachine>(&o)) vms.push_back(*vm);
    if (auto* s = std::get_if<spec::Secret>(&o)) secrets.push_back(*s);
  }
  if (vms.size() != 1) {
    return InvalidArgument(file + " holds " + std::to_string(vms.size()) +
                           " VirtualMachines; regdisk run and domxml take exactly one");
  }
  return std::make_pair(vms[0], secrets);
}

struct RunFlags {
  std::string file;
  int timeout = 0;
  int grace = 10;
  std::string qemu;
  std::string accel = "auto";
};

Result<vm::PlanOptions> MakePlanOptions(const Globals& g, const RunFlags& f) {
  vm::PlanOptions p;
  p.root = g.root;
  p.qemu = f.qemu;
  p.accel = f.accel;
  ASSIGN_OR_RETURN(p.client, MakeClientOptions(g));
  ASSIGN_OR_RETURN(p.platform, oci::Platform::Parse(g.platform));
  p.on_progress = TerminalProgress();
  return p;
}

int RunRun(const Globals& g, const RunFlags& f) {
  auto loaded = LoadOneVm(f.file);
  if (!loaded.ok()) return Fail(loaded.status());
  auto plan = MakePlanOptions(g, f);
  if (!plan.ok()) return Fail(plan.status());
  vm::RunOptions ro;
  ro.plan = *plan;
  ro.timeout = std::chrono::seconds(f.timeout);
  ro.grace = std::chrono::seconds(f.grace);
  Status st = vm::RunVm(loaded->first, loaded->second, ro);
  if (!st.ok()) return Fail(st.Annotate("running VM " + loaded->first.metadata.name));
  return 0;
}

int RunDomxml(const Globals& g, const RunFlags& f) {
  auto loaded = LoadOneVm(f.file);
  if (!loaded.ok()) return Fail(loaded.status());
  auto po = MakePlanOptions(g, f);
  if (!po.ok()) return Fail(po.status());
  const auto& vmspec = loaded->first;
  auto plan = vm::PlanVm(vmspec, loaded->second, *po,
                         std::filesystem::path(g.root) / "run" / (vmspec.metadata.namespace_ + "_" + vmspec.metadata.name));
  if (!plan.ok()) return Fail(plan.status().Annotate("planning VM " + vmspec.metadata.name));
  std::fputs(vm::DomainXml(*plan).c_str(), stdout);
  return 0;
}

// validate -f FILE: every diagnostic on stderr; exit 1 on any error.
int RunValidate(const std::string& file, const std::string& output) {
  if (output != "text" && output != "json") {
    return Fail(InvalidArgument("-o takes text or json, not \"" + output + "\""));
  }
  std::string text;
  if (file == "-") {
    text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  } else {
    auto t = ReadFileCapped(file, (1 << 20) + 1);
    if (!t.ok()) return Fail(t.status().Annotate("reading the VM spec"));
    text = std::move(*t);
  }
  spec::ParseResult r = spec::ParseSpecs(text, file == "-" ? "<stdin>" : file);
  for (const auto& d : r.diagnostics) std::fprintf(stderr, "%s\n", d.ToString().c_str());
  if (!r.ok()) return 1;
  if (output == "json") {
    json out;
    if (r.objects.size() == 1) {
      out = spec::ToJson(r.objects[0]);
    } else {
      out = {{"apiVersion", "v1"}, {"kind", "List"}, {"items", json::array()}};
      for (const auto& o : r.objects) out["items"].push_back(spec::ToJson(o));
    }
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  for (const auto& o : r.objects) std::printf("%s: %s: valid\n", file.c_str(), spec::Describe(o).c_str());
  return 0;
}

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

int Main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  CLI::App app{"regdisk: store virtual machine disks in container image registries and boot VMs from them"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "regdisk 0.1.0");
  Globals g;
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
  app.add_option("--platform", g.platform, "OS/ARCH[/VARIANT] to select from an index")->capture_default_str();
  app.add_flag("-v,--verbose", g.verbose, "log what happens");

  std::string from, to, ref;
  bool all = false, raw = false;
  CLI::App* copy = app.add_subcommand("copy", "copy an image between registries and OCI layouts");
  copy->add_option("source", from, "docker://HOST/REPO[:TAG|@DIGEST] or oci:DIR[:TAG]")->required();
  copy->add_option("destination", to, "docker://HOST/REPO[:TAG] or oci:DIR[:TAG]")->required();
  copy->add_flag("--all,-a", all, "copy every image of an index, not only --platform's");
  copy->fallthrough();

  CLI::App* inspect = app.add_subcommand("inspect", "print an image's digest, media type, config and layers as JSON");
  inspect->add_option("image", ref, "docker://HOST/REPO[:TAG|@DIGEST] or oci:DIR[:TAG]")->required();
  inspect->add_flag("--raw", raw, "print the manifest bytes as stored");
  bool disk = false;
  std::string disk_path;
  inspect->add_flag("--disk", disk, "pull into the node store and describe the VM disk (path, format, sizes)");
  inspect->add_option("--path", disk_path, "the disk's path inside the image, when /disk holds several files");
  inspect->fallthrough();

  std::string pull_ref;
  CLI::App* pull = app.add_subcommand("pull", "pull a registry disk into the node store (--root) and validate it");
  pull->add_option("image", pull_ref, "docker://HOST/REPO[:TAG|@DIGEST] or oci:DIR[:TAG]")->required();
  pull->add_option("--path", disk_path, "the disk's path inside the image, when /disk holds several files");
  pull->fallthrough();

  std::string images_output = "text";
  CLI::App* images = app.add_subcommand("images", "list the registry disks in the node store");
  images->add_option("-o,--output", images_output, "text (default) or json");
  images->fallthrough();

  std::vector<std::string> rmi_refs;
  CLI::App* rmi = app.add_subcommand("rmi", "remove registry disks from the node store (a disk in use stays until its VMs stop)");
  rmi->add_option("image", rmi_refs, "names as regdisk images lists them")->required();
  rmi->fallthrough();
  CLI::App* prune = app.add_subcommand("prune", "delete from the node store what no name refers to and no VM uses");
  prune->fallthrough();

  BuildFlags bf;
  std::string disk_file;
  CLI::App* build = app.add_subcommand("build", "make a registry disk from a qcow2 or raw disk, without a container engine");
  build->add_option("disk", disk_file, "the qcow2 or raw disk image")->required();
  build->add_option("-t,--tag", bf.tag, "where to put it: docker://HOST/REPO:TAG or oci:DIR:TAG")->required();
  build->add_option("--base", bf.base, "an image to build on (default: none, a single-layer image)");
  build->add_option("--name", bf.name, "file name under /disk (default: the disk's own name)");
  build->add_option("--compression", bf.compression, "zstd (default; gzip with --format docker), gzip or none");
  build->add_option("--format", bf.format, "oci (default) or docker (schema 2, gzip only)");
  build->add_option("--label", bf.labels, "KEY=VALUE label on the image (repeatable)");
  build->fallthrough();

  RunFlags rf;
  CLI::App* run = app.add_subcommand("run", "run a VM from a spec on ephemeral registry disks, console on stdout");
  run->add_option("-f,--filename", rf.file, "the VM spec (one VirtualMachine, and the Secrets it names)")->required();
  run->add_option("--timeout", rf.timeout, "stop the VM after this many seconds (default: run until it powers off)");
  run->add_option("--grace", rf.grace, "seconds between ACPI powerdown and kill when stopping (default 10)");
  run->add_option("--qemu", rf.qemu, "the QEMU binary (default: qemu-system-x86_64 on PATH)");
  run->add_option("--accel", rf.accel, "auto (default: KVM when usable, else TCG), kvm or tcg");
  run->fallthrough();
  CLI::App* domxml = app.add_subcommand("domxml", "print the libvirt domain XML equivalent to a VM spec");
  domxml->add_option("-f,--filename", rf.file, "the VM spec")->required();
  domxml->add_option("--qemu", rf.qemu, "the QEMU binary to name as emulator");
  domxml->add_option("--accel", rf.accel, "auto, kvm or tcg");
  domxml->fallthrough();

  BuildFlags base_flags;
  CLI::App* base = app.add_subcommand("base", "publish the base image for the Dockerfile workflow (FROM it, ADD disk /disk)");
  base->add_option("-t,--tag", base_flags.tag, "where to put it: docker://HOST/REPO:TAG or oci:DIR:TAG")->required();
  base->add_option("--compression", base_flags.compression, "zstd (default; gzip with --format docker), gzip or none");
  base->add_option("--format", base_flags.format, "oci (default) or docker");
  base->add_option("--label", base_flags.labels, "KEY=VALUE label on the image (repeatable)");
  base->fallthrough();

  std::string spec_file, output = "text";
  CLI::App* validate = app.add_subcommand("validate", "check VM specs (KubeVirt YAML or JSON) and apply defaults");
  validate->add_option("-f,--filename", spec_file, "the spec file, or - for stdin")->required();
  validate->add_option("-o,--output", output, "text (default) or json: the parsed objects with defaults");
  validate->fallthrough();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  ScrubCredsFromArgv(argc, argv);
  // "--tls-verify" alone means true.
  if (app.get_option("--tls-verify")->count() > 0 && g.tls_verify.empty()) g.tls_verify = "true";
  log::SetLevel(g.verbose ? log::Level::kDebug : log::Level::kWarn);

  if (*copy) return RunCopy(g, from, to, all);
  if (*inspect) return RunInspect(g, ref, raw, disk, disk_path);
  if (*pull) return RunPull(g, pull_ref, disk_path);
  if (*images) return RunImages(g, images_output);
  if (*rmi) return RunRemove(g, rmi_refs, false);
  if (*prune) return RunRemove(g, {}, true);
  if (*validate) return RunValidate(spec_file, output);
  if (*build) return RunBuild(g, bf, disk_file);
  if (*run) return RunRun(g, rf);
  if (*domxml) return RunDomxml(g, rf);
  if (*base) return RunBuild(g, base_flags, "");
  return 2;
}

}  // namespace
}  // namespace regdisk::cli

int main(int argc, char** argv) { return regdisk::cli::Main(argc, argv); }
