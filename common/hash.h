// Hashing: SHA-256 (OpenSSL) for state digests, xxh64 (libxxhash) for shard checksums.
// Hasher objects are not thread-safe; the free functions are.
#ifndef SPOTRAIN_COMMON_HASH_H_
#define SPOTRAIN_COMMON_HASH_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/strings/string_view.h"

namespace spotrain::common {

// Incremental SHA-256. Feed bytes in order, then HexDigest() once.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void Update(const void* data, size_t size);
  // Lowercase hex of the 32-byte digest. The hasher cannot be updated afterwards.
  std::string HexDigest();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

std::string Sha256Hex(absl::string_view bytes);

// xxh64 of a buffer, and its 16-digit lowercase hex form.
uint64_t XxHash64(const void* data, size_t size, uint64_t seed = 0);
std::string Hex64(uint64_t value);

}  // namespace spotrain::common

#endif  // SPOTRAIN_COMMON_HASH_H_
