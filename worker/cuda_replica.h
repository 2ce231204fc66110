// The GPU replica (worker/replica.h): CudaGptModel (worker/cuda_model.h) holds the
// parameters, the gradient and the AdamW moments in device memory; a step never leaves the
// device: micro-batches, the gradient reduction (through a communicator that accepts device
// memory: NCCL), the gradient norm and AdamW all run there. Deterministic mode accumulates
// fixed point on the device (worker/fixed_point_cuda.h) and reduces the int64 sums with
// NCCL, so the result does not depend on how micro-batches are spread over ranks.
//
// The logical state is mirrored in host memory only when it is read (checkpoint snapshot,
// digest) or written (restore): ReadState copies the device state down once after every
// change, WriteState edits the host copy and the next device operation uploads it.
// Parameters start from the CPU model's initialisation (the same numbers on every device).
//
// precision "bf16" (RunConfig) trains with bf16 activations and fp32 master weights; the
// state is fp32 either way, so checkpoints move freely between devices and precisions.
//
// Built only with CUDA (SPOTRAIN_HAVE_CUDA).
#ifndef SPOTRAIN_WORKER_CUDA_REPLICA_H_
#define SPOTRAIN_WORKER_CUDA_REPLICA_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "proto/config.pb.h"
#include "worker/cuda_model.h"
#include "worker/fixed_point_cuda.h"
#include "worker/replica.h"

namespace spotrain::worker {

class CudaReplica : public Replica {
 public:
  // The model on CUDA device `device` for config's micro-batch, seq_len, precision and
  // deterministic mode (non-deterministic fp32 may use TF32). Errors: CudaGptModel::Create's
  // (kFailedPrecondition without a usable GPU, kResourceExhausted with the bytes needed).
  static absl::StatusOr<std::unique_ptr<CudaReplica>> Create(const proto::ModelConfig& model_config,
                                                             const proto::RunConfig& config,
                                                             int device);
  ~CudaReplica() override;

  int64_t num_parameters() const override { return model_->num_parameters(); }
  std::string description() const override { return description_; }
  absl::Status InitFresh(uint64_t seed) override;
  absl::Status ZeroGrads() override;
  absl::StatusOr<float> MicroBatch(const int32_t* inputs, const int32_t* targets, int B,
                                   float grad_scale, bool deterministic, bool first) override;
  absl::Status ClearAccumulator() override;
  // kFailedPrecondition when `comm` cannot take device memory (e.g. Gloo).
  absl::Status ReduceGradients(Communicator& comm, bool deterministic, double factor) override;
  absl::StatusOr<double> GradSumOfSquares() override;
  absl::Status ApplyAdamW(const proto::OptimizerConfig& config, int64_t t, float lr,
                          float clip_scale) override;
  absl::StatusOr<float> Forward(const int32_t* inputs, const int32_t* targets, int B) override;
  void ReadState(int64_t offset, int64_t length, float* out) const override;
  void WriteState(int64_t offset, int64_t length, const float* in) override;
  absl::Status BroadcastState(Communicator& comm, int root) override;

 private:
  CudaReplica(proto::ModelConfig model_config, std::unique_ptr<CudaGptModel> model,
              std::string description);
  // Uploads the host copy when WriteState / InitFresh changed it; makes the device current.
  absl::Status PrepareDevice();
  // Downloads the device state into host_ when the device changed it since.
  absl::Status RefreshHost() const;

  const proto::ModelConfig model_config_;
  std::unique_ptr<CudaGptModel> model_;
  const std::string description_;
  int64_t* fixed_accum_ = nullptr;  // device, deterministic mode only
  FixedPointCudaScratch scratch_;
  // Host mirror of params | m | v and which side is newer.
  mutable std::vector<float> host_;
  mutable bool host_current_ = false;  // host_ equals the device state
  bool device_current_ = true;         // the device state equals host_ (or is newer)
};

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_CUDA_REPLICA_H_
