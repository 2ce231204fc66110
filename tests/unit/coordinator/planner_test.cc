// DecideShrink: when the Plan tells NCCL workers to shrink the previous epoch's communicator.
#include "coordinator/planner.h"

#include <cstdint>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace spotrain::coordinator {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

// Epoch `epoch` starting at `start_step` with workers `ids` in rank order.
proto::Plan PreviousPlan(int64_t epoch, int64_t start_step, const std::vector<uint64_t>& ids) {
  proto::Plan plan;
  plan.set_epoch(epoch);
  plan.set_start_step(start_step);
  plan.set_world_size(static_cast<int32_t>(ids.size()));
  for (size_t r = 0; r < ids.size(); ++r) {
    proto::Member* m = plan.add_members();
    m->set_worker_id(ids[r]);
    m->set_rank(static_cast<int32_t>(r));
  }
  return plan;
}

StateDecision Keep(int64_t step) {
  StateDecision d;
  d.start_step = step;
  d.source.set_kind(proto::StateSource::KEEP);
  return d;
}

TEST(DecideShrinkTest, LossOfMiddleRankAfterTraining) {
  const proto::Plan previous = PreviousPlan(4, 100, {11, 12, 13, 14});
  proto::Plan plan;
  DecideShrink(previous, {11, 13, 14}, Keep(120), &plan);
  EXPECT_EQ(plan.shrink_from_epoch(), 4);
  EXPECT_THAT(plan.shrink_exclude(), ElementsAre(1));
}

TEST(DecideShrinkTest, SeveralLossesDownToOne) {
  const proto::Plan previous = PreviousPlan(2, 0, {5, 6, 7});
  proto::Plan plan;
  DecideShrink(previous, {7}, Keep(3), &plan);
  EXPECT_EQ(plan.shrink_from_epoch(), 2);
  EXPECT_THAT(plan.shrink_exclude(), ElementsAre(0, 1));
}

TEST(DecideShrinkTest, NoShrinkWhenAnyoneNewJoins) {
  const proto::Plan previous = PreviousPlan(4, 100, {11, 12, 13});
  proto::Plan plan;
  DecideShrink(previous, {11, 13, 99}, Keep(120), &plan);  // same size, one new
  EXPECT_EQ(plan.shrink_from_epoch(), 0);
  DecideShrink(previous, {11, 99}, Keep(120), &plan);  // smaller, but 99 is new
  EXPECT_EQ(plan.shrink_from_epoch(), 0);
  EXPECT_THAT(plan.shrink_exclude(), IsEmpty());
}

TEST(DecideShrinkTest, NoShrinkWhenTheOrderChanges) {
  const proto::Plan previous = PreviousPlan(4, 100, {11, 12, 13});
  proto::Plan plan;
  DecideShrink(previous, {13, 11}, Keep(120), &plan);  // NCCL keeps the survivors' order
  EXPECT_EQ(plan.shrink_from_epoch(), 0);
}

TEST(DecideShrinkTest, NoShrinkUnlessEverySurvivorTrainedInThePreviousEpoch) {
  const proto::Plan previous = PreviousPlan(4, 100, {11, 12, 13});
  proto::Plan plan;
  // Lost before any step of epoch 4: a survivor may never have built its communicator.
  DecideShrink(previous, {11, 13}, Keep(100), &plan);
  EXPECT_EQ(plan.shrink_from_epoch(), 0);
  // Someone lags (broadcast) or the state comes from a checkpoint: no shrink either.
  StateDecision broadcast = Keep(120);
  broadcast.source.set_kind(proto::StateSource::BROADCAST);
  DecideShrink(previous, {11, 13}, broadcast, &plan);
  EXPECT_EQ(plan.shrink_from_epoch(), 0);
  StateDecision checkpoint = Keep(120);
  checkpoint.source.set_kind(proto::StateSource::CHECKPOINT);
  DecideShrink(previous, {11, 13}, checkpoint, &plan);
  EXPECT_EQ(plan.shrink_from_epoch(), 0);
}

TEST(DecideShrinkTest, NoShrinkForTheFirstEpochOrAnEmptyOne) {
  proto::Plan plan;
  DecideShrink(proto::Plan(), {1, 2}, Keep(5), &plan);
  EXPECT_EQ(plan.shrink_from_epoch(), 0);
  DecideShrink(PreviousPlan(3, 0, {1, 2}), {}, Keep(5), &plan);
  EXPECT_EQ(plan.shrink_from_epoch(), 0);
}

TEST(DecideShrinkTest, ClearsAnEarlierDecision) {
  proto::Plan plan;
  DecideShrink(PreviousPlan(4, 100, {1, 2, 3}), {1, 3}, Keep(110), &plan);
  ASSERT_EQ(plan.shrink_from_epoch(), 4);
  DecideShrink(PreviousPlan(5, 110, {1, 3}), {1, 3}, Keep(110), &plan);
  EXPECT_EQ(plan.shrink_from_epoch(), 0);
  EXPECT_THAT(plan.shrink_exclude(), IsEmpty());
}

}  // namespace
}  // namespace spotrain::coordinator
