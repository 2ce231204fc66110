// Host arrays for kernel tests: seeded random inputs, bf16 rounding, and element-wise
// comparison with atol + |ref| * rtol. Needs no CUDA, so that the tests of pure kernel
// arithmetic (tests/unit/kernels/) and the GPU tests (tests/gpu/) share it. Test-only code;
// each helper is used from the test's main thread.
#ifndef SPOTRAIN_TESTS_SUPPORT_HOST_ARRAYS_H_
#define SPOTRAIN_TESTS_SUPPORT_HOST_ARRAYS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace spotrain::testing_arrays {

// Uniform in [-scale, scale], never exactly zero in practice; fixed seed: deterministic.
inline std::vector<float> RandomVector(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

inline std::vector<int32_t> RandomTokens(size_t n, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, vocab - 1);
  std::vector<int32_t> v(n);
  for (int32_t& x : v) x = dist(rng);
  return v;
}

// bf16 as its 16 raw bits (the upper half of the fp32 pattern), round to nearest even.
inline uint16_t FloatToBf16Bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float Bf16BitsToFloat(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
inline std::vector<float> RoundToBf16(std::vector<float> v) {
  for (float& x : v) x = Bf16BitsToFloat(FloatToBf16Bits(x));
  return v;
}
inline std::vector<uint16_t> ToBf16Bits(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = FloatToBf16Bits(v[i]);
  return out;
}
inline std::vector<float> FromBf16Bits(const std::vector<uint16_t>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Bf16BitsToFloat(v[i]);
  return out;
}

// Expects |got - want| <= atol + |want| * rtol everywhere; reports the count of violations,
// the worst one, and the largest absolute error.
inline void ExpectAllClose(const std::string& what, const std::vector<float>& got,
                           const std::vector<float>& want, float atol, float rtol) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0, worst = 0;
  double worst_excess = 0, max_abs = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    const double tol = atol + std::fabs(static_cast<double>(want[i])) * rtol;
    max_abs = std::max(max_abs, err);
    if (!(err <= tol)) {  // also catches NaN
      ++bad;
      if (err - tol > worst_excess || bad == 1) {
        worst_excess = err - tol;
        worst = i;
      }
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size()
                     << " elements outside atol=" << atol << " rtol=" << rtol << "; worst at "
                     << worst << ": got " << (bad ? got[worst] : 0.f) << " want "
                     << (bad ? want[worst] : 0.f) << "; max abs error " << max_abs;
}

// Relative L2 error ||got - want|| / ||want||.
inline double RelativeL2(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    num += d * d;
    den += static_cast<double>(want[i]) * want[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

inline bool BitIdentical(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace spotrain::testing_arrays

#endif  // SPOTRAIN_TESTS_SUPPORT_HOST_ARRAYS_H_
