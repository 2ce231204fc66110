// The NCCL communicator's state machine (worker/nccl_communicator.h) against a fake NCCL:
// init, timeouts, collectives over several in-process ranks, async errors, deadlines, the
// peer-lost flag, Abort from another thread, shrink (and re-init when a shrink fails) and
// growth. Runs without CUDA (CI). Time in the timeout tests comes from a FakeClock that the
// communicator's sleep advances; the multi-rank tests use threads and the real clock.
#include "worker/nccl_communicator.h"

#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "common/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/fake_nccl.h"
#include "worker/rendezvous_store.h"

namespace spotrain::worker {
namespace {

using testing_nccl::FakeFabric;
using testing_nccl::FakeNccl;

using ::testing::HasSubstr;

NcclOptions FakeTimeOptions(common::FakeClock& clock) {
  NcclOptions options;
  options.clock = &clock;
  options.sleep = [&clock](absl::Duration d) { clock.Advance(d); };
  options.poll_interval = absl::Milliseconds(1);
  options.init_timeout = absl::Seconds(10);
  options.op_timeout = absl::Seconds(5);
  options.revoke_timeout = absl::Seconds(1);
  return options;
}

NcclOptions RealTimeOptions() {
  NcclOptions options;
  options.poll_interval = absl::Microseconds(200);
  options.init_timeout = absl::Seconds(30);
  options.op_timeout = absl::Seconds(30);
  options.max_chunk_bytes = 16;  // several chunks even for small test buffers
  return options;
}

struct Rank {
  std::shared_ptr<FakeNccl> api;
  std::unique_ptr<NcclCommunicator> comm;
};

// Creates `world` ranks of `epoch` in parallel threads.
std::vector<Rank> CreateGroup(FakeFabric& fabric, KeyValueClient& kv, int64_t epoch, int world,
                              const NcclOptions& options) {
  std::vector<Rank> ranks(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    ranks[r].api = std::make_shared<FakeNccl>(fabric);
    threads.emplace_back([&, r] {
      auto created = NcclCommunicator::Create(ranks[r].api, kv, epoch, r, world, options);
      EXPECT_TRUE(created.ok()) << created.status();
      if (created.ok()) ranks[r].comm = *std::move(created);
    });
  }
  for (auto& t : threads) t.join();
  return ranks;
}

// Every rank of `comms` runs `body(rank index, comm)` in its own thread.
void OnEveryRank(const std::vector<NcclCommunicator*>& comms,
                 const std::function<void(int, NcclCommunicator&)>& body) {
  std::vector<std::thread> threads;
  for (int i = 0; i < static_cast<int>(comms.size()); ++i) {
    threads.emplace_back([&, i] { body(i, *comms[i]); });
  }
  for (auto& t : threads) t.join();
}

TEST(NcclCommunicatorTest, SingleRankInitAndCollectives) {
  FakeFabric fabric;
  InMemoryKeyValue kv;
  auto api = std::make_shared<FakeNccl>(fabric);
  auto comm = NcclCommunicator::Create(api, kv, 1, 0, 1, RealTimeOptions());
  ASSERT_TRUE(comm.ok()) << comm.status();
  EXPECT_EQ((*comm)->rank(), 0);
  EXPECT_EQ((*comm)->world_size(), 1);
  EXPECT_EQ(kv.size(), 0) << "a one-rank group needs no rendezvous";
  std::vector<float> f = {1.5f, -2.0f, 3.25f, 7.0f, 0.5f};
  ASSERT_TRUE((*comm)->AllReduceSum(f.data(), f.size()).ok());
  EXPECT_THAT(f, ::testing::ElementsAre(1.5f, -2.0f, 3.25f, 7.0f, 0.5f));
  std::vector<int64_t> i = {int64_t{1} << 40, -3};
  ASSERT_TRUE((*comm)->AllReduceSum(i.data(), i.size()).ok());
  EXPECT_EQ(i[0], int64_t{1} << 40);
  ASSERT_TRUE((*comm)->Barrier().ok());
  EXPECT_TRUE((*comm)->status().ok());
  EXPECT_EQ(api->aborts, 0);
  comm->reset();
  EXPECT_EQ(api->aborts, 1) << "the destructor frees the NCCL communicator";
}

TEST(NcclCommunicatorTest, ThreeRanksSumAndBroadcastInChunks) {
  FakeFabric fabric;
  InMemoryKeyValue kv;
  auto ranks = CreateGroup(fabric, kv, 3, 3, RealTimeOptions());
  ASSERT_TRUE(ranks[0].comm && ranks[1].comm && ranks[2].comm);
  EXPECT_TRUE(kv.Contains(NcclIdKey(3)));
  std::vector<NcclCommunicator*> comms = {ranks[0].comm.get(), ranks[1].comm.get(),
                                          ranks[2].comm.get()};
  OnEveryRank(comms, [](int r, NcclCommunicator& comm) {
    std::vector<float> f(11);
    std::vector<int64_t> i(7);
    for (int k = 0; k < 11; ++k) f[k] = 0.25f * k + r;
    for (int k = 0; k < 7; ++k) i[k] = (int64_t{1} << 50) * r + k;
    ASSERT_TRUE(comm.AllReduceSum(f.data(), f.size()).ok());
    ASSERT_TRUE(comm.AllReduceSum(i.data(), i.size()).ok());
    for (int k = 0; k < 11; ++k) EXPECT_EQ(f[k], 0.75f * k + 3) << k;
    for (int k = 0; k < 7; ++k) EXPECT_EQ(i[k], (int64_t{1} << 50) * 3 + 3 * k) << k;
    std::string text = r == 1 ? "state from rank one, longer than a chunk" : std::string(40, '?');
    ASSERT_TRUE(comm.Broadcast(text.data(), text.size(), 1).ok());
    EXPECT_EQ(text, "state from rank one, longer than a chunk");
    EXPECT_TRUE(comm.Barrier().ok());
  });
  // 11 floats in 16-byte chunks: 3 chunks; 7 int64: 4; 40 bytes: 3; barrier: 1.
  EXPECT_EQ(ranks[0].api->enqueued, 11);
}

TEST(NcclCommunicatorTest, InitTimesOutWhenPeersNeverJoin) {
  common::FakeClock clock;
  FakeFabric fabric;
  InMemoryKeyValue kv;
  auto api = std::make_shared<FakeNccl>(fabric);
  auto comm = NcclCommunicator::Create(api, kv, 1, 0, 2, FakeTimeOptions(clock));
  ASSERT_FALSE(comm.ok());
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kDeadlineExceeded) << comm.status();
  EXPECT_EQ(api->inits, 1);
  EXPECT_EQ(api->aborts, 1) << "the half-initialised communicator is aborted";
}

TEST(NcclCommunicatorTest, IdNeverPublishedTimesOut) {
  FakeFabric fabric;
  InMemoryKeyValue kv;
  NcclOptions options = RealTimeOptions();
  options.init_timeout = absl::Milliseconds(300);
  auto comm = NcclCommunicator::Create(std::make_shared<FakeNccl>(fabric), kv, 1, 1, 2, options);
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kDeadlineExceeded) << comm.status();
}

TEST(NcclCommunicatorTest, InitCancelled) {
  common::FakeClock clock;
  FakeFabric fabric;
  InMemoryKeyValue kv;
  NcclOptions options = FakeTimeOptions(clock);
  int polls = 0;
  options.cancelled = [&polls] { return ++polls > 3; };
  auto api = std::make_shared<FakeNccl>(fabric);
  auto comm = NcclCommunicator::Create(api, kv, 1, 0, 2, options);
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kAborted) << comm.status();
  EXPECT_EQ(api->aborts, 1);
}

TEST(NcclCommunicatorTest, AsyncErrorIsUnavailableAndSticky) {
  common::FakeClock clock;
  FakeFabric fabric;
  InMemoryKeyValue kv;
  auto api = std::make_shared<FakeNccl>(fabric);
  auto comm = NcclCommunicator::Create(api, kv, 1, 0, 1, FakeTimeOptions(clock));
  ASSERT_TRUE(comm.ok());
  api->async_error = NcclResult::kRemoteError;
  float x[4] = {1, 2, 3, 4};
  absl::Status st = (*comm)->AllReduceSum(x, 4);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("ncclRemoteError"));
  EXPECT_EQ(api->revokes, 1) << "in-flight work is revoked";
  const int enqueued = api->enqueued;
  EXPECT_EQ((*comm)->AllReduceSum(x, 4), st) << "the error is sticky";
  EXPECT_EQ(api->enqueued, enqueued) << "nothing is enqueued after a failure";
  EXPECT_EQ((*comm)->status(), st);
}

TEST(NcclCommunicatorTest, DeadlineRevokes) {
  common::FakeClock clock;
  FakeFabric fabric;
  InMemoryKeyValue kv;
  auto api = std::make_shared<FakeNccl>(fabric);
  NcclOptions options = FakeTimeOptions(clock);
  auto comm = NcclCommunicator::Create(api, kv, 1, 0, 1, options);
  ASSERT_TRUE(comm.ok());
  api->stall_ops = true;
  const absl::Time start = clock.Now();
  int64_t v = 5;
  absl::Status st = (*comm)->AllReduceSum(&v, 1);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("timed out"));
  EXPECT_GE(clock.Now() - start, options.op_timeout);
  EXPECT_LT(clock.Now() - start, options.op_timeout + absl::Seconds(1));
  EXPECT_EQ(api->revokes, 1);
  EXPECT_EQ(api->aborts, 0) << "a quiescent revoke keeps the communicator for a shrink";
}

TEST(NcclCommunicatorTest, DeadlineAbortsWhenRevokeHangs) {
  common::FakeClock clock;
  FakeFabric fabric;
  InMemoryKeyValue kv;
  auto api = std::make_shared<FakeNccl>(fabric);
  auto comm = NcclCommunicator::Create(api, kv, 1, 0, 1, FakeTimeOptions(clock));
  ASSERT_TRUE(comm.ok());
  api->stall_ops = true;
  api->revoke_never_quiesces = true;
  float x = 1;
  EXPECT_EQ((*comm)->AllReduceSum(&x, 1).code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(api->revokes, 1);
  EXPECT_EQ(api->aborts, 1);
  comm->reset();
  EXPECT_EQ(api->aborts, 1) << "never aborted twice";
}

TEST(NcclCommunicatorTest, PeerLostFlagEndsAWaitingOperation) {
  common::FakeClock clock;
  FakeFabric fabric;
  InMemoryKeyValue kv;
  auto api = std::make_shared<FakeNccl>(fabric);
  auto comm = NcclCommunicator::Create(api, kv, 1, 0, 1, FakeTimeOptions(clock));
  ASSERT_TRUE(comm.ok());
  api->stall_ops = true;
  int polls = 0;
  NcclCommunicator* c = comm->get();
  api->on_poll = [&] {
    if (++polls == 3) c->MarkPeerLost();
  };
  const absl::Time start = clock.Now();
  float x = 1;
  absl::Status st = (*comm)->AllReduceSum(&x, 1);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("lost"));
  EXPECT_LT(clock.Now() - start, absl::Milliseconds(100)) << "not the op deadline";
  EXPECT_EQ(api->revokes, 1);
}

TEST(NcclCommunicatorTest, PeerLostBeforeAnOperationFailsAtOnce) {
  FakeFabric fabric;
  InMemoryKeyValue kv;
  auto api = std::make_shared<FakeNccl>(fabric);
  auto comm = NcclCommunicator::Create(api, kv, 1, 0, 1, RealTimeOptions());
  ASSERT_TRUE(comm.ok());
  (*comm)->MarkPeerLost();
  EXPECT_EQ((*comm)->Barrier().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(api->enqueued, 0);
}

TEST(NcclCommunicatorTest, AbortFromAnotherThread) {
  FakeFabric fabric;
  InMemoryKeyValue kv;
  auto api = std::make_shared<FakeNccl>(fabric);
  auto comm = NcclCommunicator::Create(api, kv, 1, 0, 1, RealTimeOptions());
  ASSERT_TRUE(comm.ok());
  api->stall_ops = true;
  absl::Status st;
  std::thread owner([&] {
    float x[8] = {0};
    st = (*comm)->AllReduceSum(x, 2);
  });
  while (api->enqueued == 0) absl::SleepFor(absl::Milliseconds(1));
  (*comm)->Abort();
  owner.join();
  EXPECT_EQ(st.code(), absl::StatusCode::kAborted) << st;
  EXPECT_EQ((*comm)->status().code(), absl::StatusCode::kAborted);
  EXPECT_EQ(api->aborts, 1);
  (*comm)->Abort();
  EXPECT_EQ(api->aborts, 1) << "idempotent";
}

// Three ranks; rank 2 vanishes; the survivors' collective fails (the coordinator flags the
// loss) and they shrink to two ranks.
TEST(NcclCommunicatorTest, ShrinkAfterLoss) {
  FakeFabric fabric;
  InMemoryKeyValue kv;
  auto ranks = CreateGroup(fabric, kv, 1, 3, RealTimeOptions());
  ASSERT_TRUE(ranks[0].comm && ranks[1].comm && ranks[2].comm);
  ranks[2].comm.reset();  // gone (its NCCL communicator is aborted)
  std::vector<std::unique_ptr<NcclCommunicator>> children(2);
  OnEveryRank({ranks[0].comm.get(), ranks[1].comm.get()}, [&](int r, NcclCommunicator& comm) {
    float x = 1;
    // Rank 2 never deposits: the coordinator's verdict ends the wait.
    std::thread flag([&comm] {
      absl::SleepFor(absl::Milliseconds(20));
      comm.MarkPeerLost();
    });
    EXPECT_EQ(comm.AllReduceSum(&x, 1).code(), absl::StatusCode::kUnavailable);
    flag.join();
    auto child = comm.Shrink({2}, kv, 2);
    ASSERT_TRUE(child.ok()) << child.status();
    EXPECT_FALSE(comm.last_shrink_reinitialised());
    EXPECT_FALSE(comm.status().ok()) << "the parent is unusable after a shrink";
    children[r] = *std::move(child);
  });
  ASSERT_TRUE(children[0] && children[1]);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(children[r]->rank(), r);
    EXPECT_EQ(children[r]->world_size(), 2);
    EXPECT_EQ(children[r]->epoch(), 2);
    EXPECT_EQ(ranks[r].api->shrinks, 1);
    EXPECT_EQ(ranks[r].api->inits, 1) << "no re-init";
  }
  OnEveryRank({children[0].get(), children[1].get()}, [](int r, NcclCommunicator& comm) {
    int64_t v[3] = {r + 1, 10, -r};
    ASSERT_TRUE(comm.AllReduceSum(v, 3).ok());
    EXPECT_EQ(v[0], 3);
    EXPECT_EQ(v[1], 20);
    EXPECT_EQ(v[2], -1);
  });
  EXPECT_FALSE(kv.Contains(NcclReinitIdKey(2)));
}

TEST(NcclCommunicatorTest, ShrinkFailureMeansReinitWithFreshId) {
  FakeFabric fabric;
  InMemoryKeyValue kv;
  auto ranks = CreateGroup(fabric, kv, 1, 3, RealTimeOptions());
  ASSERT_TRUE(ranks[0].comm && ranks[1].comm && ranks[2].comm);
  ranks[0].comm.reset();              // rank 0 (the first id's author) is lost
  ranks[2].api->shrink_fails = true;  // NCCL recorded the remote error on rank 2
  std::vector<std::unique_ptr<NcclCommunicator>> children(2);
  OnEveryRank({ranks[1].comm.get(), ranks[2].comm.get()}, [&](int i, NcclCommunicator& comm) {
    comm.MarkPeerLost();
    auto child = comm.Shrink({0}, kv, 5);
    ASSERT_TRUE(child.ok()) << child.status();
    EXPECT_TRUE(comm.last_shrink_reinitialised());
    children[i] = *std::move(child);
  });
  ASSERT_TRUE(children[0] && children[1]);
  EXPECT_TRUE(kv.Contains(NcclReinitIdKey(5)));
  // The new rank 0 (old rank 1) drew the fresh id; both re-initialised.
  EXPECT_EQ(ranks[1].api->ids_drawn.size(), 1u);
  EXPECT_EQ(ranks[1].api->inits, 2);
  EXPECT_EQ(ranks[2].api->inits, 2);
  // Rank 1's successful shrink child was thrown away with its parent: 2 aborts.
  EXPECT_EQ(ranks[1].api->aborts, 2);
  OnEveryRank({children[0].get(), children[1].get()}, [](int r, NcclCommunicator& comm) {
    EXPECT_EQ(comm.rank(), r);
    float v = 2.5f;
    ASSERT_TRUE(comm.AllReduceSum(&v, 1).ok());
    EXPECT_EQ(v, 5.0f);
  });
}

// What the agent does on an immediate Prepare: Abort(). A survivor whose communicator was
// aborted cannot shrink, so every survivor re-initialises, and the one whose shrink was
// still waiting for its peers gives up early (well before init_timeout) on seeing that.
TEST(NcclCommunicatorTest, ShrinkAfterAbortOnOneSurvivorReinitialisesAll) {
  FakeFabric fabric;
  InMemoryKeyValue kv;
  auto ranks = CreateGroup(fabric, kv, 1, 3, RealTimeOptions());
  ASSERT_TRUE(ranks[0].comm && ranks[1].comm && ranks[2].comm);
  ranks[2].comm.reset();
  ranks[0].comm->Abort();
  ranks[1].comm->MarkPeerLost();
  std::vector<std::unique_ptr<NcclCommunicator>> children(2);
  const absl::Time start = absl::Now();
  OnEveryRank({ranks[0].comm.get(), ranks[1].comm.get()}, [&](int r, NcclCommunicator& comm) {
    auto child = comm.Shrink({2}, kv, 4);
    ASSERT_TRUE(child.ok()) << child.status();
    EXPECT_TRUE(comm.last_shrink_reinitialised());
    children[r] = *std::move(child);
  });
  EXPECT_LT(absl::Now() - start, absl::Seconds(10)) << "no wait for init_timeout (30 s)";
  ASSERT_TRUE(children[0] && children[1]);
  EXPECT_EQ(ranks[0].api->shrinks, 0) << "an aborted communicator is not shrunk";
  EXPECT_EQ(ranks[1].api->shrinks, 1);
  OnEveryRank({children[0].get(), children[1].get()}, [](int r, NcclCommunicator& comm) {
    int64_t v = 10 + r;
    ASSERT_TRUE(comm.AllReduceSum(&v, 1).ok());
    EXPECT_EQ(v, 21);
  });
}

TEST(NcclCommunicatorTest, ShrinkRejectsBadExcludeLists) {
  FakeFabric fabric;
  InMemoryKeyValue kv;
  auto comm =
      NcclCommunicator::Create(std::make_shared<FakeNccl>(fabric), kv, 1, 0, 1, RealTimeOptions());
  ASSERT_TRUE(comm.ok());
  EXPECT_EQ((*comm)->Shrink({0}, kv, 2).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*comm)->Shrink({3}, kv, 2).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*comm)->Shrink({}, kv, 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE((*comm)->status().ok()) << "a rejected shrink changes nothing";
}

// Growth: two ranks train in epoch 1; a third arrives; all three build epoch 2's
// communicator while the old one stays usable, then switch.
TEST(NcclCommunicatorTest, GrowBuildsANewCommunicatorBesideTheOld) {
  FakeFabric fabric;
  InMemoryKeyValue kv;
  auto old_ranks = CreateGroup(fabric, kv, 1, 2, RealTimeOptions());
  ASSERT_TRUE(old_ranks[0].comm && old_ranks[1].comm);
  auto newcomer = std::make_shared<FakeNccl>(fabric);
  std::vector<std::shared_ptr<NcclApi>> apis = {old_ranks[0].api, old_ranks[1].api, newcomer};
  std::vector<std::unique_ptr<NcclCommunicator>> next(3);
  std::vector<std::thread> threads;
  for (int r = 0; r < 3; ++r) {
    threads.emplace_back([&, r] {
      if (r < 2) {  // the old group still works until the switch
        int64_t v = r;
        ASSERT_TRUE(old_ranks[r].comm->AllReduceSum(&v, 1).ok());
        EXPECT_EQ(v, 1);
      }
      auto created = NcclCommunicator::Create(apis[r], kv, 2, r, 3, RealTimeOptions());
      ASSERT_TRUE(created.ok()) << created.status();
      next[r] = *std::move(created);
      if (r < 2) {
        float f = 1;
        ASSERT_TRUE(old_ranks[r].comm->AllReduceSum(&f, 1).ok());
        EXPECT_EQ(f, 2.0f);
        old_ranks[r].comm.reset();  // the switch at the planned step
      }
      float g = static_cast<float>(r);
      ASSERT_TRUE(next[r]->AllReduceSum(&g, 1).ok());
      EXPECT_EQ(g, 3.0f);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_TRUE(kv.Contains(NcclIdKey(2)));
  EXPECT_EQ(old_ranks[0].api->inits, 2);
}

TEST(NcclCommunicatorTest, RejectsBadArguments) {
  FakeFabric fabric;
  InMemoryKeyValue kv;
  auto api = std::make_shared<FakeNccl>(fabric);
  EXPECT_EQ(NcclCommunicator::Create(api, kv, 1, 1, 1, RealTimeOptions()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(NcclCommunicator::Create(nullptr, kv, 1, 0, 1, RealTimeOptions()).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto comm = NcclCommunicator::Create(api, kv, 1, 0, 1, RealTimeOptions());
  ASSERT_TRUE(comm.ok());
  float x = 0;
  EXPECT_EQ((*comm)->AllReduceSum(&x, -1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*comm)->Broadcast(&x, 4, 1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE((*comm)->AllReduceSum(&x, 0).ok());
  EXPECT_TRUE((*comm)->status().ok());
  EXPECT_EQ(api->enqueued, 0);
}

}  // namespace
}  // namespace spotrain::worker
