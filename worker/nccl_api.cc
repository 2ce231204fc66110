// The parts of worker/nccl_api.h that need no CUDA: result names, and CreateCudaNcclApi for
// builds without NCCL (the real one is in nccl_api.cu). Thread-safe: pure functions.
#include "worker/nccl_api.h"

namespace spotrain::worker {

const char* NcclResultName(NcclResult result) {
  switch (result) {
    case NcclResult::kSuccess:
      return "ncclSuccess";
    case NcclResult::kUnhandledCudaError:
      return "ncclUnhandledCudaError";
    case NcclResult::kSystemError:
      return "ncclSystemError";
    case NcclResult::kInternalError:
      return "ncclInternalError";
    case NcclResult::kInvalidArgument:
      return "ncclInvalidArgument";
    case NcclResult::kInvalidUsage:
      return "ncclInvalidUsage";
    case NcclResult::kRemoteError:
      return "ncclRemoteError";
    case NcclResult::kInProgress:
      return "ncclInProgress";
  }
  return "ncclUnknownResult";
}

#if !defined(SPOTRAIN_HAVE_NCCL)
absl::StatusOr<std::unique_ptr<NcclApi>> CreateCudaNcclApi(int device, int64_t max_chunk_bytes) {
  (void)device;
  (void)max_chunk_bytes;
  return absl::FailedPreconditionError(
      "this build has no NCCL (configure with the CUDA toolkit and NCCL >= 2.28 present)");
}
#endif

}  // namespace spotrain::worker
