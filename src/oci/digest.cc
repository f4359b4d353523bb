#include "oci/digest.h"

#include <openssl/evp.h>

namespace regdisk::oci {

namespace {

size_t HexLength(std::string_view alg) {
  if (alg == "sha256") return 64;
  if (alg == "sha512") return 128;
  return 0;
}

bool IsLowerHex(std::string_view s) {
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

}  // namespace

Result<Digest> Digest::Parse(std::string_view text) {
  size_t colon = text.find(':');
  if (colon == std::string_view::npos || colon == 0) {
    return InvalidArgument("\"" + std::string(text) + "\" is not a digest; expected the form sha256:<64 hex digits>");
  }
  std::string_view alg = text.substr(0, colon);
  std::string_view hex = text.substr(colon + 1);
  size_t want = HexLength(alg);
  if (want == 0) {
    return Unimplemented("digest algorithm \"" + std::string(alg) +
                         "\" is not supported; use sha256 (or sha512)");
  }
  if (hex.size() != want || !IsLowerHex(hex)) {
    return InvalidArgument("\"" + std::string(text) + "\" is not a valid " + std::string(alg) + " digest; expected " +
                           std::to_string(want) + " lowercase hex digits");
  }
  return Digest(std::string(alg), std::string(hex));
}

Digest Digest::Sha256Of(std::string_view data) {
  Hasher h("sha256");
  h.Update(data);
  return h.Finish();
}

struct Hasher::Ctx {
  EVP_MD_CTX* md = nullptr;
  ~Ctx() { EVP_MD_CTX_free(md); }
};

Hasher::Hasher(std::string_view algorithm) : algorithm_(algorithm), ctx_(std::make_unique<Ctx>()) {
  ctx_->md = EVP_MD_CTX_new();
  const EVP_MD* md = algorithm_ == "sha512" ? EVP_sha512() : EVP_sha256();
  if (algorithm_ != "sha512") algorithm_ = "sha256";
  EVP_DigestInit_ex(ctx_->md, md, nullptr);
}

Hasher::~Hasher() = default;

void Hasher::Update(const void* data, size_t len) {
  EVP_DigestUpdate(ctx_->md, data, len);
  bytes_ += len;
}

Digest Hasher::Finish() {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx_->md, out, &len);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  hex.reserve(len * 2);
  for (unsigned int i = 0; i < len; ++i) {
    hex.push_back(kHex[out[i] >> 4]);
    hex.push_back(kHex[out[i] & 15]);
  }
  EVP_DigestInit_ex(ctx_->md, algorithm_ == "sha512" ? EVP_sha512() : EVP_sha256(), nullptr);
  bytes_ = 0;
  return Digest(algorithm_, std::move(hex));
}

Status CheckBlobGrowth(std::string_view what, uint64_t have, uint64_t adding, uint64_t declared) {
  if (have + adding <= declared) return OkStatus();
  return DataLoss(std::string(what) + " is larger than the " + std::to_string(declared) +
                  " bytes its descriptor declares");
}

Status VerifyBlob(std::string_view what, const Digest& expected, uint64_t declared, uint64_t got_size, const Digest& got) {
  if (got_size < declared) {
    return DataLoss(std::string(what) + " ended after " + std::to_string(got_size) + " of " + std::to_string(declared) +
                    " bytes");
  }
  RETURN_IF_ERROR(CheckBlobGrowth(what, got_size, 0, declared));
  if (got != expected) {
    return DataLoss(std::string(what) + " failed verification: expected " + expected.str() + ", got " + got.str());
  }
  return OkStatus();
}

}  // namespace regdisk::oci
