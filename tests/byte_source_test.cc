#include "util/byte_source.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <thread>

#include "harness/harness.h"

namespace regdisk {
namespace {

std::string Drain(ByteSource& src, Status* error) {
  std::string out;
  for (;;) {
    auto r = src.Next();
    if (!r.ok()) {
      *error = r.status();
      return out;
    }
    if (r->empty()) return out;
    out.append(reinterpret_cast<const char*>(r->data()), r->size());
  }
}

TEST(BlockPipeTest, CarriesEveryByteInOrderThroughSmallBlocks) {
  BlockPipe pipe(/*block_size=*/7, /*depth=*/2);
  const std::string data = testing::RandomBytes(100003, 5);
  std::thread producer([&] {
    Status st;
    for (size_t i = 0; i < data.size() && st.ok(); i += 333) st = pipe.Write(std::string_view(data).substr(i, 333));
    pipe.Finish(st);
  });
  Status error;
  EXPECT_EQ(Drain(pipe, &error), data);
  EXPECT_TRUE(error.ok()) << error.ToString();
  producer.join();
}

TEST(BlockPipeTest, TheProducersErrorComesAfterItsData) {
  BlockPipe pipe(4, 4);
  std::thread producer([&] {
    ASSERT_TRUE(pipe.Write("abcdef").ok());
    pipe.Finish(DataLoss("digest mismatch"));
  });
  Status error;
  EXPECT_EQ(Drain(pipe, &error), "abcd");  // the half-filled block is dropped with the error
  EXPECT_EQ(error.code(), Code::kDataLoss);
  producer.join();
}

TEST(BlockPipeTest, CancelReleasesABlockedProducer) {
  BlockPipe pipe(4, 1);
  Status last;
  std::thread producer([&] {
    for (int i = 0; i < 1000 && last.ok(); ++i) last = pipe.Write("0123456789");
    pipe.Finish(last);
  });
  ASSERT_TRUE(pipe.Next().ok());
  pipe.Cancel();
  producer.join();
  EXPECT_EQ(last.code(), Code::kCancelled);
}

}  // namespace
}  // namespace regdisk
