#include "kernels/cuda/context.h"

#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "kernels/cuda/cuda_status.h"

namespace spotrain::kernels::cuda {

absl::StatusOr<int> CudaDeviceCount() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    // The runtime reports "no device" as an error too; for a capability check that is a
    // valid answer, not a failure.
    cudaGetLastError();  // clear the sticky error state of the runtime
    if (err == cudaErrorNoDevice) return 0;
    return CudaErrorToStatus(err, "cudaGetDeviceCount", __FILE__, __LINE__);
  }
  return count;
}

absl::StatusOr<std::string> CudaDeviceDescription(int device) {
  ASSIGN_OR_RETURN(const int count, CudaDeviceCount());
  if (device < 0 || device >= count) {
    return absl::InvalidArgumentError(
        absl::StrFormat("CUDA device %d does not exist (%d devices)", device, count));
  }
  cudaDeviceProp prop;
  CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  return absl::StrFormat("%s (sm_%d%d, %d SMs, %.1f GiB)", prop.name, prop.major, prop.minor,
                         prop.multiProcessorCount,
                         static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024 * 1024));
}

absl::StatusOr<std::unique_ptr<CudaContext>> CudaContext::Create(
    const CudaContextOptions& options) {
  ASSIGN_OR_RETURN(const int count, CudaDeviceCount());
  if (count == 0) return absl::FailedPreconditionError("no CUDA device is visible");
  if (options.device < 0 || options.device >= count) {
    return absl::InvalidArgumentError(
        absl::StrFormat("CUDA device %d does not exist (%d devices)", options.device, count));
  }
  if (options.scratch_bytes < (size_t{1} << 20)) {
    return absl::InvalidArgumentError("CudaContextOptions.scratch_bytes must be >= 1 MiB");
  }
  std::unique_ptr<CudaContext> ctx(new CudaContext(options));
  CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device));
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&ctx->stream_, cudaStreamNonBlocking));
  CUBLAS_RETURN_IF_ERROR(cublasCreate(&ctx->cublas_));
  CUBLAS_RETURN_IF_ERROR(cublasSetStream(ctx->cublas_, ctx->stream_));
  // An explicit workspace per handle keeps cuBLAS from picking one per stream, which is
  // what makes its results depend on stream history (cuBLAS "Results reproducibility").
  if (options.cublas_workspace_bytes > 0) {
    CUDA_RETURN_IF_ERROR(cudaMalloc(&ctx->cublas_workspace_, options.cublas_workspace_bytes));
    CUBLAS_RETURN_IF_ERROR(
        cublasSetWorkspace(ctx->cublas_, ctx->cublas_workspace_, options.cublas_workspace_bytes));
  }
  CUBLAS_RETURN_IF_ERROR(cublasSetAtomicsMode(
      ctx->cublas_, options.deterministic ? CUBLAS_ATOMICS_NOT_ALLOWED : CUBLAS_ATOMICS_ALLOWED));
  // The compute type of each product decides TF32 (kernels/cuda/ops.cu); the math mode is
  // kept at the default so that nothing else down-converts fp32 inputs.
  CUBLAS_RETURN_IF_ERROR(cublasSetMathMode(ctx->cublas_, CUBLAS_DEFAULT_MATH));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&ctx->scratch_, options.scratch_bytes));
  return ctx;
}

CudaContext::~CudaContext() {
  // Errors while tearing down cannot be reported to anyone; the stream is drained first so
  // that no kernel still uses the memory being freed.
  cudaSetDevice(options_.device);
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  if (cublas_workspace_ != nullptr) cudaFree(cublas_workspace_);
  if (scratch_ != nullptr) cudaFree(scratch_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::Status CudaContext::Activate() const {
  CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
  return absl::OkStatus();
}

absl::Status CudaContext::Synchronize() const {
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

}  // namespace spotrain::kernels::cuda
