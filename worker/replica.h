// Where one replica's training state lives and who does the arithmetic of a step
// (DESIGN.md sections 6 and 7). The Trainer (worker/trainer.h) owns the logic of a step:
// which micro-batches this rank computes, in which order, the learning rate, the clipping
// and the in-band agreement round. A Replica holds the state (parameters, AdamW moments)
// and runs the model, the gradient reduction and the update on its device:
//   CpuReplica  (worker/cpu_replica.h)   the CPU kernels; the reference.
//   CudaReplica (worker/cuda_replica.h)  one CUDA GPU; the state stays in device memory and
//                                        the gradients are reduced there (NCCL).
// Both keep the CPU model's flat parameter layout, so the logical state vector
// (params | m | v, 3 * num_parameters() floats) means the same on every device: checkpoints
// and broadcasts move between CPU and GPU workers and between precisions.
//
// Thread-safety: a Replica is used by one thread (the trainer's).
#ifndef SPOTRAIN_WORKER_REPLICA_H_
#define SPOTRAIN_WORKER_REPLICA_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/config.pb.h"
#include "worker/communicator.h"

namespace spotrain::worker {

class Replica {
 public:
  virtual ~Replica() = default;

  virtual int64_t num_parameters() const = 0;
  // "cpu" or "cuda:0 (NVIDIA H100 80GB HBM3, bf16)", for the log.
  virtual std::string description() const = 0;

  // Parameters from `seed` (GptModel::InitParameters: identical on every device), zero
  // moments.
  virtual absl::Status InitFresh(uint64_t seed) = 0;

  // Starts the gradient of a step: gradient buffer = 0.
  virtual absl::Status ZeroGrads() = 0;
  // Forward and backward of one micro-batch of B sequences; returns its mean token loss.
  //   !deterministic: adds grad_scale * gradient to the gradient buffer.
  //   deterministic:  converts the micro-batch gradient alone to int64 fixed point
  //                   (worker/fixed_point.h) and adds it to the accumulator (assigns it
  //                   when `first`), leaving the gradient buffer zero again. kOutOfRange
  //                   (naming the element) when it does not fit fixed point.
  virtual absl::StatusOr<float> MicroBatch(const int32_t* inputs, const int32_t* targets, int B,
                                           float grad_scale, bool deterministic, bool first) = 0;
  // Deterministic mode on a rank with no micro-batch this step: accumulator = 0.
  virtual absl::Status ClearAccumulator() = 0;
  // Sums the ranks' gradients over `comm`: the float gradient buffers, or (deterministic)
  // the fixed-point accumulators, converted with `factor` into the gradient buffer.
  // The communicator's errors (worker/communicator.h).
  virtual absl::Status ReduceGradients(Communicator& comm, bool deterministic, double factor) = 0;
  // Sum of squares of the reduced gradient, in a fixed order.
  virtual absl::StatusOr<double> GradSumOfSquares() = 0;
  // One AdamW step (step count t, 1-based) with the gradient multiplied by clip_scale.
  virtual absl::Status ApplyAdamW(const proto::OptimizerConfig& config, int64_t t, float lr,
                                  float clip_scale) = 0;

  // Forward only: the mean token loss of one micro-batch; the state is untouched.
  virtual absl::StatusOr<float> Forward(const int32_t* inputs, const int32_t* targets, int B) = 0;

  // The logical state as flat floats: [0, N) params, [N, 2N) m, [2N, 3N) v. A device
  // replica copies to and from device memory as needed (a failing copy is fatal: the
  // device is gone).
  virtual void ReadState(int64_t offset, int64_t length, float* out) const = 0;
  virtual void WriteState(int64_t offset, int64_t length, const float* in) = 0;
  // Makes every rank of `comm` hold the parameters and moments of rank `root`.
  virtual absl::Status BroadcastState(Communicator& comm, int root) = 0;
};

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_REPLICA_H_
