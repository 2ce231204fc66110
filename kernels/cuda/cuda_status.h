// Turns CUDA runtime and cuBLAS error codes into absl::Status, so that library code never
// exits or throws on a device error. Every CUDA or cuBLAS call in kernels/cuda and in the
// GPU worker goes through CUDA_RETURN_IF_ERROR / CUBLAS_RETURN_IF_ERROR.
//
// Status codes: a missing or too old driver, or no device, is kFailedPrecondition (the
// machine cannot run CUDA: not retried); out of device memory is kResourceExhausted; every
// other CUDA or cuBLAS error is kInternal. The message names the call, the error and the
// source place. Thread-safe: pure functions.
#ifndef SPOTRAIN_KERNELS_CUDA_CUDA_STATUS_H_
#define SPOTRAIN_KERNELS_CUDA_CUDA_STATUS_H_

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "absl/status/status.h"

namespace spotrain::kernels::cuda {

// The Status for `err` returned by the CUDA runtime call `expr` at file:line (OK for
// cudaSuccess).
absl::Status CudaErrorToStatus(cudaError_t err, const char* expr, const char* file, int line);
// Likewise for a cuBLAS status.
absl::Status CublasErrorToStatus(cublasStatus_t err, const char* expr, const char* file, int line);
// The name of a cuBLAS status ("CUBLAS_STATUS_NOT_SUPPORTED").
const char* CublasStatusName(cublasStatus_t err);

}  // namespace spotrain::kernels::cuda

#define SPOTRAIN_CUDA_CONCAT_INNER_(a, b) a##b
#define SPOTRAIN_CUDA_CONCAT_(a, b) SPOTRAIN_CUDA_CONCAT_INNER_(a, b)

// Evaluates a CUDA runtime call; returns its error from the caller as an absl::Status.
#define CUDA_RETURN_IF_ERROR(expr)                                                             \
  do {                                                                                         \
    const cudaError_t spotrain_cuda_err_ = (expr);                                             \
    if (spotrain_cuda_err_ != cudaSuccess) {                                                   \
      return ::spotrain::kernels::cuda::CudaErrorToStatus(spotrain_cuda_err_, #expr, __FILE__, \
                                                          __LINE__);                           \
    }                                                                                          \
  } while (0)

// Checks the launch of the kernel just issued (configuration errors surface here; errors
// during execution surface at the next synchronising call).
#define CUDA_RETURN_IF_LAUNCH_ERROR() CUDA_RETURN_IF_ERROR(cudaGetLastError())

// Evaluates a cuBLAS call; returns its error from the caller as an absl::Status.
#define CUBLAS_RETURN_IF_ERROR(expr)                                                               \
  do {                                                                                             \
    const cublasStatus_t spotrain_cublas_err_ = (expr);                                            \
    if (spotrain_cublas_err_ != CUBLAS_STATUS_SUCCESS) {                                           \
      return ::spotrain::kernels::cuda::CublasErrorToStatus(spotrain_cublas_err_, #expr, __FILE__, \
                                                            __LINE__);                             \
    }                                                                                              \
  } while (0)

#endif  // SPOTRAIN_KERNELS_CUDA_CUDA_STATUS_H_
