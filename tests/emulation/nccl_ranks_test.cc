// The NCCL communicator (worker/nccl_communicator.h) over worker/nccl_api.cu with several
// ranks, on the emulated NCCL (nccl_emulated.cc): ranks are threads of this process, each
// with its own NcclApi (stream and staging buffers) on the emulated GPU, linked over TCP.
// What one GPU cannot show: sums over ranks (host and device buffers), a broadcast from a
// rank other than 0, a peer that aborts (the others' collective fails, or with a silent loss
// hangs until its deadline, and they shrink without it), a peer that stops taking part (the
// others' collective hangs until its deadline, is revoked, and they shrink; with a revoke
// slower than revoke_timeout they abort and re-initialise), a survivor that cannot shrink
// (all re-initialise), and the new communicator's collectives.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "worker/nccl_api.h"
#include "worker/nccl_communicator.h"
#include "worker/rendezvous_store.h"

namespace spotrain::worker {
namespace {

constexpr int64_t kChunkBytes = 1 << 12;  // 4 KiB: the buffers below take several chunks

class NcclRanksTest : public ::testing::Test {
 protected:
  NcclOptions Options() const {
    NcclOptions o;
    o.init_timeout = absl::Seconds(60);
    o.op_timeout = absl::Seconds(60);
    o.max_chunk_bytes = kChunkBytes;
    return o;
  }

  // Runs body(rank) on `n` threads at once and waits for all of them.
  static void OnRanks(int n, const std::function<void(int)>& body) {
    std::vector<std::thread> threads;
    for (int r = 0; r < n; ++r) threads.emplace_back(body, r);
    for (auto& t : threads) t.join();
  }

  // Rank `rank` of a `world`-rank communicator for `epoch`, on an NcclApi of its own.
  std::unique_ptr<NcclCommunicator> Make(int64_t epoch, int rank, int world,
                                         const NcclOptions& options) {
    auto api = CreateCudaNcclApi(0, kChunkBytes);
    EXPECT_TRUE(api.ok()) << api.status();
    if (!api.ok()) return nullptr;
    auto comm = NcclCommunicator::Create(std::shared_ptr<NcclApi>(std::move(*api)), kv_, epoch,
                                         rank, world, options);
    EXPECT_TRUE(comm.ok()) << "rank " << rank << ": " << comm.status();
    return comm.ok() ? *std::move(comm) : nullptr;
  }

  // Every rank's communicator for `epoch`, built concurrently.
  std::vector<std::unique_ptr<NcclCommunicator>> MakeAll(int64_t epoch, int world,
                                                         const NcclOptions& options) {
    std::vector<std::unique_ptr<NcclCommunicator>> comms(world);
    OnRanks(world, [&](int r) { comms[r] = Make(epoch, r, world, options); });
    return comms;
  }

  void SumsAndBroadcasts();

  InMemoryKeyValue kv_;
};

std::vector<int64_t> Values(int rank, int64_t n) {
  std::vector<int64_t> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = (rank + 1) * 1000003 * (i + 1) - (i % 7) * rank;
  return v;
}

// Sets an environment variable of the emulated NCCL for one test.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) { setenv(name, value, 1); }
  ~ScopedEnv() { unsetenv(name_); }

 private:
  const char* name_;
};

TEST_F(NcclRanksTest, SumsAndBroadcastsOverThreeRanks) { SumsAndBroadcasts(); }

// Collectives that return ncclInProgress and reach the stream later: the host staging's copy
// back (worker/nccl_api.cu) must wait until NCCL has enqueued the collective.
TEST_F(NcclRanksTest, SumsAndBroadcastsWithDeferredCollectives) {
  ScopedEnv defer("SPOTRAIN_EMULATED_NCCL_DEFER_MS", "20");
  SumsAndBroadcasts();
}

void NcclRanksTest::SumsAndBroadcasts() {
  constexpr int kWorld = 3;
  auto comms = MakeAll(1, kWorld, Options());
  for (const auto& c : comms) ASSERT_NE(c, nullptr);
  const int64_t n = 3000;  // 24 KB of int64: six chunks
  std::vector<int64_t> want(n, 0);
  for (int r = 0; r < kWorld; ++r) {
    const auto v = Values(r, n);
    for (int64_t i = 0; i < n; ++i) want[i] += v[i];
  }
  std::vector<std::vector<int64_t>> got(kWorld);
  std::vector<std::vector<float>> floats(kWorld);
  std::vector<std::vector<uint8_t>> bytes(kWorld);
  std::vector<std::vector<float>> on_device(kWorld);
  OnRanks(kWorld, [&](int r) {
    got[r] = Values(r, n);
    ASSERT_TRUE(comms[r]->AllReduceSum(got[r].data(), n).ok());
    // Device memory is used in place (no staging): fp32 gradients as the GPU replica sums
    // them, larger than a chunk.
    on_device[r].assign(3000, 0.5f * (r + 1));
    void* memory = nullptr;
    ASSERT_EQ(cudaMalloc(&memory, 3000 * sizeof(float)), cudaSuccess);
    float* device = static_cast<float*>(memory);
    ASSERT_EQ(cudaMemcpy(device, on_device[r].data(), 3000 * sizeof(float), cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_TRUE(comms[r]->AllReduceSum(device, 3000).ok());
    ASSERT_EQ(cudaMemcpy(on_device[r].data(), device, 3000 * sizeof(float), cudaMemcpyDeviceToHost),
              cudaSuccess);
    cudaFree(device);
    // fp32: small integers, so that any order of summation gives the exact sum.
    floats[r].assign(2500, static_cast<float>(r + 1));
    ASSERT_TRUE(comms[r]->AllReduceSum(floats[r].data(), 2500).ok());
    // A broadcast from the last rank (not the emulated NCCL's hub), several chunks.
    bytes[r].assign(10000, static_cast<uint8_t>(r == 2 ? 0xA5 : r));
    ASSERT_TRUE(comms[r]->Broadcast(bytes[r].data(), 10000, /*root=*/2).ok());
    ASSERT_TRUE(comms[r]->Barrier().ok());
  });
  for (int r = 0; r < kWorld; ++r) {
    EXPECT_EQ(got[r], want) << "rank " << r;
    EXPECT_EQ(floats[r], std::vector<float>(2500, 6.0f)) << "rank " << r;
    EXPECT_EQ(bytes[r], std::vector<uint8_t>(10000, 0xA5)) << "rank " << r;
    EXPECT_EQ(on_device[r], std::vector<float>(3000, 3.0f)) << "rank " << r;
  }
}

TEST_F(NcclRanksTest, SurvivorsOfAnAbortedRankShrinkAndGoOn) {
  constexpr int kWorld = 3;
  auto comms = MakeAll(1, kWorld, Options());
  for (const auto& c : comms) ASSERT_NE(c, nullptr);
  // Rank 0 (the hub of the emulated star) goes away: its sockets close.
  comms[0]->Abort();
  comms[0].reset();
  std::vector<std::unique_ptr<NcclCommunicator>> next(kWorld);
  std::vector<std::vector<int64_t>> got(kWorld);
  OnRanks(kWorld, [&](int r) {
    if (r == 0) return;
    int64_t x = r;
    const absl::Status failed = comms[r]->AllReduceSum(&x, 1);
    EXPECT_EQ(failed.code(), absl::StatusCode::kUnavailable) << "rank " << r << ": " << failed;
    auto child = comms[r]->Shrink({0}, kv_, 2);
    ASSERT_TRUE(child.ok()) << "rank " << r << ": " << child.status();
    EXPECT_FALSE(comms[r]->last_shrink_reinitialised()) << "rank " << r;
    next[r] = *std::move(child);
    EXPECT_EQ(next[r]->rank(), r - 1);
    EXPECT_EQ(next[r]->world_size(), 2);
    got[r] = Values(r, 700);
    ASSERT_TRUE(next[r]->AllReduceSum(got[r].data(), 700).ok()) << "rank " << r;
  });
  std::vector<int64_t> want = Values(1, 700);
  const auto two = Values(2, 700);
  for (size_t i = 0; i < want.size(); ++i) want[i] += two[i];
  EXPECT_EQ(got[1], want);
  EXPECT_EQ(got[2], want);
}

// As over NVLink or shared memory on one node, the dead hub's sockets closing sets no async
// error: the others' collective hangs until its deadline, then they shrink without it.
TEST_F(NcclRanksTest, ASilentlyLostHubIsNoticedAtTheDeadline) {
  ScopedEnv silent("SPOTRAIN_EMULATED_NCCL_SILENT_LOSS", "1");
  constexpr int kWorld = 3;
  NcclOptions options = Options();
  options.op_timeout = absl::Seconds(5);  // the deadline that ends the hung collective
  auto comms = MakeAll(1, kWorld, options);
  for (const auto& c : comms) ASSERT_NE(c, nullptr);
  comms[0]->Abort();
  comms[0].reset();
  std::vector<std::unique_ptr<NcclCommunicator>> next(kWorld);
  std::vector<int64_t> got(kWorld, 0);
  OnRanks(kWorld, [&](int r) {
    if (r == 0) return;
    int64_t x = r;
    const absl::Status hung = comms[r]->AllReduceSum(&x, 1);
    EXPECT_EQ(hung.code(), absl::StatusCode::kUnavailable) << "rank " << r << ": " << hung;
    EXPECT_NE(hung.message().find("timed out"), std::string::npos) << hung;
    auto child = comms[r]->Shrink({0}, kv_, 2);
    ASSERT_TRUE(child.ok()) << "rank " << r << ": " << child.status();
    EXPECT_FALSE(comms[r]->last_shrink_reinitialised()) << "rank " << r;
    next[r] = *std::move(child);
    int64_t y = 10 * r;
    ASSERT_TRUE(next[r]->AllReduceSum(&y, 1).ok()) << "rank " << r;
    got[r] = y;
  });
  EXPECT_EQ(got[1], 30);
  EXPECT_EQ(got[2], 30);
}

TEST_F(NcclRanksTest, ACollectiveAStoppedPeerNeverJoinsIsRevokedAndTheRestShrink) {
  constexpr int kWorld = 3;
  NcclOptions options = Options();
  options.op_timeout = absl::Seconds(5);  // the deadline that ends the hung collective
  auto comms = MakeAll(1, kWorld, options);
  for (const auto& c : comms) ASSERT_NE(c, nullptr);
  // Rank 1 stays alive (its sockets open) but never joins the all-reduce: ranks 0 and 2 hang
  // in it until their deadline, then revoke it and shrink without rank 1.
  std::vector<std::unique_ptr<NcclCommunicator>> next(kWorld);
  std::vector<float> got(kWorld, 0);
  OnRanks(kWorld, [&](int r) {
    if (r == 1) return;
    std::vector<float> v(5000, 1.0f);  // several chunks
    const absl::Status hung = comms[r]->AllReduceSum(v.data(), v.size());
    EXPECT_EQ(hung.code(), absl::StatusCode::kUnavailable) << "rank " << r << ": " << hung;
    // Rank 0 waits for rank 1's data until its deadline; rank 2, waiting for rank 0's
    // sum, either reaches its own deadline or sees rank 0's revoke close the link.
    if (r == 0) EXPECT_NE(hung.message().find("timed out"), std::string::npos) << hung;
    auto child = comms[r]->Shrink({1}, kv_, 2);
    ASSERT_TRUE(child.ok()) << "rank " << r << ": " << child.status();
    EXPECT_FALSE(comms[r]->last_shrink_reinitialised()) << "rank " << r;
    next[r] = *std::move(child);
    float x = static_cast<float>(r + 1);
    ASSERT_TRUE(next[r]->AllReduceSum(&x, 1).ok()) << "rank " << r;
    got[r] = x;
  });
  EXPECT_EQ(got[0], 4.0f);
  EXPECT_EQ(got[2], 4.0f);
  comms[1].reset();  // the stopped rank, aborted at last
}

// A revoke that does not finish within revoke_timeout: the communicator aborts instead, and
// the survivors re-initialise (an aborted communicator cannot shrink).
TEST_F(NcclRanksTest, ARevokeThatOutlastsItsTimeoutAbortsAndTheSurvivorsReinitialise) {
  ScopedEnv slow("SPOTRAIN_EMULATED_NCCL_REVOKE_MS", "60000");
  constexpr int kWorld = 3;
  NcclOptions options = Options();
  options.op_timeout = absl::Seconds(5);
  options.revoke_timeout = absl::Milliseconds(300);
  auto comms = MakeAll(1, kWorld, options);
  for (const auto& c : comms) ASSERT_NE(c, nullptr);
  std::vector<std::unique_ptr<NcclCommunicator>> next(kWorld);
  std::vector<int64_t> got(kWorld, 0);
  OnRanks(kWorld, [&](int r) {
    if (r == 1) return;  // never joins the collective
    int64_t x = 1;
    const absl::Status hung = comms[r]->AllReduceSum(&x, 1);
    EXPECT_EQ(hung.code(), absl::StatusCode::kUnavailable) << "rank " << r << ": " << hung;
    auto child = comms[r]->Shrink({1}, kv_, 2);
    ASSERT_TRUE(child.ok()) << "rank " << r << ": " << child.status();
    EXPECT_TRUE(comms[r]->last_shrink_reinitialised()) << "rank " << r;
    next[r] = *std::move(child);
    int64_t y = 5 + r;
    ASSERT_TRUE(next[r]->AllReduceSum(&y, 1).ok()) << "rank " << r;
    got[r] = y;
  });
  EXPECT_EQ(got[0], 12);
  EXPECT_EQ(got[2], 12);
}

TEST_F(NcclRanksTest, AFailedShrinkAnywhereMakesEverySurvivorReinitialise) {
  constexpr int kWorld = 3;
  auto comms = MakeAll(1, kWorld, Options());
  for (const auto& c : comms) ASSERT_NE(c, nullptr);
  comms[2]->Abort();
  comms[2].reset();
  // Rank 1's communicator is aborted too (as after a revoke that did not finish): it cannot
  // shrink, so both survivors must agree to re-initialise with a fresh unique id.
  comms[1]->Abort();
  std::vector<std::unique_ptr<NcclCommunicator>> next(kWorld);
  std::vector<int64_t> got(kWorld, 0);
  OnRanks(2, [&](int r) {
    auto child = comms[r]->Shrink({2}, kv_, 2);
    ASSERT_TRUE(child.ok()) << "rank " << r << ": " << child.status();
    EXPECT_TRUE(comms[r]->last_shrink_reinitialised()) << "rank " << r;
    next[r] = *std::move(child);
    int64_t x = 10 + r;
    ASSERT_TRUE(next[r]->AllReduceSum(&x, 1).ok()) << "rank " << r;
    got[r] = x;
  });
  EXPECT_EQ(got[0], 21);
  EXPECT_EQ(got[1], 21);
}

}  // namespace
}  // namespace spotrain::worker
