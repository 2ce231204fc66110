// The sample order of a run as pure functions: which token windows form micro-batch j of
// step s, which micro-batches a rank owns, and which windows form the fixed evaluation
// batches. Nothing here keeps state between steps, so the step number is the whole data
// position: there is no loader state to checkpoint, and the content of a micro-batch never
// depends on the world size or on membership history (DESIGN.md section 4).
//
// Everything here is immutable after construction; all functions and const methods are
// thread-safe.
#ifndef SPOTRAIN_WORKER_SAMPLER_H_
#define SPOTRAIN_WORKER_SAMPLER_H_

#include <cstdint>
#include <vector>

namespace spotrain::worker {

// The splitmix64 finaliser applied to x + the golden-ratio increment: a bijective,
// well-mixed 64-bit hash, used as a counter-based random number generator.
uint64_t SplitMix64(uint64_t x);

// The random key of sequence `seq_index` of micro-batch `micro_index` of training step
// `step`. Depends on nothing else (not on the world size, rank or micro-batch size).
uint64_t TrainSampleKey(uint64_t seed, int64_t step, int micro_index, int seq_index);

// The random key of sequence `seq_index` of evaluation micro-batch `eval_index`. Independent
// of the training step, so every evaluation of a run scores the same windows; drawn from a
// separate domain, so it never coincides with a training key.
uint64_t EvalSampleKey(uint64_t seed, int eval_index, int seq_index);

// Maps a 64-bit key to [0, n) by a multiply-high (n >= 1). The bias is below n / 2^64.
uint64_t UniformIndex(uint64_t key, uint64_t n);

// The half-open block [begin, end) of micro-batches that `rank` computes when a step's
// `num_micro` micro-batches are split among `world` ranks: contiguous blocks in rank order,
// the first num_micro % world ranks getting one extra. Ranks beyond num_micro get an empty
// block. Requires num_micro >= 0, world >= 1, 0 <= rank < world (checked: a caller passing
// anything else has broken the Plan's invariants).
struct Range {
  int begin = 0;
  int end = 0;
  int size() const { return end - begin; }
  bool operator==(const Range& other) const { return begin == other.begin && end == other.end; }
};
Range MicroBatchRange(int num_micro, int world, int rank);

// Where a window of `window` tokens starts: a shard and a token offset inside it.
struct WindowRef {
  int shard = 0;
  int64_t offset = 0;
};

// Maps random keys to windows of `window` consecutive tokens spread uniformly over every
// valid start position of a set of shards. A window never crosses a shard boundary; a shard
// is chosen with probability proportional to its number of valid start positions
// (`tokens - window + 1`, zero for a shard shorter than a window).
class WindowSampler {
 public:
  // `shard_tokens[k]` is the token count of shard k; `window` >= 1.
  WindowSampler(const std::vector<int64_t>& shard_tokens, int64_t window);

  // The total number of valid windows over all shards (0 if no shard holds a window).
  uint64_t num_windows() const { return num_windows_; }
  int64_t window() const { return window_; }

  // The window that `key` selects. Requires num_windows() > 0.
  WindowRef Locate(uint64_t key) const;
  // The window with global index `index` in [0, num_windows()): shards in order, offsets
  // ascending within a shard.
  WindowRef WindowAt(uint64_t index) const;

 private:
  int64_t window_;
  // starts_[k] is the global index of shard k's first window; starts_.back() is the total.
  std::vector<uint64_t> starts_;
  uint64_t num_windows_ = 0;
};

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_SAMPLER_H_
