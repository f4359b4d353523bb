#include "cli/common.h"

#include <signal.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include <fmt/core.h>

#include <map>

#include "registry/auth.h"
#include "registry/registries_conf.h"
#include "spec/quantity.h"
#include "util/log.h"
#include "util/text.h"

namespace regdisk::cli {

namespace {

// --creds USER without a password: read it from stdin (without echo on a
// terminal), so it never has to appear on a command line.
Result<registry::Credentials> ResolveCreds(const std::string& flag) {
  ASSIGN_OR_RETURN(registry::Credentials c, registry::ParseCredsFlag(flag));
  if (flag.find(':') != std::string::npos) return c;
  c.password = ReadSecret("Password for " + Printable(c.username, 100) + ": ");
  return c;
}

// The environment registries.conf's places depend on.
std::map<std::string, std::string> RegistriesEnv() {
  std::map<std::string, std::string> env;
  for (const char* k : {"HOME", "CONTAINERS_REGISTRIES_CONF"}) {
    if (const char* v = ::getenv(k)) env[k] = v;
  }
  return env;
}

}  // namespace

std::string ReadSecret(const std::string& prompt) {
  bool tty = ::isatty(STDIN_FILENO) != 0;
  termios old{};
  if (tty) {
    std::fprintf(stderr, "%s", prompt.c_str());
    ::tcgetattr(STDIN_FILENO, &old);
    termios quiet = old;
    quiet.c_lflag &= ~static_cast<tcflag_t>(ECHO);
    ::tcsetattr(STDIN_FILENO, TCSANOW, &quiet);
  }
  std::string secret;
  std::getline(std::cin, secret);
  if (tty) {
    ::tcsetattr(STDIN_FILENO, TCSANOW, &old);
    std::fprintf(stderr, "\n");
  }
  if (!secret.empty() && secret.back() == '\r') secret.pop_back();
  return secret;
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
  o.cancel = g.cancel;
  if (!g.authfile.empty()) RETURN_IF_ERROR(registry::CheckAuthFile(g.authfile).Annotate("--authfile"));
  if (!g.creds.empty()) {
    ASSIGN_OR_RETURN(registry::Credentials c, ResolveCreds(g.creds));
    o.auth.explicit_creds = c;
  }
  ASSIGN_OR_RETURN(registry::RegistriesConf conf,
                   registry::LoadRegistriesConf(registry::RegistriesConfPaths::Standard(g.registries_conf, RegistriesEnv())));
  if (!conf.files.empty()) o.registries = std::make_shared<const registry::RegistriesConf>(std::move(conf));
  // Test hooks: shorter timeouts and back-off, so fault tests stay quick.
  if (const char* s = ::getenv("REGDISK_STALL_TIMEOUT_SECONDS")) o.limits.stall_timeout = std::chrono::seconds(std::atoi(s));
  if (const char* s = ::getenv("REGDISK_BACKOFF_MS")) o.backoff_base = std::chrono::milliseconds(std::atoi(s));
  if (const char* s = ::getenv("REGDISK_CHUNK_THRESHOLD")) o.chunk_threshold = std::strtoull(s, nullptr, 10);
  if (const char* s = ::getenv("REGDISK_CHUNK_SIZE")) o.chunk_size = std::strtoull(s, nullptr, 10);
  return o;
}

namespace {

std::mutex g_notice_mu;
std::string g_stop_notice;  // guarded by g_notice_mu
std::atomic<int> g_stop_signal{0};

void WriteStderr(const std::string& line) {
  std::string_view rest = line;
  while (!rest.empty()) {
    ssize_t n = ::write(STDERR_FILENO, rest.data(), rest.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    rest.remove_prefix(static_cast<size_t>(n));
  }
}

}  // namespace

void SetStopNotice(std::string notice) {
  std::lock_guard<std::mutex> lock(g_notice_mu);
  g_stop_notice = std::move(notice);
}

int StopSignal() { return g_stop_signal.load(); }

void CancelOnSignals(std::shared_ptr<CancelToken> token) {
  sigset_t set;
  sigemptyset(&set);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&set, sig);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  // The terminal's settings as regdisk found them: `run` may have put it in
  // raw mode, and exiting at once skips the code that restores it.
  std::optional<termios> terminal;
  if (termios t{}; ::isatty(STDIN_FILENO) && ::tcgetpgrp(STDIN_FILENO) == ::getpgrp() &&
                   ::tcgetattr(STDIN_FILENO, &t) == 0) {
    terminal = t;
  }
  std::thread([set, terminal, token = std::move(token)] {
    for (;;) {
      int sig = 0;
      if (sigwait(&set, &sig) != 0) continue;
      const char* name = sig == SIGINT ? "interrupted" : sig == SIGTERM ? "terminated" : "hung up";
      if (token->cancelled()) {  // a second signal: stop now
        if (terminal && ::tcgetpgrp(STDIN_FILENO) == ::getpgrp()) ::tcsetattr(STDIN_FILENO, TCSANOW, &*terminal);
        WriteStderr(std::string("regdisk: ") + name + " again: stopping at once\n");
        ::_exit(128 + sig);
      }
      std::string notice;
      {
        std::lock_guard<std::mutex> lock(g_notice_mu);
        notice = g_stop_notice;
      }
      if (!notice.empty()) WriteStderr(std::string("regdisk: ") + name + ": " + notice + "\n");
      g_stop_signal = sig;
      token->Cancel(name);
    }
  }).detach();
}

std::string FormatDuration(std::chrono::milliseconds d) {
  int64_t ms = d.count();
  if (ms == 0) return "0s";
  std::string out;
  if (ms >= 3600000) out += std::to_string(ms / 3600000) + "h", ms %= 3600000;
  if (ms >= 60000) out += std::to_string(ms / 60000) + "m", ms %= 60000;
  if (ms >= 1000) out += std::to_string(ms / 1000) + "s", ms %= 1000;
  if (ms > 0) out += std::to_string(ms) + "ms";
  return out;
}

Result<store::DiskTree::Limits> MakeDiskLimits(const Globals& g) {
  auto bytes = spec::ParseQuantity(g.max_disk_size, 1);
  if (!bytes.ok() || *bytes <= 0) {
    return InvalidArgument("--max-disk-size takes a size such as 500Gi or 2Ti, not " + Printable(g.max_disk_size, 40));
  }
  store::DiskTree::Limits l;
  l.max_file_bytes = static_cast<uint64_t>(*bytes);
  return l;
}

int Fail(const Status& st) {
  std::fprintf(stderr, "regdisk: error: %s\n", PrintableLine(st.message()).c_str());
  if (st.code() == Code::kCancelled) return 130;
  return st.code() == Code::kInvalidArgument ? 2 : 1;
}

std::string ProgressSize(uint64_t bytes) {
  static const char* const kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  if (bytes < 1024) return std::to_string(bytes) + "B";
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  return fmt::format("{:.1f}{}", v, kUnits[u]);
}

image::ProgressFn TerminalProgress(bool quiet) {
  if (quiet) return {};
  const bool tty = ::isatty(STDERR_FILENO) != 0;
  struct State {
    std::chrono::steady_clock::time_point start, shown;
    uint64_t start_bytes = 0;
  };
  auto st = std::make_shared<State>();
  return [st, tty](const image::ProgressEvent& e) {
    using Kind = image::ProgressEvent::Kind;
    // A blob by its short digest; a disk being written into a new layer
    // (build) by its label.
    const std::string id = e.blob.empty() ? PrintableLine(e.label, 80) : e.blob.hex().substr(0, 12);
    const char* verb = e.blob.empty() ? "Writing" : "Copying blob";
    const auto now = std::chrono::steady_clock::now();
    switch (e.kind) {
      case Kind::kSkipped:
        std::fprintf(stderr, "%s %s skipped: already exists\n", verb, id.c_str());
        return;
      case Kind::kDone:
        std::fprintf(stderr, "%s%s %s done %s\n", tty ? "\r\033[K" : "", verb, id.c_str(),
                     ProgressSize(e.total).c_str());
        return;
      case Kind::kFailed:  // the error follows on a line of its own
        if (tty) std::fputs("\r\033[K", stderr);
        return;
      case Kind::kStart:
        st->start = now;
        st->start_bytes = e.done;
        break;
      case Kind::kBytes:
        if (now - st->shown < std::chrono::milliseconds(200)) return;
        break;
    }
    if (!tty) return;
    st->shown = now;
    constexpr int kWidth = 30;
    const int filled = e.total == 0 ? kWidth : static_cast<int>(std::min<uint64_t>(e.done, e.total) * kWidth / e.total);
    std::string bar(static_cast<size_t>(filled), '=');
    if (filled < kWidth) bar += '>' + std::string(static_cast<size_t>(kWidth - filled - 1), '-');
    const double secs = std::chrono::duration<double>(now - st->start).count();
    std::string rate;
    if (secs > 0.05) {
      std::string r = ProgressSize(static_cast<uint64_t>(static_cast<double>(e.done - st->start_bytes) / secs));
      const size_t dot = r.find('.');
      if (dot != std::string::npos) r.erase(dot, 2);  // "355.2MiB" -> "355MiB"
      rate = " " + r + "/s";
    }
    std::fprintf(stderr, "\r\033[K%s %s [%s] %s / %s%s", verb, id.c_str(), bar.c_str(), ProgressSize(e.done).c_str(),
                 ProgressSize(e.total).c_str(), rate.c_str());
  };
}

}  // namespace regdisk::cli
