// Builds the communicator of one epoch for the device the trainer computes on: Gloo over TCP
// for the CPU, NCCL for a GPU (DESIGN.md section 6). The NCCL library state (worker/nccl_api.h:
// the device, its collective stream and staging buffers) is created once per process, on the
// first GPU epoch, and shared by every later epoch's communicator.
//
// Each epoch builds a fresh communicator with a fresh unique id (published through the
// coordinator's key-value service under the epoch): the re-init path of a shrink. Growth
// needs a new communicator in NCCL 2.28 anyway.
//
// Thread-safety: one thread (the trainer's) calls Create.
#ifndef SPOTRAIN_WORKER_EPOCH_COMMUNICATOR_H_
#define SPOTRAIN_WORKER_EPOCH_COMMUNICATOR_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "worker/communicator.h"
#include "worker/gloo_communicator.h"
#include "worker/nccl_api.h"
#include "worker/rendezvous_store.h"
#include "worker/trainer.h"

namespace spotrain::worker {

class EpochCommunicatorFactory {
 public:
  explicit EpochCommunicatorFactory(const TrainerDevice& device) : device_(device) {}

  // Rank `rank` of `world_size` for `epoch`. `options` are Gloo's; for NCCL its
  // connect_timeout bounds the rendezvous and initialisation, op_timeout each collective,
  // and `cancelled` is polled the same way. Errors: the backend's Create errors
  // (kFailedPrecondition for a GPU in a build without NCCL).
  absl::StatusOr<std::unique_ptr<Communicator>> Create(KeyValueClient& kv, int64_t epoch, int rank,
                                                       int world_size, const GlooOptions& options);

 private:
  const TrainerDevice device_;
  std::shared_ptr<NcclApi> nccl_api_;
};

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_EPOCH_COMMUNICATOR_H_
