#include "registry/registries_conf.h"

#include <toml++/toml.h>

#include <algorithm>
#include <system_error>

#include "oci/reference.h"
#include "util/fs.h"
#include "util/log.h"
#include "util/text.h"

namespace regdisk::registry {

namespace fs = std::filesystem;

namespace {

constexpr uint64_t kMaxConfBytes = 1 << 20;

// Printable quotes what it shows.
std::string Quoted(std::string_view s) {
  return Printable(s, 200);
}

// A location or prefix as written: no URL scheme, no trailing '/'.
Result<std::string> ParseLocation(const std::string& file, std::string_view what, std::string value) {
  if (value.rfind("http://", 0) == 0 || value.rfind("https://", 0) == 0) {
    return InvalidArgument(file + ": " + std::string(what) + " " + Quoted(value) +
                           " must not have a URL scheme; write host[:port][/namespace] (use insecure = true for HTTP)");
  }
  while (!value.empty() && value.back() == '/') value.pop_back();
  return value;
}

// Reads a string, bool or string array value; a wrong type is an error.
Result<std::string> GetString(const std::string& file, const std::string& key, const toml::node& n) {
  if (auto s = n.as_string()) return s->get();
  return InvalidArgument(file + ": " + key + " must be a string");
}
Result<bool> GetBool(const std::string& file, const std::string& key, const toml::node& n) {
  if (auto b = n.as_boolean()) return b->get();
  return InvalidArgument(file + ": " + key + " must be true or false");
}
Result<std::vector<std::string>> GetStrings(const std::string& file, const std::string& key, const toml::node& n) {
  auto arr = n.as_array();
  if (!arr) return InvalidArgument(file + ": " + key + " must be an array of strings");
  std::vector<std::string> out;
  for (const auto& e : *arr) {
    auto s = e.as_string();
    if (!s) return InvalidArgument(file + ": " + key + " must be an array of strings");
    out.push_back(s->get());
  }
  return out;
}

Result<PullFromMirror> ParsePullFromMirror(const std::string& file, const std::string& v) {
  if (v.empty() || v == "all") return PullFromMirror::kAll;
  if (v == "digest-only") return PullFromMirror::kDigestOnly;
  if (v == "tag-only") return PullFromMirror::kTagOnly;
  return InvalidArgument(file + ": pull-from-mirror is " + Quoted(v) + "; use all, digest-only or tag-only");
}

Result<Endpoint> ParseMirror(const std::string& file, const toml::table& t) {
  Endpoint m;
  std::string pull_from;
  for (const auto& [k, v] : t) {
    const std::string key(k.str());
    if (key == "location") {
      ASSIGN_OR_RETURN(std::string loc, GetString(file, "[[registry.mirror]] location", v));
      ASSIGN_OR_RETURN(m.location, ParseLocation(file, "mirror location", loc));
    } else if (key == "insecure") {
      ASSIGN_OR_RETURN(m.insecure, GetBool(file, "[[registry.mirror]] insecure", v));
    } else if (key == "pull-from-mirror") {
      ASSIGN_OR_RETURN(pull_from, GetString(file, "pull-from-mirror", v));
    } else {
      log::Warn("{}: [[registry.mirror]] key {} is not used by regdisk; ignored", file, Quoted(key));
    }
  }
  if (m.location.empty()) return InvalidArgument(file + ": a [[registry.mirror]] has no location");
  ASSIGN_OR_RETURN(m.pull_from_mirror, ParsePullFromMirror(file, pull_from));
  return m;
}

Result<RegistryEntry> ParseRegistry(const std::string& file, const toml::table& t) {
  RegistryEntry r;
  r.file = file;
  std::vector<std::string> mirror_pull_from;
  for (const auto& [k, v] : t) {
    const std::string key(k.str());
    if (key == "prefix") {
      ASSIGN_OR_RETURN(std::string p, GetString(file, "[[registry]] prefix", v));
      ASSIGN_OR_RETURN(r.prefix, ParseLocation(file, "prefix", p));
    } else if (key == "location") {
      ASSIGN_OR_RETURN(std::string loc, GetString(file, "[[registry]] location", v));
      ASSIGN_OR_RETURN(r.origin.location, ParseLocation(file, "location", loc));
    } else if (key == "insecure") {
      ASSIGN_OR_RETURN(r.origin.insecure, GetBool(file, "[[registry]] insecure", v));
    } else if (key == "blocked") {
      ASSIGN_OR_RETURN(r.blocked, GetBool(file, "[[registry]] blocked", v));
    } else if (key == "mirror-by-digest-only") {
      ASSIGN_OR_RETURN(r.mirror_by_digest_only, GetBool(file, "mirror-by-digest-only", v));
    } else if (key == "pull-from-mirror") {
      return InvalidArgument(file + ": pull-from-mirror belongs in a [[registry.mirror]] table, not in [[registry]]");
    } else if (key == "mirror") {
      auto arr = v.as_array();
      if (!arr || !arr->is_array_of_tables())
        return InvalidArgument(file + ": mirror must be written as [[registry.mirror]] tables");
      for (const auto& m : *arr) {
        ASSIGN_OR_RETURN(Endpoint e, ParseMirror(file, *m.as_table()));
        r.mirrors.push_back(std::move(e));
      }
    } else {
      log::Warn("{}: [[registry]] key {} is not used by regdisk; ignored", file, Quoted(key));
    }
  }
  if (r.prefix.empty()) {
    if (r.origin.location.empty()) return InvalidArgument(file + ": a [[registry]] has neither prefix nor location");
    r.prefix = r.origin.location;
  } else if (r.origin.location.empty() && r.prefix.rfind("*.", 0) != 0) {
    return InvalidArgument(file + ": [[registry]] prefix " + Quoted(r.prefix) +
                           " has no location; only a \"*.example.com\" prefix may leave it out");
  }
  if (r.prefix.rfind("*.", 0) == 0 && r.prefix.find_first_of("/@:") != std::string::npos) {
    return InvalidArgument(file + ": wildcard prefix " + Quoted(r.prefix) + " must be a bare \"*.domain\"");
  }
  for (const auto& m : r.mirrors) {
    if (r.mirror_by_digest_only && m.pull_from_mirror != PullFromMirror::kAll) {
      return InvalidArgument(
          file + ": [[registry]] " + Quoted(r.prefix) +
          " sets mirror-by-digest-only and a mirror sets pull-from-mirror; use only pull-from-mirror");
    }
  }
  return r;
}

// The length of `prefix` when it matches `name` ("host/repo"), else -1
// (containers-registries.conf(5): a prefix matches whole path components).
long MatchPrefix(std::string_view name, std::string_view prefix) {
  if (prefix.rfind("*.", 0) == 0) {
    std::string_view domain = prefix.substr(1);  // ".example.com"
    std::string_view host = name.substr(0, name.find('/'));
    std::string_view hostname = host.substr(0, host.find(':'));
    if (hostname.size() > domain.size() && hostname.substr(hostname.size() - domain.size()) == domain) {
      return static_cast<long>(hostname.size());
    }
    return -1;
  }
  if (name.size() < prefix.size() || name.substr(0, prefix.size()) != prefix) return -1;
  if (name.size() == prefix.size() || name[prefix.size()] == '/') return static_cast<long>(prefix.size());
  return -1;
}

// Splits "host[:port]/repo" after rewriting.
PullSource SplitName(const std::string& name, bool insecure, bool mirror) {
  PullSource s;
  size_t slash = name.find('/');
  s.registry = name.substr(0, slash);
  s.repository = slash == std::string::npos ? std::string() : name.substr(slash + 1);
  s.insecure = insecure;
  s.mirror = mirror;
  return s;
}

std::string Rewrite(const RegistryEntry& r, const Endpoint& e, const std::string& name) {
  if (e.location.empty()) return name;  // "*." prefix without a location
  if (r.prefix.rfind("*.", 0) == 0) {
    // The matched host is replaced by the location.
    size_t slash = name.find('/');
    return e.location + (slash == std::string::npos ? std::string() : name.substr(slash));
  }
  return e.location + name.substr(r.prefix.size());
}

Status Blocked(const RegistryEntry& r, const std::string& name) {
  return PermissionDenied("pulling or pushing " + Quoted(name) + " is blocked by registries.conf (" + r.file +
                          ", [[registry]] prefix " + Quoted(r.prefix) + "); remove blocked = true there to allow it");
}

}  // namespace

Result<RegistriesConf> RegistriesConf::Parse(std::string_view text, const std::string& file) {
  toml::table root;
  try {
    root = toml::parse(text, file);
  } catch (const toml::parse_error& e) {
    return InvalidArgument(file + ":" + std::to_string(e.source().begin.line) + ":" +
                           std::to_string(e.source().begin.column) +
                           ": not valid TOML: " + Printable(std::string(e.description()), 200));
  }
  RegistriesConf c;
  c.files.push_back(file);
  for (const auto& [k, v] : root) {
    const std::string key(k.str());
    if (key == "unqualified-search-registries") {
      ASSIGN_OR_RETURN(auto list, GetStrings(file, key, v));
      for (auto& s : list) {
        ASSIGN_OR_RETURN(s, ParseLocation(file, "unqualified-search registry", s));
      }
      c.unqualified_search_registries = std::move(list);
      c.search_registries_file = file;
    } else if (key == "short-name-mode") {
      ASSIGN_OR_RETURN(std::string m, GetString(file, key, v));
      if (m == "enforcing") {
        c.short_name_mode = ShortNameMode::kEnforcing;
      } else if (m == "permissive") {
        c.short_name_mode = ShortNameMode::kPermissive;
      } else if (m == "disabled") {
        c.short_name_mode = ShortNameMode::kDisabled;
      } else if (!m.empty()) {
        return InvalidArgument(file + ": short-name-mode is " + Quoted(m) + "; use enforcing, permissive or disabled");
      }
    } else if (key == "aliases") {
      auto t = v.as_table();
      if (!t) return InvalidArgument(file + ": aliases must be a table ([aliases])");
      for (const auto& [ak, av] : *t) {
        const std::string alias(ak.str());
        ASSIGN_OR_RETURN(std::string target, GetString(file, "alias " + Quoted(alias), av));
        if (!IsShortName(alias)) {
          return InvalidArgument(file + ": alias " + Quoted(alias) +
                                 " names a registry; an alias must be a short name");
        }
        if (target.find("://") != std::string::npos || IsShortName(target) || !oci::Reference::Parse(target).ok()) {
          return InvalidArgument(file + ": alias " + Quoted(alias) + " = " + Quoted(target) +
                                 " must be a fully qualified name such as registry.example.org/team/disk");
        }
        c.aliases[alias] = target;
      }
    } else if (key == "registry") {
      auto arr = v.as_array();
      if (!arr || !arr->is_array_of_tables())
        return InvalidArgument(file + ": registry must be written as [[registry]] tables");
      for (const auto& t : *arr) {
        ASSIGN_OR_RETURN(RegistryEntry r, ParseRegistry(file, *t.as_table()));
        c.registries.push_back(std::move(r));
      }
    } else if (key == "registries") {
      return InvalidArgument(
          file +
          " is in the version 1 format ([registries.search] ...); regdisk reads version 2: "
          "write unqualified-search-registries and [[registry]] tables (containers-registries.conf(5))");
    } else {
      log::Debug("{}: key {} is not used by regdisk; ignored", file, Quoted(key));
    }
  }
  std::stable_sort(c.registries.begin(), c.registries.end(),
                   [](const RegistryEntry& a, const RegistryEntry& b) { return a.prefix < b.prefix; });
  for (size_t i = 1; i < c.registries.size(); ++i) {
    if (c.registries[i].prefix == c.registries[i - 1].prefix) {
      return InvalidArgument(file + ": [[registry]] prefix " + Quoted(c.registries[i].prefix) + " is defined twice");
    }
  }
  return c;
}

void RegistriesConf::MergeFrom(const RegistriesConf& later) {
  std::map<std::string, RegistryEntry> by_prefix;
  for (auto& r : registries) by_prefix[r.prefix] = r;
  for (const auto& r : later.registries) by_prefix[r.prefix] = r;
  registries.clear();
  for (auto& [p, r] : by_prefix) registries.push_back(std::move(r));
  if (later.unqualified_search_registries) {
    unqualified_search_registries = later.unqualified_search_registries;
    search_registries_file = later.search_registries_file;
  }
  if (later.short_name_mode) short_name_mode = later.short_name_mode;
  for (const auto& [k, v] : later.aliases) aliases[k] = v;
  files.insert(files.end(), later.files.begin(), later.files.end());
}

const RegistryEntry* RegistriesConf::Find(std::string_view name) const {
  const RegistryEntry* best = nullptr;
  long best_len = 0;
  for (const auto& r : registries) {
    long len = MatchPrefix(name, r.prefix);
    // A longer prefix wins; for wildcards the length of the written prefix counts.
    long weight = len < 0 ? -1 : static_cast<long>(r.prefix.size());
    if (weight > best_len) {
      best = &r;
      best_len = weight;
    }
  }
  return best;
}

Result<std::vector<PullSource>> RegistriesConf::PullSources(const std::string& registry, const std::string& repository,
                                                            bool by_digest) const {
  const std::string name = registry + "/" + repository;
  const RegistryEntry* r = Find(name);
  if (!r) return std::vector<PullSource>{SplitName(name, false, false)};
  if (r->blocked) return Blocked(*r, name);
  std::vector<PullSource> out;
  for (const auto& m : r->mirrors) {
    bool use = true;
    if (r->mirror_by_digest_only) {
      use = by_digest;
    } else if (m.pull_from_mirror == PullFromMirror::kDigestOnly) {
      use = by_digest;
    } else if (m.pull_from_mirror == PullFromMirror::kTagOnly) {
      use = !by_digest;
    }
    if (use) out.push_back(SplitName(Rewrite(*r, m, name), m.insecure, true));
  }
  out.push_back(SplitName(Rewrite(*r, r->origin, name), r->origin.insecure, false));
  return out;
}

Result<PullSource> RegistriesConf::PushTarget(const std::string& registry, const std::string& repository) const {
  const std::string name = registry + "/" + repository;
  const RegistryEntry* r = Find(name);
  if (!r) return SplitName(name, false, false);
  if (r->blocked) return Blocked(*r, name);
  return SplitName(Rewrite(*r, r->origin, name), r->origin.insecure, false);
}

bool RegistriesConf::Insecure(const std::string& registry, const std::string& repository) const {
  const RegistryEntry* r = Find(registry + "/" + repository);
  return r && r->origin.insecure;
}

RegistriesConfPaths RegistriesConfPaths::Standard(const std::string& explicit_file,
                                                  const std::map<std::string, std::string>& env) {
  auto get = [&](const char* k) {
    auto it = env.find(k);
    return it == env.end() ? std::string() : it->second;
  };
  RegistriesConfPaths p;
  const std::string home = get("HOME");
  const fs::path user_file = home.empty() ? fs::path() : fs::path(home) / ".config/containers/registries.conf";
  const fs::path user_dir = home.empty() ? fs::path() : fs::path(home) / ".config/containers/registries.conf.d";
  std::error_code ec;
  if (!explicit_file.empty()) {
    p.file = explicit_file;
    p.file_must_exist = true;
  } else if (std::string e = get("CONTAINERS_REGISTRIES_CONF"); !e.empty()) {
    p.file = e;
    p.file_must_exist = true;
  } else if (!user_file.empty() && fs::exists(user_file, ec)) {
    p.file = user_file;
    if (!user_dir.empty()) p.dirs.push_back(user_dir);
    return p;
  } else {
    p.file = "/etc/containers/registries.conf";
  }
  p.dirs.push_back("/etc/containers/registries.conf.d");
  if (!user_dir.empty()) p.dirs.push_back(user_dir);
  return p;
}

Result<RegistriesConf> LoadRegistriesConf(const RegistriesConfPaths& paths) {
  RegistriesConf conf;
  auto load = [&](const fs::path& f, bool must_exist) -> Status {
    std::error_code ec;
    if (!fs::exists(f, ec)) {
      if (must_exist) {
        return InvalidArgument("registries configuration " + f.string() +
                               " does not exist; check --registries-conf or CONTAINERS_REGISTRIES_CONF");
      }
      return OkStatus();
    }
    ASSIGN_OR_RETURN(std::string text, ReadFileCapped(f, kMaxConfBytes));
    ASSIGN_OR_RETURN(RegistriesConf one, RegistriesConf::Parse(text, f.string()));
    log::Debug("read registries configuration {}", f.string());
    conf.MergeFrom(one);
    return OkStatus();
  };
  if (!paths.file.empty()) RETURN_IF_ERROR(load(paths.file, paths.file_must_exist));
  for (const auto& dir : paths.dirs) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) continue;
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      if (e.path().extension() == ".conf") files.push_back(e.path());
    }
    std::sort(files.begin(), files.end());
    for (const auto& f : files) RETURN_IF_ERROR(load(f, false));
  }
  return conf;
}

bool IsShortName(std::string_view name) {
  size_t slash = name.find('/');
  if (slash == std::string_view::npos) return true;
  std::string_view first = name.substr(0, slash);
  return first.find('.') == std::string_view::npos && first.find(':') == std::string_view::npos && first != "localhost";
}

Result<std::vector<std::string>> ResolveShortName(const RegistriesConf& conf, std::string_view name) {
  // Split NAME[:TAG][@DIGEST] into the name and what follows it.
  size_t at = name.find('@');
  std::string_view path = name.substr(0, at);
  size_t colon = path.rfind(':');
  if (colon != std::string_view::npos && path.find('/', colon) != std::string_view::npos)
    colon = std::string_view::npos;
  size_t name_end = std::min(colon, at);
  const std::string bare(name.substr(0, name_end));
  const std::string suffix(name_end == std::string_view::npos ? std::string_view() : name.substr(name_end));

  if (auto it = conf.aliases.find(bare); it != conf.aliases.end()) return std::vector<std::string>{it->second + suffix};
  // Docker's normalisation puts one-component names under library/.
  auto alias_key = bare.rfind("library/", 0) == 0 ? bare.substr(8) : std::string();
  if (auto it = conf.aliases.find(alias_key); !alias_key.empty() && it != conf.aliases.end()) {
    return std::vector<std::string>{it->second + suffix};
  }
  if (!conf.unqualified_search_registries) return std::vector<std::string>{"docker.io/" + std::string(name)};
  const auto& search = *conf.unqualified_search_registries;
  if (search.empty()) {
    return InvalidArgument("short name " + Quoted(name) +
                           " has no alias and no unqualified-search-registries are set (" +
                           conf.search_registries_file + "); write the full name, with the registry in front");
  }
  std::vector<std::string> out;
  for (const auto& reg : search) out.push_back(reg + "/" + std::string(name));
  if (out.size() > 1 && conf.EffectiveShortNameMode() == ShortNameMode::kEnforcing) {
    std::string list;
    for (const auto& c : out) list += (list.empty() ? "" : ", ") + c;
    return InvalidArgument("short name " + Quoted(name) +
                           " is ambiguous and short-name-mode is enforcing: it could be " + list +
                           "; write the full name or add an alias in registries.conf");
  }
  return out;
}

}  // namespace regdisk::registry
