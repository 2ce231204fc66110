// Tests of worker/checkpoint_io.h (format, split, verification) and worker/checkpoint.h
// (background writer, restore with resharding, fallback, disk full).
#include "worker/checkpoint.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/file_util.h"
#include "common/hash.h"
#include "common/model_presets.h"
#include "common/run_config.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"
#include "worker/checkpoint_io.h"
#include "worker/data.h"
#include "worker/gloo_communicator.h"
#include "worker/rendezvous_store.h"
#include "worker/sampler.h"

namespace spotrain::worker {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

// A fresh empty directory for one test, removed at the end.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = absl::StrCat(::testing::TempDir(), "/ckpt_", info->test_suite_name(), "_", info->name(),
                         "_", ::getpid());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::vector<float> RandomState(int64_t n, uint64_t seed) {
  std::vector<float> v(static_cast<size_t>(n));
  uint64_t x = seed;
  for (float& f : v) {
    x = SplitMix64(x);
    f = static_cast<float>(static_cast<int64_t>(x >> 40) - (int64_t{1} << 23)) / 1024.0f;
  }
  return v;
}

std::string DigestOf(const std::vector<float>& state, int64_t step) {
  common::Sha256 sha;
  sha.Update(state.data(), state.size() * sizeof(float));
  sha.Update(&step, sizeof(step));
  return sha.HexDigest();
}

// The manifest as the coordinator's registry and store build it (CheckpointRegistry::AddShard
// fields, then ModelConfig, fingerprint, creation time).
proto::Manifest MakeManifest(int64_t step, int world, const std::vector<ShardFileInfo>& shards,
                             int64_t state_floats, const std::string& digest,
                             const proto::ModelConfig& model, uint64_t fingerprint = 0) {
  proto::Manifest m;
  m.set_step(step);
  m.set_world_size(world);
  m.set_state_digest(digest);
  m.set_state_floats(state_floats);
  for (int rank = 0; rank < static_cast<int>(shards.size()); ++rank) {
    proto::ShardInfo* info = m.add_shards();
    info->set_rank(rank);
    info->set_file(shards[rank].file);
    info->set_offset(shards[rank].offset);
    info->set_length(shards[rank].length);
    info->set_checksum(shards[rank].checksum_hex);
  }
  *m.mutable_model() = model;
  m.set_run_fingerprint(fingerprint);
  m.set_created_at("2026-01-01T00:00:00Z");
  return m;
}

// Writes manifest.json with the JSON options of coordinator/checkpoint_store.cc.
void WriteManifestLikeCoordinator(const std::string& root, const proto::Manifest& manifest) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  ASSERT_TRUE(google::protobuf::util::MessageToJsonString(manifest, &json, options).ok());
  ASSERT_TRUE(common::WriteFileAtomically(
                  common::JoinPath(StepDirectory(root, manifest.step()), kManifestFileName), json)
                  .ok());
}

// Writes every shard of `state` for `world` ranks; optionally commits it with a manifest.
std::vector<ShardFileInfo> WriteCheckpoint(const std::string& root, int64_t step, int world,
                                           const std::vector<float>& state, bool commit = true,
                                           const proto::ModelConfig& model = {}) {
  std::vector<ShardFileInfo> infos;
  const int64_t n = static_cast<int64_t>(state.size());
  for (int rank = 0; rank < world; ++rank) {
    const StateRange range = ShardRange(n, rank, world);
    auto info = WriteShardFile(root, step, rank, world, n, state.data() + range.offset);
    EXPECT_TRUE(info.ok()) << info.status();
    if (info.ok()) infos.push_back(*info);
  }
  if (commit) {
    WriteManifestLikeCoordinator(root,
                                 MakeManifest(step, world, infos, n, DigestOf(state, step), model));
  }
  return infos;
}

void FlipByte(const std::string& path, int64_t at) {
  int fd = ::open(path.c_str(), O_RDWR);
  ASSERT_GE(fd, 0) << path;
  char c;
  ASSERT_EQ(::pread(fd, &c, 1, at), 1);
  c ^= 0x20;
  ASSERT_EQ(::pwrite(fd, &c, 1, at), 1);
  ::close(fd);
}

std::vector<std::string> FilesIn(const std::string& dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) names.push_back(e.path().filename());
  std::sort(names.begin(), names.end());
  return names;
}

// ---- Split and format ----------------------------------------------------------------------

TEST(ShardRangeTest, ContiguousBalancedAndExact) {
  for (int64_t s : {int64_t{0}, int64_t{1}, int64_t{2}, int64_t{7}, int64_t{100}, int64_t{14611968},
                    int64_t{1000000000007}, (int64_t{1} << 61) + 12345}) {
    for (int w = 1; w <= 64; ++w) {
      int64_t next = 0;
      for (int r = 0; r < w; ++r) {
        StateRange range = ShardRange(s, r, w);
        const __int128 exact = static_cast<__int128>(r) * s / w;
        EXPECT_EQ(range.offset, static_cast<int64_t>(exact)) << s << " " << r << "/" << w;
        EXPECT_EQ(range.offset, next);
        EXPECT_GE(range.length, s / w);
        EXPECT_LE(range.length, s / w + 1);
        next = range.end();
      }
      EXPECT_EQ(next, s);
    }
  }
}

TEST(ShardFormatTest, NamesMatchTheLayout) {
  EXPECT_EQ(StepDirectoryName(123), "step-00000123");
  EXPECT_EQ(StepDirectory("/ckpt", 5), "/ckpt/step-00000005");
  EXPECT_EQ(ShardFileName(2, 4), "shard-00002-of-00004.bin");
  EXPECT_EQ(ParseStepDirectoryName("step-00000123"), 123);
  EXPECT_EQ(ParseStepDirectoryName("step-123456789"), 123456789);
  EXPECT_EQ(ParseStepDirectoryName("step-0000012"), -1);
  EXPECT_EQ(ParseStepDirectoryName("step-0000012x"), -1);
  EXPECT_EQ(ParseStepDirectoryName("steps-00000012"), -1);
}

TEST(ShardFormatTest, HeaderRoundTripsAndEveryByteIsChecked) {
  ShardHeader h;
  h.step = 1234567890123;
  h.offset = 77;
  h.length = 1000;
  h.state_floats = 5000;
  h.payload_xxh64 = 0xfedcba9876543210ull;
  const std::string bytes = EncodeShardHeader(h);
  ASSERT_EQ(static_cast<int64_t>(bytes.size()), kCheckpointHeaderBytes);
  EXPECT_EQ(bytes.substr(0, 8), "SPTRCKPT");
  EXPECT_EQ(bytes[8], 1);  // version, little-endian
  EXPECT_EQ(bytes[16], static_cast<char>(h.step & 0xff));
  auto back = DecodeShardHeader(bytes, "x");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->step, h.step);
  EXPECT_EQ(back->offset, h.offset);
  EXPECT_EQ(back->length, h.length);
  EXPECT_EQ(back->state_floats, h.state_floats);
  EXPECT_EQ(back->payload_xxh64, h.payload_xxh64);
  for (size_t i = 0; i < bytes.size(); ++i) {
    std::string bad = bytes;
    bad[i] ^= 0x01;
    auto decoded = DecodeShardHeader(bad, "shard.bin");
    EXPECT_EQ(decoded.status().code(), absl::StatusCode::kDataLoss) << "byte " << i;
    EXPECT_THAT(std::string(decoded.status().message()), HasSubstr("shard.bin"));
  }
  EXPECT_EQ(DecodeShardHeader(bytes.substr(0, 63), "x").status().code(),
            absl::StatusCode::kDataLoss);
}

TEST(ShardFormatTest, OtherVersionIsAFailedPrecondition) {
  std::string bytes = EncodeShardHeader(ShardHeader{});
  bytes[8] = 2;
  const uint64_t sum = common::XxHash64(bytes.data(), 56);
  for (int i = 0; i < 8; ++i) bytes[56 + i] = static_cast<char>((sum >> (8 * i)) & 0xff);
  auto decoded = DecodeShardHeader(bytes, "x");
  EXPECT_EQ(decoded.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(decoded.status().message()), HasSubstr("version 2"));
}

TEST(ShardFileTest, WriteReadRoundTrip) {
  TempDir dir;
  const std::vector<float> state = RandomState(1001, 1);
  auto infos = WriteCheckpoint(dir.path(), 42, 3, state);
  ASSERT_EQ(infos.size(), 3u);
  EXPECT_EQ(infos[1].file, "shard-00001-of-00003.bin");
  EXPECT_EQ(infos[1].path, dir.path() + "/step-00000042/shard-00001-of-00003.bin");
  EXPECT_EQ(infos[1].offset, 333);
  EXPECT_EQ(infos[1].length, 334);
  EXPECT_EQ(infos[1].checksum_hex.size(), 16u);
  EXPECT_EQ(static_cast<int64_t>(fs::file_size(infos[1].path)), 64 + 4 * 334);
  EXPECT_EQ(infos[1].bytes, 64 + 4 * 334);
  // Nothing but the shards and the manifest: no temp files left.
  EXPECT_EQ(FilesIn(StepDirectory(dir.path(), 42)),
            (std::vector<std::string>{"manifest.json", "shard-00000-of-00003.bin",
                                      "shard-00001-of-00003.bin", "shard-00002-of-00003.bin"}));

  auto manifest = ReadManifest(StepDirectory(dir.path(), 42));
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  std::vector<float> back(334);
  ASSERT_TRUE(ReadShardFile(StepDirectory(dir.path(), 42), *manifest, 1, back.data()).ok());
  EXPECT_EQ(0, std::memcmp(back.data(), state.data() + 333, 334 * sizeof(float)));
  auto digest = ComputeStateDigest(StepDirectory(dir.path(), 42), *manifest);
  ASSERT_TRUE(digest.ok()) << digest.status();
  EXPECT_EQ(*digest, DigestOf(state, 42));
  EXPECT_EQ(*digest, manifest->state_digest());
}

TEST(ShardFileTest, CorruptionIsDetectedAndNamed) {
  TempDir dir;
  const std::vector<float> state = RandomState(4000, 2);
  auto infos = WriteCheckpoint(dir.path(), 7, 2, state);
  const std::string step_dir = StepDirectory(dir.path(), 7);
  auto manifest = *ReadManifest(step_dir);
  std::vector<float> out(2000);
  auto read0 = [&] { return ReadShardFile(step_dir, manifest, 0, out.data()); };
  ASSERT_TRUE(read0().ok());

  FlipByte(infos[0].path, 64 + 4 * 1234 + 2);  // payload
  absl::Status s = read0();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(s.message()), HasSubstr(infos[0].path));
  EXPECT_THAT(std::string(s.message()), HasSubstr("payload checksum"));
  FlipByte(infos[0].path, 64 + 4 * 1234 + 2);  // back
  ASSERT_TRUE(read0().ok());

  FlipByte(infos[0].path, 30);  // header (offset field)
  s = read0();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(s.message()), HasSubstr("header checksum"));
  FlipByte(infos[0].path, 30);

  fs::resize_file(infos[0].path, 64 + 4 * 1999);
  s = read0();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(s.message()), HasSubstr("truncated"));

  fs::remove(infos[0].path);
  s = read0();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr(infos[0].path));

  // A checksum in the manifest that disagrees with an intact file.
  proto::Manifest wrong = manifest;
  wrong.mutable_shards(1)->set_checksum("0123456789abcdef");
  s = ReadShardFile(step_dir, wrong, 1, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(s.message()), HasSubstr("manifest"));

  // A shard of another step or range under the expected name.
  proto::Manifest other = manifest;
  other.set_step(8);
  s = ReadShardFile(step_dir, other, 1, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
}

TEST(ManifestTest, ValidationNamesTheProblem) {
  TempDir dir;
  const std::vector<float> state = RandomState(100, 3);
  auto infos = WriteCheckpoint(dir.path(), 3, 2, state, /*commit=*/false);
  proto::Manifest good = MakeManifest(3, 2, infos, 100, DigestOf(state, 3), {});
  EXPECT_TRUE(ValidateManifest(good).ok());
  auto expect_bad = [&](proto::Manifest m, const std::string& what) {
    absl::Status s = ValidateManifest(m);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << what;
    EXPECT_THAT(std::string(s.message()), HasSubstr(what));
  };
  proto::Manifest m = good;
  m.set_world_size(3);
  expect_bad(m, "lists 2 shards");
  m = good;
  m.mutable_shards(1)->set_offset(51);
  expect_bad(m, "starts at 51");
  m = good;
  m.mutable_shards(1)->set_length(49);
  expect_bad(m, "cover 99 of 100");
  m = good;
  m.mutable_shards(0)->set_file("../x");
  expect_bad(m, "file name");
  m = good;
  m.mutable_shards(0)->set_rank(1);
  expect_bad(m, "has rank");

  // Not a checkpoint without manifest; garbage and a step mismatch are kDataLoss.
  const std::string step_dir = StepDirectory(dir.path(), 3);
  EXPECT_EQ(ReadManifest(step_dir).status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(common::WriteFileAtomically(step_dir + "/manifest.json", "{not json").ok());
  EXPECT_EQ(ReadManifest(step_dir).status().code(), absl::StatusCode::kDataLoss);
  good.set_step(4);
  fs::create_directories(StepDirectory(dir.path(), 4));
  WriteManifestLikeCoordinator(dir.path(), good);  // lands in step-00000004
  fs::rename(StepDirectory(dir.path(), 4) + "/manifest.json", step_dir + "/manifest.json");
  auto mismatch = ReadManifest(step_dir);
  EXPECT_EQ(mismatch.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(mismatch.status().message()), HasSubstr("directory step 3"));
}

TEST(ManifestTest, UnknownFieldsAreIgnored) {
  TempDir dir;
  const std::vector<float> state = RandomState(10, 4);
  WriteCheckpoint(dir.path(), 1, 1, state);
  const std::string path = StepDirectory(dir.path(), 1) + "/manifest.json";
  std::string json = *common::ReadFile(path);
  json.insert(json.find('{') + 1, "\"future_field\": 12,");
  ASSERT_TRUE(common::WriteFileAtomically(path, json).ok());
  EXPECT_TRUE(ReadManifest(StepDirectory(dir.path(), 1)).ok());
}

// Every pair of world sizes, on the I/O layer: any target range reads back exactly.
TEST(ReshardTest, EveryPairOfWorldSizesOnPlainVectors) {
  TempDir dir;
  const int64_t n = 10007;  // prime: no world size divides it
  const std::vector<float> state = RandomState(n, 5);
  for (int w = 1; w <= 5; ++w) {
    WriteCheckpoint(dir.path(), w, w, state);  // step w written by w ranks
    const std::string step_dir = StepDirectory(dir.path(), w);
    auto manifest = ReadManifest(step_dir);
    ASSERT_TRUE(manifest.ok()) << manifest.status();
    for (int target = 1; target <= 5; ++target) {
      std::vector<float> rebuilt(n, -1.0f);
      int64_t bytes = 0;
      for (int rank = 0; rank < target; ++rank) {
        const StateRange range = ShardRange(n, rank, target);
        ReadStats stats;
        ASSERT_TRUE(
            ReadStateRange(step_dir, *manifest, range, rebuilt.data() + range.offset, &stats).ok());
        bytes += stats.bytes_read;
        auto plan = *PlanStateRead(*manifest, range);
        int64_t covered = 0;
        for (const ShardSlice& s : plan) covered += s.length;
        EXPECT_EQ(covered, range.length);
      }
      EXPECT_EQ(0, std::memcmp(rebuilt.data(), state.data(), n * sizeof(float)))
          << w << " -> " << target;
      EXPECT_GE(bytes, n * 4);
      if (w == target) EXPECT_EQ(bytes, n * 4 + 64 * w);  // each rank reads exactly its shard
    }
    EXPECT_EQ(*ComputeStateDigest(step_dir, *manifest), DigestOf(state, w));
  }
  EXPECT_EQ(PlanStateRead(*ReadManifest(StepDirectory(dir.path(), 1)), StateRange{n - 1, 2})
                .status()
                .code(),
            absl::StatusCode::kOutOfRange);
}

TEST(ListCommittedStepsTest, OnlyDirectoriesWithAManifestNewestFirst) {
  TempDir dir;
  const std::vector<float> state = RandomState(50, 6);
  WriteCheckpoint(dir.path(), 10, 2, state);
  WriteCheckpoint(dir.path(), 30, 2, state);
  WriteCheckpoint(dir.path(), 20, 1, state, /*commit=*/false);  // shards, no manifest
  fs::create_directories(dir.path() + "/step-00000040");
  fs::create_directories(dir.path() + "/not-a-step");
  // A manifest temp file left by a crash does not commit a step.
  ASSERT_TRUE(
      common::WriteFileAtomically(dir.path() + "/step-00000020/manifest.json.tmp.999", "{}").ok());
  EXPECT_EQ(ListCommittedSteps(dir.path()), (std::vector<int64_t>{30, 10}));
  EXPECT_TRUE(ListCommittedSteps(dir.path() + "/missing").empty());
}

TEST(ShardFileTest, CommittedStepIsNeverOverwritten) {
  TempDir dir;
  const std::vector<float> state = RandomState(64, 7);
  auto infos = WriteCheckpoint(dir.path(), 5, 1, state);
  const std::vector<float> other = RandomState(64, 8);
  auto again = WriteShardFile(dir.path(), 5, 0, 1, 64, other.data());
  EXPECT_EQ(again.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(std::string(again.status().message()), HasSubstr(infos[0].path));
  EXPECT_EQ(*ComputeStateDigest(StepDirectory(dir.path(), 5),
                                *ReadManifest(StepDirectory(dir.path(), 5))),
            DigestOf(state, 5));
  EXPECT_EQ(WriteShardFile(dir.path(), 5, 1, 1, 64, other.data()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- Trainer-level: writer and restore -------------------------------------------------------

std::string DataDir() {
  static std::string* dir = [] {
    std::string path = absl::StrCat(::testing::TempDir(), "/checkpoint_test_data_", ::getpid());
    fs::create_directories(path);
    for (const char* name : {"train_000000.bin", "val_000000.bin"}) {
      std::vector<uint16_t> tokens(5000);
      uint64_t x = name[0];
      for (uint16_t& t : tokens) {
        x = SplitMix64(x);
        t = static_cast<uint16_t>(97 + x % 26);
      }
      EXPECT_TRUE(WriteTokenShard(path + "/" + name, tokens).ok());
    }
    return new std::string(path);
  }();
  return *dir;
}

proto::RunConfig TinyConfig(const std::string& model = "gpt-tiny") {
  proto::RunConfig c;
  c.set_model(model);
  c.mutable_data()->set_train(DataDir() + "/train_*.bin");
  c.mutable_data()->set_val(DataDir() + "/val_*.bin");
  c.set_seq_len(16);
  c.set_global_batch(2);
  c.set_micro_batch(1);
  c.set_steps(10);
  common::ApplyDefaults(c);
  EXPECT_TRUE(common::ValidateRunConfig(c).ok());
  return c;
}

std::unique_ptr<Trainer> MakeTrainer(const std::string& model = "gpt-tiny") {
  auto trainer = Trainer::Create(TinyConfig(model));
  EXPECT_TRUE(trainer.ok()) << trainer.status();
  return std::move(*trainer);
}

// Fills the whole logical state with pseudo-random values (moments included).
void Randomize(Trainer& trainer, uint64_t seed, int64_t step) {
  std::vector<float> state = RandomState(trainer.state_floats(), seed);
  trainer.WriteState(0, trainer.state_floats(), state.data());
  trainer.set_step(step);
}

// Collects callback results; waits for them with a generous timeout.
class Results {
 public:
  CheckpointWriter::Callback callback() {
    return [this](const ShardWriteResult& r) {
      absl::MutexLock lock(&mu_);
      results_.push_back(r);
    };
  }
  std::vector<ShardWriteResult> WaitFor(size_t n) {
    absl::MutexLock lock(&mu_);
    auto have_n = [&] {
      mu_.AssertHeld();
      return results_.size() >= n;
    };
    mu_.AwaitWithTimeout(absl::Condition(&have_n), absl::Seconds(120));
    return results_;
  }

 private:
  absl::Mutex mu_;
  std::vector<ShardWriteResult> results_ ABSL_GUARDED_BY(mu_);
};

// Saves `trainer` with `world` ranks through CheckpointWriter and commits the manifest as the
// coordinator would. Returns the results in rank order.
std::vector<ShardWriteResult> SaveAndCommit(const std::string& root, const Trainer& trainer,
                                            int world, CheckpointWriterOptions options = {},
                                            uint64_t fingerprint = 0) {
  Results results;
  {
    CheckpointWriter writer(root, results.callback(), options);
    for (int rank = 0; rank < world; ++rank) {
      auto stats = writer.Save(trainer, /*epoch=*/3, rank, world);
      EXPECT_TRUE(stats.ok()) << stats.status();
    }
  }
  std::vector<ShardWriteResult> done = results.WaitFor(world);
  EXPECT_EQ(static_cast<int>(done.size()), world);
  std::vector<ShardFileInfo> infos;
  for (const ShardWriteResult& r : done) {
    EXPECT_TRUE(r.status.ok()) << r.status;
    ShardFileInfo info;
    info.file = r.file;
    info.offset = r.offset;
    info.length = r.length;
    info.checksum_hex = r.checksum;
    infos.push_back(info);
  }
  if (static_cast<int>(infos.size()) == world) {
    WriteManifestLikeCoordinator(
        root, MakeManifest(trainer.step(), world, infos, trainer.state_floats(),
                           done[0].state_digest, trainer.model_config(), fingerprint));
  }
  return done;
}

TEST(CheckpointWriterTest, ReportsShardWrittenFields) {
  TempDir dir;
  auto trainer = MakeTrainer();
  Randomize(*trainer, 11, 7);
  const std::string digest = trainer->StateDigest();
  for (bool background : {false, true}) {
    const std::string root = dir.path() + (background ? "/bg" : "/fg");
    CheckpointWriterOptions options;
    options.digest_in_background = background;
    auto results = SaveAndCommit(root, *trainer, 3, options);
    ASSERT_EQ(results.size(), 3u);
    const int64_t n = trainer->state_floats();
    for (int rank = 0; rank < 3; ++rank) {
      const ShardWriteResult& r = results[rank];
      EXPECT_EQ(r.rank, rank);
      EXPECT_EQ(r.world_size, 3);
      EXPECT_EQ(r.epoch, 3);
      EXPECT_EQ(r.step, 7);
      EXPECT_EQ(r.state_digest, digest);
      EXPECT_EQ(r.state_floats, n);
      EXPECT_EQ(r.offset, ShardRange(n, rank, 3).offset);
      EXPECT_EQ(r.length, ShardRange(n, rank, 3).length);
      EXPECT_EQ(r.file, ShardFileName(rank, 3));
      EXPECT_EQ(r.path, StepDirectory(root, 7) + "/" + r.file);
      EXPECT_EQ(r.bytes, 64 + 4 * r.length);
      proto::ShardWritten m = ToShardWritten(r);
      EXPECT_EQ(m.checksum(), r.checksum);
      EXPECT_EQ(m.state_digest(), digest);
      EXPECT_EQ(m.offset(), r.offset);
    }
    auto manifest = ReadManifest(StepDirectory(root, 7));
    ASSERT_TRUE(manifest.ok()) << manifest.status();
    EXPECT_EQ(*ComputeStateDigest(StepDirectory(root, 7), *manifest), digest);
  }
  // Both modes wrote the same bytes.
  for (int rank = 0; rank < 3; ++rank) {
    EXPECT_EQ(
        *common::ReadFile(StepDirectory(dir.path() + "/fg", 7) + "/" + ShardFileName(rank, 3)),
        *common::ReadFile(StepDirectory(dir.path() + "/bg", 7) + "/" + ShardFileName(rank, 3)));
  }
}

TEST(CheckpointWriterTest, UsageErrors) {
  TempDir dir;
  auto trainer = MakeTrainer();
  Results results;
  CheckpointWriter writer(dir.path(), results.callback());
  EXPECT_EQ(writer.Submit().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(writer.Snapshot(*trainer, 1, 2, 2).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(writer.Snapshot(*trainer, 1, 0, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(writer.busy());
  EXPECT_TRUE(writer.WaitIdle(absl::ZeroDuration()));
}

// A second snapshot while the first write (and its callback) is still running waits for it;
// each file holds the state of its own snapshot.
TEST(CheckpointWriterTest, OneWriteInFlightAndSnapshotsAreIsolated) {
  TempDir dir;
  auto trainer = MakeTrainer();
  Randomize(*trainer, 21, 1);
  const std::string digest1 = trainer->StateDigest();
  absl::Notification first_in_callback, release_first;
  std::vector<ShardWriteResult> results;
  absl::Mutex mu;
  CheckpointWriter writer(dir.path(), [&](const ShardWriteResult& r) {
    {
      absl::MutexLock lock(&mu);
      results.push_back(r);
    }
    if (r.step == 1) {
      first_in_callback.Notify();
      release_first.WaitForNotification();
    }
  });
  ASSERT_TRUE(writer.Save(*trainer, 1, 0, 1).ok());
  ASSERT_TRUE(first_in_callback.WaitForNotificationWithTimeout(absl::Seconds(60)));
  EXPECT_TRUE(writer.busy());
  // The training thread moves on: new state, next checkpoint.
  Randomize(*trainer, 22, 2);
  const std::string digest2 = trainer->StateDigest();
  absl::StatusOr<SnapshotStats> second;
  std::thread training([&] { second = writer.Save(*trainer, 1, 0, 1); });
  EXPECT_FALSE(writer.WaitIdle(absl::Milliseconds(1)));
  release_first.Notify();
  training.join();
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_GT(second->wait_ms, 0);
  ASSERT_TRUE(writer.WaitIdle(absl::Seconds(60)));
  absl::MutexLock lock(&mu);
  ASSERT_EQ(results.size(), 2u);
  EXPECT_EQ(results[0].state_digest, digest1);
  EXPECT_EQ(results[1].state_digest, digest2);
  for (const ShardWriteResult& r : results) {
    ASSERT_TRUE(r.status.ok()) << r.status;
    std::vector<ShardFileInfo> infos(1);
    infos[0].file = r.file;
    infos[0].offset = r.offset;
    infos[0].length = r.length;
    infos[0].checksum_hex = r.checksum;
    proto::Manifest m =
        MakeManifest(r.step, 1, infos, r.state_floats, r.state_digest, trainer->model_config());
    EXPECT_EQ(*ComputeStateDigest(StepDirectory(dir.path(), r.step), m), r.state_digest);
  }
}

// Save with W ranks, restore into a trainer: identical state and digest for W in 1..5 (the
// restore reads every shard, so the target world size only matters for the shared path, which
// is covered by RestoreSharedTest).
TEST(RestoreTest, EveryWorldSizeRestoresTheSameState) {
  TempDir dir;
  auto source = MakeTrainer();
  Randomize(*source, 31, 9);
  const std::string digest = source->StateDigest();
  auto target = MakeTrainer();
  for (int w = 1; w <= 5; ++w) {
    const std::string root = absl::StrCat(dir.path(), "/w", w);
    SaveAndCommit(root, *source, w);
    Randomize(*target, 100 + w, 0);
    ASSERT_NE(target->StateDigest(), digest);
    auto result = RestoreCheckpoint(StepDirectory(root, 9), *target);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(target->step(), 9);
    EXPECT_EQ(target->StateDigest(), digest);
    EXPECT_EQ(result->state_digest, digest);
    EXPECT_EQ(result->step, 9);
    EXPECT_EQ(result->source_world_size, w);
    EXPECT_EQ(result->shards_read, w);
    EXPECT_EQ(result->bytes_read, source->state_floats() * 4 + 64 * w);
  }
}

// Every (save world, restore world) pair through the shared restore: each of W' ranks (threads,
// Gloo over loopback) reads its 1/W' and the ranks broadcast the pieces.
TEST(RestoreSharedTest, EveryPairOfWorldSizes) {
  TempDir dir;
  auto source = MakeTrainer();
  Randomize(*source, 41, 12);
  const std::string digest = source->StateDigest();
  const int64_t n = source->state_floats();
  std::vector<std::unique_ptr<Trainer>> targets;
  for (int i = 0; i < 5; ++i) targets.push_back(MakeTrainer());
  int64_t epoch = 1;
  for (int w = 1; w <= 5; ++w) {
    const std::string root = absl::StrCat(dir.path(), "/w", w);
    SaveAndCommit(root, *source, w);
    for (int target = 1; target <= 5; ++target) {
      InMemoryKeyValue kv;
      std::vector<absl::StatusOr<RestoreResult>> results(target, absl::UnknownError("not run"));
      std::vector<std::thread> threads;
      ++epoch;
      for (int rank = 0; rank < target; ++rank) {
        Randomize(*targets[rank], 200 + rank, 0);
        threads.emplace_back([&, rank] {
          auto comm = CreateGlooCommunicator(kv, epoch, rank, target, GlooOptions());
          ASSERT_TRUE(comm.ok()) << comm.status();
          results[rank] = RestoreCheckpointShared(StepDirectory(root, 12), *targets[rank], **comm);
        });
      }
      for (auto& t : threads) t.join();
      const proto::Manifest manifest = *ReadManifest(StepDirectory(root, 12));
      for (int rank = 0; rank < target; ++rank) {
        ASSERT_TRUE(results[rank].ok()) << w << "->" << target << ": " << results[rank].status();
        EXPECT_EQ(targets[rank]->StateDigest(), digest) << w << "->" << target;
        EXPECT_EQ(targets[rank]->step(), 12);
        // Each rank reads only the source shards that overlap its range (whole, for their
        // checksums).
        int64_t expected = 0;
        const std::vector<ShardSlice> plan = *PlanStateRead(manifest, ShardRange(n, rank, target));
        for (const ShardSlice& s : plan) {
          expected += 64 + 4 * manifest.shards(s.shard_index).length();
        }
        EXPECT_EQ(results[rank]->bytes_read, expected) << w << "->" << target << " rank " << rank;
        if (w == target)
          EXPECT_EQ(results[rank]->bytes_read, 64 + 4 * ShardRange(n, rank, w).length);
      }
    }
  }
}

TEST(RestoreSharedTest, AFailingRankFailsEveryRank) {
  TempDir dir;
  auto source = MakeTrainer();
  Randomize(*source, 51, 4);
  auto results = SaveAndCommit(dir.path(), *source, 4);
  fs::remove(results[3].path);  // only the last target rank of 2 needs it
  InMemoryKeyValue kv;
  std::vector<std::unique_ptr<Trainer>> targets;
  for (int i = 0; i < 2; ++i) targets.push_back(MakeTrainer());
  std::vector<absl::Status> status(2);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < 2; ++rank) {
    threads.emplace_back([&, rank] {
      auto comm = CreateGlooCommunicator(kv, 1, rank, 2, GlooOptions());
      ASSERT_TRUE(comm.ok()) << comm.status();
      status[rank] =
          RestoreCheckpointShared(StepDirectory(dir.path(), 4), *targets[rank], **comm).status();
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(status[0].code(), absl::StatusCode::kDataLoss) << status[0];
  EXPECT_THAT(std::string(status[0].message()), HasSubstr("1 of 2 ranks"));
  EXPECT_EQ(status[1].code(), absl::StatusCode::kNotFound) << status[1];
  EXPECT_THAT(std::string(status[1].message()), HasSubstr(results[3].path));
}

TEST(RestoreTest, ModelMismatchIsAClearError) {
  TempDir dir;
  auto source = MakeTrainer();
  Randomize(*source, 61, 2);
  auto results = SaveAndCommit(dir.path(), *source, 1);
  // Rewrite the manifest as if the run had been gpt-small.
  auto manifest = *ReadManifest(StepDirectory(dir.path(), 2));
  *manifest.mutable_model() = *common::ModelConfigForPreset("gpt-small");
  WriteManifestLikeCoordinator(dir.path(), manifest);
  auto target = MakeTrainer();
  auto restored = RestoreCheckpoint(StepDirectory(dir.path(), 2), *target);
  EXPECT_EQ(restored.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(restored.status().message()),
              HasSubstr("checkpoint step 2 is of model gpt-small"));
  EXPECT_THAT(std::string(restored.status().message()), HasSubstr("this run has gpt-tiny"));
  // The fallback does not hide a configuration error behind an older checkpoint.
  auto latest = RestoreLatestCheckpoint(dir.path(), *target);
  EXPECT_EQ(latest.status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(RestoreTest, DigestMismatchIsDataLoss) {
  TempDir dir;
  auto source = MakeTrainer();
  Randomize(*source, 71, 3);
  SaveAndCommit(dir.path(), *source, 2);
  auto manifest = *ReadManifest(StepDirectory(dir.path(), 3));
  manifest.set_state_digest(std::string(64, '0'));
  WriteManifestLikeCoordinator(dir.path(), manifest);
  auto target = MakeTrainer();
  auto restored = RestoreCheckpoint(StepDirectory(dir.path(), 3), *target);
  EXPECT_EQ(restored.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(restored.status().message()), HasSubstr("digest"));
}

// Crash points of the commit protocol, oldest to newest:
//   step 10: committed and intact (plus a shard temp file a crash left behind)
//   step 20: committed, one shard missing
//   step 30: committed, one shard corrupt
//   step 40: committed, garbage manifest
//   step 50: shards written, no manifest (the coordinator never committed it)
// The newest usable one is 10; each newer committed one is skipped with the file named.
TEST(RestoreTest, FallsBackPastEveryCrashPoint) {
  TempDir dir;
  auto source = MakeTrainer();
  std::vector<std::vector<ShardWriteResult>> saved;
  std::string digest10;
  for (int64_t step : {10, 20, 30, 40, 50}) {
    Randomize(*source, 80 + step, step);
    if (step == 10) digest10 = source->StateDigest();
    if (step == 50) {
      Results results;
      CheckpointWriter writer(dir.path(), results.callback());
      ASSERT_TRUE(writer.Save(*source, 1, 0, 2).ok());
      ASSERT_TRUE(writer.Save(*source, 1, 1, 2).ok());
      ASSERT_EQ(results.WaitFor(2).size(), 2u);
    } else {
      saved.push_back(SaveAndCommit(dir.path(), *source, 2));
    }
  }
  ASSERT_TRUE(common::WriteFileAtomically(
                  StepDirectory(dir.path(), 10) + "/shard-00000-of-00002.bin.tmp.999", "partial")
                  .ok());
  fs::remove(saved[1][1].path);
  FlipByte(saved[2][0].path, 64 + 1000);
  ASSERT_TRUE(
      common::WriteFileAtomically(StepDirectory(dir.path(), 40) + "/manifest.json", "{\"step\":")
          .ok());

  EXPECT_EQ(ListCommittedSteps(dir.path()), (std::vector<int64_t>{40, 30, 20, 10}));
  auto target = MakeTrainer();
  auto result = RestoreLatestCheckpoint(dir.path(), *target);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->step, 10);
  EXPECT_EQ(target->step(), 10);
  EXPECT_EQ(target->StateDigest(), digest10);
  ASSERT_EQ(result->skipped.size(), 3u);
  EXPECT_THAT(result->skipped[0], HasSubstr("step 40"));
  EXPECT_THAT(result->skipped[0], HasSubstr("manifest.json"));
  EXPECT_THAT(result->skipped[1], HasSubstr(saved[2][0].path));
  EXPECT_THAT(result->skipped[1], HasSubstr("checksum"));
  EXPECT_THAT(result->skipped[2], HasSubstr(saved[1][1].path));

  // max_step limits the search; nothing usable at all is kNotFound listing the reasons.
  RestoreLatestOptions before_10;
  before_10.max_step = 9;
  auto older = RestoreLatestCheckpoint(dir.path(), *target, before_10);
  EXPECT_EQ(older.status().code(), absl::StatusCode::kNotFound);
  fs::remove(saved[0][0].path);
  auto none = RestoreLatestCheckpoint(dir.path(), *target);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(none.status().message()), HasSubstr(saved[0][0].path));
}

TEST(RestoreTest, OtherRunsAreSkippedByFingerprint) {
  TempDir dir;
  auto source = MakeTrainer();
  Randomize(*source, 91, 5);
  const std::string mine = source->StateDigest();
  SaveAndCommit(dir.path(), *source, 1, {}, /*fingerprint=*/111);
  Randomize(*source, 92, 6);
  SaveAndCommit(dir.path(), *source, 1, {}, /*fingerprint=*/222);
  auto target = MakeTrainer();
  RestoreLatestOptions options;
  options.check_fingerprint = true;
  options.run_fingerprint = 111;
  auto result = RestoreLatestCheckpoint(dir.path(), *target, options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->step, 5);
  EXPECT_EQ(target->StateDigest(), mine);
}

// ---- Disk full ------------------------------------------------------------------------------

// A failed write: the right code, the path in the message, nothing under the final name, no
// temp file left, and the writer still works afterwards.
void ExpectFailedWriteLeavesNothing(const ShardWriteResult& r, const std::string& root) {
  EXPECT_EQ(r.status.code(), absl::StatusCode::kResourceExhausted) << r.status;
  const std::string final_path = StepDirectory(root, r.step) + "/" + r.file;
  EXPECT_THAT(std::string(r.status.message()), HasSubstr(final_path));
  EXPECT_FALSE(fs::exists(final_path));
  for (const std::string& name : FilesIn(StepDirectory(root, r.step))) {
    EXPECT_FALSE(absl::StrContains(name, ".tmp.")) << name;
  }
  proto::ShardFailed failed = ToShardFailed(r);
  EXPECT_EQ(failed.step(), r.step);
  EXPECT_THAT(failed.error(), HasSubstr("RESOURCE_EXHAUSTED"));
}

TEST(DiskFullTest, FullTmpfs) {
  TempDir dir;
  const std::string mnt = dir.path() + "/small";
  fs::create_directories(mnt);
  if (::mount("tmpfs", mnt.c_str(), "tmpfs", 0, "size=4m") != 0) {
    GTEST_SKIP() << "cannot mount a tmpfs (" << std::strerror(errno) << "); not root?";
  }
  struct Unmount {
    std::string path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{mnt};
  auto trainer = MakeTrainer();  // about 10 MB of state
  Randomize(*trainer, 101, 8);
  Results results;
  CheckpointWriter writer(mnt, results.callback());
  ASSERT_TRUE(writer.Save(*trainer, 1, 0, 1).ok());  // whole state: does not fit
  auto done = results.WaitFor(1);
  ASSERT_EQ(done.size(), 1u);
  ExpectFailedWriteLeavesNothing(done[0], mnt);
  ASSERT_TRUE(writer.Save(*trainer, 1, 3, 4).ok());  // a quarter fits
  done = results.WaitFor(2);
  ASSERT_EQ(done.size(), 2u);
  EXPECT_TRUE(done[1].status.ok()) << done[1].status;
  EXPECT_TRUE(fs::exists(done[1].path));
}

TEST(DiskFullTest, FileSizeLimit) {
  TempDir dir;
  auto trainer = MakeTrainer();
  Randomize(*trainer, 102, 8);
  Results results;
  CheckpointWriter writer(dir.path(), results.callback());
  struct rlimit old_limit;
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  struct sigaction ignore = {}, old_action;
  ignore.sa_handler = SIG_IGN;
  ASSERT_EQ(::sigaction(SIGXFSZ, &ignore, &old_action), 0);
  struct rlimit small = old_limit;
  small.rlim_cur = 1 << 20;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  ASSERT_TRUE(writer.Save(*trainer, 1, 0, 2).ok());  // 5 MB > 1 MB
  auto done = results.WaitFor(1);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &old_limit), 0);
  ASSERT_EQ(::sigaction(SIGXFSZ, &old_action, nullptr), 0);
  ASSERT_EQ(done.size(), 1u);
  ExpectFailedWriteLeavesNothing(done[0], dir.path());
  ASSERT_TRUE(writer.Save(*trainer, 1, 0, 2).ok());
  done = results.WaitFor(2);
  ASSERT_EQ(done.size(), 2u);
  EXPECT_TRUE(done[1].status.ok()) << done[1].status;
}

// ---- Measurement (not run by default) -------------------------------------------------------

// gpt-small-sized state (3 x 4.87M floats), one rank: the snapshot stall, the background
// write (checksum, temp file, fsync, rename, directory fsyncs), and a plain sequential write +
// fsync of the same bytes to a new file on the same disk, interleaved round by round so that
// both see the same machine load. Run with --gtest_also_run_disabled_tests
// --gtest_filter='*Measure*'; SPOTRAIN_CKPT_BENCH_DIR picks the directory (default: the test
// temp dir), SPOTRAIN_CKPT_BENCH_ROUNDS the rounds (default 5).
double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

TEST(CheckpointBench, DISABLED_MeasureGptSmall) {
  const char* env = std::getenv("SPOTRAIN_CKPT_BENCH_DIR");
  const char* rounds_env = std::getenv("SPOTRAIN_CKPT_BENCH_ROUNDS");
  const int rounds = rounds_env ? std::atoi(rounds_env) : 5;
  const std::string root =
      absl::StrCat(env ? env : ::testing::TempDir(), "/ckpt_bench_", ::getpid());
  fs::create_directories(root);
  auto trainer = MakeTrainer("gpt-small");
  Randomize(*trainer, 1, 0);
  const int64_t bytes = trainer->state_floats() * 4;
  std::printf("state: %lld floats, %.1f MB\n", static_cast<long long>(trainer->state_floats()),
              bytes / 1e6);
  std::vector<float> plain(trainer->state_floats());
  trainer->ReadState(0, trainer->state_floats(), plain.data());
  using Ms = std::chrono::duration<double, std::milli>;

  Results fg_results, bg_results;
  CheckpointWriterOptions bg_options;
  bg_options.digest_in_background = true;
  CheckpointWriter fg(root + "/fg", fg_results.callback());
  CheckpointWriter bg(root + "/bg", bg_results.callback(), bg_options);
  std::vector<double> stall[2], copy[2], digest[2], write[2], durable[2], plain_ms;
  for (int i = 0; i < rounds; ++i) {
    for (int mode = 0; mode < 2; ++mode) {
      CheckpointWriter& writer = mode == 0 ? fg : bg;
      Results& results = mode == 0 ? fg_results : bg_results;
      trainer->set_step(i);
      auto start = std::chrono::steady_clock::now();
      auto stats = writer.Save(*trainer, 1, 0, 1);
      ASSERT_TRUE(stats.ok());
      auto done = results.WaitFor(i + 1);
      durable[mode].push_back(Ms(std::chrono::steady_clock::now() - start).count());
      ASSERT_TRUE(done.back().status.ok()) << done.back().status;
      stall[mode].push_back(stats->total_ms);
      copy[mode].push_back(stats->copy_ms);
      digest[mode].push_back(stats->digest_ms);
      write[mode].push_back(done.back().write_ms);
    }
    const std::string path = absl::StrCat(root, "/plain-", i, ".bin");
    auto start = std::chrono::steady_clock::now();
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ASSERT_GE(fd, 0);
    const char* p = reinterpret_cast<const char*>(plain.data());
    int64_t left = bytes;
    while (left > 0) {
      ssize_t n = ::write(fd, p, left);
      ASSERT_GT(n, 0);
      p += n;
      left -= n;
    }
    ASSERT_EQ(::fsync(fd), 0);
    ::close(fd);
    plain_ms.push_back(Ms(std::chrono::steady_clock::now() - start).count());
    std::printf(
        "round %d: stall %.1f / %.1f ms (in-stall digest / bg digest), background write %.1f / "
        "%.1f ms, plain write+fsync %.1f ms\n",
        i, stall[0].back(), stall[1].back(), write[0].back(), write[1].back(), plain_ms.back());
  }
  std::printf("medians over %d rounds:\n", rounds);
  for (int mode = 0; mode < 2; ++mode) {
    std::printf(
        "  %-22s stall %6.1f ms (copy %.1f, digest %.1f)  background write %6.1f ms = %4.0f MB/s"
        "  snapshot to durable %6.1f ms\n",
        mode == 0 ? "digest in the stall" : "digest in background", Median(stall[mode]),
        Median(copy[mode]), Median(digest[mode]), Median(write[mode]),
        bytes / 1e3 / Median(write[mode]), Median(durable[mode]));
  }
  std::printf("  %-22s %6.1f ms = %4.0f MB/s\n", "plain write+fsync", Median(plain_ms),
              bytes / 1e3 / Median(plain_ms));
  fs::remove_all(root);
}

}  // namespace
}  // namespace spotrain::worker
