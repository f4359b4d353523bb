#include "cli/common.h"

#include <signal.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <thread>

#include <fmt/core.h>

#include <map>

#include "registry/auth.h"
#include "registry/registries_conf.h"
#include "spec/quantity.h"
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

void CancelOnSignals(std::shared_ptr<CancelToken> token) {
  sigset_t set;
  sigemptyset(&set);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&set, sig);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::thread([set, token = std::move(token)] {
    for (;;) {
      int sig = 0;
      if (sigwait(&set, &sig) != 0) continue;
      if (token->cancelled()) ::_exit(128 + sig);  // a second signal: stop now
      token->Cancel(sig == SIGINT ? "interrupted" : "terminated");
    }
  }).detach();
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

}  // namespace regdisk::cli
