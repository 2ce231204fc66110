// The NCCL (GPU) implementation of Communicator (DESIGN.md section 6), written against the
// NcclApi interface (worker/nccl_api.h) so that its state machine runs without CUDA in the
// unit tests; in a CUDA build it runs on CreateCudaNcclApi.
//
// Life of one communicator (one epoch):
//   - Create: rank 0 draws a unique id and publishes it in the key-value service under
//     "e<epoch>/nccl/id"; the other ranks wait for it (bounded by init_timeout; `cancelled`
//     polled). Then a non-blocking ncclCommInitRankConfig, polled until ready, failed, past
//     init_timeout (kDeadlineExceeded) or cancelled (kAborted).
//   - Operations (AllReduceSum, Broadcast, Barrier) enqueue the collective on the API's
//     stream and poll, every poll_interval: the stream, ncclCommGetAsyncError, the deadline
//     (op_timeout per chunk), the peer-lost flag and the abort flag. Nothing blocks for
//     longer than one poll interval, so no call waits forever (NCCL itself has no timeout).
//     On an async error, a deadline or a lost peer the communicator revokes its in-flight
//     work (ncclCommRevoke; ncclCommAbort when revoking fails or does not finish within
//     revoke_timeout) and fails for good: kUnavailable ("timed out" for the deadline).
//   - Loss: Shrink(exclude, ...) on every survivor, with the identical exclude list from the
//     Plan, builds the next epoch's communicator with ncclCommShrink, then aborts this one.
//     The survivors agree through the key-value service whether every shrink succeeded;
//     if any failed, all abort and re-init with a fresh unique id ("e<epoch>/nccl/reinit").
//   - Growth: NCCL 2.28 has no grow call. Old and new ranks call Create for the new epoch
//     (this communicator stays usable meanwhile); the caller switches at the planned step
//     and destroys the old one.
//   - Destruction aborts the NCCL communicator if it still holds one (never Finalize: it
//     may block, and it is invalid after a revoke).
//
// Threading (the Communicator contract): one owner thread calls the operations, Shrink and
// the destructor. Abort() and MarkPeerLost() may be called from any thread at any time; they
// take the mutex every NCCL call runs under, so they never run inside another NCCL call
// (calls are non-blocking, so the wait is short). rank(), world_size(), status() from any
// thread.
//
// Buffers: device pointers are used in place; host pointers are staged by the NcclApi
// (bounded by max_chunk_bytes per chunk). Status codes as worker/communicator.h, plus
// kDeadlineExceeded from Create/Shrink when a peer never arrived in time.
#ifndef SPOTRAIN_WORKER_NCCL_COMMUNICATOR_H_
#define SPOTRAIN_WORKER_NCCL_COMMUNICATOR_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "worker/communicator.h"
#include "worker/nccl_api.h"
#include "worker/rendezvous_store.h"

namespace spotrain::worker {

struct NcclOptions {
  // Bound on the rendezvous (the unique id, the shrink agreement) and on communicator
  // initialisation or shrinking.
  absl::Duration init_timeout = absl::Seconds(60);
  // A collective chunk that has not completed after this long fails with kUnavailable
  // ("timed out").
  absl::Duration op_timeout = absl::Seconds(60);
  // How long a revoke may take before the communicator is aborted instead.
  absl::Duration revoke_timeout = absl::Seconds(5);
  // Sleep between two polls of the stream and of NCCL's state.
  absl::Duration poll_interval = absl::Microseconds(50);
  // Large buffers are issued as collectives of at most this many bytes.
  int64_t max_chunk_bytes = int64_t{64} << 20;
  // Optional: polled while waiting in Create / Shrink; true makes them fail with kAborted.
  std::function<bool()> cancelled;
  // Time source and sleep (tests pass a FakeClock and a sleep that advances it).
  common::Clock* clock = nullptr;             // default: RealClock
  std::function<void(absl::Duration)> sleep;  // default: absl::SleepFor
};

// The key-value keys (under the epoch's prefix) where the unique ids live.
std::string NcclIdKey(int64_t epoch);
std::string NcclReinitIdKey(int64_t epoch);

class NcclCommunicator : public Communicator {
 public:
  // Builds rank `rank` of a `world_size`-rank communicator for `epoch` (every rank calls
  // this with the same epoch and world size). Blocks (polling) until the communicator is
  // ready. World size 1 uses no key-value service. `api` is shared with the communicators
  // derived from this one (Shrink). Errors: kInvalidArgument for bad arguments;
  // kDeadlineExceeded when the id or the peers did not arrive within init_timeout;
  // kAborted when cancelled; kUnavailable when NCCL reported an error (message says which).
  static absl::StatusOr<std::unique_ptr<NcclCommunicator>> Create(std::shared_ptr<NcclApi> api,
                                                                  KeyValueClient& kv, int64_t epoch,
                                                                  int rank, int world_size,
                                                                  const NcclOptions& options);

  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  absl::Status AllReduceSum(float* data, int64_t n) override;
  absl::Status AllReduceSum(int64_t* data, int64_t n) override;
  absl::Status Broadcast(void* data, int64_t bytes, int root) override;
  // A one-element int64 all-reduce (NCCL has no barrier); uses a buffer of its own.
  absl::Status Barrier() override;
  // Aborts the NCCL communicator now (from any thread): the operation in progress returns
  // kAborted at its next poll, later ones at once; Shrink then re-inits.
  void Abort() override;
  absl::Status status() const override;
  bool accepts_device_memory() const override { return true; }

  // The coordinator says a peer of this epoch is gone: the operation in progress (or the
  // next one) revokes its work and fails with kUnavailable. Any thread; idempotent.
  void MarkPeerLost();
  // A new epoch is coming: as MarkPeerLost, so that the communicator is revoked rather than
  // aborted and can still be shrunk into the next epoch.
  void Interrupt() override { MarkPeerLost(); }

  // Builds the communicator of `new_epoch` without the ranks in `exclude` (ranks of this
  // communicator; the same list on every survivor; this rank must not be in it): revokes
  // this one if needed, ncclCommShrink, agrees with the survivors through `kv` (the new
  // epoch's key-value service), aborts this one. When a shrink failed anywhere (or this
  // communicator was aborted), every survivor re-inits with a fresh id instead. This
  // communicator is unusable afterwards (kAborted). Owner thread only.
  // `cancelled` (optional) replaces NcclOptions::cancelled for the new epoch: polled while
  // shrinking, agreeing and re-initialising, and kept by the result.
  absl::StatusOr<std::unique_ptr<NcclCommunicator>> Shrink(const std::vector<int>& exclude,
                                                           KeyValueClient& kv, int64_t new_epoch,
                                                           std::function<bool()> cancelled = {});

  // How the last Shrink built its result (for logs and tests): true when it had to re-init.
  bool last_shrink_reinitialised() const { return last_shrink_reinitialised_; }
  int64_t epoch() const { return epoch_; }

 private:
  enum class Wait { kDone, kFailed, kAborted, kPeerLost, kTimedOut, kCancelled };

  NcclCommunicator(std::shared_ptr<NcclApi> api, int64_t epoch, int rank, int world_size,
                   const NcclOptions& options);

  // Creates the NCCL communicator from `id` (init) and waits for it to be ready.
  absl::Status Initialise(const std::string& id);
  // Takes ownership of an already started (shrunk) communicator and waits for it.
  // `cancelled` (may be empty) is polled while waiting.
  absl::Status Adopt(NcclApi::Comm comm, const std::function<bool()>& cancelled);
  // Polls the communicator until it leaves kInProgress (and, with `stream`, until the
  // stream is idle), or the deadline passes, or it is aborted / a peer is lost /
  // `cancelled` (may be empty) returns true.
  Wait Poll(absl::Time deadline, bool stream, const std::function<bool()>& cancelled,
            std::string* error);
  // One collective chunk, enqueued by `enqueue` under api_mu_.
  absl::Status RunOperation(const char* what,
                            const std::function<NcclResult(NcclApi::Comm)>& enqueue);
  absl::Status AllReduce(void* data, int64_t n, int64_t element_bytes, NcclDataType type);
  // Revokes in-flight work after a failure (abort when revoking fails or takes too long)
  // and makes `error` the sticky status.
  absl::Status FailWith(absl::Status error);
  // Aborts the NCCL communicator if still held. Requires api_mu_.
  void AbortCommLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(api_mu_);
  void SetStatus(absl::Status s) ABSL_LOCKS_EXCLUDED(status_mu_);
  absl::Status Sleep();

  const std::shared_ptr<NcclApi> api_;
  const int64_t epoch_;
  const int rank_;
  const int world_size_;
  const NcclOptions options_;
  common::Clock* const clock_;

  absl::Mutex& api_mu_;  // api_->mu(): held around every NcclApi call
  NcclApi::Comm comm_ ABSL_GUARDED_BY(api_mu_) = nullptr;
  bool revoked_ ABSL_GUARDED_BY(api_mu_) = false;

  std::atomic<bool> aborted_{false};
  std::atomic<bool> peer_lost_{false};
  mutable absl::Mutex status_mu_;
  absl::Status status_ ABSL_GUARDED_BY(status_mu_);
  bool last_shrink_reinitialised_ = false;
};

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_NCCL_COMMUNICATOR_H_
