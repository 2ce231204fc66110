// The GPT-2 style decoder of worker/model.h on one CUDA GPU (kernels/cuda/ops.cuh), with the
// same flat fp32 parameter and gradient layout (llm.c order: wte wpe ln1w ln1b qkvw qkvb
// attprojw attprojb ln2w ln2b fcw fcb fcprojw fcprojb lnfw lnfb), the same step semantics
// and an API of the same shape as GptModel, so that a trainer can hold either. The
// buffers live in device memory; host copies go through the Copy* methods.
//
// Precision (CudaModelOptions::precision, RunConfig "precision"):
//   kFp32: everything fp32 (matrix products in fp32, or TF32 when allowed and not
//          deterministic).
//   kBf16: mixed precision. Activations and activation gradients are bf16, matrix
//          products take bf16 inputs and accumulate in fp32 (CUBLAS_COMPUTE_32F), the
//          logits are bf16 too (as llm.c) and the softmax and loss are computed from them
//          in fp32. Parameters stay fp32 (master weights: the
//          matrices are rounded to a bf16 working copy at the start of every Forward /
//          ForwardBackward), parameter gradients and the AdamW moments are fp32, so the
//          state a checkpoint holds is always fp32 and has the CPU model's layout.
// The optimiser state (AdamW m and v, same layout) is kept on the device too, so that a
// step needs no host round trip.
//
// Thread-safety: a CudaGptModel is used by one thread at a time (the trainer thread) and
// owns its CudaContext (one stream); every method enqueues on that stream. Methods that
// return host values (losses, sums) or copy to/from host memory wait for the stream.
#ifndef SPOTRAIN_WORKER_CUDA_MODEL_H_
#define SPOTRAIN_WORKER_CUDA_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/ops.cuh"
#include "proto/config.pb.h"

namespace spotrain::worker {

enum class CudaPrecision { kFp32, kBf16 };

// "fp32" (or "") -> kFp32, "bf16" -> kBf16; kInvalidArgument otherwise.
absl::StatusOr<CudaPrecision> ParseCudaPrecision(const std::string& name);
const char* CudaPrecisionName(CudaPrecision precision);

struct CudaModelOptions {
  int device = 0;
  CudaPrecision precision = CudaPrecision::kFp32;
  // No atomics, no TF32 (kernels/cuda/context.h): repeated steps give identical bits.
  bool deterministic = true;
  // fp32 matrix products may use TF32 (only when !deterministic; ignored for bf16).
  bool allow_tf32 = false;
};

class CudaGptModel {
 public:
  // One tensor of the flat parameter buffer (as GptModel::TensorInfo).
  struct TensorInfo {
    std::string name;
    int64_t offset;
    int64_t size;
    bool decay;
  };

  // Builds the model on options.device for micro-batches of up to `max_micro_batch`
  // sequences of exactly `seq_len` tokens, allocating every buffer once. Parameters are
  // uninitialised (copy them in with CopyParamsFromHost), gradients and moments are zero.
  // Errors: kInvalidArgument for an inconsistent shape (as GptModel::Create);
  // kFailedPrecondition without a usable GPU; kResourceExhausted when the device memory
  // does not suffice (the message gives the bytes needed).
  static absl::StatusOr<std::unique_ptr<CudaGptModel>> Create(const proto::ModelConfig& config,
                                                              int max_micro_batch, int seq_len,
                                                              const CudaModelOptions& options);
  ~CudaGptModel();
  CudaGptModel(const CudaGptModel&) = delete;
  CudaGptModel& operator=(const CudaGptModel&) = delete;

  int64_t num_parameters() const { return num_parameters_; }
  // Device pointers (num_parameters() floats each), valid for the model's lifetime.
  float* params() { return params_; }
  float* grads() { return grads_; }
  float* adam_m() { return m_; }
  float* adam_v() { return v_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // Device bytes the model allocated (parameters, state, activations, scratch).
  int64_t device_bytes() const { return device_bytes_; }

  absl::Status CopyParamsFromHost(const float* host);
  absl::Status CopyParamsToHost(float* host);
  absl::Status CopyGradsFromHost(const float* host);
  absl::Status CopyGradsToHost(float* host);
  // AdamW moments (num_parameters() floats each); used for checkpoints and broadcasts.
  absl::Status CopyMomentsFromHost(const float* m, const float* v);
  absl::Status CopyMomentsToHost(float* m, float* v);

  // grads <- 0 (enqueued).
  absl::Status ZeroGrads();
  // m, v <- 0 (enqueued).
  absl::Status ZeroMoments();

  // Forward and backward of one micro-batch, as GptModel::ForwardBackward: host inputs and
  // targets [B, seq_len], tokens below vocab_size, 1 <= B <= max_micro_batch. ADDS
  // grad_scale * d(mean token loss)/d(params) to grads() and returns that mean loss (waits
  // for the stream). kInvalidArgument for a bad B or a token out of range (checked on the
  // host before anything is enqueued); CUDA errors as kernels/cuda/cuda_status.h.
  absl::StatusOr<float> ForwardBackward(const int32_t* inputs, const int32_t* targets, int B,
                                        float grad_scale);
  // Forward only: the mean token loss; grads() untouched.
  absl::StatusOr<float> Forward(const int32_t* inputs, const int32_t* targets, int B);

  // Sum of squares of grads() in double (fixed order; waits for the stream).
  absl::StatusOr<double> GradSumOfSquares();
  // One AdamW step over all parameters with the device moments and the model's decay mask
  // (matrices wte, qkvw, attprojw, fcw, fcprojw decay; wpe, biases, LayerNorm do not).
  absl::Status AdamWStep(const kernels::cuda::AdamWParams& p);

  // Waits until everything enqueued has run; returns the first execution error.
  absl::Status Synchronize();

  const proto::ModelConfig& config() const { return config_; }
  const CudaModelOptions& options() const { return options_; }
  int max_micro_batch() const { return max_b_; }
  int seq_len() const { return seq_len_; }
  kernels::cuda::CudaContext& context() { return *ctx_; }

 private:
  struct Buffers;

  CudaGptModel(const proto::ModelConfig& config, int max_micro_batch, int seq_len,
               const CudaModelOptions& options);
  absl::Status Allocate();
  absl::Status UploadTokens(const int32_t* inputs, const int32_t* targets, int B);
  // With `backward`, the cross-entropy also writes d(mean loss * grad_scale)/dlogits (the
  // fused classifier), which RunBackward then starts from.
  template <typename Act>
  absl::Status RunForward(int B, bool backward, float grad_scale);
  template <typename Act>
  absl::Status RunBackward(int B);
  absl::StatusOr<float> MeanLoss(int B);

  const proto::ModelConfig config_;
  const int max_b_;
  const int seq_len_;
  const CudaModelOptions options_;
  const int L_, C_, NH_, V_, Vp_, maxT_;
  int64_t num_parameters_ = 0;
  int64_t device_bytes_ = 0;
  std::vector<TensorInfo> tensors_;
  std::unique_ptr<kernels::cuda::CudaContext> ctx_;
  std::vector<void*> allocations_;  // freed in the destructor
  float* params_ = nullptr;
  float* grads_ = nullptr;
  float* m_ = nullptr;
  float* v_ = nullptr;
  uint8_t* decay_mask_ = nullptr;
  std::unique_ptr<Buffers> buffers_;
};

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_CUDA_MODEL_H_
