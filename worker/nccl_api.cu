// The real NcclApi (worker/nccl_api.h): NCCL 2.28 non-blocking communicators on one CUDA
// device and one non-blocking stream, with pinned + device staging buffers for collectives
// on host memory. Host code only (compiled by nvcc with the rest of the GPU worker, linked
// against libnccl); built only when CUDA is (SPOTRAIN_HAVE_CUDA).
//
// Thread-safety: see nccl_api.h (callers hold mu() around every call).
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <nccl.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/cuda/cuda_status.h"
#include "worker/nccl_api.h"

static_assert(NCCL_MAJOR > 2 || (NCCL_MAJOR == 2 && NCCL_MINOR >= 28),
              "the NCCL communicator needs NCCL >= 2.28 (ncclCommShrink, ncclCommRevoke)");
static_assert(NCCL_UNIQUE_ID_BYTES == spotrain::worker::NcclApi::kUniqueIdBytes,
              "ncclUniqueId size");
static_assert(static_cast<int>(ncclInProgress) ==
                  static_cast<int>(spotrain::worker::NcclResult::kInProgress),
              "NcclResult mirrors ncclResult_t");
static_assert(static_cast<int>(ncclRemoteError) ==
                  static_cast<int>(spotrain::worker::NcclResult::kRemoteError),
              "NcclResult mirrors ncclResult_t");

namespace spotrain::worker {
namespace {

NcclResult FromNccl(ncclResult_t r) {
  const int v = static_cast<int>(r);
  if (v < 0 || v > static_cast<int>(NcclResult::kInProgress)) return NcclResult::kInternalError;
  return static_cast<NcclResult>(v);
}

ncclComm_t Native(NcclApi::Comm comm) { return static_cast<ncclComm_t>(comm); }

ncclConfig_t NonBlockingConfig() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  return config;
}

class CudaNcclApi final : public NcclApi {
 public:
  CudaNcclApi(int device, int64_t max_chunk_bytes)
      : device_(device), max_chunk_bytes_(max_chunk_bytes) {}

  ~CudaNcclApi() override {
    cudaSetDevice(device_);
    if (stream_ != nullptr) {
      // Work that an abort left on the stream has been killed; wait for it before freeing
      // the buffers it may still name.
      cudaStreamSynchronize(stream_);
      cudaStreamDestroy(stream_);
    }
    if (device_stage_ != nullptr) cudaFree(device_stage_);
    if (host_stage_ != nullptr) cudaFreeHost(host_stage_);
    cudaGetLastError();
  }

  absl::Status Init() {
    CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    return absl::OkStatus();
  }

  int device() const override { return device_; }

  NcclResult GetUniqueId(std::string* id) override {
    ncclUniqueId uid;
    const ncclResult_t r = ncclGetUniqueId(&uid);
    if (r == ncclSuccess) id->assign(uid.internal, NCCL_UNIQUE_ID_BYTES);
    return FromNccl(r);
  }

  NcclResult CommInitRank(Comm* comm, int nranks, const std::string& id, int rank) override {
    if (static_cast<int>(id.size()) != NCCL_UNIQUE_ID_BYTES) return NcclResult::kInvalidArgument;
    if (!SetDevice()) return NcclResult::kUnhandledCudaError;
    ncclUniqueId uid;
    std::memcpy(uid.internal, id.data(), NCCL_UNIQUE_ID_BYTES);
    ncclConfig_t config = NonBlockingConfig();
    ncclComm_t native = nullptr;
    const ncclResult_t r = ncclCommInitRankConfig(&native, nranks, uid, rank, &config);
    *comm = native;
    return FromNccl(r);
  }

  NcclResult CommShrink(Comm parent, const std::vector<int>& exclude, Comm* child) override {
    if (!SetDevice()) return NcclResult::kUnhandledCudaError;
    std::vector<int> list = exclude;  // NCCL takes a non-const pointer
    ncclConfig_t config = NonBlockingConfig();
    ncclComm_t native = nullptr;
    const ncclResult_t r =
        ncclCommShrink(Native(parent), list.empty() ? nullptr : list.data(),
                       static_cast<int>(list.size()), &native, &config, NCCL_SHRINK_DEFAULT);
    *child = native;
    return FromNccl(r);
  }

  NcclResult CommRevoke(Comm comm) override {
    // ncclCommRevoke is new in NCCL 2.28; an older library (2.27, e.g. the one PyTorch's
    // wheels bring) lacks it. It is looked up at run time so that the worker runs on either;
    // without it the communicator aborts instead of revoking (nccl_communicator.cc).
    using RevokeFn = ncclResult_t (*)(ncclComm_t, int);
    static const RevokeFn revoke =
        reinterpret_cast<RevokeFn>(dlsym(RTLD_DEFAULT, "ncclCommRevoke"));
    if (revoke == nullptr) {
      revoke_missing_ = true;
      return NcclResult::kInvalidUsage;
    }
    return FromNccl(revoke(Native(comm), NCCL_REVOKE_DEFAULT));
  }

  NcclResult CommAbort(Comm comm) override { return FromNccl(ncclCommAbort(Native(comm))); }

  NcclResult CommGetAsyncError(Comm comm, NcclResult* state) override {
    ncclResult_t s = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(Native(comm), &s);
    *state = FromNccl(s);
    return FromNccl(r);
  }

  NcclResult AllReduceSum(Comm comm, void* data, int64_t count, NcclDataType type) override {
    ncclDataType_t dtype;
    int64_t element = 1;
    switch (type) {
      case NcclDataType::kFloat32:
        dtype = ncclFloat32;
        element = 4;
        break;
      case NcclDataType::kInt64:
        dtype = ncclInt64;
        element = 8;
        break;
      default:
        dtype = ncclUint8;
        break;
    }
    void* buffer = nullptr;
    if (!Stage(data, count * element, &buffer)) return NcclResult::kUnhandledCudaError;
    return FromNccl(ncclAllReduce(buffer, buffer, static_cast<size_t>(count), dtype, ncclSum,
                                  Native(comm), stream_));
  }

  NcclResult Broadcast(Comm comm, void* data, int64_t bytes, int root) override {
    void* buffer = nullptr;
    if (!Stage(data, bytes, &buffer)) return NcclResult::kUnhandledCudaError;
    return FromNccl(ncclBroadcast(buffer, buffer, static_cast<size_t>(bytes), ncclUint8, root,
                                  Native(comm), stream_));
  }

  StreamState QueryStream(std::string* error) override {
    if (pending_host_ != nullptr && !copy_back_enqueued_) {
      // Only now (NCCL reported the collective enqueued: its state left ncclInProgress) is
      // the copy back ordered after the collective on the stream.
      const cudaError_t err = cudaMemcpyAsync(host_stage_, device_stage_, pending_bytes_,
                                              cudaMemcpyDeviceToHost, stream_);
      if (err != cudaSuccess) {
        *error = absl::StrCat("cudaMemcpyAsync: ", cudaGetErrorString(err));
        cudaGetLastError();
        return StreamState::kError;
      }
      copy_back_enqueued_ = true;
    }
    const cudaError_t err = cudaStreamQuery(stream_);
    if (err == cudaSuccess) return StreamState::kIdle;
    if (err == cudaErrorNotReady) return StreamState::kBusy;
    *error =
        absl::StrCat("cudaStreamQuery: ", cudaGetErrorName(err), ": ", cudaGetErrorString(err));
    return StreamState::kError;
  }

  void FinishOperation() override {
    if (pending_host_ != nullptr && copy_back_enqueued_) {
      std::memcpy(pending_host_, host_stage_, pending_bytes_);
    }
    pending_host_ = nullptr;
    copy_back_enqueued_ = false;
  }

  std::string ErrorString(NcclResult result, Comm comm) override {
    if (result == NcclResult::kInvalidUsage && revoke_missing_) {
      int version = 0;
      ncclGetVersion(&version);
      return absl::StrFormat("this NCCL (version code %d) has no ncclCommRevoke (2.28.3 lacks it)",
                             version);
    }
    std::string text = ncclGetErrorString(static_cast<ncclResult_t>(static_cast<int>(result)));
    if (comm != nullptr) {
      const char* last = ncclGetLastError(Native(comm));
      if (last != nullptr && *last != '\0') absl::StrAppend(&text, " (", last, ")");
    }
    if (!cuda_error_.empty()) absl::StrAppend(&text, " [", cuda_error_, "]");
    return text;
  }

 private:
  bool SetDevice() {
    const cudaError_t err = cudaSetDevice(device_);
    if (err == cudaSuccess) return true;
    cuda_error_ = absl::StrCat("cudaSetDevice: ", cudaGetErrorString(err));
    cudaGetLastError();
    return false;
  }

  bool Fail(const char* what, cudaError_t err) {
    cuda_error_ = absl::StrCat(what, ": ", cudaGetErrorString(err));
    cudaGetLastError();
    return false;
  }

  // Sets *buffer to `data` when it is device memory; otherwise copies the host data into
  // the staging buffers and sets *buffer to the device stage (the copy back is enqueued by
  // QueryStream and done by FinishOperation).
  bool Stage(void* data, int64_t bytes, void** buffer) {
    pending_host_ = nullptr;  // a collective that never finished is forgotten
    copy_back_enqueued_ = false;
    if (!SetDevice()) return false;
    cudaPointerAttributes attributes;
    const cudaError_t err = cudaPointerGetAttributes(&attributes, data);
    if (err == cudaSuccess &&
        (attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged)) {
      *buffer = data;
      return true;
    }
    cudaGetLastError();  // an unregistered host pointer may leave an error behind
    if (bytes > max_chunk_bytes_) {
      cuda_error_ = absl::StrFormat("host buffer of %d bytes exceeds the staging size %d", bytes,
                                    max_chunk_bytes_);
      return false;
    }
    if (device_stage_ == nullptr) {
      cudaError_t e = cudaMalloc(&device_stage_, max_chunk_bytes_);
      if (e != cudaSuccess) {
        device_stage_ = nullptr;
        return Fail("cudaMalloc (NCCL staging)", e);
      }
      e = cudaMallocHost(&host_stage_, max_chunk_bytes_);
      if (e != cudaSuccess) {
        host_stage_ = nullptr;
        cudaFree(device_stage_);
        device_stage_ = nullptr;
        return Fail("cudaMallocHost (NCCL staging)", e);
      }
    }
    // The previous collective may still be draining after an abort: the host stage is
    // only rewritten once the stream is idle.
    cudaError_t e = cudaStreamSynchronize(stream_);
    if (e != cudaSuccess) return Fail("cudaStreamSynchronize", e);
    std::memcpy(host_stage_, data, bytes);
    e = cudaMemcpyAsync(device_stage_, host_stage_, bytes, cudaMemcpyHostToDevice, stream_);
    if (e != cudaSuccess) return Fail("cudaMemcpyAsync (to the NCCL stage)", e);
    pending_host_ = data;
    pending_bytes_ = bytes;
    *buffer = device_stage_;
    return true;
  }

  const int device_;
  const int64_t max_chunk_bytes_;
  cudaStream_t stream_ = nullptr;
  void* device_stage_ = nullptr;
  void* host_stage_ = nullptr;
  void* pending_host_ = nullptr;
  int64_t pending_bytes_ = 0;
  bool copy_back_enqueued_ = false;
  std::string cuda_error_;
  bool revoke_missing_ = false;  // the loaded NCCL has no ncclCommRevoke
};

}  // namespace

absl::StatusOr<std::unique_ptr<NcclApi>> CreateCudaNcclApi(int device, int64_t max_chunk_bytes) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();
    return absl::FailedPreconditionError(
        absl::StrCat("NCCL needs a CUDA device: ",
                     err != cudaSuccess ? cudaGetErrorString(err) : "no CUDA device is visible"));
  }
  if (device < 0 || device >= count) {
    return absl::InvalidArgumentError(
        absl::StrFormat("CUDA device %d does not exist (%d devices)", device, count));
  }
  if (max_chunk_bytes < 8) return absl::InvalidArgumentError("NCCL staging below 8 bytes");
  auto api = std::make_unique<CudaNcclApi>(device, max_chunk_bytes);
  absl::Status st = api->Init();
  if (!st.ok()) return st;
  return std::unique_ptr<NcclApi>(std::move(api));
}

}  // namespace spotrain::worker
