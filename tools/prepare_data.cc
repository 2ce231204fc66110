// `spotrain prepare-data --output DIR [--val_fraction F] [--shard_tokens N] FILE...`: turns
// text files into byte-level (vocab 256) llm.c-compatible token shards for training:
// DIR/train_000000.bin ..., DIR/val_000000.bin ... (the last F of the concatenated stream),
// and DIR/stats.json with the token counts and the train split's unigram entropy. With no
// FILE it uses the demo corpus, the Python standard library sources. Single-threaded.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/file_util.h"
#include "common/status_macros.h"
#include "tools/command.h"
#include "worker/data.h"
#include "worker/tokenizer.h"

ABSL_FLAG(std::string, output, "",
          "prepare-data: directory for the token shards and stats.json (created if missing)");
ABSL_FLAG(double, val_fraction, 0.05,
          "prepare-data: fraction of the tokens (taken from the end of the concatenated input) "
          "written as validation shards; 0 writes none");
ABSL_FLAG(int64_t, shard_tokens, 100000000, "prepare-data: maximum tokens per shard file");

namespace spotrain::tools {
namespace {

constexpr char kDefaultCorpus[] = "/usr/lib/python3*/*.py";

bool IsPattern(const std::string& arg) { return arg.find_first_of("*?[") != std::string::npos; }

// Expands the arguments (paths or glob patterns) in order; each pattern's matches sorted.
absl::StatusOr<std::vector<std::string>> ExpandInputs(const std::vector<std::string>& args) {
  std::vector<std::string> files;
  for (const std::string& arg : args) {
    if (!IsPattern(arg)) {
      if (!common::PathExists(arg)) {
        return absl::NotFoundError(absl::StrCat("input file ", arg, " does not exist"));
      }
      files.push_back(arg);
      continue;
    }
    auto matches = common::Glob(arg);
    if (!matches.ok()) {
      return absl::NotFoundError(absl::StrCat("no input file matches ", arg,
                                              ": check the pattern (quote it so the "
                                              "shell does not expand it first)"));
    }
    files.insert(files.end(), matches->begin(), matches->end());
  }
  return files;
}

absl::StatusOr<std::vector<std::string>> WriteSplit(const std::string& dir,
                                                    absl::string_view prefix,
                                                    absl::string_view bytes, int64_t shard_tokens) {
  std::vector<std::string> written;
  for (size_t begin = 0; begin < bytes.size(); begin += static_cast<size_t>(shard_tokens)) {
    absl::string_view piece = bytes.substr(begin, static_cast<size_t>(shard_tokens));
    std::string path =
        common::JoinPath(dir, absl::StrFormat("%s_%06d.bin", prefix, written.size()));
    RETURN_IF_ERROR(worker::WriteTokenShard(path, worker::ByteTokenize(piece)));
    written.push_back(path);
  }
  return written;
}

// Removes DIR/<prefix>_NNNNNN.bin files left from an earlier run with more shards, so that
// the data glob matches exactly what this run wrote.
absl::Status RemoveStale(const std::string& dir, absl::string_view prefix,
                         const std::vector<std::string>& keep) {
  auto existing = common::Glob(common::JoinPath(dir, absl::StrCat(prefix, "_[0-9]*.bin")));
  if (!existing.ok()) return absl::OkStatus();  // Nothing there.
  for (const std::string& path : *existing) {
    if (std::find(keep.begin(), keep.end(), path) != keep.end()) continue;
    if (std::remove(path.c_str()) != 0) {
      return absl::InternalError(absl::StrFormat(
          "cannot remove stale shard %s from an earlier run: remove it by hand", path));
    }
    absl::PrintF("removed stale %s\n", path.c_str());
  }
  return absl::OkStatus();
}

absl::Status PrepareData(const std::vector<std::string>& args) {
  const auto start = std::chrono::steady_clock::now();
  const std::string output = absl::GetFlag(FLAGS_output);
  const double val_fraction = absl::GetFlag(FLAGS_val_fraction);
  const int64_t shard_tokens = absl::GetFlag(FLAGS_shard_tokens);
  if (output.empty()) {
    return absl::InvalidArgumentError("--output DIR is required (where the shards go)");
  }
  if (!(val_fraction >= 0.0 && val_fraction < 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("--val_fraction %g must be in [0, 1)", val_fraction));
  }
  if (shard_tokens < 1 || shard_tokens > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--shard_tokens %d must be in 1..%d", shard_tokens, std::numeric_limits<int32_t>::max()));
  }

  std::vector<std::string> patterns = args;
  if (patterns.empty()) {
    absl::PrintF("no input files given: using the demo corpus %s\n", kDefaultCorpus);
    patterns.push_back(kDefaultCorpus);
  }
  ASSIGN_OR_RETURN(std::vector<std::string> files, ExpandInputs(patterns));
  if (files.empty()) return absl::InvalidArgumentError("no input files");

  std::string corpus;
  for (const std::string& file : files) {
    auto text = common::ReadFile(file);
    if (!text.ok()) {
      return absl::Status(text.status().code(),
                          absl::StrCat("cannot read input file: ", text.status().message()));
    }
    corpus += *text;
  }
  if (corpus.empty()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("the corpus is empty: the %d input file(s) hold no bytes", files.size()));
  }

  const int64_t total = static_cast<int64_t>(corpus.size());
  int64_t val_tokens = 0;
  if (val_fraction > 0) {
    val_tokens = std::max<int64_t>(1, std::llround(static_cast<double>(total) * val_fraction));
  }
  const int64_t train_tokens = total - val_tokens;
  if (train_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "the corpus (%d bytes) is too small to split with --val_fraction %g", total, val_fraction));
  }
  absl::string_view all(corpus);
  absl::string_view train = all.substr(0, static_cast<size_t>(train_tokens));
  absl::string_view val = all.substr(static_cast<size_t>(train_tokens));

  RETURN_IF_ERROR(common::MakeDirectories(output));
  RETURN_IF_ERROR(common::CheckDirectoryWritable(output));
  ASSIGN_OR_RETURN(std::vector<std::string> train_files,
                   WriteSplit(output, "train", train, shard_tokens));
  ASSIGN_OR_RETURN(std::vector<std::string> val_files,
                   WriteSplit(output, "val", val, shard_tokens));
  RETURN_IF_ERROR(RemoveStale(output, "train", train_files));
  RETURN_IF_ERROR(RemoveStale(output, "val", val_files));

  std::vector<int64_t> counts(worker::kByteVocabSize, 0);
  for (char c : train) ++counts[static_cast<unsigned char>(c)];
  const double entropy = worker::UnigramEntropyNats(counts);

  const std::string stats_path = common::JoinPath(output, "stats.json");
  const std::string stats = absl::StrFormat(
      "{\n  \"train_tokens\": %d,\n  \"val_tokens\": %d,\n  \"unigram_entropy_nats\": %.9f,\n"
      "  \"vocab_size\": %d,\n  \"train_shards\": %d,\n  \"val_shards\": %d,\n"
      "  \"input_files\": %d\n}\n",
      train_tokens, val_tokens, entropy, worker::kByteVocabSize, train_files.size(),
      val_files.size(), files.size());
  RETURN_IF_ERROR(common::WriteFileAtomically(stats_path, stats));

  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  absl::PrintF("input: %d file(s), %d bytes\n", files.size(), total);
  absl::PrintF("tokenizer: byte-level, vocab %d\n", worker::kByteVocabSize);
  absl::PrintF("train tokens: %d in %d shard(s)\n", train_tokens, train_files.size());
  for (const std::string& f : train_files) absl::PrintF("  %s\n", f.c_str());
  absl::PrintF("val tokens: %d in %d shard(s)\n", val_tokens, val_files.size());
  for (const std::string& f : val_files) absl::PrintF("  %s\n", f.c_str());
  absl::PrintF("unigram entropy: %.4f nats/token (%.4f bits/token, train split)\n", entropy,
               entropy / std::log(2.0));
  absl::PrintF("stats: %s\n", stats_path.c_str());
  absl::PrintF("took %.2f s\n", seconds);
  return absl::OkStatus();
}

int RunPrepareData(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  absl::Status status = PrepareData(args);
  if (!status.ok()) {
    absl::FPrintF(stderr, "spotrain prepare-data: %s\n", status.message());
    return 1;
  }
  return 0;
}

}  // namespace

SPOTRAIN_REGISTER_COMMAND(prepare_data_registrar, "prepare-data",
                          "write byte-level token shards (train/val) from text files",
                          RunPrepareData);

}  // namespace spotrain::tools
