#include "worker/nccl_communicator.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "common/status_macros.h"

namespace spotrain::worker {

std::string NcclIdKey(int64_t epoch) { return absl::StrCat(EpochKeyPrefix(epoch), "nccl/id"); }
std::string NcclReinitIdKey(int64_t epoch) {
  return absl::StrCat(EpochKeyPrefix(epoch), "nccl/reinit");
}

namespace {

bool Started(NcclResult r) { return r == NcclResult::kSuccess || r == NcclResult::kInProgress; }

// Waits for `key` until `deadline` (on `clock`), polling `cancelled`. Each key-value wait is
// short so that cancellation is noticed; `sleep` lets a fake clock move between tries.
absl::StatusOr<std::string> WaitForKey(KeyValueClient& kv, const std::string& key,
                                       absl::Time deadline, const NcclOptions& options,
                                       common::Clock& clock,
                                       const std::function<void(absl::Duration)>& sleep) {
  while (true) {
    if (options.cancelled && options.cancelled()) {
      return absl::AbortedError(absl::StrCat("cancelled while waiting for '", key, "'"));
    }
    const absl::Duration left = deadline - clock.Now();
    if (left <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError(absl::StrCat("'", key, "' was not published within ",
                                                      absl::FormatDuration(options.init_timeout),
                                                      " (a peer of the epoch never arrived)"));
    }
    auto value = kv.Get(key, std::min(left, absl::Milliseconds(100)));
    if (value.ok()) return value;
    if (!absl::IsDeadlineExceeded(value.status())) return value.status();
    sleep(options.poll_interval);
  }
}

// Rank 0 draws a unique id and publishes it under `key`; the others wait for it.
absl::StatusOr<std::string> ExchangeId(NcclApi& api, absl::Mutex& api_mu, KeyValueClient& kv,
                                       const std::string& key, int rank, int world_size,
                                       const NcclOptions& options, common::Clock& clock,
                                       const std::function<void(absl::Duration)>& sleep) {
  if (rank == 0) {
    std::string id;
    NcclResult r;
    {
      absl::MutexLock lock(&api_mu);
      r = api.GetUniqueId(&id);
      if (r != NcclResult::kSuccess) {
        return absl::UnavailableError(
            absl::StrCat("ncclGetUniqueId: ", api.ErrorString(r, nullptr)));
      }
    }
    if (world_size > 1) RETURN_IF_ERROR(kv.Set(key, id));
    return id;
  }
  return WaitForKey(kv, key, clock.Now() + options.init_timeout, options, clock, sleep);
}

}  // namespace

NcclCommunicator::NcclCommunicator(std::shared_ptr<NcclApi> api, int64_t epoch, int rank,
                                   int world_size, const NcclOptions& options)
    : api_(std::move(api)),
      epoch_(epoch),
      rank_(rank),
      world_size_(world_size),
      options_(options),
      clock_(options.clock != nullptr ? options.clock : common::RealClock::Get()),
      api_mu_(api_->mu()) {}

NcclCommunicator::~NcclCommunicator() {
  absl::MutexLock lock(&api_mu_);
  AbortCommLocked();
}

absl::StatusOr<std::unique_ptr<NcclCommunicator>> NcclCommunicator::Create(
    std::shared_ptr<NcclApi> api, KeyValueClient& kv, int64_t epoch, int rank, int world_size,
    const NcclOptions& options) {
  if (api == nullptr) return absl::InvalidArgumentError("NcclCommunicator: no NCCL API");
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(
        absl::StrFormat("NcclCommunicator: rank %d of world size %d", rank, world_size));
  }
  if (options.max_chunk_bytes < 8) {
    return absl::InvalidArgumentError("NcclCommunicator: max_chunk_bytes below 8");
  }
  std::unique_ptr<NcclCommunicator> comm(
      new NcclCommunicator(std::move(api), epoch, rank, world_size, options));
  ASSIGN_OR_RETURN(
      std::string id,
      ExchangeId(*comm->api_, comm->api_mu_, kv, NcclIdKey(epoch), rank, world_size, options,
                 *comm->clock_, [c = comm.get()](absl::Duration) { c->Sleep().IgnoreError(); }));
  RETURN_IF_ERROR(comm->Initialise(id));
  return comm;
}

absl::Status NcclCommunicator::Sleep() {
  if (options_.sleep) {
    options_.sleep(options_.poll_interval);
  } else {
    absl::SleepFor(options_.poll_interval);
  }
  return absl::OkStatus();
}

absl::Status NcclCommunicator::Initialise(const std::string& id) {
  if (static_cast<int>(id.size()) != NcclApi::kUniqueIdBytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("NCCL unique id of epoch %d has %d bytes, expected %d", epoch_, id.size(),
                        NcclApi::kUniqueIdBytes));
  }
  NcclApi::Comm comm = nullptr;
  NcclResult r;
  {
    absl::MutexLock lock(&api_mu_);
    r = api_->CommInitRank(&comm, world_size_, id, rank_);
    if (!Started(r)) {
      std::string text = api_->ErrorString(r, comm);
      if (comm != nullptr) api_->CommAbort(comm);
      return absl::UnavailableError(
          absl::StrFormat("ncclCommInitRankConfig (epoch %d, rank %d of %d): %s", epoch_, rank_,
                          world_size_, text));
    }
  }
  return Adopt(comm, options_.cancelled);
}

absl::Status NcclCommunicator::Adopt(NcclApi::Comm comm, const std::function<bool()>& cancelled) {
  {
    absl::MutexLock lock(&api_mu_);
    comm_ = comm;
    // An Abort() that came first still wins.
    if (aborted_) AbortCommLocked();
  }
  std::string error;
  const Wait w = Poll(clock_->Now() + options_.init_timeout, /*stream=*/false, cancelled, &error);
  absl::Status result;
  switch (w) {
    case Wait::kDone:
      return absl::OkStatus();
    case Wait::kFailed:
      result = absl::UnavailableError(
          absl::StrFormat("NCCL communicator of epoch %d (rank %d of %d) failed to initialise: %s",
                          epoch_, rank_, world_size_, error));
      break;
    case Wait::kTimedOut:
      result = absl::DeadlineExceededError(absl::StrFormat(
          "NCCL communicator of epoch %d (rank %d of %d) not ready within %s (a peer never "
          "joined)",
          epoch_, rank_, world_size_, absl::FormatDuration(options_.init_timeout)));
      break;
    case Wait::kCancelled:
    case Wait::kAborted:
      result = absl::AbortedError(
          absl::StrFormat("NCCL communicator of epoch %d: initialisation aborted", epoch_));
      break;
    case Wait::kPeerLost:
      result = absl::UnavailableError(absl::StrFormat(
          "NCCL communicator of epoch %d: a peer was lost during initialisation", epoch_));
      break;
  }
  SetStatus(result);
  absl::MutexLock lock(&api_mu_);
  AbortCommLocked();
  return result;
}

NcclCommunicator::Wait NcclCommunicator::Poll(absl::Time deadline, bool stream,
                                              const std::function<bool()>& cancelled,
                                              std::string* error) {
  while (true) {
    if (aborted_) return Wait::kAborted;
    {
      absl::MutexLock lock(&api_mu_);
      if (comm_ == nullptr) return Wait::kAborted;
      NcclResult state = NcclResult::kSuccess;
      const NcclResult r = api_->CommGetAsyncError(comm_, &state);
      if (r != NcclResult::kSuccess) {
        *error = absl::StrCat("ncclCommGetAsyncError: ", api_->ErrorString(r, comm_));
        return Wait::kFailed;
      }
      if (state != NcclResult::kSuccess && state != NcclResult::kInProgress) {
        *error = api_->ErrorString(state, comm_);
        return Wait::kFailed;
      }
      if (state == NcclResult::kSuccess) {
        if (!stream) return Wait::kDone;
        std::string stream_error;
        const StreamState s = api_->QueryStream(&stream_error);
        if (s == StreamState::kIdle) return Wait::kDone;
        if (s == StreamState::kError) {
          *error = absl::StrCat("CUDA stream: ", stream_error);
          return Wait::kFailed;
        }
      }
    }
    if (peer_lost_) return Wait::kPeerLost;
    if (cancelled && cancelled()) return Wait::kCancelled;
    if (clock_->Now() >= deadline) return Wait::kTimedOut;
    Sleep().IgnoreError();
  }
}

void NcclCommunicator::AbortCommLocked() {
  if (comm_ == nullptr) return;
  const NcclResult r = api_->CommAbort(comm_);
  if (r != NcclResult::kSuccess && r != NcclResult::kInProgress) {
    SPOTRAIN_LOG(Warning, "ncclCommAbort (epoch %d): %s", epoch_, NcclResultName(r));
  }
  comm_ = nullptr;
  revoked_ = false;
}

void NcclCommunicator::SetStatus(absl::Status s) {
  absl::MutexLock lock(&status_mu_);
  if (status_.ok()) status_ = std::move(s);
}

absl::Status NcclCommunicator::status() const {
  absl::MutexLock lock(&status_mu_);
  return status_;
}

void NcclCommunicator::Abort() {
  aborted_ = true;
  SetStatus(absl::AbortedError(absl::StrFormat("NCCL communicator of epoch %d aborted", epoch_)));
  absl::MutexLock lock(&api_mu_);
  AbortCommLocked();
}

void NcclCommunicator::MarkPeerLost() { peer_lost_ = true; }

absl::Status NcclCommunicator::FailWith(absl::Status error) {
  SetStatus(error);
  // Stop the in-flight kernels (NCCL would spin forever) but keep the communicator for a
  // shrink; abort it when revoking does not work.
  {
    absl::MutexLock lock(&api_mu_);
    if (comm_ == nullptr || revoked_) return status();
    const NcclResult r = api_->CommRevoke(comm_);
    if (!Started(r)) {
      SPOTRAIN_LOG(Warning, "ncclCommRevoke (epoch %d): %s; aborting", epoch_,
                   api_->ErrorString(r, comm_));
      AbortCommLocked();
      return status();
    }
    revoked_ = true;
  }
  const absl::Time deadline = clock_->Now() + options_.revoke_timeout;
  while (true) {
    {
      absl::MutexLock lock(&api_mu_);
      if (comm_ == nullptr) break;
      NcclResult state = NcclResult::kSuccess;
      const NcclResult r = api_->CommGetAsyncError(comm_, &state);
      if (r != NcclResult::kSuccess) {
        AbortCommLocked();
        break;
      }
      if (state != NcclResult::kInProgress) break;  // quiescent (success or the error)
      if (clock_->Now() >= deadline) {
        SPOTRAIN_LOG(Warning, "ncclCommRevoke (epoch %d) not done within %s; aborting", epoch_,
                     absl::FormatDuration(options_.revoke_timeout));
        AbortCommLocked();
        break;
      }
    }
    Sleep().IgnoreError();
  }
  return status();
}

absl::Status NcclCommunicator::RunOperation(
    const char* what, const std::function<NcclResult(NcclApi::Comm)>& enqueue) {
  RETURN_IF_ERROR(status());
  if (peer_lost_) {
    return FailWith(absl::UnavailableError(
        absl::StrFormat("%s: a peer of epoch %d was lost (coordinator)", what, epoch_)));
  }
  std::string error;
  {
    absl::MutexLock lock(&api_mu_);
    if (comm_ == nullptr) {
      SetStatus(
          absl::AbortedError(absl::StrFormat("NCCL communicator of epoch %d aborted", epoch_)));
      return status();
    }
    const NcclResult r = enqueue(comm_);
    if (!Started(r)) error = api_->ErrorString(r, comm_);
  }
  if (!error.empty()) {
    return FailWith(absl::UnavailableError(absl::StrCat(what, ": ", error)));
  }
  const Wait w = Poll(clock_->Now() + options_.op_timeout, /*stream=*/true, nullptr, &error);
  switch (w) {
    case Wait::kDone: {
      absl::MutexLock lock(&api_mu_);
      api_->FinishOperation();
      return absl::OkStatus();
    }
    case Wait::kAborted:
    case Wait::kCancelled:
      SetStatus(
          absl::AbortedError(absl::StrFormat("NCCL communicator of epoch %d aborted", epoch_)));
      return status();
    case Wait::kFailed:
      return FailWith(
          absl::UnavailableError(absl::StrFormat("%s (epoch %d): %s", what, epoch_, error)));
    case Wait::kPeerLost:
      return FailWith(absl::UnavailableError(
          absl::StrFormat("%s: a peer of epoch %d was lost (coordinator)", what, epoch_)));
    case Wait::kTimedOut:
      return FailWith(
          absl::UnavailableError(absl::StrFormat("%s (epoch %d) timed out after %s", what, epoch_,
                                                 absl::FormatDuration(options_.op_timeout))));
  }
  return absl::InternalError("unreachable");
}

absl::Status NcclCommunicator::AllReduce(void* data, int64_t n, int64_t element_bytes,
                                         NcclDataType type) {
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat("AllReduceSum: count ", n));
  if (n == 0) return status();
  if (data == nullptr) return absl::InvalidArgumentError("AllReduceSum: null buffer");
  const int64_t chunk = std::max<int64_t>(1, options_.max_chunk_bytes / element_bytes);
  char* bytes = static_cast<char*>(data);
  for (int64_t offset = 0; offset < n; offset += chunk) {
    const int64_t count = std::min(chunk, n - offset);
    void* at = bytes + offset * element_bytes;
    RETURN_IF_ERROR(RunOperation("ncclAllReduce", [&](NcclApi::Comm comm) {
      return api_->AllReduceSum(comm, at, count, type);
    }));
  }
  return absl::OkStatus();
}

absl::Status NcclCommunicator::AllReduceSum(float* data, int64_t n) {
  return AllReduce(data, n, sizeof(float), NcclDataType::kFloat32);
}

absl::Status NcclCommunicator::AllReduceSum(int64_t* data, int64_t n) {
  return AllReduce(data, n, sizeof(int64_t), NcclDataType::kInt64);
}

absl::Status NcclCommunicator::Broadcast(void* data, int64_t bytes, int root) {
  if (bytes < 0) return absl::InvalidArgumentError(absl::StrCat("Broadcast: bytes ", bytes));
  if (root < 0 || root >= world_size_) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Broadcast: root %d of world size %d", root, world_size_));
  }
  if (bytes == 0) return status();
  if (data == nullptr) return absl::InvalidArgumentError("Broadcast: null buffer");
  char* p = static_cast<char*>(data);
  for (int64_t offset = 0; offset < bytes; offset += options_.max_chunk_bytes) {
    const int64_t len = std::min(options_.max_chunk_bytes, bytes - offset);
    void* at = p + offset;
    RETURN_IF_ERROR(RunOperation(
        "ncclBroadcast", [&](NcclApi::Comm comm) { return api_->Broadcast(comm, at, len, root); }));
  }
  return absl::OkStatus();
}

absl::Status NcclCommunicator::Barrier() {
  int64_t one = 1;
  return AllReduceSum(&one, 1);
}

absl::StatusOr<std::unique_ptr<NcclCommunicator>> NcclCommunicator::Shrink(
    const std::vector<int>& exclude, KeyValueClient& kv, int64_t new_epoch,
    std::function<bool()> cancelled) {
  // The new epoch's options: this communicator's, with the new epoch's cancellation.
  NcclOptions next = options_;
  if (cancelled) next.cancelled = std::move(cancelled);
  std::vector<int> excluded = exclude;
  std::sort(excluded.begin(), excluded.end());
  excluded.erase(std::unique(excluded.begin(), excluded.end()), excluded.end());
  for (int r : excluded) {
    if (r < 0 || r >= world_size_) {
      return absl::InvalidArgumentError(
          absl::StrFormat("Shrink: excluded rank %d not in [0, %d)", r, world_size_));
    }
    if (r == rank_) return absl::InvalidArgumentError("Shrink: this rank is excluded");
  }
  if (new_epoch <= epoch_) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Shrink: new epoch %d is not after %d", new_epoch, epoch_));
  }
  const int new_world = world_size_ - static_cast<int>(excluded.size());
  const int new_rank =
      rank_ - static_cast<int>(std::lower_bound(excluded.begin(), excluded.end(), rank_) -
                               excluded.begin());
  last_shrink_reinitialised_ = false;

  // 1. Quiesce this communicator (revoke: in-flight kernels stop), then shrink it. Each
  // survivor publishes whether its shrink worked under "e<new>/nccl/shrink/<new rank>"; a
  // survivor whose shrink is still initialising gives up as soon as another one reports a
  // failure (its own shrink would only time out).
  const std::string prefix = absl::StrCat(EpochKeyPrefix(new_epoch), "nccl/shrink/");
  auto publish = [&](bool ok) -> absl::Status {
    if (new_world == 1) return absl::OkStatus();
    return kv.Set(absl::StrCat(prefix, new_rank), ok ? "ok" : "failed");
  };
  absl::Time next_check = clock_->Now();
  auto peer_failed = [&]() -> bool {
    if (next.cancelled && next.cancelled()) return true;
    if (new_world == 1 || clock_->Now() < next_check) return false;
    next_check = clock_->Now() + absl::Milliseconds(100);
    for (int r = 0; r < new_world; ++r) {
      if (r == new_rank) continue;
      auto value = kv.Get(absl::StrCat(prefix, r), absl::ZeroDuration());
      if (value.ok() && *value != "ok") return true;
    }
    return false;
  };
  std::unique_ptr<NcclCommunicator> child(
      new NcclCommunicator(api_, new_epoch, new_rank, new_world, next));
  absl::Status shrunk = absl::UnavailableError("the parent communicator was aborted");
  {
    bool held;
    {
      absl::MutexLock lock(&api_mu_);
      held = comm_ != nullptr;
    }
    if (held && !aborted_) {
      FailWith(absl::AbortedError(absl::StrFormat(
                   "NCCL communicator of epoch %d shrunk into epoch %d", epoch_, new_epoch)))
          .IgnoreError();
    }
    NcclApi::Comm child_comm = nullptr;
    std::string error;
    {
      absl::MutexLock lock(&api_mu_);
      if (comm_ != nullptr && !aborted_) {
        const NcclResult r = api_->CommShrink(comm_, excluded, &child_comm);
        if (!Started(r)) {
          error = api_->ErrorString(r, comm_);
          if (child_comm != nullptr) api_->CommAbort(child_comm);
          child_comm = nullptr;
        }
      }
    }
    if (child_comm != nullptr) {
      shrunk = child->Adopt(child_comm, peer_failed);
    } else if (!error.empty()) {
      shrunk = absl::UnavailableError(absl::StrCat("ncclCommShrink: ", error));
    }
  }
  // The parent is not needed any more, whatever happened (never Finalize after a revoke).
  {
    absl::MutexLock lock(&api_mu_);
    AbortCommLocked();
  }
  aborted_ = true;
  SetStatus(absl::AbortedError(
      absl::StrFormat("NCCL communicator of epoch %d replaced by epoch %d", epoch_, new_epoch)));
  if (!shrunk.ok()) {
    SPOTRAIN_LOG(Warning, "epoch %d: ncclCommShrink failed here: %s", new_epoch, shrunk.ToString());
  }
  if (next.cancelled && next.cancelled()) {
    return absl::AbortedError(absl::StrFormat("shrink into epoch %d cancelled", new_epoch));
  }
  RETURN_IF_ERROR(publish(shrunk.ok()));

  // 2. Agree with the other survivors: keep the shrunk communicators only if all worked.
  bool all_ok = shrunk.ok();
  if (new_world > 1) {
    const absl::Time deadline = clock_->Now() + next.init_timeout;
    for (int r = 0; r < new_world; ++r) {
      if (r == new_rank) continue;
      auto value = WaitForKey(kv, absl::StrCat(prefix, r), deadline, next, *clock_,
                              [this](absl::Duration) { Sleep().IgnoreError(); });
      if (!value.ok()) {
        if (absl::IsAborted(value.status())) return value.status();
        return absl::Status(value.status().code(),
                            absl::StrCat("shrink agreement: ", value.status().message()));
      }
      if (*value != "ok") all_ok = false;
    }
  }
  if (all_ok) return child;

  // 3. Some shrink failed: everyone starts over with a fresh id.
  child.reset();
  last_shrink_reinitialised_ = true;
  SPOTRAIN_LOG(Info, "epoch %d: a shrink failed; re-initialising NCCL with a fresh id", new_epoch);
  std::unique_ptr<NcclCommunicator> fresh(
      new NcclCommunicator(api_, new_epoch, new_rank, new_world, next));
  ASSIGN_OR_RETURN(std::string id, ExchangeId(*api_, api_->mu(), kv, NcclReinitIdKey(new_epoch),
                                              new_rank, new_world, next, *clock_,
                                              [this](absl::Duration) { Sleep().IgnoreError(); }));
  RETURN_IF_ERROR(fresh->Initialise(id));
  return fresh;
}

}  // namespace spotrain::worker
