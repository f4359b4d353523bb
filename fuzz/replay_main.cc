// A main() for a libFuzzer target that needs neither clang nor libFuzzer, so
// that every fuzz target is also an ordinary, deterministic ctest test built
// with the normal compiler and sanitizers:
//
//   NAME_replay [--runs N] [--seed S] [--max-len BYTES] [--artifact FILE] CORPUS...
//
// It first feeds every file of the CORPUS directories (or files), in name
// order, to LLVMFuzzerTestOneInput; then N inputs made from them by a small
// mutator seeded with S. The same arguments and corpus give the same inputs
// on every run and every machine with the same standard library.
//
// A crash aborts the process (ASan, UBSan, an uncaught exception or a
// target's own check), which fails the test. Each corpus file is named on
// stderr before it runs; with --artifact, each input is also written to
// FILE before it runs, so after a crash FILE holds the input that crashed:
// add it to fuzz/corpus/NAME/ once the bug is fixed.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

using Input = std::vector<uint8_t>;

struct Options {
  uint64_t runs = 1000;
  uint64_t seed = 1;
  size_t max_len = 16384;
  std::string artifact;
  std::vector<std::string> corpus;
};

[[noreturn]] void Usage(const char* argv0) {
  std::fprintf(stderr, "usage: %s [--runs N] [--seed S] [--max-len BYTES] [--artifact FILE] CORPUS...\n", argv0);
  std::exit(2);
}

Options ParseArgs(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) Usage(argv[0]);
      return argv[++i];
    };
    if (arg == "--runs") {
      o.runs = std::stoull(value());
    } else if (arg == "--seed") {
      o.seed = std::stoull(value());
    } else if (arg == "--max-len") {
      o.max_len = std::stoull(value());
    } else if (arg == "--artifact") {
      o.artifact = value();
    } else if (arg.rfind("--", 0) == 0) {
      Usage(argv[0]);
    } else {
      o.corpus.push_back(arg);
    }
  }
  if (o.max_len == 0) Usage(argv[0]);
  return o;
}

Input ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "replay: cannot read %s\n", path.c_str());
    std::exit(2);
  }
  return Input(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// The corpus files, sorted by path so the order (and with it every mutated
// input) does not depend on the file system.
std::vector<std::filesystem::path> ListCorpus(const std::vector<std::string>& paths) {
  std::vector<std::filesystem::path> files;
  for (const auto& p : paths) {
    if (std::filesystem::is_directory(p)) {
      for (const auto& e : std::filesystem::directory_iterator(p)) {
        if (e.is_regular_file()) files.push_back(e.path());
      }
    } else {
      files.emplace_back(p);
    }
  }
  std::sort(files.begin(), files.end());
  return files;
}

// Writes each input to a file before it runs; does nothing without a path.
class Artifact {
 public:
  explicit Artifact(const std::string& path) {
    if (path.empty()) return;
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) std::perror(("replay: " + path).c_str());
  }
  ~Artifact() {
    if (fd_ >= 0) ::close(fd_);
  }
  Artifact(const Artifact&) = delete;
  Artifact& operator=(const Artifact&) = delete;

  void Save(const Input& in) {
    if (fd_ < 0) return;
    if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, in.data(), in.size(), 0) != static_cast<ssize_t>(in.size())) {
      std::perror("replay: writing the artifact");
    }
  }

 private:
  int fd_ = -1;
};

// Makes inputs from the corpus: a few stacked mutations of one corpus input
// (bit flips, interesting bytes and integers, random bytes, insertions,
// deletions, duplicated ranges, splices with another input), capped at
// max_len. Blind (no coverage feedback) but deterministic.
class Mutator {
 public:
  Mutator(const std::vector<Input>& corpus, uint64_t seed, size_t max_len)
      : corpus_(corpus), rng_(seed), max_len_(max_len) {}

  Input Next() {
    Input in = corpus_.empty() ? Input() : corpus_[Below(corpus_.size())];
    int steps = 1 + static_cast<int>(Below(8));
    for (int i = 0; i < steps; ++i) MutateOnce(in);
    if (in.size() > max_len_) in.resize(max_len_);
    return in;
  }

 private:
  // A number in [0, n); n > 0.
  size_t Below(size_t n) { return static_cast<size_t>(rng_() % n); }
  // A position in `in`, or 0 when it is empty.
  size_t Pos(const Input& in) { return in.empty() ? 0 : Below(in.size()); }
  // A range length at `pos`, mostly short.
  size_t Len(const Input& in, size_t pos) {
    size_t left = in.size() - pos;
    if (left == 0) return 0;
    return 1 + Below(std::min<size_t>(left, Below(4) == 0 ? 512 : 16));
  }

  void MutateOnce(Input& in) {
    static constexpr uint8_t kBytes[] = {0x00, 0xff, 0x7f, 0x80, 0x01, 0xfe, 0x20, 0x0a, '"', '\\', '/', ':', '.'};
    static constexpr uint64_t kInts[] = {0, 1, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0xffff, 0x10000, 0x7fffffff,
                                         0x80000000, 0xffffffff, 0x100000000, 0x7fffffffffffffff,
                                         0x8000000000000000, 0xffffffffffffffff};
    switch (Below(in.empty() ? 2 : 9)) {
      case 0: {  // insert random bytes
        size_t pos = in.empty() ? 0 : Below(in.size() + 1);
        size_t n = 1 + Below(8);
        for (size_t i = 0; i < n; ++i) in.insert(in.begin() + static_cast<ptrdiff_t>(pos), static_cast<uint8_t>(rng_()));
        break;
      }
      case 1: {  // splice: a range of another input inserted here
        if (corpus_.empty()) break;
        const Input& other = corpus_[Below(corpus_.size())];
        size_t from = Pos(other), len = Len(other, from);
        size_t pos = in.empty() ? 0 : Below(in.size() + 1);
        in.insert(in.begin() + static_cast<ptrdiff_t>(pos), other.begin() + static_cast<ptrdiff_t>(from),
                  other.begin() + static_cast<ptrdiff_t>(from + len));
        break;
      }
      case 2:  // flip a bit
        in[Pos(in)] ^= static_cast<uint8_t>(1u << Below(8));
        break;
      case 3:  // an interesting byte
        in[Pos(in)] = kBytes[Below(std::size(kBytes))];
        break;
      case 4:  // a random byte
        in[Pos(in)] = static_cast<uint8_t>(rng_());
        break;
      case 5: {  // delete a range
        size_t pos = Pos(in), len = Len(in, pos);
        in.erase(in.begin() + static_cast<ptrdiff_t>(pos), in.begin() + static_cast<ptrdiff_t>(pos + len));
        break;
      }
      case 6: {  // duplicate a range to another place
        size_t from = Pos(in), len = Len(in, from);
        Input range(in.begin() + static_cast<ptrdiff_t>(from), in.begin() + static_cast<ptrdiff_t>(from + len));
        size_t pos = Below(in.size() + 1);
        in.insert(in.begin() + static_cast<ptrdiff_t>(pos), range.begin(), range.end());
        break;
      }
      case 7: {  // an interesting integer, big- or little-endian, 2, 4 or 8 bytes
        uint64_t v = kInts[Below(std::size(kInts))];
        size_t width = size_t{2} << Below(3);
        bool big = Below(2) == 0;
        size_t pos = Pos(in);
        for (size_t i = 0; i < width && pos + i < in.size(); ++i) {
          size_t shift = 8 * (big ? width - 1 - i : i);
          in[pos + i] = static_cast<uint8_t>(v >> shift);
        }
        break;
      }
      case 8: {  // cross-over: this input's head, another's tail
        if (corpus_.empty()) break;
        const Input& other = corpus_[Below(corpus_.size())];
        in.resize(Pos(in));
        in.insert(in.end(), other.begin() + static_cast<ptrdiff_t>(Pos(other)), other.end());
        break;
      }
    }
  }

  const std::vector<Input>& corpus_;
  std::mt19937_64 rng_;
  size_t max_len_;
};

// Runs one input from an exactly sized heap copy, so ASan sees any read
// past its end.
void RunOne(const Input& in, Artifact& artifact) {
  artifact.Save(in);
  auto copy = std::make_unique<uint8_t[]>(in.size());
  if (!in.empty()) std::memcpy(copy.get(), in.data(), in.size());
  LLVMFuzzerTestOneInput(copy.get(), in.size());
}

}  // namespace

int main(int argc, char** argv) {
  Options o = ParseArgs(argc, argv);
  Artifact artifact(o.artifact);
  if (!o.artifact.empty()) std::fprintf(stderr, "replay: each input is written to %s before it runs\n", o.artifact.c_str());
  std::vector<Input> corpus;
  for (const auto& file : ListCorpus(o.corpus)) {
    std::fprintf(stderr, "replay: %s\n", file.c_str());
    corpus.push_back(ReadFile(file));
    RunOne(corpus.back(), artifact);
  }
  std::fprintf(stderr, "replay: %llu mutated inputs, seed %llu\n", static_cast<unsigned long long>(o.runs),
               static_cast<unsigned long long>(o.seed));
  Mutator mutator(corpus, o.seed, o.max_len);
  for (uint64_t i = 0; i < o.runs; ++i) RunOne(mutator.Next(), artifact);
  std::string name = std::filesystem::path(argv[0]).filename().string();
  std::printf("%s: %zu corpus inputs and %llu mutated inputs (seed %llu) ran without a crash; %llu in all\n",
              name.c_str(), corpus.size(), static_cast<unsigned long long>(o.runs),
              static_cast<unsigned long long>(o.seed), static_cast<unsigned long long>(corpus.size() + o.runs));
  return 0;
}
