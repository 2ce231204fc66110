// Helpers shared by the GPU tests: skipping without a usable GPU, device buffers, random
// inputs, bf16 rounding on the host, and element-wise comparison with atol + |ref| * rtol.
// Test-only code; each helper is used from the test's main thread.
#ifndef SPOTRAIN_TESTS_GPU_GPU_TEST_UTIL_H_
#define SPOTRAIN_TESTS_GPU_GPU_TEST_UTIL_H_

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/context.h"

namespace spotrain::testing_gpu {

// Why GPU tests cannot run here, or "" when a CUDA device is usable.
inline std::string GpuUnavailableReason() {
  auto count = kernels::cuda::CudaDeviceCount();
  if (!count.ok()) return "no usable CUDA driver/GPU: " + std::string(count.status().message());
  if (*count == 0) return "no CUDA device visible";
  return "";
}

// In a test body or SetUp: skips the test (reported as SKIPPED) without a GPU.
#define SPOTRAIN_SKIP_WITHOUT_GPU()                                                       \
  do {                                                                                    \
    const std::string spotrain_reason_ = ::spotrain::testing_gpu::GpuUnavailableReason(); \
    if (!spotrain_reason_.empty()) GTEST_SKIP() << spotrain_reason_;                      \
  } while (0)

// A device array of n elements of X; freed on destruction. Errors fail the test.
template <typename X>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) {
    EXPECT_EQ(cudaMalloc(&ptr_, std::max<size_t>(1, n) * sizeof(X)), cudaSuccess);
  }
  explicit DeviceBuffer(const std::vector<X>& host) : DeviceBuffer(host.size()) { Upload(host); }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  X* get() const { return static_cast<X*>(ptr_); }
  size_t size() const { return n_; }
  void Upload(const std::vector<X>& host) {
    ASSERT_EQ(host.size(), n_);
    ASSERT_EQ(cudaMemcpy(ptr_, host.data(), n_ * sizeof(X), cudaMemcpyHostToDevice), cudaSuccess);
    // The kernels run on a non-blocking stream, which does not wait for the legacy stream:
    // finish the copy before anything is launched.
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  }
  void Zero() {
    ASSERT_EQ(cudaMemset(ptr_, 0, n_ * sizeof(X)), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  }
  // Waits for all device work first (cudaMemcpy synchronises with the legacy stream only).
  std::vector<X> Download() const {
    std::vector<X> host(n_);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(host.data(), ptr_, n_ * sizeof(X), cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  }

 private:
  void* ptr_ = nullptr;
  size_t n_;
};

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

}  // namespace spotrain::testing_gpu

#endif  // SPOTRAIN_TESTS_GPU_GPU_TEST_UTIL_H_
