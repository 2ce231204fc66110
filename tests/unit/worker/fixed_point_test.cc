// Tests for worker/fixed_point.h: exact conversions, range errors, and the property the
// deterministic mode rests on: any grouping of micro-batches over ranks and any reduction
// order give bit-identical results.
#include "worker/fixed_point.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace spotrain::worker {
namespace {

using ::testing::HasSubstr;

TEST(FixedPointTest, ScaleAndHeadroomAreConsistent) {
  EXPECT_EQ(kFixedPointScale, std::ldexp(1.0, kFixedPointFractionBits));
  // |x| * scale < 2^(63 - log2(max terms)) for every admissible |x|.
  EXPECT_EQ(static_cast<double>(kFixedPointMaxAbs) * kFixedPointScale,
            std::ldexp(1.0, 63 - kFixedPointMaxTermsLog2));
}

TEST(FixedPointTest, ConvertsExactlyAndRoundsToNearest) {
  const std::vector<float> src = {1.0f,
                                  -0.5f,
                                  0.0f,
                                  -0.0f,
                                  std::ldexp(1.0f, -32),
                                  std::ldexp(1.0f, -33),      // half a unit: away from zero
                                  -std::ldexp(1.0f, -33),     // likewise
                                  std::ldexp(1.0f, -34),      // a quarter: down
                                  3 * std::ldexp(1.0f, -34),  // three quarters: up
                                  32767.998046875f,           // largest float below 2^15
                                  -32767.998046875f,
                                  1e-20f};
  std::vector<int64_t> dst(src.size());
  ASSERT_TRUE(ToFixedPoint(src.data(), src.size(), dst.data()).ok());
  const int64_t one = int64_t{1} << 32;
  const std::vector<int64_t> want = {one,
                                     -one / 2,
                                     0,
                                     0,
                                     1,
                                     1,
                                     -1,
                                     0,
                                     1,
                                     static_cast<int64_t>(32767.998046875 * 4294967296.0),
                                     -static_cast<int64_t>(32767.998046875 * 4294967296.0),
                                     0};
  EXPECT_EQ(dst, want);
}

TEST(FixedPointTest, RoundTripIsExactForFloatsAboveTheResolution) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> exponent(-9.0f, 14.9f);
  std::vector<float> src(10000);
  for (float& x : src) x = (rng() & 1 ? 1.0f : -1.0f) * std::pow(2.0f, exponent(rng));
  std::vector<int64_t> fixed(src.size());
  ASSERT_TRUE(ToFixedPoint(src.data(), src.size(), fixed.data()).ok());
  std::vector<float> back(src.size());
  FromFixedPoint(fixed.data(), fixed.size(), 1.0, back.data());
  EXPECT_EQ(std::memcmp(src.data(), back.data(), src.size() * sizeof(float)), 0);
}

TEST(FixedPointTest, SmallValuesHaveBoundedAbsoluteError) {
  std::mt19937 rng(8);
  std::uniform_real_distribution<float> value(-1e-6f, 1e-6f);
  for (int i = 0; i < 10000; ++i) {
    const float x = value(rng);
    int64_t f;
    ASSERT_TRUE(ToFixedPoint(&x, 1, &f).ok());
    float back;
    FromFixedPoint(&f, 1, 1.0, &back);
    EXPECT_LE(std::fabs(static_cast<double>(back) - x), std::ldexp(1.0, -33) * 1.0001) << x;
  }
}

TEST(FixedPointTest, RejectsNanInfAndOutOfRangeNamingIndexAndValue) {
  struct Case {
    float bad;
    const char* text;
  };
  const Case cases[] = {{std::numeric_limits<float>::quiet_NaN(), "nan"},
                        {std::numeric_limits<float>::infinity(), "inf"},
                        {-std::numeric_limits<float>::infinity(), "-inf"},
                        {32768.0f, "32768"},
                        {-40000.0f, "-40000"}};
  for (const Case& c : cases) {
    std::vector<float> src = {0.25f, 1.0f, -3.0f, c.bad, 2.0f};
    std::vector<int64_t> dst(src.size());
    absl::Status status = ToFixedPoint(src.data(), src.size(), dst.data());
    EXPECT_EQ(status.code(), absl::StatusCode::kOutOfRange) << c.text;
    EXPECT_THAT(std::string(status.message()), HasSubstr("element 3 is"));
    EXPECT_THAT(std::string(status.message()), HasSubstr(c.text));

    std::vector<int64_t> acc(src.size(), 0);
    status = AccumulateFixedPoint(src.data(), src.size(), acc.data());
    EXPECT_EQ(status.code(), absl::StatusCode::kOutOfRange) << c.text;
    EXPECT_THAT(std::string(status.message()), HasSubstr("element 3 is"));
  }
}

TEST(FixedPointTest, MaxTermsOfTheLargestValueDoNotOverflow) {
  const float largest = std::nextafter(kFixedPointMaxAbs, 0.0f);
  for (float sign : {1.0f, -1.0f}) {
    const float x = sign * largest;
    int64_t acc = 0;
    for (int64_t i = 0; i < kFixedPointMaxTerms; ++i) {
      ASSERT_TRUE(AccumulateFixedPoint(&x, 1, &acc).ok()) << i;
    }
    float mean;
    FromFixedPoint(&acc, 1, 1.0 / kFixedPointMaxTerms, &mean);
    EXPECT_EQ(mean, x);
  }
}

TEST(FixedPointTest, AdditionOverflowIsReported) {
  std::vector<int64_t> acc = {0, std::numeric_limits<int64_t>::max()};
  const std::vector<int64_t> src = {5, 1};
  absl::Status status = AddFixedPoint(src.data(), src.size(), acc.data());
  EXPECT_EQ(status.code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(std::string(status.message()), HasSubstr("element 1"));
  EXPECT_EQ(acc[0], 5);
}

TEST(FixedPointTest, FromFixedPointAppliesTheFactor) {
  const std::vector<int64_t> acc = {int64_t{3} << 32, -(int64_t{1} << 31), 0};
  std::vector<float> out(acc.size());
  FromFixedPoint(acc.data(), acc.size(), 0.25, out.data());
  EXPECT_EQ(out, (std::vector<float>{0.75f, -0.125f, 0.0f}));
}

// Gradients of one step: G micro-batches of n elements, magnitudes from 1e-9 to 10, random
// signs (the spread of real gradients, where float summation order matters).
std::vector<std::vector<float>> RandomMicroBatches(int g, int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> log_mag(-9.0f, 1.0f);
  std::vector<std::vector<float>> micro(g, std::vector<float>(n));
  for (auto& m : micro) {
    for (float& x : m) x = (rng() & 1 ? 1.0f : -1.0f) * std::pow(10.0f, log_mag(rng));
  }
  return micro;
}

// The block of micro-batches rank r owns when g are split among w ranks (contiguous, the
// first g % w ranks get one more), as the sampler does.
std::pair<int, int> Block(int g, int w, int r) {
  const int base = g / w, extra = g % w;
  const int begin = r * base + std::min(r, extra);
  return {begin, begin + base + (r < extra ? 1 : 0)};
}

std::vector<float> FixedPointStep(const std::vector<std::vector<float>>& micro,
                                  const std::vector<std::vector<int>>& groups,
                                  const std::vector<int>& reduce_order) {
  const int n = micro[0].size();
  std::vector<std::vector<int64_t>> partial(groups.size(), std::vector<int64_t>(n, 0));
  for (size_t r = 0; r < groups.size(); ++r) {
    for (int j : groups[r]) {
      EXPECT_TRUE(AccumulateFixedPoint(micro[j].data(), n, partial[r].data()).ok());
    }
  }
  std::vector<int64_t> total(n, 0);
  for (int r : reduce_order) EXPECT_TRUE(AddFixedPoint(partial[r].data(), n, total.data()).ok());
  std::vector<float> out(n);
  FromFixedPoint(total.data(), n, 1.0 / micro.size(), out.data());
  return out;
}

std::vector<float> FloatStep(const std::vector<std::vector<float>>& micro,
                             const std::vector<std::vector<int>>& groups,
                             const std::vector<int>& reduce_order) {
  const int n = micro[0].size();
  std::vector<std::vector<float>> partial(groups.size(), std::vector<float>(n, 0.0f));
  for (size_t r = 0; r < groups.size(); ++r) {
    for (int j : groups[r]) {
      for (int i = 0; i < n; ++i) partial[r][i] += micro[j][i];
    }
  }
  std::vector<float> total(n, 0.0f);
  for (int r : reduce_order) {
    for (int i = 0; i < n; ++i) total[i] += partial[r][i];
  }
  for (float& x : total) x /= micro.size();
  return total;
}

// Inputs for the vector/scalar parity tests: the spread of real gradients plus every edge
// the conversion has (ties at half a unit, signed zeros, the range limit, NaN, infinities),
// at positions that fall in the vector body and in the tail.
std::vector<float> ParityInputs(int n, uint32_t seed) {
  std::vector<float> x = RandomMicroBatches(1, n, seed)[0];
  const float edges[] = {std::ldexp(1.0f, -33),
                         -std::ldexp(1.0f, -33),
                         3 * std::ldexp(1.0f, -34),
                         -3 * std::ldexp(1.0f, -34),
                         0.0f,
                         -0.0f,
                         32767.998046875f,
                         -32767.998046875f,
                         1e-20f,
                         -1e-20f,
                         1.5f * std::ldexp(1.0f, -32)};
  std::mt19937 rng(seed);
  for (float e : edges) x[rng() % n] = e;
  return x;
}

// Runs `fn` once with the AVX2 loops (where the CPU has them) and once with the scalar ones.
template <typename Fn>
void BothPaths(Fn fn) {
  fn();
  SetFixedPointAvx2EnabledForTesting(false);
  fn();
  SetFixedPointAvx2EnabledForTesting(true);
}

TEST(FixedPointTest, VectorAndScalarLoopsGiveIdenticalBits) {
  if (!FixedPointUsesAvx2()) GTEST_SKIP() << "this CPU has no AVX2: only the scalar loops run";
  for (int n : {1, 3, 4, 5, 8, 1001, 4099}) {
    const std::vector<float> x = ParityInputs(n, 7 + n);
    const std::vector<float> y = ParityInputs(n, 11 + n);
    std::vector<std::vector<int64_t>> acc;
    std::vector<std::vector<float>> back;
    std::vector<std::vector<float>> drained;
    BothPaths([&] {
      std::vector<int64_t> a(n);
      ASSERT_TRUE(ToFixedPoint(x.data(), n, a.data()).ok());
      ASSERT_TRUE(AccumulateFixedPoint(y.data(), n, a.data()).ok());
      std::vector<float> src = y;
      std::vector<int64_t> d(n, 12345);
      ASSERT_TRUE(DrainToFixedPoint(src.data(), n, d.data(), /*assign=*/true).ok());
      drained.push_back(src);
      ASSERT_TRUE(AddFixedPoint(d.data(), n, a.data()).ok());
      acc.push_back(a);
      std::vector<float> out(n);
      FromFixedPoint(a.data(), n, 1.0 / 3, out.data());
      back.push_back(out);
    });
    ASSERT_EQ(acc[0], acc[1]) << n;
    ASSERT_EQ(std::memcmp(back[0].data(), back[1].data(), n * sizeof(float)), 0) << n;
    for (const auto& d : drained) {
      EXPECT_TRUE(std::all_of(d.begin(), d.end(), [](float v) { return v == 0.0f; })) << n;
    }
  }
  // Accumulators beyond 2^51 take the exact scalar conversion inside the vector loop.
  std::vector<int64_t> big = {int64_t{1} << 62,
                              -(int64_t{1} << 60) - 7,
                              5,
                              -(int64_t{1} << 51),
                              (int64_t{1} << 51) - 1,
                              3,
                              0,
                              std::numeric_limits<int64_t>::min()};
  std::vector<std::vector<float>> out;
  BothPaths([&] {
    std::vector<float> o(big.size());
    FromFixedPoint(big.data(), big.size(), 0.25, o.data());
    out.push_back(o);
  });
  EXPECT_EQ(std::memcmp(out[0].data(), out[1].data(), big.size() * sizeof(float)), 0);
}

TEST(FixedPointTest, ErrorsNameTheSameElementOnBothPaths) {
  for (int bad : {0, 2, 5, 9}) {
    std::vector<float> x(11, 0.25f);
    x[bad] = std::numeric_limits<float>::quiet_NaN();
    BothPaths([&] {
      std::vector<int64_t> acc(x.size(), 0);
      std::vector<float> src = x;
      const absl::Status status = DrainToFixedPoint(src.data(), src.size(), acc.data(), false);
      EXPECT_EQ(status.code(), absl::StatusCode::kOutOfRange);
      EXPECT_THAT(std::string(status.message()), HasSubstr(absl::StrCat("element ", bad, " is")));
    });
    // An int64 overflow of the addition, in the vector body and in the tail.
    BothPaths([&] {
      std::vector<int64_t> acc(x.size(), 0);
      acc[bad] = std::numeric_limits<int64_t>::max();
      std::vector<float> ok(x.size(), 0.25f);
      const absl::Status status = AccumulateFixedPoint(ok.data(), ok.size(), acc.data());
      EXPECT_EQ(status.code(), absl::StatusCode::kOutOfRange);
      EXPECT_THAT(std::string(status.message()), HasSubstr(absl::StrCat("element ", bad, " ")));
    });
  }
}

TEST(FixedPointTest, DrainAssignsOrAccumulatesAndClearsTheSource) {
  std::vector<float> g = {1.0f, -0.5f, 0.25f, 2.0f, -1.0f};
  std::vector<int64_t> acc(g.size(), 99);
  ASSERT_TRUE(DrainToFixedPoint(g.data(), g.size(), acc.data(), /*assign=*/true).ok());
  EXPECT_EQ(g, std::vector<float>(g.size(), 0.0f));
  g = {1.0f, -0.5f, 0.25f, 2.0f, -1.0f};
  ASSERT_TRUE(DrainToFixedPoint(g.data(), g.size(), acc.data(), /*assign=*/false).ok());
  const int64_t one = int64_t{1} << 32;
  EXPECT_EQ(acc, (std::vector<int64_t>{2 * one, -one, one / 2, 4 * one, -2 * one}));
}

TEST(FixedPointTest, AnyGroupingOfMicroBatchesGivesIdenticalBits) {
  constexpr int kMicro = 24;
  constexpr int kElements = 20011;
  const auto micro = RandomMicroBatches(kMicro, kElements, 1234);

  std::vector<int> all(kMicro);
  std::iota(all.begin(), all.end(), 0);
  const std::vector<float> reference = FixedPointStep(micro, {all}, {0});
  const std::vector<float> float_reference = FloatStep(micro, {all}, {0});

  std::mt19937 rng(99);
  bool float_differs = false;
  for (int w : {1, 2, 3, 4, 5, 7, 24}) {
    // Contiguous blocks per rank (the sampler's split), reduced in rank order and reversed.
    std::vector<std::vector<int>> groups(w);
    for (int r = 0; r < w; ++r) {
      auto [b, e] = Block(kMicro, w, r);
      for (int j = b; j < e; ++j) groups[r].push_back(j);
    }
    std::vector<int> order(w);
    std::iota(order.begin(), order.end(), 0);
    for (int pass = 0; pass < 3; ++pass) {
      const std::vector<float> got = FixedPointStep(micro, groups, order);
      ASSERT_EQ(std::memcmp(got.data(), reference.data(), kElements * sizeof(float)), 0)
          << "world " << w << " pass " << pass;
      const std::vector<float> got_float = FloatStep(micro, groups, order);
      if (std::memcmp(got_float.data(), float_reference.data(), kElements * sizeof(float)) != 0) {
        float_differs = true;
      }
      // Next pass: a random reduction order and micro-batches shuffled inside each group.
      std::shuffle(order.begin(), order.end(), rng);
      for (auto& g : groups) std::shuffle(g.begin(), g.end(), rng);
    }
    // A random assignment of micro-batches to ranks (uneven groups).
    std::vector<std::vector<int>> random_groups(w);
    for (int j = 0; j < kMicro; ++j) random_groups[rng() % w].push_back(j);
    const std::vector<float> got = FixedPointStep(micro, random_groups, order);
    ASSERT_EQ(std::memcmp(got.data(), reference.data(), kElements * sizeof(float)), 0)
        << "world " << w << " random groups";
  }
  // The property is not trivial: plain float sums do change with the grouping.
  EXPECT_TRUE(float_differs);
}

}  // namespace
}  // namespace spotrain::worker
