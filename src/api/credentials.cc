#include "api/credentials.h"

#include <arpa/inet.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <memory>

#include "util/fs.h"

namespace regdisk::api {

namespace fs = std::filesystem;

namespace {

template <typename T, void (*F)(T*)>
struct Deleter {
  void operator()(T* p) const { F(p); }
};
using PkeyPtr = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY, EVP_PKEY_free>>;
using X509Ptr = std::unique_ptr<X509, Deleter<X509, X509_free>>;
using BioPtr = std::unique_ptr<BIO, Deleter<BIO, BIO_free_all>>;

Status OpenSslError(const std::string& what) { return Internal(what + " failed (OpenSSL)"); }

std::string BioText(BIO* bio) {
  char* data = nullptr;
  long n = BIO_get_mem_data(bio, &data);
  return std::string(data, static_cast<size_t>(n));
}

bool AddExtension(X509* cert, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, cert, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
  if (!ext) return false;
  bool ok = X509_add_ext(cert, ext, -1) == 1;
  X509_EXTENSION_free(ext);
  return ok;
}

bool NamesHost(X509* cert, const std::string& host) {
  if (host.empty() || host == "0.0.0.0") return true;
  return X509_check_ip_asc(cert, host.c_str(), 0) == 1;
}

// A self-signed certificate for the key, valid ten years.
Result<std::string> MakeCertificate(EVP_PKEY* key, const std::string& host) {
  X509Ptr cert(X509_new());
  if (!cert) return OpenSslError("X509_new");
  X509_set_version(cert.get(), 2);
  unsigned char serial[16];
  if (RAND_bytes(serial, sizeof serial) != 1) return OpenSslError("RAND_bytes");
  serial[0] &= 0x7f;
  BIGNUM* bn = BN_bin2bn(serial, sizeof serial, nullptr);
  BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert.get()));
  BN_free(bn);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 10L * 365 * 24 * 3600);
  X509_set_pubkey(cert.get(), key);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>("regdisk"), -1, -1, 0);
  X509_set_issuer_name(cert.get(), name);
  std::string san = "DNS:localhost,IP:127.0.0.1,IP:::1";
  if (!host.empty() && host != "0.0.0.0" && host != "127.0.0.1") san += ",IP:" + host;
  if (!AddExtension(cert.get(), NID_basic_constraints, "critical,CA:TRUE") ||
      !AddExtension(cert.get(), NID_key_usage, "critical,digitalSignature,keyCertSign") ||
      !AddExtension(cert.get(), NID_ext_key_usage, "serverAuth") ||
      !AddExtension(cert.get(), NID_subject_alt_name, san.c_str())) {
    return OpenSslError("adding the certificate's extensions");
  }
  if (X509_sign(cert.get(), key, EVP_sha256()) == 0) return OpenSslError("signing the certificate");
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509(bio.get(), cert.get()) != 1) return OpenSslError("PEM_write_bio_X509");
  return BioText(bio.get());
}

Result<std::string> MakeKey() {
  PkeyPtr key(EVP_EC_gen("P-256"));
  if (!key) return OpenSslError("generating an ECDSA P-256 key");
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_PrivateKey(bio.get(), key.get(), nullptr, nullptr, 0, nullptr, nullptr) != 1) {
    return OpenSslError("PEM_write_bio_PrivateKey");
  }
  return BioText(bio.get());
}

Result<PkeyPtr> ReadKey(const std::string& pem) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  PkeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (!key) return InvalidArgument("the API server's key is not a PEM private key");
  return key;
}

Result<X509Ptr> ReadCert(const std::string& pem) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  X509Ptr cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!cert) return InvalidArgument("the API server's certificate is not PEM");
  return cert;
}

Result<std::string> MakeToken() {
  unsigned char b[32];
  if (RAND_bytes(b, sizeof b) != 1) return OpenSslError("RAND_bytes");
  static const char kHex[] = "0123456789abcdef";
  std::string s;
  for (unsigned char c : b) {
    s += kHex[c >> 4];
    s += kHex[c & 15];
  }
  return s;
}

std::string Base64(const std::string& s) {
  std::string out(4 * ((s.size() + 2) / 3) + 1, '\0');
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()), reinterpret_cast<const unsigned char*>(s.data()),
                          static_cast<int>(s.size()));
  out.resize(static_cast<size_t>(n));
  return out;
}

// The file's text, or "" when it does not exist.
Result<std::string> ReadIfExists(const fs::path& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return std::string();
  return ReadFileCapped(path, 1 << 20);
}

}  // namespace

Result<Credentials> LoadOrCreateCredentials(const fs::path& dir, const std::string& host) {
  RETURN_IF_ERROR(MakeDirs(dir));
  if (chmod(dir.c_str(), 0700) != 0) return ErrnoStatus("chmod " + dir.string());
  Credentials c;
  ASSIGN_OR_RETURN(c.key_pem, ReadIfExists(dir / "tls.key"));
  ASSIGN_OR_RETURN(c.cert_pem, ReadIfExists(dir / "tls.crt"));
  ASSIGN_OR_RETURN(c.token, ReadIfExists(dir / "token"));
  while (!c.token.empty() && (c.token.back() == '\n' || c.token.back() == '\r')) c.token.pop_back();
  if (c.key_pem.empty()) {
    ASSIGN_OR_RETURN(c.key_pem, MakeKey());
    c.cert_pem.clear();
    RETURN_IF_ERROR(WriteFileAtomic(dir / "tls.key", c.key_pem, 0600));
  }
  ASSIGN_OR_RETURN(PkeyPtr key, ReadKey(c.key_pem));
  bool fresh_cert = c.cert_pem.empty();
  if (!fresh_cert) {
    ASSIGN_OR_RETURN(X509Ptr cert, ReadCert(c.cert_pem));
    fresh_cert = X509_check_private_key(cert.get(), key.get()) != 1 || !NamesHost(cert.get(), host);
  }
  if (fresh_cert) {
    ASSIGN_OR_RETURN(c.cert_pem, MakeCertificate(key.get(), host));
    RETURN_IF_ERROR(WriteFileAtomic(dir / "tls.crt", c.cert_pem, 0600));
  }
  if (c.token.empty()) {
    ASSIGN_OR_RETURN(c.token, MakeToken());
    RETURN_IF_ERROR(WriteFileAtomic(dir / "token", c.token + "\n", 0600));
  }
  return c;
}

Status WriteKubeconfig(const fs::path& path, const std::string& server_url, const Credentials& c) {
  std::string text =
      "apiVersion: v1\n"
      "kind: Config\n"
      "clusters:\n"
      "- name: regdisk\n"
      "  cluster:\n"
      "    server: " + server_url + "\n"
      "    certificate-authority-data: " + Base64(c.cert_pem) + "\n"
      "users:\n"
      "- name: regdisk\n"
      "  user:\n"
      "    token: " + c.token + "\n"
      "contexts:\n"
      "- name: regdisk\n"
      "  context:\n"
      "    cluster: regdisk\n"
      "    user: regdisk\n"
      "    namespace: default\n"
      "current-context: regdisk\n";
  return WriteFileAtomic(path, text, 0600);
}

bool BearerMatches(const std::string& authorization, const std::string& token) {
  static const std::string kPrefix = "Bearer ";
  if (token.empty() || authorization.size() != kPrefix.size() + token.size()) return false;
  if (authorization.compare(0, kPrefix.size(), kPrefix) != 0) return false;
  return CRYPTO_memcmp(authorization.data() + kPrefix.size(), token.data(), token.size()) == 0;
}

}  // namespace regdisk::api
