// A fake NCCL for CPU tests of the NCCL communicator and of what builds it
// (tests/unit/worker/nccl_communicator_test.cc, epoch_communicator_test.cc): FakeFabric is
// the "network" between in-process ranks, FakeNccl one rank's NcclApi on it.
#ifndef SPOTRAIN_TESTS_SUPPORT_FAKE_NCCL_H_
#define SPOTRAIN_TESTS_SUPPORT_FAKE_NCCL_H_

#include <atomic>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "worker/nccl_api.h"

namespace spotrain::worker::testing_nccl {

// The "network": groups of ranks (one per communicator) and the data each rank deposited
// for each collective. Thread-safe.
class FakeFabric {
 public:
  struct Group {
    std::string name;
    int size = 0;
    int joined = 0;
    // seq -> rank -> bytes deposited
    std::map<int64_t, std::map<int, std::string>> ops;
  };

  Group* JoinGroup(const std::string& name, int size) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    auto& g = groups_[name];
    if (g == nullptr) {
      g = std::make_unique<Group>();
      g->name = name;
      g->size = size;
    }
    ++g->joined;
    return g.get();
  }
  bool Ready(Group* g) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return g->joined >= g->size;
  }
  void Deposit(Group* g, int64_t seq, int rank, std::string bytes) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    g->ops[seq][rank] = std::move(bytes);
  }
  bool Complete(Group* g, int64_t seq) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return static_cast<int>(g->ops[seq].size()) == g->size;
  }
  std::map<int, std::string> Deposits(Group* g, int64_t seq) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return g->ops[seq];
  }
  int next_id() ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return ++ids_;
  }

 private:
  absl::Mutex mu_;
  std::map<std::string, std::unique_ptr<Group>> groups_ ABSL_GUARDED_BY(mu_);
  int ids_ ABSL_GUARDED_BY(mu_) = 0;
};

// One rank's fake NCCL. Behaviour knobs are set by the test before use; counters are read
// after (or through the atomics while it runs).
class FakeNccl : public NcclApi {
 public:
  struct FakeComm {
    FakeFabric::Group* group;
    int rank;
    int64_t seq = 0;
    bool revoked = false;
    int revoke_polls = 0;
  };

  explicit FakeNccl(FakeFabric& fabric) : fabric_(fabric) {}

  // Knobs.
  bool revoke_never_quiesces = false;
  bool shrink_fails = false;
  bool stall_ops = false;                         // the stream never becomes idle
  NcclResult async_error = NcclResult::kSuccess;  // reported by GetAsyncError when set
  std::function<void()> on_poll;                  // called on every stream poll

  // Counters.
  std::atomic<int> inits{0}, shrinks{0}, revokes{0}, aborts{0}, enqueued{0};
  std::vector<std::string> ids_drawn;

  int device() const override { return 0; }
  NcclResult GetUniqueId(std::string* id) override {
    *id = absl::StrCat("id-", fabric_.next_id());
    id->resize(kUniqueIdBytes, '\0');
    ids_drawn.push_back(id->c_str());
    return NcclResult::kSuccess;
  }
  NcclResult CommInitRank(Comm* comm, int nranks, const std::string& id, int rank) override {
    ++inits;
    auto* c = new FakeComm{fabric_.JoinGroup(id.c_str(), nranks), rank};
    comms_.emplace_back(c);
    *comm = c;
    return NcclResult::kInProgress;
  }
  NcclResult CommShrink(Comm parent, const std::vector<int>& exclude, Comm* child) override {
    ++shrinks;
    if (shrink_fails) return NcclResult::kRemoteError;
    auto* p = static_cast<FakeComm*>(parent);
    int rank = p->rank;
    for (int e : exclude) rank -= e < p->rank ? 1 : 0;
    const std::string name = absl::StrCat(p->group->name, "/shrink-", absl::StrJoin(exclude, ","));
    auto* c = new FakeComm{
        fabric_.JoinGroup(name, p->group->size - static_cast<int>(exclude.size())), rank};
    comms_.emplace_back(c);
    *child = c;
    return NcclResult::kInProgress;
  }
  NcclResult CommRevoke(Comm comm) override {
    ++revokes;
    static_cast<FakeComm*>(comm)->revoked = true;
    static_cast<FakeComm*>(comm)->revoke_polls = 2;
    return NcclResult::kInProgress;
  }
  NcclResult CommAbort(Comm comm) override {
    ++aborts;
    aborted_.push_back(comm);
    return NcclResult::kSuccess;
  }
  NcclResult CommGetAsyncError(Comm comm, NcclResult* state) override {
    auto* c = static_cast<FakeComm*>(comm);
    EXPECT_FALSE(IsAborted(comm)) << "GetAsyncError on an aborted communicator";
    if (c->revoked) {
      if (revoke_never_quiesces || c->revoke_polls-- > 0) {
        *state = NcclResult::kInProgress;
      } else {
        *state = NcclResult::kSuccess;
      }
      return NcclResult::kSuccess;
    }
    if (async_error != NcclResult::kSuccess) {
      *state = async_error;
      return NcclResult::kSuccess;
    }
    *state = fabric_.Ready(c->group) ? NcclResult::kSuccess : NcclResult::kInProgress;
    return NcclResult::kSuccess;
  }
  NcclResult AllReduceSum(Comm comm, void* data, int64_t count, NcclDataType type) override {
    const int64_t size = type == NcclDataType::kFloat32 ? 4 : type == NcclDataType::kInt64 ? 8 : 1;
    return Enqueue(comm, data, count * size, type, -1);
  }
  NcclResult Broadcast(Comm comm, void* data, int64_t bytes, int root) override {
    return Enqueue(comm, data, bytes, NcclDataType::kUint8, root);
  }
  StreamState QueryStream(std::string* error) override {
    if (on_poll) on_poll();
    if (!pending_.active || stall_ops)
      return pending_.active ? StreamState::kBusy : StreamState::kIdle;
    return fabric_.Complete(pending_.comm->group, pending_.seq) ? StreamState::kIdle
                                                                : StreamState::kBusy;
  }
  void FinishOperation() override {
    ASSERT_TRUE(pending_.active);
    pending_.active = false;
    auto deposits = fabric_.Deposits(pending_.comm->group, pending_.seq);
    if (pending_.root >= 0) {
      std::memcpy(pending_.data, deposits[pending_.root].data(), pending_.bytes);
      return;
    }
    if (pending_.type == NcclDataType::kFloat32) {
      Sum<float>(deposits);
    } else {
      Sum<int64_t>(deposits);
    }
  }
  std::string ErrorString(NcclResult result, Comm) override { return NcclResultName(result); }

  bool IsAborted(Comm comm) const {
    for (Comm c : aborted_) {
      if (c == comm) return true;
    }
    return false;
  }

 private:
  struct Pending {
    bool active = false;
    FakeComm* comm = nullptr;
    int64_t seq = 0;
    void* data = nullptr;
    int64_t bytes = 0;
    NcclDataType type = NcclDataType::kUint8;
    int root = -1;
  };

  NcclResult Enqueue(Comm comm, void* data, int64_t bytes, NcclDataType type, int root) {
    auto* c = static_cast<FakeComm*>(comm);
    EXPECT_FALSE(IsAborted(comm));
    // A collective that failed (never finished) is replaced by the next one.
    ++enqueued;
    pending_ = {true, c, c->seq++, data, bytes, type, root};
    fabric_.Deposit(c->group, pending_.seq, c->rank,
                    std::string(static_cast<const char*>(data), bytes));
    return NcclResult::kSuccess;
  }
  template <typename T>
  void Sum(const std::map<int, std::string>& deposits) {
    const int64_t n = pending_.bytes / static_cast<int64_t>(sizeof(T));
    std::vector<T> total(n, T{0});
    for (const auto& [rank, bytes] : deposits) {
      const T* v = reinterpret_cast<const T*>(bytes.data());
      for (int64_t i = 0; i < n; ++i) total[i] += v[i];
    }
    std::memcpy(pending_.data, total.data(), pending_.bytes);
  }

  FakeFabric& fabric_;
  std::vector<std::unique_ptr<FakeComm>> comms_;
  std::vector<Comm> aborted_;
  Pending pending_;
};

// Options with a fake clock that every poll-sleep advances: timeouts pass instantly.
}  // namespace spotrain::worker::testing_nccl

#endif  // SPOTRAIN_TESTS_SUPPORT_FAKE_NCCL_H_
