// Tests for worker/sampler.h: the pure functions that decide the sample order.
#include "worker/sampler.h"

#include <algorithm>
#include <map>
#include <set>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"

namespace spotrain::worker {
namespace {

TEST(SplitMix64Test, MatchesReferenceSequence) {
  // The first outputs of the reference splitmix64 generator seeded with 0 (state advances by
  // the golden-ratio increment, which SplitMix64 adds itself).
  EXPECT_EQ(SplitMix64(0), 0xe220a8397b1dcdafULL);
  EXPECT_EQ(SplitMix64(0x9e3779b97f4a7c15ULL), 0x6e789e6aa1b965f4ULL);
}

TEST(SampleKeyTest, DependsOnEveryCoordinate) {
  const uint64_t base = TrainSampleKey(1337, 5, 2, 3);
  EXPECT_EQ(base, TrainSampleKey(1337, 5, 2, 3));
  EXPECT_NE(base, TrainSampleKey(1338, 5, 2, 3));
  EXPECT_NE(base, TrainSampleKey(1337, 6, 2, 3));
  EXPECT_NE(base, TrainSampleKey(1337, 5, 3, 3));
  EXPECT_NE(base, TrainSampleKey(1337, 5, 2, 4));
  // Swapped coordinates are different sequences.
  EXPECT_NE(TrainSampleKey(1, 2, 3, 4), TrainSampleKey(1, 2, 4, 3));
  // Evaluation keys come from another domain.
  EXPECT_NE(EvalSampleKey(1337, 2, 3), TrainSampleKey(1337, 0, 2, 3));
  EXPECT_EQ(EvalSampleKey(1337, 2, 3), EvalSampleKey(1337, 2, 3));
  EXPECT_NE(EvalSampleKey(1337, 2, 3), EvalSampleKey(1337, 3, 3));
}

TEST(SampleKeyTest, NoCollisionsOverAGrid) {
  std::set<uint64_t> keys;
  int n = 0;
  for (int64_t step = 0; step < 40; ++step) {
    for (int j = 0; j < 16; ++j) {
      for (int i = 0; i < 16; ++i, ++n) keys.insert(TrainSampleKey(7, step, j, i));
    }
  }
  for (int e = 0; e < 16; ++e) {
    for (int i = 0; i < 16; ++i, ++n) keys.insert(EvalSampleKey(7, e, i));
  }
  EXPECT_EQ(static_cast<int>(keys.size()), n);
}

TEST(UniformIndexTest, StaysInRangeAndCoversIt) {
  for (uint64_t n : {1ULL, 2ULL, 7ULL, 1000ULL, (1ULL << 40) + 3}) {
    EXPECT_EQ(UniformIndex(0, n), 0u);
    EXPECT_EQ(UniformIndex(~0ULL, n), n - 1);
  }
  std::vector<int> hits(10, 0);
  for (uint64_t k = 0; k < 10000; ++k) ++hits[UniformIndex(SplitMix64(k), 10)];
  for (int h : hits) {
    EXPECT_GT(h, 850);
    EXPECT_LT(h, 1150);
  }
}

TEST(MicroBatchRangeTest, ExamplesFromTheContract) {
  // 10 micro-batches over 4 ranks: 3, 3, 2, 2.
  EXPECT_EQ(MicroBatchRange(10, 4, 0), (Range{0, 3}));
  EXPECT_EQ(MicroBatchRange(10, 4, 1), (Range{3, 6}));
  EXPECT_EQ(MicroBatchRange(10, 4, 2), (Range{6, 8}));
  EXPECT_EQ(MicroBatchRange(10, 4, 3), (Range{8, 10}));
  EXPECT_EQ(MicroBatchRange(4, 1, 0), (Range{0, 4}));
  // More ranks than micro-batches: the last ranks get nothing.
  EXPECT_EQ(MicroBatchRange(2, 3, 2).size(), 0);
}

TEST(MicroBatchRangeTest, CoversEveryMicroBatchExactlyOnceInContiguousBlocks) {
  for (int g = 0; g <= 20; ++g) {
    for (int w = 1; w <= 8; ++w) {
      std::vector<int> owner(g, -1);
      int next = 0;
      int max_size = 0;
      int min_size = g + 1;
      for (int r = 0; r < w; ++r) {
        Range range = MicroBatchRange(g, w, r);
        SCOPED_TRACE(testing::Message() << "G=" << g << " W=" << w << " rank=" << r);
        ASSERT_EQ(range.begin, next);  // Contiguous, in rank order, no gap or overlap.
        ASSERT_LE(range.begin, range.end);
        for (int j = range.begin; j < range.end; ++j) owner[j] = r;
        next = range.end;
        max_size = std::max(max_size, range.size());
        min_size = std::min(min_size, range.size());
        // The first G % W ranks get the extra one.
        EXPECT_EQ(range.size(), g / w + (r < g % w ? 1 : 0));
      }
      EXPECT_EQ(next, g);
      EXPECT_LE(max_size - min_size, 1);
      for (int j = 0; j < g; ++j) EXPECT_GE(owner[j], 0);
    }
  }
}

TEST(WindowSamplerTest, CountsValidStartPositions) {
  // Window 5: a shard of 4 tokens holds none, one of 5 holds one, one of 9 holds five.
  WindowSampler sampler({4, 5, 9}, 5);
  EXPECT_EQ(sampler.num_windows(), 6u);
  EXPECT_EQ(sampler.WindowAt(0).shard, 1);
  EXPECT_EQ(sampler.WindowAt(0).offset, 0);
  EXPECT_EQ(sampler.WindowAt(1).shard, 2);
  EXPECT_EQ(sampler.WindowAt(1).offset, 0);
  EXPECT_EQ(sampler.WindowAt(5).shard, 2);
  EXPECT_EQ(sampler.WindowAt(5).offset, 4);
  EXPECT_EQ(WindowSampler({3, 4}, 5).num_windows(), 0u);
}

TEST(WindowSamplerTest, NeverCrossesAShardAndPicksShardsByUsableLength) {
  const int64_t window = 65;
  // Usable start positions: 100, 0 (too short), 300, 1.
  const std::vector<int64_t> lengths = {window + 99, window - 1, window + 299, window};
  WindowSampler sampler(lengths, window);
  ASSERT_EQ(sampler.num_windows(), 401u);
  std::map<int, int> per_shard;
  std::set<std::pair<int, int64_t>> seen;
  const int draws = 40000;
  for (int i = 0; i < draws; ++i) {
    WindowRef ref = sampler.Locate(TrainSampleKey(42, i, 0, 0));
    ASSERT_GE(ref.shard, 0);
    ASSERT_LT(ref.shard, 4);
    ASSERT_GE(ref.offset, 0);
    ASSERT_LE(ref.offset + window, lengths[ref.shard]);
    ++per_shard[ref.shard];
    seen.insert({ref.shard, ref.offset});
  }
  EXPECT_EQ(per_shard[1], 0);
  EXPECT_NEAR(per_shard[0] / static_cast<double>(draws), 100.0 / 401, 0.015);
  EXPECT_NEAR(per_shard[2] / static_cast<double>(draws), 300.0 / 401, 0.015);
  // Every start position is reachable (40000 draws over 401 positions).
  EXPECT_EQ(seen.size(), 401u);
}

}  // namespace
}  // namespace spotrain::worker
