// Streams of bytes read chunk by chunk, and a bounded pipe that carries one
// from a producer thread to a consumer, so a download, its digest, its
// decompression and the disk writes run at the same time.
//
//   BlockPipe pipe;
//   std::thread producer([&] { pipe.Finish(FetchInto(pipe)); });  // Write()s
//   Status st = Consume(pipe);       // Next() until the empty chunk
//   if (!st.ok()) pipe.Cancel();     // the producer's Write() now fails
//   producer.join();
//
// Memory is bounded by depth x block size, whatever the stream's length.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <span>
#include <string_view>
#include <vector>

#include "util/status.h"

namespace regdisk {

class ByteSource {
 public:
  virtual ~ByteSource() = default;
  // The next chunk; valid until the next call. An empty chunk is the end.
  virtual Result<std::span<const uint8_t>> Next() = 0;
};

// One producer thread Write()s and finally calls Finish(status); one
// consumer calls Next() until the end (or the producer's error) and may
// Cancel() at any time. Thread-safe between exactly those two.
class BlockPipe : public ByteSource {
 public:
  explicit BlockPipe(size_t block_size = 1 << 20, size_t depth = 8);

  // Producer: copies data into blocks, waiting while the pipe is full.
  // Fails with kCancelled once the consumer has cancelled.
  Status Write(std::string_view data);
  // Producer: no more data; `status` is what the consumer's Next() returns
  // after the last block (OK: the empty end chunk).
  void Finish(Status status);

  // Consumer.
  Result<std::span<const uint8_t>> Next() override;
  void Cancel();

 private:
  struct Block {
    std::vector<uint8_t> data;
    size_t used = 0;
  };
  Status Push(Block block);  // the producer hands a full block over

  const size_t block_size_;
  const size_t depth_;
  std::mutex mu_;
  std::condition_variable changed_;
  std::deque<Block> full_;   // guarded by mu_
  std::vector<Block> free_;  // guarded by mu_
  bool finished_ = false;    // guarded by mu_
  bool cancelled_ = false;   // guarded by mu_
  Status final_;             // guarded by mu_
  Block filling_;            // producer only
  Block reading_;            // consumer only
};

}  // namespace regdisk
