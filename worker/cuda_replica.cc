// Compiled into the worker library of every build; only CUDA builds have anything here.
#if SPOTRAIN_HAVE_CUDA

#include "worker/cuda_replica.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_format.h"
#include "common/check.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/cuda_status.h"
#include "worker/fixed_point.h"
#include "worker/model.h"
#include "worker/optimizer.h"

namespace spotrain::worker {

absl::StatusOr<std::unique_ptr<CudaReplica>> CudaReplica::Create(
    const proto::ModelConfig& model_config, const proto::RunConfig& config, int device) {
  CudaModelOptions options;
  options.device = device;
  ASSIGN_OR_RETURN(options.precision, ParseCudaPrecision(config.precision()));
  options.deterministic = config.deterministic();
  options.allow_tf32 = !config.deterministic();
  ASSIGN_OR_RETURN(
      std::unique_ptr<CudaGptModel> model,
      CudaGptModel::Create(model_config, config.micro_batch(), config.seq_len(), options));
  ASSIGN_OR_RETURN(std::string name, kernels::cuda::CudaDeviceDescription(device));
  const std::string description =
      absl::StrFormat("cuda:%d (%s, %s%s)", device, name, CudaPrecisionName(options.precision),
                      options.deterministic                       ? ", deterministic"
                      : options.precision == CudaPrecision::kFp32 ? ", tf32 matrix products"
                                                                  : "");
  std::unique_ptr<CudaReplica> replica(
      new CudaReplica(model_config, std::move(model), description));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&replica->scratch_.first_bad, sizeof(unsigned long long)));
  if (config.deterministic()) {
    CUDA_RETURN_IF_ERROR(
        cudaMalloc(&replica->fixed_accum_, replica->num_parameters() * sizeof(int64_t)));
  }
  return replica;
}

CudaReplica::CudaReplica(proto::ModelConfig model_config, std::unique_ptr<CudaGptModel> model,
                         std::string description)
    : model_config_(std::move(model_config)),
      model_(std::move(model)),
      description_(std::move(description)) {}

CudaReplica::~CudaReplica() {
  (void)model_->context().Activate();
  (void)model_->Synchronize();
  if (fixed_accum_ != nullptr) cudaFree(fixed_accum_);
  if (scratch_.first_bad != nullptr) cudaFree(scratch_.first_bad);
}

absl::Status CudaReplica::PrepareDevice() {
  RETURN_IF_ERROR(model_->context().Activate());
  if (device_current_) return absl::OkStatus();
  const int64_t n = num_parameters();
  RETURN_IF_ERROR(model_->CopyParamsFromHost(host_.data()));
  RETURN_IF_ERROR(model_->CopyMomentsFromHost(host_.data() + n, host_.data() + 2 * n));
  device_current_ = true;
  return absl::OkStatus();
}

absl::Status CudaReplica::RefreshHost() const {
  if (host_current_) return absl::OkStatus();
  SPOTRAIN_CHECK(device_current_);  // else host_ is the newer copy and already current
  const int64_t n = num_parameters();
  host_.resize(3 * n);
  RETURN_IF_ERROR(model_->context().Activate());
  RETURN_IF_ERROR(model_->CopyParamsToHost(host_.data()));
  RETURN_IF_ERROR(model_->CopyMomentsToHost(host_.data() + n, host_.data() + 2 * n));
  host_current_ = true;
  return absl::OkStatus();
}

absl::Status CudaReplica::InitFresh(uint64_t seed) {
  // The CPU model's initialisation, so a run starts from the same numbers on every device.
  // Its smallest shape: only the parameters are needed.
  ASSIGN_OR_RETURN(std::unique_ptr<GptModel> cpu,
                   GptModel::Create(model_config_, 1, 1, kernels::cpu::CpuContext{}));
  cpu->InitParameters(seed);
  const int64_t n = num_parameters();
  host_.assign(3 * n, 0.0f);
  std::memcpy(host_.data(), cpu->params(), n * sizeof(float));
  host_current_ = true;
  device_current_ = false;
  return PrepareDevice();
}

absl::Status CudaReplica::ZeroGrads() {
  RETURN_IF_ERROR(PrepareDevice());
  return model_->ZeroGrads();
}

absl::StatusOr<float> CudaReplica::MicroBatch(const int32_t* inputs, const int32_t* targets, int B,
                                              float grad_scale, bool deterministic, bool first) {
  RETURN_IF_ERROR(PrepareDevice());
  if (!deterministic) return model_->ForwardBackward(inputs, targets, B, grad_scale);
  ASSIGN_OR_RETURN(const float loss, model_->ForwardBackward(inputs, targets, B, 1.0f));
  int64_t bad = -1;
  float value = 0;
  RETURN_IF_ERROR(DrainToFixedPointCuda(model_->context().stream(), model_->grads(),
                                        num_parameters(), fixed_accum_, first, scratch_, &bad,
                                        &value));
  if (bad >= 0) return FixedPointRangeError(bad, value);
  return loss;
}

absl::Status CudaReplica::ClearAccumulator() {
  RETURN_IF_ERROR(PrepareDevice());
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(fixed_accum_, 0, num_parameters() * sizeof(int64_t),
                                       model_->context().stream()));
  return absl::OkStatus();
}

absl::Status CudaReplica::ReduceGradients(Communicator& comm, bool deterministic, double factor) {
  if (!comm.accepts_device_memory()) {
    return absl::FailedPreconditionError(
        "the GPU replica reduces gradients in device memory: its communicator must be NCCL "
        "(this one takes host memory only)");
  }
  RETURN_IF_ERROR(PrepareDevice());
  // The collectives run on the communicator's own stream: everything the model enqueued
  // must be done first. The communicator returns once its stream has finished.
  RETURN_IF_ERROR(model_->Synchronize());
  if (!deterministic) return comm.AllReduceSum(model_->grads(), num_parameters());
  RETURN_IF_ERROR(comm.AllReduceSum(fixed_accum_, num_parameters()));
  return FromFixedPointCuda(model_->context().stream(), fixed_accum_, num_parameters(), factor,
                            model_->grads());
}

absl::StatusOr<double> CudaReplica::GradSumOfSquares() { return model_->GradSumOfSquares(); }

absl::Status CudaReplica::ApplyAdamW(const proto::OptimizerConfig& config, int64_t t, float lr,
                                     float clip_scale) {
  RETURN_IF_ERROR(PrepareDevice());
  // The CPU's mapping of the config, field for field into the CUDA kernel's parameters.
  const kernels::cpu::AdamWParams c = MakeAdamWParams(config, t, lr, clip_scale);
  const kernels::cuda::AdamWParams p{c.lr,           c.beta1,      c.beta2, c.eps,
                                     c.weight_decay, c.grad_scale, c.t};
  host_current_ = false;
  RETURN_IF_ERROR(model_->AdamWStep(p));
  return model_->Synchronize();
}

absl::StatusOr<float> CudaReplica::Forward(const int32_t* inputs, const int32_t* targets, int B) {
  RETURN_IF_ERROR(PrepareDevice());
  return model_->Forward(inputs, targets, B);
}

void CudaReplica::ReadState(int64_t offset, int64_t length, float* out) const {
  SPOTRAIN_CHECK(offset >= 0 && length >= 0 && offset + length <= 3 * num_parameters());
  const absl::Status st = RefreshHost();
  if (!st.ok()) {
    SPOTRAIN_LOG(Error, "%s: copying the training state to the host failed: %s", description_,
                 st.ToString());
  }
  SPOTRAIN_CHECK(st.ok());
  std::memcpy(out, host_.data() + offset, length * sizeof(float));
}

void CudaReplica::WriteState(int64_t offset, int64_t length, const float* in) {
  SPOTRAIN_CHECK(offset >= 0 && length >= 0 && offset + length <= 3 * num_parameters());
  const absl::Status st = RefreshHost();  // a partial write keeps the rest
  if (!st.ok()) {
    SPOTRAIN_LOG(Error, "%s: copying the training state to the host failed: %s", description_,
                 st.ToString());
  }
  SPOTRAIN_CHECK(st.ok());
  std::memcpy(host_.data() + offset, in, length * sizeof(float));
  device_current_ = false;
}

absl::Status CudaReplica::BroadcastState(Communicator& comm, int root) {
  if (!comm.accepts_device_memory()) {
    return absl::FailedPreconditionError(
        "the GPU replica broadcasts its state in device memory: its communicator must be NCCL");
  }
  RETURN_IF_ERROR(PrepareDevice());
  RETURN_IF_ERROR(model_->Synchronize());
  const int64_t bytes = num_parameters() * static_cast<int64_t>(sizeof(float));
  host_current_ = false;
  RETURN_IF_ERROR(comm.Broadcast(model_->params(), bytes, root));
  RETURN_IF_ERROR(comm.Broadcast(model_->adam_m(), bytes, root));
  return comm.Broadcast(model_->adam_v(), bytes, root);
}

}  // namespace spotrain::worker

#endif  // SPOTRAIN_HAVE_CUDA
