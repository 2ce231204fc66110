#include "worker/fixed_point.h"

#include <cmath>

#include "absl/strings/str_format.h"

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

absl::Status OutOfRange(int64_t index, float value) {
  return absl::OutOfRangeError(absl::StrFormat(
      "fixed-point gradient conversion: element %d is %.9g; deterministic mode needs every "
      "gradient element to be finite with |x| < %g (the run has likely diverged: lower the "
      "learning rate or enable gradient clipping)",
      index, value, static_cast<double>(kFixedPointMaxAbs)));
}

absl::Status Overflow(int64_t index) {
  return absl::OutOfRangeError(absl::StrFormat(
      "fixed-point accumulation overflowed int64 at element %d (more than %d terms summed?)", index,
      kFixedPointMaxTerms));
}

}  // namespace

absl::Status ToFixedPoint(const float* src, int64_t n, int64_t* dst) {
  for (int64_t i = 0; i < n; ++i) {
    if (!Convert(src[i], &dst[i])) return OutOfRange(i, src[i]);
  }
  return absl::OkStatus();
}

absl::Status AccumulateFixedPoint(const float* src, int64_t n, int64_t* acc) {
  for (int64_t i = 0; i < n; ++i) {
    int64_t v;
    if (!Convert(src[i], &v)) return OutOfRange(i, src[i]);
    if (__builtin_add_overflow(acc[i], v, &acc[i])) return Overflow(i);
  }
  return absl::OkStatus();
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
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<float>(static_cast<double>(acc[i]) * scale);
  }
}

}  // namespace spotrain::worker
