// The TLS endpoint's credentials: a self-signed certificate (ECDSA P-256,
// also its own CA, so a kubeconfig can trust exactly it) and a bearer token,
// kept under ROOT/api/ (directory 0700, files 0600) and generated on first
// start; and the kubeconfig kubectl uses to reach the endpoint.
//
//   ASSIGN_OR_RETURN(Credentials c, LoadOrCreateCredentials(root / "api", "127.0.0.1"));
//   RETURN_IF_ERROR(WriteKubeconfig(root / "kubeconfig", "https://127.0.0.1:6443", c));
//
// The certificate names localhost, 127.0.0.1, ::1 and the listen address;
// one that does not name the listen address is replaced (the token stays).
// The token is 32 random bytes in hex; it never appears in logs or errors.
#pragma once

#include <filesystem>
#include <string>

#include "util/status.h"

namespace regdisk::api {

struct Credentials {
  std::string cert_pem;
  std::string key_pem;  // PKCS#8
  std::string token;
};

// `host` is the listen address's IPv4 literal ("0.0.0.0" adds nothing).
Result<Credentials> LoadOrCreateCredentials(const std::filesystem::path& dir, const std::string& host);

// Writes a kubeconfig (0600, atomically) with one cluster, user and context
// named "regdisk": the server URL, the certificate as
// certificate-authority-data, the token, namespace "default".
Status WriteKubeconfig(const std::filesystem::path& path, const std::string& server_url, const Credentials& c);

// Constant-time comparison of an Authorization header with "Bearer TOKEN".
bool BearerMatches(const std::string& authorization, const std::string& token);

}  // namespace regdisk::api
