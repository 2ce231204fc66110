// The GPU's deterministic gradient accumulation (worker/fixed_point_cuda.h) against the CPU's
// (worker/fixed_point.h): the same accumulators and the same floats, bit for bit, including
// the rounding of exact halves, signed zeros, the range limit and the first bad element's
// index. Labelled `gpu`; also runs on the CPU emulator (emulated.*).
#include "worker/fixed_point_cuda.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tests/gpu/gpu_test_util.h"
#include "worker/fixed_point.h"

namespace spotrain::worker {
namespace {

using testing_gpu::BitIdentical;
using testing_gpu::DeviceBuffer;

class FixedPointCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SPOTRAIN_SKIP_WITHOUT_GPU();
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&scratch_.first_bad, sizeof(unsigned long long)), cudaSuccess);
  }
  void TearDown() override {
    if (scratch_.first_bad != nullptr) cudaFree(scratch_.first_bad);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  cudaStream_t stream_ = nullptr;
  FixedPointCudaScratch scratch_;
};

// Values that exercise every branch of the conversion: exact halves of 2^-32 (rounded away
// from zero), just below and above them, signed zeros, the largest values in range, tiny and
// subnormal values, then ordinary gradients.
std::vector<float> EdgeAndRandomValues(int64_t n, uint32_t seed) {
  const float half_ulp = std::ldexp(1.0f, -33);  // 0.5 * 2^-32
  std::vector<float> v = {0.0f,
                          -0.0f,
                          half_ulp,
                          -half_ulp,
                          3 * half_ulp,
                          -3 * half_ulp,
                          std::nextafter(half_ulp, 0.0f),
                          std::nextafter(half_ulp, 1.0f),
                          std::nextafter(kFixedPointMaxAbs, 0.0f),
                          -std::nextafter(kFixedPointMaxAbs, 0.0f),
                          std::numeric_limits<float>::denorm_min(),
                          std::numeric_limits<float>::min(),
                          1.0f,
                          -1.5f,
                          12345.678f};
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1e-2f);
  std::uniform_real_distribution<float> wide(-1000.0f, 1000.0f);
  while (static_cast<int64_t>(v.size()) < n)
    v.push_back(v.size() % 7 == 0 ? wide(rng) : normal(rng));
  v.resize(n);
  return v;
}

TEST_F(FixedPointCudaTest, DrainAndConvertBackMatchTheCpuBitForBit) {
  const int64_t n = 70001;  // not a multiple of the block size
  const std::vector<float> first = EdgeAndRandomValues(n, 1);
  const std::vector<float> second = EdgeAndRandomValues(n, 2);

  // CPU: assign the first micro-batch, accumulate the second, average.
  std::vector<int64_t> acc_cpu(n);
  std::vector<float> src = first;
  ASSERT_TRUE(DrainToFixedPoint(src.data(), n, acc_cpu.data(), /*assign=*/true).ok());
  src = second;
  ASSERT_TRUE(DrainToFixedPoint(src.data(), n, acc_cpu.data(), /*assign=*/false).ok());

  // GPU: the same, on stale accumulator contents (assign must not read them).
  DeviceBuffer<float> d_src(first);
  DeviceBuffer<int64_t> d_acc(n);
  d_acc.FillBytes(0x5A);
  int64_t first_bad = 0;
  float bad_value = 0;
  ASSERT_TRUE(DrainToFixedPointCuda(stream_, d_src.get(), n, d_acc.get(), /*assign=*/true, scratch_,
                                    &first_bad, &bad_value)
                  .ok());
  EXPECT_EQ(first_bad, -1);
  for (float x : d_src.Download()) ASSERT_EQ(x, 0.0f) << "the source is zeroed once read";
  d_src.Upload(second);
  ASSERT_TRUE(DrainToFixedPointCuda(stream_, d_src.get(), n, d_acc.get(), /*assign=*/false,
                                    scratch_, &first_bad, &bad_value)
                  .ok());
  EXPECT_EQ(first_bad, -1);
  EXPECT_EQ(d_acc.Download(), acc_cpu);

  // Back to floats, with factors whose product is inexact (1/3, 1/6) as well as 0.5: the
  // double multiply and its one rounding must be the CPU's.
  for (const double factor : {0.5, 1.0 / 3.0, 1.0 / 6.0}) {
    SCOPED_TRACE(factor);
    std::vector<float> mean_cpu(n);
    FromFixedPoint(acc_cpu.data(), n, factor, mean_cpu.data());
    DeviceBuffer<float> d_mean(n);
    d_mean.FillBytes(0xFF);
    ASSERT_TRUE(FromFixedPointCuda(stream_, d_acc.get(), n, factor, d_mean.get()).ok());
    ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    EXPECT_TRUE(BitIdentical(d_mean.Download(), mean_cpu));
  }
}

TEST_F(FixedPointCudaTest, ReportsTheFirstElementOutOfRange) {
  const int64_t n = 5000;
  for (const float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
        -kFixedPointMaxAbs, kFixedPointMaxAbs * 2}) {
    SCOPED_TRACE(bad);
    std::vector<float> values = EdgeAndRandomValues(n, 3);
    // The first one is reported, whatever thread or block sees which: two in one block of 256
    // threads and one far after.
    values[4321] = bad;
    values[800] = bad;
    values[777] = bad;
    std::vector<int64_t> acc_cpu(n);
    std::vector<float> src = values;
    const absl::Status cpu = DrainToFixedPoint(src.data(), n, acc_cpu.data(), true);
    ASSERT_TRUE(absl::IsOutOfRange(cpu)) << cpu;

    DeviceBuffer<float> d_src(values);
    DeviceBuffer<int64_t> d_acc(n);
    int64_t first_bad = -1;
    float bad_value = 0;
    ASSERT_TRUE(DrainToFixedPointCuda(stream_, d_src.get(), n, d_acc.get(), true, scratch_,
                                      &first_bad, &bad_value)
                    .ok());
    EXPECT_EQ(first_bad, 777);
    EXPECT_TRUE(BitIdentical(std::vector<float>{bad_value}, std::vector<float>{bad}));
    // The same error text as the CPU's.
    EXPECT_EQ(FixedPointRangeError(first_bad, bad_value), cpu);
    // The bad elements are left as they were.
    const std::vector<float> after = d_src.Download();
    EXPECT_TRUE(BitIdentical(std::vector<float>{after[777], after[800], after[4321]},
                             std::vector<float>{bad, bad, bad}));

    // Accumulating (assign = false) reports the same element.
    first_bad = -1;
    ASSERT_TRUE(DrainToFixedPointCuda(stream_, d_src.get(), n, d_acc.get(), false, scratch_,
                                      &first_bad, &bad_value)
                    .ok());
    EXPECT_EQ(first_bad, 777);
  }
}

}  // namespace
}  // namespace spotrain::worker
