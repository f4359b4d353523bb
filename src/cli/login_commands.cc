// regdisk login / logout: credentials in containers-auth.json(5), as podman
// and skopeo keep them (registry/auth_file.h). The password comes from
// stdin (--password-stdin) or a terminal prompt without echo, never from
// the command line, and is checked against the registry before it is stored.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <iterator>

#include "cli/common.h"
#include "registry/auth_file.h"
#include "registry/client.h"
#include "util/text.h"

namespace regdisk::cli {

namespace {

registry::AuthConfig AuthFileConfig(const Globals& g) {
  registry::AuthConfig cfg;
  cfg.authfile = g.authfile;
  return cfg;
}

// "host/ns/repo" -> ("host", "ns/repo").
std::pair<std::string, std::string> SplitKey(const std::string& key) {
  size_t slash = key.find('/');
  if (slash == std::string::npos) return {key, ""};
  return {key.substr(0, slash), key.substr(slash + 1)};
}

Result<registry::Credentials> AskCredentials(const LoginFlags& f) {
  registry::Credentials c;
  c.username = f.username;
  const bool tty = ::isatty(STDIN_FILENO) != 0;
  if (c.username.empty()) {
    if (f.password_stdin || !tty) {
      return InvalidArgument("login needs --username when the password comes from stdin or stdin is not a terminal");
    }
    std::fprintf(stderr, "Username: ");
    std::getline(std::cin, c.username);
    if (c.username.empty()) return InvalidArgument("login needs a user name");
  }
  if (f.password_stdin) {
    c.password.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
    while (!c.password.empty() && (c.password.back() == '\n' || c.password.back() == '\r')) c.password.pop_back();
  } else if (tty) {
    c.password = ReadSecret("Password: ");
  } else {
    return InvalidArgument("stdin is not a terminal to ask for the password; pipe it with --password-stdin");
  }
  if (c.password.empty()) return InvalidArgument("login needs a password; none was given");
  c.source = "the login";
  return c;
}

Status Login(const Globals& g, const LoginFlags& f) {
  ASSIGN_OR_RETURN(std::string key, registry::LoginKey(f.registry));
  const auto [host, repo] = SplitKey(key);
  const registry::AuthConfig file_cfg = AuthFileConfig(g);
  if (f.get_login) {
    ASSIGN_OR_RETURN(auto c, registry::LookupCredentials(file_cfg, host, repo));
    if (!c) return NotFound("not logged in to " + key);
    // A user name with control characters is shown escaped (and quoted).
    const bool plain = std::all_of(c->username.begin(), c->username.end(),
                                   [](char ch) { return static_cast<unsigned char>(ch) >= 0x20 && ch != 0x7f; });
    std::printf("%s\n", plain ? c->username.c_str() : Printable(c->username, 200).c_str());
    return OkStatus();
  }
  const std::filesystem::path file = registry::AuthFileToWrite(file_cfg);
  ASSIGN_OR_RETURN(registry::Credentials creds, AskCredentials(f));
  // The registry answers for these credentials, not for stored ones.
  Globals plain = g;
  plain.authfile.clear();
  plain.creds.clear();
  ASSIGN_OR_RETURN(registry::ClientOptions opts, MakeClientOptions(plain));
  opts.registries.reset();
  opts.auth.explicit_creds = creds;
  registry::RegistryClient client(host, opts);
  RETURN_IF_ERROR(client.CheckLogin().Annotate("logging in to " + host));
  RETURN_IF_ERROR(registry::StoreCredentials(file, key, creds));
  std::printf("Login Succeeded!\n");
  return OkStatus();
}

Status Logout(const Globals& g, const LoginFlags& f) {
  const std::filesystem::path file = registry::AuthFileToWrite(AuthFileConfig(g));
  if (f.all) {
    if (!f.registry.empty()) return InvalidArgument("logout --all takes no registry");
    RETURN_IF_ERROR(registry::RemoveAllCredentials(file));
    std::printf("Removed login credentials for all registries\n");
    return OkStatus();
  }
  if (f.registry.empty()) return InvalidArgument("logout needs a registry, or --all");
  ASSIGN_OR_RETURN(std::string key, registry::LoginKey(f.registry));
  ASSIGN_OR_RETURN(bool removed, registry::RemoveCredentials(file, key));
  if (!removed) return NotFound("not logged in to " + key + " (in " + file.string() + ")");
  std::printf("Removed login credentials for %s\n", key.c_str());
  return OkStatus();
}

}  // namespace

int RunLogin(const Globals& g, const LoginFlags& f) {
  Status st = Login(g, f);
  return st.ok() ? 0 : Fail(st);
}

int RunLogout(const Globals& g, const LoginFlags& f) {
  Status st = Logout(g, f);
  return st.ok() ? 0 : Fail(st);
}

}  // namespace regdisk::cli
