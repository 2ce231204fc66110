// The training state of one replica and the step that advances it.
//
// A Trainer owns one full replica of the logical state: parameters, AdamW moments m and v,
// and the number of completed steps. RunStep computes this rank's share of a step's
// micro-batches (worker/sampler.h), reduces the gradients over the epoch's Communicator and
// applies AdamW, identically on every rank. The mathematics of a step do not depend on the
// world size: the global batch is fixed and each rank only computes a contiguous block of it.
// In deterministic mode each micro-batch gradient is converted to int64 fixed point
// (worker/fixed_point.h) before it is summed, so the result is bit-identical whatever the
// grouping of micro-batches over ranks.
//
// The logical state vector, in canonical order, is params | m | v (each num_parameters()
// floats), followed by the step. It is what checkpoints shard, what broadcasts copy and what
// StateDigest hashes.
//
// The state and the arithmetic live in a Replica (worker/replica.h): on the CPU
// (CpuReplica, the reference) or on one CUDA GPU (CudaReplica; the gradients are then
// reduced in device memory, so the communicator must be NCCL).
//
// Thread-safety: a Trainer is used by one thread (the worker's training thread). It never
// starts threads of its own except the kernels' OpenMP/BLAS workers.
#ifndef SPOTRAIN_WORKER_TRAINER_H_
#define SPOTRAIN_WORKER_TRAINER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/config.pb.h"
#include "worker/communicator.h"
#include "worker/data.h"
#include "worker/replica.h"

namespace spotrain::worker {

struct StepStats {
  int64_t step = 0;         // the step that was run (0-based)
  float loss = 0;           // mean training loss over the global batch
  float grad_norm = 0;      // global gradient L2 norm before clipping
  float lr = 0;             // learning rate applied
  double step_ms = 0;       // wall time of the step on this rank
  int64_t tokens = 0;       // tokens in the global batch
  int64_t control_sum = 0;  // sum over ranks of the `control` value passed to RunStep
};

// The device a Trainer computes on (worker/device.h decides it).
struct TrainerDevice {
  bool cuda = false;  // false: the CPU
  int index = 0;      // CUDA ordinal
};

class Trainer {
 public:
  // Builds the model for config.model() on `device` and opens the train and val datasets.
  // Errors: the config's model is unknown (kInvalidArgument), a data file is missing or bad
  // (the loader's error, naming the file), a CUDA device in a build without CUDA or one
  // that is not usable (kFailedPrecondition), too little device memory (kResourceExhausted).
  // precision "bf16" needs a CUDA device (kInvalidArgument on the CPU).
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const proto::RunConfig& config,
                                                         const TrainerDevice& device = {});

  // Fresh initial state: parameters from the run's seed, zero moments, step 0.
  void InitFresh();

  // Completed steps; the next RunStep runs step `step()`.
  int64_t step() const { return step_; }
  const proto::RunConfig& config() const { return config_; }
  const proto::ModelConfig& model_config() const { return model_config_; }
  int64_t num_parameters() const { return replica_->num_parameters(); }
  // Where the state lives: "cpu" or "cuda:0 (...)".
  std::string device_description() const { return replica_->description(); }
  int num_micro_batches() const { return config_.global_batch() / config_.micro_batch(); }

  // Runs step `step()` on this rank's micro-batches and reduces over `comm` (whose world
  // size and rank decide the share). `control` is summed over the ranks in the same
  // collective round and returned in StepStats::control_sum: the in-band agreement channel
  // for "a plan is pending" (DESIGN.md section 3). On success the state has advanced one
  // step. On error the state is unchanged and the step can be redone in a new epoch:
  // kUnavailable / kAborted from the communicator, kOutOfRange when a deterministic-mode
  // gradient overflows fixed point (names the step), kInternal on a non-finite loss.
  absl::StatusOr<StepStats> RunStep(Communicator& comm, int64_t control = 0);

  // Mean validation loss over eval_batches fixed micro-batches, shared among the ranks of
  // `comm` and summed over it. Does not change the state.
  absl::StatusOr<float> Evaluate(Communicator& comm);

  // Hex SHA-256 of the logical state in canonical order: params, m, v (little-endian fp32),
  // then the step as little-endian int64.
  std::string StateDigest() const;

  // The logical state as flat floats: [0, N) params, [N, 2N) m, [2N, 3N) v.
  int64_t state_floats() const { return 3 * num_parameters(); }
  void ReadState(int64_t offset, int64_t length, float* out) const;
  void WriteState(int64_t offset, int64_t length, const float* in);
  void set_step(int64_t step) { step_ = step; }

  // Makes every rank of `comm` hold the state of rank `root` (parameters, moments, step).
  absl::Status BroadcastState(Communicator& comm, int root);

 private:
  Trainer(proto::RunConfig config, proto::ModelConfig model_config,
          std::unique_ptr<Replica> replica, std::unique_ptr<TokenDataset> train,
          std::unique_ptr<TokenDataset> val);

  proto::RunConfig config_;
  proto::ModelConfig model_config_;
  std::unique_ptr<Replica> replica_;
  std::unique_ptr<TokenDataset> train_;
  std::unique_ptr<TokenDataset> val_;
  std::vector<int32_t> inputs_;
  std::vector<int32_t> targets_;
  int64_t step_ = 0;
};

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_TRAINER_H_
