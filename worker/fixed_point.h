// Deterministic gradient accumulation in int64 fixed point (DESIGN.md section 4,
// `deterministic: true`). Each micro-batch gradient is converted to integers with one fixed
// scale, the integers are summed (locally and by the int64 all-reduce), and the sum is
// converted back once. Integer addition is associative and commutative, so the result is
// bit-identical for every split of the micro-batches over ranks and every reduction order:
// the state after a step does not depend on the world size or on membership history.
//
// Format: value = integer / 2^32 (kFixedPointFractionBits = 32).
//   - Range. At most 2^16 terms (kFixedPointMaxTerms: micro-batches of one step, summed over
//     all ranks) are ever added, so each term must satisfy |x| * 2^32 < 2^(63 - 16) = 2^47,
//     i.e. |x| < 2^15 = 32768 (kFixedPointMaxAbs). A sum of 2^16 such terms stays below
//     2^63: no intermediate sum can overflow, in any order. A gradient element of 32768 or
//     more (per micro-batch, after the loss is averaged over its tokens) means the run has
//     diverged; it is reported, never wrapped.
//   - Resolution. 2^-32 (about 2.3e-10) absolute. Every float of magnitude >= 2^-9 converts
//     exactly (its 24-bit mantissa ends at or above 2^-32); smaller ones are rounded to the
//     nearest multiple of 2^-32 (ties away from zero), an absolute error <= 1.2e-10,
//     far below the noise of a stochastic gradient. A larger scale (2^40) would resolve
//     finer but cap |x| at 128, too close to the gradient spikes of early training; a
//     smaller one (2^24) would lose the low bits of typical 1e-3..1e-6 gradients.
//   - Conversion back: float(double(sum) * (factor * 2^-32)): one rounding in double, one to
//     float, the same on every machine (IEEE-754, no fused operations across elements).
//
// All functions are thread-safe: they touch only the buffers passed in (and the testing switch
// below, read relaxed).
#ifndef SPOTRAIN_WORKER_FIXED_POINT_H_
#define SPOTRAIN_WORKER_FIXED_POINT_H_

#include <cstdint>

#include "absl/status/status.h"

namespace spotrain::worker {

inline constexpr int kFixedPointFractionBits = 32;
inline constexpr double kFixedPointScale = 4294967296.0;  // 2^32
inline constexpr int kFixedPointMaxTermsLog2 = 16;
inline constexpr int64_t kFixedPointMaxTerms = int64_t{1} << kFixedPointMaxTermsLog2;
// Exclusive bound on |x| of one term: 2^(63 - 16 - 32).
inline constexpr float kFixedPointMaxAbs = 32768.0f;

// dst[i] = round(src[i] * 2^32) for i in [0, n). kOutOfRange, naming the first offending
// index and its value, when an element is NaN, infinite or has |x| >= kFixedPointMaxAbs;
// dst is then partially written.
absl::Status ToFixedPoint(const float* src, int64_t n, int64_t* dst);

// acc[i] += round(src[i] * 2^32): converts one micro-batch gradient and adds it to the
// accumulator in one pass. Same errors as ToFixedPoint; acc is then partially updated
// (discard it: the step failed). Also kOutOfRange if an addition overflows, which cannot
// happen while at most kFixedPointMaxTerms terms are summed.
absl::Status AccumulateFixedPoint(const float* src, int64_t n, int64_t* acc);

// The training loop's form: like ToFixedPoint (assign) or AccumulateFixedPoint (!assign),
// and sets each src[i] to 0 once read, so the gradient buffer is ready for the next
// micro-batch without a separate zeroing pass. Same errors; on error src and acc are
// partially updated (the step failed; discard both).
absl::Status DrainToFixedPoint(float* src, int64_t n, int64_t* acc, bool assign);

// acc[i] += src[i] (e.g. the accumulators of two groups of micro-batches). kOutOfRange,
// naming the index, if an addition overflows int64.
absl::Status AddFixedPoint(const int64_t* src, int64_t n, int64_t* acc);

// dst[i] = float(acc[i] / 2^32 * factor) for i in [0, n), e.g. factor = 1/G to average G
// micro-batch gradients. Deterministic: equal accumulators give bit-identical floats.
void FromFixedPoint(const int64_t* acc, int64_t n, double factor, float* dst);

// The kOutOfRange error of the conversions for element `index` holding `value` (also used by
// the GPU conversion, worker/fixed_point_cuda.h).
absl::Status FixedPointRangeError(int64_t index, float value);

// On x86-64 CPUs with AVX2 the conversions run four elements at a time with exactly the
// scalar loop's arithmetic (every step is exact or one IEEE rounding), so results are
// bit-identical on every machine, with or without AVX2; tests compare the two.
bool FixedPointUsesAvx2();
// Tests only: false forces the scalar loops; true restores the CPU's choice. Not for use
// while another thread converts.
void SetFixedPointAvx2EnabledForTesting(bool enabled);

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_FIXED_POINT_H_
