// The CPU replica (worker/replica.h): GptModel on the CPU kernels, AdamW moments and the
// deterministic mode's fixed-point accumulator in host memory. The reference every other
// device is tested against.
#ifndef SPOTRAIN_WORKER_CPU_REPLICA_H_
#define SPOTRAIN_WORKER_CPU_REPLICA_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cpu/ops.h"
#include "worker/model.h"
#include "worker/replica.h"

namespace spotrain::worker {

class CpuReplica : public Replica {
 public:
  // The model for `model_config`, micro-batches of config.micro_batch() x config.seq_len();
  // config.threads() kernel threads (1 OpenBLAS thread in deterministic mode: OpenBLAS
  // gives different bits for different thread counts). GptModel::Create's errors.
  static absl::StatusOr<std::unique_ptr<CpuReplica>> Create(const proto::ModelConfig& model_config,
                                                            const proto::RunConfig& config);

  int64_t num_parameters() const override { return model_->num_parameters(); }
  std::string description() const override { return "cpu"; }
  absl::Status InitFresh(uint64_t seed) override;
  absl::Status ZeroGrads() override;
  absl::StatusOr<float> MicroBatch(const int32_t* inputs, const int32_t* targets, int B,
                                   float grad_scale, bool deterministic, bool first) override;
  absl::Status ClearAccumulator() override;
  absl::Status ReduceGradients(Communicator& comm, bool deterministic, double factor) override;
  absl::StatusOr<double> GradSumOfSquares() override;
  absl::Status ApplyAdamW(const proto::OptimizerConfig& config, int64_t t, float lr,
                          float clip_scale) override;
  absl::StatusOr<float> Forward(const int32_t* inputs, const int32_t* targets, int B) override;
  void ReadState(int64_t offset, int64_t length, float* out) const override;
  void WriteState(int64_t offset, int64_t length, const float* in) override;
  absl::Status BroadcastState(Communicator& comm, int root) override;

 private:
  CpuReplica(std::unique_ptr<GptModel> model, kernels::cpu::CpuContext ctx, bool deterministic);
  float* StatePiece(int piece);
  const float* StatePiece(int piece) const;

  std::unique_ptr<GptModel> model_;
  kernels::cpu::CpuContext ctx_;  // SumOfSquares and AdamW
  std::vector<float> m_;
  std::vector<float> v_;
  std::vector<int64_t> fixed_accum_;  // deterministic mode only
};

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_CPU_REPLICA_H_
