// Helpers shared by the GPU tests: skipping without a usable GPU and device buffers; random
// inputs, bf16 rounding and comparison come from tests/support/host_arrays.h.
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
#include "tests/support/host_arrays.h"

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

// In a test body: skips a test the CPU emulator of the CUDA code (tests/emulation/) would take
// too long over (it runs the same binaries' code on the host, a few GFLOP/s), saying why. No
// effect in a real GPU build.
#if defined(SPOTRAIN_CUDA_EMULATION)
#define SPOTRAIN_SKIP_UNDER_EMULATION(why) \
  GTEST_SKIP() << "too large for the CPU emulator of the CUDA code: " << why
#else
#define SPOTRAIN_SKIP_UNDER_EMULATION(why) \
  do {                                     \
  } while (0)
#endif

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
  void Zero() { FillBytes(0); }
  // Every byte set to `byte`; 0xFF makes every fp32 and bf16 element a NaN, so that an
  // element a kernel should have written, or read only after writing, shows.
  void FillBytes(int byte) {
    ASSERT_EQ(cudaMemset(ptr_, byte, n_ * sizeof(X)), cudaSuccess);
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

using ::spotrain::testing_arrays::Bf16BitsToFloat;
using ::spotrain::testing_arrays::BitIdentical;
using ::spotrain::testing_arrays::ExpectAllClose;
using ::spotrain::testing_arrays::FloatToBf16Bits;
using ::spotrain::testing_arrays::FromBf16Bits;
using ::spotrain::testing_arrays::RandomTokens;
using ::spotrain::testing_arrays::RandomVector;
using ::spotrain::testing_arrays::RelativeL2;
using ::spotrain::testing_arrays::RoundToBf16;
using ::spotrain::testing_arrays::ToBf16Bits;

}  // namespace spotrain::testing_gpu

#endif  // SPOTRAIN_TESTS_GPU_GPU_TEST_UTIL_H_
