#include "registry/auth_file.h"

#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "registry/http.h"
#include "util/fs.h"
#include "util/text.h"

namespace regdisk::registry {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr uint64_t kMaxAuthFileBytes = 1 << 20;

// The file's object; an empty one when it does not exist.
Result<json> Load(const fs::path& file) {
  std::error_code ec;
  if (!fs::exists(file, ec)) return json::object();
  ASSIGN_OR_RETURN(std::string text, ReadFileCapped(file, kMaxAuthFileBytes));
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return InvalidArgument("auth file " + file.string() + " is not a JSON object; fix or remove it");
  }
  if (j.contains("auths") && !j["auths"].is_object()) {
    return InvalidArgument("auth file " + file.string() + " has an \"auths\" that is not an object; fix or remove it");
  }
  return j;
}

// mkdir -p with mode 0700 for what it creates.
Status MakePrivateDirs(const fs::path& dir) {
  if (dir.empty()) return OkStatus();
  std::error_code ec;
  if (fs::is_directory(dir, ec)) return OkStatus();
  RETURN_IF_ERROR(MakePrivateDirs(dir.parent_path()));
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) return ErrnoStatus("creating directory " + dir.string());
  return OkStatus();
}

Status Save(const fs::path& file, const json& j) {
  RETURN_IF_ERROR(MakePrivateDirs(file.parent_path()));
  return WriteFileAtomic(file, j.dump(1, '\t') + "\n", 0600).Annotate("writing auth file " + file.string());
}

std::string HostOfUrlKey(const std::string& key) {
  size_t p = key.find("://");
  if (p == std::string::npos) return {};
  std::string rest = key.substr(p + 3);
  return rest.substr(0, rest.find('/'));
}

}  // namespace

Result<std::string> LoginKey(std::string_view text) {
  std::string_view t = text;
  for (std::string_view scheme : {"https://", "http://", "docker://"}) {
    if (t.rfind(scheme, 0) == 0) t.remove_prefix(scheme.size());
  }
  while (!t.empty() && t.back() == '/') t.remove_suffix(1);
  if (t.empty()) return InvalidArgument("login needs a registry, such as quay.io or 127.0.0.1:5000");
  const std::string key(t);
  const size_t slash = key.find('/');
  if (key.find('@') != std::string::npos || (slash != std::string::npos && key.find(':', slash) != std::string::npos)) {
    return InvalidArgument(Printable(key, 100) +
                           " names a tag or digest; log in to a registry, a namespace or a repository, without one");
  }
  for (char c : key) {
    if (static_cast<unsigned char>(c) <= ' ' || c == '"' || c == '\\') {
      return InvalidArgument(Printable(key, 100) + " is not a registry name");
    }
  }
  return key;
}

Status StoreCredentials(const fs::path& file, const std::string& key, const Credentials& creds) {
  ASSIGN_OR_RETURN(json j, Load(file));
  j["auths"][key] = json{{"auth", Base64Encode(creds.username + ":" + creds.password)}};
  return Save(file, j);
}

Result<bool> RemoveCredentials(const fs::path& file, const std::string& key) {
  ASSIGN_OR_RETURN(json j, Load(file));
  auto auths = j.find("auths");
  if (auths == j.end()) return false;
  bool removed = auths->erase(key) > 0;
  if (key.find('/') == std::string::npos) {
    // The same registry written as a URL by older clients.
    std::vector<std::string> urls;
    for (auto& [k, v] : auths->items()) {
      if (HostOfUrlKey(k) == key) urls.push_back(k);
    }
    for (const auto& k : urls) removed = auths->erase(k) > 0 || removed;
  }
  if (removed) RETURN_IF_ERROR(Save(file, j));
  return removed;
}

Status RemoveAllCredentials(const fs::path& file) {
  std::error_code ec;
  if (!fs::exists(file, ec)) return OkStatus();
  ASSIGN_OR_RETURN(json j, Load(file));
  j["auths"] = json::object();
  return Save(file, j);
}

}  // namespace regdisk::registry
