// libFuzzer target for the layer reader (store::DiskTree): any bytes, as an
// uncompressed layer tar, are applied (twice, as layers 1 and 2, so that
// whiteouts and replacements meet earlier entries) or refused without
// crashing; nothing appears beside the staging directory, and a disk found
// has the size of its staged file. The one-layer result is compared with
// store::DiskPeek (inspect --disk's reader) on the same bytes: the same
// disk (path, size, first bytes), the same absence, or an error for both.
//
// Uses only the public API of DiskTree and DiskPeek. The staging directory lives under
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

// DiskPeek over the one layer `data` agrees with `tree`, which applied it.
void CheckPeek(const store::DiskTree& tree, std::span<const uint8_t> data, const std::string& path) {
  constexpr size_t kHead = 4096;
  auto disk = tree.FindDisk(path);
  store::DiskPeek peek(path, kHead);
  MemorySource src(data);
  Status st = peek.ReadLayer(src, oci::media::kOciLayerTar, "layer 1", /*stop_at_disk=*/false);
  const std::string what = "for path \"" + path + "\": ";
  if (!disk.ok() && disk.status().code() != Code::kNotFound) {
    if (st.ok() && peek.found()) Fail(what + "the pull refused (" + disk.status().message() + ") but the peek found " + peek.disk().image_path);
    return;
  }
  if (!st.ok()) Fail(what + "the pull accepted the layer but the peek refused it: " + st.message());
  if (!disk.ok()) {
    if (peek.found()) Fail(what + "the pull found no disk but the peek found " + peek.disk().image_path);
    return;
  }
  if (!peek.found()) Fail(what + "the pull found " + disk->image_path + " but the peek found nothing");
  if (peek.disk().image_path != disk->image_path || peek.disk().size != disk->size) {
    Fail(what + "the pull found " + disk->image_path + " (" + std::to_string(disk->size) + " bytes), the peek " +
         peek.disk().image_path + " (" + std::to_string(peek.disk().size) + " bytes)");
  }
  std::string staged(std::min<uint64_t>(disk->size, kHead), '\0');
  std::FILE* f = std::fopen(disk->staged.c_str(), "rb");
  if (f == nullptr) Fail("cannot open " + disk->staged.string());
  const size_t got = std::fread(staged.data(), 1, staged.size(), f);
  std::fclose(f);
  if (got != staged.size() || staged != peek.disk().head) Fail(what + "the peek's head differs from the staged disk");
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
      if (std::string(label) == "layer 1") {
        CheckPeek(tree, {data, size}, "");
        CheckPeek(tree, {data, size}, "/disk/disk.img");
      }
    }
  }
  for (const auto& e : fs::directory_iterator(Root())) {
    if (e.path() != staging) Fail("the layer wrote " + e.path().string() + " beside the staging directory");
  }
  fs::remove_all(staging);
  return 0;
}
