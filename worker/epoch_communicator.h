// Builds the communicator of one epoch for the device the trainer computes on: Gloo over TCP
// for the CPU, NCCL for a GPU (DESIGN.md section 6). The NCCL library state (worker/nccl_api.h:
// the device, its collective stream and staging buffers) is created once per process, on the
// first GPU epoch, and shared by every later epoch's communicator.
//
// NCCL: when the Plan says the epoch only removes ranks of the previous one
// (Plan.shrink_from_epoch, set by the coordinator, coordinator/planner.h DecideShrink) and
// this process still holds that epoch's communicator (Retire), every survivor shrinks it
// (ncclCommShrink, excluding Plan.shrink_exclude); the survivors agree through the key-value
// service, and if any shrink failed (or a communicator had been aborted) they all
// re-initialise with a fresh id (worker/nccl_communicator.h). Otherwise, and always for
// growth, a new communicator is built with a fresh unique id published under the epoch.
//
// Thread-safety: one thread (the trainer's) calls Create and Retire.
#ifndef SPOTRAIN_WORKER_EPOCH_COMMUNICATOR_H_
#define SPOTRAIN_WORKER_EPOCH_COMMUNICATOR_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "proto/spotrain.pb.h"
#include "worker/communicator.h"
#include "worker/gloo_communicator.h"
#include "worker/nccl_api.h"
#include "worker/nccl_communicator.h"
#include "worker/rendezvous_store.h"
#include "worker/trainer.h"

namespace spotrain::worker {

class EpochCommunicatorFactory {
 public:
  // `nccl_api`: tests pass a fake; by default the real one is created on the first GPU epoch.
  explicit EpochCommunicatorFactory(const TrainerDevice& device,
                                    std::shared_ptr<NcclApi> nccl_api = nullptr)
      : device_(device), nccl_api_(std::move(nccl_api)) {}

  // Rank `rank` of `plan` (its epoch, world size and shrink fields). `options` are Gloo's;
  // for NCCL its connect_timeout bounds the rendezvous and initialisation, op_timeout each
  // collective, and `cancelled` is polled the same way. Errors: the backend's Create (or
  // Shrink) errors (kFailedPrecondition for a GPU in a build without NCCL); kInternal when a
  // shrink gives another rank than the Plan's (a coordinator bug).
  absl::StatusOr<std::unique_ptr<Communicator>> Create(KeyValueClient& kv, const proto::Plan& plan,
                                                       int rank, const GlooOptions& options);

  // The epoch of `comm` is over: an NCCL communicator is kept (failed or not) until the next
  // Create, which may shrink it; anything else is destroyed now.
  void Retire(std::unique_ptr<Communicator> comm);

 private:
  const TrainerDevice device_;
  std::shared_ptr<NcclApi> nccl_api_;
  std::unique_ptr<NcclCommunicator> retired_;  // NCCL only
};

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_EPOCH_COMMUNICATOR_H_
