// Content digests ("sha256:<64 hex>") and a streaming hasher.
//
//   ASSIGN_OR_RETURN(Digest d, Digest::Parse("sha256:..."));
//   Hasher h(d.algorithm());
//   h.Update(chunk); ...
//   if (h.Finish() != d) ...
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "util/status.h"

namespace regdisk::oci {

// Supported: sha256 (the default everywhere) and sha512.
class Digest {
 public:
  Digest() = default;
  // Validates algorithm and encoding: lowercase hex of the right length.
  static Result<Digest> Parse(std::string_view text);
  static Digest Sha256Of(std::string_view data);

  const std::string& algorithm() const { return algorithm_; }
  const std::string& hex() const { return hex_; }
  std::string str() const { return algorithm_ + ":" + hex_; }
  bool empty() const { return hex_.empty(); }
  // A short form for messages: "sha256:0123456789ab".
  std::string Short() const { return algorithm_ + ":" + hex_.substr(0, 12); }

  friend bool operator==(const Digest&, const Digest&) = default;
  friend auto operator<=>(const Digest&, const Digest&) = default;

 private:
  Digest(std::string alg, std::string hex) : algorithm_(std::move(alg)), hex_(std::move(hex)) {}
  std::string algorithm_;
  std::string hex_;
  friend class Hasher;
};

// Incremental digest computation (OpenSSL EVP).
class Hasher {
 public:
  explicit Hasher(std::string_view algorithm = "sha256");
  ~Hasher();
  Hasher(const Hasher&) = delete;
  Hasher& operator=(const Hasher&) = delete;

  void Update(const void* data, size_t len);
  void Update(std::string_view data) { Update(data.data(), data.size()); }
  uint64_t bytes() const { return bytes_; }
  // Finishes and returns the digest; the hasher is reset for reuse.
  Digest Finish();

 private:
  std::string algorithm_;
  struct Ctx;
  std::unique_ptr<Ctx> ctx_;
  uint64_t bytes_ = 0;
};

// The one check that a blob is what its descriptor says; every failure is
// DataLoss. `what` names the blob in messages ("blob sha256:ab… from HOST").
//
// While streaming: refuses `adding` more bytes once `have` were received
// and the descriptor declares `declared`.
Status CheckBlobGrowth(std::string_view what, uint64_t have, uint64_t adding, uint64_t declared);
// At the end: the size and the digest.
Status VerifyBlob(std::string_view what, const Digest& expected, uint64_t declared, uint64_t got_size, const Digest& got);

}  // namespace regdisk::oci
