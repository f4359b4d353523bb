// regdisk pull --lazy: the disk is usable as soon as its chunk index and
// tar header are verified, and fills in the background.
//
// The command starts a copy of itself (`pull --lazy --lazy-owner-fd N`),
// detached from the terminal and from this process, that owns the pull:
// it serves the disk over NBD (blockserve::LazyPull, its nbdkit started to
// outlive it), fills it, commits it to the store, and exits once no VM of
// another process reads the export any more. The two talk over a pipe:
// the owner writes one line when it knows the outcome, then closes it.
//
//   serving <manifest digest> <socket>   usable now; the fill goes on
//   stored <manifest digest>             in the store already (or not
//                                        chunked, and pulled in full)
//   joined <manifest digest> <socket>    usable now: another process
//                                        pulls and serves it (this one
//                                        waits for it to go, then pulls
//                                        again: the name is recorded, or
//                                        the fill taken over)
//   error <one line>                     nothing was served
//
// A `regdisk run` (or the daemon) that boots the image meanwhile reads the
// owner's export (LazyPull joins it) and fetches nothing itself.
#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <fmt/core.h>

#include "blockserve/export.h"
#include "blockserve/lazy_pull.h"
#include "cli/common.h"
#include "image/transport.h"
#include "store/lazy_dir.h"
#include "store/store.h"
#include "util/fs.h"
#include "util/log.h"
#include "util/process.h"
#include "util/text.h"

namespace regdisk::cli {

namespace fs = std::filesystem;

namespace {

// Writes the outcome line to the parent (best effort: a parent that has
// gone is not an error of the pull's).
void Report(int fd, const std::string& line) {
  const std::string text = line + "\n";
  size_t at = 0;
  while (at < text.size()) {
    const ssize_t n = ::write(fd, text.data() + at, text.size() - at);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    at += static_cast<size_t>(n);
  }
}

// The owner: serves and fills the disk, reports, then lives until the
// disk is committed and no other process reads its export.
int RunLazyOwner(const Globals& g, const std::string& ref, const std::string& path, int report_fd) {
  UniqueFd report(report_fd);
  ::fcntl(report.get(), F_SETFD, FD_CLOEXEC);  // never handed on to nbdkit
  auto fail_early = [&](const Status& why) {
    Report(report.get(), "error " + PrintableLine(why.message(), 2000));
    log::Warn("{}", why.ToString());
    return 1;
  };
  Result<registry::ClientOptions> opts = MakeClientOptions(g);
  if (!opts.ok()) return fail_early(opts.status());
  Result<oci::Platform> platform = oci::Platform::Parse(g.platform);
  if (!platform.ok()) return fail_early(platform.status());
  Result<std::vector<image::ImageName>> candidates = image::CandidateNames(ref, opts->registries.get());
  if (!candidates.ok()) return fail_early(candidates.status());
  Result<store::Store> st = store::Store::Open(g.root);
  if (!st.ok()) return fail_early(st.status());
  store::PullOptions po;
  po.platform = *platform;
  po.path = path;
  Result<store::DiskTree::Limits> limits = MakeDiskLimits(g);
  if (!limits.ok()) return fail_early(limits.status());
  po.limits = *limits;
  blockserve::LazyPullOptions lazy;
  // Its VMs are other processes': a killed owner leaves nbdkit serving
  // them, for the next pull of the layer (or one of those VMs' processes)
  // to adopt.
  lazy.export_options.outlive_owner = true;

  // The first line goes to the command that started this process; later
  // rounds (below) only log.
  bool reported = false;
  auto say = [&](const std::string& line) {
    if (reported) return;
    Report(report.get(), line);
    report.reset();
    reported = true;
  };
  auto say_error = [&](const Status& why) {
    say("error " + PrintableLine(why.message(), 2000));
    log::Warn("{}", why.ToString());
    return 1;
  };
  std::unique_ptr<blockserve::LazyPull> pull;
  Result<blockserve::LazyPull::Disk> disk = Internal("no candidate names for " + Printable(ref, 200));
  for (;;) {
    std::string tried;
    for (const image::ImageName& name : *candidates) {
      const std::string key = name.String();
      disk = [&]() -> Result<blockserve::LazyPull::Disk> {
        ASSIGN_OR_RETURN(std::unique_ptr<image::ImageSource> source, image::OpenSource(name, *opts));
        ASSIGN_OR_RETURN(pull, blockserve::LazyPull::Start(*st, std::move(source), key, po, lazy));
        return pull->Ready(g.cancel.get());
      }();
      if (disk.ok()) break;
      pull.reset();
      Status failed = disk.status().Annotate("pulling " + key);
      if (candidates->size() == 1 || failed.code() == Code::kCancelled) return say_error(failed);
      tried += (tried.empty() ? "" : "; ") + failed.message();
      disk = Status(failed.code(), "short name " + Printable(ref, 200) +
                                       " matched no image in the unqualified-search registries: " + tried);
    }
    if (!disk.ok()) return say_error(disk.status());
    if (disk->stored) {
      say("stored " + disk->manifest.str());
      return 0;
    }
    if (!pull->joined()) break;
    // Another process pulls it and serves it: usable now. This process
    // waits (holding nothing) for that one to go, then pulls again: the
    // disk is stored by then (and the name is recorded), or that process
    // died and this one takes the fill over.
    say("joined " + disk->manifest.str() + " " + disk->socket.string());
    const fs::path owner_lock = store::LazyLockPath(g.root, disk->socket.parent_path().filename().string());
    pull.reset();
    for (;;) {
      if (!g.cancel->SleepFor(std::chrono::seconds(1)).ok()) return 0;
      Result<std::optional<FileLock>> free = FileLock::TryAcquire(owner_lock);
      if (!free.ok() || *free) break;
    }
  }
  say("serving " + disk->manifest.str() + " " + disk->socket.string());
  log::Info("{}: served at {} while it fills", Printable(ref, 200), disk->socket.string());
  // Until committed or failed; a stop signal ends the fill (it resumes
  // from its bitmap next time).
  while (!pull->Ended() && !g.cancel->cancelled()) {
    (void)g.cancel->SleepFor(std::chrono::milliseconds(500));
  }
  int code = 0;
  if (pull->Ended()) {
    Result<store::StoredImage> r = pull->Wait();
    if (r.ok()) {
      log::Info("{}: every chunk verified and committed to the store", Printable(ref, 200));
    } else {
      log::Warn("{}: the background fill failed: {}", Printable(ref, 200), r.status().ToString());
      code = 1;
    }
  }
  // Stopped by a signal while VMs of other processes read the export: it
  // is theirs to take over, not to wait for.
  if (g.cancel->cancelled() && !pull->TryRetire()) pull->KeepExport();
  pull.reset();  // waits for other processes' VMs to stop reading, then stops the export
  return code;
}

}  // namespace

int RunPullLazy(const Globals& g, const std::string& ref, const std::string& path, int owner_fd) {
  if (owner_fd >= 0) return RunLazyOwner(g, ref, path, owner_fd);
  // Without nbdkit or regdisk's plugin there is no export: pull in full.
  Result<fs::path> plugin = blockserve::FindNbdkitPlugin();
  if (!plugin.ok() || FindExecutable("nbdkit").empty()) {
    std::fprintf(stderr, "regdisk: --lazy needs nbdkit and regdisk's nbdkit plugin (%s); pulling in full\n",
                 (plugin.ok() ? std::string("nbdkit is not on PATH") : plugin.status().message()).c_str());
    return RunPull(g, ref, path);
  }
  Result<registry::ClientOptions> opts = MakeClientOptions(g);
  if (!opts.ok()) return Fail(opts.status());
  if (Result<store::Store> st = store::Store::Open(g.root); !st.ok()) return Fail(st.status());
  const fs::path logs = fs::path(g.root) / "logs";
  if (Status s = MakeDirs(logs); !s.ok()) return Fail(s);

  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return Fail(ErrnoStatus("making a pipe"));
  UniqueFd from_owner(fds[0]), to_parent(fds[1]);
  // The owner's flags: the same store, registries and limits. A password
  // goes on its stdin, never on its command line.
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return Fail(Internal("finding regdisk's own executable: " + ec.message()));
  std::vector<std::string> argv = {self.string(), "--root", g.root, "--platform", g.platform, "--max-disk-size",
                                   g.max_disk_size, "--log-level",
                                   g.verbose || g.log_level == "debug" ? "debug" : "info"};
  auto add = [&](const char* flag, const std::string& value) {
    if (value.empty()) return;
    argv.push_back(flag);
    argv.push_back(value);
  };
  add("--tls-verify", g.tls_verify);
  add("--authfile", g.authfile);
  add("--cert-dir", g.cert_dir);
  add("--registries-conf", g.registries_conf);
  std::string secret;
  if (opts->auth.explicit_creds) {
    argv.push_back("--creds");
    argv.push_back(opts->auth.explicit_creds->username);
    secret = opts->auth.explicit_creds->password + "\n";
  }
  argv.insert(argv.end(), {"pull", "--lazy", "--lazy-owner-fd", std::to_string(to_parent.get())});
  add("--path", path);
  argv.push_back("--");
  argv.push_back(ref);
  // Its log: named for this command's pid, which the owner outlives.
  const fs::path log_path = logs / fmt::format("pull-lazy-{}.log", ::getpid());
  Process::Options po;
  po.detach = true;
  po.stdin_mode = secret.empty() ? Process::Stdio::kNull : Process::Stdio::kPipe;
  po.stdout_mode = Process::Stdio::kNull;
  po.stderr_mode = Process::Stdio::kFile;
  po.stderr_file = log_path;
  po.inherit_fds = {to_parent.get()};
  Result<Process> spawned = Process::Spawn(argv, po);
  if (!spawned.ok()) return Fail(spawned.status().Annotate("starting the background pull"));
  Process owner = std::move(*spawned);
  to_parent.reset();
  if (!secret.empty()) {
    if (::write(owner.stdin_fd(), secret.data(), secret.size()) != static_cast<ssize_t>(secret.size())) {
      owner.Terminate(std::chrono::seconds(5));
      return Fail(ErrnoStatus("handing the password to the background pull"));
    }
    owner.CloseStdin();
  }
  // Its one line, or EOF when it died first.
  std::string line;
  for (;;) {
    if (g.cancel->cancelled()) {
      owner.Terminate(std::chrono::seconds(10));
      return Fail(g.cancel->status());
    }
    pollfd p{from_owner.get(), POLLIN, 0};
    const int n = ::poll(&p, 1, 200);
    if (n < 0 && errno != EINTR) return Fail(ErrnoStatus("waiting for the background pull"));
    if (n <= 0) continue;
    char buf[4096];
    const ssize_t got = ::read(from_owner.get(), buf, sizeof buf);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) break;
    line.append(buf, static_cast<size_t>(got));
    if (line.size() > 8192) break;
  }
  if (size_t nl = line.find('\n'); nl != std::string::npos) line.resize(nl);
  const size_t sp = line.find(' ');
  const std::string verb = line.substr(0, sp);
  const std::string rest = sp == std::string::npos ? "" : line.substr(sp + 1);
  if (verb == "error" || verb == "stored" || verb == "joined") {
    if (verb == "joined") {
      owner.Release();  // it waits for the process serving the disk, then records the name
    } else {
      owner.Wait(std::chrono::seconds(30));  // it is exiting; let it finish rather than kill it
    }
    if (verb == "error") return Fail(Unavailable(rest));
    const size_t sp2 = rest.find(' ');
    std::printf("%s\n", rest.substr(0, sp2).c_str());
    if (verb == "joined" && !g.quiet) {
      std::fprintf(stderr, "regdisk: %s is usable now: the regdisk process already pulling it serves it at %s\n",
                   Printable(ref, 200).c_str(), sp2 == std::string::npos ? "" : rest.substr(sp2 + 1).c_str());
    }
    return 0;
  }
  if (verb != "serving") {
    owner.Terminate(std::chrono::seconds(5));
    return Fail(Unavailable("the background pull of " + Printable(ref, 200) + " exited before serving the disk; see " +
                            log_path.string()));
  }
  const size_t sp2 = rest.find(' ');
  std::printf("%s\n", rest.substr(0, sp2).c_str());
  if (!g.quiet) {
    std::fprintf(stderr,
                 "regdisk: %s is usable now: it is served at %s while it fills in the background (pid %d, log %s); "
                 "regdisk images shows the fill\n",
                 Printable(ref, 200).c_str(), sp2 == std::string::npos ? "" : rest.substr(sp2 + 1).c_str(),
                 static_cast<int>(owner.Release()), log_path.string().c_str());
  } else {
    owner.Release();
  }
  return 0;
}

}  // namespace regdisk::cli
