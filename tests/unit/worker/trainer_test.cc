#include "worker/trainer.h"

#include <unistd.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/run_config.h"
#include "gtest/gtest.h"
#include "worker/data.h"
#include "worker/gloo_communicator.h"
#include "worker/rendezvous_store.h"
#include "worker/sampler.h"

namespace spotrain::worker {
namespace {

// A small corpus of pseudo-text tokens written once per test binary.
std::string DataDir() {
  static std::string* dir = [] {
    std::string path = absl::StrCat(::testing::TempDir(), "/trainer_test_data_", ::getpid());
    std::string cmd = "mkdir -p " + path;
    EXPECT_EQ(std::system(cmd.c_str()), 0);
    for (const char* name : {"train_000000.bin", "val_000000.bin"}) {
      std::vector<uint16_t> tokens(20000);
      uint64_t x = name[0];
      for (uint16_t& t : tokens) {
        x = SplitMix64(x);
        t = static_cast<uint16_t>(97 + x % 26);  // letters
      }
      EXPECT_TRUE(WriteTokenShard(path + "/" + name, tokens).ok());
    }
    return new std::string(path);
  }();
  return *dir;
}

proto::RunConfig SmallConfig(bool deterministic) {
  proto::RunConfig c;
  c.set_model("gpt-tiny");
  c.mutable_data()->set_train(DataDir() + "/train_*.bin");
  c.mutable_data()->set_val(DataDir() + "/val_*.bin");
  c.set_seq_len(16);
  c.set_global_batch(6);
  c.set_micro_batch(1);
  c.set_steps(3);
  c.set_deterministic(deterministic);
  c.set_eval_batches(2);
  common::ApplyDefaults(c);
  EXPECT_TRUE(common::ValidateRunConfig(c).ok());
  return c;
}

// Runs `steps` steps with `world` ranks (threads, Gloo over loopback) and returns every
// rank's final digest.
std::vector<std::string> TrainWithWorld(const proto::RunConfig& config, int world, int64_t epoch) {
  InMemoryKeyValue kv;
  std::vector<std::string> digests(world);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < world; ++rank) {
    threads.emplace_back([&, rank] {
      auto trainer = Trainer::Create(config);
      ASSERT_TRUE(trainer.ok()) << trainer.status();
      (*trainer)->InitFresh();
      GlooOptions options;
      options.connect_timeout = absl::Seconds(60);
      options.op_timeout = absl::Seconds(60);
      auto comm = CreateGlooCommunicator(kv, epoch, rank, world, options);
      ASSERT_TRUE(comm.ok()) << comm.status();
      while ((*trainer)->step() < config.steps()) {
        auto stats = (*trainer)->RunStep(**comm);
        ASSERT_TRUE(stats.ok()) << stats.status();
        EXPECT_GT(stats->loss, 0);
      }
      digests[rank] = (*trainer)->StateDigest();
    });
  }
  for (auto& t : threads) t.join();
  return digests;
}

TEST(TrainerTest, SameConfigSameDigest) {
  auto a = TrainWithWorld(SmallConfig(false), 1, 1);
  auto b = TrainWithWorld(SmallConfig(false), 1, 2);
  EXPECT_EQ(a[0], b[0]);
  EXPECT_EQ(a[0].size(), 64u);
}

TEST(TrainerTest, DeterministicModeIsIndependentOfWorldSize) {
  const proto::RunConfig config = SmallConfig(true);
  const std::string reference = TrainWithWorld(config, 1, 1)[0];
  for (int world : {2, 3, 4}) {
    std::vector<std::string> digests = TrainWithWorld(config, world, world + 10);
    for (int rank = 0; rank < world; ++rank) {
      EXPECT_EQ(digests[rank], reference) << "world " << world << " rank " << rank;
    }
  }
}

TEST(TrainerTest, DeterministicModeIsIndependentOfThreadCount) {
  proto::RunConfig one = SmallConfig(true);
  proto::RunConfig two = one;
  two.set_threads(2);
  EXPECT_EQ(TrainWithWorld(one, 1, 1)[0], TrainWithWorld(two, 2, 2)[0]);
}

TEST(TrainerTest, DefaultModeReplicasAgreeWithinAWorld) {
  std::vector<std::string> digests = TrainWithWorld(SmallConfig(false), 3, 1);
  EXPECT_EQ(digests[0], digests[1]);
  EXPECT_EQ(digests[0], digests[2]);
}

TEST(TrainerTest, DeviceAndPrecisionMistakesAreClearErrors) {
  proto::RunConfig bf16 = SmallConfig(false);
  bf16.set_precision("bf16");
  auto on_cpu = Trainer::Create(bf16);
  ASSERT_FALSE(on_cpu.ok());
  EXPECT_EQ(on_cpu.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(on_cpu.status().message().find("needs a GPU"), std::string::npos) << on_cpu.status();
  // A GPU asked for where none can be used (no CUDA in the build, or no driver / GPU here).
  auto on_gpu = Trainer::Create(SmallConfig(false), TrainerDevice{true, 0});
  if (on_gpu.ok()) GTEST_SKIP() << "this machine has a usable GPU";
  EXPECT_EQ(on_gpu.status().code(), absl::StatusCode::kFailedPrecondition) << on_gpu.status();
}

TEST(TrainerTest, StateRangesRoundTripAndBroadcastCopiesState) {
  proto::RunConfig config = SmallConfig(false);
  InMemoryKeyValue kv;
  std::string digest0, digest1;
  std::thread source([&] {
    auto trainer = *Trainer::Create(config);
    trainer->InitFresh();
    InMemoryKeyValue local;
    auto solo = *CreateGlooCommunicator(local, 1, 0, 1, GlooOptions());
    ASSERT_TRUE(trainer->RunStep(*solo).ok());
    auto comm = *CreateGlooCommunicator(kv, 2, 0, 2, GlooOptions());
    ASSERT_TRUE(trainer->BroadcastState(*comm, 0).ok());
    digest0 = trainer->StateDigest();
  });
  std::thread joiner([&] {
    auto trainer = *Trainer::Create(config);  // holds nothing meaningful
    auto comm = *CreateGlooCommunicator(kv, 2, 1, 2, GlooOptions());
    ASSERT_TRUE(trainer->BroadcastState(*comm, 0).ok());
    EXPECT_EQ(trainer->step(), 1);
    digest1 = trainer->StateDigest();
    // Reading the whole state in odd pieces and writing it back changes nothing.
    std::vector<float> state(trainer->state_floats());
    for (int64_t off = 0; off < trainer->state_floats(); off += 777777) {
      int64_t len = std::min<int64_t>(777777, trainer->state_floats() - off);
      trainer->ReadState(off, len, state.data() + off);
    }
    trainer->WriteState(0, trainer->state_floats(), state.data());
    EXPECT_EQ(trainer->StateDigest(), digest1);
  });
  source.join();
  joiner.join();
  EXPECT_EQ(digest0, digest1);
}

// A communicator whose operations fail, as after a lost peer.
class BrokenCommunicator : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 2; }
  absl::Status AllReduceSum(float*, int64_t) override { return Fail(); }
  absl::Status AllReduceSum(int64_t*, int64_t) override { return Fail(); }
  absl::Status Broadcast(void*, int64_t, int) override { return Fail(); }
  absl::Status Barrier() override { return Fail(); }
  void Abort() override {}
  absl::Status status() const override { return Fail(); }

 private:
  static absl::Status Fail() { return absl::UnavailableError("peer gone"); }
};

TEST(TrainerTest, FailedStepLeavesStateUnchanged) {
  for (bool deterministic : {false, true}) {
    auto trainer = *Trainer::Create(SmallConfig(deterministic));
    trainer->InitFresh();
    const std::string before = trainer->StateDigest();
    BrokenCommunicator broken;
    auto stats = trainer->RunStep(broken);
    EXPECT_EQ(stats.status().code(), absl::StatusCode::kUnavailable);
    EXPECT_EQ(trainer->step(), 0);
    EXPECT_EQ(trainer->StateDigest(), before);
  }
}

TEST(TrainerTest, MissingDataIsAClearError) {
  proto::RunConfig config = SmallConfig(false);
  config.mutable_data()->set_train("/nonexistent/train_*.bin");
  auto trainer = Trainer::Create(config);
  ASSERT_FALSE(trainer.ok());
  EXPECT_NE(std::string(trainer.status().message()).find("/nonexistent/train_"), std::string::npos);
}

}  // namespace
}  // namespace spotrain::worker
