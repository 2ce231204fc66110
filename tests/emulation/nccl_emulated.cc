// NCCL for the CPU emulator of the CUDA code (cuda_emulation.h): the functions
// worker/nccl_api.cu calls, for communicators of one rank, over host memory. With one rank an
// all-reduce or a broadcast is a copy; a communicator of more ranks is refused with the
// reason (the emulated worker is for one-rank GPU scenarios; multi-rank NCCL logic is tested
// with tests/support/fake_nccl.h). Every call completes at once: nothing is ever in progress.
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstring>
#include <string>

struct ncclComm {
  bool revoked = false;
};

namespace {

thread_local std::string g_last_error;

ncclResult_t Fail(ncclResult_t result, const std::string& why) {
  g_last_error = why;
  return result;
}

size_t ElementBytes(ncclDataType_t type) {
  switch (type) {
    case ncclInt8:
    case ncclUint8:
      return 1;
    case ncclFloat16:
    case ncclBfloat16:
      return 2;
    case ncclInt32:
    case ncclUint32:
    case ncclFloat32:
      return 4;
    case ncclInt64:
    case ncclUint64:
    case ncclFloat64:
      return 8;
    default:
      return 0;
  }
}

}  // namespace

extern "C" {

ncclResult_t ncclGetVersion(int* version) {
  *version = NCCL_VERSION_CODE;
  return ncclSuccess;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  static unsigned counter = 0;
  std::memset(id->internal, 0, sizeof(id->internal));
  std::snprintf(id->internal, sizeof(id->internal), "emulated-nccl-%u", ++counter);
  return ncclSuccess;
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId /*id*/, int rank,
                                    ncclConfig_t* /*config*/) {
  *comm = nullptr;
  if (nranks != 1 || rank != 0) {
    return Fail(ncclInvalidUsage,
                "the CPU emulator of the CUDA code runs NCCL communicators of one rank only "
                "(asked for rank " +
                    std::to_string(rank) + " of " + std::to_string(nranks) + ")");
  }
  *comm = new ncclComm;
  return ncclSuccess;
}

ncclResult_t ncclCommShrink(ncclComm_t comm, int* exclude, int exclude_count, ncclComm_t* newcomm,
                            ncclConfig_t* /*config*/, int /*flags*/) {
  *newcomm = nullptr;
  if (comm == nullptr) return Fail(ncclInvalidArgument, "ncclCommShrink of no communicator");
  if (exclude_count > 0 && exclude != nullptr && exclude[0] == 0) {
    return Fail(ncclInvalidArgument, "ncclCommShrink would exclude the only rank");
  }
  *newcomm = new ncclComm;
  return ncclSuccess;
}

ncclResult_t ncclCommRevoke(ncclComm_t comm, int /*flags*/) {
  if (comm == nullptr) return Fail(ncclInvalidArgument, "ncclCommRevoke of no communicator");
  comm->revoked = true;
  return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  delete comm;
  return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* state) {
  if (comm == nullptr) return Fail(ncclInvalidArgument, "ncclCommGetAsyncError of no communicator");
  *state = ncclSuccess;
  return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type,
                           ncclRedOp_t op, ncclComm_t comm, cudaStream_t /*stream*/) {
  if (comm == nullptr || comm->revoked) {
    return Fail(ncclInvalidUsage, "ncclAllReduce on no or a revoked communicator");
  }
  if (op != ncclSum) return Fail(ncclInvalidArgument, "the emulator's all-reduce sums only");
  const size_t bytes = count * ElementBytes(type);
  if (bytes == 0 && count > 0) return Fail(ncclInvalidArgument, "an unknown NCCL data type");
  if (send != recv && bytes > 0) std::memmove(recv, send, bytes);  // one rank: the sum is itself
  return ncclSuccess;
}

ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type,
                           int root, ncclComm_t comm, cudaStream_t /*stream*/) {
  if (comm == nullptr || comm->revoked) {
    return Fail(ncclInvalidUsage, "ncclBroadcast on no or a revoked communicator");
  }
  if (root != 0) return Fail(ncclInvalidArgument, "a broadcast root other than the only rank");
  const size_t bytes = count * ElementBytes(type);
  if (send != recv && bytes > 0) std::memmove(recv, send, bytes);
  return ncclSuccess;
}

const char* ncclGetErrorString(ncclResult_t result) {
  switch (result) {
    case ncclSuccess:
      return "no error";
    case ncclInvalidArgument:
      return "invalid argument";
    case ncclInvalidUsage:
      return "invalid usage";
    case ncclInProgress:
      return "operation in progress";
    default:
      return "unhandled error";
  }
}

const char* ncclGetLastError(ncclComm_t /*comm*/) { return g_last_error.c_str(); }

}  // extern "C"
