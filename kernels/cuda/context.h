// The device-side execution context of the CUDA kernels (stream, cuBLAS handle, cuBLAS
// workspace, kernel scratch memory, numeric mode) and the capability checks a worker runs
// before it tries to use a GPU.
//
// Thread-safety: CudaDeviceCount and CudaDeviceDescription may be called from any thread. A
// CudaContext is used by one thread at a time (the training thread); every kernel call on it
// is enqueued on its one stream, so the kernels of one context run in issue order and may
// share its scratch memory. Kernels assume the calling thread's current device is the
// context's device (Create and Activate set it).
#ifndef SPOTRAIN_KERNELS_CUDA_CONTEXT_H_
#define SPOTRAIN_KERNELS_CUDA_CONTEXT_H_

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace spotrain::kernels::cuda {

// Number of CUDA devices this process can use. Never crashes: on a machine without a driver
// (or with one too old for this build) it returns kFailedPrecondition with the runtime's
// message ("CUDA driver version is insufficient for CUDA runtime version"); 0 devices is a
// valid answer (OK, 0).
absl::StatusOr<int> CudaDeviceCount();

// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.1 GiB)" for device `device`; errors as above,
// kInvalidArgument for an index out of range.
absl::StatusOr<std::string> CudaDeviceDescription(int device);

struct CudaContextOptions {
  int device = 0;
  // No atomics in reductions, no TF32, cuBLAS atomics disallowed: the same inputs give the
  // same bits on the same GPU model and software.
  bool deterministic = true;
  // fp32 matrix products may use TF32 tensor cores (ignored when deterministic).
  bool allow_tf32 = false;
  size_t cublas_workspace_bytes = size_t{32} << 20;
  // Device scratch shared by the kernels for partial sums and sort buffers.
  size_t scratch_bytes = size_t{64} << 20;
};

class CudaContext {
 public:
  // Selects the device and creates the stream, the cuBLAS handle (bound to the stream, with
  // its own workspace) and the scratch memory. Errors: kFailedPrecondition without a usable
  // driver or device, kResourceExhausted when memory runs out, kInternal otherwise.
  static absl::StatusOr<std::unique_ptr<CudaContext>> Create(const CudaContextOptions& options);
  ~CudaContext();
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;

  cudaStream_t stream() const { return stream_; }
  cublasHandle_t cublas() const { return cublas_; }
  int device() const { return options_.device; }
  bool deterministic() const { return options_.deterministic; }
  // TF32 for fp32 matrix products: allowed and not deterministic.
  bool use_tf32() const { return options_.allow_tf32 && !options_.deterministic; }
  void* scratch() const { return scratch_; }
  size_t scratch_bytes() const { return options_.scratch_bytes; }

  // Makes the context's device current on the calling thread.
  absl::Status Activate() const;
  // Blocks until everything enqueued on the stream has run; returns the first execution
  // error (kInternal, or what CudaErrorToStatus maps it to).
  absl::Status Synchronize() const;

 private:
  explicit CudaContext(const CudaContextOptions& options) : options_(options) {}

  CudaContextOptions options_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  void* cublas_workspace_ = nullptr;
  void* scratch_ = nullptr;
};

}  // namespace spotrain::kernels::cuda

#endif  // SPOTRAIN_KERNELS_CUDA_CONTEXT_H_
