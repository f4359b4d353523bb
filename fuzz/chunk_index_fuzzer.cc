// libFuzzer target for the chunk index parser (oci/chunk_index.h): any
// bytes, presented as the index frame of a blob with a matching digest
// annotation (so the parser goes past the digest check), are parsed or
// refused without crashing. An index it accepts must hold what the format
// promises: the chunk count of its disk size, contiguous frames inside the
// blob and before the index, and the same bytes when encoded again.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "oci/chunk_index.h"

namespace {

using namespace regdisk;

[[noreturn]] void Fail(const std::string& why) {
  std::fprintf(stderr, "chunk_index_fuzzer: %s\n", why.c_str());
  std::abort();
}

void Check(std::string_view bytes, uint64_t index_offset, uint64_t blob_size) {
  oci::ChunkIndexLocation loc{index_offset, bytes.size(), oci::Digest::Sha256Of(bytes)};
  auto idx = oci::ParseChunkIndex(bytes, loc, blob_size);
  if (!idx.ok()) {
    if (idx.status().message().find('\n') != std::string::npos) Fail("a refusal spans several lines");
    return;
  }
  if (idx->chunks.size() != oci::ChunkCount(idx->disk_size, idx->chunk_shift)) Fail("wrong chunk count accepted");
  uint64_t next = idx->chunks.front().frame_offset;
  for (size_t k = 0; k < idx->chunks.size(); ++k) {
    const auto& c = idx->chunks[k];
    if (c.frame_offset != next) Fail("a gap or overlap accepted at chunk " + std::to_string(k));
    next = c.frame_offset + c.frame_length;
    if (idx->ChunkLength(k) == 0 || idx->ChunkLength(k) > idx->chunk_size()) Fail("a chunk of impossible length");
  }
  if (next > index_offset || next > blob_size) Fail("a frame past the index accepted");
  if (oci::EncodeChunkIndex(*idx) != bytes) Fail("the accepted index does not encode to its own bytes");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view bytes(reinterpret_cast<const char*>(data), size);
  // Far from the frames, and then close enough for frames to run past it.
  Check(bytes, uint64_t{1} << 40, (uint64_t{1} << 40) + size + 17);
  Check(bytes, 2048, 2048 + size + 17);
  return 0;
}
