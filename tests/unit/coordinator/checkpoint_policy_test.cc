// Tests of the automatic checkpoint interval (coordinator/checkpoint_policy.h), driven by a
// FakeClock: the initial interval, Young/Daly from measured costs, the write-time floor, the
// effect of losses on M, periodic re-evaluation and when checkpoints are ordered.
#include "coordinator/checkpoint_policy.h"

#include <cmath>

#include "common/clock.h"
#include "common/young_daly.h"
#include "coordinator/event_log.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace spotrain::coordinator {
namespace {

CheckpointPolicyOptions Options() {
  CheckpointPolicyOptions o;
  o.mtbl_prior_s = 3600;
  o.prior_weight = 1;
  o.initial_every_steps = 20;
  o.reevaluate_every = absl::Seconds(30);
  return o;
}

// Two ranks report one checkpoint of `step`; the slower rank's numbers count.
void Checkpoint(CheckpointPolicy& p, int64_t step, double stall_ms, double write_ms) {
  p.OnShardReport(step, stall_ms / 2, write_ms / 2);
  p.OnShardReport(step, stall_ms, write_ms);
  p.OnCheckpointComplete(step);
}

TEST(CheckpointPolicyTest, InitialIntervalUntilMeasured) {
  common::FakeClock clock;
  CheckpointPolicy p(Options(), clock.Now());
  EXPECT_EQ(p.every_steps(), 20);
  auto d = p.Evaluate(clock.Now());
  ASSERT_TRUE(d.has_value());
  EXPECT_EQ(d->reason, "initial");
  EXPECT_EQ(d->bound, "initial");
  EXPECT_EQ(d->every_steps, 20);
  EXPECT_EQ(d->cost_s, -1);
  EXPECT_EQ(d->step_ms, -1);
  EXPECT_DOUBLE_EQ(d->mtbl_s, 3600);
  // Nothing new: no decision.
  EXPECT_FALSE(p.Evaluate(clock.Now()).has_value());
  // Step times alone are not enough.
  p.OnStep(100);
  clock.Advance(absl::Seconds(31));
  EXPECT_FALSE(p.Evaluate(clock.Now()).has_value());  // periodic, unchanged: not logged
  EXPECT_EQ(p.every_steps(), 20);
}

TEST(CheckpointPolicyTest, YoungDalyFromMeasuredCost) {
  common::FakeClock clock;
  CheckpointPolicy p(Options(), clock.Now());
  (void)p.Evaluate(clock.Now());
  p.Observe(clock.Now(), /*running=*/true);
  for (int i = 0; i < 10; ++i) p.OnStep(100);  // 0.1 s per step
  Checkpoint(p, 20, /*stall_ms=*/50, /*write_ms=*/200);
  auto d = p.Evaluate(clock.Now());
  ASSERT_TRUE(d.has_value());
  EXPECT_EQ(d->reason, "measured");
  EXPECT_DOUBLE_EQ(d->cost_s, 0.05);
  EXPECT_DOUBLE_EQ(d->write_s, 0.2);
  EXPECT_DOUBLE_EQ(d->step_ms, 100);
  EXPECT_DOUBLE_EQ(d->young_s, std::sqrt(2 * 0.05 * 3600));
  EXPECT_DOUBLE_EQ(d->daly_s, common::DalyInterval(0.05, 3600));
  EXPECT_EQ(d->bound, "none");
  EXPECT_EQ(d->every_steps, std::llround(d->daly_s / 0.1));
  EXPECT_EQ(p.every_steps(), d->every_steps);
  // A later measurement that changes nothing is not logged again.
  Checkpoint(p, 30, 50, 200);
  EXPECT_FALSE(p.Evaluate(clock.Now()).has_value());
  // One that changes the interval is.
  Checkpoint(p, 40, 500, 200);
  auto changed = p.Evaluate(clock.Now());
  ASSERT_TRUE(changed.has_value());
  EXPECT_EQ(changed->reason, "measured");
  EXPECT_GT(changed->every_steps, d->every_steps);
}

TEST(CheckpointPolicyTest, NeverShorterThanTheBackgroundWrite) {
  common::FakeClock clock;
  auto options = Options();
  options.mtbl_prior_s = 1;  // Daly alone would checkpoint very often
  CheckpointPolicy p(options, clock.Now());
  for (int i = 0; i < 5; ++i) p.OnStep(10);
  Checkpoint(p, 20, /*stall_ms=*/1, /*write_ms=*/2000);
  auto d = p.Evaluate(clock.Now());
  ASSERT_TRUE(d.has_value());
  EXPECT_EQ(d->bound, "min");
  EXPECT_DOUBLE_EQ(d->interval_s, 2.0 * options.write_margin);
  EXPECT_GE(d->every_steps * 0.010, 2.0 * options.write_margin - 1e-9);
}

TEST(CheckpointPolicyTest, LossShrinksTheInterval) {
  common::FakeClock clock;
  CheckpointPolicy p(Options(), clock.Now());
  p.Observe(clock.Now(), true);
  for (int i = 0; i < 5; ++i) p.OnStep(20);
  Checkpoint(p, 20, 100, 100);
  auto before = p.Evaluate(clock.Now());
  ASSERT_TRUE(before.has_value());
  clock.Advance(absl::Seconds(10));
  p.OnLoss(clock.Now());
  auto after = p.Evaluate(clock.Now());
  ASSERT_TRUE(after.has_value());
  EXPECT_EQ(after->reason, "loss");
  EXPECT_EQ(after->losses, 1);
  EXPECT_DOUBLE_EQ(after->observed_s, 10);
  EXPECT_DOUBLE_EQ(after->mtbl_s, (3600 + 10) / 2.0);
  EXPECT_LT(after->mtbl_s, before->mtbl_s);
  EXPECT_LT(after->every_steps, before->every_steps);
}

TEST(CheckpointPolicyTest, PoolTimeCountsOnlyWhileRunning) {
  common::FakeClock clock;
  auto options = Options();
  options.prior_weight = 0;  // M is then the observed mean alone
  CheckpointPolicy p(options, clock.Now());
  p.Observe(clock.Now(), true);
  clock.Advance(absl::Seconds(100));
  p.Observe(clock.Now(), false);  // paused: this time does not count
  clock.Advance(absl::Seconds(1000));
  p.Observe(clock.Now(), true);
  clock.Advance(absl::Seconds(100));
  p.OnLoss(clock.Now());
  p.OnLoss(clock.Now());
  EXPECT_DOUBLE_EQ(p.mtbl_s(), 100);
}

TEST(CheckpointPolicyTest, PeriodicDecisionLoggedOnlyWhenItChanges) {
  common::FakeClock clock;
  auto options = Options();
  options.prior_weight = 0.01;
  CheckpointPolicy p(options, clock.Now());
  p.Observe(clock.Now(), true);
  for (int i = 0; i < 5; ++i) p.OnStep(10);
  Checkpoint(p, 20, 10, 10);
  p.OnLoss(clock.Now());
  ASSERT_TRUE(p.Evaluate(clock.Now()).has_value());
  clock.Advance(absl::Seconds(5));
  EXPECT_FALSE(p.Evaluate(clock.Now()).has_value());  // not due yet
  // Observed time grows M: the periodic evaluation changes the interval and says so.
  clock.Advance(absl::Seconds(600));
  auto d = p.Evaluate(clock.Now());
  ASSERT_TRUE(d.has_value());
  EXPECT_EQ(d->reason, "periodic");
}

TEST(CheckpointPolicyTest, OrdersEveryIntervalOnce) {
  common::FakeClock clock;
  CheckpointPolicy p(Options(), clock.Now());
  EXPECT_FALSE(p.ShouldOrder(19, -1));
  EXPECT_TRUE(p.ShouldOrder(20, -1));
  p.OnOrdered(20);
  EXPECT_FALSE(p.ShouldOrder(21, -1));  // ordered, not reported yet
  EXPECT_FALSE(p.ShouldOrder(39, 21));
  EXPECT_TRUE(p.ShouldOrder(41, 21));
  // A restore to step 10 goes back before the last order.
  p.OnOrdered(41);
  p.OnPlan(10);
  EXPECT_TRUE(p.ShouldOrder(30, 10));
}

TEST(CheckpointPolicyTest, NoSecondOrderWhileOneIsOutstanding) {
  common::FakeClock clock;
  CheckpointPolicy p(Options(), clock.Now());
  ASSERT_TRUE(p.ShouldOrder(20, 0));
  p.OnOrdered(20);
  // The coordinator's count lags: the checkpoint lands at 23, not reported yet.
  EXPECT_FALSE(p.ShouldOrder(40, 0));
  p.OnShardReport(23, 1, 1);
  EXPECT_FALSE(p.ShouldOrder(42, 23));
  EXPECT_TRUE(p.ShouldOrder(43, 23));
  p.OnOrdered(43);
  // A failed checkpoint ends the order; the next one is due an interval after the order.
  p.OnCheckpointFailed(44);
  EXPECT_TRUE(p.ShouldOrder(63, 23));
  p.OnOrdered(63);
  // An order that never produced anything is given up after 2 * every_steps + 10 steps.
  EXPECT_FALSE(p.ShouldOrder(112, 23));
  EXPECT_TRUE(p.ShouldOrder(113, 23));
}

TEST(CheckpointPolicyTest, CappedAtTheRunLength) {
  common::FakeClock clock;
  auto options = Options();
  options.max_every_steps = 8;
  CheckpointPolicy p(options, clock.Now());
  EXPECT_EQ(p.every_steps(), 8);
  for (int i = 0; i < 5; ++i) p.OnStep(1);
  Checkpoint(p, 8, 1000, 1);
  auto d = p.Evaluate(clock.Now());
  ASSERT_TRUE(d.has_value());
  EXPECT_EQ(d->every_steps, 8);
}

TEST(CheckpointPolicyTest, DecisionJsonHasEveryInput) {
  IntervalDecision d;
  d.time = absl::UnixEpoch();
  d.reason = "loss";
  d.cost_s = 0.5;
  d.mtbl_s = 1800;
  d.losses = 1;
  d.step_ms = 12.5;
  d.every_steps = 40;
  d.bound = "none";
  const std::string json = IntervalDecisionToJson(d);
  EXPECT_THAT(json, testing::HasSubstr("\"event\":\"checkpoint_interval\""));
  EXPECT_THAT(json, testing::HasSubstr("\"reason\":\"loss\""));
  EXPECT_THAT(json, testing::HasSubstr("\"cost_s\":0.5"));
  EXPECT_THAT(json, testing::HasSubstr("\"mtbl_s\":1800"));
  EXPECT_THAT(json, testing::HasSubstr("\"losses\":1"));
  EXPECT_THAT(json, testing::HasSubstr("\"step_ms\":12.5"));
  EXPECT_THAT(json, testing::HasSubstr("\"every_steps\":40"));
  EXPECT_THAT(json, testing::HasSubstr("\"write_s\":null"));
}

}  // namespace
}  // namespace spotrain::coordinator
