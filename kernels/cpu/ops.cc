// CPU reference kernels (see ops.h for the contracts).
//
// Speed. The linear layers' products go to OpenBLAS sgemm. Everything else is written with
// GCC vector types in templates over the vector width, compiled twice: a baseline 4-lane
// instance (SSE4.2 or any target's 128-bit vectors, as the build's -march allows) and an
// 8-lane instance in functions marked target("avx2,fma"), chosen at run time when the CPU
// has AVX2 and FMA (see SetCpuIsa). softmax and GELU use an in-house exp() (a Cephes-style
// polynomial) so that they vectorise. Attention on AVX2 is a register-blocked kernel per
// (batch, head) on operands packed into cache-friendly panels, skipping the causal upper
// triangle (in blocks of 8 keys); elsewhere (baseline ISA, or shapes it does not cover) it
// is sgemm per (batch, head) and block of 32 query rows.
//
// Determinism. At a given ISA level, every output element is computed by exactly one
// thread with the same sequence of floating-point operations whatever the thread count:
//   - row-wise work (LayerNorm, softmax, cross-entropy) is split by rows;
//   - reductions over rows into a parameter gradient (LayerNorm dweight/dbias, matmul
//     dbias, encoder dwte/dwpe) are split by columns, each column summed over rows in
//     ascending order;
//   - attention is split over (batch, head) pairs; its sgemm calls run single-threaded;
//   - reductions over a whole vector (SumOfSquares) use a fixed chunking independent of
//     the thread count, combined in chunk order;
//   - vector bodies and tails perform identical per-lane arithmetic (tails are processed
//     as padded vectors), so where a thread's range starts does not matter.
// Hence the non-BLAS kernels are bit-identical for any ctx.threads. The two ISA levels
// differ in the last bits (vector width changes the order of row reductions, and FMA
// rounds once), as different OpenBLAS kernels do on different CPUs. The linear layers'
// sgemm calls run with ctx.threads OpenBLAS threads, and OpenBLAS 0.3.21's results do
// change in the last bits between one and several threads (checked on every operand
// layout used here).
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#define SPOTRAIN_HAVE_AVX2_PATH 1
#define SPOTRAIN_AVX2 __attribute__((target("avx2,fma")))
#endif

#include "kernels/cpu/ops.h"

// 32-byte vectors are passed to and returned from helpers that are always inlined into
// functions compiled with AVX2; the ABI note for the (never emitted) baseline copies is
// irrelevant.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace spotrain::kernels::cpu {
namespace {

// ---------------------------------------------------------------------------------------
// Vector helpers, templated over the vector type. (Generic vectors wider than the target's
// registers get their comparisons scalarised by GCC, so each instance uses one register's
// width: V4 in baseline code, V8 inside SPOTRAIN_AVX2 functions.)

typedef float V4 __attribute__((vector_size(16)));
typedef int32_t I4 __attribute__((vector_size(16)));
typedef float V8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));
typedef double V4d __attribute__((vector_size(32)));

template <class V>
struct VecTraits;
template <>
struct VecTraits<V4> {
  using Int = I4;
  static constexpr int kLanes = 4;
};
template <>
struct VecTraits<V8> {
  using Int = I8;
  static constexpr int kLanes = 8;
};
template <class V>
constexpr int kLanesOf = VecTraits<V>::kLanes;

// Ranges handed to threads start at multiples of this (the widest vector).
constexpr int kMaxLanes = 8;

#define SPOTRAIN_INLINE inline __attribute__((always_inline))

template <class V>
SPOTRAIN_INLINE V Load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class V>
SPOTRAIN_INLINE void Store(float* p, const V& v) {
  std::memcpy(p, &v, sizeof(v));
}
// A broadcast written as a shuffle: GCC 12 expands a vector constructor {x, x, ...} in the
// baseline target before inlining into AVX2 code (lane-by-lane inserts), and `V{} + x`
// keeps a scalar add (adding 0.0f is not a no-op for -0.0f); the shuffle becomes one
// vbroadcastss / shufps.
template <class V>
SPOTRAIN_INLINE V Splat(float x) {
  using Int = typename VecTraits<V>::Int;
  return __builtin_shuffle(V{x}, Int{});
}
// The first n (< lanes) lanes from p, the rest `fill`.
template <class V>
SPOTRAIN_INLINE V LoadPartial(const float* p, int n, float fill) {
  V v = Splat<V>(fill);
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
}
template <class V>
SPOTRAIN_INLINE void StorePartial(float* p, const V& v, int n) {
  for (int i = 0; i < n; ++i) p[i] = v[i];
}
// mask ? a : b per lane, with a mask from a vector comparison (all ones or all zeros).
// (Each instance uses its target's native width, where GCC turns these into blend, max and
// min instructions.)
template <class V>
SPOTRAIN_INLINE V Select(const typename VecTraits<V>::Int& mask, const V& a, const V& b) {
  return mask ? a : b;
}
template <class V>
SPOTRAIN_INLINE V Max(const V& a, const V& b) {
  return a > b ? a : b;
}
template <class V>
SPOTRAIN_INLINE V Min(const V& a, const V& b) {
  return a < b ? a : b;
}
// Pairwise tree in a fixed order.
template <class V>
SPOTRAIN_INLINE float HorizontalSum(const V& v) {
  constexpr int n = kLanesOf<V>;
  float s[n];
  std::memcpy(s, &v, sizeof(s));
  for (int w = n / 2; w >= 1; w /= 2) {
    for (int i = 0; i < w; ++i) s[i] = s[i] + s[i + w];
  }
  return s[0];
}
template <class V>
SPOTRAIN_INLINE float HorizontalMax(const V& v) {
  float m = v[0];
  for (int i = 1; i < kLanesOf<V>; ++i) m = std::max(m, v[i]);
  return m;
}

// exp(x) to within about 2 ulp for x in [-87.3, 88]: Cody-Waite reduction x = n ln2 + r,
// a degree-6 polynomial for e^r (Cephes expf coefficients), and 2^n added to the exponent
// bits. Below -87.3 it returns 0 (so exp(-inf) == 0); above 88 it saturates at e^88.
template <class V>
SPOTRAIN_INLINE V Exp(const V& in) {
  using Int = typename VecTraits<V>::Int;
  const V lo = Splat<V>(-87.33654f);
  const Int underflow = in < lo;
  const V x = Min<V>(Max<V>(in, lo), Splat<V>(88.0f));
  const V magic = Splat<V>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const V t = x * Splat<V>(1.44269504088896341f) + magic;
  const V n = t - magic;
  V r = x - n * Splat<V>(0.693359375f);
  r = r - n * Splat<V>(-2.12194440e-4f);
  V p = Splat<V>(1.9875691500e-4f);
  p = p * r + Splat<V>(1.3981999507e-3f);
  p = p * r + Splat<V>(8.3334519073e-3f);
  p = p * r + Splat<V>(4.1665795894e-2f);
  p = p * r + Splat<V>(1.6666665459e-1f);
  p = p * r + Splat<V>(5.0000001201e-1f);
  p = p * (r * r) + r + Splat<V>(1.0f);
  Int ti, pi;
  std::memcpy(&ti, &t, sizeof(ti));
  std::memcpy(&pi, &p, sizeof(pi));
  const Int ni = ti - 0x4B400000;  // the integer n, from the bits of t
  pi += ni << 23;
  std::memcpy(&p, &pi, sizeof(p));
  return Select<V>(underflow, Splat<V>(0.0f), p);
}

// ---------------------------------------------------------------------------------------
// ISA selection.

bool CpuHasAvx2() {
#if defined(SPOTRAIN_HAVE_AVX2_PATH)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// -1: automatic; 0: baseline; 1: AVX2.
std::atomic<int> g_forced_isa{-1};

bool UseAvx2() {
  static const bool detected = CpuHasAvx2();
  const int forced = g_forced_isa.load(std::memory_order_relaxed);
  return forced < 0 ? detected : forced == 1;
}

// Defines Name##Base (4 lanes) and Name##Avx2 (8 lanes, AVX2+FMA) from the always-inline
// template Name##Impl<V>, and Name##Pick() returning the one for the active ISA.
#if defined(SPOTRAIN_HAVE_AVX2_PATH)
#define SPOTRAIN_ISA_VARIANTS(Name, Params, Args)               \
  void Name##Base Params { Name##Impl<V4> Args; }               \
  SPOTRAIN_AVX2 void Name##Avx2 Params { Name##Impl<V8> Args; } \
  auto Name##Pick() { return UseAvx2() ? &Name##Avx2 : &Name##Base; }
#else
#define SPOTRAIN_ISA_VARIANTS(Name, Params, Args) \
  void Name##Base Params { Name##Impl<V4> Args; } \
  auto Name##Pick() { return &Name##Base; }
#endif

// ---------------------------------------------------------------------------------------
// Threading helpers. Each call of `f` gets a disjoint range; results must not depend on
// how ranges are cut (every caller computes each element independently of the others).

// Calls f(begin, end) on contiguous ranges of [0, n), cut at multiples of kMaxLanes.
template <typename F>
void ParallelRanges(const CpuContext& ctx, int64_t n, F&& f) {
  if (ctx.threads <= 1 || n < 2 * kMaxLanes) {
    f(int64_t{0}, n);
    return;
  }
#pragma omp parallel num_threads(ctx.threads)
  {
    const int64_t nt = omp_get_num_threads();
    const int64_t tid = omp_get_thread_num();
    int64_t per = (n + nt - 1) / nt;
    per = (per + kMaxLanes - 1) / kMaxLanes * kMaxLanes;
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

// ---------------------------------------------------------------------------------------
// Row and range bodies of the elementwise kernels.

template <class V>
SPOTRAIN_INLINE void LayerNormForwardImpl(float* out, float* mean, float* rstd, const float* inp,
                                          const float* weight, const float* bias, int C,
                                          int64_t row_begin, int64_t row_end) {
  constexpr int W = kLanesOf<V>;
  const int cv = C / W * W;
  const int tail = C - cv;
  for (int64_t i = row_begin; i < row_end; ++i) {
    const float* x = inp + i * C;
    float* o = out + i * C;
    V acc = Splat<V>(0.0f);
    for (int c = 0; c < cv; c += W) acc += Load<V>(x + c);
    if (tail) acc += LoadPartial<V>(x + cv, tail, 0.0f);
    const float m = HorizontalSum(acc) / C;
    const V vm = Splat<V>(m);
    acc = Splat<V>(0.0f);
    for (int c = 0; c < cv; c += W) {
      const V d = Load<V>(x + c) - vm;
      acc += d * d;
    }
    if (tail) {
      const V d = LoadPartial<V>(x + cv, tail, m) - vm;
      acc += d * d;
    }
    const float var = HorizontalSum(acc) / C;
    const float s = 1.0f / std::sqrt(var + 1e-5f);
    const V vs = Splat<V>(s);
    for (int c = 0; c < cv; c += W) {
      Store(o + c, (Load<V>(x + c) - vm) * vs * Load<V>(weight + c) + Load<V>(bias + c));
    }
    if (tail) {
      StorePartial(
          o + cv,
          (LoadPartial<V>(x + cv, tail, 0.0f) - vm) * vs * LoadPartial<V>(weight + cv, tail, 0.0f) +
              LoadPartial<V>(bias + cv, tail, 0.0f),
          tail);
    }
    mean[i] = m;
    rstd[i] = s;
  }
}
SPOTRAIN_ISA_VARIANTS(LayerNormForward,
                      (float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int C, int64_t row_begin, int64_t row_end),
                      (out, mean, rstd, inp, weight, bias, C, row_begin, row_end))

template <class V>
SPOTRAIN_INLINE void LayerNormBackwardRowsImpl(float* dinp, const float* dout, const float* inp,
                                               const float* weight, const float* mean,
                                               const float* rstd, int C, int64_t row_begin,
                                               int64_t row_end) {
  constexpr int W = kLanesOf<V>;
  const int cv = C / W * W;
  const int tail = C - cv;
  for (int64_t i = row_begin; i < row_end; ++i) {
    const float* x = inp + i * C;
    const float* d = dout + i * C;
    float* di = dinp + i * C;
    const V m = Splat<V>(mean[i]);
    const V s = Splat<V>(rstd[i]);
    V acc_dn = Splat<V>(0.0f);
    V acc_dnn = Splat<V>(0.0f);
    for (int c = 0; c < cv; c += W) {
      const V norm = (Load<V>(x + c) - m) * s;
      const V dn = Load<V>(weight + c) * Load<V>(d + c);
      acc_dn += dn;
      acc_dnn += dn * norm;
    }
    if (tail) {
      const V norm = (LoadPartial<V>(x + cv, tail, 0.0f) - m) * s;
      const V dn = LoadPartial<V>(weight + cv, tail, 0.0f) * LoadPartial<V>(d + cv, tail, 0.0f);
      acc_dn += dn;
      acc_dnn += dn * norm;
    }
    const V dn_mean = Splat<V>(HorizontalSum(acc_dn) / C);
    const V dnn_mean = Splat<V>(HorizontalSum(acc_dnn) / C);
    for (int c = 0; c < cv; c += W) {
      const V norm = (Load<V>(x + c) - m) * s;
      const V dn = Load<V>(weight + c) * Load<V>(d + c);
      Store(di + c, Load<V>(di + c) + (dn - dn_mean - norm * dnn_mean) * s);
    }
    if (tail) {
      const V norm = (LoadPartial<V>(x + cv, tail, 0.0f) - m) * s;
      const V dn = LoadPartial<V>(weight + cv, tail, 0.0f) * LoadPartial<V>(d + cv, tail, 0.0f);
      StorePartial(di + cv,
                   LoadPartial<V>(di + cv, tail, 0.0f) + (dn - dn_mean - norm * dnn_mean) * s,
                   tail);
    }
  }
}
SPOTRAIN_ISA_VARIANTS(LayerNormBackwardRows,
                      (float* dinp, const float* dout, const float* inp, const float* weight,
                       const float* mean, const float* rstd, int C, int64_t row_begin,
                       int64_t row_end),
                      (dinp, dout, inp, weight, mean, rstd, C, row_begin, row_end))

// dweight[c] += sum_i norm[i,c] dout[i,c], dbias[c] += sum_i dout[i,c] over c in [c0, c1),
// rows in ascending order.
template <class V>
SPOTRAIN_INLINE void LayerNormBackwardColumnsImpl(float* dweight, float* dbias, const float* dout,
                                                  const float* inp, const float* mean,
                                                  const float* rstd, int N, int C, int64_t c0,
                                                  int64_t c1) {
  constexpr int W = kLanesOf<V>;
  for (int64_t i = 0; i < N; ++i) {
    const float* x = inp + i * C;
    const float* d = dout + i * C;
    const V m = Splat<V>(mean[i]), s = Splat<V>(rstd[i]);
    int64_t c = c0;
    for (; c + W <= c1; c += W) {
      const V dv = Load<V>(d + c);
      Store(dweight + c, Load<V>(dweight + c) + (Load<V>(x + c) - m) * s * dv);
      Store(dbias + c, Load<V>(dbias + c) + dv);
    }
    if (c < c1) {
      const int r = static_cast<int>(c1 - c);
      const V dv = LoadPartial<V>(d + c, r, 0.0f);
      StorePartial(
          dweight + c,
          LoadPartial<V>(dweight + c, r, 0.0f) + (LoadPartial<V>(x + c, r, 0.0f) - m) * s * dv, r);
      StorePartial(dbias + c, LoadPartial<V>(dbias + c, r, 0.0f) + dv, r);
    }
  }
}
SPOTRAIN_ISA_VARIANTS(LayerNormBackwardColumns,
                      (float* dweight, float* dbias, const float* dout, const float* inp,
                       const float* mean, const float* rstd, int N, int C, int64_t c0, int64_t c1),
                      (dweight, dbias, dout, inp, mean, rstd, N, C, c0, c1))

// GELU (tanh approximation) written as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3),
// since 0.5 (1 + tanh(u)) == 1 / (1 + exp(-2u)); this avoids the cancellation of 1 + tanh.
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluCube = 0.044715f;

// The exponent is capped at 80 so that s stays a normal float (>= 1.8e-35) for very
// negative x (denormals are slow); the true values there are below 1e-33 anyway.
template <class V>
SPOTRAIN_INLINE V GeluSigmoid(const V& x) {
  const V u = Splat<V>(kGeluScale) * (x + Splat<V>(kGeluCube) * x * x * x);
  return Splat<V>(1.0f) / (Splat<V>(1.0f) + Exp<V>(Min<V>(Splat<V>(-2.0f) * u, Splat<V>(80.0f))));
}
// d/dx [x s(2u)] = s + 2 x s (1 - s) u'(x).
template <class V>
SPOTRAIN_INLINE V GeluGrad(const V& x) {
  const V s = GeluSigmoid<V>(x);
  const V du = Splat<V>(kGeluScale) * (Splat<V>(1.0f) + Splat<V>(3.0f * kGeluCube) * x * x);
  return s + Splat<V>(2.0f) * x * s * (Splat<V>(1.0f) - s) * du;
}

template <class V>
SPOTRAIN_INLINE void GeluForwardImpl(float* out, const float* inp, int64_t begin, int64_t end) {
  constexpr int W = kLanesOf<V>;
  int64_t i = begin;
  for (; i + W <= end; i += W) {
    const V x = Load<V>(inp + i);
    Store(out + i, x * GeluSigmoid<V>(x));
  }
  if (i < end) {
    const int r = static_cast<int>(end - i);
    const V x = LoadPartial<V>(inp + i, r, 0.0f);
    StorePartial(out + i, x * GeluSigmoid<V>(x), r);
  }
}
SPOTRAIN_ISA_VARIANTS(GeluForward, (float* out, const float* inp, int64_t begin, int64_t end),
                      (out, inp, begin, end))

template <class V>
SPOTRAIN_INLINE void GeluBackwardImpl(float* dinp, const float* inp, const float* dout,
                                      int64_t begin, int64_t end) {
  constexpr int W = kLanesOf<V>;
  int64_t i = begin;
  for (; i + W <= end; i += W) {
    Store(dinp + i, Load<V>(dinp + i) + GeluGrad<V>(Load<V>(inp + i)) * Load<V>(dout + i));
  }
  if (i < end) {
    const int r = static_cast<int>(end - i);
    const V g = GeluGrad<V>(LoadPartial<V>(inp + i, r, 0.0f)) * LoadPartial<V>(dout + i, r, 0.0f);
    StorePartial(dinp + i, LoadPartial<V>(dinp + i, r, 0.0f) + g, r);
  }
}
SPOTRAIN_ISA_VARIANTS(GeluBackward,
                      (float* dinp, const float* inp, const float* dout, int64_t begin,
                       int64_t end),
                      (dinp, inp, dout, begin, end))

// Softmax + cross-entropy of rows [row_begin, row_end).
template <class V>
SPOTRAIN_INLINE void SoftmaxCrossEntropyImpl(float* probs, float* losses, const float* logits,
                                             const int32_t* targets, int V_, int Vp,
                                             int64_t row_begin, int64_t row_end) {
  constexpr int W = kLanesOf<V>;
  const int vv = V_ / W * W;
  const int tail = V_ - vv;
  for (int64_t i = row_begin; i < row_end; ++i) {
    const float* x = logits + i * Vp;
    float* p = probs + i * Vp;
    V vmax = Splat<V>(-INFINITY);
    for (int j = 0; j < vv; j += W) vmax = Max<V>(vmax, Load<V>(x + j));
    if (tail) vmax = Max<V>(vmax, LoadPartial<V>(x + vv, tail, -INFINITY));
    const float mx = HorizontalMax(vmax);
    const V vmx = Splat<V>(mx);
    V sum = Splat<V>(0.0f);
    for (int j = 0; j < vv; j += W) {
      const V e = Exp<V>(Load<V>(x + j) - vmx);
      Store(p + j, e);
      sum += e;
    }
    if (tail) {
      const V e = Exp<V>(LoadPartial<V>(x + vv, tail, -INFINITY) - vmx);
      StorePartial(p + vv, e, tail);
      sum += e;
    }
    const float total = HorizontalSum(sum);
    const V inv = Splat<V>(1.0f / total);
    for (int j = 0; j < vv; j += W) Store(p + j, Load<V>(p + j) * inv);
    if (tail) StorePartial(p + vv, LoadPartial<V>(p + vv, tail, 0.0f) * inv, tail);
    for (int j = V_; j < Vp; ++j) p[j] = 0.0f;
    // -log softmax[target], without forming the (possibly tiny) probability first.
    losses[i] = std::log(total) - (x[targets[i]] - mx);
  }
}
SPOTRAIN_ISA_VARIANTS(SoftmaxCrossEntropy,
                      (float* probs, float* losses, const float* logits, const int32_t* targets,
                       int V_, int Vp, int64_t row_begin, int64_t row_end),
                      (probs, losses, logits, targets, V_, Vp, row_begin, row_end))

// ---------------------------------------------------------------------------------------
// Attention pieces.

// Softmax over row[0, n) in place (row already holds the scaled scores), zeroes [n, len).
template <class V>
SPOTRAIN_INLINE void CausalSoftmaxRowImpl(float* row, int n, int len) {
  constexpr int W = kLanesOf<V>;
  const int nv = n / W * W;
  const int tail = n - nv;
  V vmax = Splat<V>(-INFINITY);
  for (int j = 0; j < nv; j += W) vmax = Max<V>(vmax, Load<V>(row + j));
  if (tail) vmax = Max<V>(vmax, LoadPartial<V>(row + nv, tail, -INFINITY));
  const V mx = Splat<V>(HorizontalMax(vmax));
  V sum = Splat<V>(0.0f);
  for (int j = 0; j < nv; j += W) {
    const V e = Exp<V>(Load<V>(row + j) - mx);
    Store(row + j, e);
    sum += e;
  }
  if (tail) {
    const V e = Exp<V>(LoadPartial<V>(row + nv, tail, -INFINITY) - mx);
    StorePartial(row + nv, e, tail);
    sum += e;
  }
  const V inv = Splat<V>(1.0f / HorizontalSum(sum));
  for (int j = 0; j < nv; j += W) Store(row + j, Load<V>(row + j) * inv);
  if (tail) StorePartial(row + nv, LoadPartial<V>(row + nv, tail, 0.0f) * inv, tail);
  std::memset(row + n, 0, sizeof(float) * (len - n));
}
SPOTRAIN_ISA_VARIANTS(CausalSoftmaxRow, (float* row, int n, int len), (row, n, len))

// dS[j] = P[j] * (dP[j] - sum_k P[k] dP[k]) over j < n, in place over dp; zeroes [n, len).
template <class V>
SPOTRAIN_INLINE void CausalSoftmaxBackwardRowImpl(float* dp, const float* p, int n, int len) {
  constexpr int W = kLanesOf<V>;
  const int nv = n / W * W;
  const int tail = n - nv;
  V acc = Splat<V>(0.0f);
  for (int j = 0; j < nv; j += W) acc += Load<V>(p + j) * Load<V>(dp + j);
  if (tail) acc += LoadPartial<V>(p + nv, tail, 0.0f) * LoadPartial<V>(dp + nv, tail, 0.0f);
  const V dot = Splat<V>(HorizontalSum(acc));
  for (int j = 0; j < nv; j += W) Store(dp + j, Load<V>(p + j) * (Load<V>(dp + j) - dot));
  if (tail) {
    StorePartial(dp + nv,
                 LoadPartial<V>(p + nv, tail, 0.0f) * (LoadPartial<V>(dp + nv, tail, 0.0f) - dot),
                 tail);
  }
  std::memset(dp + n, 0, sizeof(float) * (len - n));
}
SPOTRAIN_ISA_VARIANTS(CausalSoftmaxBackwardRow, (float* dp, const float* p, int n, int len),
                      (dp, p, n, len))

// Query rows handled per block by the sgemm attention: a block of rows [r0, r1) only
// multiplies against keys [0, r1), which skips most of the causal upper triangle at the
// cost of more, smaller sgemm calls.
constexpr int kAttentionRowBlock = 32;

void AttentionForwardSgemm(float* out, float* att, const float* inp, int64_t bh, int T, int C,
                           int NH) {
  const int hs = C / NH;
  const int C3 = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  auto softmax_row = CausalSoftmaxRowPick();
  const int64_t b = bh / NH, h = bh % NH;
  const float* q = inp + b * T * C3 + h * hs;
  const float* k = q + C;
  const float* v = q + 2 * C;
  float* a = att + bh * T * T;
  float* o = out + b * T * C + h * hs;
  for (int r0 = 0; r0 < T; r0 += kAttentionRowBlock) {
    const int r1 = std::min(T, r0 + kAttentionRowBlock);
    const int m = r1 - r0;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, r1, hs, scale, q + int64_t{r0} * C3, C3,
                k, C3, 0.0f, a + int64_t{r0} * T, T);
    for (int i = r0; i < r1; ++i) softmax_row(a + int64_t{i} * T, i + 1, T);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, hs, r1, 1.0f, a + int64_t{r0} * T, T,
                v, C3, 0.0f, o + int64_t{r0} * C, C);
  }
}

void AttentionBackwardSgemm(float* dinp, float* datt, const float* dout, const float* inp,
                            const float* att, int64_t bh, int T, int C, int NH) {
  const int hs = C / NH;
  const int C3 = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  auto softmax_backward_row = CausalSoftmaxBackwardRowPick();
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
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r1, hs, m, 1.0f, a_blk, T, d_blk, C, 1.0f,
                dv, C3);
    // dS = softmax backward (dP), in place; the 1/sqrt(hs) goes into alpha below.
    for (int i = r0; i < r1; ++i) {
      softmax_backward_row(da + int64_t{i} * T, a + int64_t{i} * T, i + 1, r1);
    }
    // dq += scale dS k ; dk += scale dS^T q
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, hs, r1, scale, da_blk, T, k, C3, 1.0f,
                dq + int64_t{r0} * C3, C3);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r1, hs, m, scale, da_blk, T,
                q + int64_t{r0} * C3, C3, 1.0f, dk, C3);
  }
}

#if defined(SPOTRAIN_HAVE_AVX2_PATH)
// The AVX2 attention kernel works on one (batch, head) with T and hs multiples of 8. q, k,
// v and dout rows sit 3C or C floats apart in memory, strides that map every row to the
// same few L1 sets; so, as a BLAS does, each operand is first packed on the stack into the
// layout its micro-kernel streams through:
//   panels of 8 keys, transposed:  [T/8][hs][8]   (for q k^T and dout v^T)
//   rows:                          [T][hs]        (for P v and dS k)
//   panels of 8 channels:          [hs/8][T][8]   (for dS^T q and P^T dout)
// Two scratch buffers of hs * T floats each (at most 64 KiB of stack together) and, in
// backward, one [T][16] column block (at most 32 KiB).
constexpr int kAttentionScratchFloats = 8192;
constexpr int kAttentionMaxT = 512;  // for the [T][16] column buffer of backward

bool Avx2AttentionApplies(int T, int hs) {
  return T % 8 == 0 && hs % 8 == 0 && int64_t{hs} * T <= kAttentionScratchFloats &&
         T <= kAttentionMaxT;
}

// Makes the compiler load v into a register once rather than fold the same load into
// every FMA that uses it (which doubles the loads of the inner loops below).
SPOTRAIN_INLINE void InRegister(V8& v) { asm("" : "+x"(v)); }

// x [T rows, stride ld][hs] -> [T/8][hs][8].
SPOTRAIN_INLINE void PackKeyPanels(const float* x, int64_t ld, int T, int hs, float* out) {
  for (int j = 0; j < T; j += 8) {
    float* panel = out + int64_t{j} * hs;
    for (int d = 0; d < hs; ++d) {
      for (int jj = 0; jj < 8; ++jj) panel[d * 8 + jj] = x[(j + jj) * ld + d];
    }
  }
}
// x [T rows, stride ld][hs] -> [T][hs].
SPOTRAIN_INLINE void PackRows(const float* x, int64_t ld, int T, int hs, float* out) {
  for (int j = 0; j < T; ++j) std::memcpy(out + int64_t{j} * hs, x + j * ld, sizeof(float) * hs);
}
// x [T rows, stride ld][hs] -> [hs/8][T][8].
SPOTRAIN_INLINE void PackChannelPanels(const float* x, int64_t ld, int T, int hs, float* out) {
  for (int d0 = 0; d0 < hs; d0 += 8) {
    float* panel = out + int64_t{d0} * T;
    for (int i = 0; i < T; ++i) std::memcpy(panel + i * 8, x + i * ld + d0, sizeof(float) * 8);
  }
}

// The micro-kernels below keep 8 accumulators in registers and feed each group of 8 FMAs
// with few loads: on Zen 3 broadcasts from memory, not FMAs, are what runs out first, so
// each kernel uses about 2 vector loads and 4 broadcasts per 8 FMAs.

// c[r][j] = alpha * sum_d a[r][d] * key[j][d] for rows r < 4 and keys j in [0, jend), jend a
// multiple of 8 (a: rows with stride lda; panels: PackKeyPanels of the keys).
SPOTRAIN_INLINE void RowsTimesKeys4(const float* a, int64_t lda, const float* panels, int hs,
                                    int jend, float alpha, float* c, int64_t ldc) {
  const V8 va = Splat<V8>(alpha);
  int j = 0;
  for (; j + 16 <= jend; j += 16) {
    const float* p0 = panels + int64_t{j} * hs;
    const float* p1 = p0 + 8 * hs;
    V8 acc0[4] = {}, acc1[4] = {};
    for (int d = 0; d < hs; ++d) {
      V8 b0 = Load<V8>(p0 + d * 8);
      V8 b1 = Load<V8>(p1 + d * 8);
      InRegister(b0);
      InRegister(b1);
      for (int r = 0; r < 4; ++r) {
        const V8 ar = Splat<V8>(a[r * lda + d]);
        acc0[r] += ar * b0;
        acc1[r] += ar * b1;
      }
    }
    for (int r = 0; r < 4; ++r) {
      Store(c + r * ldc + j, acc0[r] * va);
      Store(c + r * ldc + j + 8, acc1[r] * va);
    }
  }
  if (j < jend) {
    const float* p0 = panels + int64_t{j} * hs;
    V8 acc[4] = {};
    for (int d = 0; d < hs; ++d) {
      V8 b0 = Load<V8>(p0 + d * 8);
      InRegister(b0);
      for (int r = 0; r < 4; ++r) acc[r] += Splat<V8>(a[r * lda + d]) * b0;
    }
    for (int r = 0; r < 4; ++r) Store(c + r * ldc + j, acc[r] * va);
  }
}

// For rows r < R of c [., hs]: c[r][:] (+)= alpha * sum_{j < jend} p[r][j] * b[j][:], with b
// rows hs floats apart (PackRows), 8*DV channels at a time (R * DV == 8 accumulators).
template <int R, int DV, bool kAccumulate>
SPOTRAIN_INLINE void RowsTimesMatrixBlock(const float* p, int64_t ldp, const float* b, int hs,
                                          int jend, float alpha, float* c, int64_t ldc) {
  V8 acc[R][DV] = {};
  for (int j = 0; j < jend; ++j) {
    V8 bv[DV];
    for (int v = 0; v < DV; ++v) {
      V8 t = Load<V8>(b + j * hs + 8 * v);
      InRegister(t);
      bv[v] = t;
    }
    for (int r = 0; r < R; ++r) {
      const V8 pr = Splat<V8>(p[r * ldp + j]);
      for (int v = 0; v < DV; ++v) acc[r][v] += pr * bv[v];
    }
  }
  const V8 va = Splat<V8>(alpha);
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < DV; ++v) {
      float* cr = c + r * ldc + 8 * v;
      Store(cr, kAccumulate ? Load<V8>(cr) + acc[r][v] * va : acc[r][v] * va);
    }
  }
}

// Rows r < 4 of c [., hs] (+)= alpha * p[r][0, jend) * b[0, jend)[0, hs).
template <bool kAccumulate>
SPOTRAIN_INLINE void RowsTimesMatrix4(const float* p, int64_t ldp, const float* b, int hs, int jend,
                                      float alpha, float* c, int64_t ldc) {
  int d = 0;
  for (; d + 16 <= hs; d += 16) {
    RowsTimesMatrixBlock<4, 2, kAccumulate>(p, ldp, b + d, hs, jend, alpha, c + d, ldc);
  }
  if (d < hs) RowsTimesMatrixBlock<4, 1, kAccumulate>(p, ldp, b + d, hs, jend, alpha, c + d, ldc);
}

// c[j][d] += alpha * sum_{i in [j0, T)} p[i][j] * a[i][d] for the W (8 or 16) columns j in
// [j0, j0 + W) of p (rows ldp apart) and all d < hs, with a packed by PackChannelPanels.
// The column block of p is first copied into `column` ([T - j0][W], contiguous): walking
// p's rows directly would touch one line per row in a few cache sets, over and over.
// Lanes run over j; the result blocks are transposed into c on the way out. Rows i < j0
// are skipped: p is zero above the diagonal.
template <int NV>  // W = 8 * NV columns
SPOTRAIN_INLINE void ColumnsTimesMatrix(const float* p, int64_t ldp, const float* a_panels, int hs,
                                        int j0, int T, float alpha, float* column, float* c,
                                        int64_t ldc) {
  constexpr int W = 8 * NV;
  constexpr int D = 8 / NV;  // channels per pass: NV * D == 8 accumulators
  for (int i = j0; i < T; ++i) {
    for (int v = 0; v < NV; ++v) {
      Store(column + (i - j0) * W + 8 * v, Load<V8>(p + i * ldp + j0 + 8 * v));
    }
  }
  for (int d0 = 0; d0 < hs; d0 += D) {
    const float* panel = a_panels + int64_t{d0 / 8 * 8} * T;
    const int lane0 = d0 % 8;
    V8 acc[D][NV] = {};
    for (int i = j0; i < T; ++i) {
      V8 pv[NV];
      for (int v = 0; v < NV; ++v) {
        V8 t = Load<V8>(column + (i - j0) * W + 8 * v);
        InRegister(t);
        pv[v] = t;
      }
      const float* ai = panel + i * 8 + lane0;
      for (int dd = 0; dd < D; ++dd) {
        const V8 s = Splat<V8>(ai[dd]);
        for (int v = 0; v < NV; ++v) acc[dd][v] += s * pv[v];
      }
    }
    float block[D][W];  // [d][j]
    for (int dd = 0; dd < D; ++dd) {
      for (int v = 0; v < NV; ++v) Store(block[dd] + 8 * v, acc[dd][v]);
    }
    for (int jj = 0; jj < W; ++jj) {
      float* cj = c + (j0 + jj) * ldc + d0;
      for (int dd = 0; dd < D; ++dd) cj[dd] += alpha * block[dd][jj];
    }
  }
}

inline int RoundUp8(int x) { return (x + 7) / 8 * 8; }

SPOTRAIN_AVX2 void AttentionForwardAvx2(float* out, float* att, const float* inp, int64_t bh, int T,
                                        int C, int NH) {
  const int hs = C / NH;
  const int64_t C3 = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  const int64_t b = bh / NH, h = bh % NH;
  const float* q = inp + b * T * C3 + h * hs;
  const float* k = q + C;
  const float* v = q + 2 * C;
  float* a = att + bh * T * T;
  float* o = out + b * T * C + h * hs;
  float key_panels[kAttentionScratchFloats];
  float value_rows[kAttentionScratchFloats];
  PackKeyPanels(k, C3, T, hs, key_panels);
  PackRows(v, C3, T, hs, value_rows);
  for (int i0 = 0; i0 < T; i0 += 4) {
    // Scores of rows i0..i0+3 against keys [0, jend): the causal triangle rounded up to 8.
    RowsTimesKeys4(q + i0 * C3, C3, key_panels, hs, RoundUp8(i0 + 4), scale, a + int64_t{i0} * T,
                   T);
    for (int r = 0; r < 4; ++r) {
      CausalSoftmaxRowImpl<V8>(a + int64_t{i0 + r} * T, i0 + r + 1, T);
    }
    // out = P v; P is zero beyond each row's diagonal.
    RowsTimesMatrix4<false>(a + int64_t{i0} * T, T, value_rows, hs, i0 + 4, 1.0f, o + i0 * C, C);
  }
}

// ds: a [T, T] scratch buffer for dS.
SPOTRAIN_AVX2 void AttentionBackwardAvx2(float* dinp, float* ds, const float* dout,
                                         const float* inp, const float* att, int64_t bh, int T,
                                         int C, int NH) {
  const int hs = C / NH;
  const int64_t C3 = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
  const int64_t b = bh / NH, h = bh % NH;
  const float* q = inp + b * T * C3 + h * hs;
  const float* k = q + C;
  const float* v = q + 2 * C;
  float* dq = dinp + b * T * C3 + h * hs;
  float* dk = dq + C;
  float* dv = dq + 2 * C;
  const float* a = att + bh * T * T;
  float* da = ds;
  const float* d = dout + b * T * C + h * hs;
  float scratch0[kAttentionScratchFloats];
  float scratch1[kAttentionScratchFloats];
  // dS for every row (zero above the diagonal): dP = dout v^T, then softmax backward.
  PackKeyPanels(v, C3, T, hs, scratch0);
  for (int i0 = 0; i0 < T; i0 += 4) {
    RowsTimesKeys4(d + i0 * C, C, scratch0, hs, RoundUp8(i0 + 4), 1.0f, da + int64_t{i0} * T, T);
    // Zeroes only up to the diagonal rounded up to 16: no later pass reads further right.
    const int zero_end = std::min(T, (i0 + 4 + 15) / 16 * 16);
    for (int r = 0; r < 4; ++r) {
      CausalSoftmaxBackwardRowImpl<V8>(da + int64_t{i0 + r} * T, a + int64_t{i0 + r} * T,
                                       i0 + r + 1, zero_end);
    }
  }
  // dq += scale dS k (row i uses keys j <= i).
  PackRows(k, C3, T, hs, scratch0);
  for (int i0 = 0; i0 < T; i0 += 4) {
    RowsTimesMatrix4<true>(da + int64_t{i0} * T, T, scratch0, hs, i0 + 4, scale, dq + i0 * C3, C3);
  }
  // dk += scale dS^T q and dv += P^T dout (key j receives from rows i >= j).
  PackChannelPanels(q, C3, T, hs, scratch0);
  PackChannelPanels(d, C, T, hs, scratch1);
  float column[kAttentionMaxT * 16];
  int j0 = 0;
  for (; j0 + 16 <= T; j0 += 16) {
    ColumnsTimesMatrix<2>(da, T, scratch0, hs, j0, T, scale, column, dk, C3);
    ColumnsTimesMatrix<2>(a, T, scratch1, hs, j0, T, 1.0f, column, dv, C3);
  }
  if (j0 < T) {
    ColumnsTimesMatrix<1>(da, T, scratch0, hs, j0, T, scale, column, dk, C3);
    ColumnsTimesMatrix<1>(a, T, scratch1, hs, j0, T, 1.0f, column, dv, C3);
  }
}
#endif  // SPOTRAIN_HAVE_AVX2_PATH

// ---------------------------------------------------------------------------------------
// AdamW body (4 lanes in both ISAs: it is bound by memory traffic, and the 8-lane square
// root would need AVX intrinsics in a baseline template).

SPOTRAIN_INLINE V4 Sqrt(const V4& x) {
#if defined(__SSE__)
  return reinterpret_cast<V4>(_mm_sqrt_ps(reinterpret_cast<__m128>(x)));
#else
  V4 r;
  for (int i = 0; i < 4; ++i) r[i] = std::sqrt(x[i]);
  return r;
#endif
}

}  // namespace

bool SetCpuIsa(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAuto:
      g_forced_isa.store(-1);
      return true;
    case CpuIsa::kBaseline:
      g_forced_isa.store(0);
      return true;
    case CpuIsa::kAvx2:
      if (!CpuHasAvx2()) return false;
      g_forced_isa.store(1);
      return true;
  }
  return false;
}

const char* ActiveCpuIsa() { return UseAvx2() ? "avx2" : "baseline"; }

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
  auto rows = LayerNormForwardPick();
  ParallelRanges(
      ctx, N, [&](int64_t r0, int64_t r1) { rows(out, mean, rstd, inp, weight, bias, C, r0, r1); });
}

void LayerNormBackward(const CpuContext& ctx, float* dinp, float* dweight, float* dbias,
                       const float* dout, const float* inp, const float* weight, const float* mean,
                       const float* rstd, int N, int C) {
  auto rows = LayerNormBackwardRowsPick();
  auto columns = LayerNormBackwardColumnsPick();
  ParallelRanges(ctx, N, [&](int64_t r0, int64_t r1) {
    rows(dinp, dout, inp, weight, mean, rstd, C, r0, r1);
  });
  ParallelRanges(ctx, C, [&](int64_t c0, int64_t c1) {
    columns(dweight, dbias, dout, inp, mean, rstd, N, C, c0, c1);
  });
}

// ---------------------------------------------------------------------------------------
// Matmul.

void MatmulForward(const CpuContext& ctx, float* out, const float* inp, const float* weight,
                   const float* bias, int N, int C, int OC) {
  SetBlasThreads(ctx.blas_threads > 0 ? ctx.blas_threads : ctx.threads);
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
  SetBlasThreads(ctx.blas_threads > 0 ? ctx.blas_threads : ctx.threads);
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
// S = q k^T / sqrt(hs), P = causal softmax(S) (stored in att), out = P v.

void AttentionForward(const CpuContext& ctx, float* out, float* att, const float* inp, int B, int T,
                      int C, int NH) {
#if defined(SPOTRAIN_HAVE_AVX2_PATH)
  if (UseAvx2() && Avx2AttentionApplies(T, C / NH)) {
    ParallelFor(ctx, int64_t{B} * NH,
                [&](int64_t bh) { AttentionForwardAvx2(out, att, inp, bh, T, C, NH); });
    return;
  }
#endif
  // BLAS runs single-threaded inside the (b, head) loop: each pair is one thread's work.
  SetBlasThreads(1);
  ParallelFor(ctx, int64_t{B} * NH,
              [&](int64_t bh) { AttentionForwardSgemm(out, att, inp, bh, T, C, NH); });
}

void AttentionBackward(const CpuContext& ctx, float* dinp, float* datt, const float* dout,
                       const float* inp, const float* att, int B, int T, int C, int NH) {
#if defined(SPOTRAIN_HAVE_AVX2_PATH)
  if (UseAvx2() && Avx2AttentionApplies(T, C / NH)) {
    // Each thread reuses one [T, T] slot of datt as its dS buffer (slot = thread number),
    // so that it stays in cache from one (b, head) to the next instead of streaming all
    // of datt through memory.
    ParallelFor(ctx, int64_t{B} * NH, [&](int64_t bh) {
      float* slot = datt + int64_t{omp_get_thread_num()} * T * T;
      AttentionBackwardAvx2(dinp, slot, dout, inp, att, bh, T, C, NH);
    });
    return;
  }
#endif
  SetBlasThreads(1);
  ParallelFor(ctx, int64_t{B} * NH, [&](int64_t bh) {
    AttentionBackwardSgemm(dinp, datt, dout, inp, att, bh, T, C, NH);
  });
}

// ---------------------------------------------------------------------------------------
// GELU and residual.

void GeluForward(const CpuContext& ctx, float* out, const float* inp, int64_t n) {
  auto range = GeluForwardPick();
  ParallelRanges(ctx, n, [&](int64_t begin, int64_t end) { range(out, inp, begin, end); });
}

void GeluBackward(const CpuContext& ctx, float* dinp, const float* inp, const float* dout,
                  int64_t n) {
  auto range = GeluBackwardPick();
  ParallelRanges(ctx, n, [&](int64_t begin, int64_t end) { range(dinp, inp, dout, begin, end); });
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
  auto rows = SoftmaxCrossEntropyPick();
  ParallelRanges(
      ctx, N, [&](int64_t r0, int64_t r1) { rows(probs, losses, logits, targets, V, Vp, r0, r1); });
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
      const V4d lo = __builtin_convertvector(Load<V4>(grads + i), V4d);
      const V4d hi = __builtin_convertvector(Load<V4>(grads + i + 4), V4d);
      acc0 += lo * lo;
      acc1 += hi * hi;
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
  const V4 beta1 = Splat<V4>(p.beta1), beta2 = Splat<V4>(p.beta2), eps = Splat<V4>(p.eps);
  const V4 lr = Splat<V4>(p.lr), gs = Splat<V4>(p.grad_scale);
  const V4 one_minus_beta1 = Splat<V4>(1.0f - p.beta1);
  const V4 one_minus_beta2 = Splat<V4>(1.0f - p.beta2);
  const float wd = p.weight_decay;
  // Bias corrections as factors, computed in double once.
  const V4 c1 = Splat<V4>(static_cast<float>(1.0 / (1.0 - std::pow(double{p.beta1}, p.t))));
  const V4 c2 = Splat<V4>(static_cast<float>(1.0 / (1.0 - std::pow(double{p.beta2}, p.t))));
  // Four parameters; `count` < 4 handles the tail with padded lanes (same arithmetic).
  auto step = [&](int64_t i, int count) {
    const bool full = count == 4;
    const V4 g = (full ? Load<V4>(grads + i) : LoadPartial<V4>(grads + i, count, 0.0f)) * gs;
    const V4 mi = beta1 * (full ? Load<V4>(m + i) : LoadPartial<V4>(m + i, count, 0.0f)) +
                  one_minus_beta1 * g;
    const V4 vi = beta2 * (full ? Load<V4>(v + i) : LoadPartial<V4>(v + i, count, 0.0f)) +
                  one_minus_beta2 * (g * g);
    const V4 w = full ? Load<V4>(params + i) : LoadPartial<V4>(params + i, count, 0.0f);
    V4 decay = Splat<V4>(wd);
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
    for (; i + 4 <= end; i += 4) step(i, 4);
    if (i < end) step(i, static_cast<int>(end - i));
  });
}

}  // namespace spotrain::kernels::cpu
