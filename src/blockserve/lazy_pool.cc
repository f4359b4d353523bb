#include "blockserve/lazy_pool.h"

#include <vector>

namespace regdisk::blockserve {

Result<std::shared_ptr<LazyPull>> LazyPool::Acquire(const std::string& key, const StartFn& start) {
  // Starting takes a moment (no network: the pull runs on its own thread),
  // so it happens under the lock, and a second caller for the key waits
  // for the first and shares its pull.
  std::lock_guard lock(mu_);
  auto it = pulls_.find(key);
  if (it != pulls_.end()) {
    std::shared_ptr<LazyPull>& p = it->second;
    // An ended pull is reused when it committed (Ready() gives its export or
    // the stored disk); one that failed is replaced by a fresh attempt.
    if (!p->Ended() || p->Wait().ok()) return p;
    // A failed pull that VMs still hold keeps the layer's lock: a new one
    // would wait for them all to stop. Its error stands until they have.
    if (p.use_count() > 1) return p->Wait().status();
    pulls_.erase(it);
  }
  ASSIGN_OR_RETURN(std::unique_ptr<LazyPull> started, start());
  std::shared_ptr<LazyPull> p = std::move(started);
  pulls_[key] = p;
  return p;
}

size_t LazyPool::Sweep() {
  std::vector<std::shared_ptr<LazyPull>> ended;
  {
    std::lock_guard lock(mu_);
    for (auto it = pulls_.begin(); it != pulls_.end();) {
      // Ended (committed or failed), or reading another process's export,
      // and held by no VM; an owner whose export another process still
      // reads stays (it keeps that export up), without blocking the loop.
      LazyPull& p = *it->second;
      if (it->second.use_count() == 1 && (p.Ended() || p.joined()) && p.TryRetire()) {
        ended.push_back(std::move(it->second));
        it = pulls_.erase(it);
      } else {
        ++it;
      }
    }
  }
  const size_t left = [&] {
    std::lock_guard lock(mu_);
    return pulls_.size();
  }();
  ended.clear();  // stops their exports, outside the lock
  return left;
}

LazyPool::Stats LazyPool::stats() {
  std::vector<std::shared_ptr<LazyPull>> pulls;
  {
    std::lock_guard lock(mu_);
    for (const auto& [key, p] : pulls_) pulls.push_back(p);
  }
  Stats s;
  for (const auto& p : pulls) {
    const LazyPull::Progress g = p->progress();
    if (g.joined) continue;  // another process's export and fill
    s.exports += g.serving;
    s.fetched_bytes += g.fetched_bytes;
    if (!g.ended) {
      ++s.filling;
      s.present += g.present;
      s.missing += g.chunks - g.present;
    }
  }
  return s;
}

void LazyPool::KeepExports() {
  std::lock_guard lock(mu_);
  for (auto& [key, p] : pulls_) {
    if (p.use_count() > 1 || !p->TryRetire()) p->KeepExport();
  }
}

LazyPool::~LazyPool() {
  std::map<std::string, std::shared_ptr<LazyPull>> pulls;
  {
    std::lock_guard lock(mu_);
    pulls.swap(pulls_);
  }
  // An export another process still reads is left to it (its reader takes
  // the fill over) rather than waited on.
  for (auto& [key, p] : pulls) {
    if (!p->TryRetire()) p->KeepExport();
  }
}

}  // namespace regdisk::blockserve
