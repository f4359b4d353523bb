#include "registry/auth.h"

#include <cctype>
#include <chrono>
#include <cstdlib>

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

// "https://index.docker.io/v1/" and "host:5000" both name a registry; reduce
// a key to host[:port] for matching.
std::string NormaliseKey(std::string_view key) {
  if (size_t p = key.find("://"); p != std::string_view::npos) key.remove_prefix(p + 3);
  if (size_t s = key.find('/'); s != std::string_view::npos) key = key.substr(0, s);
  std::string k(key);
  if (k == "index.docker.io" || k == "registry-1.docker.io") k = "docker.io";
  return k;
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

Result<std::optional<Credentials>> FromAuthJson(const json& j, const std::string& name, std::string_view registry);

// Reads one auth file; nullopt when it has nothing for the registry.
Result<std::optional<Credentials>> FromAuthFile(const fs::path& path, std::string_view registry, bool must_exist) {
  std::error_code ec;
  if (!must_exist && !fs::exists(path, ec)) return std::optional<Credentials>();
  ASSIGN_OR_RETURN(json j, ReadAuthFile(path));
  return FromAuthJson(j, "auth file " + path.string(), registry);
}

// Credentials for a registry from an auth file's object; `name` says where
// it came from, in messages.
Result<std::optional<Credentials>> FromAuthJson(const json& j, const std::string& name, std::string_view registry) {
  const std::string want = NormaliseKey(registry);
  if (auto helpers = j.find("credHelpers"); helpers != j.end() && helpers->is_object()) {
    for (auto& [key, helper] : helpers->items()) {
      if (NormaliseKey(key) == want && helper.is_string()) {
        ASSIGN_OR_RETURN(Credentials c, FromHelper(helper.get<std::string>(), registry));
        return std::optional<Credentials>(c);
      }
    }
  }
  if (auto auths = j.find("auths"); auths != j.end() && auths->is_object()) {
    for (auto& [key, entry] : auths->items()) {
      if (NormaliseKey(key) != want || !entry.is_object()) continue;
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
      if (!c.empty()) return std::optional<Credentials>(c);
    }
  }
  if (auto store = j.find("credsStore"); store != j.end() && store->is_string() && !store->get<std::string>().empty()) {
    auto c = FromHelper(store->get<std::string>(), registry);
    if (c.ok()) return std::optional<Credentials>(*c);
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

Result<std::optional<Credentials>> LookupCredentials(const AuthConfig& config, std::string_view registry) {
  if (config.explicit_creds) return config.explicit_creds;
  if (config.authfile_json) {
    json j = ParseAuthJson(*config.authfile_json);
    if (j.is_null()) return InvalidArgument(config.authfile_name + " is not valid JSON; fix it");
    return FromAuthJson(j, config.authfile_name, registry);
  }
  if (!config.authfile.empty()) return FromAuthFile(config.authfile, registry, true);
  if (std::string f = Env(config, "REGISTRY_AUTH_FILE"); !f.empty()) return FromAuthFile(f, registry, true);
  if (std::string xdg = Env(config, "XDG_RUNTIME_DIR"); !xdg.empty()) {
    ASSIGN_OR_RETURN(auto c, FromAuthFile(fs::path(xdg) / "containers/auth.json", registry, false));
    if (c) return c;
  }
  std::string docker_config = Env(config, "DOCKER_CONFIG");
  std::string home = Env(config, "HOME");
  fs::path docker = !docker_config.empty() ? fs::path(docker_config) / "config.json"
                                           : (home.empty() ? fs::path() : fs::path(home) / ".docker/config.json");
  if (!docker.empty()) return FromAuthFile(docker, registry, false);
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
