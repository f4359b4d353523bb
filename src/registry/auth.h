// Registry credentials and the authentication challenge.
//
// Credentials are looked up per registry host in the order podman and
// skopeo use: --creds, --authfile, $REGISTRY_AUTH_FILE,
// $XDG_RUNTIME_DIR/containers/auth.json, then ~/.docker/config.json (its
// "auths" entries and "credHelpers"/"credsStore" helpers).
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
};

// Resolves credentials for a registry host ("host[:port]"). Returns nullopt
// when none are configured; an error when a configured source is broken
// (unreadable authfile, malformed JSON, failing helper).
Result<std::optional<Credentials>> LookupCredentials(const AuthConfig& config, std::string_view registry);

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
