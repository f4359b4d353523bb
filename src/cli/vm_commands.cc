// validate, run and domxml.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <tuple>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <utility>

#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "spec/spec.h"
#include "util/fs.h"
#include "util/text.h"
#include "vm/cloudinit.h"
#include "vm/plan.h"
#include "vm/runner.h"

namespace regdisk::cli {

using json = nlohmann::json;

namespace {

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

Result<vm::PlanOptions> MakePlanOptions(const Globals& g, const RunFlags& f) {
  vm::PlanOptions p;
  p.root = g.root;
  p.qemu = f.qemu;
  p.accel = f.accel;
  ASSIGN_OR_RETURN(p.client, MakeClientOptions(g));
  ASSIGN_OR_RETURN(p.platform, oci::Platform::Parse(g.platform));
  p.on_progress = TerminalProgress(g.quiet);
  ASSIGN_OR_RETURN(p.disk_limits, MakeDiskLimits(g));
  for (const auto& text : f.publish) {
    ASSIGN_OR_RETURN(vm::PublishedPort port, vm::ParsePublish(text));
    p.publish.push_back(port);
  }
  if (!f.network.empty()) {
    if (f.network.rfind("bridge=", 0) != 0 || f.network.size() == 7) {
      return InvalidArgument("--network takes bridge=NAME (a host bridge), not " + Printable(f.network, 60) +
                             "; leave it out for user-mode networking");
    }
    p.bridge = f.network.substr(7);
  }
  p.vnc = f.vnc;
  p.lazy = f.lazy;
  return p;
}

// A libvirt domain needs every file its XML names, so domxml writes each
// cloud-init seed (the only files it writes) to ROOT/seeds/NS_NAME/, mode
// 0600 in 0700 directories, replacing what an earlier domxml wrote there,
// and points the plan's disk at it. Nothing else regdisk does reads or
// removes that directory: the seed lives as long as the domain needs it.
Status WriteDomainSeeds(const std::filesystem::path& root, vm::VmPlan& plan) {
  namespace fs = std::filesystem;
  const fs::path dir = root / "seeds" / (plan.namespace_ + "_" + plan.name);
  for (auto& d : plan.disks) {
    if (!d.seed) continue;
    RETURN_IF_ERROR(MakeDirs(dir));
    for (const fs::path& p : {dir.parent_path(), dir}) {
      if (::chmod(p.c_str(), 0700) != 0) return ErrnoStatus("making " + p.string() + " private");
    }
    const fs::path path = dir / d.backing.filename();  // the name PlanVm gave it
    const fs::path fresh = path.string() + ".new-" + std::to_string(::getpid());
    std::error_code ec;
    fs::remove(fresh, ec);
    RETURN_IF_ERROR(vm::WriteNoCloudSeed(fresh, *d.seed).Annotate("writing the cloud-init seed of disk " + d.name));
    if (::rename(fresh.c_str(), path.c_str()) != 0) {
      Status st = ErrnoStatus("replacing " + path.string());
      fs::remove(fresh, ec);
      return st;
    }
    d.backing = d.stable = path;
  }
  return OkStatus();
}

}  // namespace

// Exit code 130 after Ctrl-C (the VM shut down as asked); 0 when the guest
// powered off, at --timeout, or after SIGTERM/SIGHUP (an orderly stop, as
// service managers expect).
int RunRun(const Globals& g, const RunFlags& f) {
  auto loaded = LoadOneVm(f.file);
  if (!loaded.ok()) return Fail(loaded.status());
  auto plan = MakePlanOptions(g, f);
  if (!plan.ok()) return Fail(plan.status());
  vm::RunOptions ro;
  ro.plan = *plan;
  // A terminal on stdin is the guest's console keyboard, when regdisk is in
  // its foreground: from the background, raw mode and reads would stop
  // regdisk (SIGTTOU, SIGTTIN), so `regdisk run ... &` only prints the console.
  if (::isatty(STDIN_FILENO) && ::tcgetpgrp(STDIN_FILENO) == ::getpgrp()) ro.console_input = STDIN_FILENO;
  if (g.quiet) ro.notices = nullptr;
  ro.timeout = f.timeout;
  ro.grace = f.grace;
  ro.stop = g.cancel;
  Status st = vm::RunVm(loaded->first, loaded->second, ro);
  if (!st.ok()) return Fail(st.Annotate("running VM " + loaded->first.metadata.name));
  return StopSignal() == SIGINT ? 130 : 0;
}

// Offline: reads the spec and the store and pulls nothing; the disks a run
// would have to pull are named on stderr. The only files it writes are the
// VM's cloud-init seeds (WriteDomainSeeds), which the XML names.
int RunDomxml(const Globals& g, const RunFlags& f) {
  auto loaded = LoadOneVm(f.file);
  if (!loaded.ok()) return Fail(loaded.status());
  auto po = MakePlanOptions(g, f);
  if (!po.ok()) return Fail(po.status());
  po->offline = true;
  po->on_progress = {};
  const auto& vmspec = loaded->first;
  auto plan = vm::PlanVm(vmspec, loaded->second, *po,
                         std::filesystem::path(g.root) / "run" / (vmspec.metadata.namespace_ + "_" + vmspec.metadata.name));
  if (!plan.ok()) return Fail(plan.status().Annotate("planning VM " + vmspec.metadata.name));
  Status seeds = WriteDomainSeeds(g.root, *plan);
  if (!seeds.ok()) return Fail(seeds.Annotate("writing the domain of VM " + vmspec.metadata.name));
  auto xml = vm::DomainXml(*plan);
  if (!xml.ok()) return Fail(xml.status().Annotate("writing the domain XML of VM " + vmspec.metadata.name));
  std::fputs(xml->c_str(), stdout);
  size_t m = 0;
  for (const auto& d : plan->disks) {
    if (d.in_store || m >= plan->missing.size()) continue;
    std::fprintf(stderr,
                 "regdisk: disk %s: %s is not in the node store; regdisk run (or regdisk pull) would pull it, to %s "
                 "(the XML assumes qcow2 until then)\n",
                 PrintableLine(d.name).c_str(), PrintableLine(plan->missing[m++]).c_str(),
                 PrintableLine(d.stable.string()).c_str());
  }
  for (const auto& d : plan->disks) {
    if (!d.seed || g.quiet) continue;
    std::fprintf(stderr,
                 "regdisk: disk %s: its cloud-init seed (ISO 9660, label cidata, holding the user-data) is %s, mode "
                 "0600; remove it when you undefine the domain\n",
                 PrintableLine(d.name).c_str(), PrintableLine(d.backing.string()).c_str());
  }
  return 0;
}

// validate -f FILE: every diagnostic on stderr; exit 1 on any error.
int RunValidate(const std::string& file, const std::string& output) {
  if (output != "text" && output != "json" && output != "yaml") {
    return Fail(InvalidArgument("-o takes text, json or yaml, not \"" + output + "\""));
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
  if (output == "json" || output == "yaml") {
    json out;
    if (r.objects.size() == 1) {
      out = spec::ToJson(r.objects[0]);
    } else {
      out = {{"apiVersion", "v1"}, {"kind", "List"}, {"items", json::array()}};
      for (const auto& o : r.objects) out["items"].push_back(spec::ToJson(o));
    }
    if (output == "yaml") {
      std::fputs(spec::ToYaml(out).c_str(), stdout);
    } else {
      std::printf("%s\n", out.dump(2).c_str());
    }
    return 0;
  }
  for (const auto& o : r.objects) std::printf("%s: %s: valid\n", file.c_str(), spec::Describe(o).c_str());
  return 0;
}

}  // namespace regdisk::cli
