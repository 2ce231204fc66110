// Tests for worker/data.h (token shards and the dataset), worker/tokenizer.h, and the
// `spotrain prepare-data` command end to end (runs the built binary).
#include "worker/data.h"

#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/file_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/sampler.h"
#include "worker/tokenizer.h"

namespace spotrain::worker {
namespace {

using ::testing::HasSubstr;

// A fresh directory per test, removed at the end.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = testing::TempDir() + "spotrain_data_test_XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    const char* dir = ::mkdtemp(buf.data());
    EXPECT_NE(dir, nullptr) << std::strerror(errno);
    path_ = dir != nullptr ? dir : "/tmp";
  }
  ~TempDir() {
    std::string cmd = absl::StrCat("rm -rf '", path_, "'");
    EXPECT_EQ(std::system(cmd.c_str()), 0);
  }
  std::string File(const std::string& name) const { return common::JoinPath(path_, name); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::vector<uint16_t> Iota(int n, int modulo) {
  std::vector<uint16_t> tokens(n);
  for (int i = 0; i < n; ++i) tokens[i] = static_cast<uint16_t>((i * 7 + 3) % modulo);
  return tokens;
}

// Raw bytes of a shard with the given header fields and tokens (for building bad files).
std::string RawShard(int32_t magic, int32_t version, int32_t count,
                     const std::vector<uint16_t>& tokens) {
  std::vector<int32_t> header(kShardHeaderInts, 0);
  header[0] = magic;
  header[1] = version;
  header[2] = count;
  std::string bytes(reinterpret_cast<const char*>(header.data()), kShardHeaderBytes);
  bytes.append(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 2);
  return bytes;
}

void WriteRaw(const std::string& path, const std::string& bytes) {
  ASSERT_TRUE(common::WriteFileAtomically(path, bytes).ok());
}

TEST(TokenShardTest, RoundTrip) {
  TempDir dir;
  const std::string path = dir.File("train_000000.bin");
  const std::vector<uint16_t> tokens = Iota(1000, 256);
  ASSERT_TRUE(WriteTokenShard(path, tokens).ok());

  // The exact llm.c layout on disk.
  auto bytes = common::ReadFile(path);
  ASSERT_TRUE(bytes.ok());
  ASSERT_EQ(bytes->size(), kShardHeaderBytes + 2 * tokens.size());
  int32_t header[kShardHeaderInts];
  std::memcpy(header, bytes->data(), sizeof(header));
  EXPECT_EQ(header[0], 20240520);
  EXPECT_EQ(header[1], 1);
  EXPECT_EQ(header[2], 1000);
  for (int i = 3; i < kShardHeaderInts; ++i) EXPECT_EQ(header[i], 0);

  auto shard = TokenShard::Open(path, 256);
  ASSERT_TRUE(shard.ok()) << shard.status();
  EXPECT_EQ(shard->path(), path);
  ASSERT_EQ(shard->num_tokens(), 1000);
  EXPECT_EQ(std::vector<uint16_t>(shard->tokens().begin(), shard->tokens().end()), tokens);

  // Moving keeps the mapping valid and empties the source.
  TokenShard moved = std::move(*shard);
  EXPECT_EQ(moved.num_tokens(), 1000);
  EXPECT_EQ(moved.tokens()[999], tokens[999]);
  EXPECT_EQ(shard->num_tokens(), 0);
}

TEST(TokenShardTest, WriterRefusesAnEmptyShard) {
  TempDir dir;
  absl::Status status = WriteTokenShard(dir.File("x.bin"), std::vector<uint16_t>{});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(common::PathExists(dir.File("x.bin")));
}

TEST(TokenShardTest, Gpt2ShardLoadsWithGpt2Vocab) {
  TempDir dir;
  const std::string path = dir.File("fineweb_train_000001.bin");
  std::vector<uint16_t> tokens = {50256, 15496, 11, 995, 0, 50256, 50255};
  // Written by hand, as another tool would, not through WriteTokenShard.
  WriteRaw(path, RawShard(20240520, 1, static_cast<int32_t>(tokens.size()), tokens));
  auto shard = TokenShard::Open(path, 50257);
  ASSERT_TRUE(shard.ok()) << shard.status();
  EXPECT_EQ(shard->tokens()[0], 50256);
  // The same file is refused by a byte-level model, naming the first bad token.
  auto byte_level = TokenShard::Open(path, 256);
  ASSERT_FALSE(byte_level.ok());
  EXPECT_THAT(byte_level.status().message(), HasSubstr(path));
  EXPECT_THAT(byte_level.status().message(), HasSubstr("token 50256 at token index 0"));
}

struct BadFile {
  const char* name;
  std::string bytes;
  const char* what;  // Expected in the message.
};

TEST(TokenShardTest, EveryBadFileIsAClearErrorNamingTheFile) {
  TempDir dir;
  const std::vector<uint16_t> ok = Iota(100, 256);
  std::string truncated = RawShard(20240520, 1, 100, ok);
  truncated.resize(truncated.size() - 3);
  std::vector<uint16_t> with_bad = ok;
  with_bad[37] = 256;
  const std::vector<BadFile> cases = {
      {"empty.bin", "", "is empty"},
      {"short_header.bin", RawShard(20240520, 1, 100, ok).substr(0, 500), "truncated"},
      {"truncated.bin", truncated, "truncated"},
      {"longer.bin", RawShard(20240520, 1, 99, ok), "longer than its header"},
      {"foreign.bin", RawShard(0x464c457f, 1, 100, ok), "magic number"},
      {"version2.bin", RawShard(20240520, 2, 100, ok), "version 2"},
      {"zero_count.bin", RawShard(20240520, 1, 0, {}), "no tokens"},
      {"negative_count.bin", RawShard(20240520, 1, -5, {}), "no tokens"},
      {"bad_token.bin", RawShard(20240520, 1, 100, with_bad),
       "token 256 at token index 37 (byte offset 1098)"},
  };
  for (const BadFile& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string path = dir.File(c.name);
    WriteRaw(path, c.bytes);
    auto shard = TokenShard::Open(path, 256);
    ASSERT_FALSE(shard.ok());
    EXPECT_EQ(shard.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(shard.status().message(), HasSubstr(path));
    EXPECT_THAT(shard.status().message(), HasSubstr(c.what));
    EXPECT_THAT(shard.status().message(), HasSubstr("spotrain prepare-data"));
  }
  auto missing = TokenShard::Open(dir.File("missing.bin"), 256);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr(dir.File("missing.bin")));
  auto directory = TokenShard::Open(dir.path(), 256);
  EXPECT_EQ(directory.status().code(), absl::StatusCode::kFailedPrecondition);
  // A vocab a uint16 token cannot express is the caller's mistake.
  WriteRaw(dir.File("good.bin"), RawShard(20240520, 1, 100, ok));
  EXPECT_EQ(TokenShard::Open(dir.File("good.bin"), 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TokenShard::Open(dir.File("good.bin"), 65537).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(TokenShard::Open(dir.File("good.bin"), 65536).ok());
}

// Two shards of distinct token ranges, so a window's shard can be told from its tokens.
class TokenDatasetTest : public testing::Test {
 protected:
  static constexpr int kSeqLen = 16;

  void SetUp() override {
    std::vector<uint16_t> a(300), b(900);
    for (int i = 0; i < 300; ++i) a[i] = static_cast<uint16_t>(i % 100);
    for (int i = 0; i < 900; ++i) b[i] = static_cast<uint16_t>(100 + i % 150);
    ASSERT_TRUE(WriteTokenShard(dir_.File("train_000000.bin"), a).ok());
    ASSERT_TRUE(WriteTokenShard(dir_.File("train_000001.bin"), b).ok());
    auto dataset = TokenDataset::Open(dir_.File("train_*.bin"), 256, kSeqLen);
    ASSERT_TRUE(dataset.ok()) << dataset.status();
    dataset_ = std::move(*dataset);
  }

  std::vector<int32_t> Batch(uint64_t seed, int64_t step, int j, int b, bool targets = false) {
    std::vector<int32_t> in(b * kSeqLen, -1), out(b * kSeqLen, -1);
    dataset_->FillMicroBatch(seed, step, j, b, in.data(), out.data());
    return targets ? out : in;
  }

  TempDir dir_;
  std::unique_ptr<TokenDataset> dataset_;
};

TEST_F(TokenDatasetTest, ExposesShardsAndTotals) {
  EXPECT_EQ(dataset_->total_tokens(), 1200);
  EXPECT_EQ(dataset_->shards().size(), 2u);
  EXPECT_EQ(dataset_->seq_len(), kSeqLen);
  EXPECT_EQ(dataset_->num_windows(), (300u - 16) + (900u - 16));
}

TEST_F(TokenDatasetTest, InputsAndTargetsAreOneWindowShiftedByOne) {
  const int b = 4;
  std::vector<int32_t> in(b * kSeqLen), out(b * kSeqLen);
  dataset_->FillMicroBatch(1337, 12, 3, b, in.data(), out.data());
  for (int i = 0; i < b; ++i) {
    absl::Span<const uint16_t> w = dataset_->TrainSequence(1337, 12, 3, i);
    ASSERT_EQ(w.size(), static_cast<size_t>(kSeqLen + 1));
    // Windows never cross shards: all tokens from one range, consecutive in the pattern.
    const bool first_shard = w[0] < 100;
    for (int t = 0; t < kSeqLen; ++t) {
      EXPECT_EQ(in[i * kSeqLen + t], w[t]);
      EXPECT_EQ(out[i * kSeqLen + t], w[t + 1]);
      EXPECT_EQ(w[t + 1] < 100, first_shard);
      EXPECT_EQ(w[t + 1], first_shard ? (w[t] + 1) % 100 : 100 + (w[t] - 100 + 1) % 150);
    }
  }
}

TEST_F(TokenDatasetTest, SampleOrderIsAPureFunctionOfSeedStepAndIndex) {
  EXPECT_EQ(Batch(1337, 7, 2, 4), Batch(1337, 7, 2, 4));
  EXPECT_EQ(Batch(1337, 7, 2, 4, true), Batch(1337, 7, 2, 4, true));
  EXPECT_NE(Batch(1337, 7, 2, 4), Batch(1337, 8, 2, 4));
  EXPECT_NE(Batch(1337, 7, 2, 4), Batch(1337, 7, 3, 4));
  EXPECT_NE(Batch(1337, 7, 2, 4), Batch(1338, 7, 2, 4));
  // A second dataset opened from the same files gives the same batches (no hidden state).
  auto again = TokenDataset::Open(dir_.File("train_*.bin"), 256, kSeqLen);
  ASSERT_TRUE(again.ok());
  std::vector<int32_t> in(4 * kSeqLen), out(4 * kSeqLen);
  (*again)->FillMicroBatch(1337, 7, 2, 4, in.data(), out.data());
  EXPECT_EQ(in, Batch(1337, 7, 2, 4));
  // Sequence i of a micro-batch does not depend on the micro-batch size.
  std::vector<int32_t> big = Batch(1337, 7, 2, 8);
  std::vector<int32_t> small = Batch(1337, 7, 2, 4);
  EXPECT_EQ(std::vector<int32_t>(big.begin(), big.begin() + 4 * kSeqLen), small);
}

TEST_F(TokenDatasetTest, MicroBatchContentDoesNotDependOnTheWorldSize) {
  // The step's global batch assembled by W ranks, each filling only its own block, is the
  // same for every W (FillMicroBatch has no world-size input; this checks the assembly).
  const int num_micro = 6, b = 2;
  auto assemble = [&](int world) {
    std::vector<std::vector<int32_t>> global(num_micro);
    for (int rank = 0; rank < world; ++rank) {
      Range range = MicroBatchRange(num_micro, world, rank);
      for (int j = range.begin; j < range.end; ++j) global[j] = Batch(99, 41, j, b);
    }
    return global;
  };
  const auto reference = assemble(1);
  for (int world = 2; world <= 8; ++world) EXPECT_EQ(assemble(world), reference) << world;
}

TEST_F(TokenDatasetTest, EvalBatchesAreFixedAndDistinct) {
  const int b = 4;
  std::vector<int32_t> in1(b * kSeqLen), out1(b * kSeqLen), in2(b * kSeqLen), out2(b * kSeqLen);
  dataset_->FillEvalBatch(1337, 0, b, in1.data(), out1.data());
  dataset_->FillEvalBatch(1337, 0, b, in2.data(), out2.data());
  EXPECT_EQ(in1, in2);
  EXPECT_EQ(out1, out2);
  dataset_->FillEvalBatch(1337, 1, b, in2.data(), out2.data());
  EXPECT_NE(in1, in2);
  EXPECT_NE(in1, Batch(1337, 0, 0, b));
}

TEST_F(TokenDatasetTest, SamplesCoverBothShardsInProportion) {
  int first = 0, total = 0;
  for (int64_t step = 0; step < 500; ++step) {
    for (int i = 0; i < 4; ++i, ++total) {
      if (dataset_->TrainSequence(5, step, 0, i)[0] < 100) ++first;
    }
  }
  // 284 of 1168 windows are in the first shard.
  EXPECT_NEAR(first / static_cast<double>(total), 284.0 / 1168, 0.04);
}

TEST(TokenDatasetOpenTest, ClearErrors) {
  TempDir dir;
  auto none = TokenDataset::Open(dir.File("train_*.bin"), 256, 8);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(none.status().message(), HasSubstr(dir.File("train_*.bin")));

  ASSERT_TRUE(WriteTokenShard(dir.File("train_000000.bin"), Iota(8, 256)).ok());
  ASSERT_TRUE(WriteTokenShard(dir.File("train_000001.bin"), Iota(5, 256)).ok());
  auto small = TokenDataset::Open(dir.File("train_*.bin"), 256, 8);
  EXPECT_EQ(small.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(small.status().message(), HasSubstr("seq_len + 1 = 9"));
  EXPECT_THAT(small.status().message(), HasSubstr("smaller seq_len"));
  // A window of exactly the longest shard fits.
  auto exact = TokenDataset::Open(dir.File("train_*.bin"), 256, 7);
  ASSERT_TRUE(exact.ok()) << exact.status();
  EXPECT_EQ((*exact)->num_windows(), 1u);
  EXPECT_EQ((*exact)->TrainSequence(1, 2, 3, 4)[0], Iota(8, 256)[0]);

  EXPECT_EQ(TokenDataset::Open(dir.File("train_*.bin"), 256, 0).status().code(),
            absl::StatusCode::kInvalidArgument);

  // One bad shard fails the whole dataset, naming that shard.
  WriteRaw(dir.File("train_000002.bin"), RawShard(1, 1, 1, {0}));
  auto bad = TokenDataset::Open(dir.File("train_*.bin"), 256, 4);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr(dir.File("train_000002.bin")));
}

TEST(TokenizerTest, ByteLevelRoundTripAndEntropy) {
  const std::string text = "aab\xff\n";
  std::vector<uint16_t> tokens = ByteTokenize(text);
  EXPECT_EQ(tokens, (std::vector<uint16_t>{97, 97, 98, 255, 10}));
  EXPECT_EQ(ByteDetokenize(tokens), text);
  EXPECT_EQ(ByteDetokenize(std::vector<uint16_t>{104, 300}), "h?");
  EXPECT_DOUBLE_EQ(UnigramEntropyNats(ByteTokenize("abab")), std::log(2.0));
  EXPECT_DOUBLE_EQ(UnigramEntropyNats(ByteTokenize("aaaa")), 0.0);
  EXPECT_DOUBLE_EQ(UnigramEntropyNats(std::vector<uint16_t>{}), 0.0);
}

// ---- `spotrain prepare-data`, run as a separate process. ----

struct RunResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

std::string SpotrainBinary() {
  const char* build = std::getenv("SPOTRAIN_BUILD_DIR");
  return common::JoinPath(build != nullptr ? build : ".", "bin/spotrain");
}

RunResult RunSpotrain(const std::string& args) {
  RunResult result;
  std::string cmd = absl::StrCat(SpotrainBinary(), " ", args, " 2>&1");
  FILE* pipe = ::popen(cmd.c_str(), "r");
  if (pipe == nullptr) return result;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), pipe)) > 0) result.output.append(buf, n);
  int status = ::pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

double EntropyOf(const std::string& text) {
  std::map<unsigned char, int> counts;
  for (char c : text) ++counts[static_cast<unsigned char>(c)];
  double h = 0;
  for (const auto& [c, n] : counts) {
    const double p = static_cast<double>(n) / text.size();
    h -= p * std::log(p);
  }
  return h;
}

std::vector<uint16_t> ReadAll(const std::string& pattern) {
  std::vector<uint16_t> all;
  auto paths = common::Glob(pattern);
  if (!paths.ok()) return all;
  for (const std::string& path : *paths) {
    auto shard = TokenShard::Open(path, 256);
    EXPECT_TRUE(shard.ok()) << shard.status();
    if (shard.ok()) all.insert(all.end(), shard->tokens().begin(), shard->tokens().end());
  }
  return all;
}

class PrepareDataTest : public testing::Test {
 protected:
  void SetUp() override {
    if (!common::PathExists(SpotrainBinary())) {
      GTEST_FAIL() << SpotrainBinary() << " is missing: build the `spotrain` target first";
    }
  }
  TempDir dir_;
};

TEST_F(PrepareDataTest, WritesShardsStatsAndEntropy) {
  // Two files given as a glob (expanded in sorted order) plus a literal path.
  std::string a, b, c;
  for (int i = 0; i < 300; ++i) a += absl::StrCat("line ", i, ": the quick brown fox\n");
  for (int i = 0; i < 100; ++i) b += absl::StrCat("def f", i, "(x):\n    return x * ", i, "\n");
  c = "tail \xe2\x82\xac\n";
  ASSERT_TRUE(common::MakeDirectories(dir_.File("in")).ok());
  WriteRaw(dir_.File("in/b.txt"), b);
  WriteRaw(dir_.File("in/a.txt"), a);
  WriteRaw(dir_.File("c.txt"), c);
  const std::string corpus = a + b + c;
  const std::string out = dir_.File("out");

  RunResult run = RunSpotrain(absl::StrCat("prepare-data --output ", out,
                                           " --val_fraction 0.1 --shard_tokens 4000 '",
                                           dir_.File("in/*.txt"), "' ", dir_.File("c.txt")));
  ASSERT_EQ(run.exit_code, 0) << run.output;

  const int64_t total = static_cast<int64_t>(corpus.size());
  const int64_t val = std::llround(total * 0.1);
  const int64_t train = total - val;
  const std::string train_text = corpus.substr(0, train);
  // The shards hold the bytes of the concatenated stream, train first, then val.
  std::vector<uint16_t> train_tokens = ReadAll(common::JoinPath(out, "train_*.bin"));
  std::vector<uint16_t> val_tokens = ReadAll(common::JoinPath(out, "val_*.bin"));
  EXPECT_EQ(train_tokens, ByteTokenize(train_text));
  EXPECT_EQ(val_tokens, ByteTokenize(corpus.substr(train)));
  EXPECT_EQ(common::Glob(common::JoinPath(out, "train_*.bin"))->size(),
            static_cast<size_t>((train + 3999) / 4000));
  EXPECT_TRUE(common::PathExists(common::JoinPath(out, "train_000000.bin")));
  EXPECT_TRUE(common::PathExists(common::JoinPath(out, "val_000000.bin")));

  // Counts and entropy on stdout and in stats.json.
  const double entropy = EntropyOf(train_text);
  EXPECT_THAT(run.output, HasSubstr(absl::StrCat("train tokens: ", train)));
  EXPECT_THAT(run.output, HasSubstr(absl::StrCat("val tokens: ", val)));
  EXPECT_THAT(run.output, HasSubstr(common::JoinPath(out, "train_000000.bin")));
  size_t at = run.output.find("unigram entropy: ");
  ASSERT_NE(at, std::string::npos) << run.output;
  double printed = 0;
  std::string number = run.output.substr(at + 17, run.output.find(' ', at + 17) - at - 17);
  ASSERT_TRUE(absl::SimpleAtod(number, &printed)) << number;
  EXPECT_NEAR(printed, entropy, 1e-4);
  EXPECT_THAT(run.output, HasSubstr("nats/token"));

  auto stats = common::ReadFile(common::JoinPath(out, "stats.json"));
  ASSERT_TRUE(stats.ok());
  EXPECT_THAT(*stats, HasSubstr(absl::StrCat("\"train_tokens\": ", train, ",")));
  EXPECT_THAT(*stats, HasSubstr(absl::StrCat("\"val_tokens\": ", val, ",")));
  size_t key = stats->find("\"unigram_entropy_nats\": ");
  ASSERT_NE(key, std::string::npos);
  double from_json = 0;
  std::string json_number = stats->substr(key + 24, stats->find(',', key) - key - 24);
  ASSERT_TRUE(absl::SimpleAtod(json_number, &from_json)) << json_number;
  EXPECT_NEAR(from_json, entropy, 1e-8);

  // Idempotent: a second run with bigger shards overwrites and leaves no stale shard.
  RunResult again = RunSpotrain(absl::StrCat("prepare-data --output ", out,
                                             " --val_fraction 0.1 --shard_tokens 1000000 '",
                                             dir_.File("in/*.txt"), "' ", dir_.File("c.txt")));
  ASSERT_EQ(again.exit_code, 0) << again.output;
  EXPECT_EQ(common::Glob(common::JoinPath(out, "train_*.bin"))->size(), 1u);
  EXPECT_EQ(ReadAll(common::JoinPath(out, "train_*.bin")), ByteTokenize(train_text));

  // The output loads as a dataset for a byte-level model.
  auto dataset = TokenDataset::Open(common::JoinPath(out, "train_*.bin"), 256, 64);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_EQ(dataset->get()->total_tokens(), train);
}

TEST_F(PrepareDataTest, ClearErrors) {
  const std::string out = dir_.File("out");
  RunResult missing =
      RunSpotrain(absl::StrCat("prepare-data --output ", out, " ", dir_.File("nope.txt")));
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_THAT(missing.output, HasSubstr(dir_.File("nope.txt")));

  RunResult no_match =
      RunSpotrain(absl::StrCat("prepare-data --output ", out, " '", dir_.File("*.none"), "'"));
  EXPECT_NE(no_match.exit_code, 0);
  EXPECT_THAT(no_match.output, HasSubstr(dir_.File("*.none")));

  WriteRaw(dir_.File("empty.txt"), "");
  RunResult empty =
      RunSpotrain(absl::StrCat("prepare-data --output ", out, " ", dir_.File("empty.txt")));
  EXPECT_NE(empty.exit_code, 0);
  EXPECT_THAT(empty.output, HasSubstr("empty"));

  WriteRaw(dir_.File("t.txt"), "some text");
  RunResult no_output = RunSpotrain(absl::StrCat("prepare-data ", dir_.File("t.txt")));
  EXPECT_NE(no_output.exit_code, 0);
  EXPECT_THAT(no_output.output, HasSubstr("--output"));

  RunResult bad_fraction = RunSpotrain(
      absl::StrCat("prepare-data --val_fraction 1.5 --output ", out, " ", dir_.File("t.txt")));
  EXPECT_NE(bad_fraction.exit_code, 0);
  EXPECT_THAT(bad_fraction.output, HasSubstr("--val_fraction"));
  EXPECT_FALSE(common::PathExists(common::JoinPath(out, "stats.json")));
}

}  // namespace
}  // namespace spotrain::worker
