#include "worker/sampler.h"

#include <algorithm>

#include "common/check.h"

namespace spotrain::worker {
namespace {

// Domain separators, so that training and evaluation keys come from unrelated streams even
// for equal (seed, index) pairs. Arbitrary odd constants.
constexpr uint64_t kTrainDomain = 0x747261696e5f6b31ULL;
constexpr uint64_t kEvalDomain = 0x6576616c5f6b6579ULL;

// Chains the hash through each coordinate: every input bit affects every output bit, and
// (a, b) never collides with (b, a) by construction.
uint64_t Combine(uint64_t h, uint64_t value) { return SplitMix64(h ^ value); }

}  // namespace

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

uint64_t TrainSampleKey(uint64_t seed, int64_t step, int micro_index, int seq_index) {
  uint64_t h = SplitMix64(seed ^ kTrainDomain);
  h = Combine(h, static_cast<uint64_t>(step));
  h = Combine(h, static_cast<uint64_t>(static_cast<int64_t>(micro_index)));
  return Combine(h, static_cast<uint64_t>(static_cast<int64_t>(seq_index)));
}

uint64_t EvalSampleKey(uint64_t seed, int eval_index, int seq_index) {
  uint64_t h = SplitMix64(seed ^ kEvalDomain);
  h = Combine(h, static_cast<uint64_t>(static_cast<int64_t>(eval_index)));
  return Combine(h, static_cast<uint64_t>(static_cast<int64_t>(seq_index)));
}

uint64_t UniformIndex(uint64_t key, uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(key) * n) >> 64);
}

Range MicroBatchRange(int num_micro, int world, int rank) {
  SPOTRAIN_CHECK(num_micro >= 0);
  SPOTRAIN_CHECK(world >= 1);
  SPOTRAIN_CHECK(rank >= 0 && rank < world);
  const int base = num_micro / world;
  const int extra = num_micro % world;
  Range range;
  range.begin = rank * base + std::min(rank, extra);
  range.end = range.begin + base + (rank < extra ? 1 : 0);
  return range;
}

WindowSampler::WindowSampler(const std::vector<int64_t>& shard_tokens, int64_t window)
    : window_(window) {
  SPOTRAIN_CHECK(window >= 1);
  starts_.reserve(shard_tokens.size() + 1);
  uint64_t total = 0;
  for (int64_t tokens : shard_tokens) {
    starts_.push_back(total);
    if (tokens >= window) total += static_cast<uint64_t>(tokens - window + 1);
  }
  starts_.push_back(total);
  num_windows_ = total;
}

WindowRef WindowSampler::Locate(uint64_t key) const {
  return WindowAt(UniformIndex(key, num_windows_));
}

WindowRef WindowSampler::WindowAt(uint64_t index) const {
  SPOTRAIN_CHECK(index < num_windows_);
  // The last shard whose first window index is <= index; shards without windows have the
  // same start as their successor, and upper_bound skips past them.
  auto it = std::upper_bound(starts_.begin(), starts_.end(), index);
  WindowRef ref;
  ref.shard = static_cast<int>(it - starts_.begin()) - 1;
  ref.offset = static_cast<int64_t>(index - starts_[ref.shard]);
  return ref;
}

}  // namespace spotrain::worker
