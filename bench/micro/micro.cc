// Micro-benchmarks of the pieces on regdisk's hot paths, each beside the
// anchor it replaces where there is one:
//
//   BM_CreateOverlay      a VM's ephemeral disk, written by regdisk
//   BM_QemuImgCreate      the same disk made by spawning qemu-img (the anchor)
//   BM_BlockPipe          the pull's download -> inflate hand-over, 16 KiB writes
//   BM_Sha256             the digest every pulled byte goes through
//
//   build/bench/micro/regdisk_micro [--benchmark_format=json]
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <unistd.h>

#include <string>
#include <thread>

#include "disk/overlay.h"
#include "oci/digest.h"
#include "util/byte_source.h"
#include "util/fs.h"
#include "util/process.h"

namespace regdisk {
namespace {

constexpr uint64_t kDiskSize = 20ull << 30;

// A sparse 20 GiB raw disk to back the overlays.
class Backing {
 public:
  Backing() : dir_(TempDir::Create("regdisk-micro").value()) {
    auto fd = OpenFile(path(), O_WRONLY | O_CREAT, 0600);
    if (fd.ok() && ::ftruncate(fd->get(), static_cast<off_t>(kDiskSize)) != 0) std::abort();
  }
  std::filesystem::path path() const { return dir_.path() / "disk.raw"; }
  std::filesystem::path overlay(int64_t i) const { return dir_.path() / ("vm-" + std::to_string(i) + ".qcow2"); }

 private:
  TempDir dir_;
};

void BM_CreateOverlay(benchmark::State& state) {
  Backing b;
  int64_t i = 0;
  for (auto _ : state) {
    Status st = disk::CreateOverlay(b.overlay(i), b.path(), disk::Format::kRaw, kDiskSize);
    if (!st.ok()) state.SkipWithError(st.message().c_str());
    state.PauseTiming();
    ::unlink(b.overlay(i++).c_str());
    state.ResumeTiming();
  }
}
BENCHMARK(BM_CreateOverlay)->Unit(benchmark::kMicrosecond);

void BM_QemuImgCreate(benchmark::State& state) {
  Backing b;
  int64_t i = 0;
  for (auto _ : state) {
    auto r = Process::Run({"qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", b.path().string(),
                           b.overlay(i).string(), std::to_string(kDiskSize)},
                          std::chrono::seconds(60));
    if (!r.ok() || r->exit_code != 0) state.SkipWithError("qemu-img create failed");
    state.PauseTiming();
    ::unlink(b.overlay(i++).c_str());
    state.ResumeTiming();
  }
}
BENCHMARK(BM_QemuImgCreate)->Unit(benchmark::kMicrosecond);

void BM_BlockPipe(benchmark::State& state) {
  const std::string chunk(16 << 10, 'x');
  const int64_t total = 256 << 20;
  for (auto _ : state) {
    BlockPipe pipe;
    std::thread producer([&] {
      Status st;
      for (int64_t sent = 0; sent < total && st.ok(); sent += static_cast<int64_t>(chunk.size())) st = pipe.Write(chunk);
      pipe.Finish(st);
    });
    int64_t got = 0;
    for (;;) {
      auto r = pipe.Next();
      if (!r.ok() || r->empty()) break;
      got += static_cast<int64_t>(r->size());
    }
    producer.join();
    if (got != total) state.SkipWithError("the pipe lost bytes");
  }
  state.SetBytesProcessed(state.iterations() * total);
}
BENCHMARK(BM_BlockPipe)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_Sha256(benchmark::State& state) {
  const std::string block(1 << 20, 'y');
  oci::Hasher h;
  for (auto _ : state) h.Update(block);
  benchmark::DoNotOptimize(h.Finish());
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(block.size()));
}
BENCHMARK(BM_Sha256)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace regdisk

BENCHMARK_MAIN();
