// Token data: llm.c-compatible `.bin` shards and the dataset the trainer samples from.
//
// Shard format (identical to karpathy/llm.c's, so its GPT-2 shards load unchanged): a header
// of 256 little-endian int32 (header[0] = 20240520 magic, header[1] = 1 version, header[2] =
// token count, the rest zero), then `token count` uint16 tokens. The file size must be
// exactly 1024 + 2 * count bytes.
//
// A TokenShard memory-maps one file read-only and validates it completely on Open (header,
// size, every token below the model's vocab size), so that a training step never meets a bad
// token. A TokenDataset is a set of shards plus the sampler (worker/sampler.h): the tokens of
// every sequence are a pure function of (seed, step, micro-batch index, sequence index).
//
// Thread-safety: TokenShard and TokenDataset are immutable after Open; their const methods
// may be called from any number of threads. WriteTokenShard is thread-safe (one file each).
#ifndef SPOTRAIN_WORKER_DATA_H_
#define SPOTRAIN_WORKER_DATA_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "worker/sampler.h"

namespace spotrain::worker {

inline constexpr int32_t kShardMagic = 20240520;
inline constexpr int32_t kShardVersion = 1;
inline constexpr int kShardHeaderInts = 256;
inline constexpr size_t kShardHeaderBytes = kShardHeaderInts * sizeof(int32_t);
// The largest vocabulary a uint16 token can index.
inline constexpr int kMaxShardVocab = 65536;

// Writes `tokens` as a shard at `path`, atomically (temp file, fsync, rename, fsync dir).
// kInvalidArgument if `tokens` is empty (a reader refuses such a file) or holds more than
// INT32_MAX tokens (the header's count is an int32); I/O errors name the path.
absl::Status WriteTokenShard(const std::string& path, absl::Span<const uint16_t> tokens);

// One read-only memory-mapped shard. Movable, not copyable; unmaps on destruction.
class TokenShard {
 public:
  // Maps and validates `path` for a model with `vocab_size` tokens (1..65536). Errors name
  // the file, say what is wrong and what to do:
  //   kNotFound / kPermissionDenied / kInternal: cannot open or map the file;
  //   kFailedPrecondition: empty, truncated, wrong magic (not a token shard), wrong version,
  //     token count 0 or not matching the file size, a token >= vocab_size (with its index);
  //   kInvalidArgument: vocab_size out of range.
  // Reads the whole file once (the token check); blocks on disk I/O.
  static absl::StatusOr<TokenShard> Open(const std::string& path, int vocab_size);

  TokenShard(TokenShard&& other) noexcept;
  TokenShard& operator=(TokenShard&& other) noexcept;
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;
  ~TokenShard();

  const std::string& path() const { return path_; }
  int64_t num_tokens() const { return num_tokens_; }
  // The tokens; valid while this object lives. Pages are read lazily from the file.
  absl::Span<const uint16_t> tokens() const { return {tokens_, static_cast<size_t>(num_tokens_)}; }

 private:
  TokenShard() = default;
  void Reset();

  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  const uint16_t* tokens_ = nullptr;
  int64_t num_tokens_ = 0;
};

// The shards matched by a glob, sampled in windows of seq_len + 1 tokens (inputs are the
// first seq_len, targets the last seq_len).
class TokenDataset {
 public:
  // Opens every shard matching `pattern` (sorted), validating each for `vocab_size`.
  // Errors: kNotFound if nothing matches; a shard's error from TokenShard::Open;
  // kInvalidArgument if seq_len < 1; kFailedPrecondition if no shard holds seq_len + 1
  // tokens. A shard shorter than a window is kept but never sampled (logged as a warning).
  static absl::StatusOr<std::unique_ptr<TokenDataset>> Open(const std::string& pattern,
                                                            int vocab_size, int seq_len);

  const std::string& pattern() const { return pattern_; }
  int vocab_size() const { return vocab_size_; }
  int seq_len() const { return seq_len_; }
  int64_t total_tokens() const { return total_tokens_; }
  // The number of distinct windows the sampler draws from.
  uint64_t num_windows() const { return sampler_.num_windows(); }
  const std::vector<TokenShard>& shards() const { return shards_; }

  // The seq_len + 1 tokens of sequence `seq_index` of micro-batch `micro_index` of training
  // step `step`. A pure function of its arguments and the data: not of the world size, the
  // rank or the micro-batch size. Valid while the dataset lives.
  absl::Span<const uint16_t> TrainSequence(uint64_t seed, int64_t step, int micro_index,
                                           int seq_index) const;
  // The seq_len + 1 tokens of sequence `seq_index` of evaluation micro-batch `eval_index`
  // (independent of the training step).
  absl::Span<const uint16_t> EvalSequence(uint64_t seed, int eval_index, int seq_index) const;

  // Fills inputs[micro_batch * seq_len] and targets[micro_batch * seq_len] (row-major, one
  // row per sequence) for micro-batch `micro_index` of step `step`: row i is
  // TrainSequence(seed, step, micro_index, i) without its last token (inputs) and without its
  // first (targets).
  void FillMicroBatch(uint64_t seed, int64_t step, int micro_index, int micro_batch,
                      int32_t* inputs, int32_t* targets) const;
  // The same for evaluation micro-batch `eval_index`.
  void FillEvalBatch(uint64_t seed, int eval_index, int micro_batch, int32_t* inputs,
                     int32_t* targets) const;

 private:
  TokenDataset(std::string pattern, int vocab_size, int seq_len, std::vector<TokenShard> shards,
               WindowSampler sampler);
  absl::Span<const uint16_t> Window(uint64_t key) const;
  void FillRow(absl::Span<const uint16_t> window, int32_t* inputs, int32_t* targets) const;

  std::string pattern_;
  int vocab_size_;
  int seq_len_;
  std::vector<TokenShard> shards_;
  WindowSampler sampler_;
  int64_t total_tokens_ = 0;
};

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_DATA_H_
