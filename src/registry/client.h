// A client for one registry host speaking the Distribution API v2 (the OCI
// distribution-spec): manifests, blobs, uploads, cross-repository mounts,
// Bearer-token and Basic authentication, retries and resumable downloads.
//
//   RegistryClient reg("127.0.0.1:5000", options);
//   ASSIGN_OR_RETURN(oci::RawManifest m, reg.GetManifest("vmdisks/fedora", "latest"));
//   RETURN_IF_ERROR(reg.FetchBlob("vmdisks/fedora", layer, sink));
//
// Everything fetched is verified: manifests by digest (when the digest is
// known), blobs by size and digest as they stream. Credentials go only to
// the registry's own origin and to its token realm, never to a host that a
// redirect names, and never into messages or logs.
//
// Thread-compatible: use one client per thread.
#pragma once

#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "oci/digest.h"
#include "oci/manifest.h"
#include "registry/auth.h"
#include "registry/http.h"
#include "registry/registries_conf.h"
#include "util/cancel.h"
#include "util/status.h"

namespace regdisk::registry {

struct ClientOptions {
  // nullopt: verify certificates, but allow plain HTTP for loopback hosts.
  // false: do not verify, and allow plain HTTP for any host.
  std::optional<bool> tls_verify;
  std::filesystem::path cert_dir;  // replaces the certs.d lookup when set
  // Where certs.d directories are searched (tests point these elsewhere).
  std::vector<std::filesystem::path> certs_d_roots = {"/etc/containers/certs.d", "/etc/docker/certs.d"};
  AuthConfig auth;
  // registries.conf: mirrors, location rewriting, blocked and insecure
  // registries (see mirrors.h). Null: talk to the registry named.
  std::shared_ptr<const RegistriesConf> registries;
  HttpLimits limits;
  // Per request, counting the first. Connection refused, a name that does
  // not resolve and an untrusted certificate are never retried.
  int max_attempts = 6;
  std::chrono::milliseconds backoff_base{250};
  std::chrono::milliseconds backoff_max{8000};
  std::chrono::milliseconds retry_after_max{60000};
  // Blobs larger than this are uploaded in chunks of chunk_size (or the
  // registry's OCI-Chunk-Min-Length, whichever is larger).
  uint64_t chunk_threshold = 128ull << 20;
  uint64_t chunk_size = 64ull << 20;
  // Stops transfers and back-off waits of this client when cancelled.
  std::shared_ptr<const CancelToken> cancel;
};

// Receives a blob's bytes in order; an error aborts the download.
using BlobSink = std::function<Status(std::string_view chunk)>;

class MirrorRouter;

class RegistryClient {
 public:
  // registry: host[:port] as written in the reference ("docker.io" allowed).
  RegistryClient(std::string registry, ClientOptions options);
  ~RegistryClient();

  const std::string& registry() const { return registry_; }

  // With registries.conf entries (ClientOptions::registries), reads try the
  // mirrors first and writes go to the registry's location (mirrors.h).
  //
  // Fetches a manifest by tag or digest. When ref is a digest the bytes are
  // checked against it; otherwise against Docker-Content-Digest if sent.
  Result<oci::RawManifest> GetManifest(const std::string& repo, const std::string& ref);
  // HEAD on a manifest: its digest, or NotFound.
  Result<oci::Digest> ResolveManifest(const std::string& repo, const std::string& ref);

  Result<bool> BlobExists(const std::string& repo, const oci::Digest& digest);
  // Streams the blob to sink, resuming with Range after a dropped
  // connection; fails with DataLoss on a size or digest mismatch, in which
  // case whatever reached the sink must be discarded by the caller.
  //
  // To continue an earlier partial download, pass its length as `offset`
  // and a hasher that has already seen those bytes; only the rest is
  // fetched and handed to sink.
  Status FetchBlob(const std::string& repo, const oci::Descriptor& desc, const BlobSink& sink, uint64_t offset = 0,
                   oci::Hasher* resumed = nullptr);
  // Reads `length` bytes of a blob from `offset` with an HTTP Range request,
  // through the same authentication, redirects and retries as FetchBlob (a
  // broken transfer continues from the byte it reached). The bytes are not
  // verified (only a whole blob can be): the caller checks them against
  // digests it trusts. A range outside desc.size is InvalidArgument; a
  // registry that ignores Range (200) is read up to the range and dropped.
  // `cancel`, when given, is this read's own token besides the client's (a
  // per-request deadline): once cancelled, the transfer and any back-off
  // wait stop within about a second and the read returns its status.
  Status FetchBlobRange(const std::string& repo, const oci::Descriptor& desc, uint64_t offset, uint64_t length,
                        const BlobSink& sink, const CancelToken* cancel = nullptr);
  // Small blobs (configs) into memory, verified; refuses more than max_bytes.
  Result<std::string> FetchBlobToString(const std::string& repo, const oci::Descriptor& desc, uint64_t max_bytes);

  // Asks the registry to link a blob from another repository it holds.
  // True when mounted; false when the registry wants an upload instead.
  Result<bool> MountBlob(const std::string& repo, const oci::Descriptor& desc, const std::string& from_repo);
  // Uploads length bytes of fd from offset (the blob's verified bytes).
  Status PushBlob(const std::string& repo, const oci::Descriptor& desc, int fd, uint64_t offset = 0);
  // Uploads a blob whose digest is not known in advance: `produce` writes
  // the bytes to the fd it is given (a pipe, from another thread) and returns
  // the descriptor of what it wrote; the bytes stream to the registry in one
  // chunked PATCH and the upload is closed with that digest. Memory stays
  // bounded whatever the size. Not retried: on failure, produce again.
  Result<oci::Descriptor> PushBlobStream(const std::string& repo,
                                         const std::function<Result<oci::Descriptor>(int fd)>& produce);
  // Uploads a blob held in memory (configs, small test data).
  Status PushBlobBytes(const std::string& repo, const oci::Descriptor& desc, std::string_view bytes);
  // PUT a manifest under ref (a tag, or its own digest).
  Status PutManifest(const std::string& repo, const std::string& ref, const oci::RawManifest& manifest);

  // GET /v2/ with the configured credentials: OK when the registry accepts
  // them (or needs none); Unauthenticated naming the refusal otherwise.
  // What `regdisk login` checks before it stores anything.
  Status CheckLogin();

  // Lists tags (follows pagination).
  Result<std::vector<std::string>> ListTags(const std::string& repo);

  // How many token requests were made (for tests of the token cache).
  int token_requests() const;

  struct State;  // implementation detail, defined in client.cc

 private:
  std::unique_ptr<State> s_;
  std::string registry_;
  std::unique_ptr<MirrorRouter> router_;  // when registries.conf has entries
};

}  // namespace regdisk::registry
