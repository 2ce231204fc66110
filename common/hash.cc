#include "common/hash.h"

#include <openssl/evp.h>
#include <xxhash.h>

#include "absl/strings/str_format.h"
#include "common/check.h"

namespace spotrain::common {

struct Sha256::Impl {
  EVP_MD_CTX* ctx = nullptr;
};

Sha256::Sha256() : impl_(std::make_unique<Impl>()) {
  impl_->ctx = EVP_MD_CTX_new();
  SPOTRAIN_CHECK(impl_->ctx != nullptr);
  SPOTRAIN_CHECK(EVP_DigestInit_ex(impl_->ctx, EVP_sha256(), nullptr) == 1);
}

Sha256::~Sha256() { EVP_MD_CTX_free(impl_->ctx); }

void Sha256::Update(const void* data, size_t size) {
  SPOTRAIN_CHECK(EVP_DigestUpdate(impl_->ctx, data, size) == 1);
}

std::string Sha256::HexDigest() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  SPOTRAIN_CHECK(EVP_DigestFinal_ex(impl_->ctx, digest, &len) == 1);
  std::string hex;
  hex.reserve(2 * len);
  for (unsigned int i = 0; i < len; ++i) absl::StrAppendFormat(&hex, "%02x", digest[i]);
  return hex;
}

std::string Sha256Hex(absl::string_view bytes) {
  Sha256 h;
  h.Update(bytes.data(), bytes.size());
  return h.HexDigest();
}

uint64_t XxHash64(const void* data, size_t size, uint64_t seed) { return XXH64(data, size, seed); }

std::string Hex64(uint64_t value) { return absl::StrFormat("%016x", value); }

}  // namespace spotrain::common
