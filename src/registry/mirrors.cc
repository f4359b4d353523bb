#include "registry/mirrors.h"

#include "registry/client.h"
#include "util/log.h"

namespace regdisk::registry {

MirrorRouter::MirrorRouter(std::string registry, const ClientOptions& options)
    : registry_(std::move(registry)), options_(std::make_unique<ClientOptions>(options)) {}

MirrorRouter::~MirrorRouter() = default;

RegistryClient& MirrorRouter::ClientFor(const PullSource& source) {
  const std::string key = std::string(source.insecure ? "insecure|" : "|") + source.registry;
  auto& slot = clients_[key];
  if (!slot) {
    ClientOptions o = *options_;
    o.registries.reset();
    if (source.insecure) o.tls_verify = false;
    slot = std::make_unique<RegistryClient>(source.registry, std::move(o));
  }
  return *slot;
}

Status MirrorRouter::Pull(const std::string& repo, bool by_digest, const std::string& what, const PullOp& op,
                          const bool* final_failure) {
  ASSIGN_OR_RETURN(std::vector<PullSource> sources, options_->registries->PullSources(registry_, repo, by_digest));
  if (by_digest) {
    if (auto it = tag_source_.find(repo); it != tag_source_.end()) {
      const PullSource& first = it->second;
      std::erase_if(sources, [&](const PullSource& s) {
        return s.registry == first.registry && s.repository == first.repository;
      });
      sources.insert(sources.begin(), first);
    }
  }
  std::string mirror_errors;
  for (size_t i = 0; i < sources.size(); ++i) {
    const PullSource& s = sources[i];
    if (s.mirror) log::Debug("{}: trying mirror {}/{}", what, s.registry, s.repository);
    Status st = op(ClientFor(s), s.repository, s);
    if (st.ok()) {
      if (!by_digest) tag_source_[repo] = s;
      return st;
    }
    if (st.code() == Code::kCancelled || (final_failure && *final_failure) || i + 1 == sources.size()) {
      if (!mirror_errors.empty()) return std::move(st).Annotate("mirrors failed too: " + mirror_errors + "; and then");
      return st;
    }
    log::Debug("{}: {} failed ({}); trying the next source", what, s.registry, st.message());
    mirror_errors += (mirror_errors.empty() ? "" : "; ") + s.registry + ": " + st.message();
  }
  return Internal("no pull source for " + registry_ + "/" + repo);
}

Result<std::pair<RegistryClient*, std::string>> MirrorRouter::PushTarget(const std::string& repo) {
  ASSIGN_OR_RETURN(PullSource t, options_->registries->PushTarget(registry_, repo));
  return std::make_pair(&ClientFor(t), t.repository);
}

Status MirrorRouter::FetchBlob(const std::string& repo, const oci::Descriptor& desc,
                               const std::function<Status(std::string_view)>& sink, uint64_t offset,
                               oci::Hasher* resumed) {
  oci::Hasher own(desc.digest.algorithm());
  oci::Hasher& hasher = resumed ? *resumed : own;
  uint64_t delivered = offset;
  bool sink_failed = false;
  auto counting = [&](std::string_view chunk) -> Status {
    Status st = sink(chunk);
    if (!st.ok()) {
      sink_failed = true;
      return st;
    }
    delivered += chunk.size();
    return st;
  };
  // A verdict on the bytes (digest or size mismatch) or a refusal by the
  // sink is final: the bytes already went to the sink.
  bool final_failure = false;
  return Pull(
      repo, true, "blob " + desc.digest.Short() + " of " + repo,
      [&](RegistryClient& c, const std::string& r, const PullSource&) -> Status {
        Status st = c.FetchBlob(r, desc, counting, delivered, &hasher);
        if (!st.ok() && (sink_failed || st.code() == Code::kDataLoss)) final_failure = true;
        return st;
      },
      &final_failure);
}

int MirrorRouter::token_requests() const {
  int n = 0;
  for (const auto& [k, c] : clients_) n += c->token_requests();
  return n;
}

}  // namespace regdisk::registry
