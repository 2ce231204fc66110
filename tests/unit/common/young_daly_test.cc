#include "common/young_daly.h"

#include <cmath>
#include <limits>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace spotrain::common {
namespace {

using ::testing::HasSubstr;

constexpr double kInf = std::numeric_limits<double>::infinity();

TEST(YoungDalyTest, YoungIsSqrtTwoCM) {
  EXPECT_NEAR(YoungInterval(10, 3600), 268.328157, 1e-6);
  EXPECT_NEAR(YoungInterval(60, 3600), 657.267069, 1e-6);
  EXPECT_DOUBLE_EQ(YoungInterval(0, 3600), 0);
  EXPECT_EQ(YoungInterval(10, kInf), kInf);
}

TEST(YoungDalyTest, DalyHigherOrderValues) {
  // sqrt(2CM) * (1 + sqrt(C/2M)/3 + C/(2M)/9) - C, worked out by hand.
  EXPECT_NEAR(DalyInterval(10, 3600), 261.702899, 1e-6);
  EXPECT_NEAR(DalyInterval(60, 3600), 617.875650, 1e-6);
  EXPECT_NEAR(DalyInterval(150, 100), 87.638837, 1e-6);
  // Once C >= 2M the optimum is M itself.
  EXPECT_DOUBLE_EQ(DalyInterval(200, 100), 100);
  EXPECT_DOUBLE_EQ(DalyInterval(300, 100), 100);
  EXPECT_EQ(DalyInterval(10, kInf), kInf);
  EXPECT_DOUBLE_EQ(DalyInterval(0, 100), 0);
}

TEST(YoungDalyTest, DalyApproachesYoungWhenCheckpointsAreCheap) {
  const double m = 3600 * 24;
  const double c = 1;
  EXPECT_NEAR(DalyInterval(c, m) / YoungInterval(c, m), 1.0, 1e-2);
  EXPECT_LT(DalyInterval(c, m), YoungInterval(c, m));  // the "- C" term dominates
}

TEST(YoungDalyTest, OutOfDomainIsNaN) {
  EXPECT_TRUE(std::isnan(YoungInterval(-1, 100)));
  EXPECT_TRUE(std::isnan(YoungInterval(1, 0)));
  EXPECT_TRUE(std::isnan(DalyInterval(1, -5)));
  EXPECT_TRUE(std::isnan(DalyInterval(kInf, 5)));
  EXPECT_TRUE(std::isnan(DalyExpectedWallTime(100, 0, 1, 1, 100)));
}

TEST(YoungDalyTest, DalyExpectedWallTime) {
  // M e^{R/M} (e^{(T+C)/M} - 1) Ts/T with M=3600, R=100, T=600, C=30, Ts=36000.
  EXPECT_NEAR(DalyExpectedWallTime(36000, 600, 30, 100, 3600), 42472.74587, 1e-4);
  // No interrupts: every segment plus its checkpoint, nothing else.
  EXPECT_DOUBLE_EQ(DalyExpectedWallTime(36000, 600, 30, 100, kInf), 36000 + 60 * 30);
  // Interrupts only make it slower.
  EXPECT_GT(DalyExpectedWallTime(36000, 600, 30, 0, 1e7), 36000 + 60 * 30);
}

TEST(YoungDalyTest, DalyIntervalMinimisesDalyWallTime) {
  // The interval Daly recommends is (close to) the minimum of his own wall-time model.
  const double c = 60, r = 120, m = 1800, solve = 3600 * 100;
  const double best = DalyInterval(c, m);
  const double at_best = DalyExpectedWallTime(solve, best, c, r, m);
  for (double factor : {0.5, 0.8, 1.25, 2.0}) {
    EXPECT_GT(DalyExpectedWallTime(solve, best * factor, c, r, m), at_best) << factor;
  }
}

TEST(YoungDalyTest, ChooseClampsToPolicy) {
  IntervalPolicy policy;
  policy.min_interval_s = 30;
  policy.max_interval_s = 3600;

  auto plain = ChooseCheckpointInterval(10, 3600, policy);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(plain->bound, IntervalBound::kNone);
  EXPECT_NEAR(plain->interval_s, 261.702899, 1e-6);
  EXPECT_NEAR(plain->young_s, 268.328157, 1e-6);
  EXPECT_DOUBLE_EQ(plain->mtbi_s, 3600);

  auto capped = ChooseCheckpointInterval(10, 1e9, policy);
  ASSERT_TRUE(capped.ok());
  EXPECT_EQ(capped->bound, IntervalBound::kMax);
  EXPECT_DOUBLE_EQ(capped->interval_s, 3600);
  EXPECT_GT(capped->daly_s, 3600);

  auto never = ChooseCheckpointInterval(10, kInf, policy);
  ASSERT_TRUE(never.ok());
  EXPECT_EQ(never->bound, IntervalBound::kMax);
  EXPECT_DOUBLE_EQ(never->interval_s, 3600);

  auto floor = ChooseCheckpointInterval(0.01, 10, policy);
  ASSERT_TRUE(floor.ok());
  EXPECT_EQ(floor->bound, IntervalBound::kMin);
  EXPECT_DOUBLE_EQ(floor->interval_s, 30);

  IntervalPolicy uncapped;
  uncapped.max_interval_s = kInf;
  auto infinite = ChooseCheckpointInterval(10, kInf, uncapped);
  ASSERT_TRUE(infinite.ok());
  EXPECT_EQ(infinite->interval_s, kInf);
  EXPECT_EQ(infinite->bound, IntervalBound::kNone);
}

TEST(YoungDalyTest, ChooseRejectsBadInput) {
  IntervalPolicy policy;
  EXPECT_THAT(ChooseCheckpointInterval(-1, 100, policy).status().message(),
              HasSubstr("checkpoint cost"));
  EXPECT_THAT(ChooseCheckpointInterval(1, 0, policy).status().message(),
              HasSubstr("mean time between interrupts"));
  policy.min_interval_s = 10;
  policy.max_interval_s = 5;
  EXPECT_THAT(ChooseCheckpointInterval(1, 100, policy).status().message(), HasSubstr("bounds"));
  EXPECT_EQ(ChooseCheckpointInterval(1, 100, policy).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace spotrain::common
