// The part of cub's DeviceRadixSort that kernels/cuda/ops.cu uses, for the CPU emulator
// (tests/emulation/cuda_emulation.h): a stable sort of (key, value) pairs by the key bits
// [begin_bit, end_bit), signed keys with their sign bit flipped first, as cub's radix sort
// orders them. Host memory, synchronous. A query (temp == nullptr) asks for as much as cub
// may (a copy of keys and values plus 4 KiB), and a sort given less fails, so that a caller's
// scratch too small for the real cub fails here too.
#ifndef SPOTRAIN_TESTS_EMULATION_CUB_DEVICE_RADIX_SORT_H_
#define SPOTRAIN_TESTS_EMULATION_CUB_DEVICE_RADIX_SORT_H_

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

namespace cub {

struct DeviceRadixSort {
  template <typename Key, typename Value, typename NumItems>
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const Key* keys_in, Key* keys_out,
                               const Value* values_in, Value* values_out, NumItems num_items,
                               int begin_bit = 0, int end_bit = sizeof(Key) * 8,
                               cudaStream_t /*stream*/ = 0) {
    static_assert(std::is_integral_v<Key> && sizeof(Key) <= 8, "integer keys only");
    const size_t need =
        static_cast<size_t>(num_items) * (sizeof(Key) + sizeof(Value)) + size_t{4096};
    if (temp == nullptr) {
      temp_bytes = need;
      return cudaSuccess;
    }
    if (temp_bytes < need) return cudaErrorInvalidValue;
    using Bits = std::make_unsigned_t<Key>;
    const int width = end_bit - begin_bit;
    const uint64_t mask = width >= 64 ? ~uint64_t{0} : (uint64_t{1} << width) - 1;
    auto digit = [&](Key key) {
      Bits bits = static_cast<Bits>(key);
      if constexpr (std::is_signed_v<Key>) bits ^= Bits{1} << (sizeof(Key) * 8 - 1);
      return (static_cast<uint64_t>(bits) >> begin_bit) & mask;
    };
    const size_t n = static_cast<size_t>(num_items);
    std::vector<size_t> order(n);
    std::iota(order.begin(), order.end(), size_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return digit(keys_in[a]) < digit(keys_in[b]); });
    std::vector<Key> keys(n);
    std::vector<Value> values(n);
    for (size_t i = 0; i < n; ++i) {
      keys[i] = keys_in[order[i]];
      values[i] = values_in[order[i]];
    }
    std::copy(keys.begin(), keys.end(), keys_out);
    std::copy(values.begin(), values.end(), values_out);
    return cudaSuccess;
  }
};

}  // namespace cub

#endif  // SPOTRAIN_TESTS_EMULATION_CUB_DEVICE_RADIX_SORT_H_
