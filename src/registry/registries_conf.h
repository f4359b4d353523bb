// containers-registries.conf(5), version 2: where images are pulled from.
//
//   ASSIGN_OR_RETURN(RegistriesConf conf, LoadRegistriesConf(RegistriesConfPaths::Standard(env)));
//   ASSIGN_OR_RETURN(auto sources, conf.PullSources("quay.io", "team/disk", /*by_digest=*/true));
//   // sources: the mirrors allowed for a digest pull, in order, then the origin
//
// What is read: the main file (--registries-conf, $CONTAINERS_REGISTRIES_CONF,
// $HOME/.config/containers/registries.conf when it exists, else
// /etc/containers/registries.conf), then the drop-ins *.conf of
// /etc/containers/registries.conf.d and $HOME/.config/containers/registries.conf.d
// in lexical order (only the user's directory when the user's file was
// chosen). A later file replaces [[registry]] entries with the same prefix,
// unqualified-search-registries and short-name-mode when it sets them, and
// adds or replaces aliases one by one. Files that do not exist are skipped;
// a file that exists and is malformed is an error naming it.
//
// Supported keys: unqualified-search-registries, short-name-mode, [aliases],
// [[registry]] prefix/location/insecure/blocked/mirror-by-digest-only and
// [[registry.mirror]] location/insecure/pull-from-mirror. The v1 format
// ([registries.search] ...) and keys regdisk does not use
// (credential-helpers, additional-layer-store-auth-helper) are refused or
// ignored as documented in docs/operations.md. Parsing uses toml++.
#pragma once

#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "util/status.h"

namespace regdisk::registry {

// Which pulls may use a mirror.
enum class PullFromMirror { kAll, kDigestOnly, kTagOnly };

// A place to pull from: "host[:port][/namespace]".
struct Endpoint {
  std::string location;
  bool insecure = false;
  PullFromMirror pull_from_mirror = PullFromMirror::kAll;  // mirrors only
};

// One [[registry]] table.
struct RegistryEntry {
  std::string prefix;  // "example.com/ns", or "*.example.com"
  Endpoint origin;     // location may be empty only with a "*." prefix
  bool blocked = false;
  bool mirror_by_digest_only = false;
  std::vector<Endpoint> mirrors;
  std::string file;  // where it was defined, for messages
};

enum class ShortNameMode { kEnforcing, kPermissive, kDisabled };

// A source to try for one pull, after prefix rewriting.
struct PullSource {
  std::string registry;    // host[:port]
  std::string repository;  // the repository on that host
  bool insecure = false;   // plain HTTP and unverified TLS allowed
  bool mirror = false;     // false for the registry itself (the last one)
};

struct RegistriesConf {
  // nullopt: not set by any file (short names then fall back to docker.io,
  // as Docker normalises them). An empty list is set, and empty.
  std::optional<std::vector<std::string>> unqualified_search_registries;
  std::string search_registries_file;  // where the list was set
  std::optional<ShortNameMode> short_name_mode;
  std::map<std::string, std::string> aliases;  // short name -> qualified name
  std::vector<RegistryEntry> registries;       // sorted by prefix
  std::vector<std::string> files;              // read, in order

  // Parses one file's text; `name` names it in errors.
  static Result<RegistriesConf> Parse(std::string_view text, const std::string& name);
  // Applies a later file on top of this one (the drop-in rules above).
  void MergeFrom(const RegistriesConf& later);

  // The [[registry]] entry with the longest prefix matching `name`
  // ("host/repo"), or nullptr.
  const RegistryEntry* Find(std::string_view name) const;
  // Where a pull of registry/repository may come from, in the order to try:
  // mirrors allowed for this kind of pull, then the registry (or its
  // location). PermissionDenied when the registry is blocked.
  Result<std::vector<PullSource>> PullSources(const std::string& registry, const std::string& repository,
                                              bool by_digest) const;
  // Where a push to registry/repository goes (location rewriting, no
  // mirrors). PermissionDenied when blocked.
  Result<PullSource> PushTarget(const std::string& registry, const std::string& repository) const;
  // True when registry/repository may be reached over plain HTTP or
  // unverified TLS, per the matching entry's `insecure`.
  bool Insecure(const std::string& registry, const std::string& repository) const;

  ShortNameMode EffectiveShortNameMode() const { return short_name_mode.value_or(ShortNameMode::kPermissive); }
};

struct RegistriesConfPaths {
  std::filesystem::path file;               // the main file
  std::vector<std::filesystem::path> dirs;  // drop-in directories, in order
  bool file_must_exist = false;             // --registries-conf / $CONTAINERS_REGISTRIES_CONF

  // The standard places. `explicit_file` is --registries-conf (may be
  // empty); `getenv` reads HOME and CONTAINERS_REGISTRIES_CONF.
  static RegistriesConfPaths Standard(const std::string& explicit_file, const std::map<std::string, std::string>& env);
};

// Reads and merges every file of `paths`.
Result<RegistriesConf> LoadRegistriesConf(const RegistriesConfPaths& paths);

// True for a name without a registry host: "fedora", "vmdisks/fedora:1".
// The first path component is a host when it has a '.' or ':' or is
// "localhost" (Docker's rule).
bool IsShortName(std::string_view name);

// The qualified names to try for a short name (tag or digest kept), in
// order: its alias, else one per unqualified-search registry. With several
// candidates, enforcing mode is an error listing them (regdisk does not
// prompt); permissive and disabled try them in order. Without any
// search registry configured (no file sets the list) the name is Docker's
// (docker.io/library/NAME).
Result<std::vector<std::string>> ResolveShortName(const RegistriesConf& conf, std::string_view name);

}  // namespace regdisk::registry
