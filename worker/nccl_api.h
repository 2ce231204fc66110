// The small slice of NCCL (and of the CUDA stream it runs on) that the NCCL communicator
// (worker/nccl_communicator.h) uses, as an interface without any CUDA or NCCL type, so that
// the communicator's state machine compiles and is unit-tested on machines without CUDA
// (tests/unit/worker/nccl_communicator_test.cc drives it with a fake). The real
// implementation, CreateCudaNcclApi, lives in worker/nccl_api.cu (CUDA builds with NCCL).
//
// Every communicator is created non-blocking (ncclConfig_t::blocking = 0): no call here waits
// for a peer. Calls that start something (init, shrink, revoke, a collective) may return
// kInProgress; the caller then polls CommGetAsyncError until it is no longer kInProgress
// (NCCL 2.28 semantics).
//
// Threading: one NcclApi serves one device and one stream; the communicators built on it
// share both. Its methods are not thread-safe: callers hold mu() around every call (the
// communicators built on one NcclApi all do), so that Abort() from another thread never runs
// while the owner thread is inside an NCCL call, as NCCL requires.
#ifndef SPOTRAIN_WORKER_NCCL_API_H_
#define SPOTRAIN_WORKER_NCCL_API_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace spotrain::worker {

// ncclResult_t, with the same numeric values (nccl.h, 2.28).
enum class NcclResult : int {
  kSuccess = 0,
  kUnhandledCudaError = 1,
  kSystemError = 2,
  kInternalError = 3,
  kInvalidArgument = 4,
  kInvalidUsage = 5,
  kRemoteError = 6,
  kInProgress = 7,
};

enum class NcclDataType { kFloat32, kInt64, kUint8 };

// What the stream the collectives run on has done.
enum class StreamState { kIdle, kBusy, kError };

class NcclApi {
 public:
  // An opaque communicator handle (ncclComm_t); nullptr is "none".
  using Comm = void*;
  // ncclUniqueId as bytes (NCCL_UNIQUE_ID_BYTES = 128).
  static constexpr int kUniqueIdBytes = 128;

  virtual ~NcclApi() = default;

  // The device the communicators run on (the CUDA ordinal).
  virtual int device() const = 0;

  // ncclGetUniqueId: a fresh id (kUniqueIdBytes bytes) for a new communicator.
  virtual NcclResult GetUniqueId(std::string* id) = 0;
  // ncclCommInitRankConfig with blocking = 0 on this device. Returns kSuccess or kInProgress
  // (poll CommGetAsyncError) and sets *comm, or an error (then *comm may still need Abort).
  virtual NcclResult CommInitRank(Comm* comm, int nranks, const std::string& id, int rank) = 0;
  // ncclCommShrink(parent, exclude, ..., NCCL_SHRINK_DEFAULT) with blocking = 0: the child
  // holds the parent's ranks minus `exclude`, renumbered in order. Like CommInitRank.
  virtual NcclResult CommShrink(Comm parent, const std::vector<int>& exclude, Comm* child) = 0;
  // ncclCommRevoke(comm, NCCL_REVOKE_DEFAULT): stops in-flight operations (kInProgress until
  // quiescent). Never followed by Finalize, only by Shrink or Abort.
  virtual NcclResult CommRevoke(Comm comm) = 0;
  // ncclCommAbort: frees the communicator and kills its in-flight operations. `comm` is
  // invalid afterwards whatever the result.
  virtual NcclResult CommAbort(Comm comm) = 0;
  // ncclCommGetAsyncError: the communicator's state (kSuccess, kInProgress, or the error).
  virtual NcclResult CommGetAsyncError(Comm comm, NcclResult* state) = 0;

  // Enqueue an in-place sum all-reduce of `count` elements (or a broadcast of `bytes`
  // bytes from `root`) on the stream. `data` may be device memory (used directly) or host
  // memory (the implementation stages it through its own buffers, of at most the chunk size
  // the communicator uses; the result is copied back into `data` by FinishOperation).
  virtual NcclResult AllReduceSum(Comm comm, void* data, int64_t count, NcclDataType type) = 0;
  virtual NcclResult Broadcast(Comm comm, void* data, int64_t bytes, int root) = 0;
  // Polls the stream (cudaStreamQuery). kError sets *error to the CUDA error text.
  virtual StreamState QueryStream(std::string* error) = 0;
  // Called once the stream is idle after a collective: copies a staged result back into the
  // caller's host buffer. Not called after a failed or aborted operation: the next
  // collective (on any communicator of this NcclApi) replaces the unfinished one.
  virtual void FinishOperation() = 0;

  // Text for `result` (ncclGetErrorString, plus ncclGetLastError(comm) when comm is set).
  virtual std::string ErrorString(NcclResult result, Comm comm) = 0;

  // Held by every caller around every call above.
  absl::Mutex& mu() { return mu_; }

 private:
  absl::Mutex mu_;
};

// The real NCCL on CUDA device `device` (creates its stream and staging buffers; sets the
// device current on the calling thread); worker/nccl_api.cu, in builds with CUDA and NCCL
// (SPOTRAIN_HAVE_NCCL). Errors: kFailedPrecondition without a usable GPU or in a build
// without NCCL (worker/nccl_api.cc), kInvalidArgument for a device that does not exist,
// kInternal for other CUDA errors. `max_chunk_bytes` bounds the staging buffers for host
// data (allocated on the first collective on host memory).
absl::StatusOr<std::unique_ptr<NcclApi>> CreateCudaNcclApi(int device, int64_t max_chunk_bytes);

// "ncclRemoteError" etc.
const char* NcclResultName(NcclResult result);

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_NCCL_API_H_
