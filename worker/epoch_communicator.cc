#include "worker/epoch_communicator.h"

#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status_macros.h"

namespace spotrain::worker {

absl::StatusOr<std::unique_ptr<Communicator>> EpochCommunicatorFactory::Create(
    KeyValueClient& kv, const proto::Plan& plan, int rank, const GlooOptions& options) {
  const int64_t epoch = plan.epoch();
  if (!device_.cuda) return CreateGlooCommunicator(kv, epoch, rank, plan.world_size(), options);
  NcclOptions nccl;
  nccl.init_timeout = options.connect_timeout;
  nccl.op_timeout = options.op_timeout;
  nccl.max_chunk_bytes = options.max_chunk_bytes;
  nccl.cancelled = options.cancelled;

  std::unique_ptr<NcclCommunicator> parent = std::move(retired_);
  if (parent != nullptr && plan.shrink_from_epoch() == parent->epoch() &&
      plan.shrink_exclude_size() > 0) {
    const std::vector<int> exclude(plan.shrink_exclude().begin(), plan.shrink_exclude().end());
    ASSIGN_OR_RETURN(std::unique_ptr<NcclCommunicator> child,
                     parent->Shrink(exclude, kv, epoch, options.cancelled));
    if (child->rank() != rank || child->world_size() != plan.world_size()) {
      return absl::InternalError(absl::StrFormat(
          "epoch %d: shrinking epoch %d's NCCL communicator gave rank %d of %d, the plan says "
          "%d of %d",
          epoch, parent->epoch(), child->rank(), child->world_size(), rank, plan.world_size()));
    }
    SPOTRAIN_LOG(Info, "epoch %d: NCCL communicator %s from epoch %d (without its ranks %s)", epoch,
                 parent->last_shrink_reinitialised() ? "re-initialised" : "shrunk", parent->epoch(),
                 absl::StrJoin(exclude, ", "));
    return std::unique_ptr<Communicator>(std::move(child));
  }
  parent.reset();  // aborts its NCCL communicator, if it still holds one
  if (nccl_api_ == nullptr) {
    ASSIGN_OR_RETURN(std::unique_ptr<NcclApi> api,
                     CreateCudaNcclApi(device_.index, nccl.max_chunk_bytes));
    nccl_api_ = std::move(api);
  }
  ASSIGN_OR_RETURN(std::unique_ptr<NcclCommunicator> comm,
                   NcclCommunicator::Create(nccl_api_, kv, epoch, rank, plan.world_size(), nccl));
  return std::unique_ptr<Communicator>(std::move(comm));
}

void EpochCommunicatorFactory::Retire(std::unique_ptr<Communicator> comm) {
  retired_.reset();
  if (!device_.cuda || comm == nullptr) return;
  // On a GPU every communicator this factory makes is an NcclCommunicator.
  retired_.reset(static_cast<NcclCommunicator*>(comm.release()));
}

}  // namespace spotrain::worker
