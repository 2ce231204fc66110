#include "coordinator/kv_store.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace spotrain::coordinator {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

TEST(KvStoreTest, SetWakesWaitersOfThatKeyOnly) {
  KvStore kv;
  const absl::Time t0 = absl::UnixEpoch();
  kv.AddWaiter(1, "a", 10, t0 + absl::Seconds(1));
  kv.AddWaiter(1, "a", 11, t0 + absl::Seconds(1));
  kv.AddWaiter(1, "b", 12, t0 + absl::Seconds(1));
  kv.AddWaiter(2, "a", 13, t0 + absl::Seconds(1));
  auto woken = kv.Set(1, "a", "v");
  ASSERT_TRUE(woken.ok());
  EXPECT_THAT(*woken, ElementsAre(10, 11));
  EXPECT_EQ(*kv.Get(1, "a"), "v");
  EXPECT_EQ(kv.Get(2, "a"), nullptr);
  EXPECT_EQ(kv.waiters(), 2u);
}

TEST(KvStoreTest, DeadlinesAndEpochDrops) {
  KvStore kv;
  const absl::Time t0 = absl::UnixEpoch();
  kv.AddWaiter(1, "a", 1, t0 + absl::Seconds(1));
  kv.AddWaiter(2, "a", 2, t0 + absl::Seconds(5));
  kv.AddWaiter(3, "a", 3, t0 + absl::Seconds(5));
  EXPECT_THAT(kv.TakeExpired(t0), IsEmpty());
  EXPECT_THAT(kv.TakeExpired(t0 + absl::Seconds(2)), ElementsAre(1));
  ASSERT_TRUE(kv.Set(2, "k", "v").ok());
  EXPECT_THAT(kv.DropBelow(3), ElementsAre(2));
  EXPECT_EQ(kv.Get(2, "k"), nullptr);
  EXPECT_THAT(kv.TakeAllWaiters(), ElementsAre(3));
}

TEST(KvStoreTest, ValidatesSizes) {
  EXPECT_TRUE(KvStore::Validate("k", 10).ok());
  EXPECT_EQ(KvStore::Validate("", 1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KvStore::Validate(std::string(513, 'k'), 1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KvStore::Validate("k", (1 << 20) + 1).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace spotrain::coordinator
