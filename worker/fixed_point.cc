#include "worker/fixed_point.h"

#include <atomic>
#include <cmath>

#include "absl/strings/str_format.h"
#include "common/status_macros.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define SPOTRAIN_FIXED_POINT_AVX2 1
#endif

namespace spotrain::worker {
namespace {

// Converts one element. The product x * 2^32 is exact in double (a float has 24 significant
// bits and the scale is a power of two), and so are the truncation and the fraction below
// (|d| < 2^47), so the result is round-half-away-from-zero of the exact product whatever
// the floating-point rounding mode. (std::llround computes the same but is a library call,
// about 6x slower here.)
inline bool Convert(float x, int64_t* out) {
  // Written so that NaN fails the test too.
  if (!(std::fabs(x) < kFixedPointMaxAbs)) return false;
  const double d = static_cast<double>(x) * kFixedPointScale;
  const int64_t t = static_cast<int64_t>(d);  // toward zero
  const double frac = d - static_cast<double>(t);
  *out = t + (frac >= 0.5 ? 1 : 0) - (frac <= -0.5 ? 1 : 0);
  return true;
}

}  // namespace

absl::Status FixedPointRangeError(int64_t index, float value) {
  return absl::OutOfRangeError(absl::StrFormat(
      "fixed-point gradient conversion: element %d is %.9g; deterministic mode needs every "
      "gradient element to be finite with |x| < %g (the run has likely diverged: lower the "
      "learning rate or enable gradient clipping)",
      index, value, static_cast<double>(kFixedPointMaxAbs)));
}

namespace {

absl::Status Overflow(int64_t index) {
  return absl::OutOfRangeError(absl::StrFormat(
      "fixed-point accumulation overflowed int64 at element %d (more than %d terms summed?)", index,
      kFixedPointMaxTerms));
}

// The reference loop, also used for the tail and for any block the vector loop declines.
// kAssign: acc[i] = term, else acc[i] += term (checked); kClear: src[i] = 0 once read.
template <bool kAssign, bool kClear>
absl::Status ScalarDrain(const float* src, int64_t begin, int64_t end, int64_t* acc, float* clear) {
  for (int64_t i = begin; i < end; ++i) {
    int64_t v;
    if (!Convert(src[i], &v)) return FixedPointRangeError(i, src[i]);
    if (kAssign) {
      acc[i] = v;
    } else if (__builtin_add_overflow(acc[i], v, &acc[i])) {
      return Overflow(i);
    }
    if (kClear) clear[i] = 0.0f;
  }
  return absl::OkStatus();
}

#ifdef SPOTRAIN_FIXED_POINT_AVX2
#define SPOTRAIN_AVX2_TARGET __attribute__((target("avx2")))

std::atomic<bool> avx2_enabled{true};

bool HaveAvx2() {
  static const bool have = __builtin_cpu_supports("avx2");
  return have && avx2_enabled.load(std::memory_order_relaxed);
}

// 1.5 * 2^52: adding it to an integral double of magnitude below 2^51 gives a double whose
// low mantissa bits are that integer (offset by the constant's bits), exactly.
constexpr double kMagic = 6755399441055744.0;

// Four elements per iteration, with exactly the arithmetic of Convert: widen to double
// (exact), scale (exact), truncate, round half away from zero on the exact fraction, then
// move the integral double into int64 through kMagic (exact below 2^51; |d| < 2^47 here).
// A block with an out-of-range element or an int64 overflow is left unwritten and redone by
// the scalar loop, which reports the first offending index. The results are therefore
// bit-identical to ScalarDrain's on every input.
template <bool kAssign, bool kClear>
SPOTRAIN_AVX2_TARGET absl::Status Avx2Drain(const float* src, int64_t n, int64_t* acc,
                                            float* clear) {
  const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
  const __m128 max_abs = _mm_set1_ps(kFixedPointMaxAbs);
  const __m256d scale = _mm256_set1_pd(kFixedPointScale);
  const __m256d half = _mm256_set1_pd(0.5);
  const __m256d neg_half = _mm256_set1_pd(-0.5);
  const __m256d one = _mm256_set1_pd(1.0);
  const __m256d magic = _mm256_set1_pd(kMagic);
  const __m256i magic_bits = _mm256_castpd_si256(magic);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m128 x = _mm_loadu_ps(src + i);
    // False for NaN (ordered comparison), so NaN and infinities fall to the scalar loop.
    const int in_range = _mm_movemask_ps(_mm_cmp_ps(_mm_and_ps(x, abs_mask), max_abs, _CMP_LT_OQ));
    if (in_range != 0xf) {
      RETURN_IF_ERROR((ScalarDrain<kAssign, kClear>(src, i, i + 4, acc, clear)));
      continue;
    }
    const __m256d d = _mm256_mul_pd(_mm256_cvtps_pd(x), scale);
    const __m256d t = _mm256_round_pd(d, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256d frac = _mm256_sub_pd(d, t);
    const __m256d up = _mm256_and_pd(_mm256_cmp_pd(frac, half, _CMP_GE_OQ), one);
    const __m256d down = _mm256_and_pd(_mm256_cmp_pd(frac, neg_half, _CMP_LE_OQ), one);
    const __m256d r = _mm256_sub_pd(_mm256_add_pd(t, up), down);
    const __m256i v = _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(r, magic)), magic_bits);
    if (kAssign) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + i), v);
    } else {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + i));
      const __m256i s = _mm256_add_epi64(a, v);
      // Signed overflow: both operands differ in sign from the sum.
      const __m256i ovf = _mm256_and_si256(_mm256_xor_si256(a, s), _mm256_xor_si256(v, s));
      if (_mm256_movemask_pd(_mm256_castsi256_pd(ovf)) != 0) {
        RETURN_IF_ERROR((ScalarDrain<kAssign, kClear>(src, i, i + 4, acc, clear)));
        continue;
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + i), s);
    }
    if (kClear) _mm_storeu_ps(clear + i, _mm_setzero_ps());
  }
  return ScalarDrain<kAssign, kClear>(src, i, n, acc, clear);
}

SPOTRAIN_AVX2_TARGET void Avx2FromFixedPoint(const int64_t* acc, int64_t n, double scale,
                                             float* dst) {
  const __m256d magic = _mm256_set1_pd(kMagic);
  const __m256i magic_bits = _mm256_castpd_si256(magic);
  const __m256i hi = _mm256_set1_epi64x(int64_t{1} << 51);
  const __m256i lo = _mm256_set1_epi64x(-(int64_t{1} << 51));
  const __m256d s = _mm256_set1_pd(scale);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + i));
    // -2^51 < v < 2^51: the exact int64 -> double move through kMagic applies.
    const __m256i ok = _mm256_and_si256(_mm256_cmpgt_epi64(hi, v), _mm256_cmpgt_epi64(v, lo));
    if (_mm256_movemask_pd(_mm256_castsi256_pd(ok)) != 0xf) {
      for (int64_t k = i; k < i + 4; ++k) {
        dst[k] = static_cast<float>(static_cast<double>(acc[k]) * scale);
      }
      continue;
    }
    const __m256d d = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_add_epi64(v, magic_bits)), magic);
    _mm_storeu_ps(dst + i, _mm256_cvtpd_ps(_mm256_mul_pd(d, s)));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(static_cast<double>(acc[i]) * scale);
}
#endif  // SPOTRAIN_FIXED_POINT_AVX2

template <bool kAssign, bool kClear>
absl::Status Drain(const float* src, int64_t n, int64_t* acc, float* clear) {
#ifdef SPOTRAIN_FIXED_POINT_AVX2
  if (HaveAvx2()) return Avx2Drain<kAssign, kClear>(src, n, acc, clear);
#endif
  return ScalarDrain<kAssign, kClear>(src, 0, n, acc, clear);
}

}  // namespace

absl::Status ToFixedPoint(const float* src, int64_t n, int64_t* dst) {
  return Drain<true, false>(src, n, dst, nullptr);
}

absl::Status AccumulateFixedPoint(const float* src, int64_t n, int64_t* acc) {
  return Drain<false, false>(src, n, acc, nullptr);
}

absl::Status DrainToFixedPoint(float* src, int64_t n, int64_t* acc, bool assign) {
  return assign ? Drain<true, true>(src, n, acc, src) : Drain<false, true>(src, n, acc, src);
}

absl::Status AddFixedPoint(const int64_t* src, int64_t n, int64_t* acc) {
  for (int64_t i = 0; i < n; ++i) {
    if (__builtin_add_overflow(acc[i], src[i], &acc[i])) return Overflow(i);
  }
  return absl::OkStatus();
}

void FromFixedPoint(const int64_t* acc, int64_t n, double factor, float* dst) {
  // Multiplying by a power of two is exact, so this equals (acc / 2^32) * factor.
  const double scale = factor / kFixedPointScale;
#ifdef SPOTRAIN_FIXED_POINT_AVX2
  if (HaveAvx2()) {
    Avx2FromFixedPoint(acc, n, scale, dst);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<float>(static_cast<double>(acc[i]) * scale);
  }
}

bool FixedPointUsesAvx2() {
#ifdef SPOTRAIN_FIXED_POINT_AVX2
  return HaveAvx2();
#else
  return false;
#endif
}

void SetFixedPointAvx2EnabledForTesting(bool enabled) {
#ifdef SPOTRAIN_FIXED_POINT_AVX2
  avx2_enabled.store(enabled, std::memory_order_relaxed);
#else
  (void)enabled;
#endif
}

}  // namespace spotrain::worker
