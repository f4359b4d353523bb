// Lazy boot's block layer (src/blockserve): a chunked disk served while it
// fills. LazyDisk alone (reads fetch exactly the chunks they touch, verified;
// a corrupted frame is never served and heals on the next read; the fill
// completes the disk; a reopened disk resumes from its bitmap), and the
// export: nbdkit with regdisk's plugin, read by QEMU's own tools over NBD.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <condition_variable>
#include <future>
#include <mutex>
#include <regex>
#include <csignal>
#include <thread>

#include <nlohmann/json.hpp>

#include "blockserve/control_protocol.h"
#include "blockserve/export.h"
#include "blockserve/lazy_disk.h"
#include "harness/harness.h"
#include "image/layout.h"
#include "image/transport.h"
#include "store/chunk_fetch.h"
#include "util/fs.h"

namespace regdisk::testing {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;
using json = nlohmann::json;
using blockserve::LazyDisk;
using blockserve::LazyDiskOptions;

constexpr uint64_t kKiB = 1024, kMiB = 1024 * 1024;

class LazyTest : public TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    // 4 MiB in 64 KiB chunks: random data, with a zero stretch in the middle.
    raw_ = RandomBytes(4 * kMiB, 7);
    std::fill(raw_.begin() + 1 * kMiB, raw_.begin() + 2 * kMiB, '\0');
    ASSERT_OK(WriteFileAtomic(tmp() / "d.raw", raw_));
    RunResult r = RunRegdisk({"build", P("d.raw"), "-t", "oci:" + P("img") + ":v1", "--layout", "chunked",
                              "--chunk-size", "64K", "-q"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto layout = image::OciLayout::Open(P("img")).value();
    const json manifest = json::parse(layout.ReadBlob(layout.Resolve("v1").value(), 1 << 20).value());
    layer_ = oci::Descriptor::FromJson(manifest["layers"][0]).value();
    loc_ = oci::ChunkIndexLocationOf(layer_).value().value();
  }

  std::unique_ptr<image::ImageSource> Source() {
    return image::OpenSource(image::ImageName::Parse("oci:" + P("img") + ":v1").value(), {}).value();
  }

  // A LazyDisk over the layout in DIR (tmp()/lazy by default).
  std::unique_ptr<LazyDisk> Open(LazyDiskOptions o = {}, const std::string& dir = "lazy") {
    src_ = Source();
    auto reader = src_->OpenRangeReader().value();
    store::ChunkedLayerHead head = store::OpenChunkedLayer(*reader, layer_, loc_, 1ull << 40, "test").value();
    o.label = "test layer";
    auto d = LazyDisk::Open([this] { return src_->OpenRangeReader(); }, layer_, std::move(head), loc_.digest,
                            tmp() / dir, std::move(o));
    EXPECT_OK(d.status());
    return d.ok() ? std::move(*d) : nullptr;
  }

  fs::path BlobPath() { return tmp() / "img/blobs/sha256" / layer_.digest.hex(); }
  // Flips one byte in the middle of chunk k's frame in the layout's blob.
  void Corrupt(size_t k, const oci::ChunkIndex& idx) {
    UniqueFd fd = OpenFile(BlobPath(), O_RDWR).value();
    const uint64_t at = idx.chunks[k].frame_offset + idx.chunks[k].frame_length / 2;
    char c;
    ASSERT_EQ(::pread(fd.get(), &c, 1, at), 1);
    c ^= 0x5a;
    ASSERT_EQ(::pwrite(fd.get(), &c, 1, at), 1);
  }

  std::string raw_;
  oci::Descriptor layer_;
  oci::ChunkIndexLocation loc_;
  std::unique_ptr<image::ImageSource> src_;
};

TEST_F(LazyTest, AReadFetchesOnlyTheChunksItTouchesPlusReadahead) {
  LazyDiskOptions o;
  o.readahead_bytes = 128 * kKiB;  // two chunks
  auto d = Open(o);
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->index().chunks.size(), 64u);
  EXPECT_EQ(d->present(), 0u);
  std::string buf(10000, '\0');
  // Straddles chunks 2 and 3.
  ASSERT_OK(d->Read(3 * 64 * kKiB - 5000, buf.size(), buf.data()));
  EXPECT_EQ(buf, raw_.substr(3 * 64 * kKiB - 5000, buf.size()));
  EXPECT_EQ(d->present(), 4u) << "chunks 2 and 3, and two read ahead";
  EXPECT_EQ(d->requests(), 1u) << "adjacent frames in one request";
  // Present chunks are served without a fetch.
  ASSERT_OK(d->Read(4 * 64 * kKiB, 100, buf.data()));
  EXPECT_EQ(d->requests(), 1u);
  // Reads outside the disk are refused.
  EXPECT_EQ(d->Ensure(4 * kMiB - 1, 2).code(), Code::kOutOfRange);
}

TEST_F(LazyTest, TheFillCompletesTheDiskAndAReopenedDiskResumes) {
  {
    auto d = Open();
    ASSERT_NE(d, nullptr);
    std::string buf(4096, '\0');
    ASSERT_OK(d->Read(3 * kMiB, buf.size(), buf.data()));
    d->Stop();  // killed before the fill: what is present stays
  }
  auto d = Open();
  ASSERT_NE(d, nullptr);
  const uint64_t before = d->present();
  EXPECT_GT(before, 0u) << "the bitmap survived";
  d->StartFill();
  ASSERT_OK(d->WaitComplete(nullptr));
  EXPECT_TRUE(d->complete());
  EXPECT_EQ(ReadFileCapped(d->file(), 8 * kMiB).value(), raw_);
  // Zero chunks are holes: the file holds less than the disk's size.
  struct stat st {};
  ASSERT_EQ(::stat(d->file().c_str(), &st), 0);
  EXPECT_LE(static_cast<uint64_t>(st.st_blocks) * 512, 3 * kMiB + 64 * kKiB);
  // The boot profile lists the chunk the read asked for, first.
  d.reset();
  std::string profile = ReadFileCapped(tmp() / "lazy/profile", 1 << 20).value_or("");
  EXPECT_EQ(profile.substr(0, profile.find('\n')), "48") << profile;
}

TEST_F(LazyTest, TheFillFetchesTheProfiledChunksFirst) {
  ASSERT_OK(WriteFileAtomic(tmp() / "profile", "60\n61\nnot a number\n999\n5\n"));
  LazyDiskOptions o;
  o.profile = tmp() / "profile";
  o.fill_batch_bytes = 1;  // one chunk per request, so the order shows
  o.fill_connections = 1;  // and one at a time: completions in the order asked
  std::vector<uint64_t> order;
  std::vector<bool> seen(64, false);
  LazyDisk* disk = nullptr;
  o.on_event = [&](const blockserve::LazyEvent& e) {
    if (e.kind != blockserve::LazyEvent::Kind::kFillProgress) return;
    for (uint64_t k = 0; k < 64; ++k) {
      if (!seen[k] && disk->has_chunk(k)) {
        seen[k] = true;
        order.push_back(k);
      }
    }
  };
  auto d = Open(o);
  ASSERT_NE(d, nullptr);
  disk = d.get();
  d->StartFill();
  ASSERT_OK(d->WaitComplete(nullptr));
  d->Stop();
  ASSERT_GE(order.size(), 4u);
  EXPECT_EQ(std::vector<uint64_t>(order.begin(), order.begin() + 4), (std::vector<uint64_t>{60, 61, 5, 0}))
      << "the profile's chunks (lines that name no chunk of this disk ignored), then disk order";
}

TEST_F(LazyTest, AResumedRunMergesItsReadsIntoTheProfile) {
  ASSERT_OK(WriteFileAtomic(tmp() / "profile", "3\n1\n"));
  LazyDiskOptions o;
  o.profile = tmp() / "profile";
  o.readahead_bytes = 0;
  {
    auto d = Open(o);
    ASSERT_NE(d, nullptr);
    std::string buf(10, '\0');
    ASSERT_OK(d->Read(5 * 64 * kKiB, buf.size(), buf.data()));
    ASSERT_OK(d->Read(1 * 64 * kKiB, buf.size(), buf.data()));
  }
  EXPECT_EQ(ReadFileCapped(tmp() / "profile", 1 << 20).value(), "3\n1\n5\n")
      << "the previous order kept, the new chunk after it, each once";
}

// Readers that report on the requests made through them: how many, how
// many at once, and a gate that holds a request's bytes at one offset of
// the blob until the test opens it. Every wait here is a hang guard.
struct ReadWatch {
  std::mutex mu;
  std::condition_variable cv;
  int reads = 0, in_flight = 0, max_in_flight = 0;
  int hold_until_in_flight = 0;  // a Read waits until this many are in flight
  uint64_t piece = 0;            // hand bytes on in pieces of this size (0: as they come)
  uint64_t gate_at = UINT64_MAX;  // blob offset where a request's bytes stop...
  bool gate_open = true;          // ...until this is set
  bool at_gate = false;
  uint64_t delivered_to = 0;  // blob offset just past the last byte handed on

  template <class Pred>
  bool WaitFor(std::unique_lock<std::mutex>& lock, Pred pred) {
    return cv.wait_for(lock, std::chrono::seconds(30), pred);
  }
};

class WatchedReader : public image::BlobRangeReader {
 public:
  WatchedReader(std::unique_ptr<image::BlobRangeReader> inner, ReadWatch* w) : inner_(std::move(inner)), w_(w) {}
  Status Read(const oci::Descriptor& desc, uint64_t offset, uint64_t length, const registry::BlobSink& sink) override {
    return Watched(desc, offset, length, sink, nullptr);
  }
  Status ReadCancellable(const oci::Descriptor& desc, uint64_t offset, uint64_t length,
                         const registry::BlobSink& sink, const CancelToken& cancel) override {
    return Watched(desc, offset, length, sink, &cancel);
  }

 private:
  Status Watched(const oci::Descriptor& desc, uint64_t offset, uint64_t length, const registry::BlobSink& sink,
                 const CancelToken* cancel) {
    {
      std::unique_lock lock(w_->mu);
      ++w_->reads;
      w_->max_in_flight = std::max(w_->max_in_flight, ++w_->in_flight);
      w_->cv.notify_all();
      w_->WaitFor(lock, [&] { return w_->in_flight >= w_->hold_until_in_flight; });
      w_->hold_until_in_flight = 0;  // once reached (or given up on), never again
      w_->cv.notify_all();
    }
    uint64_t pos = offset;
    auto hand_on = [&](std::string_view bytes) -> Status {
      while (!bytes.empty()) {
        uint64_t n = w_->piece ? std::min<uint64_t>(w_->piece, bytes.size()) : bytes.size();
        {
          std::unique_lock lock(w_->mu);
          if (!w_->gate_open && pos <= w_->gate_at && pos + n > w_->gate_at) {
            if (pos == w_->gate_at) {
              w_->at_gate = true;
              w_->cv.notify_all();
              w_->WaitFor(lock, [&] { return w_->gate_open; });
            } else {
              n = w_->gate_at - pos;
            }
          }
        }
        RETURN_IF_ERROR(sink(bytes.substr(0, n)));
        pos += n;
        bytes.remove_prefix(n);
        std::lock_guard lock(w_->mu);
        w_->delivered_to = pos;
      }
      return OkStatus();
    };
    Status st = cancel ? inner_->ReadCancellable(desc, offset, length, hand_on, *cancel)
                       : inner_->Read(desc, offset, length, hand_on);
    std::lock_guard lock(w_->mu);
    --w_->in_flight;
    w_->cv.notify_all();
    return st;
  }

  std::unique_ptr<image::BlobRangeReader> inner_;
  ReadWatch* w_;
};

// A registry connection that records the ranges asked of it and can lie
// about the bytes it sends back: fewer, more, or one of them changed.
class LyingReader : public image::BlobRangeReader {
 public:
  enum class Lie { kNone, kShort, kLong, kFlip };
  LyingReader(std::unique_ptr<image::BlobRangeReader> inner, Lie lie, ReadWatch* watch = nullptr)
      : lie_(lie), watched_(std::move(inner), watch != nullptr ? watch : &unwatched_) {}
  Status Read(const oci::Descriptor& desc, uint64_t offset, uint64_t length, const registry::BlobSink& sink) override {
    {
      std::lock_guard lock(mu_);
      ranges_.emplace_back(offset, length);
    }
    std::string bytes;
    RETURN_IF_ERROR(store::ReadRange(watched_, desc, offset, length, &bytes));
    switch (lie_) {
      case Lie::kNone: break;
      case Lie::kShort: bytes.resize(bytes.size() / 2); break;
      case Lie::kLong: bytes += "and more"; break;
      case Lie::kFlip: bytes[std::min<size_t>(bytes.size() - 1, 40)] ^= 0x5a; break;
    }
    return sink(bytes);
  }
  std::vector<std::pair<uint64_t, uint64_t>> ranges() {
    std::lock_guard lock(mu_);
    return ranges_;
  }

 private:
  Lie lie_;
  ReadWatch unwatched_;  // when the test watches nothing
  WatchedReader watched_;
  std::mutex mu_;
  std::vector<std::pair<uint64_t, uint64_t>> ranges_;
};

// The index and the start of the blob (where the tar header frame is) are
// asked for at once, on two connections; the head is what one connection
// reading them one after the other gives.
TEST_F(LazyTest, TheIndexAndTheTarHeaderAreFetchedAtOnce) {
  src_ = Source();
  auto plain = src_->OpenRangeReader().value();
  const store::ChunkedLayerHead want = store::OpenChunkedLayer(*plain, layer_, loc_, 1ull << 40, "test").value();
  ReadWatch w;
  w.hold_until_in_flight = 2;  // each read waits (30 s at most) until the other is in flight too
  LyingReader r(src_->OpenRangeReader().value(), LyingReader::Lie::kNone, &w);
  LyingReader h(src_->OpenRangeReader().value(), LyingReader::Lie::kNone, &w);
  const store::ChunkedLayerHead got = store::OpenChunkedLayer(r, layer_, loc_, 1ull << 40, "test", &h).value();
  EXPECT_EQ(w.max_in_flight, 2) << "the tar header was asked for only after the index arrived";
  EXPECT_EQ(got.image_path, want.image_path);
  EXPECT_EQ(got.index.disk_size, want.index.disk_size);
  ASSERT_EQ(got.index.chunks.size(), want.index.chunks.size());
  EXPECT_EQ(got.index.chunks.back().sha256, want.index.chunks.back().sha256);
  using Ranges = std::vector<std::pair<uint64_t, uint64_t>>;
  EXPECT_EQ(r.ranges(), (Ranges{{loc_.offset, loc_.length}}));
  EXPECT_EQ(h.ranges(), (Ranges{{0, store::kHeadGuessBytes}}));
  ASSERT_LT(want.index.HeaderFrameLength(), store::kHeadGuessBytes);

  // A header frame longer than the guess: the rest comes after the index,
  // on the index's connection.
  LyingReader r2(src_->OpenRangeReader().value(), LyingReader::Lie::kNone);
  LyingReader h2(src_->OpenRangeReader().value(), LyingReader::Lie::kNone);
  const store::ChunkedLayerHead got2 =
      store::OpenChunkedLayer(r2, layer_, loc_, 1ull << 40, "test", &h2, /*head_guess_bytes=*/16).value();
  EXPECT_EQ(got2.image_path, want.image_path);
  EXPECT_EQ(r2.ranges(), (Ranges{{loc_.offset, loc_.length}, {16, want.index.HeaderFrameLength() - 16}}));
  EXPECT_EQ(h2.ranges(), (Ranges{{0, 16}}));
}

// The blob's first bytes, read beside the index for the tar header, also
// hold chunk 0's frame when it is small (a boot sector and zeros): the disk
// decodes and verifies it from them, and a read of it fetches nothing.
TEST_F(LazyTest, AChunkWhoseFrameCameWithTheTarHeaderIsNotFetchedAgain) {
  std::string raw = "FIRST-CHUNK: a boot sector, then zeros";
  raw.resize(64 * kKiB, '\0');
  raw += RandomBytes(192 * kKiB, 9);
  ASSERT_OK(WriteFileAtomic(tmp() / "small0.raw", raw));
  RunResult r = RunRegdisk({"build", P("small0.raw"), "-t", "oci:" + P("img0") + ":v1", "--layout", "chunked",
                            "--chunk-size", "64K", "-q"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto layout = image::OciLayout::Open(P("img0")).value();
  const json manifest = json::parse(layout.ReadBlob(layout.Resolve("v1").value(), 1 << 20).value());
  const oci::Descriptor layer = oci::Descriptor::FromJson(manifest["layers"][0]).value();
  const oci::ChunkIndexLocation loc = oci::ChunkIndexLocationOf(layer).value().value();
  auto src = image::OpenSource(image::ImageName::Parse("oci:" + P("img0") + ":v1").value(), {}).value();
  auto index_reader = src->OpenRangeReader().value();
  auto head_reader = src->OpenRangeReader().value();
  store::ChunkedLayerHead head =
      store::OpenChunkedLayer(*index_reader, layer, loc, 1ull << 40, "test", head_reader.get()).value();
  const oci::ChunkEntry c0 = head.index.chunks[0];
  ASSERT_LE(c0.frame_offset + c0.frame_length, head.guess.size()) << "chunk 0's frame is not in the head read";
  LazyDiskOptions o;
  o.label = "test layer";
  o.readahead_bytes = 0;
  auto d = LazyDisk::Open([&] { return src->OpenRangeReader(); }, layer, std::move(head), loc.digest, tmp() / "lazy0",
                          o)
               .value();
  EXPECT_EQ(d->present(), 1u);
  std::string got(512, '\0');
  ASSERT_OK(d->Read(0, 512, got.data()));
  EXPECT_EQ(got, raw.substr(0, 512));
  EXPECT_EQ(d->requests(), 0u) << "chunk 0 was fetched again";
  // Chunk 1 was not in it: fetched.
  ASSERT_OK(d->Read(64 * kKiB, 512, got.data()));
  EXPECT_EQ(got, raw.substr(64 * kKiB, 512));
  EXPECT_EQ(d->requests(), 1u);
}

// A registry that sends a short, long or changed tar header, or a wrong
// index, beside it: refused with an error that names which, and no head.
TEST_F(LazyTest, AHeadFromAHostileRegistryIsRefused) {
  src_ = Source();
  using Lie = LyingReader::Lie;
  struct Case {
    std::string name;
    Lie index, header;
    Code code;
    std::string words;
  };
  const std::vector<Case> cases = {
      {"short header", Lie::kNone, Lie::kShort, Code::kDataLoss, "reading the tar header"},
      {"long header", Lie::kNone, Lie::kLong, Code::kDataLoss, "reading the tar header"},
      {"changed header", Lie::kNone, Lie::kFlip, Code::kInvalidArgument, "tar header"},
      {"short index", Lie::kShort, Lie::kNone, Code::kDataLoss, "reading the chunk index"},
      {"changed index", Lie::kFlip, Lie::kNone, Code::kDataLoss, "the chunk index failed verification"},
      {"changed index and header", Lie::kFlip, Lie::kFlip, Code::kDataLoss, "the chunk index failed verification"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    LyingReader r(src_->OpenRangeReader().value(), c.index);
    LyingReader h(src_->OpenRangeReader().value(), c.header);
    Result<store::ChunkedLayerHead> head = store::OpenChunkedLayer(r, layer_, loc_, 1ull << 40, "test", &h);
    ASSERT_FALSE(head.ok());
    EXPECT_EQ(head.status().code(), c.code) << head.status().ToString();
    EXPECT_THAT(head.status().ToString(), HasSubstr(c.words));
    EXPECT_EQ(head.status().ToString().find('\n'), std::string::npos) << head.status().ToString();
  }
}

// Each chunk's frame is handed on as soon as its last byte is in, in order,
// and is exactly the frame.
TEST_F(LazyTest, ReadBatchFramesHandsOnEachFrameAsItArrives) {
  src_ = Source();
  auto inner = src_->OpenRangeReader().value();
  store::ChunkedLayerHead head = store::OpenChunkedLayer(*inner, layer_, loc_, 1ull << 40, "test").value();
  const oci::ChunkIndex& idx = head.index;
  ReadWatch w;
  w.piece = 1000;
  WatchedReader r(std::move(inner), &w);
  const auto batches = store::CoalesceChunks(idx, store::AllChunks(idx), 1 << 30, 0);
  ASSERT_EQ(batches.size(), 1u);
  const store::ChunkBatch& b = batches[0];
  std::string whole;
  ASSERT_OK(store::ReadRange(r, layer_, b.offset, b.length, &whole));
  std::vector<size_t> seen;
  ASSERT_OK(store::ReadBatchFrames(r, layer_, idx, b, [&](size_t k, std::string_view frame) -> Status {
    seen.push_back(k);
    EXPECT_EQ(frame, store::FrameOf(idx, b, whole, k)) << "chunk " << k;
    const uint64_t frame_end = idx.chunks[k].frame_offset + idx.chunks[k].frame_length;
    std::lock_guard lock(w.mu);
    EXPECT_LT(w.delivered_to, frame_end + w.piece) << "chunk " << k << " was held back after its frame arrived";
    return OkStatus();
  }));
  EXPECT_EQ(seen, store::AllChunks(idx));
  // An error from the sink stops the read and is returned.
  Status st = store::ReadBatchFrames(r, layer_, idx, b, [&](size_t k, std::string_view) -> Status {
    return k == 3 ? Internal("stop here") : OkStatus();
  });
  EXPECT_EQ(st.code(), Code::kInternal) << st.ToString();
}

// The number of requests a fill of everything makes when each takes frames
// up to `max` bytes, in disk order.
size_t FillRequests(const oci::ChunkIndex& idx, uint64_t max) {
  size_t requests = 0;
  uint64_t bytes = 0;
  for (const oci::ChunkEntry& c : idx.chunks) {
    if (requests == 0 || bytes + c.frame_length > max) {
      ++requests;
      bytes = 0;
    }
    bytes += c.frame_length;
  }
  return requests;
}

TEST_F(LazyTest, TheFillAsksForFewLargeRequests) {
  LazyDiskOptions o;
  o.max_batch_bytes = 256 * kKiB;  // a guest read's requests: not the fill's
  o.fill_batch_bytes = 1 * kMiB;
  auto d = Open(o);
  ASSERT_NE(d, nullptr);
  uint64_t frames = 0;
  for (const oci::ChunkEntry& c : d->index().chunks) frames += c.frame_length;
  d->StartFill();
  ASSERT_OK(d->WaitComplete(nullptr));
  EXPECT_EQ(d->requests(), FillRequests(d->index(), o.fill_batch_bytes))
      << "each request as large as fill_batch_bytes allows";
  EXPECT_EQ(d->fetched_bytes(), frames) << "every frame once";
  EXPECT_EQ(ReadFileCapped(d->file(), 8 * kMiB).value(), raw_);
}

TEST_F(LazyTest, TheFillKeepsSeveralRequestsInFlight) {
  ReadWatch w;
  w.hold_until_in_flight = 3;
  LazyDiskOptions o;
  o.fill_batch_bytes = 256 * kKiB;  // enough requests for three at once
  o.fill_connections = 3;
  o.fill_ramp = std::chrono::milliseconds(0);
  o.label = "test layer";
  src_ = Source();
  auto reader = src_->OpenRangeReader().value();
  store::ChunkedLayerHead head = store::OpenChunkedLayer(*reader, layer_, loc_, 1ull << 40, "test").value();
  auto d = LazyDisk::Open(
               [&]() -> Result<std::unique_ptr<image::BlobRangeReader>> {
                 ASSIGN_OR_RETURN(auto inner, src_->OpenRangeReader());
                 return std::unique_ptr<image::BlobRangeReader>(new WatchedReader(std::move(inner), &w));
               },
               layer_, std::move(head), loc_.digest, tmp() / "lazy", o)
               .value();
  d->StartFill();
  ASSERT_OK(d->WaitComplete(nullptr));
  d->Stop();
  std::lock_guard lock(w.mu);
  EXPECT_EQ(w.max_in_flight, 3) << "fill_connections requests at once, no more";
  EXPECT_EQ(static_cast<size_t>(w.reads), FillRequests(d->index(), o.fill_batch_bytes));
  EXPECT_EQ(ReadFileCapped(d->file(), 8 * kMiB).value(), raw_);
}

TEST_F(LazyTest, AGuestReadGetsAChunkOfAFillRequestThatIsStillArriving) {
  ReadWatch w;
  LazyDiskOptions o;
  o.fill_batch_bytes = 8 * kMiB;  // the whole disk in one request
  o.fill_connections = 1;
  o.readahead_bytes = 0;
  // A hang guard: a read that waits for the whole fill request fails here.
  o.read_deadline = std::chrono::seconds(20);
  o.label = "test layer";
  src_ = Source();
  auto reader = src_->OpenRangeReader().value();
  store::ChunkedLayerHead head = store::OpenChunkedLayer(*reader, layer_, loc_, 1ull << 40, "test").value();
  // The fill's request stops after chunk 2's frame until the gate opens.
  w.gate_at = head.index.chunks[2].frame_offset + head.index.chunks[2].frame_length;
  w.gate_open = false;
  auto d = LazyDisk::Open(
               [&]() -> Result<std::unique_ptr<image::BlobRangeReader>> {
                 ASSIGN_OR_RETURN(auto inner, src_->OpenRangeReader());
                 return std::unique_ptr<image::BlobRangeReader>(new WatchedReader(std::move(inner), &w));
               },
               layer_, std::move(head), loc_.digest, tmp() / "lazy", o)
               .value();
  d->StartFill();
  {
    std::unique_lock lock(w.mu);
    ASSERT_TRUE(w.WaitFor(lock, [&] { return w.at_gate; }));
  }
  // Chunk 1 has arrived in the fill's request, which is still open.
  std::string buf(64 * kKiB, '\0');
  Status st = d->Read(1 * 64 * kKiB, buf.size(), buf.data());
  {
    std::lock_guard lock(w.mu);
    EXPECT_EQ(w.reads, 1) << "the guest read made no request of its own";
    EXPECT_FALSE(d->has_chunk(3)) << "behind the gate";
    w.gate_open = true;
    w.cv.notify_all();
  }
  ASSERT_OK(st);
  EXPECT_EQ(buf, raw_.substr(64 * kKiB, buf.size()));
  ASSERT_OK(d->WaitComplete(nullptr));
  EXPECT_EQ(d->requests(), 1u);
  EXPECT_EQ(ReadFileCapped(d->file(), 8 * kMiB).value(), raw_);
}

TEST_F(LazyTest, BitsFromAnEarlierBootAreCheckedWhenFirstNeededNotAtOpen) {
  LazyDiskOptions o;
  o.readahead_bytes = 0;
  {
    auto d = Open(o);
    ASSERT_NE(d, nullptr);
    ASSERT_OK(d->Ensure(0, 4 * 64 * kKiB));  // chunks 0..3
    ASSERT_EQ(d->present(), 4u);
  }
  // Chunk 2's bytes never reached the disk before a crash; the machine
  // rebooted (another boot id in the bitmap).
  {
    UniqueFd fd = OpenFile(tmp() / "lazy/disk.raw", O_RDWR).value();
    ASSERT_OK(PWriteAll(fd.get(), std::string(64 * kKiB, '\0'), 2 * 64 * kKiB));
    UniqueFd map = OpenFile(tmp() / "lazy/chunks.map", O_RDWR).value();
    ASSERT_OK(PWriteAll(map.get(), std::string("an-earlier-boot").append(25, '\0'), 64));
  }
  auto d = Open(o);
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->present(), 0u) << "nothing trusted, and nothing hashed, at open";
  std::string buf(64 * kKiB, '\0');
  ASSERT_OK(d->Read(0, buf.size(), buf.data()));
  EXPECT_EQ(buf, raw_.substr(0, buf.size()));
  EXPECT_EQ(d->requests(), 0u) << "chunk 0 checked out locally";
  ASSERT_OK(d->Read(2 * 64 * kKiB, buf.size(), buf.data()));
  EXPECT_EQ(buf, raw_.substr(2 * 64 * kKiB, buf.size()));
  EXPECT_EQ(d->requests(), 1u) << "chunk 2 did not: fetched";
  EXPECT_EQ(d->present(), 2u);
}

TEST_F(LazyTest, AZeroChunkThatFailsItsLocalCheckReadsAsZeros) {
  LazyDiskOptions o;
  o.readahead_bytes = 0;
  const uint64_t at = 16 * 64 * kKiB;  // chunk 16: in the zero stretch
  {
    auto d = Open(o);
    ASSERT_NE(d, nullptr);
    ASSERT_OK(d->Ensure(at, 64 * kKiB));
  }
  // Other bytes where the zero chunk is, and a reboot since.
  {
    UniqueFd fd = OpenFile(tmp() / "lazy/disk.raw", O_RDWR).value();
    ASSERT_OK(PWriteAll(fd.get(), std::string(64 * kKiB, 'x'), at));
    UniqueFd map = OpenFile(tmp() / "lazy/chunks.map", O_RDWR).value();
    ASSERT_OK(PWriteAll(map.get(), std::string("an-earlier-boot").append(25, '\0'), 64));
  }
  auto d = Open(o);
  ASSERT_NE(d, nullptr);
  std::string buf(64 * kKiB, 'y');
  ASSERT_OK(d->Read(at, buf.size(), buf.data()));
  EXPECT_EQ(buf, std::string(64 * kKiB, '\0'));
}

TEST_F(LazyTest, AReaderOfTheOldDiskKeepsItWhenTheDiskStartsAfresh) {
  {
    auto d = Open();
    ASSERT_NE(d, nullptr);
    ASSERT_OK(d->Ensure(0, 512));
  }
  // What nbdkit holds: the disk file, open.
  UniqueFd old = OpenFile(tmp() / "lazy/disk.raw", O_RDONLY).value();
  src_ = Source();
  auto reader = src_->OpenRangeReader().value();
  store::ChunkedLayerHead head = store::OpenChunkedLayer(*reader, layer_, loc_, 1ull << 40, "test").value();
  // Another index for the same directory: everything starts afresh.
  auto d = LazyDisk::Open([this] { return src_->OpenRangeReader(); }, layer_, std::move(head),
                          oci::Digest::Sha256Of("another index"), tmp() / "lazy", {});
  ASSERT_OK(d.status());
  EXPECT_EQ((*d)->present(), 0u);
  std::string buf(512, '\0');
  ASSERT_EQ(::pread(old.get(), buf.data(), buf.size(), 0), 512) << "the old file was not truncated under its reader";
  EXPECT_EQ(buf, raw_.substr(0, 512));
}

TEST_F(LazyTest, AKeptBitmapWithNoBitSetKeepsItsFileForAReaderOfBoth) {
  // The first owner served the disk and stopped before any chunk arrived:
  // its nbdkit runs on (adopted by the next owner) with the file open and
  // the bitmap mapped, so the next owner must fill that very file.
  { ASSERT_NE(Open(), nullptr); }
  UniqueFd old = OpenFile(tmp() / "lazy/disk.raw", O_RDONLY).value();
  auto d = Open();
  ASSERT_NE(d, nullptr);
  ASSERT_OK(d->Ensure(0, 512));
  std::string buf(512, '\0');
  ASSERT_EQ(::pread(old.get(), buf.data(), buf.size(), 0), 512);
  EXPECT_EQ(buf, raw_.substr(0, 512)) << "the bit was set for another file than the one its reader holds";
}

TEST_F(LazyTest, ACorruptedFrameIsNeverServedAndTheNextReadHealsIt) {
  LazyDiskOptions o;
  o.readahead_bytes = 0;
  std::vector<std::string> rejected;
  o.on_event = [&](const blockserve::LazyEvent& e) {
    if (e.kind == blockserve::LazyEvent::Kind::kChunkRejected) rejected.push_back(e.message);
  };
  auto d = Open(o);
  ASSERT_NE(d, nullptr);
  const std::string pristine = ReadFileCapped(BlobPath(), 64 * kMiB).value();
  Corrupt(40, d->index());
  std::string buf(64 * kKiB, 'x');
  Status st = d->Read(40 * 64 * kKiB, buf.size(), buf.data());
  EXPECT_EQ(st.code(), Code::kInvalidArgument) << st.ToString();
  EXPECT_THAT(st.ToString(), HasSubstr("chunk 40"));
  EXPECT_EQ(buf, std::string(64 * kKiB, 'x')) << "not one byte reached the reader";
  EXPECT_FALSE(d->has_chunk(40));
  ASSERT_EQ(rejected.size(), 1u);
  // Its neighbour in the same disk is fine.
  ASSERT_OK(d->Read(41 * 64 * kKiB, 10, buf.data()));
  // The registry serves the right bytes again: the next read fetches anew.
  ASSERT_OK(WriteFileAtomic(BlobPath(), pristine));
  ASSERT_OK(d->Read(40 * 64 * kKiB, buf.size(), buf.data()));
  EXPECT_EQ(buf, raw_.substr(40 * 64 * kKiB, buf.size()));
}

TEST_F(LazyTest, ReadsFailAfterTheDeadlineWhenTheRegistryIsGone) {
  auto reg = TestRegistry::Start(RegistryMode::kPlain).value();
  RunResult r = RunRegdisk({"copy", "oci:" + P("img") + ":v1", "docker://" + reg->host() + "/lazy/d:v1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  registry::ClientOptions co;
  co.max_attempts = 1;
  src_ = image::OpenSource(image::ImageName::Parse("docker://" + reg->host() + "/lazy/d:v1").value(), co).value();
  auto reader = src_->OpenRangeReader().value();
  store::ChunkedLayerHead head = store::OpenChunkedLayer(*reader, layer_, loc_, 1ull << 40, "test").value();
  LazyDiskOptions o;
  o.read_deadline = std::chrono::milliseconds(1500);
  auto d = LazyDisk::Open([this] { return src_->OpenRangeReader(); }, layer_, std::move(head), loc_.digest,
                          tmp() / "lazy", o)
               .value();
  std::string buf(100, '\0');
  ASSERT_OK(d->Read(0, buf.size(), buf.data()));
  reg->Stop();
  Status st = d->Read(3 * kMiB, buf.size(), buf.data());
  EXPECT_EQ(st.code(), Code::kDeadlineExceeded) << st.ToString();
  EXPECT_TRUE(d->Read(0, buf.size(), buf.data()).ok()) << "what is present is still served";
}

// A registry behind a proxy that can stall: what a read does when the
// registry accepts a request and then sends nothing.
class LazyStallTest : public LazyTest {
 protected:
  void SetUp() override {
    LazyTest::SetUp();
    reg_ = TestRegistry::Start(RegistryMode::kPlain).value();
    RunResult r = RunRegdisk({"copy", "oci:" + P("img") + ":v1", "docker://" + reg_->host() + "/lazy/d:v1"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    proxy_ = FaultProxy::Start(reg_->port()).value();
  }
  void TearDown() override {
    proxy_.reset();  // ends every stall
    LazyTest::TearDown();
  }
  // A disk read through the proxy. The HTTP client alone would wait 10
  // minutes for a stalled answer and try once.
  std::unique_ptr<LazyDisk> OpenStalling(LazyDiskOptions o) {
    registry::ClientOptions co;
    co.max_attempts = 1;
    co.limits.stall_timeout = std::chrono::seconds(600);
    src_ = image::OpenSource(image::ImageName::Parse("docker://" + proxy_->host() + "/lazy/d:v1").value(), co).value();
    auto reader = src_->OpenRangeReader().value();
    store::ChunkedLayerHead head = store::OpenChunkedLayer(*reader, layer_, loc_, 1ull << 40, "test").value();
    o.label = "test layer";
    o.readahead_bytes = 0;
    return LazyDisk::Open([this] { return src_->OpenRangeReader(); }, layer_, std::move(head), loc_.digest,
                          tmp() / "lazy", std::move(o))
        .value();
  }
  void StallBlobReads(int times) {
    FaultProxy::Rule rule;
    rule.method = "GET";
    rule.path_contains = "/blobs/" + layer_.digest.str();
    rule.times = times;
    rule.action = FaultProxy::Rule::Action::kStall;
    rule.stall = std::chrono::seconds(600);
    proxy_->AddRule(rule);
  }
  int Stalled() const {
    int n = 0;
    for (const auto& s : proxy_->seen()) n += s.faulted;
    return n;
  }

  std::unique_ptr<TestRegistry> reg_;
  std::unique_ptr<FaultProxy> proxy_;
};

TEST_F(LazyStallTest, AReadOfAStalledRegistryEndsAtItsDeadline) {
  LazyDiskOptions o;
  o.read_deadline = std::chrono::milliseconds(1500);
  auto d = OpenStalling(o);
  StallBlobReads(1);
  std::string buf(100, '\0');
  auto read = std::async(std::launch::async, [&] { return d->Read(5 * 64 * kKiB, buf.size(), buf.data()); });
  // A hang guard, not a measurement: without a per-request deadline the read
  // waits for the HTTP client's 10-minute stall timeout.
  const bool ended = read.wait_for(std::chrono::seconds(60)) == std::future_status::ready;
  EXPECT_TRUE(ended) << "the read outlived its deadline";
  if (!ended) proxy_.reset();
  Status st = read.get();
  EXPECT_EQ(st.code(), Code::kDeadlineExceeded) << st.ToString();
  EXPECT_THAT(st.ToString(), HasSubstr("chunks 5..5"));
  EXPECT_FALSE(d->has_chunk(5));
  // The registry answers again: the next read is served.
  ASSERT_OK(d->Read(5 * 64 * kKiB, buf.size(), buf.data()));
  EXPECT_EQ(buf, raw_.substr(5 * 64 * kKiB, buf.size()));
}

// Sends one control request (control_protocol.h) and returns the socket.
UniqueFd AskControl(const fs::path& socket, uint64_t offset, uint64_t length) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, socket.c_str(), socket.native().size());
  EXPECT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0) << std::strerror(errno);
  unsigned char req[REGDISK_CONTROL_REQUEST_BYTES];
  std::memcpy(req, &offset, 8);
  std::memcpy(req + 8, &length, 8);
  EXPECT_EQ(::send(fd.get(), req, sizeof req, MSG_NOSIGNAL), static_cast<ssize_t>(sizeof req));
  return fd;
}

// The reply, or -1 when none came within `guard` (a hang guard).
// The errno a control request was answered with; kNoAnswer when the owner
// closed the connection without one, -1 when nothing came in `guard`.
constexpr int kNoAnswer = -2;
int ControlReply(int fd, std::chrono::seconds guard) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, static_cast<int>(guard.count() * 1000)) != 1) return -1;
  int32_t err = -1;
  const ssize_t got = ::recv(fd, &err, sizeof err, MSG_WAITALL);
  if (got == 0) return kNoAnswer;
  if (got != static_cast<ssize_t>(sizeof err)) return -1;
  return err;
}

TEST_F(LazyStallTest, StalledReadsDoNotStarveTheControlServer) {
  // Long enough that the stalled reads stay stuck for the whole test.
  LazyDiskOptions o;
  o.read_deadline = std::chrono::seconds(600);
  auto d = OpenStalling(o);
  const fs::path socket = tmp() / "lazy" / "control.sock";
  auto server = blockserve::ControlServer::Start(*d, socket, blockserve::ExportOptions{}.workers);
  ASSERT_OK(server.status());
  StallBlobReads(4);
  std::vector<UniqueFd> stuck;
  for (uint64_t k : {0, 10, 20, 30}) stuck.push_back(AskControl(socket, k * 64 * kKiB, 512));
  // Wait (guarded) until the registry holds all four.
  for (int i = 0; i < 600 && Stalled() < 4; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ASSERT_EQ(Stalled(), 4);
  EXPECT_EQ((*server)->active(), 4);
  // A fifth read, of another chunk, is answered while they wait (with four
  // fixed workers it was not even accepted).
  UniqueFd fifth = AskControl(socket, 50 * 64 * kKiB, 512);
  EXPECT_EQ(ControlReply(fifth.get(), std::chrono::seconds(60)), 0);
  EXPECT_TRUE(d->has_chunk(50));
  // Stopping the disk ends the stalled reads at once, not at their
  // deadline, and unanswered: the plugin asks again (of the next owner, in
  // a daemon that restarts) rather than failing the guest's read.
  d->Stop();
  for (auto& fd : stuck) EXPECT_EQ(ControlReply(fd.get(), std::chrono::seconds(60)), kNoAnswer);
  server->reset();
}

TEST_F(LazyTest, TheControlSocketIsOwnerOnlyWithoutTouchingTheUmask) {
  auto d = Open();
  ASSERT_NE(d, nullptr);
  const mode_t before = ::umask(0);
  auto server = blockserve::ControlServer::Start(*d, tmp() / "lazy" / "control.sock", 1);
  const mode_t during = ::umask(before);
  ASSERT_OK(server.status());
  EXPECT_EQ(during, 0u) << "the process umask is left alone";
  struct stat st {};
  ASSERT_EQ(::stat((tmp() / "lazy" / "control.sock").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(::stat((tmp() / "lazy").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u) << "the disk's directory, where nbdkit's socket goes too";
}

TEST(LazyErrorTest, NbdkitsLogBecomesOneLine) {
  EXPECT_EQ(blockserve::LastLogLine("nbdkit: debug: x\nnbdkit: error: cannot open plugin\n\n  \t\n"),
            "nbdkit: error: cannot open plugin");
  EXPECT_EQ(blockserve::LastLogLine(""), "(nbdkit wrote nothing)");
  EXPECT_EQ(blockserve::LastLogLine("a\x1b[2Jb\r\n"), "a\\x1b[2Jb");
}

// The export, read by QEMU's tools over NBD as a VM's backing node would be.
class LazyExportTest : public LazyTest {
 protected:
  blockserve::ExportOptions Options() {
    blockserve::ExportOptions e;
    e.plugin = REGDISK_NBDKIT_PLUGIN;
    e.deadline = std::chrono::seconds(5);
    return e;
  }
};

TEST_F(LazyExportTest, QemuReadsTheWholeDiskThroughTheExport) {
  auto d = Open();
  ASSERT_NE(d, nullptr);
  auto e = blockserve::Export::Start(*d, Options());
  ASSERT_OK(e.status());
  RunResult r = RunProgram({"qemu-img", "compare", "-f", "raw", "-F", "raw", P("d.raw"), (*e)->uri()});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_GT((*e)->control_requests(), 0u);
  EXPECT_TRUE(d->complete()) << "compare read every byte";
  // Read-only: a write through NBD is refused.
  r = RunProgram({"qemu-io", "-f", "raw", "-c", "write 0 512", (*e)->uri()});
  EXPECT_TRUE(r.exit_code != 0 || r.out.find("failed") != std::string::npos || r.err.find("read-only") != std::string::npos)
      << r.out << r.err;
  EXPECT_EQ(ReadFileCapped(d->file(), 8 * kMiB).value(), raw_) << "the disk is unchanged";
  // Served from the file once present: no more control requests.
  const uint64_t asked = (*e)->control_requests();
  r = RunProgram({"qemu-img", "compare", "-f", "raw", "-F", "raw", P("d.raw"), (*e)->uri()});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ((*e)->control_requests(), asked);
}

TEST_F(LazyExportTest, AnExportThatCannotStartSaysWhyInOneLine) {
  auto d = Open();
  ASSERT_NE(d, nullptr);
  ASSERT_OK(WriteFileAtomic(tmp() / "not-a-plugin.so", "not an ELF file\n"));
  blockserve::ExportOptions o = Options();
  o.plugin = tmp() / "not-a-plugin.so";
  auto e = blockserve::Export::Start(*d, o);
  ASSERT_FALSE(e.ok());
  const std::string msg = e.status().ToString();
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  EXPECT_THAT(msg, HasSubstr("nbdkit exited"));
  EXPECT_THAT(msg, HasSubstr("nbdkit.log"));
}

TEST_F(LazyExportTest, AGuestReadOfACorruptedChunkGetsEio) {
  auto d = Open();
  ASSERT_NE(d, nullptr);
  Corrupt(10, d->index());
  auto e = blockserve::Export::Start(*d, Options());
  ASSERT_OK(e.status());
  RunResult r = RunProgram({"qemu-io", "-r", "-f", "raw", "-c", "read -v 655360 512", (*e)->uri()});
  EXPECT_THAT(r.out + r.err, HasSubstr("Input/output error"));
  EXPECT_THAT(r.out + r.err, ::testing::Not(HasSubstr("00000000:"))) << "no byte of the chunk was shown";
  r = RunProgram({"qemu-io", "-r", "-f", "raw", "-c", "read 0 512", (*e)->uri()});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_THAT(r.out, HasSubstr("read 512/512 bytes"));
}

// The boot-sector guest with its sector 1 ("LAZY-SECTOR-CONTENT", then
// "POWEROFF"), zeros to 1 MiB, then 32 MiB of random data (from `seed`)
// that the guest never reads: written to DIR/guest.raw and pushed to
// docker://REF as a chunked image of 64 KiB chunks. Returns the disk.
std::string PushPaddedGuest(const fs::path& dir, const std::string& ref, uint32_t seed) {
  std::string raw = ReadFileCapped(REGDISK_GUEST_IMAGE, 512).value();
  std::string sector1 = "LAZY-SECTOR-CONTENT";
  sector1.resize(512, '\0');
  raw += sector1 + "POWEROFF";
  raw.resize(1 * kMiB, '\0');
  raw += RandomBytes(32 * kMiB, seed);
  EXPECT_OK(WriteFileAtomic(dir / "guest.raw", raw));
  RunResult r = RunRegdisk({"build", (dir / "guest.raw").string(), "-t", "docker://" + ref, "--layout", "chunked",
                            "--chunk-size", "64K", "-q"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return raw;
}

// The store under ROOT holds one raw disk, and it equals ORIGINAL
// (qemu-img compare).
void ExpectTheStoredDiskIs(const fs::path& root, const fs::path& original) {
  fs::path stored;
  for (const auto& e : fs::recursive_directory_iterator(root / "disks")) {
    if (e.path().filename() == "disk.raw") stored = e.path();
  }
  ASSERT_FALSE(stored.empty()) << "no raw disk in " << root;
  RunResult r = RunProgram({"qemu-img", "compare", "-f", "raw", "-F", "raw", original.string(), stored.string()});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

// --lazy-owner-fd is pull --lazy's own, for its background copy: a user's
// is refused in one line before anything is made.
TEST(LazyRunTest, TheOwnersDescriptorFlagIsNotAUsersToGive) {
  TempDir tmp = TempDir::Create("regdisk-test").value();
  const fs::path root = tmp.path() / "root";
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"pull", "--lazy-owner-fd", "5", "docker://127.0.0.1:1/a:b"},
        std::vector<std::string>{"pull", "--lazy", "--lazy-owner-fd", "1", "docker://127.0.0.1:1/a:b"}}) {
    std::vector<std::string> argv = {"--root", root.string()};
    argv.insert(argv.end(), args.begin(), args.end());
    RunResult r = RunRegdisk(argv);
    EXPECT_EQ(r.exit_code, 2) << r.err;
    EXPECT_THAT(r.err, HasSubstr("--lazy-owner-fd is regdisk's own"));
    EXPECT_FALSE(fs::exists(root));
  }
}

// regdisk run, end to end: a chunked image of the boot-sector guest, padded
// with 32 MiB of random data the guest never reads, boots from the registry
// through the export.
TEST(LazyRunTest, RunBootsAChunkedImageWhileItIsPulled) {
  TempDir tmp = TempDir::Create("regdisk-test").value();
  auto reg = TestRegistry::Start(RegistryMode::kPlain, {}, TestRegistry::Extra{.access_log = true}).value();
  const fs::path root = tmp.path() / "root";
  const std::string ref = reg->host() + "/vmdisks/lazy:v1";
  PushPaddedGuest(tmp.path(), ref, 3);
  RunResult r;
  std::string spec = ReadFileCapped(REGDISK_SOURCE_DIR "/examples/vm.yaml", 1 << 20).value();
  spec = std::regex_replace(spec, std::regex("image: [^\n]*"), "image: " + ref);
  ASSERT_OK(WriteFileAtomic(tmp.path() / "vm.yaml", spec));

  const size_t log_before = reg->log().size();
  r = RunRegdisk({"--root", root.string(), "run", "-f", (tmp.path() / "vm.yaml").string(), "--timeout", "120",
                  "--grace", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("is booting while it is pulled"));
  EXPECT_THAT(r.out, HasSubstr("REGDISK-GUEST-BOOTED"));
  EXPECT_THAT(r.out, HasSubstr("sector1: LAZY-SECTOR-CONTENT"));
  EXPECT_THAT(r.out, HasSubstr("REGDISK-GUEST-POWEROFF"));
  // Every read of the layer was a ranged one: nothing fetched it whole.
  const std::string log = reg->log().substr(log_before);
  int ranged = 0, whole = 0;
  for (size_t at = 0; (at = log.find("GET /v2/vmdisks/lazy/blobs/", at)) != std::string::npos; ++at) {
    const std::string line = log.substr(at, log.find('\n', at) - at);
    const size_t q = line.find('"');
    int status = 0;
    if (q != std::string::npos && std::sscanf(line.c_str() + q + 1, "%d", &status) == 1) {
      if (status == 206) ++ranged;
      if (status == 200 && line.find("GET /v2/vmdisks/lazy/blobs/sha256:") != std::string::npos) ++whole;
    }
  }
  EXPECT_GT(ranged, 0) << log;
  // (The config blob is fetched whole; it is small. The layer never is.)
  EXPECT_LE(whole, 1) << log;
  // nbdkit went with the VM.
  EXPECT_NE(RunProgram({"pgrep", "-f", (root / "lazy").string()}).exit_code, 0) << "an nbdkit outlived the VM";

  // The disk completes (resuming what the first run verified) and equals
  // the original; a run then boots from the store without lazy boot.
  r = RunRegdisk({"--root", root.string(), "pull", "docker://" + ref});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ExpectTheStoredDiskIs(root, tmp.path() / "guest.raw");
  r = RunRegdisk({"--root", root.string(), "run", "-f", (tmp.path() / "vm.yaml").string(), "--timeout", "120",
                  "--grace", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("sector1: LAZY-SECTOR-CONTENT"));
  EXPECT_THAT(r.err, ::testing::Not(HasSubstr("while it is pulled")));

  // A disk over --max-disk-size is refused before anything is served.
  r = RunRegdisk({"--root", (tmp.path() / "root3").string(), "--max-disk-size", "1M", "run", "-f",
                  (tmp.path() / "vm.yaml").string(), "--timeout", "120", "--grace", "1"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("over the maximum disk size"));
  EXPECT_THAT(r.out, ::testing::Not(HasSubstr("REGDISK-GUEST-BOOTED")));

  // Without the plugin there is no export: the run pulls in full, says
  // why, and boots.
  r = RunRegdisk({"--root", (tmp.path() / "root2").string(), "run", "-f", (tmp.path() / "vm.yaml").string(),
                  "--timeout", "120", "--grace", "1"},
                 {}, {"REGDISK_NBDKIT_PLUGIN=" + (tmp.path() / "no-such-plugin.so").string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("lazy boot needs nbdkit and regdisk's nbdkit plugin"));
  EXPECT_THAT(r.err, HasSubstr("was pulled in full before boot"));
  EXPECT_THAT(r.out, HasSubstr("sector1: LAZY-SECTOR-CONTENT"));
}


// regdisk pull --lazy, end to end: it returns once the disk is served, a
// background regdisk fills it; a run boots from that export and fetches
// nothing; the owner killed with -9 leaves its nbdkit serving, and the next
// pull --lazy adopts it and completes the disk.
TEST(LazyRunTest, PullLazyServesAtOnceAndARunBootsFromItsExport) {
  TempDir tmp = TempDir::Create("regdisk-test").value();
  auto reg = TestRegistry::Start(RegistryMode::kPlain).value();
  auto proxy = FaultProxy::Start(reg->port()).value();
  const fs::path root = tmp.path() / "root";
  PushPaddedGuest(tmp.path(), reg->host() + "/vmdisks/lazy:v1", 5);
  RunResult r;
  // Through the proxy, which holds the fill: requests for frames past the
  // first 2 MiB (the guest reads less; the index, at the end, passes)
  // stall and fail until the rules are cleared.
  const std::string ref = "docker://" + proxy->host() + "/vmdisks/lazy:v1";
  auto src = image::OpenSource(image::ImageName::Parse(ref).value(), {}).value();
  const json manifest = json::parse(src->GetManifest().value().bytes);
  const oci::Descriptor layer = oci::Descriptor::FromJson(manifest["layers"][0]).value();
  const oci::ChunkIndexLocation loc = oci::ChunkIndexLocationOf(layer).value().value();
  proxy->AddRule({.method = "GET", .path_contains = "/blobs/" + layer.digest.str(), .times = 1 << 30,
                  .action = FaultProxy::Rule::Action::kStall, .stall = std::chrono::milliseconds(2000),
                  .range_from = 2 * kMiB, .range_below = loc.offset});
  std::string spec = ReadFileCapped(REGDISK_SOURCE_DIR "/examples/vm.yaml", 1 << 20).value();
  // The run reaches the registry through a proxy of its own, to show it
  // fetches none of the layer (the same layer: the same export).
  auto run_proxy = FaultProxy::Start(reg->port()).value();
  spec = std::regex_replace(spec, std::regex("image: [^\n]*"), "image: " + run_proxy->host() + "/vmdisks/lazy:v1");
  ASSERT_OK(WriteFileAtomic(tmp.path() / "vm.yaml", spec));
  const fs::path lazy_dir = root / "lazy" / layer.digest.hex().substr(0, 24);
  // Whatever happens, no background regdisk or nbdkit outlives the test.
  struct Cleanup {
    fs::path root;
    ~Cleanup() {
      RunProgram({"pkill", "-9", "-f", "[-]-root " + root.string() + " .*pull --lazy"});
      RunProgram({"pkill", "-9", "-f", "nbdkit.*" + root.string()});
    }
  } cleanup{root};
  auto owner_pid = [](const std::string& err) {
    std::smatch m;
    return std::regex_search(err, m, std::regex("\\(pid ([0-9]+),")) ? std::stoi(m[1]) : 0;
  };

  r = RunRegdisk({"--root", root.string(), "pull", "--lazy", ref});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("sha256:"));
  EXPECT_THAT(r.err, HasSubstr("is usable now"));
  const int owner = owner_pid(r.err);
  ASSERT_GT(owner, 0) << r.err;
  EXPECT_TRUE(blockserve::CanConnect(lazy_dir / "nbd.sock"));
  r = RunRegdisk({"--root", root.string(), "images"});
  EXPECT_THAT(r.out, HasSubstr("filling")) << r.out;

  // A run boots from that export: the owner fetches, the run does not.
  r = RunRegdisk({"--root", root.string(), "run", "-f", (tmp.path() / "vm.yaml").string(), "--timeout", "120",
                  "--grace", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("from the export of the regdisk process pulling it"));
  EXPECT_THAT(r.out, HasSubstr("sector1: LAZY-SECTOR-CONTENT"));
  EXPECT_THAT(r.out, HasSubstr("REGDISK-GUEST-POWEROFF"));
  for (const auto& s : run_proxy->seen()) {
    EXPECT_EQ(s.path.find(layer.digest.str()), std::string::npos) << "the run fetched the layer: " << s.path;
  }

  // A second pull --lazy (by another name) is usable at once from the same
  // export; its background regdisk waits for the owner to go.
  const std::string direct = "docker://" + reg->host() + "/vmdisks/lazy:v1";
  r = RunRegdisk({"--root", root.string(), "pull", "--lazy", direct});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("the regdisk process already pulling it serves it"));

  // The owner killed mid-fill: its nbdkit goes on serving (for VMs that
  // read it), and a pull takes it over, adopts that nbdkit and completes
  // the disk: the waiting one (from the registry directly, which does not
  // stall) or the third below, whichever takes the lock first; either way
  // the adoption is in the logs and both names are recorded.
  RunResult kept = RunProgram({"pgrep", "-f", "nbdkit.*" + lazy_dir.string()});
  ASSERT_EQ(kept.exit_code, 0) << "no nbdkit serves the export";
  const std::string kept_pid = kept.out.substr(0, kept.out.find('\n'));
  ASSERT_EQ(::kill(owner, SIGKILL), 0);
  proxy->ClearRules();
  r = RunRegdisk({"--root", root.string(), "pull", "--lazy", ref});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // The fill ends, the owner commits and exits, stopping the nbdkit, and
  // leaves nothing under lazy/ (hang guard: 120 s).
  for (int i = 0; i < 1200 && fs::exists(lazy_dir); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  auto owner_logs = [&] {
    std::string all;
    for (const auto& e : fs::directory_iterator(root / "logs")) all += ReadFileCapped(e.path(), 1 << 20).value_or("");
    return all;
  };
  ASSERT_FALSE(fs::exists(lazy_dir)) << owner_logs();
  EXPECT_THAT(owner_logs(), HasSubstr("again through its running nbdkit (pid " + kept_pid + ")"))
      << "the second owner started an nbdkit of its own";
  EXPECT_NE(RunProgram({"pgrep", "-f", "nbdkit.*" + root.string()}).exit_code, 0) << "an nbdkit outlived the fill";
  // Both names are recorded (the last one by a background regdisk that
  // may still be finishing: hang guard 60 s).
  for (int i = 0; i < 600; ++i) {
    r = RunRegdisk({"--root", root.string(), "images"});
    if (r.out.find(reg->host() + "/vmdisks/lazy") != std::string::npos &&
        r.out.find(proxy->host() + "/vmdisks/lazy") != std::string::npos) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_THAT(r.out, HasSubstr(reg->host() + "/vmdisks/lazy")) << r.out << owner_logs();
  EXPECT_THAT(r.out, HasSubstr(proxy->host() + "/vmdisks/lazy")) << r.out << owner_logs();
  EXPECT_THAT(r.out, ::testing::Not(HasSubstr("filling"))) << r.out;
  ExpectTheStoredDiskIs(root, tmp.path() / "guest.raw");
  // Once stored, pull --lazy is a plain pull that finds it.
  r = RunRegdisk({"--root", root.string(), "pull", "--lazy", ref});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("sha256:"));
  EXPECT_THAT(r.err, ::testing::Not(HasSubstr("usable now")));
}

}  // namespace
}  // namespace regdisk::testing
