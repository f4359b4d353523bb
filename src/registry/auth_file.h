// Writing containers-auth.json(5) files, for `regdisk login` and `logout`.
//
//   RETURN_IF_ERROR(StoreCredentials(AuthFileToWrite(config), "quay.io/team", creds));
//
// The file keeps whatever else it holds (other registries, credHelpers,
// Docker's keys); entries are written as podman writes them:
// {"auths": {"KEY": {"auth": base64("user:password")}}}. Every write is
// atomic (a temp file renamed over the old one) with mode 0600; missing
// parent directories are created with mode 0700.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>

#include "registry/auth.h"
#include "util/status.h"

namespace regdisk::registry {

// The auth.json key for what the user typed: "host[:port][/namespace...]";
// "https://" or "docker://" and a trailing '/' are dropped. A tag or digest
// is refused (InvalidArgument), as is an empty name.
Result<std::string> LoginKey(std::string_view text);

// Sets the entry for `key`.
Status StoreCredentials(const std::filesystem::path& file, const std::string& key, const Credentials& creds);
// Removes the entry for `key` (and the same registry written as a URL);
// false when there was none.
Result<bool> RemoveCredentials(const std::filesystem::path& file, const std::string& key);
// Removes every "auths" entry; a missing file is fine.
Status RemoveAllCredentials(const std::filesystem::path& file);

}  // namespace regdisk::registry
