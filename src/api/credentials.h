// The TLS endpoint's credentials, kept under ROOT/api/ (directory 0700,
// files 0600) and generated on first start (OpenSSL, ECDSA P-256):
//
//   ca.crt, ca.key         a CA that exists only to sign the two below;
//                          the kubeconfig's certificate-authority-data
//   tls.crt, tls.key       the server's certificate (serverAuth), signed
//                          by the CA
//   client.crt, client.key a client certificate (clientAuth, CN
//                          regdisk-admin), signed by the CA: what a
//                          kubeconfig for `--auth cert` carries
//   token                  a bearer token (32 random bytes in hex): what a
//                          kubeconfig for `--auth token` carries
//
//   ASSIGN_OR_RETURN(Credentials c, LoadOrCreateCredentials(root / "api", "127.0.0.1"));
//   RETURN_IF_ERROR(WriteKubeconfig(root / "kubeconfig", "https://127.0.0.1:6443", c, AuthMode::kToken));
//
// The server certificate names localhost, 127.0.0.1, ::1 and the listen
// address; one that does not name the listen address, or is not signed by
// the CA (a store from before the CA existed, whose tls.crt was
// self-signed), is replaced; the CA, the client certificate and the token
// stay. Nothing secret appears in logs or errors.
#pragma once

#include <filesystem>
#include <string>

#include "util/status.h"

namespace regdisk::api {

// Which credential the TLS endpoint accepts (and the kubeconfig carries).
enum class AuthMode {
  kToken,       // Authorization: Bearer TOKEN
  kClientCert,  // a client certificate signed by the CA
};

// "token" or "cert" (the serve flag's words); InvalidArgument otherwise.
Result<AuthMode> ParseAuthMode(const std::string& word);

struct Credentials {
  std::string ca_cert_pem;
  std::string cert_pem;  // the server's
  std::string key_pem;   // PKCS#8
  std::string client_cert_pem;
  std::string client_key_pem;
  std::string token;
};

// `host` is the listen address's IPv4 literal ("0.0.0.0" adds nothing).
Result<Credentials> LoadOrCreateCredentials(const std::filesystem::path& dir, const std::string& host);

// Writes a kubeconfig (0600, atomically) with one cluster, user and context
// named "regdisk": the server URL, the CA as certificate-authority-data,
// namespace "default", and for the user the token (kToken) or
// client-certificate-data and client-key-data (kClientCert).
Status WriteKubeconfig(const std::filesystem::path& path, const std::string& server_url, const Credentials& c,
                       AuthMode mode);

// Constant-time comparison of an Authorization header with "Bearer TOKEN".
bool BearerMatches(const std::string& authorization, const std::string& token);

}  // namespace regdisk::api
