// libFuzzer target for the layer reader (store::DiskTree): any bytes, as an
// uncompressed layer tar, are applied (twice, as layers 1 and 2, so that
// whiteouts and replacements meet earlier entries) or refused without
// crashing; nothing appears beside the staging directory, and a disk found
// has the size of its staged file.
//
// Uses only DiskTree's public API. The staging directory lives under
// $TMPDIR and is emptied after each input.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <span>
#include <string>
#include <system_error>

#include "oci/manifest.h"
#include "store/unpack.h"
#include "util/byte_source.h"

namespace {

using namespace regdisk;
namespace fs = std::filesystem;

// The input in chunks of an odd size, so tar blocks straddle chunks.
class MemorySource : public ByteSource {
 public:
  explicit MemorySource(std::span<const uint8_t> data) : data_(data) {}
  Result<std::span<const uint8_t>> Next() override {
    std::span<const uint8_t> chunk = data_.subspan(0, std::min(data_.size(), kChunk));
    data_ = data_.subspan(chunk.size());
    return chunk;
  }

 private:
  static constexpr size_t kChunk = 1000;
  std::span<const uint8_t> data_;
};

[[noreturn]] void Fail(const std::string& why) {
  std::fprintf(stderr, "%s\n", why.c_str());
  std::abort();
}

// $TMPDIR/regdisk-fuzz-XXXXXX, removed at exit.
const fs::path& Root() {
  static const fs::path root = [] {
    std::string templ = (fs::temp_directory_path() / "regdisk-fuzz-XXXXXX").string();
    if (::mkdtemp(templ.data()) == nullptr) Fail("mkdtemp failed");
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(Root(), ec);
    });
    return fs::path(templ);
  }();
  return root;
}

void CheckDisk(const store::DiskTree& tree, const std::string& path, const fs::path& staging) {
  auto disk = tree.FindDisk(path);
  if (!disk.ok()) return;
  std::error_code ec;
  uint64_t staged = fs::file_size(disk->staged, ec);
  if (ec) Fail("disk " + disk->image_path + " is staged at " + disk->staged.string() + ", which cannot be read");
  if (staged != disk->size) {
    Fail("disk " + disk->image_path + " claims " + std::to_string(disk->size) + " bytes but its staged file has " +
         std::to_string(staged));
  }
  fs::path rel = disk->staged.lexically_normal().lexically_relative(staging);
  if (rel.empty() || *rel.begin() == "..") Fail("disk staged at " + disk->staged.string() + ", outside the staging directory");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fs::path staging = Root() / "staging";
  fs::create_directory(staging);
  {
    store::DiskTree tree(staging);
    for (const char* label : {"layer 1", "layer 2"}) {
      MemorySource src({data, size});
      if (!tree.ApplyLayer(src, oci::media::kOciLayerTar, label).ok()) break;
      CheckDisk(tree, "", staging);
      CheckDisk(tree, "/disk/disk.img", staging);
    }
  }
  for (const auto& e : fs::directory_iterator(Root())) {
    if (e.path() != staging) Fail("the layer wrote " + e.path().string() + " beside the staging directory");
  }
  fs::remove_all(staging);
  return 0;
}
