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
#include <thread>

#include <fmt/core.h>

#include "registry/auth.h"
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

}  // namespace

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
  std::thread([set, token = std::move(token)] {
    for (;;) {
      int sig = 0;
      if (sigwait(&set, &sig) != 0) continue;
      const char* name = sig == SIGINT ? "interrupted" : sig == SIGTERM ? "terminated" : "hung up";
      if (token->cancelled()) {  // a second signal: stop now
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

// A progress line on stderr for pulls, redrawn in place, when stderr is a
// terminal (logs and pipes get none).
std::function<void(size_t, size_t, uint64_t, uint64_t)> TerminalProgress() {
  if (log::Quiet() || !::isatty(STDERR_FILENO)) return {};
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

}  // namespace regdisk::cli
