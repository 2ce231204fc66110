// CUDA kernels of the GPT-2 decoder; see ops.cuh for the contract. Matrix products go to
// cuBLAS; everything else is a small kernel here. No kernel uses atomics: reductions either
// give each output element to one thread that sums in a fixed order, or write partial sums
// of fixed row ranges that a second kernel adds up in a fixed order.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <initializer_list>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/gemm_plan.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/ops.cuh"

namespace spotrain::kernels::cuda {
namespace {

constexpr int kWarp = 32;
constexpr float kLayerNormEps = 1e-5f;

// ---- fp32 <-> activation type --------------------------------------------------------------

__device__ __forceinline__ float Load(float x) { return x; }
__device__ __forceinline__ float Load(bf16 x) { return __bfloat162float(x); }

template <typename Act>
__device__ __forceinline__ Act Store(float x);
template <>
__device__ __forceinline__ float Store<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ bf16 Store<bf16>(float x) {
  return __float2bfloat16_rn(x);
}

// 16-byte packs of activations (8 bf16 or 4 floats), converted to / from fp32 registers. The
// row kernels below use them when a row is a whole number of warp-wide packs, so that every
// element is loaded once, with 16-byte loads (the one-element-per-lane loops move 2-4 bytes
// per lane per load and re-read the row for a second pass).
template <typename Act>
struct Pack {
  static constexpr int kN = 16 / static_cast<int>(sizeof(Act));
};
template <typename Act>
__device__ __forceinline__ void LoadPack(const Act* p, float* out) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const Act* a = reinterpret_cast<const Act*>(&raw);
#pragma unroll
  for (int k = 0; k < Pack<Act>::kN; ++k) out[k] = Load(a[k]);
}
template <typename Act>
__device__ __forceinline__ void StorePack(Act* p, const float* in) {
  uint4 raw;
  Act* a = reinterpret_cast<Act*>(&raw);
#pragma unroll
  for (int k = 0; k < Pack<Act>::kN; ++k) a[k] = Store<Act>(in[k]);
  *reinterpret_cast<uint4*>(p) = raw;
}
// At most this many warp-wide packs per row in the packed row kernels (registers): rows of up
// to 8 x 32 x 8 = 2048 bf16 or 1024 floats.
constexpr int kMaxRowPacks = 8;
template <typename Act>
constexpr int RowPackWidth() {
  return kWarp * Pack<Act>::kN;
}
// Calls launch(std::integral_constant<int, P>) with P = packs, 1 <= packs <= kMaxRowPacks
// (any other value launches kMaxRowPacks: callers check PackedRow first).
template <typename Launch, int... P>
void WithRowPacksIn(int packs, Launch& launch, std::integer_sequence<int, P...>) {
  const bool launched =
      ((packs == P + 1 ? (launch(std::integral_constant<int, P + 1>()), true) : false) || ...);
  if (!launched) launch(std::integral_constant<int, kMaxRowPacks>());
}
template <typename Launch>
void WithRowPacks(int packs, Launch&& launch) {
  WithRowPacksIn(packs, launch, std::make_integer_sequence<int, kMaxRowPacks>());
}
// Whether a row of `n` elements takes the packed path: whole packs, at most kMaxRowPacks.
template <typename Act>
bool PackedRow(int64_t n) {
  return n % RowPackWidth<Act>() == 0 && n / RowPackWidth<Act>() <= kMaxRowPacks;
}

template <typename X>
struct CudaType;
template <>
struct CudaType<float> {
  static constexpr cudaDataType_t kValue = CUDA_R_32F;
};
template <>
struct CudaType<bf16> {
  static constexpr cudaDataType_t kValue = CUDA_R_16BF;
};

// ---- reductions --------------------------------------------------------------------------
// xor-butterfly sums leave the same bits in every lane (IEEE addition is commutative), so
// every lane may use the result.

template <typename X>
__device__ __forceinline__ X WarpSum(X v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
// `shared` holds 32 values. Fixed order: warps, then warp totals in warp order.
template <typename X>
__device__ X BlockSum(X v, X* shared) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  v = WarpSum(v);
  __syncthreads();  // `shared` may still be read from a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  X total = lane < warps ? shared[lane] : X(0);
  return WarpSum(total);
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for an element-wise grid-stride kernel over n elements.
unsigned int ElementwiseBlocks(int64_t n, int threads) {
  const int64_t blocks = CeilDiv(n, threads);
  return static_cast<unsigned int>(blocks < 65536 * 16 ? (blocks < 1 ? 1 : blocks) : 65536 * 16);
}

absl::Status CheckPositive(const char* op, std::initializer_list<int64_t> dims) {
  for (int64_t d : dims) {
    if (d <= 0) {
      return absl::InvalidArgumentError(absl::StrFormat("%s: dimensions must be positive", op));
    }
  }
  return absl::OkStatus();
}

// Carves aligned pieces out of the context's scratch memory.
class ScratchArena {
 public:
  explicit ScratchArena(CudaContext& ctx)
      : base_(static_cast<char*>(ctx.scratch())), size_(ctx.scratch_bytes()) {}
  template <typename X>
  absl::Status Take(const char* op, int64_t count, X** out) {
    const size_t bytes = static_cast<size_t>(count) * sizeof(X);
    const size_t aligned = (used_ + 255) / 256 * 256;
    if (aligned + bytes > size_) {
      return absl::ResourceExhaustedError(
          absl::StrFormat("%s needs %d bytes of CUDA scratch memory, the context has %d (raise "
                          "CudaContextOptions.scratch_bytes)",
                          op, aligned + bytes, size_));
    }
    *out = reinterpret_cast<X*>(base_ + aligned);
    used_ = aligned + bytes;
    return absl::OkStatus();
  }

 private:
  char* base_;
  size_t size_;
  size_t used_ = 0;
};

// ---- column reductions (bias and LayerNorm weight gradients) -------------------------------
// out0[c] += sum_n f(n, c).x and, when out1 is set, out1[c] += sum_n f(n, c).y. Pass 1: block
// (column tile of 32, row chunk) -> one partial per column and chunk, rows summed in a fixed
// strided order and the 8 row lanes in order. Pass 2: partials summed in chunk order.

constexpr int kColTile = 32;
constexpr int kColRows = 8;
constexpr int kMaxChunks = 128;
constexpr int kRowsPerChunkMin = 64;

template <typename F>
__global__ void ColumnPartialKernel(F f, float2* partial, int N, int cols, int rows_per_chunk) {
  __shared__ float2 tile[kColRows][kColTile + 1];
  const int c = blockIdx.x * kColTile + threadIdx.x;
  const int chunk = blockIdx.y;
  const int row_begin = chunk * rows_per_chunk;
  const int row_end = min(N, row_begin + rows_per_chunk);
  float2 acc = make_float2(0.f, 0.f);
  if (c < cols) {
    for (int n = row_begin + threadIdx.y; n < row_end; n += kColRows) {
      const float2 v = f(n, c);
      acc.x += v.x;
      acc.y += v.y;
    }
  }
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float2 sum = tile[0][threadIdx.x];
    for (int r = 1; r < kColRows; ++r) {
      sum.x += tile[r][threadIdx.x].x;
      sum.y += tile[r][threadIdx.x].y;
    }
    partial[static_cast<int64_t>(chunk) * cols + c] = sum;
  }
}

__global__ void ColumnFinishKernel(const float2* partial, float* out0, float* out1, int cols,
                                   int chunks) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float2 sum = partial[c];
  for (int k = 1; k < chunks; ++k) {
    const float2 p = partial[static_cast<int64_t>(k) * cols + c];
    sum.x += p.x;
    sum.y += p.y;
  }
  out0[c] += sum.x;
  if (out1 != nullptr) out1[c] += sum.y;
}

template <typename F>
absl::Status ColumnReduce(CudaContext& ctx, const char* op, F f, float* out0, float* out1, int N,
                          int cols) {
  const int chunks =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, N / kRowsPerChunkMin)));
  const int rows_per_chunk = static_cast<int>(CeilDiv(N, chunks));
  ScratchArena arena(ctx);
  float2* partial = nullptr;
  RETURN_IF_ERROR(arena.Take(op, static_cast<int64_t>(chunks) * cols, &partial));
  const dim3 grid(static_cast<unsigned int>(CeilDiv(cols, kColTile)), chunks);
  const dim3 block(kColTile, kColRows);
  SPOTRAIN_LAUNCH(grid, block, ctx.stream(), ColumnPartialKernel)
  (f, partial, N, cols, rows_per_chunk);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  SPOTRAIN_LAUNCH(static_cast<unsigned int>(CeilDiv(cols, 256)), 256, ctx.stream(),
                  ColumnFinishKernel)
  (partial, out0, out1, cols, chunks);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

// f(n, c) = (dout[n, c], 0): bias gradient.
template <typename Act>
struct RowSumOf {
  const Act* dout;
  int cols;
  __device__ float2 operator()(int n, int c) const {
    return make_float2(Load(dout[static_cast<int64_t>(n) * cols + c]), 0.f);
  }
};

// f(n, c) = (dout * norm, dout): LayerNorm weight and bias gradients.
template <typename Act>
struct LayerNormParamGrads {
  const Act* dout;
  const Act* inp;
  const float* mean;
  const float* rstd;
  int C;
  __device__ float2 operator()(int n, int c) const {
    const int64_t i = static_cast<int64_t>(n) * C + c;
    const float d = Load(dout[i]);
    const float norm = (Load(inp[i]) - mean[n]) * rstd[n];
    return make_float2(norm * d, d);
  }
};

// ---- encoder -------------------------------------------------------------------------------

template <typename Act>
__global__ void EncoderForwardKernel(Act* out, const int32_t* inp, const float* wte,
                                     const float* wpe, int T, int C, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / C;
    const int c = static_cast<int>(i % C);
    const int t = static_cast<int>(n % T);
    out[i] = Store<Act>(wte[static_cast<int64_t>(inp[n]) * C + c] +
                        wpe[static_cast<int64_t>(t) * C + c]);
  }
}

// dwpe[t, c] += dout[b, t, c] for b in order.
template <typename Act>
__global__ void PositionGradKernel(float* dwpe, const Act* dout, int B, int T, int C) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<int64_t>(T) * C) return;
  float acc = dwpe[i];
  for (int b = 0; b < B; ++b) acc += Load(dout[static_cast<int64_t>(b) * T * C + i]);
  dwpe[i] = acc;
}

__global__ void IotaKernel(int32_t* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = i;
}

// Block i handles sorted position i if it starts a run of equal token ids: it adds the rows
// of that token in position order (the sort is stable) into dwte, like the CPU loop does.
template <typename Act>
__global__ void TokenGradKernel(float* dwte, const Act* dout, const int32_t* sorted_tokens,
                                const int32_t* sorted_positions, int N, int C) {
  const int i = blockIdx.x;
  const int token = sorted_tokens[i];
  if (i > 0 && sorted_tokens[i - 1] == token) return;
  for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < C; c += gridDim.y * blockDim.x) {
    float acc = dwte[static_cast<int64_t>(token) * C + c];
    for (int j = i; j < N && sorted_tokens[j] == token; ++j) {
      acc += Load(dout[static_cast<int64_t>(sorted_positions[j]) * C + c]);
    }
    dwte[static_cast<int64_t>(token) * C + c] = acc;
  }
}

// ---- LayerNorm -----------------------------------------------------------------------------

template <typename Act>
__global__ void LayerNormForwardKernel(Act* out, float* mean, float* rstd, const Act* inp,
                                       const float* weight, const float* bias, int N, int C) {
  const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const Act* x = inp + static_cast<int64_t>(row) * C;
  float sum = 0.f;
  for (int c = lane; c < C; c += kWarp) sum += Load(x[c]);
  const float m = WarpSum(sum) / C;
  float var = 0.f;
  for (int c = lane; c < C; c += kWarp) {
    const float d = Load(x[c]) - m;
    var += d * d;
  }
  const float s = 1.0f / sqrtf(WarpSum(var) / C + kLayerNormEps);
  Act* y = out + static_cast<int64_t>(row) * C;
  for (int c = lane; c < C; c += kWarp) {
    y[c] = Store<Act>((Load(x[c]) - m) * s * weight[c] + bias[c]);
  }
  if (lane == 0) {
    mean[row] = m;
    rstd[row] = s;
  }
}

// LayerNormForwardKernel for rows of C = packs x 32 x Pack::kN: the row is read once, with
// 16-byte loads, and kept in registers (the loop version reads it three times, 2-4 bytes per
// lane per load). Same arithmetic per element; the sums are taken in another fixed order.
template <typename Act, int kPacks>
__global__ void LayerNormForwardPackedKernel(Act* out, float* mean, float* rstd, const Act* inp,
                                             const float* weight, const float* bias, int N, int C) {
  constexpr int kN = Pack<Act>::kN;
  const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const int64_t base = static_cast<int64_t>(row) * C;
  float x[kPacks][kN];
  float sum = 0.f;
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    LoadPack(inp + base + (p * kWarp + lane) * kN, x[p]);
#pragma unroll
    for (int k = 0; k < kN; ++k) sum += x[p][k];
  }
  const float m = WarpSum(sum) / C;
  float var = 0.f;
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      const float d = x[p][k] - m;
      var += d * d;
    }
  }
  const float s = 1.0f / sqrtf(WarpSum(var) / C + kLayerNormEps);
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    const int c0 = (p * kWarp + lane) * kN;
    float y[kN];
#pragma unroll
    for (int k = 0; k < kN; ++k) y[k] = (x[p][k] - m) * s * weight[c0 + k] + bias[c0 + k];
    StorePack(out + base + c0, y);
  }
  if (lane == 0) {
    mean[row] = m;
    rstd[row] = s;
  }
}

template <typename Act>
__global__ void LayerNormBackwardInputKernel(Act* dinp, const Act* dout, const Act* inp,
                                             const float* weight, const float* mean,
                                             const float* rstd, int N, int C) {
  const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const int64_t base = static_cast<int64_t>(row) * C;
  const float m = mean[row];
  const float s = rstd[row];
  float dnorm_sum = 0.f;
  float dnorm_norm_sum = 0.f;
  for (int c = lane; c < C; c += kWarp) {
    const float norm = (Load(inp[base + c]) - m) * s;
    const float dnorm = weight[c] * Load(dout[base + c]);
    dnorm_sum += dnorm;
    dnorm_norm_sum += dnorm * norm;
  }
  const float dnorm_mean = WarpSum(dnorm_sum) / C;
  const float dnorm_norm_mean = WarpSum(dnorm_norm_sum) / C;
  for (int c = lane; c < C; c += kWarp) {
    const float norm = (Load(inp[base + c]) - m) * s;
    const float dnorm = weight[c] * Load(dout[base + c]);
    const float d = (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
    dinp[base + c] = Store<Act>(Load(dinp[base + c]) + d);
  }
}

// LayerNormBackwardInputKernel for rows of C = packs x 32 x Pack::kN: each lane holds its
// packs of inp and dout in registers, so the row is read once.
template <typename Act, int kPacks>
__global__ void LayerNormBackwardInputPackedKernel(Act* dinp, const Act* dout, const Act* inp,
                                                   const float* weight, const float* mean,
                                                   const float* rstd, int N, int C) {
  constexpr int kN = Pack<Act>::kN;
  const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const int64_t base = static_cast<int64_t>(row) * C;
  const float m = mean[row];
  const float s = rstd[row];
  float norm[kPacks][kN];
  float dnorm[kPacks][kN];
  float dnorm_sum = 0.f;
  float dnorm_norm_sum = 0.f;
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    {
      const int c0 = (p * kWarp + lane) * kN;
      float x[kN], g[kN];
      LoadPack(inp + base + c0, x);
      LoadPack(dout + base + c0, g);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        norm[p][k] = (x[k] - m) * s;
        dnorm[p][k] = weight[c0 + k] * g[k];
        dnorm_sum += dnorm[p][k];
        dnorm_norm_sum += dnorm[p][k] * norm[p][k];
      }
    }
  }
  const float dnorm_mean = WarpSum(dnorm_sum) / C;
  const float dnorm_norm_mean = WarpSum(dnorm_norm_sum) / C;
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    {
      const int c0 = (p * kWarp + lane) * kN;
      float d[kN];
      LoadPack(dinp + base + c0, d);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        d[k] += (dnorm[p][k] - dnorm_mean - norm[p][k] * dnorm_norm_mean) * s;
      }
      StorePack(dinp + base + c0, d);
    }
  }
}

// ---- matmul helpers ------------------------------------------------------------------------

// Runs `plan` (kernels/cuda/gemm_plan.h) on the operands' base pointers with cuBLAS, fp32
// accumulation (TF32 only for fp32 operands when the context allows it).
template <typename In, typename Out>
absl::Status Gemm(CudaContext& ctx, const GemmPlan& plan, const In* a, const In* b, Out* c) {
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  if (CudaType<In>::kValue == CUDA_R_32F && ctx.use_tf32()) compute = CUBLAS_COMPUTE_32F_FAST_TF32;
  CUBLAS_RETURN_IF_ERROR(cublasGemmStridedBatchedEx(
      ctx.cublas(), plan.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
      plan.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, plan.m, plan.n, plan.k, &plan.alpha,
      a + plan.a_offset, CudaType<In>::kValue, plan.lda, plan.stride_a, b + plan.b_offset,
      CudaType<In>::kValue, plan.ldb, plan.stride_b, &plan.beta, c + plan.c_offset,
      CudaType<Out>::kValue, plan.ldc, plan.stride_c, plan.batch, compute, CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

template <typename Out>
__global__ void AddBiasKernel(Out* out, const float* bias, int OC, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = Store<Out>(Load(out[i]) + bias[i % OC]);
  }
}

// ---- attention -----------------------------------------------------------------------------

// One warp per row (b, h, t) of att, which holds scaled scores on entry: causal softmax in
// place, zeros above the diagonal up to the end of the row's position block (`blocks` of
// CausalBlocks); the columns beyond it are neither read nor written.
template <typename Act>
__global__ void CausalSoftmaxKernel(Act* att, int rows, int T, int blocks) {
  const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;
  const int t = row % T;
  const int end = CausalRowEnd(T, blocks, t);
  Act* a = att + static_cast<int64_t>(row) * T;
  float maxval = -INFINITY;
  for (int j = lane; j <= t; j += kWarp) maxval = fmaxf(maxval, Load(a[j]));
  maxval = WarpMax(maxval);
  float sum = 0.f;
  for (int j = lane; j <= t; j += kWarp) sum += expf(Load(a[j]) - maxval);
  const float inv = 1.0f / WarpSum(sum);
  for (int j = lane; j < end; j += kWarp) {
    a[j] = Store<Act>(j <= t ? expf(Load(a[j]) - maxval) * inv : 0.f);
  }
}

// CausalSoftmaxKernel for rows of T = packs x 32 x Pack::kN: the row up to the diagonal is
// read once, with 16-byte loads, and kept in registers (the loop version reads it three
// times); packs wholly above the diagonal are not read, only zeroed, up to the end of the
// row's position block (a pack that straddles it is written whole, with zeros). Same
// arithmetic per element (exp(x - max) * (1 / sum)); the sum is taken in another fixed order.
template <typename Act, int kPacks>
__global__ void CausalSoftmaxPackedKernel(Act* att, int rows, int T, int blocks) {
  constexpr int kN = Pack<Act>::kN;
  const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;
  const int t = row % T;
  const int end = CausalRowEnd(T, blocks, t);
  Act* a = att + static_cast<int64_t>(row) * T;
  float x[kPacks][kN];
  float maxval = -INFINITY;
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    const int j0 = (p * kWarp + lane) * kN;
    if (j0 <= t) {
      LoadPack(a + j0, x[p]);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        if (j0 + k <= t) maxval = fmaxf(maxval, x[p][k]);
      }
    }
  }
  maxval = WarpMax(maxval);
  float sum = 0.f;
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    const int j0 = (p * kWarp + lane) * kN;
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      if (j0 + k <= t) {
        x[p][k] = expf(x[p][k] - maxval);
        sum += x[p][k];
      }
    }
  }
  const float inv = 1.0f / WarpSum(sum);
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    const int j0 = (p * kWarp + lane) * kN;
    if (j0 < end) {
      float y[kN];
#pragma unroll
      for (int k = 0; k < kN; ++k) y[k] = j0 + k <= t ? x[p][k] * inv : 0.f;
      StorePack(a + j0, y);
    }
  }
}

// One warp per row: datt <- att * (datt - sum_j att_j datt_j) below the diagonal, 0 above it
// up to the end of the row's position block, nothing beyond.
template <typename Act>
__global__ void CausalSoftmaxBackwardKernel(Act* datt, const Act* att, int rows, int T,
                                            int blocks) {
  const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;
  const int t = row % T;
  const int end = CausalRowEnd(T, blocks, t);
  const int64_t base = static_cast<int64_t>(row) * T;
  float dot = 0.f;
  for (int j = lane; j <= t; j += kWarp) dot += Load(att[base + j]) * Load(datt[base + j]);
  dot = WarpSum(dot);
  for (int j = lane; j < end; j += kWarp) {
    datt[base + j] = Store<Act>(j <= t ? Load(att[base + j]) * (Load(datt[base + j]) - dot) : 0.f);
  }
}

// CausalSoftmaxBackwardKernel for rows of T = packs x 32 x Pack::kN: one pass; packs
// wholly above the diagonal are not read, only zeroed up to the end of the row's block.
template <typename Act, int kPacks>
__global__ void CausalSoftmaxBackwardPackedKernel(Act* datt, const Act* att, int rows, int T,
                                                  int blocks) {
  constexpr int kN = Pack<Act>::kN;
  const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;
  const int t = row % T;
  const int end = CausalRowEnd(T, blocks, t);
  const int64_t base = static_cast<int64_t>(row) * T;
  float a[kPacks][kN];
  float g[kPacks][kN];
  float dot = 0.f;
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    const int j0 = (p * kWarp + lane) * kN;
    if (j0 <= t) {
      LoadPack(att + base + j0, a[p]);
      LoadPack(datt + base + j0, g[p]);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        if (j0 + k <= t) dot += a[p][k] * g[p][k];
      }
    }
  }
  dot = WarpSum(dot);
#pragma unroll
  for (int p = 0; p < kPacks; ++p) {
    const int j0 = (p * kWarp + lane) * kN;
    if (j0 < end) {
      float d[kN];
#pragma unroll
      for (int k = 0; k < kN; ++k) d[k] = j0 + k <= t ? a[p][k] * (g[p][k] - dot) : 0.f;
      StorePack(datt + base + j0, d);
    }
  }
}

// ---- element-wise --------------------------------------------------------------------------

// GELU (tanh approximation) in the CPU reference's form: x * sigmoid(2u) with
// u = sqrt(2/pi) (x + 0.044715 x^3), equal to 0.5 x (1 + tanh(u)) without its cancellation.
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCube = 0.044715f;

__device__ __forceinline__ float GeluSigmoid(float x) {
  const float u = kGeluScale * (x + kGeluCube * x * x * x);
  return 1.0f / (1.0f + expf(-2.0f * u));
}

template <typename Act>
__global__ void GeluForwardKernel(Act* out, const Act* inp, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float x = Load(inp[i]);
    out[i] = Store<Act>(x * GeluSigmoid(x));
  }
}

// d/dx [x s(2u)] = s + 2 x s (1 - s) u'(x).
// kOverwrite: dinp = gelu'(inp) * dout, dinp's old contents never read; else dinp += ...
template <typename Act, bool kOverwrite>
__global__ void GeluBackwardKernel(Act* dinp, const Act* inp, const Act* dout, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float x = Load(inp[i]);
    const float s = GeluSigmoid(x);
    const float du = kGeluScale * (1.0f + 3.0f * kGeluCube * x * x);
    const float grad = s + 2.0f * x * s * (1.0f - s) * du;
    const float d = grad * Load(dout[i]);
    dinp[i] = Store<Act>(kOverwrite ? d : Load(dinp[i]) + d);
  }
}

template <typename Act>
__global__ void ResidualForwardKernel(Act* out, const Act* a, const Act* b, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = Store<Act>(Load(a[i]) + Load(b[i]));
  }
}

// Packed forms of the element-wise kernels above (16-byte loads and stores, the same
// arithmetic per element), used when n is a whole number of packs and every pointer is
// 16-byte aligned (PackedElementwise); op(p) handles elements [p * kN, (p + 1) * kN).
template <typename Op>
__global__ void PackedElementwiseKernel(int64_t packs, Op op) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    op(p);
  }
}

template <typename Act>
struct GeluForwardPack {
  Act* out;
  const Act* inp;
  __device__ void operator()(int64_t p) const {
    constexpr int kN = Pack<Act>::kN;
    float x[kN];
    LoadPack(inp + p * kN, x);
#pragma unroll
    for (int k = 0; k < kN; ++k) x[k] = x[k] * GeluSigmoid(x[k]);
    StorePack(out + p * kN, x);
  }
};

template <typename Act, bool kOverwrite>
struct GeluBackwardPack {
  Act* dinp;
  const Act* inp;
  const Act* dout;
  __device__ void operator()(int64_t p) const {
    constexpr int kN = Pack<Act>::kN;
    float x[kN], g[kN], d[kN];
    LoadPack(inp + p * kN, x);
    LoadPack(dout + p * kN, g);
    if (!kOverwrite) LoadPack(dinp + p * kN, d);
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      const float s = GeluSigmoid(x[k]);
      const float du = kGeluScale * (1.0f + 3.0f * kGeluCube * x[k] * x[k]);
      const float grad = s + 2.0f * x[k] * s * (1.0f - s) * du;
      const float dk = grad * g[k];
      d[k] = kOverwrite ? dk : d[k] + dk;
    }
    StorePack(dinp + p * kN, d);
  }
};

template <typename Act>
struct ResidualForwardPack {
  Act* out;
  const Act* a;
  const Act* b;
  __device__ void operator()(int64_t p) const {
    constexpr int kN = Pack<Act>::kN;
    float x[kN], y[kN];
    LoadPack(a + p * kN, x);
    LoadPack(b + p * kN, y);
#pragma unroll
    for (int k = 0; k < kN; ++k) x[k] = x[k] + y[k];
    StorePack(out + p * kN, x);
  }
};

// out[i] += bias[i % OC]; OC is a whole number of packs, so a pack never wraps a row.
template <typename Act>
struct AddBiasPack {
  Act* out;
  const float* bias;
  int OC;
  __device__ void operator()(int64_t p) const {
    constexpr int kN = Pack<Act>::kN;
    float x[kN];
    LoadPack(out + p * kN, x);
    const int c0 = static_cast<int>((p * kN) % OC);
#pragma unroll
    for (int k = 0; k < kN; ++k) x[k] = x[k] + bias[c0 + k];
    StorePack(out + p * kN, x);
  }
};

// kN elements at p to / from fp32: one 16-byte pack when kN is Pack<Act>::kN, else one by one.
template <typename Act, int kN>
__device__ __forceinline__ void LoadN(const Act* p, float* out) {
  if constexpr (kN == Pack<Act>::kN) {
    LoadPack(p, out);
  } else {
#pragma unroll
    for (int k = 0; k < kN; ++k) out[k] = Load(p[k]);
  }
}
template <typename Act, int kN>
__device__ __forceinline__ void StoreN(Act* p, const float* in) {
  if constexpr (kN == Pack<Act>::kN) {
    StorePack(p, in);
  } else {
#pragma unroll
    for (int k = 0; k < kN; ++k) p[k] = Store<Act>(in[k]);
  }
}

// A linear layer's bias added where its output is consumed, in the same arithmetic as
// MatmulForward's bias addition (the biased value rounded to Act) followed by the consumer,
// so the results have the same bits without the extra pass over the output. Rows of C
// columns; element p of the grid handles elements [p * kN, (p + 1) * kN), which never wrap a
// row (kN = 1, or C a whole number of packs).
// out = a + (b + bias).
template <typename Act, int kN>
struct BiasResidualOp {
  Act* out;
  const Act* a;
  const Act* b;
  const float* bias;
  int C;
  __device__ void operator()(int64_t p) const {
    const int64_t i = p * kN;
    float x[kN], y[kN];
    LoadN<Act, kN>(a + i, x);
    LoadN<Act, kN>(b + i, y);
    const int c0 = static_cast<int>(i % C);
#pragma unroll
    for (int k = 0; k < kN; ++k) x[k] = x[k] + Load(Store<Act>(y[k] + bias[c0 + k]));
    StoreN<Act, kN>(out + i, x);
  }
};

// pre += bias (stored: GELU's backward reads it), out = gelu(pre).
template <typename Act, int kN>
struct BiasGeluOp {
  Act* out;
  Act* pre;
  const float* bias;
  int C;
  __device__ void operator()(int64_t p) const {
    const int64_t i = p * kN;
    float x[kN];
    LoadN<Act, kN>(pre + i, x);
    const int c0 = static_cast<int>(i % C);
#pragma unroll
    for (int k = 0; k < kN; ++k) x[k] = Load(Store<Act>(x[k] + bias[c0 + k]));
    StoreN<Act, kN>(pre + i, x);
#pragma unroll
    for (int k = 0; k < kN; ++k) x[k] = x[k] * GeluSigmoid(x[k]);
    StoreN<Act, kN>(out + i, x);
  }
};

template <typename Act>
__global__ void ResidualBackwardKernel(Act* da, Act* db, const Act* dout, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float d = Load(dout[i]);
    da[i] = Store<Act>(Load(da[i]) + d);
    db[i] = Store<Act>(Load(db[i]) + d);
  }
}

// ---- softmax cross-entropy -----------------------------------------------------------------

constexpr int kSoftmaxThreads = 512;

// Running (max, sum of exp(x - max)) over a set of logits: one read of the row gives both
// (online softmax). Combine is commutative bit for bit (fmaxf, two products and one addition,
// each rounded on its own: no fused multiply-add, which would round a * b + c once and make
// the order matter), so an xor-butterfly leaves the same value in every lane; the fixed
// reduction order makes the result the same on every run.
struct MaxSum {
  float max;
  float sum;
};

__device__ __forceinline__ MaxSum Combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, 0.f};
  return {m, __fadd_rn(__fmul_rn(a.sum, expf(a.max - m)), __fmul_rn(b.sum, expf(b.max - m)))};
}

__device__ __forceinline__ void Accumulate(MaxSum& acc, float x) {
  if (x > acc.max) {
    acc.sum = acc.sum * expf(acc.max - x) + 1.0f;
    acc.max = x;
  } else if (x != -INFINITY) {     // a -inf logit adds 0 (and -inf - -inf would be NaN)
    acc.sum += expf(x - acc.max);  // NaN logits make the sum, hence the loss, NaN
  }
}

__device__ MaxSum BlockCombine(MaxSum v, MaxSum* shared) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v = Combine(v, MaxSum{__shfl_xor_sync(0xffffffffu, v.max, offset),
                          __shfl_xor_sync(0xffffffffu, v.sum, offset)});
  }
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : MaxSum{-INFINITY, 0.f};
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v = Combine(v, MaxSum{__shfl_xor_sync(0xffffffffu, v.max, offset),
                          __shfl_xor_sync(0xffffffffu, v.sum, offset)});
  }
  return v;
}

// Four consecutive logits as floats: one 16-byte load (fp32) or one 8-byte load (bf16).
__device__ __forceinline__ float4 Load4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}
__device__ __forceinline__ float4 Load4(const bf16* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const bf16* v = reinterpret_cast<const bf16*>(&raw);
  return make_float4(Load(v[0]), Load(v[1]), Load(v[2]), Load(v[3]));
}

template <typename Logit, typename Act>
__device__ void WriteRowGrad(Act* d, const Logit* x, float m, float inv, int target, float scale,
                             int V, int Vp, bool vec);

// One block per row: one read of the logits (4 per load when `vec`: Vp a multiple of 4 and
// the logits aligned to 4 elements), then stats = (max, 1/sum) and the loss. With dlogits (the
// fused form), the block then writes the row's gradient as CrossEntropyBackwardKernel does,
// while the row is still in cache; `dvec` as that kernel's `vec`.
template <typename Logit, typename Act>
__global__ void CrossEntropyForwardKernel(float* losses, float* stats, const Logit* logits,
                                          const int32_t* targets, int V, int Vp, bool vec,
                                          Act* dlogits, float scale, bool dvec) {
  __shared__ MaxSum shared[kWarp];
  const int64_t row = blockIdx.x;
  const Logit* x = logits + row * Vp;
  MaxSum acc{-INFINITY, 0.f};
  int tail = 0;
  if (vec) {
    for (int j = threadIdx.x; j < V / 4; j += blockDim.x) {
      const float4 q = Load4(x + 4 * j);
      Accumulate(acc, q.x);
      Accumulate(acc, q.y);
      Accumulate(acc, q.z);
      Accumulate(acc, q.w);
    }
    tail = V / 4 * 4;
  }
  for (int j = tail + threadIdx.x; j < V; j += blockDim.x) Accumulate(acc, Load(x[j]));
  acc = BlockCombine(acc, shared);
  if (threadIdx.x == 0) {
    stats[2 * row] = acc.max;
    stats[2 * row + 1] = 1.0f / acc.sum;
    // -log softmax[target] without forming the (possibly tiny) probability, as the CPU.
    losses[row] = logf(acc.sum) - (Load(x[targets[row]]) - acc.max);
  }
  if (dlogits != nullptr) {  // the same for the whole block
    __syncthreads();         // the loss read x[target]: in-place dlogits may overwrite it now
    WriteRowGrad(dlogits + row * Vp, x, acc.max, 1.0f / acc.sum, targets[row], scale, V, Vp, dvec);
  }
}

__device__ __forceinline__ void Store4(float* p, float a, float b, float c, float d) {
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}
__device__ __forceinline__ void Store4(bf16* p, float a, float b, float c, float d) {
  alignas(8) bf16 v[4] = {Store<bf16>(a), Store<bf16>(b), Store<bf16>(c), Store<bf16>(d)};
  *reinterpret_cast<uint2*>(p) = *reinterpret_cast<const uint2*>(v);
}

// One block per row: dlogits = (exp(x - max) / sum - onehot) * scale, padded columns 0. Each
// element is read and then written by the same thread, so dlogits may be the logits (same
// type). `vec`: Vp a multiple of 4, logits and dlogits 4-element aligned.
template <typename Logit, typename Act>
__global__ void CrossEntropyBackwardKernel(Act* dlogits, const Logit* logits, const float* stats,
                                           const int32_t* targets, float scale, int V, int Vp,
                                           bool vec) {
  const int64_t row = blockIdx.x;
  WriteRowGrad(dlogits + row * Vp, logits + row * Vp, stats[2 * row], stats[2 * row + 1],
               targets[row], scale, V, Vp, vec);
}

// The block's row of dlogits from the row's logits x and its max m and 1/sum inv.
template <typename Logit, typename Act>
__device__ void WriteRowGrad(Act* d, const Logit* x, float m, float inv, int target, float scale,
                             int V, int Vp, bool vec) {
  const auto grad = [&](int j, float xj) {
    return j < V ? (expf(xj - m) * inv - (j == target ? 1.0f : 0.0f)) * scale : 0.0f;
  };
  if (vec) {
    for (int j4 = threadIdx.x; j4 < Vp / 4; j4 += blockDim.x) {
      const int j = j4 * 4;
      const float4 q = Load4(x + j);
      Store4(d + j, grad(j, q.x), grad(j + 1, q.y), grad(j + 2, q.z), grad(j + 3, q.w));
    }
  } else {
    for (int j = threadIdx.x; j < Vp; j += blockDim.x) {
      const float xj = Load(x[j]);
      d[j] = Store<Act>(grad(j, xj));
    }
  }
}

// ---- global sums ---------------------------------------------------------------------------

// A fixed grid (not derived from the GPU) so that the summation order, hence the result, is
// the same on every GPU.
constexpr int kSumBlocks = 1024;
constexpr int kSumThreads = 256;

template <bool kSquare>
__global__ void SumPartialKernel(double* partial, const float* x, int64_t n) {
  __shared__ double shared[kWarp];
  double acc = 0.0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double v = x[i];
    acc += kSquare ? v * v : v;
  }
  acc = BlockSum(acc, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void SumFinishKernel(double* out, const double* partial, int count) {
  __shared__ double shared[kWarp];
  double acc = 0.0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
  acc = BlockSum(acc, shared);
  if (threadIdx.x == 0) *out = acc;
}

template <bool kSquare>
absl::StatusOr<double> GlobalSum(CudaContext& ctx, const char* op, const float* x, int64_t n) {
  if (n < 0) return absl::InvalidArgumentError(absl::StrFormat("%s: negative length", op));
  if (n == 0) return 0.0;
  ScratchArena arena(ctx);
  double* partial = nullptr;
  double* result = nullptr;
  RETURN_IF_ERROR(arena.Take(op, kSumBlocks, &partial));
  RETURN_IF_ERROR(arena.Take(op, 1, &result));
  SPOTRAIN_LAUNCH(kSumBlocks, kSumThreads, ctx.stream(), SumPartialKernel<kSquare>)(partial, x, n);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  SPOTRAIN_LAUNCH(1, 1024, ctx.stream(), SumFinishKernel)(result, partial, kSumBlocks);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  double host = 0.0;
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(&host, result, sizeof(double), cudaMemcpyDeviceToHost, ctx.stream()));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ctx.stream()));
  return host;
}

// ---- AdamW ---------------------------------------------------------------------------------

// The CPU reference's arithmetic in its order, with explicit round-to-nearest intrinsics
// so that nvcc does not contract it into FMAs: with IEEE division and square root the
// result matches the CPU's baseline (non-FMA) path bit for bit, and its AVX2+FMA path to
// the last bit.
__global__ void AdamWKernel(float* params, const float* grads, float* m, float* v,
                            const uint8_t* decay_mask, int64_t n, float lr, float beta1,
                            float beta2, float eps, float weight_decay, float grad_scale, float c1,
                            float c2) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = __fmul_rn(grads[i], grad_scale);
    const float mi = __fadd_rn(__fmul_rn(beta1, m[i]), __fmul_rn(1.0f - beta1, g));
    const float vi = __fadd_rn(__fmul_rn(beta2, v[i]), __fmul_rn(1.0f - beta2, __fmul_rn(g, g)));
    m[i] = mi;
    v[i] = vi;
    const float decay = (decay_mask == nullptr || decay_mask[i] != 0) ? weight_decay : 0.0f;
    const float p = params[i];
    const float step =
        __fadd_rn(__fdiv_rn(__fmul_rn(mi, c1), __fadd_rn(__fsqrt_rn(__fmul_rn(vi, c2)), eps)),
                  __fmul_rn(decay, p));
    params[i] = __fsub_rn(p, __fmul_rn(lr, step));
  }
}

template <typename Src, typename Dst>
__global__ void CastKernel(Dst* dst, const Src* src, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = Store<Dst>(Load(src[i]));
  }
}

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / kWarp;  // one warp per row

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Launches `op` over n elements of Act in packs when n is a whole number of packs and every
// pointer is 16-byte aligned; returns false (nothing launched) otherwise.
template <typename Act, typename Op>
bool PackedElementwise(CudaContext& ctx, int64_t n, std::initializer_list<const void*> pointers,
                       const Op& op) {
  constexpr int kN = Pack<Act>::kN;
  if (n % kN != 0) return false;
  for (const void* p : pointers) {
    if (!Aligned16(p)) return false;
  }
  const int64_t packs = n / kN;
  SPOTRAIN_LAUNCH(ElementwiseBlocks(packs, kThreads), kThreads, ctx.stream(),
                  PackedElementwiseKernel)
  (packs, op);
  return true;
}

// ---- head-major copies (attention) ---------------------------------------------------------
// Element p of the grid handles head-major elements [p * kN, (p + 1) * kN) of `layout`
// (gemm_plan.h): with kN = Pack<Act>::kN (hs a whole number of packs, pointers 16-byte
// aligned) those are contiguous on both sides and move as one 16-byte pack.

enum class HeadCopy {
  kGather,      // head-major copy <- token-major tensor
  kScatter,     // token-major tensor <- head-major copy
  kScatterAdd,  // token-major tensor += head-major copy (gradients)
};

template <typename Act, int kN, HeadCopy kMode>
struct HeadCopyPack {
  Act* dst;
  const Act* src;
  HeadLayout layout;
  // kGather only, optional: a bias over the token-major row (S x C), added as the elements are
  // copied, with the arithmetic of AddBiasPack (so the same bits as adding it first).
  const float* bias;
  __device__ void operator()(int64_t p) const {
    const int64_t head = p * kN;
    const int64_t token = layout.TokenMajorIndex(head);
    Act* d = dst + (kMode == HeadCopy::kGather ? head : token);
    const Act* s = src + (kMode == HeadCopy::kGather ? token : head);
    if constexpr (kMode == HeadCopy::kScatterAdd) {
      if constexpr (kN == Pack<Act>::kN) {
        float x[kN], y[kN];
        LoadPack(d, x);
        LoadPack(s, y);
#pragma unroll
        for (int k = 0; k < kN; ++k) x[k] = x[k] + y[k];
        StorePack(d, x);
      } else {
#pragma unroll
        for (int k = 0; k < kN; ++k) d[k] = Store<Act>(Load(d[k]) + Load(s[k]));
      }
    } else if (kMode == HeadCopy::kGather && bias != nullptr) {
      const int64_t row = static_cast<int64_t>(layout.S) * layout.NH * layout.hs;
      const float* b = bias + token % row;  // kN elements never cross a head, so not a row
      float x[kN];
      LoadN<Act, kN>(s, x);
#pragma unroll
      for (int k = 0; k < kN; ++k) x[k] = x[k] + b[k];
      StoreN<Act, kN>(d, x);
    } else if constexpr (kN == Pack<Act>::kN) {
      *reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(s);
    } else {
#pragma unroll
      for (int k = 0; k < kN; ++k) d[k] = s[k];
    }
  }
};

// Copies the elements of `layout` between a token-major tensor and its head-major copy, in
// 16-byte packs when hs is a whole number of packs and both pointers are 16-byte aligned.
template <HeadCopy kMode, typename Act>
absl::Status CopyHeads(CudaContext& ctx, Act* dst, const Act* src, const HeadLayout& layout,
                       const float* bias = nullptr) {
  constexpr int kN = Pack<Act>::kN;
  if (layout.hs % kN == 0 && Aligned16(dst) && Aligned16(src)) {
    const int64_t packs = layout.size() / kN;
    SPOTRAIN_LAUNCH(ElementwiseBlocks(packs, kThreads), kThreads, ctx.stream(),
                    PackedElementwiseKernel)
    (packs, HeadCopyPack<Act, kN, kMode>{dst, src, layout, bias});
  } else {
    SPOTRAIN_LAUNCH(ElementwiseBlocks(layout.size(), kThreads), kThreads, ctx.stream(),
                    PackedElementwiseKernel)
    (layout.size(), HeadCopyPack<Act, 1, kMode>{dst, src, layout, bias});
  }
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

// Matrices of [T, C] activations per batch element the attention keeps in scratch: forward
// q, k, v and y; backward q, k, v, dy, dq, dk, dv.
constexpr int kAttentionForwardSlots = 4;
constexpr int kAttentionBackwardSlots = 7;
// ScratchArena aligns every piece to 256 bytes; the attention takes at most 3 pieces.
constexpr size_t kAttentionScratchSlack = 3 * 256;

// Batch elements per head-major chunk: as many as the context's scratch holds, at least 1
// (if even one does not fit, ScratchArena reports by how much).
template <typename Act>
int AttentionChunk(const CudaContext& ctx, int B, int T, int C, int slots) {
  const size_t per_b = static_cast<size_t>(slots) * T * C * sizeof(Act);
  const size_t avail = ctx.scratch_bytes() > kAttentionScratchSlack
                           ? ctx.scratch_bytes() - kAttentionScratchSlack
                           : 0;
  const size_t fit = avail / per_b;
  return fit < 1 ? 1 : (fit > static_cast<size_t>(B) ? B : static_cast<int>(fit));
}

// What both attention calls derive from the shapes: head size, batch elements per chunk, and
// the causal position blocks of the products. kInvalidArgument for bad shapes.
struct AttentionSetup {
  int hs;
  int chunk;
  std::vector<PositionBlock> causal;
};

// The chunk of batch elements from b0: its q|k|v and output layouts and its head count.
struct AttentionChunkLayout {
  HeadLayout qkv;
  HeadLayout y;
  int BH;
};
inline AttentionChunkLayout ChunkAt(const AttentionSetup& setup, int b0, int B, int T, int NH) {
  const int bc = B - b0 < setup.chunk ? B - b0 : setup.chunk;
  return {HeadLayout{b0, bc, T, 3, NH, setup.hs}, HeadLayout{b0, bc, T, 1, NH, setup.hs}, bc * NH};
}
template <typename Act>
absl::StatusOr<AttentionSetup> SetUpAttention(const CudaContext& ctx, const char* op, int B, int T,
                                              int C, int NH, int slots) {
  RETURN_IF_ERROR(CheckPositive(op, {B, T, C, NH}));
  if (C % NH != 0) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: C must be a multiple of NH", op));
  }
  return AttentionSetup{C / NH, AttentionChunk<Act>(ctx, B, T, C, slots),
                        CausalBlocks(T, DefaultCausalBlockCount(T))};
}

}  // namespace

// ---- public operations ---------------------------------------------------------------------

template <typename Act>
absl::Status EncoderForward(CudaContext& ctx, Act* out, const int32_t* inp, const float* wte,
                            const float* wpe, int B, int T, int C) {
  RETURN_IF_ERROR(CheckPositive("EncoderForward", {B, T, C}));
  const int64_t total = static_cast<int64_t>(B) * T * C;
  SPOTRAIN_LAUNCH(ElementwiseBlocks(total, kThreads), kThreads, ctx.stream(), EncoderForwardKernel)
  (out, inp, wte, wpe, T, C, total);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

template <typename Act>
absl::Status EncoderBackward(CudaContext& ctx, float* dwte, float* dwpe, const Act* dout,
                             const int32_t* inp, int B, int T, int C, int Vp) {
  RETURN_IF_ERROR(CheckPositive("EncoderBackward", {B, T, C, Vp}));
  const int N = B * T;
  SPOTRAIN_LAUNCH(static_cast<unsigned int>(CeilDiv(static_cast<int64_t>(T) * C, kThreads)),
                  kThreads, ctx.stream(), PositionGradKernel)
  (dwpe, dout, B, T, C);
  CUDA_RETURN_IF_LAUNCH_ERROR();

  // Stable radix sort of (token id, position): equal tokens end up adjacent, in position
  // order, whatever the GPU.
  int end_bit = 1;
  while (end_bit < 31 && (int64_t{1} << end_bit) < Vp) ++end_bit;
  ScratchArena arena(ctx);
  int32_t* positions = nullptr;
  int32_t* sorted_tokens = nullptr;
  int32_t* sorted_positions = nullptr;
  RETURN_IF_ERROR(arena.Take("EncoderBackward", N, &positions));
  RETURN_IF_ERROR(arena.Take("EncoderBackward", N, &sorted_tokens));
  RETURN_IF_ERROR(arena.Take("EncoderBackward", N, &sorted_positions));
  size_t temp_bytes = 0;
  CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, inp, sorted_tokens,
                                                       positions, sorted_positions, N, 0, end_bit,
                                                       ctx.stream()));
  char* temp = nullptr;
  RETURN_IF_ERROR(arena.Take("EncoderBackward", static_cast<int64_t>(temp_bytes), &temp));
  SPOTRAIN_LAUNCH(static_cast<unsigned int>(CeilDiv(N, kThreads)), kThreads, ctx.stream(),
                  IotaKernel)
  (positions, N);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, inp, sorted_tokens,
                                                       positions, sorted_positions, N, 0, end_bit,
                                                       ctx.stream()));
  const int threads = C < kThreads ? static_cast<int>(CeilDiv(C, kWarp)) * kWarp : kThreads;
  const dim3 grid(N, static_cast<unsigned int>(CeilDiv(C, threads)));
  SPOTRAIN_LAUNCH(grid, threads, ctx.stream(), TokenGradKernel)
  (dwte, dout, sorted_tokens, sorted_positions, N, C);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

template <typename Act>
absl::Status LayerNormForward(CudaContext& ctx, Act* out, float* mean, float* rstd, const Act* inp,
                              const float* weight, const float* bias, int N, int C) {
  RETURN_IF_ERROR(CheckPositive("LayerNormForward", {N, C}));
  const auto blocks = static_cast<unsigned int>(CeilDiv(N, kRowsPerBlock));
  if (PackedRow<Act>(C) && Aligned16(inp) && Aligned16(out)) {
    WithRowPacks(C / RowPackWidth<Act>(), [&](auto packs) {
      SPOTRAIN_LAUNCH(blocks, kThreads, ctx.stream(),
                      LayerNormForwardPackedKernel<Act, decltype(packs)::value>)
      (out, mean, rstd, inp, weight, bias, N, C);
    });
  } else {
    SPOTRAIN_LAUNCH(blocks, kThreads, ctx.stream(), LayerNormForwardKernel)
    (out, mean, rstd, inp, weight, bias, N, C);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

template <typename Act>
absl::Status LayerNormBackward(CudaContext& ctx, Act* dinp, float* dweight, float* dbias,
                               const Act* dout, const Act* inp, const float* weight,
                               const float* mean, const float* rstd, int N, int C) {
  RETURN_IF_ERROR(CheckPositive("LayerNormBackward", {N, C}));
  const auto blocks = static_cast<unsigned int>(CeilDiv(N, kRowsPerBlock));
  if (PackedRow<Act>(C) && Aligned16(dinp) && Aligned16(dout) && Aligned16(inp)) {
    WithRowPacks(C / RowPackWidth<Act>(), [&](auto packs) {
      SPOTRAIN_LAUNCH(blocks, kThreads, ctx.stream(),
                      LayerNormBackwardInputPackedKernel<Act, decltype(packs)::value>)
      (dinp, dout, inp, weight, mean, rstd, N, C);
    });
  } else {
    SPOTRAIN_LAUNCH(blocks, kThreads, ctx.stream(), LayerNormBackwardInputKernel)
    (dinp, dout, inp, weight, mean, rstd, N, C);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return ColumnReduce(ctx, "LayerNormBackward", LayerNormParamGrads<Act>{dout, inp, mean, rstd, C},
                      dweight, dbias, N, C);
}

template <typename In, typename Out>
absl::Status MatmulForward(CudaContext& ctx, Out* out, const In* inp, const In* weight,
                           const float* bias, int N, int C, int OC) {
  RETURN_IF_ERROR(CheckPositive("MatmulForward", {N, C, OC}));
  RETURN_IF_ERROR(Gemm(ctx, MatmulForwardPlan(N, C, OC), weight, inp, out));
  if (bias != nullptr) {
    const int64_t total = static_cast<int64_t>(N) * OC;
    if (OC % Pack<Out>::kN != 0 ||
        !PackedElementwise<Out>(ctx, total, {out}, AddBiasPack<Out>{out, bias, OC})) {
      SPOTRAIN_LAUNCH(ElementwiseBlocks(total, kThreads), kThreads, ctx.stream(), AddBiasKernel)
      (out, bias, OC, total);
    }
    CUDA_RETURN_IF_LAUNCH_ERROR();
  }
  return absl::OkStatus();
}

template <typename Act>
absl::Status MatmulBackward(CudaContext& ctx, Act* dinp, float* dweight, float* dbias,
                            const Act* dout, const Act* inp, const Act* weight, int N, int C,
                            int OC, GradWrite dinp_write) {
  RETURN_IF_ERROR(CheckPositive("MatmulBackward", {N, C, OC}));
  if (dinp != nullptr) {
    GemmPlan plan = MatmulBackwardInputPlan(N, C, OC);
    if (dinp_write == GradWrite::kOverwrite) plan.beta = 0.0f;  // cuBLAS then never reads dinp
    RETURN_IF_ERROR(Gemm(ctx, plan, weight, dout, dinp));
  }
  // Into the fp32 gradient buffer whatever the operand type.
  RETURN_IF_ERROR(Gemm(ctx, MatmulBackwardWeightPlan(N, C, OC), inp, dout, dweight));
  if (dbias != nullptr) {
    RETURN_IF_ERROR(
        ColumnReduce(ctx, "MatmulBackward", RowSumOf<Act>{dout, OC}, dbias, nullptr, N, OC));
  }
  return absl::OkStatus();
}

// Attention materialises the [T, T] scores per (batch, head), like the CPU reference. It
// runs on head-major copies of q, k, v (gemm_plan.h): per chunk of batch elements (all of
// them when the scratch holds them: AttentionScratchBytes), strided-batched products over
// every (batch element, head) pair, around a causal softmax. The products skip the tiles
// above the diagonal by position blocks (CausalBlocks); the softmax zeroes the rest of the
// upper triangle inside the computed tiles. att and datt are defined in columns
// [0, CausalRowEnd) of each row only: beyond the 16-byte pack that holds that end nothing
// writes them, and no product reads them.
template <typename Act>
absl::Status AttentionForward(CudaContext& ctx, Act* out, Act* att, const Act* inp, int B, int T,
                              int C, int NH, const float* inp_bias) {
  ASSIGN_OR_RETURN(const AttentionSetup setup, SetUpAttention<Act>(ctx, "AttentionForward", B, T, C,
                                                                   NH, kAttentionForwardSlots));
  const int hs = setup.hs, chunk = setup.chunk;
  const std::vector<PositionBlock>& causal = setup.causal;
  const int causal_count = static_cast<int>(causal.size());
  ScratchArena arena(ctx);
  Act* qkv_h = nullptr;
  Act* y_h = nullptr;
  RETURN_IF_ERROR(arena.Take("AttentionForward", static_cast<int64_t>(3) * chunk * T * C, &qkv_h));
  RETURN_IF_ERROR(arena.Take("AttentionForward", static_cast<int64_t>(chunk) * T * C, &y_h));
  for (int b0 = 0; b0 < B; b0 += chunk) {
    const auto [qkv_layout, y_layout, BH] = ChunkAt(setup, b0, B, T, NH);
    RETURN_IF_ERROR(CopyHeads<HeadCopy::kGather>(ctx, qkv_h, inp, qkv_layout, inp_bias));
    const Act* q = qkv_h;
    const Act* k = q + qkv_layout.slot_size();
    const Act* v = k + qkv_layout.slot_size();
    Act* att_chunk = att + static_cast<int64_t>(b0) * NH * T * T;
    for (const PositionBlock& blk : causal) {
      RETURN_IF_ERROR(Gemm(ctx, HeadScoresPlan(BH, T, hs, blk), k, q, att_chunk));
    }
    const int rows = BH * T;
    const auto row_blocks = static_cast<unsigned int>(CeilDiv(rows, kRowsPerBlock));
    if (PackedRow<Act>(T) && Aligned16(att_chunk)) {
      WithRowPacks(T / RowPackWidth<Act>(), [&](auto packs) {
        SPOTRAIN_LAUNCH(row_blocks, kThreads, ctx.stream(),
                        CausalSoftmaxPackedKernel<Act, decltype(packs)::value>)
        (att_chunk, rows, T, causal_count);
      });
    } else {
      SPOTRAIN_LAUNCH(row_blocks, kThreads, ctx.stream(), CausalSoftmaxKernel)
      (att_chunk, rows, T, causal_count);
    }
    CUDA_RETURN_IF_LAUNCH_ERROR();
    for (const PositionBlock& blk : causal) {
      RETURN_IF_ERROR(
          Gemm(ctx, HeadValuesPlan(BH, T, hs, blk), v, static_cast<const Act*>(att_chunk), y_h));
    }
    RETURN_IF_ERROR(
        CopyHeads<HeadCopy::kScatter>(ctx, out, static_cast<const Act*>(y_h), y_layout));
  }
  return absl::OkStatus();
}

template <typename Act>
absl::Status AttentionBackward(CudaContext& ctx, Act* dinp, Act* datt, const Act* dout,
                               const Act* inp, const Act* att, int B, int T, int C, int NH,
                               GradWrite dinp_write, const float* inp_bias) {
  ASSIGN_OR_RETURN(const AttentionSetup setup, SetUpAttention<Act>(ctx, "AttentionBackward", B, T,
                                                                   C, NH, kAttentionBackwardSlots));
  const int hs = setup.hs, chunk = setup.chunk;
  const std::vector<PositionBlock>& causal = setup.causal;
  const int causal_count = static_cast<int>(causal.size());
  ScratchArena arena(ctx);
  Act* qkv_h = nullptr;
  Act* dy_h = nullptr;
  Act* dqkv_h = nullptr;
  const int64_t chunk_tc = static_cast<int64_t>(chunk) * T * C;
  RETURN_IF_ERROR(arena.Take("AttentionBackward", 3 * chunk_tc, &qkv_h));
  RETURN_IF_ERROR(arena.Take("AttentionBackward", chunk_tc, &dy_h));
  RETURN_IF_ERROR(arena.Take("AttentionBackward", 3 * chunk_tc, &dqkv_h));
  for (int b0 = 0; b0 < B; b0 += chunk) {
    const auto [qkv_layout, y_layout, BH] = ChunkAt(setup, b0, B, T, NH);
    RETURN_IF_ERROR(CopyHeads<HeadCopy::kGather>(ctx, qkv_h, inp, qkv_layout, inp_bias));
    RETURN_IF_ERROR(CopyHeads<HeadCopy::kGather>(ctx, dy_h, dout, y_layout));
    const int64_t slot = qkv_layout.slot_size();
    const Act* q = qkv_h;
    const Act* k = q + slot;
    const Act* v = k + slot;
    Act* dq = dqkv_h;
    Act* dk = dq + slot;
    Act* dv = dk + slot;
    const int64_t att_offset = static_cast<int64_t>(b0) * NH * T * T;
    const Act* att_chunk = att + att_offset;
    Act* datt_chunk = datt + att_offset;
    const Act* dy = dy_h;
    for (const PositionBlock& blk : causal) {
      RETURN_IF_ERROR(Gemm(ctx, HeadGradProbsPlan(BH, T, hs, blk), v, dy, datt_chunk));
      RETURN_IF_ERROR(Gemm(ctx, HeadGradValuesPlan(BH, T, hs, blk), dy, att_chunk, dv));
    }
    // datt: d(probabilities) -> d(scaled scores), in place; the scale goes into the products.
    const int rows = BH * T;
    const auto blocks = static_cast<unsigned int>(CeilDiv(rows, kRowsPerBlock));
    if (PackedRow<Act>(T) && Aligned16(att_chunk) && Aligned16(datt_chunk)) {
      WithRowPacks(T / RowPackWidth<Act>(), [&](auto packs) {
        SPOTRAIN_LAUNCH(blocks, kThreads, ctx.stream(),
                        CausalSoftmaxBackwardPackedKernel<Act, decltype(packs)::value>)
        (datt_chunk, att_chunk, rows, T, causal_count);
      });
    } else {
      SPOTRAIN_LAUNCH(blocks, kThreads, ctx.stream(), CausalSoftmaxBackwardKernel)
      (datt_chunk, att_chunk, rows, T, causal_count);
    }
    CUDA_RETURN_IF_LAUNCH_ERROR();
    const Act* dscores = datt_chunk;
    for (const PositionBlock& blk : causal) {
      RETURN_IF_ERROR(Gemm(ctx, HeadGradQueriesPlan(BH, T, hs, blk), k, dscores, dq));
      RETURN_IF_ERROR(Gemm(ctx, HeadGradKeysPlan(BH, T, hs, blk), q, dscores, dk));
    }
    const Act* dqkv = dqkv_h;
    RETURN_IF_ERROR(dinp_write == GradWrite::kOverwrite
                        ? CopyHeads<HeadCopy::kScatter>(ctx, dinp, dqkv, qkv_layout)
                        : CopyHeads<HeadCopy::kScatterAdd>(ctx, dinp, dqkv, qkv_layout));
  }
  return absl::OkStatus();
}

template <typename Act>
size_t AttentionScratchBytes(int B, int T, int C) {
  return static_cast<size_t>(kAttentionBackwardSlots) * B * T * C * sizeof(Act) +
         kAttentionScratchSlack;
}

template <typename Act>
absl::Status GeluForward(CudaContext& ctx, Act* out, const Act* inp, int64_t n) {
  if (n <= 0) return absl::OkStatus();
  if (!PackedElementwise<Act>(ctx, n, {out, inp}, GeluForwardPack<Act>{out, inp})) {
    SPOTRAIN_LAUNCH(ElementwiseBlocks(n, kThreads), kThreads, ctx.stream(), GeluForwardKernel)
    (out, inp, n);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

template <typename Act, bool kOverwrite>
void LaunchGeluBackward(CudaContext& ctx, Act* dinp, const Act* inp, const Act* dout, int64_t n) {
  if (!PackedElementwise<Act>(ctx, n, {dinp, inp, dout},
                              GeluBackwardPack<Act, kOverwrite>{dinp, inp, dout})) {
    SPOTRAIN_LAUNCH(ElementwiseBlocks(n, kThreads), kThreads, ctx.stream(),
                    GeluBackwardKernel<Act, kOverwrite>)
    (dinp, inp, dout, n);
  }
}

template <typename Act>
absl::Status GeluBackward(CudaContext& ctx, Act* dinp, const Act* inp, const Act* dout, int64_t n,
                          GradWrite write) {
  if (n <= 0) return absl::OkStatus();
  if (write == GradWrite::kOverwrite) {
    LaunchGeluBackward<Act, true>(ctx, dinp, inp, dout, n);
  } else {
    LaunchGeluBackward<Act, false>(ctx, dinp, inp, dout, n);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

template <typename Act>
absl::Status ResidualForward(CudaContext& ctx, Act* out, const Act* a, const Act* b, int64_t n) {
  if (n <= 0) return absl::OkStatus();
  if (!PackedElementwise<Act>(ctx, n, {out, a, b}, ResidualForwardPack<Act>{out, a, b})) {
    SPOTRAIN_LAUNCH(ElementwiseBlocks(n, kThreads), kThreads, ctx.stream(), ResidualForwardKernel)
    (out, a, b, n);
  }
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

// Runs Op<Act, kN>{args..., C} over the N x C elements: in 16-byte packs when C is a whole
// number of packs and every pointer is 16-byte aligned, else element by element.
template <template <typename, int> class Op, typename Act, typename... Args>
absl::Status LaunchBiasOp(CudaContext& ctx, const char* op, int N, int C,
                          std::initializer_list<const void*> pointers, Args... args) {
  RETURN_IF_ERROR(CheckPositive(op, {N, C}));
  constexpr int kN = Pack<Act>::kN;
  bool packed = C % kN == 0;
  for (const void* p : pointers) packed = packed && Aligned16(p);
  const int64_t total = static_cast<int64_t>(N) * C;
  if (packed) {
    SPOTRAIN_LAUNCH(ElementwiseBlocks(total / kN, kThreads), kThreads, ctx.stream(),
                    PackedElementwiseKernel)
    (total / kN, Op<Act, kN>{args..., C});
  } else {
    SPOTRAIN_LAUNCH(ElementwiseBlocks(total, kThreads), kThreads, ctx.stream(),
                    PackedElementwiseKernel)
    (total, Op<Act, 1>{args..., C});
  }
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

template <typename Act>
absl::Status BiasResidualForward(CudaContext& ctx, Act* out, const Act* a, const Act* b,
                                 const float* bias, int N, int C) {
  return LaunchBiasOp<BiasResidualOp, Act>(ctx, "BiasResidualForward", N, C, {out, a, b}, out, a, b,
                                           bias);
}

template <typename Act>
absl::Status BiasGeluForward(CudaContext& ctx, Act* out, Act* pre, const float* bias, int N,
                             int C) {
  return LaunchBiasOp<BiasGeluOp, Act>(ctx, "BiasGeluForward", N, C, {out, pre}, out, pre, bias);
}

template <typename Act>
absl::Status ResidualBackward(CudaContext& ctx, Act* da, Act* db, const Act* dout, int64_t n) {
  if (n <= 0) return absl::OkStatus();
  SPOTRAIN_LAUNCH(ElementwiseBlocks(n, kThreads), kThreads, ctx.stream(), ResidualBackwardKernel)
  (da, db, dout, n);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

// Four elements at a time: Vp a multiple of 4 and p aligned to 4 elements.
template <typename T>
bool Vec4(const T* p, int Vp) {
  return Vp % 4 == 0 && reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0;
}

template <typename Logit>
absl::Status CrossEntropyForward(CudaContext& ctx, float* losses, float* stats, const Logit* logits,
                                 const int32_t* targets, int N, int V, int Vp) {
  RETURN_IF_ERROR(CheckPositive("CrossEntropyForward", {N, V, Vp}));
  if (V > Vp) return absl::InvalidArgumentError("CrossEntropyForward: V > Vp");
  SPOTRAIN_LAUNCH(N, kSoftmaxThreads, ctx.stream(), CrossEntropyForwardKernel<Logit, float>)
  (losses, stats, logits, targets, V, Vp, Vec4(logits, Vp), static_cast<float*>(nullptr), 0.0f,
   false);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

// dlogits may be the logits themselves when both have one type; otherwise (and when only part
// of them overlaps) an element would be written before another thread read it.
template <typename Logit, typename Act>
absl::Status CheckDlogits(const char* op, const Act* dlogits, const Logit* logits, int N, int Vp) {
  if constexpr (std::is_same_v<Act, Logit>) {
    if (dlogits == logits) return absl::OkStatus();
  }
  const auto* d = reinterpret_cast<const char*>(dlogits);
  const auto* l = reinterpret_cast<const char*>(logits);
  const int64_t count = static_cast<int64_t>(N) * Vp;
  if (d < l + count * sizeof(Logit) && l < d + count * sizeof(Act)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: dlogits overlap the logits (only dlogits of the logits' type may be written in "
        "place, over exactly the same memory)",
        op));
  }
  return absl::OkStatus();
}

template <typename Logit, typename Act>
bool DlogitsVec(const Act* dlogits, const Logit* logits, int Vp) {
  return Vec4(logits, Vp) && Vec4(dlogits, Vp);
}

template <typename Logit, typename Act>
absl::Status CrossEntropyBackward(CudaContext& ctx, Act* dlogits, const Logit* logits,
                                  const float* stats, const int32_t* targets, float dloss_scale,
                                  int N, int V, int Vp) {
  RETURN_IF_ERROR(CheckPositive("CrossEntropyBackward", {N, V, Vp}));
  if (V > Vp) return absl::InvalidArgumentError("CrossEntropyBackward: V > Vp");
  RETURN_IF_ERROR(CheckDlogits("CrossEntropyBackward", dlogits, logits, N, Vp));
  SPOTRAIN_LAUNCH(N, kSoftmaxThreads, ctx.stream(), CrossEntropyBackwardKernel<Logit, Act>)
  (dlogits, logits, stats, targets, dloss_scale, V, Vp, DlogitsVec(dlogits, logits, Vp));
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

template <typename Logit, typename Act>
absl::Status CrossEntropyForwardBackward(CudaContext& ctx, float* losses, float* stats,
                                         Act* dlogits, const Logit* logits, const int32_t* targets,
                                         float dloss_scale, int N, int V, int Vp) {
  RETURN_IF_ERROR(CheckPositive("CrossEntropyForwardBackward", {N, V, Vp}));
  if (V > Vp) return absl::InvalidArgumentError("CrossEntropyForwardBackward: V > Vp");
  RETURN_IF_ERROR(CheckDlogits("CrossEntropyForwardBackward", dlogits, logits, N, Vp));
  SPOTRAIN_LAUNCH(N, kSoftmaxThreads, ctx.stream(), CrossEntropyForwardKernel<Logit, Act>)
  (losses, stats, logits, targets, V, Vp, Vec4(logits, Vp), dlogits, dloss_scale,
   DlogitsVec(dlogits, logits, Vp));
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::StatusOr<double> SumOfSquares(CudaContext& ctx, const float* x, int64_t n) {
  return GlobalSum<true>(ctx, "SumOfSquares", x, n);
}

absl::StatusOr<double> Sum(CudaContext& ctx, const float* x, int64_t n) {
  return GlobalSum<false>(ctx, "Sum", x, n);
}

absl::Status AdamWUpdate(CudaContext& ctx, float* params, const float* grads, float* m, float* v,
                         const uint8_t* decay_mask, int64_t n, const AdamWParams& p) {
  if (n <= 0) return absl::OkStatus();
  if (p.t < 1) return absl::InvalidArgumentError("AdamWUpdate: step count t must be >= 1");
  // Reciprocal bias corrections computed in double and rounded once, as the CPU does.
  const float c1 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(p.beta1), p.t)));
  const float c2 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(p.beta2), p.t)));
  SPOTRAIN_LAUNCH(ElementwiseBlocks(n, kThreads), kThreads, ctx.stream(), AdamWKernel)
  (params, grads, m, v, decay_mask, n, p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, p.grad_scale,
   c1, c2);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status CastToBf16(CudaContext& ctx, bf16* dst, const float* src, int64_t n) {
  if (n <= 0) return absl::OkStatus();
  SPOTRAIN_LAUNCH(ElementwiseBlocks(n, kThreads), kThreads, ctx.stream(), CastKernel<float, bf16>)
  (dst, src, n);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status CastToFloat(CudaContext& ctx, float* dst, const bf16* src, int64_t n) {
  if (n <= 0) return absl::OkStatus();
  SPOTRAIN_LAUNCH(ElementwiseBlocks(n, kThreads), kThreads, ctx.stream(), CastKernel<bf16, float>)
  (dst, src, n);
  CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

// ---- explicit instantiations ---------------------------------------------------------------

#define SPOTRAIN_INSTANTIATE_ACT(Act)                                                              \
  template absl::Status EncoderForward<Act>(CudaContext&, Act*, const int32_t*, const float*,      \
                                            const float*, int, int, int);                          \
  template absl::Status EncoderBackward<Act>(CudaContext&, float*, float*, const Act*,             \
                                             const int32_t*, int, int, int, int);                  \
  template absl::Status LayerNormForward<Act>(CudaContext&, Act*, float*, float*, const Act*,      \
                                              const float*, const float*, int, int);               \
  template absl::Status LayerNormBackward<Act>(CudaContext&, Act*, float*, float*, const Act*,     \
                                               const Act*, const float*, const float*,             \
                                               const float*, int, int);                            \
  template absl::Status MatmulForward<Act, Act>(CudaContext&, Act*, const Act*, const Act*,        \
                                                const float*, int, int, int);                      \
  template absl::Status MatmulBackward<Act>(CudaContext&, Act*, float*, float*, const Act*,        \
                                            const Act*, const Act*, int, int, int, GradWrite);     \
  template absl::Status AttentionForward<Act>(CudaContext&, Act*, Act*, const Act*, int, int, int, \
                                              int, const float*);                                  \
  template absl::Status AttentionBackward<Act>(CudaContext&, Act*, Act*, const Act*, const Act*,   \
                                               const Act*, int, int, int, int, GradWrite,          \
                                               const float*);                                      \
  template size_t AttentionScratchBytes<Act>(int, int, int);                                       \
  template absl::Status GeluForward<Act>(CudaContext&, Act*, const Act*, int64_t);                 \
  template absl::Status GeluBackward<Act>(CudaContext&, Act*, const Act*, const Act*, int64_t,     \
                                          GradWrite);                                              \
  template absl::Status ResidualForward<Act>(CudaContext&, Act*, const Act*, const Act*, int64_t); \
  template absl::Status ResidualBackward<Act>(CudaContext&, Act*, Act*, const Act*, int64_t);      \
  template absl::Status BiasResidualForward<Act>(CudaContext&, Act*, const Act*, const Act*,       \
                                                 const float*, int, int);                          \
  template absl::Status BiasGeluForward<Act>(CudaContext&, Act*, Act*, const float*, int, int);    \
  template absl::Status CrossEntropyForward<Act>(CudaContext&, float*, float*, const Act*,         \
                                                 const int32_t*, int, int, int);                   \
  template absl::Status CrossEntropyBackward<Act, Act>(                                            \
      CudaContext&, Act*, const Act*, const float*, const int32_t*, float, int, int, int);         \
  template absl::Status CrossEntropyForwardBackward<Act, Act>(                                     \
      CudaContext&, float*, float*, Act*, const Act*, const int32_t*, float, int, int, int);

SPOTRAIN_INSTANTIATE_ACT(float)
SPOTRAIN_INSTANTIATE_ACT(bf16)
template absl::Status MatmulForward<bf16, float>(CudaContext&, float*, const bf16*, const bf16*,
                                                 const float*, int, int, int);
// bf16 dlogits from fp32 logits (an fp32-logit classifier in a bf16 model).
template absl::Status CrossEntropyBackward<float, bf16>(CudaContext&, bf16*, const float*,
                                                        const float*, const int32_t*, float, int,
                                                        int, int);
template absl::Status CrossEntropyForwardBackward<float, bf16>(CudaContext&, float*, float*, bf16*,
                                                               const float*, const int32_t*, float,
                                                               int, int, int);

#undef SPOTRAIN_INSTANTIATE_ACT

}  // namespace spotrain::kernels::cuda
