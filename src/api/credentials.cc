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

#include <functional>
#include <memory>

#include "util/fs.h"
#include "util/text.h"

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

bool NamesHost(X509* cert, const std::string& host) {
  if (host.empty() || host == "0.0.0.0") return true;
  return X509_check_ip_asc(cert, host.c_str(), 0) == 1;
}

enum class CertKind { kCa, kServer, kClient };

// A certificate for `key`, valid ten years: the CA's own (self-signed), or
// the server's or the client's, signed by the CA.
Result<std::string> MakeCertificate(EVP_PKEY* key, CertKind kind, const std::string& host, X509* ca_cert,
                                    EVP_PKEY* ca_key) {
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
  const char* cn = kind == CertKind::kCa ? "regdisk-ca" : kind == CertKind::kServer ? "regdisk" : "regdisk-admin";
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn), -1, -1, 0);
  X509* issuer = kind == CertKind::kCa ? cert.get() : ca_cert;
  EVP_PKEY* signer = kind == CertKind::kCa ? key : ca_key;
  X509_set_issuer_name(cert.get(), X509_get_subject_name(issuer));
  bool ok = true;
  auto add = [&](int nid, const std::string& value) {
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, issuer, cert.get(), nullptr, nullptr, 0);
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
    ok = ok && ext && X509_add_ext(cert.get(), ext, -1) == 1;
    X509_EXTENSION_free(ext);
  };
  add(NID_subject_key_identifier, "hash");
  if (kind == CertKind::kCa) {
    add(NID_basic_constraints, "critical,CA:TRUE,pathlen:0");
    add(NID_key_usage, "critical,keyCertSign,cRLSign");
  } else {
    add(NID_authority_key_identifier, "keyid:always");
    add(NID_basic_constraints, "critical,CA:FALSE");
    add(NID_key_usage, "critical,digitalSignature");
  }
  if (kind == CertKind::kServer) {
    std::string san = "DNS:localhost,IP:127.0.0.1,IP:::1";
    if (!host.empty() && host != "0.0.0.0" && host != "127.0.0.1") san += ",IP:" + host;
    add(NID_ext_key_usage, "serverAuth");
    add(NID_subject_alt_name, san);
  } else if (kind == CertKind::kClient) {
    add(NID_ext_key_usage, "clientAuth");
  }
  if (!ok) return OpenSslError("adding the certificate's extensions");
  if (X509_sign(cert.get(), signer, EVP_sha256()) == 0) return OpenSslError("signing the certificate");
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

Result<PkeyPtr> ReadKey(const std::string& pem, const fs::path& file) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  PkeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (!key) return InvalidArgument(file.string() + " is not a PEM private key; remove it and restart to make a new one");
  return key;
}

// The certificate, or null when the text is not one.
X509Ptr ReadCert(const std::string& pem) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  return X509Ptr(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
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


// One key and its certificate under `dir` (NAME.key, NAME.crt): the key
// kept (made when missing), the certificate kept while `still_good` says
// so, otherwise issued anew by `issue`.
struct KeyPair {
  std::string key_pem, cert_pem;
  PkeyPtr key;
  X509Ptr cert;
  bool fresh_cert = false;
};

Result<KeyPair> LoadOrIssue(const fs::path& dir, const std::string& name,
                            const std::function<bool(X509*, EVP_PKEY*)>& still_good,
                            const std::function<Result<std::string>(EVP_PKEY*)>& issue) {
  KeyPair p;
  const fs::path key_file = dir / (name + ".key"), cert_file = dir / (name + ".crt");
  ASSIGN_OR_RETURN(p.key_pem, ReadIfExists(key_file));
  ASSIGN_OR_RETURN(p.cert_pem, ReadIfExists(cert_file));
  if (p.key_pem.empty()) {
    ASSIGN_OR_RETURN(p.key_pem, MakeKey());
    p.cert_pem.clear();
    RETURN_IF_ERROR(WriteFileAtomic(key_file, p.key_pem, 0600));
  }
  ASSIGN_OR_RETURN(p.key, ReadKey(p.key_pem, key_file));
  if (!p.cert_pem.empty()) p.cert = ReadCert(p.cert_pem);
  if (!p.cert || X509_check_private_key(p.cert.get(), p.key.get()) != 1 || !still_good(p.cert.get(), p.key.get())) {
    ASSIGN_OR_RETURN(p.cert_pem, issue(p.key.get()));
    p.cert = ReadCert(p.cert_pem);
    if (!p.cert) return Internal("reading back a certificate just made failed (OpenSSL)");
    p.fresh_cert = true;
    RETURN_IF_ERROR(WriteFileAtomic(cert_file, p.cert_pem, 0600));
  }
  return p;
}

}  // namespace

Result<AuthMode> ParseAuthMode(const std::string& word) {
  if (word == "token") return AuthMode::kToken;
  if (word == "cert") return AuthMode::kClientCert;
  return InvalidArgument("--auth takes token or cert, not " + Printable(word, 40));
}

Result<Credentials> LoadOrCreateCredentials(const fs::path& dir, const std::string& host) {
  RETURN_IF_ERROR(MakeDirs(dir));
  if (chmod(dir.c_str(), 0700) != 0) return ErrnoStatus("chmod " + dir.string());
  auto always = [](X509*, EVP_PKEY*) { return true; };
  ASSIGN_OR_RETURN(KeyPair ca, LoadOrIssue(dir, "ca", always, [](EVP_PKEY* key) {
                     return MakeCertificate(key, CertKind::kCa, "", nullptr, nullptr);
                   }));
  // Issued by this CA (its signature checks out with the CA's key).
  auto signed_by_ca = [&ca](X509* cert) {
    return !ca.fresh_cert && X509_check_issued(ca.cert.get(), cert) == X509_V_OK &&
           X509_verify(cert, ca.key.get()) == 1;
  };
  ASSIGN_OR_RETURN(KeyPair server,
                   LoadOrIssue(
                       dir, "tls", [&](X509* cert, EVP_PKEY*) { return signed_by_ca(cert) && NamesHost(cert, host); },
                       [&](EVP_PKEY* key) {
                         return MakeCertificate(key, CertKind::kServer, host, ca.cert.get(), ca.key.get());
                       }));
  ASSIGN_OR_RETURN(KeyPair client, LoadOrIssue(
                                       dir, "client", [&](X509* cert, EVP_PKEY*) { return signed_by_ca(cert); },
                                       [&](EVP_PKEY* key) {
                                         return MakeCertificate(key, CertKind::kClient, "", ca.cert.get(), ca.key.get());
                                       }));
  Credentials c;
  c.ca_cert_pem = std::move(ca.cert_pem);
  c.cert_pem = std::move(server.cert_pem);
  c.key_pem = std::move(server.key_pem);
  c.client_cert_pem = std::move(client.cert_pem);
  c.client_key_pem = std::move(client.key_pem);
  ASSIGN_OR_RETURN(c.token, ReadIfExists(dir / "token"));
  while (!c.token.empty() && (c.token.back() == '\n' || c.token.back() == '\r')) c.token.pop_back();
  if (c.token.empty()) {
    ASSIGN_OR_RETURN(c.token, MakeToken());
    RETURN_IF_ERROR(WriteFileAtomic(dir / "token", c.token + "\n", 0600));
  }
  return c;
}

Status WriteKubeconfig(const fs::path& path, const std::string& server_url, const Credentials& c, AuthMode mode) {
  const std::string user = mode == AuthMode::kToken
                               ? "    token: " + c.token + "\n"
                               : "    client-certificate-data: " + Base64(c.client_cert_pem) + "\n" +
                                     "    client-key-data: " + Base64(c.client_key_pem) + "\n";
  std::string text =
      "apiVersion: v1\n"
      "kind: Config\n"
      "clusters:\n"
      "- name: regdisk\n"
      "  cluster:\n"
      "    server: " + server_url + "\n"
      "    certificate-authority-data: " + Base64(c.ca_cert_pem) + "\n"
      "users:\n"
      "- name: regdisk\n"
      "  user:\n" + user +
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
