#include "registry/auth.h"

#include <cctype>
#include <chrono>
#include <cstdlib>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "registry/http.h"
#include "util/fs.h"
#include "util/process.h"

namespace regdisk::registry {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr uint64_t kMaxAuthFileBytes = 1 << 20;

std::string Env(const AuthConfig& cfg, const char* name) {
  if (cfg.env) {
    auto it = cfg.env->find(name);
    return it == cfg.env->end() ? std::string() : it->second;
  }
  const char* v = ::getenv(name);
  return v ? v : "";
}

// Registry host names that mean Docker Hub.
std::string NormaliseRegistry(std::string_view host) {
  std::string h(host);
  if (h == "index.docker.io" || h == "registry-1.docker.io") h = "docker.io";
  return h;
}

// A key written as a URL ("https://index.docker.io/v1/", "http://host:5000")
// names a registry: reduce it to the host. Other keys are kept as written.
std::string NormaliseUrlKey(std::string_view key) {
  if (size_t p = key.find("://"); p != std::string_view::npos) {
    key.remove_prefix(p + 3);
    key = key.substr(0, key.find('/'));
  }
  return NormaliseRegistry(key);
}

Result<Credentials> FromHelper(const std::string& helper, std::string_view registry) {
  std::string program = "docker-credential-" + helper;
  auto out = Process::Run({program, "get"}, std::chrono::seconds(30), std::string(registry) + "\n");
  if (!out.ok()) return std::move(out).status().Annotate("credential helper " + program);
  if (out->exit_code != 0) {
    // The helper's output may echo the host but never a secret we sent.
    return Unauthenticated("credential helper " + program + " found no credentials for " + std::string(registry) +
                           " (exit " + std::to_string(out->exit_code) + ")");
  }
  json j = json::parse(out->out, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("Secret")) {
    return InvalidArgument("credential helper " + program + " printed something other than the expected JSON");
  }
  Credentials c;
  c.username = j.value("Username", "");
  c.password = j.value("Secret", "");
  return c;
}

json ParseAuthJson(std::string_view text) {
  json j = json::parse(text, nullptr, false);
  return j.is_discarded() || !j.is_object() ? json() : j;
}

// An auth file's JSON object.
Result<json> ReadAuthFile(const fs::path& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return NotFound("auth file " + path.string() + " does not exist; check --authfile");
  auto text = ReadFileCapped(path, kMaxAuthFileBytes);
  if (!text.ok()) return std::move(text).status();
  json j = ParseAuthJson(*text);
  if (j.is_null()) return InvalidArgument("auth file " + path.string() + " is not valid JSON; fix or remove it");
  return j;
}

Result<std::optional<Credentials>> FromAuthJson(const json& j, const std::string& name, std::string_view registry,
                                                std::string_view repository);

// Reads one auth file; nullopt when it has nothing for the registry.
Result<std::optional<Credentials>> FromAuthFile(const fs::path& path, std::string_view registry,
                                                std::string_view repository, bool must_exist) {
  std::error_code ec;
  if (!must_exist && !fs::exists(path, ec)) return std::optional<Credentials>();
  ASSIGN_OR_RETURN(json j, ReadAuthFile(path));
  return FromAuthJson(j, "auth file " + path.string(), registry, repository);
}

// Decodes one "auths" entry; nullopt when it holds nothing.
Result<std::optional<Credentials>> FromEntry(const json& entry, const std::string& name, const std::string& key) {
  if (!entry.is_object()) return std::optional<Credentials>();
  Credentials c;
  if (auto a = entry.find("auth"); a != entry.end() && a->is_string() && !a->get<std::string>().empty()) {
    auto decoded = Base64Decode(a->get<std::string>());
    size_t colon = decoded.ok() ? decoded->find(':') : std::string::npos;
    if (colon == std::string::npos) {
      return InvalidArgument(name + " has a malformed \"auth\" entry for " + key +
                             "; it must be base64 of user:password");
    }
    c.username = decoded->substr(0, colon);
    c.password = decoded->substr(colon + 1);
  } else {
    c.username = entry.value("username", "");
    c.password = entry.value("password", "");
  }
  if (auto t = entry.find("identitytoken"); t != entry.end() && t->is_string() && !t->get<std::string>().empty()) {
    c.username = "<token>";
    c.password = t->get<std::string>();
  }
  if (c.empty()) return std::optional<Credentials>();
  c.source = name + " (key " + key + ")";
  return std::optional<Credentials>(c);
}

// Credentials for registry/repository from an auth file's object; `name`
// says where it came from, in messages.
Result<std::optional<Credentials>> FromAuthJson(const json& j, const std::string& name, std::string_view registry,
                                                std::string_view repository) {
  const std::string host = NormaliseRegistry(registry);
  if (auto helpers = j.find("credHelpers"); helpers != j.end() && helpers->is_object()) {
    for (auto& [key, helper] : helpers->items()) {
      if (NormaliseUrlKey(key) == host && helper.is_string()) {
        ASSIGN_OR_RETURN(Credentials c, FromHelper(helper.get<std::string>(), registry));
        c.source = "credential helper docker-credential-" + helper.get<std::string>();
        return std::optional<Credentials>(c);
      }
    }
  }
  if (auto auths = j.find("auths"); auths != j.end() && auths->is_object()) {
    // The most specific key first: host/ns/repo, host/ns, host.
    std::string key = host + (repository.empty() ? "" : "/" + std::string(repository));
    for (;;) {
      if (auto e = auths->find(key); e != auths->end()) {
        ASSIGN_OR_RETURN(auto c, FromEntry(*e, name, key));
        if (c) return c;
      }
      size_t slash = key.rfind('/');
      if (slash == std::string::npos) break;
      key.resize(slash);
    }
    // Then keys that name the registry another way (URLs, Docker Hub aliases).
    for (auto& [k, entry] : auths->items()) {
      if (k == host || NormaliseUrlKey(k) != host) continue;
      ASSIGN_OR_RETURN(auto c, FromEntry(entry, name, k));
      if (c) return c;
    }
  }
  if (auto store = j.find("credsStore"); store != j.end() && store->is_string() && !store->get<std::string>().empty()) {
    auto c = FromHelper(store->get<std::string>(), registry);
    if (c.ok()) {
      c->source = "credential store docker-credential-" + store->get<std::string>();
      return std::optional<Credentials>(*c);
    }
  }
  return std::optional<Credentials>();
}

}  // namespace

Status CheckAuthFile(const fs::path& path) { return ReadAuthFile(path).status(); }

Result<Credentials> ParseCredsFlag(std::string_view value) {
  size_t colon = value.find(':');
  Credentials c;
  c.username = std::string(value.substr(0, colon));
  if (colon != std::string_view::npos) c.password = std::string(value.substr(colon + 1));
  if (c.username.empty()) return InvalidArgument("--creds needs a user name, as USER[:PASSWORD]");
  return c;
}

AuthFileSearch AuthFilesToRead(const AuthConfig& config) {
  AuthFileSearch s;
  if (!config.authfile.empty()) {
    s.files.push_back(config.authfile);
    s.user_specified = true;
    return s;
  }
  if (std::string f = Env(config, "REGISTRY_AUTH_FILE"); !f.empty()) {
    s.files.push_back(f);
    s.user_specified = true;
    return s;
  }
  s.files.push_back(AuthFileToWrite(config));
  const std::string home = Env(config, "HOME");
  std::string xdg_config = Env(config, "XDG_CONFIG_HOME");
  if (xdg_config.empty() && !home.empty()) xdg_config = home + "/.config";
  if (!xdg_config.empty()) s.files.push_back(fs::path(xdg_config) / "containers/auth.json");
  if (std::string d = Env(config, "DOCKER_CONFIG"); !d.empty()) {
    s.files.push_back(fs::path(d) / "config.json");
  } else if (!home.empty()) {
    s.files.push_back(fs::path(home) / ".docker/config.json");
  }
  return s;
}

fs::path AuthFileToWrite(const AuthConfig& config) {
  if (!config.authfile.empty()) return config.authfile;
  if (std::string f = Env(config, "REGISTRY_AUTH_FILE"); !f.empty()) return f;
  if (std::string xdg = Env(config, "XDG_RUNTIME_DIR"); !xdg.empty()) return fs::path(xdg) / "containers/auth.json";
  return config.per_uid_root / std::to_string(::getuid()) / "auth.json";
}

Result<std::optional<Credentials>> LookupCredentials(const AuthConfig& config, std::string_view registry,
                                                     std::string_view repository) {
  if (config.explicit_creds) {
    Credentials c = *config.explicit_creds;
    if (c.source.empty()) c.source = "--creds";
    return std::optional<Credentials>(c);
  }
  if (config.authfile_json) {
    json j = ParseAuthJson(*config.authfile_json);
    if (j.is_null()) return InvalidArgument(config.authfile_name + " is not valid JSON; fix it");
    return FromAuthJson(j, config.authfile_name, registry, repository);
  }
  AuthFileSearch search = AuthFilesToRead(config);
  for (const auto& f : search.files) {
    ASSIGN_OR_RETURN(auto c, FromAuthFile(f, registry, repository, search.user_specified));
    if (c) return c;
  }
  return std::optional<Credentials>();
}

std::vector<Challenge> ParseChallenges(std::string_view h) {
  std::vector<Challenge> out;
  size_t i = 0;
  auto skip_ws = [&] {
    while (i < h.size() && (h[i] == ' ' || h[i] == '\t' || h[i] == ',')) ++i;
  };
  while (i < h.size()) {
    skip_ws();
    size_t start = i;
    while (i < h.size() && h[i] != ' ' && h[i] != ',') ++i;
    if (start == i) break;
    Challenge c;
    c.scheme = std::string(h.substr(start, i - start));
    for (auto& ch : c.scheme) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    // Parameters: key=value or key="quoted", until a token with no '='.
    for (;;) {
      skip_ws();
      size_t key_start = i;
      while (i < h.size() && h[i] != '=' && h[i] != ' ' && h[i] != ',') ++i;
      if (i >= h.size() || h[i] != '=') {
        i = key_start;  // the next scheme begins here
        break;
      }
      std::string key(h.substr(key_start, i - key_start));
      for (auto& ch : key) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      ++i;  // '='
      std::string value;
      if (i < h.size() && h[i] == '"') {
        ++i;
        while (i < h.size() && h[i] != '"') {
          if (h[i] == '\\' && i + 1 < h.size()) ++i;
          value.push_back(h[i++]);
        }
        ++i;  // closing quote
      } else {
        while (i < h.size() && h[i] != ',' && h[i] != ' ') value.push_back(h[i++]);
      }
      c.params[key] = value;
    }
    out.push_back(std::move(c));
  }
  return out;
}

}  // namespace regdisk::registry
