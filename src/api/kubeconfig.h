// Where a client command finds the API: the daemon's unix socket, or the
// cluster a kubeconfig's current context names (the one `regdisk serve
// --listen` writes, or any other kubectl uses).
//
//   ASSIGN_OR_RETURN(Endpoint e, LoadKubeconfig("/var/lib/regdisk/kubeconfig"));
//   ApiClient api(e);   // https://127.0.0.1:6443 with the CA and credential
//
// Read from a kubeconfig, as kubectl reads it: current-context, that
// context's cluster (server, certificate-authority-data or
// certificate-authority) and user (token or tokenFile,
// client-certificate[-data] and client-key[-data]), and its namespace.
// Relative file paths are relative to the kubeconfig's directory. Only
// https servers are taken; insecure-skip-tls-verify, exec and
// auth-provider plugins are refused with an error naming the file and the
// field. Errors never quote a credential.
#pragma once

#include <filesystem>
#include <string>

#include "util/status.h"

namespace regdisk::api {

struct Endpoint {
  std::string socket;  // a unix socket path, or else:
  std::string server;  // "https://HOST:PORT"
  std::string ca_pem;  // "" trusts the system's CAs
  std::string client_cert_pem;
  std::string client_key_pem;
  std::string token;
  std::string ns;          // the context's namespace ("" when it names none)
  std::string kubeconfig;  // the file it came from, for messages

  static Endpoint Socket(std::string path) {
    Endpoint e;
    e.socket = std::move(path);
    return e;
  }
};

Result<Endpoint> LoadKubeconfig(const std::filesystem::path& path);

}  // namespace regdisk::api
