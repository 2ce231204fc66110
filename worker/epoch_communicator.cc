#include "worker/epoch_communicator.h"

#include <utility>

#include "common/status_macros.h"
#include "worker/nccl_communicator.h"

namespace spotrain::worker {

absl::StatusOr<std::unique_ptr<Communicator>> EpochCommunicatorFactory::Create(
    KeyValueClient& kv, int64_t epoch, int rank, int world_size, const GlooOptions& options) {
  if (!device_.cuda) return CreateGlooCommunicator(kv, epoch, rank, world_size, options);
  NcclOptions nccl;
  nccl.init_timeout = options.connect_timeout;
  nccl.op_timeout = options.op_timeout;
  nccl.max_chunk_bytes = options.max_chunk_bytes;
  nccl.cancelled = options.cancelled;
  if (nccl_api_ == nullptr) {
    ASSIGN_OR_RETURN(std::unique_ptr<NcclApi> api,
                     CreateCudaNcclApi(device_.index, nccl.max_chunk_bytes));
    nccl_api_ = std::move(api);
  }
  ASSIGN_OR_RETURN(std::unique_ptr<NcclCommunicator> comm,
                   NcclCommunicator::Create(nccl_api_, kv, epoch, rank, world_size, nccl));
  return std::unique_ptr<Communicator>(std::move(comm));
}

}  // namespace spotrain::worker
