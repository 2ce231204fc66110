#include <climits>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/launch.h"
#include "worker/fixed_point.h"
#include "worker/fixed_point_cuda.h"

namespace spotrain::worker {
namespace {

constexpr int kThreads = 256;
constexpr unsigned long long kNoneBad = ULLONG_MAX;

unsigned int Blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 65535 * 16 ? blocks : 65535 * 16);
}

// worker/fixed_point.cc Convert(): |x| < 2^15 (NaN fails), d = x * 2^32 exact, truncate,
// round half away from zero on the exact fraction.
__device__ __forceinline__ bool Convert(float x, long long* out) {
  if (!(fabsf(x) < kFixedPointMaxAbs)) return false;
  const double d = static_cast<double>(x) * kFixedPointScale;
  const long long t = static_cast<long long>(d);
  const double frac = d - static_cast<double>(t);
  *out = t + (frac >= 0.5 ? 1 : 0) - (frac <= -0.5 ? 1 : 0);
  return true;
}

template <bool kAssign>
__global__ void DrainKernel(float* src, int64_t n, long long* acc, unsigned long long* first_bad) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    long long v;
    if (!Convert(src[i], &v)) {
      atomicMin(first_bad, static_cast<unsigned long long>(i));
      continue;
    }
    acc[i] = kAssign ? v : acc[i] + v;
    src[i] = 0.0f;
  }
}

__global__ void FromFixedPointKernel(const long long* acc, int64_t n, double scale, float* dst) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // __dmul_rn: one IEEE multiply, never fused with anything.
    dst[i] = __double2float_rn(__dmul_rn(static_cast<double>(acc[i]), scale));
  }
}

}  // namespace

absl::Status DrainToFixedPointCuda(cudaStream_t stream, float* src, int64_t n, int64_t* acc,
                                   bool assign, const FixedPointCudaScratch& scratch,
                                   int64_t* first_bad, float* bad_value) {
  *first_bad = -1;
  if (n <= 0) return absl::OkStatus();
  const unsigned long long none = kNoneBad;
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(scratch.first_bad, &none, sizeof(none), cudaMemcpyHostToDevice, stream));
  auto* acc_ll = reinterpret_cast<long long*>(acc);
  if (assign) {
    SPOTRAIN_LAUNCH(Blocks(n), kThreads, stream, DrainKernel<true>)
    (src, n, acc_ll, scratch.first_bad);
  } else {
    SPOTRAIN_LAUNCH(Blocks(n), kThreads, stream, DrainKernel<false>)
    (src, n, acc_ll, scratch.first_bad);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR();
  unsigned long long bad = kNoneBad;
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(&bad, scratch.first_bad, sizeof(bad), cudaMemcpyDeviceToHost, stream));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  if (bad == kNoneBad) return absl::OkStatus();
  CUDA_RETURN_IF_ERROR(
      cudaMemcpy(bad_value, src + bad, sizeof(*bad_value), cudaMemcpyDeviceToHost));
  *first_bad = static_cast<int64_t>(bad);
  return absl::OkStatus();
}

absl::Status FromFixedPointCuda(cudaStream_t stream, const int64_t* acc, int64_t n, double factor,
                                float* dst) {
  if (n <= 0) return absl::OkStatus();
  SPOTRAIN_LAUNCH(Blocks(n), kThreads, stream, FromFixedPointKernel)
  (reinterpret_cast<const long long*>(acc), n, factor / kFixedPointScale, dst);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace spotrain::worker
