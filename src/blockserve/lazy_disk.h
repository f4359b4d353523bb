// A chunked disk (docs/chunked-format.md) that fills on demand: the local
// file is sparse and full-size from the start, and a chunk is fetched from
// the registry, decompressed and verified against the chunk index the first
// time someone needs it. Guest reads come first; a background fill fetches
// the rest in the order a previous boot read it (its boot profile), then in
// disk order, and only while no guest read waits.
//
// The fill, and how long it can hold up a guest read. The fill keeps up to
// fill_connections ranged reads in flight, each of up to fill_batch_bytes
// of frames (3 and 8 MiB: what a plain chunked pull uses, so that a fill
// costs the registry as few requests as a pull does), after a first
// fill_ramp (1 s) with one request at a time, while a VM that boots from
// the disk starts. Its threads run at the lowest CPU priority (fill_nice
// 19), so a guest read's own fetch and the VM beside it go first on a busy
// machine; a guest read that waits for a chunk the fill is fetching waits
// on such a thread (for one frame, see below).
// A guest read never waits for a whole fill request:
//  - no fill request starts while a guest read is in progress;
//  - a fill request hands on each chunk the moment its frame has arrived,
//    verified and written: a guest read that needs a chunk the fill is
//    fetching waits only until that chunk's frame is in (at most one
//    request's worth of bytes, fill_batch_bytes, from one connection);
//  - a guest read that needs a chunk nobody is fetching fetches it itself,
//    on its own connection, at once.
// Every claim (inflight_) is held by exactly one thread and released by it;
// a bit is set only once the chunk's bytes are verified and written; every
// request has its own deadline; Stop() ends every request and joins every
// thread.
//
//   ASSIGN_OR_RETURN(auto disk, LazyDisk::Open(reader_factory, layer, std::move(head), index_digest, dir, opts));
//   disk->StartFill();
//   RETURN_IF_ERROR(disk->Ensure(offset, length));  // then pread(disk->file(), ...) is verified data
//   ...
//   RETURN_IF_ERROR(disk->WaitComplete(&cancel));   // every chunk present; the file is the disk
//
// What is in DIR:
//   disk.raw     the disk, sparse; bytes of a chunk are meaningful only
//                once its bit is set
//   chunks.map   the persisted bitmap (store/chunk_bitmap.h); a LazyDisk
//                opened again on the same DIR resumes from it
//   profile      chunk numbers in the order guests first asked for them
//                (unless options.profile puts it elsewhere)
//
// Contract with readers in other processes (the nbdkit plugin): a set bit
// in chunks.map means the chunk's bytes in disk.raw are verified and will
// not change. Bytes of a chunk whose bit is clear are never to be served.
//
// One LazyDisk per DIR at a time (the caller holds a lock). Thread-safe.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "image/transport.h"
#include "oci/chunk_index.h"
#include "oci/digest.h"
#include "store/chunk_bitmap.h"
#include "store/chunk_fetch.h"
#include "store/local_chunks.h"
#include "util/cancel.h"
#include "util/fs.h"
#include "util/status.h"

namespace regdisk::blockserve {

// What a LazyDisk tells its owner, as it happens (from its threads).
struct LazyEvent {
  enum class Kind {
    kChunkRejected,  // a fetched chunk failed verification and was not kept
    kFetchFailed,    // a ranged read failed (will be retried)
    kFillProgress,   // background fill: `present` of `chunks` now
    kComplete,       // every chunk is present and verified
  };
  Kind kind;
  uint64_t present = 0, chunks = 0;
  std::string message;  // one line, for kChunkRejected and kFetchFailed
};

struct LazyDiskOptions {
  std::string label;  // "sha256:ab12… (layer 1)", in errors and logs
  // Guest reads: chunks after the last one asked for that are fetched in
  // the same request when missing, and the most one request may span.
  uint64_t readahead_bytes = 1 << 20;
  uint64_t max_batch_bytes = 4 << 20;
  // Frames of chunks nobody asked for that may be fetched to join two
  // wanted ranges into one request.
  uint64_t max_gap_bytes = 256 << 10;
  // How long Ensure keeps retrying a registry that fails before it gives
  // up. It bounds each request too: a registry that accepts a ranged read
  // and then stalls is abandoned at the deadline (the fill's requests get
  // the same time each).
  std::chrono::milliseconds read_deadline{60000};
  // Background fill: the most bytes of frames one request asks for, how
  // many requests are in flight at once (at least one; only one during the
  // first fill_ramp), the CPU priority (nice value, 0 to 19) of the fill's
  // threads, and the pause after a failed request. A guest read that needs
  // a chunk a fill request is fetching waits until that chunk's frame has
  // arrived, not for the whole request.
  uint64_t fill_batch_bytes = 8 << 20;
  int fill_connections = 3;
  std::chrono::milliseconds fill_ramp{1000};
  int fill_nice = 19;
  std::chrono::milliseconds fill_retry{1000};
  std::function<void(const LazyEvent&)> on_event;
  // Where the boot profile is read from and written to; DIR/profile when
  // empty. The store keeps one per image, outside DIR, so that it outlives
  // the fill.
  std::filesystem::path profile;
  // The node store whose disks may already hold some of the chunks (an
  // earlier version of the image): those are copied from there and
  // verified instead of fetched (store/local_chunks.h). Empty: none.
  std::filesystem::path store_root;
};

using RangeReaderFactory = std::function<Result<std::unique_ptr<image::BlobRangeReader>>()>;

class LazyDisk {
 public:
  // Opens (or resumes) the disk in DIR for the chunked layer whose verified
  // head (index and tar header) is given. `index_digest` names the index
  // (the layer's annotation) and keys the bitmap.
  static Result<std::unique_ptr<LazyDisk>> Open(RangeReaderFactory readers, const oci::Descriptor& layer,
                                                store::ChunkedLayerHead head, const oci::Digest& index_digest,
                                                const std::filesystem::path& dir, LazyDiskOptions options);
  ~LazyDisk();  // stops the fill and waits for it; records the profile
  LazyDisk(const LazyDisk&) = delete;
  LazyDisk& operator=(const LazyDisk&) = delete;

  // Makes every chunk that [offset, offset + length) touches present and
  // verified. InvalidArgument when a chunk fetched for it failed verification
  // (the chunk stays absent and is fetched again next time), OutOfRange
  // outside the disk, DeadlineExceeded when the registry could not serve
  // it within read_deadline.
  Status Ensure(uint64_t offset, uint64_t length);
  // Ensure, then read the verified bytes into out.
  Status Read(uint64_t offset, uint64_t length, char* out);

  // Starts the background fill (once); it stops when complete or on Stop.
  void StartFill();
  void Stop();
  // Waits until every chunk is present (OK), the fill stopped, or cancel.
  Status WaitComplete(const CancelToken* cancel);

  const oci::ChunkIndex& index() const { return head_.index; }
  const std::string& image_path() const { return head_.image_path; }
  uint64_t size() const { return head_.index.disk_size; }
  uint64_t present() const { return bitmap_.Count(); }
  bool complete() const { return bitmap_.Complete(); }
  bool has_chunk(uint64_t k) const { return bitmap_.Test(k); }
  const std::filesystem::path& dir() const { return dir_; }
  std::filesystem::path file() const { return dir_ / "disk.raw"; }
  std::filesystem::path bitmap_path() const { return dir_ / "chunks.map"; }
  std::filesystem::path profile_path() const { return options_.profile.empty() ? dir_ / "profile" : options_.profile; }
  // Requests made to the registry so far, and their bytes (for tests and
  // the benchmarks).
  uint64_t requests() const { return requests_.load(); }
  uint64_t fetched_bytes() const { return fetched_bytes_.load(); }
  // Chunks copied from disks in the store (options.store_root), verified.
  uint64_t reused_chunks() const { return reused_chunks_.load(); }

 private:
  LazyDisk(RangeReaderFactory readers, const oci::Descriptor& layer, store::ChunkedLayerHead head,
           store::ChunkBitmap bitmap, UniqueFd fd, std::filesystem::path dir, LazyDiskOptions options);

  // Fetches `wanted` (claimed by the caller: in inflight_) in requests of
  // at most max_batch_bytes, verifies and writes each chunk, sets its bit
  // and releases its claim as soon as that is done. Retries registry
  // failures until `deadline`; a chunk that fails verification fails the
  // call at once. Each request is abandoned at `request_deadline` (or on
  // Stop).
  Status Fetch(const std::vector<size_t>& wanted, std::chrono::steady_clock::time_point deadline,
               std::chrono::steady_clock::time_point request_deadline, uint64_t max_batch_bytes);
  // One request. Chunks in *held are released (and erased from it) as they
  // are done. *reader_ok is false when the connection may be left mid-response.
  Status FetchBatch(image::BlobRangeReader& r, const store::ChunkBatch& batch, const CancelToken& cancel,
                    std::set<size_t>* held, bool* reader_ok);
  // Chunk k's bytes in the local file match the index.
  bool VerifyLocal(size_t k);
  // At open: the chunks whose frames lie wholly inside `guess` (the
  // blob's first bytes, ChunkedLayerHead::guess) are decoded, verified and
  // written from it.
  void SeedFromHead(std::string_view guess);
  // A per-request token, cancelled at `at` by the watch thread (or by
  // Stop) for as long as this object lives: the watch thread never touches
  // the token after it is gone.
  class ArmedToken {
   public:
    ArmedToken(LazyDisk* disk, std::chrono::steady_clock::time_point at);
    ~ArmedToken();
    ArmedToken(const ArmedToken&) = delete;
    ArmedToken& operator=(const ArmedToken&) = delete;
    CancelToken& token() { return token_; }

   private:
    LazyDisk* disk_;
    std::chrono::steady_clock::time_point at_;
    CancelToken token_;
  };
  void WatchLoop();
  Result<std::unique_ptr<image::BlobRangeReader>> TakeReader();
  void GiveReader(std::unique_ptr<image::BlobRangeReader> r);
  void Release(const std::vector<size_t>& claimed);
  void FillLoop();
  void FillWorker();
  void FinishFill();  // records how the fill ended; wakes WaitComplete
  std::vector<size_t> NextFillBatch();
  void Record(size_t first, size_t last);
  void SaveProfile();
  void Emit(LazyEvent e) const;

  RangeReaderFactory open_reader_;
  const oci::Descriptor layer_;
  const store::ChunkedLayerHead head_;
  store::ChunkBitmap bitmap_;
  UniqueFd fd_;
  const std::filesystem::path dir_;
  const LazyDiskOptions options_;

  std::mutex mu_;
  std::condition_variable cv_;          // inflight_ shrank, a guest read ended, or stop
  std::set<size_t> inflight_;           // chunks some thread is fetching
  std::vector<std::unique_ptr<image::BlobRangeReader>> idle_readers_;
  std::vector<size_t> profile_;         // first-touch order of guest reads
  std::vector<size_t> previous_profile_;  // as read at open
  // Chunks whose bit was set under an earlier boot of the machine: cleared,
  // and checked against the index (not fetched) when first needed. Each
  // entry is touched only by the thread that claimed the chunk.
  std::vector<char> suspect_;
  std::vector<bool> profiled_;
  std::vector<size_t> fill_order_;      // the previous boot's profile, then the rest
  size_t fill_pos_ = 0;
  int guest_reads_ = 0;                 // Ensure calls in progress
  bool stop_ = false, fill_done_ = false;
  Status fill_status_;
  std::thread fill_;
  std::multimap<std::chrono::steady_clock::time_point, CancelToken*> armed_;  // guarded by mu_
  std::condition_variable watch_cv_;  // armed_ changed, or stop
  std::thread watch_;

  // The chunks disks in the store hold, found at open; nullptr without a
  // store_root. Copying chunk k is done by the thread that claimed it.
  std::unique_ptr<store::LocalChunks> local_;

  std::atomic<uint64_t> requests_{0}, fetched_bytes_{0}, reused_chunks_{0};
};

}  // namespace regdisk::blockserve
