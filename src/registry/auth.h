// Registry credentials and the authentication challenge.
//
// Credentials are looked up as containers-auth.json(5) says, the way podman
// and skopeo do: --creds; else --authfile or $REGISTRY_AUTH_FILE alone when
// given; else ${XDG_RUNTIME_DIR}/containers/auth.json (or
// /run/containers/$UID/auth.json without XDG_RUNTIME_DIR), then
// ${XDG_CONFIG_HOME:-~/.config}/containers/auth.json, then
// $DOCKER_CONFIG/config.json or ~/.docker/config.json. The first file with an
// entry wins. Within a file: a "credHelpers" entry for the host runs
// docker-credential-NAME; else the most specific "auths" key wins
// (registry/ns/repo, then registry/ns, then registry), then keys written as
// URLs ("https://index.docker.io/v1/"); "credsStore" last.
//
// A Credentials value must never reach a log line, an error message or a
// child's command line; helpers receive the host on stdin.
#pragma once

#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "util/status.h"

namespace regdisk::registry {

struct Credentials {
  std::string username;
  std::string password;  // or an identity token when username is "<token>"
  // Where they came from, for messages ("--creds", "auth file F (key K)");
  // never secret.
  std::string source;
  bool empty() const { return username.empty() && password.empty(); }
};

struct AuthConfig {
  std::optional<Credentials> explicit_creds;  // --creds
  std::filesystem::path authfile;             // --authfile
  // An auth file's contents held in memory (a Kubernetes pull secret's
  // .dockerconfigjson); used like --authfile, and never written to disk.
  // `authfile_name` names it in messages.
  std::optional<std::string> authfile_json;
  std::string authfile_name;
  // Overrides for tests; empty means the process environment.
  std::optional<std::map<std::string, std::string>> env;
  // Where /run/containers/$UID/auth.json lives (tests point it elsewhere).
  std::filesystem::path per_uid_root = "/run/containers";
};

// The auth files to read, in order, for a config without --creds or an
// in-memory file. `user_specified` is true for --authfile and
// $REGISTRY_AUTH_FILE (then it is the only one, and must exist).
struct AuthFileSearch {
  std::vector<std::filesystem::path> files;
  bool user_specified = false;
};
AuthFileSearch AuthFilesToRead(const AuthConfig& config);
// Where `regdisk login` writes and `logout` removes: --authfile,
// $REGISTRY_AUTH_FILE, ${XDG_RUNTIME_DIR}/containers/auth.json, else
// /run/containers/$UID/auth.json (as podman does).
std::filesystem::path AuthFileToWrite(const AuthConfig& config);

// Resolves credentials for a registry host ("host[:port]") and, when given,
// a repository on it (for namespaced auth.json keys). Returns nullopt when
// none are configured; an error when a configured source is broken
// (unreadable authfile, malformed JSON, failing helper).
Result<std::optional<Credentials>> LookupCredentials(const AuthConfig& config, std::string_view registry,
                                                     std::string_view repository = {});

// Reads and parses an auth file given explicitly (--authfile), so a missing,
// unreadable or malformed one fails at once rather than at the first 401.
Status CheckAuthFile(const std::filesystem::path& path);

// Parses "USER[:PASS]" from --creds.
Result<Credentials> ParseCredsFlag(std::string_view value);

// One WWW-Authenticate challenge.
struct Challenge {
  std::string scheme;  // "bearer" or "basic", lowercased
  std::map<std::string, std::string> params;  // realm, service, scope, error
};

// Parses a WWW-Authenticate header; returns the challenges it lists.
std::vector<Challenge> ParseChallenges(std::string_view header);

}  // namespace regdisk::registry
