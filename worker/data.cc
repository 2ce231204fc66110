#include "worker/data.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "common/check.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/status_macros.h"

namespace spotrain::worker {
namespace {

static_assert(sizeof(uint16_t) == 2 && sizeof(int32_t) == 4, "shard layout");

constexpr char kRegenerateHint[] =
    "re-create it with `spotrain prepare-data` (or the tool that made it), or remove it from "
    "the data glob";

absl::Status OpenError(const std::string& path, int err) {
  std::string message = absl::StrFormat("cannot open token shard %s: %s", path, std::strerror(err));
  if (err == ENOENT) return absl::NotFoundError(message);
  if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(message);
  return absl::InternalError(message);
}

absl::Status BadShard(const std::string& path, absl::string_view what,
                      absl::string_view hint = kRegenerateHint) {
  return absl::FailedPreconditionError(absl::StrCat("token shard ", path, " ", what, ": ", hint));
}

}  // namespace

absl::Status WriteTokenShard(const std::string& path, absl::Span<const uint16_t> tokens) {
  if (tokens.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("refusing to write token shard ", path, " with no tokens"));
  }
  if (tokens.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "token shard %s would hold %d tokens, more than the header's int32 count allows: "
        "use smaller shards",
        path, tokens.size()));
  }
  int32_t header[kShardHeaderInts] = {};
  header[0] = kShardMagic;
  header[1] = kShardVersion;
  header[2] = static_cast<int32_t>(tokens.size());
  return common::WriteFileAtomically(
      path, {absl::string_view(reinterpret_cast<const char*>(header), sizeof(header)),
             absl::string_view(reinterpret_cast<const char*>(tokens.data()),
                               tokens.size() * sizeof(uint16_t))});
}

absl::StatusOr<TokenShard> TokenShard::Open(const std::string& path, int vocab_size) {
  if (vocab_size < 1 || vocab_size > kMaxShardVocab) {
    return absl::InvalidArgumentError(
        absl::StrFormat("cannot check token shard %s against vocab size %d: it must be in 1..%d",
                        path, vocab_size, kMaxShardVocab));
  }
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return OpenError(path, errno);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return OpenError(path, err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return BadShard(path, "is not a regular file");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size == 0) {
    ::close(fd);
    return BadShard(path, "is empty (0 bytes)");
  }
  if (size < kShardHeaderBytes) {
    ::close(fd);
    return BadShard(path, absl::StrFormat("is truncated: %d bytes, shorter than the %d-byte "
                                          "header",
                                          size, kShardHeaderBytes));
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  int map_errno = errno;
  ::close(fd);  // The mapping keeps the file alive.
  if (map == MAP_FAILED) {
    return absl::InternalError(
        absl::StrFormat("cannot memory-map token shard %s: %s", path, std::strerror(map_errno)));
  }
  TokenShard shard;
  shard.path_ = path;
  shard.map_ = map;
  shard.map_size_ = size;
  // From here on `shard` unmaps on every early return.

  int32_t header[3];
  std::memcpy(header, map, sizeof(header));
  if (header[0] != kShardMagic) {
    return BadShard(path, absl::StrFormat("has magic number %d, not %d: it is not an llm.c/"
                                          "spotrain token shard (or is corrupt)",
                                          header[0], kShardMagic));
  }
  if (header[1] != kShardVersion) {
    return BadShard(path, absl::StrFormat("has format version %d; spotrain reads only version "
                                          "%d (uint16 tokens)",
                                          header[1], kShardVersion));
  }
  const int64_t count = header[2];
  if (count <= 0) {
    return BadShard(path, absl::StrFormat("holds no tokens (header token count %d)", count));
  }
  const uint64_t expected = kShardHeaderBytes + static_cast<uint64_t>(count) * 2;
  if (size != expected) {
    return BadShard(
        path, absl::StrFormat("has %d bytes but its header says %d tokens, i.e. %d bytes: the "
                              "file is %s",
                              size, count, expected,
                              size < expected ? "truncated (an interrupted write or copy?)"
                                              : "longer than its header says (corrupt)"));
  }
  const auto* tokens =
      reinterpret_cast<const uint16_t*>(static_cast<const char*>(map) + kShardHeaderBytes);
  // One pass: the common case (every token valid) runs as a branch-light max reduction; the
  // exact position is searched only on failure.
  uint16_t max_token = 0;
  for (int64_t i = 0; i < count; ++i) max_token = std::max(max_token, tokens[i]);
  if (max_token >= vocab_size) {
    int64_t bad = 0;
    while (tokens[bad] < vocab_size) ++bad;
    return BadShard(
        path,
        absl::StrFormat("holds token %d at token index %d (byte offset %d), not below the "
                        "model's vocab size %d: the data was made for another tokenizer",
                        tokens[bad], bad, kShardHeaderBytes + 2 * static_cast<uint64_t>(bad),
                        vocab_size),
        "use a model whose vocab_size covers it, or re-create the data for this model with "
        "`spotrain prepare-data`");
  }
  shard.tokens_ = tokens;
  shard.num_tokens_ = count;
  return shard;
}

TokenShard::TokenShard(TokenShard&& other) noexcept { *this = std::move(other); }

TokenShard& TokenShard::operator=(TokenShard&& other) noexcept {
  if (this != &other) {
    Reset();
    path_ = std::move(other.path_);
    map_ = std::exchange(other.map_, nullptr);
    map_size_ = std::exchange(other.map_size_, 0);
    tokens_ = std::exchange(other.tokens_, nullptr);
    num_tokens_ = std::exchange(other.num_tokens_, 0);
  }
  return *this;
}

TokenShard::~TokenShard() { Reset(); }

void TokenShard::Reset() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
  map_ = nullptr;
  map_size_ = 0;
  tokens_ = nullptr;
  num_tokens_ = 0;
}

absl::StatusOr<std::unique_ptr<TokenDataset>> TokenDataset::Open(const std::string& pattern,
                                                                 int vocab_size, int seq_len) {
  if (seq_len < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("seq_len %d for dataset %s must be at least 1", seq_len, pattern));
  }
  auto paths = common::Glob(pattern);
  if (!paths.ok()) {
    return absl::NotFoundError(absl::StrCat("no token shard matches ", pattern,
                                            ": run `spotrain prepare-data --output DIR` and point "
                                            "the data glob at DIR/train_*.bin and DIR/val_*.bin"));
  }
  std::vector<TokenShard> shards;
  std::vector<int64_t> lengths;
  shards.reserve(paths->size());
  const int64_t window = static_cast<int64_t>(seq_len) + 1;
  for (const std::string& path : *paths) {
    ASSIGN_OR_RETURN(TokenShard shard, TokenShard::Open(path, vocab_size));
    if (shard.num_tokens() < window) {
      SPOTRAIN_LOG(Warning, "token shard %s holds %d tokens, fewer than one window of %d: unused",
                   path, shard.num_tokens(), window);
    }
    lengths.push_back(shard.num_tokens());
    shards.push_back(std::move(shard));
  }
  WindowSampler sampler(lengths, window);
  if (sampler.num_windows() == 0) {
    int64_t longest = 0;
    for (int64_t n : lengths) longest = std::max(longest, n);
    return absl::FailedPreconditionError(absl::StrFormat(
        "dataset %s (%d shard(s), longest %d tokens) holds no window of seq_len + 1 = %d "
        "tokens: use a smaller seq_len or more data",
        pattern, shards.size(), longest, window));
  }
  return std::unique_ptr<TokenDataset>(
      new TokenDataset(pattern, vocab_size, seq_len, std::move(shards), std::move(sampler)));
}

TokenDataset::TokenDataset(std::string pattern, int vocab_size, int seq_len,
                           std::vector<TokenShard> shards, WindowSampler sampler)
    : pattern_(std::move(pattern)),
      vocab_size_(vocab_size),
      seq_len_(seq_len),
      shards_(std::move(shards)),
      sampler_(std::move(sampler)) {
  for (const TokenShard& shard : shards_) total_tokens_ += shard.num_tokens();
}

absl::Span<const uint16_t> TokenDataset::Window(uint64_t key) const {
  WindowRef ref = sampler_.Locate(key);
  return shards_[ref.shard].tokens().subspan(static_cast<size_t>(ref.offset),
                                             static_cast<size_t>(seq_len_) + 1);
}

absl::Span<const uint16_t> TokenDataset::TrainSequence(uint64_t seed, int64_t step, int micro_index,
                                                       int seq_index) const {
  return Window(TrainSampleKey(seed, step, micro_index, seq_index));
}

absl::Span<const uint16_t> TokenDataset::EvalSequence(uint64_t seed, int eval_index,
                                                      int seq_index) const {
  return Window(EvalSampleKey(seed, eval_index, seq_index));
}

void TokenDataset::FillRow(absl::Span<const uint16_t> window, int32_t* inputs,
                           int32_t* targets) const {
  for (int t = 0; t < seq_len_; ++t) {
    inputs[t] = window[t];
    targets[t] = window[t + 1];
  }
}

void TokenDataset::FillMicroBatch(uint64_t seed, int64_t step, int micro_index, int micro_batch,
                                  int32_t* inputs, int32_t* targets) const {
  for (int i = 0; i < micro_batch; ++i) {
    const size_t row = static_cast<size_t>(i) * seq_len_;
    FillRow(TrainSequence(seed, step, micro_index, i), inputs + row, targets + row);
  }
}

void TokenDataset::FillEvalBatch(uint64_t seed, int eval_index, int micro_batch, int32_t* inputs,
                                 int32_t* targets) const {
  for (int i = 0; i < micro_batch; ++i) {
    const size_t row = static_cast<size_t>(i) * seq_len_;
    FillRow(EvalSequence(seed, eval_index, i), inputs + row, targets + row);
  }
}

}  // namespace spotrain::worker
