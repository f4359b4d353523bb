#include "blockserve/lazy_disk.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>

#include <fmt/core.h>

#include "store/chunked_pull.h"
#include "util/env.h"
#include "util/log.h"

namespace regdisk::blockserve {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

constexpr size_t kMaxProfileEntries = 1 << 20;

// A verification failure is the chunk's fault and is not retried within a
// read; anything else (the network, the registry) may pass.
bool Retryable(const Status& st) {
  return st.code() != Code::kInvalidArgument && st.code() != Code::kCancelled &&
         st.code() != Code::kOutOfRange && st.code() != Code::kNoSpace;
}

std::vector<size_t> ReadProfile(const fs::path& path, size_t chunks) {
  std::vector<size_t> out;
  Result<std::string> text = ReadFileCapped(path, 16 * kMaxProfileEntries);
  if (!text.ok()) return out;
  size_t pos = 0;
  while (pos < text->size() && out.size() < kMaxProfileEntries) {
    size_t end = text->find('\n', pos);
    if (end == std::string::npos) end = text->size();
    const std::string line = text->substr(pos, end - pos);
    pos = end + 1;
    char* stop = nullptr;
    const unsigned long long k = std::strtoull(line.c_str(), &stop, 10);
    if (line.empty() || *stop != '\0' || k >= chunks) continue;  // not ours: ignored
    out.push_back(static_cast<size_t>(k));
  }
  return out;
}

}  // namespace

Result<std::unique_ptr<LazyDisk>> LazyDisk::Open(RangeReaderFactory readers, const oci::Descriptor& layer,
                                                 store::ChunkedLayerHead head, const oci::Digest& index_digest,
                                                 const fs::path& dir, LazyDiskOptions options) {
  RETURN_IF_ERROR(MakeDirs(dir));
  // The owner's only: its sockets (control.sock, and nbd.sock, which
  // nbdkit creates) are never reachable by others, even for a moment.
  if (::chmod(dir.c_str(), 0700) != 0) return ErrnoStatus("chmod " + dir.string());
  const oci::ChunkIndex& idx = head.index;
  ASSIGN_OR_RETURN(store::ChunkBitmap bitmap,
                   store::ChunkBitmap::Open(dir / "chunks.map", idx.chunks.size(), idx.chunk_shift, index_digest));
  const fs::path file = dir / "disk.raw";
  // The bitmap and the file go together: an nbdkit serving them (adopted
  // by a later owner) holds the file open and maps the bitmap, and must see
  // bits that speak of the file it reads. Bits prove nothing about a file
  // that is gone or of another size: then both are started afresh, each a
  // new file renamed into place, and such an nbdkit keeps its old pair.
  std::error_code ec;
  const bool file_ok = fs::exists(file, ec) && fs::file_size(file, ec) == idx.disk_size;
  if (!bitmap.created() && !file_ok) {
    if (::unlink((dir / "chunks.map").c_str()) != 0) return ErrnoStatus("removing " + (dir / "chunks.map").string());
    ASSIGN_OR_RETURN(bitmap, store::ChunkBitmap::Open(dir / "chunks.map", idx.chunks.size(), idx.chunk_shift,
                                                      index_digest));
  }
  // A new bitmap proves nothing about the old file: a new file too. A kept
  // one keeps its file, even with no bit set.
  const bool fresh = bitmap.created();
  UniqueFd fd;
  if (fresh) {
    // A new file, renamed into place: an nbdkit still serving the old one
    // (under the old bitmap, which it maps) keeps reading it unchanged.
    const fs::path next = dir / "disk.raw.new";
    ASSIGN_OR_RETURN(fd, OpenFile(next, O_RDWR | O_CREAT | O_TRUNC, 0644));
    if (::rename(next.c_str(), file.c_str()) != 0) return ErrnoStatus("renaming " + next.string());
  } else {
    ASSIGN_OR_RETURN(fd, OpenFile(file, O_RDWR | O_CREAT, 0644));
  }
  RETURN_IF_ERROR(Env::Default()->Truncate(fd.get(), idx.disk_size).Annotate(file.string()));
  const std::string guess = std::move(head.guess);
  head.guess.clear();
  auto disk = std::unique_ptr<LazyDisk>(new LazyDisk(std::move(readers), layer, std::move(head), std::move(bitmap),
                                                     std::move(fd), dir, std::move(options)));
  if (disk->bitmap_.from_previous_boot()) {
    // The bits may have reached the disk before the bytes did. Nothing is
    // hashed now: each such chunk is cleared (so the plugin asks for it) and
    // remembered, and is checked against the index when first needed; only
    // one that fails is fetched.
    for (uint64_t k = 0; k < disk->bitmap_.chunks(); ++k) {
      if (disk->bitmap_.Test(k)) {
        disk->suspect_[k] = 1;
        disk->bitmap_.Clear(k);
      }
    }
    RETURN_IF_ERROR(disk->bitmap_.Revalidate([](uint64_t) { return true; }));
  }
  disk->SeedFromHead(guess);
  if (!disk->options_.store_root.empty()) {
    // One query now; the copies are made when the chunks are first needed.
    const store::ChunkBitmap& bits = disk->bitmap_;
    disk->local_ = std::make_unique<store::LocalChunks>(store::LocalChunks::Find(
        disk->options_.store_root, disk->head_.index, [&bits](size_t k) { return !bits.Test(k); },
        disk->options_.label));
    if (const size_t n = disk->local_->chunks().size(); n > 0) {
      log::Info("{}: {} of the missing chunks are in disks the store holds; they are copied, not fetched",
                disk->options_.label, n);
    }
  }
  return disk;
}

LazyDisk::LazyDisk(RangeReaderFactory readers, const oci::Descriptor& layer, store::ChunkedLayerHead head,
                   store::ChunkBitmap bitmap, UniqueFd fd, fs::path dir, LazyDiskOptions options)
    : open_reader_(std::move(readers)),
      layer_(layer),
      head_(std::move(head)),
      bitmap_(std::move(bitmap)),
      fd_(std::move(fd)),
      dir_(std::move(dir)),
      options_(std::move(options)) {
  const size_t n = head_.index.chunks.size();
  profiled_.assign(n, false);
  suspect_.assign(n, 0);
  previous_profile_ = ReadProfile(profile_path(), n);
  fill_order_ = previous_profile_;
  fill_order_.reserve(fill_order_.size() + n);
  for (size_t k = 0; k < n; ++k) fill_order_.push_back(k);
  watch_ = std::thread([this] { WatchLoop(); });
}

LazyDisk::~LazyDisk() {
  Stop();
  if (watch_.joinable()) watch_.join();
  SaveProfile();
}

LazyDisk::ArmedToken::ArmedToken(LazyDisk* disk, Clock::time_point at) : disk_(disk), at_(at) {
  std::lock_guard lock(disk_->mu_);
  if (disk_->stop_) token_.Cancel("the lazy disk " + disk_->options_.label + " is shutting down");
  disk_->armed_.emplace(at_, &token_);
  disk_->watch_cv_.notify_all();
}

LazyDisk::ArmedToken::~ArmedToken() {
  std::lock_guard lock(disk_->mu_);
  // The watch thread erases what it cancelled: erase only what is there.
  for (auto [it, end] = disk_->armed_.equal_range(at_); it != end; ++it) {
    if (it->second == &token_) {
      disk_->armed_.erase(it);
      return;
    }
  }
}

void LazyDisk::WatchLoop() {
  std::unique_lock lock(mu_);
  while (!stop_) {
    if (armed_.empty()) {
      watch_cv_.wait(lock);
      continue;
    }
    const auto first = armed_.begin();
    if (Clock::now() >= first->first) {
      first->second->Cancel("the registry did not deliver the range in time");
      armed_.erase(first);
      continue;
    }
    const Clock::time_point at = first->first;  // the entry may go while we wait
    watch_cv_.wait_until(lock, at);
  }
}

void LazyDisk::Emit(LazyEvent e) const {
  if (e.kind == LazyEvent::Kind::kChunkRejected || e.kind == LazyEvent::Kind::kFetchFailed) {
    log::Warn("{}", e.message);
  }
  if (options_.on_event) options_.on_event(e);
}

Status LazyDisk::Ensure(uint64_t offset, uint64_t length) {
  const oci::ChunkIndex& idx = head_.index;
  if (length == 0) return OkStatus();
  if (offset >= idx.disk_size || length > idx.disk_size - offset) {
    return OutOfRange(fmt::format("read of {} bytes at {} is outside the {}-byte disk of {}", length, offset,
                                  idx.disk_size, options_.label));
  }
  const size_t first = offset >> idx.chunk_shift, last = (offset + length - 1) >> idx.chunk_shift;
  const auto deadline = Clock::now() + options_.read_deadline;
  {
    std::lock_guard lock(mu_);
    ++guest_reads_;
    for (size_t k = first; k <= last && profile_.size() < kMaxProfileEntries; ++k) {
      if (!profiled_[k]) {
        profiled_[k] = true;
        profile_.push_back(k);
      }
    }
  }
  struct Done {
    LazyDisk* d;
    ~Done() {
      std::lock_guard lock(d->mu_);
      --d->guest_reads_;
      d->cv_.notify_all();
    }
  } done{this};

  for (;;) {
    std::vector<size_t> claim;
    {
      std::unique_lock lock(mu_);
      if (stop_) return Cancelled("the lazy disk " + options_.label + " is shutting down");
      bool waiting = false;
      for (size_t k = first; k <= last; ++k) {
        if (bitmap_.Test(k)) continue;
        if (inflight_.count(k)) {
          waiting = true;
        } else {
          claim.push_back(k);
        }
      }
      if (!claim.empty()) {
        // Read ahead: the missing chunks right after, which a booting
        // guest is likely to want next.
        uint64_t ahead = 0;
        for (size_t k = last + 1; k < idx.chunks.size() && ahead < options_.readahead_bytes; ++k) {
          ahead += idx.ChunkLength(k);
          if (bitmap_.Test(k) || inflight_.count(k)) break;
          claim.push_back(k);
        }
        inflight_.insert(claim.begin(), claim.end());
      } else if (!waiting) {
        return OkStatus();
      } else {
        // Someone else is fetching what we need: wait for them, then look
        // again (they may have failed).
        const bool woke = cv_.wait_until(lock, deadline, [&] {
          if (stop_) return true;
          for (size_t k = first; k <= last; ++k) {
            if (inflight_.count(k)) return false;
          }
          return true;
        });
        if (!woke) {
          return DeadlineExceeded(fmt::format("chunks {}..{} of {} did not arrive within {} s", first, last,
                                              options_.label, options_.read_deadline.count() / 1000.0));
        }
        continue;
      }
    }
    Status st = Fetch(claim, deadline, deadline, options_.max_batch_bytes);
    if (st.ok()) continue;
    // A failure of a read-ahead chunk is not this read's business.
    bool have_all = true;
    for (size_t k = first; k <= last; ++k) have_all = have_all && bitmap_.Test(k);
    if (have_all) return OkStatus();
    return st;
  }
}

Status LazyDisk::Read(uint64_t offset, uint64_t length, char* out) {
  RETURN_IF_ERROR(Ensure(offset, length));
  uint64_t done = 0;
  while (done < length) {
    const ssize_t n = ::pread(fd_.get(), out + done, length - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return ErrnoStatus("reading " + file().string(), n == 0 ? EIO : errno);
    done += static_cast<uint64_t>(n);
  }
  return OkStatus();
}

Result<std::unique_ptr<image::BlobRangeReader>> LazyDisk::TakeReader() {
  {
    std::lock_guard lock(mu_);
    if (!idle_readers_.empty()) {
      auto r = std::move(idle_readers_.back());
      idle_readers_.pop_back();
      return r;
    }
  }
  return open_reader_();
}

void LazyDisk::GiveReader(std::unique_ptr<image::BlobRangeReader> r) {
  std::lock_guard lock(mu_);
  idle_readers_.push_back(std::move(r));
}

void LazyDisk::Release(const std::vector<size_t>& claimed) {
  std::lock_guard lock(mu_);
  for (size_t k : claimed) inflight_.erase(k);
  cv_.notify_all();
}

Status LazyDisk::Fetch(const std::vector<size_t>& wanted, Clock::time_point deadline,
                       Clock::time_point request_deadline, uint64_t max_batch_bytes) {
  // The claims this call still holds. Each chunk is released as soon as it
  // is present, the rest of a batch when the batch is done, and only what
  // is left goes at the end: a chunk released early may have been claimed
  // by another reader since, and that claim is not this call's to drop.
  struct ReleaseOnExit {
    LazyDisk* d;
    std::set<size_t> held;
    ~ReleaseOnExit() { d->Release(std::vector<size_t>(held.begin(), held.end())); }
  } release{this, std::set<size_t>(wanted.begin(), wanted.end())};
  std::vector<size_t> sorted;
  for (size_t k : wanted) {
    if (!suspect_[k]) {
      sorted.push_back(k);
      continue;
    }
    // Written under an earlier boot: served once its bytes check out.
    suspect_[k] = 0;
    if (VerifyLocal(k)) {
      bitmap_.Set(k);
      release.held.erase(k);  // at once: a reader waiting for it goes on
      Release({k});
    } else {
      sorted.push_back(k);
    }
  }
  if (local_) {
    // Chunks a disk in the store holds: copied from there and verified.
    std::vector<size_t> remote;
    for (size_t k : sorted) {
      // Read and hashed before it is written: a fetch may write this
      // chunk's verified frame around our claim meanwhile, and a copy that
      // turns out wrong must never land over it.
      ASSIGN_OR_RETURN(bool copied, local_->Copy(k, fd_.get(), store::LocalChunks::CopyMode::kVerifyFirst));
      if (!copied) {
        remote.push_back(k);
        continue;
      }
      bitmap_.Set(k);
      ++reused_chunks_;
      release.held.erase(k);
      Release({k});
    }
    sorted = std::move(remote);
  }
  std::sort(sorted.begin(), sorted.end());
  // Two runs of wanted frames are joined across frames nobody asked for up
  // to max_gap_bytes; when the store holds chunks of this disk, the gap may
  // be chunks just copied, so it stays as small as a delta pull's (their
  // frames would be fetched for nothing).
  const uint64_t max_gap_bytes =
      local_ && !local_->empty() ? std::min(options_.max_gap_bytes, store::kDefaultMaxGapBytes) : options_.max_gap_bytes;
  Status result;
  std::unique_ptr<image::BlobRangeReader> reader;
  for (const store::ChunkBatch& batch :
       store::CoalesceChunks(head_.index, sorted, max_batch_bytes, max_gap_bytes)) {
    for (int attempt = 1;; ++attempt) {
      Status st;
      if (!reader) {
        Result<std::unique_ptr<image::BlobRangeReader>> r = TakeReader();
        st = r.status();
        if (r.ok()) reader = std::move(*r);
      }
      if (st.ok() && reader) {
        // The request's own deadline: a registry that accepted it and then
        // stalls does not hold this thread past it.
        bool cut_off = false;
        {
          ArmedToken armed(this, request_deadline);
          bool reader_ok = true;
          st = Clock::now() >= request_deadline
                   ? DeadlineExceeded("no time left")
                   : FetchBatch(*reader, batch, armed.token(), &release.held, &reader_ok);
          if (!reader_ok) reader.reset();  // stopped mid-response: its connection is in an unknown state
          cut_off = armed.token().cancelled();
        }
        if (!st.ok() && cut_off) {
          {
            std::lock_guard lock(mu_);
            if (stop_) return Cancelled("the lazy disk " + options_.label + " is shutting down");
          }
          st = DeadlineExceeded(fmt::format("the registry did not deliver chunks {}..{} of {} within the {} s deadline",
                                            batch.first, batch.first + batch.count - 1, options_.label,
                                            options_.read_deadline.count() / 1000.0));
          Emit({LazyEvent::Kind::kFetchFailed, 0, 0, st.message()});
          if (result.ok()) result = st;
          break;
        }
      }
      if (st.ok()) break;
      if (!Retryable(st)) {
        if (result.ok()) result = st;
        break;
      }
      reader.reset();  // a fresh connection for the next attempt
      const auto now = Clock::now();
      const std::string what = fmt::format("fetching chunks {}..{} of {} (attempt {}): {}", batch.first,
                                           batch.first + batch.count - 1, options_.label, attempt, st.ToString());
      Emit({LazyEvent::Kind::kFetchFailed, 0, 0, what});
      if (now >= deadline) {
        if (result.ok()) result = DeadlineExceeded(what);
        break;
      }
      {
        std::unique_lock lock(mu_);
        const auto pause = std::min<Clock::duration>(std::chrono::milliseconds(500) * attempt, deadline - now);
        cv_.wait_for(lock, pause, [&] { return stop_; });
        if (stop_) return Cancelled("the lazy disk " + options_.label + " is shutting down");
      }
    }
    // This batch's chunks are done with (present, or failed): a guest read
    // waiting for one of them goes on now, not after the rest of `wanted`.
    std::vector<size_t> batch_chunks;
    for (auto it = release.held.lower_bound(batch.first); it != release.held.end() && *it < batch.first + batch.count;) {
      batch_chunks.push_back(*it);
      it = release.held.erase(it);
    }
    Release(batch_chunks);
  }
  if (reader) GiveReader(std::move(reader));
  return result;
}

void LazyDisk::SeedFromHead(std::string_view guess) {
  const oci::ChunkIndex& idx = head_.index;
  store::ChunkDecoder decoder;
  std::string chunk;
  size_t seeded = 0;
  for (size_t k = 0; k < idx.chunks.size(); ++k) {
    const auto& c = idx.chunks[k];
    if (c.zero || c.frame_length == 0 || c.frame_offset + c.frame_length > guess.size()) continue;
    if (bitmap_.Test(k) || suspect_[k]) continue;
    // A frame that does not verify is left to be fetched (and judged) as
    // any other.
    if (!decoder.Decode(idx, k, guess.substr(c.frame_offset, c.frame_length), &chunk, options_.label)
             .ok()) {
      continue;
    }
    if (!PWriteAll(fd_.get(), chunk, uint64_t{k} << idx.chunk_shift).ok()) return;  // fetched later instead
    bitmap_.Set(k);
    ++seeded;
  }
  if (seeded > 0) log::Debug("{}: {} chunks were in the bytes read for the tar header", options_.label, seeded);
}

bool LazyDisk::VerifyLocal(size_t k) {
  const oci::ChunkIndex& idx = head_.index;
  std::string buf(idx.ChunkLength(k), '\0');
  return ::pread(fd_.get(), buf.data(), buf.size(), static_cast<off_t>(uint64_t{k} << idx.chunk_shift)) ==
             static_cast<ssize_t>(buf.size()) &&
         store::VerifyChunk(idx, k, buf, options_.label).ok();
}

Status LazyDisk::FetchBatch(image::BlobRangeReader& r, const store::ChunkBatch& batch, const CancelToken& cancel,
                            std::set<size_t>* held, bool* reader_ok) {
  std::string chunk;
  store::ChunkDecoder decoder;
  const oci::ChunkIndex& idx = head_.index;
  Status rejected;
  // Each chunk as its frame arrives: verified, written, marked, and handed
  // to whoever waits for it, while the rest of the range is on the wire.
  Status st = store::ReadBatchFrames(
      r, layer_, idx, batch,
      [&](size_t k, std::string_view frame) -> Status {
        if (bitmap_.Test(k)) return OkStatus();  // a gap chunk someone already has
        if (Status bad = decoder.Decode(idx, k, frame, &chunk, options_.label); !bad.ok()) {
          // Never written, never marked: the next read fetches it again.
          Emit({LazyEvent::Kind::kChunkRejected, 0, 0, bad.ToString()});
          if (rejected.ok()) rejected = InvalidArgument(bad.message());
          return OkStatus();
        }
        const uint64_t at = uint64_t{k} << idx.chunk_shift;
        if (!idx.chunks[k].zero) {
          RETURN_IF_ERROR(
              PWriteAll(fd_.get(), chunk, at).Annotate(fmt::format("writing chunk {} of {}", k, options_.label)));
        } else if (::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(at),
                               static_cast<off_t>(idx.ChunkLength(k))) != 0) {
          // A hole already, unless an earlier boot left other bytes there
          // (the chunk failed its local check): zeros either way.
          RETURN_IF_ERROR(PWriteAll(fd_.get(), std::string(idx.ChunkLength(k), '\0'), at)
                              .Annotate(fmt::format("zeroing chunk {} of {}", k, options_.label)));
        }
        bitmap_.Set(k);
        if (held->erase(k) != 0) Release({k});
        return OkStatus();
      },
      &cancel);
  *reader_ok = st.ok();
  RETURN_IF_ERROR(st);
  ++requests_;
  fetched_bytes_ += batch.length;
  return rejected;
}

void LazyDisk::StartFill() {
  std::lock_guard lock(mu_);
  if (fill_.joinable() || stop_) return;
  fill_ = std::thread([this] { FillLoop(); });
}

void LazyDisk::Stop() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
    // Requests in flight stop now, not at their deadline.
    for (auto& [at, token] : armed_) token->Cancel("the lazy disk " + options_.label + " is shutting down");
    cv_.notify_all();
    watch_cv_.notify_all();
  }
  if (fill_.joinable()) fill_.join();
}

std::vector<size_t> LazyDisk::NextFillBatch() {
  std::vector<size_t> out;
  uint64_t bytes = 0;
  // Frames up to fill_batch_bytes in all (one frame at least), counted as
  // the request will be: a batch of adjacent chunks is one request.
  for (size_t i = fill_pos_; i < fill_order_.size(); ++i) {
    const size_t k = fill_order_[i];
    if (bitmap_.Test(k)) {
      if (i == fill_pos_) ++fill_pos_;
      continue;
    }
    if (inflight_.count(k) || std::find(out.begin(), out.end(), k) != out.end()) continue;
    const uint64_t frame = head_.index.chunks[k].frame_length;
    if (!out.empty() && bytes + frame > options_.fill_batch_bytes) break;
    out.push_back(k);
    bytes += frame;
  }
  inflight_.insert(out.begin(), out.end());
  return out;
}

void LazyDisk::FillLoop() {
  // Several requests in flight: the registry serves one while this process
  // verifies and writes another. Each worker takes the next batch in fill
  // order, so the requests start in that order.
  std::vector<std::thread> more;
  for (int i = 1; i < options_.fill_connections; ++i) {
    more.emplace_back([this] {
      {
        // The first moments belong to what starts beside the fill (a VM
        // booting from this disk): one request at a time until then.
        std::unique_lock lock(mu_);
        cv_.wait_for(lock, options_.fill_ramp, [&] { return stop_ || bitmap_.Complete(); });
      }
      FillWorker();
    });
  }
  FillWorker();
  for (std::thread& t : more) t.join();
  FinishFill();
}

void LazyDisk::FillWorker() {
  // Below the process's other threads (guest reads, the export's workers)
  // and the VM: on a busy machine the fill takes what is left. Raising
  // one's own nice value needs no privilege; failing to is harmless.
  const int nice_now = ::getpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()));
  if (options_.fill_nice > nice_now) ::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), options_.fill_nice);
  const uint64_t n = head_.index.chunks.size();
  for (;;) {
    std::vector<size_t> batch;
    {
      std::unique_lock lock(mu_);
      // Guest reads first: the fill waits while any is in progress.
      cv_.wait(lock, [&] { return stop_ || guest_reads_ == 0; });
      if (stop_) break;
      batch = NextFillBatch();
      if (batch.empty()) {
        if (bitmap_.Complete()) break;
        // What is left is being fetched by guest reads: wait for them.
        cv_.wait_for(lock, std::chrono::milliseconds(100));
        continue;
      }
    }
    // One attempt per batch (a failed one is retried after fill_retry),
    // each bounded like a guest read's.
    if (Status st = Fetch(batch, Clock::now(), Clock::now() + options_.read_deadline, options_.fill_batch_bytes);
        !st.ok()) {
      if (st.code() == Code::kCancelled) break;
      std::unique_lock lock(mu_);
      cv_.wait_for(lock, options_.fill_retry, [&] { return stop_; });
      continue;
    }
    Emit({LazyEvent::Kind::kFillProgress, bitmap_.Count(), n, {}});
  }
}

void LazyDisk::FinishFill() {
  const uint64_t n = head_.index.chunks.size();
  bool complete = false;
  {
    std::lock_guard lock(mu_);
    fill_done_ = true;
    complete = bitmap_.Complete();
    if (complete) {
      if (Status st = bitmap_.Sync(); !st.ok()) fill_status_ = st;
    } else {
      fill_status_ = Cancelled("the background fill of " + options_.label + " stopped at " +
                               std::to_string(bitmap_.Count()) + " of " + std::to_string(n) + " chunks");
    }
    cv_.notify_all();
  }
  if (complete) {
    // Every chunk is here: the store disks chunks were copied from are not
    // needed any more, and one removed meanwhile frees its space.
    if (local_) local_->CloseFiles();
    Emit({LazyEvent::Kind::kComplete, n, n, {}});
  }
}

Status LazyDisk::WaitComplete(const CancelToken* cancel) {
  std::unique_lock lock(mu_);
  for (;;) {
    if (bitmap_.Complete() && (fill_done_ || !fill_.joinable())) return fill_status_;
    if (fill_done_) return fill_status_.ok() ? Cancelled("the background fill stopped") : fill_status_;
    if (cancel && cancel->cancelled()) return cancel->status();
    cv_.wait_for(lock, std::chrono::milliseconds(100));
  }
}

void LazyDisk::SaveProfile() {
  std::vector<size_t> profile;
  {
    std::lock_guard lock(mu_);
    profile = profile_;
  }
  if (profile.empty()) return;
  // Merged with the previous boot's: a resumed boot asks only for what was
  // missing, so its own order alone would lose the rest. The previous
  // order first, then what is new, each chunk once, bounded.
  std::vector<char> listed(head_.index.chunks.size(), 0);
  std::string text;
  size_t entries = 0;
  for (const std::vector<size_t>* list : {&previous_profile_, &profile}) {
    for (size_t k : *list) {
      if (listed[k] || entries >= kMaxProfileEntries) continue;
      listed[k] = 1;
      ++entries;
      text += std::to_string(k) + "\n";
    }
  }
  if (Status st = WriteFileAtomic(profile_path(), text, 0644); !st.ok()) {
    log::Warn("cannot record the boot profile of {}: {}", options_.label, st.ToString());
  }
}

}  // namespace regdisk::blockserve
