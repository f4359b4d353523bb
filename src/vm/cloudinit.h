// The cloud-init NoCloud seed of one VM: an ISO 9660 image labelled
// "cidata" holding user-data, meta-data and, when given, network-config,
// which cloud-init in the guest finds by its label.
//
//   NoCloudSeed seed{.instance_id = uid, .local_hostname = name, .user_data = data};
//   RETURN_IF_ERROR(WriteNoCloudSeed(run_dir / "cidata.iso", seed));
//
// The image is made with libisofs (ISO 9660 level 3 with Rock Ridge and
// Joliet, so the lower-case names survive on every reader) in memory and
// written once: the file appears complete or not at all, mode 0600, and is
// never replaced. The same seed gives the same bytes (fixed timestamps,
// owners and modes; no random ids), so a seed can be compared or cached.
//
// The contents are the user's data and may hold secrets: nothing here logs
// them, and no error message quotes them.
//
// Thread-safe: several seeds may be written at once from different
// threads (libisofs keeps unsynchronised global counters, so the image
// generation itself is serialised; a seed takes milliseconds).
#pragma once

#include <cstddef>
#include <filesystem>
#include <optional>
#include <string>

#include "util/status.h"

namespace regdisk::vm {

// The most user-data or network-config a seed takes (16 MiB each).
// KubeVirt's admission webhook caps inline userData(Base64) and
// networkData(Base64) at 2048 bytes each and does not count what comes from
// a Secret (secretRef, networkDataSecretRef); that check belongs to the spec
// validator. This bound is for everything else: it keeps a hostile or
// mistaken Secret from filling the run directory.
inline constexpr size_t kMaxNoCloudFileBytes = size_t{16} << 20;
// The most instance-id or local-hostname takes (they are a UID and a name).
inline constexpr size_t kMaxNoCloudMetaValueBytes = 4096;

struct NoCloudSeed {
  std::string instance_id;     // meta-data instance-id (the VM's UID)
  std::string local_hostname;  // meta-data local-hostname (the VM's name)
  std::string user_data;       // file user-data (decoded bytes; may be empty: the file still exists, empty)
  std::optional<std::string> network_config;  // file network-config, only when given
};

// Writes the seed's ISO image to `path`. The file is made under a temp
// name in the same directory (mode 0600, O_EXCL), written, fsynced and then
// linked to `path`, which must not exist: an existing file is never
// touched (kAlreadyExists). On any failure nothing is left at `path` nor
// under the temp name; a process killed meanwhile can leave only the temp
// file, PATH.tmp-XXXXXX (PendingFile::RemoveStale, or removing the run
// directory, takes it away).
//
// Refused with kInvalidArgument, before anything is written:
//   - user_data or network_config larger than kMaxNoCloudFileBytes;
//   - an empty instance_id or local_hostname, one longer than
//     kMaxNoCloudMetaValueBytes, or one that is not valid UTF-8 (YAML
//     cannot carry arbitrary bytes).
// user_data and network_config are any bytes; they are stored as given.
Status WriteNoCloudSeed(const std::filesystem::path& path, const NoCloudSeed& seed);

// meta-data as cloud-init reads it (YAML):
//
//   instance-id: "..."
//   local-hostname: "..."
//
// Each value is a double-quoted YAML scalar in which everything but
// printable ASCII is escaped (\n, \", \\, \x07, \u00e9, \U0001f600), so any
// string is data, never YAML syntax, and a YAML 1.1 or 1.2 reader gives
// back exactly the value. Values must be valid UTF-8 (WriteNoCloudSeed
// checks); an invalid byte here comes out as U+FFFD.
std::string NoCloudMetaData(const NoCloudSeed& seed);

}  // namespace regdisk::vm
