#include "api/kubeconfig.h"

#include <yaml-cpp/yaml.h>

#include "registry/http.h"
#include "util/fs.h"
#include "util/text.h"

namespace regdisk::api {

namespace fs = std::filesystem;

namespace {

// The entry of a named list ("clusters", "users", "contexts") called
// `name`: its inner map (e.g. the "cluster" of a cluster entry).
YAML::Node Named(const YAML::Node& root, const std::string& list, const std::string& inner, const std::string& name) {
  const YAML::Node entries = root[list];
  if (!entries || !entries.IsSequence()) return YAML::Node();
  for (const auto& e : entries) {
    if (e.IsMap() && e["name"] && e["name"].IsScalar() && e["name"].Scalar() == name) return e[inner];
  }
  return YAML::Node();
}

std::string Text(const YAML::Node& map, const std::string& key) {
  if (!map || !map.IsMap() || !map[key] || !map[key].IsScalar()) return "";
  return map[key].Scalar();
}

}  // namespace

Result<Endpoint> LoadKubeconfig(const fs::path& path) {
  const std::string where = "kubeconfig " + Printable(path.string());
  auto text = ReadFileCapped(path, 4 << 20);
  if (!text.ok()) return InvalidArgument("cannot read the kubeconfig: " + text.status().message());
  YAML::Node root;
  try {
    root = YAML::Load(*text);
  } catch (const YAML::Exception&) {
    return InvalidArgument(where + " is not valid YAML");  // its text may hold credentials: not quoted
  }
  if (!root.IsMap()) return InvalidArgument(where + " is not a kubeconfig (no map at the top)");
  const std::string context_name = Text(root, "current-context");
  if (context_name.empty()) return InvalidArgument(where + " has no current-context; set one with kubectl config use-context");
  const YAML::Node context = Named(root, "contexts", "context", context_name);
  if (!context || !context.IsMap()) {
    return InvalidArgument(where + ": the current context \"" + Printable(context_name, 80) + "\" is not in contexts");
  }
  const std::string cluster_name = Text(context, "cluster"), user_name = Text(context, "user");
  const YAML::Node cluster = Named(root, "clusters", "cluster", cluster_name);
  if (!cluster || !cluster.IsMap()) {
    return InvalidArgument(where + ": the cluster \"" + Printable(cluster_name, 80) + "\" of context \"" +
                           Printable(context_name, 80) + "\" is not in clusters");
  }
  const fs::path dir = path.parent_path();
  // An inline "*-data" field (base64) or a file the other field names.
  auto material = [&](const YAML::Node& map, const std::string& data_key,
                      const std::string& file_key) -> Result<std::string> {
    if (const std::string data = Text(map, data_key); !data.empty()) {
      auto decoded = registry::Base64Decode(data);
      if (!decoded.ok()) return InvalidArgument(where + ": " + data_key + " is not base64");
      return *decoded;
    }
    if (const std::string file = Text(map, file_key); !file.empty()) {
      fs::path p = fs::path(file).is_absolute() ? fs::path(file) : dir / file;
      auto read = ReadFileCapped(p, 1 << 20);
      if (!read.ok()) return InvalidArgument(where + ": " + file_key + " " + Printable(p.string()) + ": " + read.status().message());
      return *read;
    }
    return std::string();
  };
  Endpoint e;
  e.kubeconfig = path.string();
  e.ns = Text(context, "namespace");
  e.server = Text(cluster, "server");
  if (e.server.rfind("https://", 0) != 0) {
    return InvalidArgument(where + ": the server of cluster \"" + Printable(cluster_name, 80) +
                           "\" must be an https:// URL, not \"" + Printable(e.server, 200) + "\"");
  }
  while (!e.server.empty() && e.server.back() == '/') e.server.pop_back();
  if (Text(cluster, "insecure-skip-tls-verify") == "true") {
    return InvalidArgument(where + ": insecure-skip-tls-verify is not supported; give the cluster's "
                           "certificate-authority-data");
  }
  ASSIGN_OR_RETURN(e.ca_pem, material(cluster, "certificate-authority-data", "certificate-authority"));
  const YAML::Node user = Named(root, "users", "user", user_name);
  if (user && user.IsMap()) {
    if (user["exec"] || user["auth-provider"]) {
      return InvalidArgument(where + ": user \"" + Printable(user_name, 80) +
                             "\" uses an exec or auth-provider plugin, which regdisk does not run; use kubectl");
    }
    ASSIGN_OR_RETURN(e.client_cert_pem, material(user, "client-certificate-data", "client-certificate"));
    ASSIGN_OR_RETURN(e.client_key_pem, material(user, "client-key-data", "client-key"));
    if (e.client_cert_pem.empty() != e.client_key_pem.empty()) {
      return InvalidArgument(where + ": user \"" + Printable(user_name, 80) +
                             "\" needs both a client certificate and its key, or neither");
    }
    e.token = Text(user, "token");
    if (e.token.empty()) {
      ASSIGN_OR_RETURN(e.token, material(user, "", "tokenFile"));
      while (!e.token.empty() && (e.token.back() == '\n' || e.token.back() == '\r')) e.token.pop_back();
    }
  }
  return e;
}

}  // namespace regdisk::api
