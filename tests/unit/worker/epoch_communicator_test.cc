// EpochCommunicatorFactory on a GPU device with a fake NCCL (tests/support/fake_nccl.h): the
// Plan's shrink fields make the survivors shrink the communicator they retired; without them
// (or without a retired one of that epoch) a fresh communicator is built. Runs without CUDA.
#include "worker/epoch_communicator.h"

#include <memory>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/fake_nccl.h"
#include "worker/rendezvous_store.h"

namespace spotrain::worker {
namespace {

using testing_nccl::FakeFabric;
using testing_nccl::FakeNccl;

proto::Plan MakePlan(int64_t epoch, int world, int64_t shrink_from = 0,
                     const std::vector<int>& exclude = {}) {
  proto::Plan plan;
  plan.set_epoch(epoch);
  plan.set_world_size(world);
  plan.set_shrink_from_epoch(shrink_from);
  for (int r : exclude) plan.add_shrink_exclude(r);
  return plan;
}

GlooOptions Options() {
  GlooOptions options;
  options.connect_timeout = absl::Seconds(30);
  options.op_timeout = absl::Seconds(30);
  options.max_chunk_bytes = 16;
  return options;
}

struct Worker {
  std::shared_ptr<FakeNccl> api;
  std::unique_ptr<EpochCommunicatorFactory> factory;
  std::unique_ptr<Communicator> comm;
};

std::vector<Worker> MakeWorkers(FakeFabric& fabric, int n) {
  std::vector<Worker> workers(n);
  for (Worker& w : workers) {
    w.api = std::make_shared<FakeNccl>(fabric);
    w.factory = std::make_unique<EpochCommunicatorFactory>(TrainerDevice{true, 0}, w.api);
  }
  return workers;
}

// Worker i (of `who`) creates its communicator of `plan` as rank ranks[i], all in parallel.
void CreateAll(std::vector<Worker>& workers, const std::vector<int>& who,
               const std::vector<int>& ranks, KeyValueClient& kv, const proto::Plan& plan) {
  std::vector<std::thread> threads;
  for (size_t i = 0; i < who.size(); ++i) {
    threads.emplace_back([&, i] {
      Worker& w = workers[who[i]];
      auto created = w.factory->Create(kv, plan, ranks[i], Options());
      ASSERT_TRUE(created.ok()) << created.status();
      w.comm = *std::move(created);
    });
  }
  for (auto& t : threads) t.join();
}

// The survivors' sum works on the new communicators.
void ExpectSum(std::vector<Worker>& workers, const std::vector<int>& who) {
  std::vector<std::thread> threads;
  for (int i : who) {
    threads.emplace_back([&, i] {
      int64_t v[2] = {1, i};
      ASSERT_TRUE(workers[i].comm->AllReduceSum(v, 2).ok());
      EXPECT_EQ(v[0], static_cast<int64_t>(who.size()));
    });
  }
  for (auto& t : threads) t.join();
}

TEST(EpochCommunicatorTest, SurvivorsShrinkWhenThePlanSaysSo) {
  FakeFabric fabric;
  InMemoryKeyValue kv;
  auto workers = MakeWorkers(fabric, 3);
  CreateAll(workers, {0, 1, 2}, {0, 1, 2}, kv, MakePlan(1, 3));
  // Worker 1 is lost; the survivors are interrupted (a new epoch comes) and retire theirs.
  workers[1].comm.reset();
  for (int i : {0, 2}) {
    workers[i].comm->Interrupt();
    workers[i].factory->Retire(std::move(workers[i].comm));
  }
  CreateAll(workers, {0, 2}, {0, 1}, kv, MakePlan(2, 2, /*shrink_from=*/1, {1}));
  for (int i : {0, 2}) {
    ASSERT_NE(workers[i].comm, nullptr);
    EXPECT_EQ(workers[i].comm->world_size(), 2);
    EXPECT_EQ(workers[i].api->shrinks, 1) << "worker " << i;
    EXPECT_EQ(workers[i].api->inits, 1) << "worker " << i << ": no re-init";
  }
  EXPECT_EQ(workers[0].comm->rank(), 0);
  EXPECT_EQ(workers[2].comm->rank(), 1);
  EXPECT_FALSE(kv.Contains(NcclReinitIdKey(2)));
  ExpectSum(workers, {0, 2});
}

TEST(EpochCommunicatorTest, WithoutShrinkFieldsAFreshCommunicatorIsBuilt) {
  FakeFabric fabric;
  InMemoryKeyValue kv;
  auto workers = MakeWorkers(fabric, 2);
  CreateAll(workers, {0, 1}, {0, 1}, kv, MakePlan(1, 2));
  for (Worker& w : workers) w.factory->Retire(std::move(w.comm));
  // Same members again (e.g. after a failed collective): no shrink, a new id for epoch 2.
  CreateAll(workers, {0, 1}, {0, 1}, kv, MakePlan(2, 2));
  for (Worker& w : workers) {
    EXPECT_EQ(w.api->shrinks, 0);
    EXPECT_EQ(w.api->inits, 2);
    EXPECT_GE(w.api->aborts, 1) << "the retired communicator is freed";
  }
  EXPECT_TRUE(kv.Contains(NcclIdKey(2)));
  ExpectSum(workers, {0, 1});
}

TEST(EpochCommunicatorTest, ShrinkOfAnotherEpochIsIgnored) {
  FakeFabric fabric;
  InMemoryKeyValue kv;
  auto workers = MakeWorkers(fabric, 2);
  CreateAll(workers, {0, 1}, {0, 1}, kv, MakePlan(1, 2));
  workers[0].factory->Retire(std::move(workers[0].comm));
  // The plan shrinks epoch 3, which this worker never held: it builds a fresh one-rank group.
  CreateAll(workers, {0}, {0}, kv, MakePlan(4, 1, /*shrink_from=*/3, {1}));
  EXPECT_EQ(workers[0].api->shrinks, 0);
  EXPECT_EQ(workers[0].api->inits, 2);
  EXPECT_EQ(workers[0].comm->world_size(), 1);
}

TEST(EpochCommunicatorTest, CpuUsesGlooAndKeepsNothing) {
  InMemoryKeyValue kv;
  EpochCommunicatorFactory factory(TrainerDevice{});
  GlooOptions options = Options();
  options.interface_host = "127.0.0.1";
  auto comm = factory.Create(kv, MakePlan(1, 1), 0, options);
  ASSERT_TRUE(comm.ok()) << comm.status();
  EXPECT_FALSE((*comm)->accepts_device_memory());
  factory.Retire(*std::move(comm));
  auto next = factory.Create(kv, MakePlan(2, 1, 1, {0}), 0, options);
  ASSERT_TRUE(next.ok()) << next.status();
}

}  // namespace
}  // namespace spotrain::worker
