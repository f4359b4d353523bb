// Routing one registry's requests through registries.conf: mirrors first,
// then the registry itself; blocked registries refused; `insecure` applied
// to the one endpoint it names.
//
// RegistryClient owns a MirrorRouter when ClientOptions::registries has a
// [[registry]] entry; every request is then made by a plain client (one per
// endpoint, created on first use) that the router picks:
//
//   pulls (manifests, blobs, tags): each PullSource in order until one
//     answers; a failure other than cancellation moves on to the next, and
//     the error, when all fail, is the registry's own with the mirrors'
//     failures appended. A blob whose download broke on a mirror continues
//     on the next source from the byte it reached (Range), hashed as one.
//   after a manifest by tag came from a source, requests by digest for the
//     same repository try that source first (what a tag-only mirror served
//     is then completed from it).
//   pushes and existence checks: the registry's location only.
//
// Thread-compatible, like RegistryClient.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "oci/digest.h"
#include "oci/manifest.h"
#include "registry/registries_conf.h"
#include "util/status.h"

namespace regdisk::registry {

class RegistryClient;
struct ClientOptions;

class MirrorRouter {
 public:
  // options.registries must be set; the children get copies without it.
  MirrorRouter(std::string registry, const ClientOptions& options);
  ~MirrorRouter();

  // Runs `op` against each pull source of registry/repo until one succeeds.
  // `op` gets the client and the repository on that endpoint.
  using PullOp = std::function<Status(RegistryClient& client, const std::string& repo, const PullSource& source)>;
  // When `op` sets *final_failure, its failure is returned without trying
  // further sources.
  Status Pull(const std::string& repo, bool by_digest, const std::string& what, const PullOp& op,
              const bool* final_failure = nullptr);
  // The client and repository for writes to registry/repo.
  Result<std::pair<RegistryClient*, std::string>> PushTarget(const std::string& repo);

  // A blob, resumed across sources (see above).
  Status FetchBlob(const std::string& repo, const oci::Descriptor& desc,
                   const std::function<Status(std::string_view)>& sink, uint64_t offset, oci::Hasher* resumed);

  int token_requests() const;

 private:
  RegistryClient& ClientFor(const PullSource& source);

  std::string registry_;
  std::unique_ptr<ClientOptions> options_;                          // without registries
  std::map<std::string, std::unique_ptr<RegistryClient>> clients_;  // by "insecure|host"
  std::map<std::string, PullSource> tag_source_;                    // by repo
};

}  // namespace regdisk::registry
