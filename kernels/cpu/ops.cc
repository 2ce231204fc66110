// CPU reference kernels (see ops.h for the contracts).
//
// Speed: matrix products (linear layers, and attention's QK^T, P*V and their backward
// products, per (batch, head) and per block of query rows so that the causal upper
// triangle is mostly skipped) go to OpenBLAS sgemm. Everything else is written with
// 4-lane GCC vector types (one SSE/NEON register) so that it vectorises on any target, and
// uses an in-house exp() (a Cephes-style polynomial) instead of libm so that softmax and
// GELU vectorise too.
//
// Determinism: outside BLAS, every output element is computed by exactly one thread with
// the same sequence of floating-point operations whatever the thread count:
//   - row-wise work (LayerNorm, softmax, cross-entropy) is split by rows;
//   - reductions over rows into a parameter gradient (LayerNorm dweight/dbias, matmul
//     dbias, encoder dwte/dwpe) are split by columns, each column summed over rows in
//     ascending order;
//   - attention is split over (batch, head) pairs and calls BLAS single-threaded inside;
//   - reductions over a whole vector (SumOfSquares) use a fixed chunking independent of
//     the thread count, combined in chunk order.
// Vector and scalar tails perform identical per-lane arithmetic (tails are processed as
// a padded vector), and nothing relies on FMA contraction (the kernels are built for
// x86-64-v2, which has no FMA). Hence the non-BLAS kernels are bit-identical for any
// ctx.threads. The linear layers' sgemm calls run with ctx.threads OpenBLAS threads;
// OpenBLAS splits a product over rows/columns of the output, not over the inner
// dimension, so in practice those results are also thread-count independent, but that is
// a property of OpenBLAS, not something this file guarantees.
#include "kernels/cpu/ops.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace spotrain::kernels::cpu {
namespace {

// ---------------------------------------------------------------------------------------
// 4-lane vector helpers. (Wider generic vectors than the target's registers get their
// comparisons scalarised by GCC, hence one register's worth.)

typedef float V4 __attribute__((vector_size(16)));
typedef int32_t I4 __attribute__((vector_size(16)));
typedef double V4d __attribute__((vector_size(32)));
constexpr int kLanes = 4;

#define SPOTRAIN_INLINE inline __attribute__((always_inline))

SPOTRAIN_INLINE V4 Load(const float* p) {
  V4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
SPOTRAIN_INLINE void Store(float* p, const V4& v) { std::memcpy(p, &v, sizeof(v)); }
SPOTRAIN_INLINE V4 Splat(float x) { return V4{x, x, x, x}; }
// The first n (< 4) lanes from p, the rest `fill`.
SPOTRAIN_INLINE V4 LoadPartial(const float* p, int n, float fill) {
  V4 v = Splat(fill);
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
}
SPOTRAIN_INLINE void StorePartial(float* p, const V4& v, int n) {
  for (int i = 0; i < n; ++i) p[i] = v[i];
}
// mask ? a : b with a lane mask from a comparison (all ones or all zeros per lane).
SPOTRAIN_INLINE V4 Select(const I4& mask, const V4& a, const V4& b) {
  I4 ai, bi;
  std::memcpy(&ai, &a, sizeof(ai));
  std::memcpy(&bi, &b, sizeof(bi));
  const I4 r = (mask & ai) | (~mask & bi);
  V4 out;
  std::memcpy(&out, &r, sizeof(out));
  return out;
}
SPOTRAIN_INLINE V4 Sqrt(const V4& x) {
#if defined(__SSE__)
  return reinterpret_cast<V4>(_mm_sqrt_ps(reinterpret_cast<__m128>(x)));
#else
  V4 r;
  for (int i = 0; i < kLanes; ++i) r[i] = std::sqrt(x[i]);
  return r;
#endif
}
SPOTRAIN_INLINE V4 Max(const V4& a, const V4& b) { return Select(a > b, a, b); }
SPOTRAIN_INLINE V4 Min(const V4& a, const V4& b) { return Select(a < b, a, b); }
// Fixed pairwise order.
SPOTRAIN_INLINE float HorizontalSum(const V4& v) { return (v[0] + v[1]) + (v[2] + v[3]); }
SPOTRAIN_INLINE float HorizontalMax(const V4& v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

// exp(x) to within about 2 ulp for x in [-87.3, 88]: Cody-Waite reduction x = n ln2 + r,
// a degree-6 polynomial for e^r (Cephes expf coefficients), and 2^n added to the exponent
// bits. Below -87.3 it returns 0 (so exp(-inf) == 0); above 88 it saturates at e^88.
SPOTRAIN_INLINE V4 Exp(const V4& in) {
  V4 x = in;
  const V4 lo = Splat(-87.33654f);
  const I4 underflow = x < lo;
  x = Min(Max(x, lo), Splat(88.0f));
  const V4 magic = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  V4 t = x * Splat(1.44269504088896341f) + magic;
  const V4 n = t - magic;
  V4 r = x - n * Splat(0.693359375f);
  r = r - n * Splat(-2.12194440e-4f);
  V4 p = Splat(1.9875691500e-4f);
  p = p * r + Splat(1.3981999507e-3f);
  p = p * r + Splat(8.3334519073e-3f);
  p = p * r + Splat(4.1665795894e-2f);
  p = p * r + Splat(1.6666665459e-1f);
  p = p * r + Splat(5.0000001201e-1f);
  p = p * (r * r) + r + Splat(1.0f);
  I4 ti, pi;
  std::memcpy(&ti, &t, sizeof(ti));
  std::memcpy(&pi, &p, sizeof(pi));
  const I4 ni = ti - 0x4B400000;  // the integer n, from the bits of t
  pi += ni << 23;
  std::memcpy(&p, &pi, sizeof(p));
  return Select(underflow, Splat(0.0f), p);
}

// ---------------------------------------------------------------------------------------
// Threading helpers. Each call of `f` gets a disjoint range; results must not depend on
// how ranges are cut (every caller computes each element independently of the others).

// Calls f(begin, end) on contiguous ranges of [0, n), cut at multiples of kLanes elements.
template <typename F>
void ParallelRanges(const CpuContext& ctx, int64_t n, F&& f) {
  if (ctx.threads <= 1 || n < 2 * kLanes) {
    f(int64_t{0}, n);
    return;
  }
#pragma omp parallel num_threads(ctx.threads)
  {
    const int64_t nt = omp_get_num_threads();
    const int64_t tid = omp_get_thread_num();
    int64_t per = (n + nt - 1) / nt;
    per = (per + kLanes - 1) / kLanes * kLanes;
    const int64_t begin = std::min(n, tid * per);
    const int64_t end = std::min(n, begin + per);
    if (begin < end) f(begin, end);
  }
}

// Calls f(i) for i in [0, n), statically split over threads.
template <typename F>
void ParallelFor(const CpuContext& ctx, int64_t n, F&& f) {
#pragma omp parallel for num_threads(ctx.threads) schedule(static) if (ctx.threads > 1)
  for (int64_t i = 0; i < n; ++i) f(i);
}

// OpenBLAS's thread count is process-global; set it only when it changes.
std::atomic<int> g_blas_threads{-1};
void SetBlasThreads(int threads) {
  threads = std::max(1, threads);
  if (g_blas_threads.exchange(threads) != threads) openblas_set_num_threads(threads);
}

// Rows of the attention matrix handled per block: blocks of query rows only multiply
// against the keys up to their last row, which skips most of the causal upper triangle at
// the cost of more, smaller sgemm calls.
constexpr int kAttentionRowBlock = 32;

// Softmax over row[0, n) in place (row already holds the scaled scores), zeroes [n, len).
void CausalSoftmaxRow(float* row, int n, int len) {
  const int nv = n / kLanes * kLanes;
  const int tail = n - nv;
  V4 vmax = Splat(-INFINITY);
  for (int j = 0; j < nv; j += kLanes) vmax = Max(vmax, Load(row + j));
  if (tail) vmax = Max(vmax, LoadPartial(row + nv, tail, -INFINITY));
  const V4 mx = Splat(HorizontalMax(vmax));
  V4 sum = Splat(0.0f);
  for (int j = 0; j < nv; j += kLanes) {
    const V4 e = Exp(Load(row + j) - mx);
    Store(row + j, e);
    sum += e;
  }
  if (tail) {
    const V4 e = Exp(LoadPartial(row + nv, tail, -INFINITY) - mx);
    StorePartial(row + nv, e, tail);
    sum += e;
  }
  const V4 inv = Splat(1.0f / HorizontalSum(sum));
  for (int j = 0; j < nv; j += kLanes) Store(row + j, Load(row + j) * inv);
  if (tail) StorePartial(row + nv, LoadPartial(row + nv, tail, 0.0f) * inv, tail);
  std::memset(row + n, 0, sizeof(float) * (len - n));
}

// dS[j] = P[j] * (dP[j] - sum_k P[k] dP[k]) over j < n, in place over dp; zeroes [n, len).
void CausalSoftmaxBackwardRow(float* dp, const float* p, int n, int len) {
  const int nv = n / kLanes * kLanes;
  const int tail = n - nv;
  V4 acc = Splat(0.0f);
  for (int j = 0; j < nv; j += kLanes) acc += Load(p + j) * Load(dp + j);
  if (tail) acc += LoadPartial(p + nv, tail, 0.0f) * LoadPartial(dp + nv, tail, 0.0f);
  const V4 dot = Splat(HorizontalSum(acc));
  for (int j = 0; j < nv; j += kLanes) Store(dp + j, Load(p + j) * (Load(dp + j) - dot));
  if (tail) {
    StorePartial(dp + nv,
                 LoadPartial(p + nv, tail, 0.0f) * (LoadPartial(dp + nv, tail, 0.0f) - dot), tail);
  }
  std::memset(dp + n, 0, sizeof(float) * (len - n));
}

// GELU (tanh approximation) written as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3),
// since 0.5 (1 + tanh(u)) == 1 / (1 + exp(-2u)); this avoids the cancellation of 1 + tanh.
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluCube = 0.044715f;

// The exponent is capped at 80 so that s stays a normal float (>= 1.8e-35) for very
// negative x (denormals are slow); the true values there are below 1e-33 anyway.
SPOTRAIN_INLINE V4 GeluSigmoid(const V4& x) {
  const V4 u = Splat(kGeluScale) * (x + Splat(kGeluCube) * x * x * x);
  return Splat(1.0f) / (Splat(1.0f) + Exp(Min(Splat(-2.0f) * u, Splat(80.0f))));
}
SPOTRAIN_INLINE V4 GeluForwardV(const V4& x) { return x * GeluSigmoid(x); }
// d/dx [x s(2u)] = s + 2 x s (1 - s) u'(x).
SPOTRAIN_INLINE V4 GeluGradV(const V4& x) {
  const V4 s = GeluSigmoid(x);
  const V4 du = Splat(kGeluScale) * (Splat(1.0f) + Splat(3.0f * kGeluCube) * x * x);
  return s + Splat(2.0f) * x * s * (Splat(1.0f) - s) * du;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Encoder.

void EncoderForward(const CpuContext& ctx, float* out, const int32_t* inp, const float* wte,
                    const float* wpe, int B, int T, int C) {
  ParallelFor(ctx, int64_t{B} * T, [&](int64_t row) {
    const float* e = wte + int64_t{inp[row]} * C;
    const float* p = wpe + (row % T) * C;
    float* o = out + row * C;
    for (int c = 0; c < C; ++c) o[c] = e[c] + p[c];
  });
}

void EncoderBackward(const CpuContext& ctx, float* dwte, float* dwpe, const float* dout,
                     const int32_t* inp, int B, int T, int C) {
  // Split by channel so that every dwte/dwpe element is summed by one thread, over rows in
  // ascending order (several rows may share a token).
  ParallelRanges(ctx, C, [&](int64_t c0, int64_t c1) {
    for (int64_t row = 0; row < int64_t{B} * T; ++row) {
      const float* d = dout + row * C;
      float* gw = dwte + int64_t{inp[row]} * C;
      float* gp = dwpe + (row % T) * C;
      for (int64_t c = c0; c < c1; ++c) {
        gw[c] += d[c];
        gp[c] += d[c];
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// LayerNorm.

void LayerNormForward(const CpuContext& ctx, float* out, float* mean, float* rstd, const float* inp,
                      const float* weight, const float* bias, int N, int C) {
  const int cv = C / kLanes * kLanes;
  const int tail = C - cv;
  ParallelFor(ctx, N, [&](int64_t i) {
    const float* x = inp + i * C;
    float* o = out + i * C;
    V4 acc = Splat(0.0f);
    for (int c = 0; c < cv; c += kLanes) acc += Load(x + c);
    if (tail) acc += LoadPartial(x + cv, tail, 0.0f);
    const float m = HorizontalSum(acc) / C;
    const V4 vm = Splat(m);
    acc = Splat(0.0f);
    for (int c = 0; c < cv; c += kLanes) {
      const V4 d = Load(x + c) - vm;
      acc += d * d;
    }
    if (tail) {
      const V4 d = LoadPartial(x + cv, tail, m) - vm;
      acc += d * d;
    }
    const float var = HorizontalSum(acc) / C;
    const float s = 1.0f / std::sqrt(var + 1e-5f);
    for (int c = 0; c < C; ++c) o[c] = (x[c] - m) * s * weight[c] + bias[c];
    mean[i] = m;
    rstd[i] = s;
  });
}

void LayerNormBackward(const CpuContext& ctx, float* dinp, float* dweight, float* dbias,
                       const float* dout, const float* inp, const float* weight, const float* mean,
                       const float* rstd, int N, int C) {
  const int cv = C / kLanes * kLanes;
  const int tail = C - cv;
  // dinp: by rows.
  ParallelFor(ctx, N, [&](int64_t i) {
    const float* x = inp + i * C;
    const float* d = dout + i * C;
    float* di = dinp + i * C;
    const V4 m = Splat(mean[i]);
    const V4 s = Splat(rstd[i]);
    V4 acc_dn = Splat(0.0f);
    V4 acc_dnn = Splat(0.0f);
    for (int c = 0; c < cv; c += kLanes) {
      const V4 norm = (Load(x + c) - m) * s;
      const V4 dn = Load(weight + c) * Load(d + c);
      acc_dn += dn;
      acc_dnn += dn * norm;
    }
    if (tail) {
      const V4 norm = (LoadPartial(x + cv, tail, 0.0f) - m) * s;
      const V4 dn = LoadPartial(weight + cv, tail, 0.0f) * LoadPartial(d + cv, tail, 0.0f);
      acc_dn += dn;
      acc_dnn += dn * norm;
    }
    const float dn_mean = HorizontalSum(acc_dn) / C;
    const float dnn_mean = HorizontalSum(acc_dnn) / C;
    const float sm = mean[i], ss = rstd[i];
    for (int c = 0; c < C; ++c) {
      const float norm = (x[c] - sm) * ss;
      const float dn = weight[c] * d[c];
      di[c] += (dn - dn_mean - norm * dnn_mean) * ss;
    }
  });
  // dweight, dbias: by columns, rows in ascending order.
  ParallelRanges(ctx, C, [&](int64_t c0, int64_t c1) {
    for (int64_t i = 0; i < N; ++i) {
      const float* x = inp + i * C;
      const float* d = dout + i * C;
      const float m = mean[i], s = rstd[i];
      for (int64_t c = c0; c < c1; ++c) {
        dweight[c] += (x[c] - m) * s * d[c];
        dbias[c] += d[c];
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Matmul.

void MatmulForward(const CpuContext& ctx, float* out, const float* inp, const float* weight,
                   const float* bias, int N, int C, int OC) {
  SetBlasThreads(ctx.threads);
  float beta = 0.0f;
  if (bias != nullptr) {
    ParallelFor(ctx, N, [&](int64_t i) { std::memcpy(out + i * OC, bias, sizeof(float) * OC); });
    beta = 1.0f;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, C, 1.0f, inp, C, weight, C, beta, out,
              OC);
}

void MatmulBackward(const CpuContext& ctx, float* dinp, float* dweight, float* dbias,
                    const float* dout, const float* inp, const float* weight, int N, int C,
                    int OC) {
  SetBlasThreads(ctx.threads);
  // dinp[N,C] += dout[N,OC] * weight[OC,C]
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, C, OC, 1.0f, dout, OC, weight, C, 1.0f,
              dinp, C);
  // dweight[OC,C] += dout^T[OC,N] * inp[N,C]
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f,
              dweight, C);
  if (dbias != nullptr) {
    ParallelRanges(ctx, OC, [&](int64_t c0, int64_t c1) {
      for (int64_t i = 0; i < N; ++i) {
        const float* d = dout + i * OC;
        for (int64_t c = c0; c < c1; ++c) dbias[c] += d[c];
      }
    });
  }
}

// ---------------------------------------------------------------------------------------
// Attention. Per (b, head): q, k, v are [T, hs] slices of inp with row stride 3C. Scores
// S = q k^T / sqrt(hs), P = causal softmax(S) (stored in att), out = P v. Query rows are
// taken in blocks [r0, r1); a block only needs keys [0, r1).

void AttentionForward(const CpuContext& ctx, float* out, float* att, const float* inp, int B, int T,
                      int C, int NH) {
  const int hs = C / NH;
  const int C3 = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  // BLAS runs single-threaded inside the (b, head) loop: each pair is one thread's work.
  SetBlasThreads(1);
  ParallelFor(ctx, int64_t{B} * NH, [&](int64_t bh) {
    const int64_t b = bh / NH, h = bh % NH;
    const float* q = inp + b * T * C3 + h * hs;
    const float* k = q + C;
    const float* v = q + 2 * C;
    float* a = att + bh * T * T;
    float* o = out + b * T * C + h * hs;
    for (int r0 = 0; r0 < T; r0 += kAttentionRowBlock) {
      const int r1 = std::min(T, r0 + kAttentionRowBlock);
      const int m = r1 - r0;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, r1, hs, scale, q + int64_t{r0} * C3,
                  C3, k, C3, 0.0f, a + int64_t{r0} * T, T);
      for (int i = r0; i < r1; ++i) CausalSoftmaxRow(a + int64_t{i} * T, i + 1, T);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, hs, r1, 1.0f, a + int64_t{r0} * T,
                  T, v, C3, 0.0f, o + int64_t{r0} * C, C);
    }
  });
}

void AttentionBackward(const CpuContext& ctx, float* dinp, float* datt, const float* dout,
                       const float* inp, const float* att, int B, int T, int C, int NH) {
  const int hs = C / NH;
  const int C3 = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  SetBlasThreads(1);
  ParallelFor(ctx, int64_t{B} * NH, [&](int64_t bh) {
    const int64_t b = bh / NH, h = bh % NH;
    const float* q = inp + b * T * C3 + h * hs;
    const float* k = q + C;
    const float* v = q + 2 * C;
    float* dq = dinp + b * T * C3 + h * hs;
    float* dk = dq + C;
    float* dv = dq + 2 * C;
    const float* a = att + bh * T * T;
    float* da = datt + bh * T * T;
    const float* d = dout + b * T * C + h * hs;
    for (int r0 = 0; r0 < T; r0 += kAttentionRowBlock) {
      const int r1 = std::min(T, r0 + kAttentionRowBlock);
      const int m = r1 - r0;
      const float* a_blk = a + int64_t{r0} * T;
      float* da_blk = da + int64_t{r0} * T;
      const float* d_blk = d + int64_t{r0} * C;
      // dP = dout v^T
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, r1, hs, 1.0f, d_blk, C, v, C3, 0.0f,
                  da_blk, T);
      // dv += P^T dout
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r1, hs, m, 1.0f, a_blk, T, d_blk, C,
                  1.0f, dv, C3);
      // dS = softmax backward (dP), in place; the 1/sqrt(hs) goes into alpha below.
      for (int i = r0; i < r1; ++i) {
        CausalSoftmaxBackwardRow(da + int64_t{i} * T, a + int64_t{i} * T, i + 1, r1);
      }
      // dq += scale dS k ; dk += scale dS^T q
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, hs, r1, scale, da_blk, T, k, C3,
                  1.0f, dq + int64_t{r0} * C3, C3);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r1, hs, m, scale, da_blk, T,
                  q + int64_t{r0} * C3, C3, 1.0f, dk, C3);
    }
  });
}

// ---------------------------------------------------------------------------------------
// GELU and residual.

void GeluForward(const CpuContext& ctx, float* out, const float* inp, int64_t n) {
  ParallelRanges(ctx, n, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) Store(out + i, GeluForwardV(Load(inp + i)));
    if (i < end) {
      const int r = static_cast<int>(end - i);
      StorePartial(out + i, GeluForwardV(LoadPartial(inp + i, r, 0.0f)), r);
    }
  });
}

void GeluBackward(const CpuContext& ctx, float* dinp, const float* inp, const float* dout,
                  int64_t n) {
  ParallelRanges(ctx, n, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) {
      Store(dinp + i, Load(dinp + i) + GeluGradV(Load(inp + i)) * Load(dout + i));
    }
    if (i < end) {
      const int r = static_cast<int>(end - i);
      const V4 g = GeluGradV(LoadPartial(inp + i, r, 0.0f)) * LoadPartial(dout + i, r, 0.0f);
      StorePartial(dinp + i, LoadPartial(dinp + i, r, 0.0f) + g, r);
    }
  });
}

void ResidualForward(const CpuContext& ctx, float* out, const float* a, const float* b, int64_t n) {
  ParallelRanges(ctx, n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = a[i] + b[i];
  });
}

void ResidualBackward(const CpuContext& ctx, float* da, float* db, const float* dout, int64_t n) {
  ParallelRanges(ctx, n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      da[i] += dout[i];
      db[i] += dout[i];
    }
  });
}

// ---------------------------------------------------------------------------------------
// Softmax + cross-entropy.

void SoftmaxCrossEntropyForward(const CpuContext& ctx, float* probs, float* losses,
                                const float* logits, const int32_t* targets, int N, int V, int Vp) {
  const int vv = V / kLanes * kLanes;
  const int tail = V - vv;
  ParallelFor(ctx, N, [&](int64_t i) {
    const float* x = logits + i * Vp;
    float* p = probs + i * Vp;
    V4 vmax = Splat(-INFINITY);
    for (int j = 0; j < vv; j += kLanes) vmax = Max(vmax, Load(x + j));
    if (tail) vmax = Max(vmax, LoadPartial(x + vv, tail, -INFINITY));
    const float mx = HorizontalMax(vmax);
    const V4 vmx = Splat(mx);
    V4 sum = Splat(0.0f);
    for (int j = 0; j < vv; j += kLanes) {
      const V4 e = Exp(Load(x + j) - vmx);
      Store(p + j, e);
      sum += e;
    }
    if (tail) {
      const V4 e = Exp(LoadPartial(x + vv, tail, -INFINITY) - vmx);
      StorePartial(p + vv, e, tail);
      sum += e;
    }
    const float total = HorizontalSum(sum);
    const V4 inv = Splat(1.0f / total);
    for (int j = 0; j < vv; j += kLanes) Store(p + j, Load(p + j) * inv);
    if (tail) StorePartial(p + vv, LoadPartial(p + vv, tail, 0.0f) * inv, tail);
    for (int j = V; j < Vp; ++j) p[j] = 0.0f;
    // -log softmax[target], without forming the (possibly tiny) probability first.
    losses[i] = std::log(total) - (x[targets[i]] - mx);
  });
}

void SoftmaxCrossEntropyBackward(const CpuContext& ctx, float* dlogits, const float* probs,
                                 const int32_t* targets, float dloss_scale, int N, int V, int Vp) {
  ParallelFor(ctx, N, [&](int64_t i) {
    const float* p = probs + i * Vp;
    float* d = dlogits + i * Vp;
    for (int j = 0; j < V; ++j) d[j] = p[j] * dloss_scale;
    for (int j = V; j < Vp; ++j) d[j] = 0.0f;
    d[targets[i]] = (p[targets[i]] - 1.0f) * dloss_scale;
  });
}

// ---------------------------------------------------------------------------------------
// Optimiser support.

double SumOfSquares(const CpuContext& ctx, const float* grads, int64_t n) {
  // A fixed number of chunks, independent of the thread count, summed in chunk order.
  constexpr int kChunks = 64;
  double partial[kChunks];
  ParallelFor(ctx, kChunks, [&](int64_t c) {
    const int64_t begin = n * c / kChunks;
    const int64_t end = n * (c + 1) / kChunks;
    V4d acc0 = {0, 0, 0, 0}, acc1 = {0, 0, 0, 0};
    int64_t i = begin;
    for (; i + 8 <= end; i += 8) {
      V4 lo, hi;
      std::memcpy(&lo, grads + i, sizeof(lo));
      std::memcpy(&hi, grads + i + 4, sizeof(hi));
      const V4d dlo = __builtin_convertvector(lo, V4d);
      const V4d dhi = __builtin_convertvector(hi, V4d);
      acc0 += dlo * dlo;
      acc1 += dhi * dhi;
    }
    const V4d acc = acc0 + acc1;
    double s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (; i < end; ++i) s += static_cast<double>(grads[i]) * grads[i];
    partial[c] = s;
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

void AdamWUpdate(const CpuContext& ctx, float* params, const float* grads, float* m, float* v,
                 const uint8_t* decay_mask, int64_t n, const AdamWParams& p) {
  const V4 beta1 = Splat(p.beta1), beta2 = Splat(p.beta2), eps = Splat(p.eps), lr = Splat(p.lr);
  const V4 one_minus_beta1 = Splat(1.0f - p.beta1), one_minus_beta2 = Splat(1.0f - p.beta2);
  const V4 gs = Splat(p.grad_scale);
  const float wd = p.weight_decay;
  // Bias corrections as factors, in double once.
  const V4 c1 =
      Splat(static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(p.beta1), p.t))));
  const V4 c2 =
      Splat(static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(p.beta2), p.t))));
  // Four parameters; `count` < 4 handles the tail with padded lanes (same arithmetic).
  auto step = [&](int64_t i, int count) {
    const bool full = count == kLanes;
    const V4 g = (full ? Load(grads + i) : LoadPartial(grads + i, count, 0.0f)) * gs;
    const V4 mi =
        beta1 * (full ? Load(m + i) : LoadPartial(m + i, count, 0.0f)) + one_minus_beta1 * g;
    const V4 vi =
        beta2 * (full ? Load(v + i) : LoadPartial(v + i, count, 0.0f)) + one_minus_beta2 * (g * g);
    const V4 w = full ? Load(params + i) : LoadPartial(params + i, count, 0.0f);
    V4 decay = Splat(wd);
    if (decay_mask != nullptr) {
      for (int k = 0; k < count; ++k) decay[k] = decay_mask[i + k] != 0 ? wd : 0.0f;
    }
    const V4 w_new = w - lr * ((mi * c1) / (Sqrt(vi * c2) + eps) + decay * w);
    if (full) {
      Store(m + i, mi);
      Store(v + i, vi);
      Store(params + i, w_new);
    } else {
      StorePartial(m + i, mi, count);
      StorePartial(v + i, vi, count);
      StorePartial(params + i, w_new, count);
    }
  };
  ParallelRanges(ctx, n, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) step(i, kLanes);
    if (i < end) step(i, static_cast<int>(end - i));
  });
}

}  // namespace spotrain::kernels::cpu
