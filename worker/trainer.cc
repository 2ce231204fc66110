#include "worker/trainer.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/check.h"
#include "common/hash.h"
#include "common/logging.h"
#include "common/model_presets.h"
#include "common/status_macros.h"
#include "worker/cpu_replica.h"
#include "worker/optimizer.h"
#include "worker/sampler.h"
#if SPOTRAIN_HAVE_CUDA
#include "worker/cuda_replica.h"
#endif

namespace spotrain::worker {

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const proto::RunConfig& config,
                                                         const TrainerDevice& device) {
  ASSIGN_OR_RETURN(proto::ModelConfig model_config, common::ModelConfigForPreset(config.model()));
  std::unique_ptr<Replica> replica;
  if (device.cuda) {
#if SPOTRAIN_HAVE_CUDA
    ASSIGN_OR_RETURN(replica, CudaReplica::Create(model_config, config, device.index));
#else
    return absl::FailedPreconditionError(
        "this spotrain-worker was built without CUDA: it cannot train on a GPU (rebuild on a "
        "machine with the CUDA toolkit, or use --device cpu)");
#endif
  } else {
    if (config.precision() == "bf16") {
      return absl::InvalidArgumentError(
          "precision \"bf16\" needs a GPU (--device cuda); the CPU trains in fp32");
    }
    ASSIGN_OR_RETURN(replica, CpuReplica::Create(model_config, config));
  }
  ASSIGN_OR_RETURN(
      std::unique_ptr<TokenDataset> train,
      TokenDataset::Open(config.data().train(), model_config.vocab_size(), config.seq_len()));
  ASSIGN_OR_RETURN(
      std::unique_ptr<TokenDataset> val,
      TokenDataset::Open(config.data().val(), model_config.vocab_size(), config.seq_len()));
  return std::unique_ptr<Trainer>(new Trainer(config, std::move(model_config), std::move(replica),
                                              std::move(train), std::move(val)));
}

Trainer::Trainer(proto::RunConfig config, proto::ModelConfig model_config,
                 std::unique_ptr<Replica> replica, std::unique_ptr<TokenDataset> train,
                 std::unique_ptr<TokenDataset> val)
    : config_(std::move(config)),
      model_config_(std::move(model_config)),
      replica_(std::move(replica)),
      train_(std::move(train)),
      val_(std::move(val)) {
  const size_t tokens = static_cast<size_t>(config_.micro_batch()) * config_.seq_len();
  inputs_.resize(tokens);
  targets_.resize(tokens);
}

void Trainer::InitFresh() {
  const absl::Status st = replica_->InitFresh(config_.seed());
  if (!st.ok()) {
    SPOTRAIN_LOG(Error, "initialising the parameters on %s failed: %s", replica_->description(),
                 st.ToString());
  }
  SPOTRAIN_CHECK(st.ok());
  step_ = 0;
}

absl::StatusOr<StepStats> Trainer::RunStep(Communicator& comm, int64_t control) {
  const absl::Time start = absl::Now();
  const int num_micro = num_micro_batches();
  const Range mine = MicroBatchRange(num_micro, comm.world_size(), comm.rank());
  const bool deterministic = config_.deterministic();
  const float inv_micro = 1.0f / static_cast<float>(num_micro);

  double loss_sum = 0;
  RETURN_IF_ERROR(replica_->ZeroGrads());
  if (deterministic && mine.begin == mine.end) {
    RETURN_IF_ERROR(replica_->ClearAccumulator());  // a rank with no micro-batch
  }
  for (int j = mine.begin; j < mine.end; ++j) {
    train_->FillMicroBatch(config_.seed(), step_, j, config_.micro_batch(), inputs_.data(),
                           targets_.data());
    absl::StatusOr<float> loss =
        replica_->MicroBatch(inputs_.data(), targets_.data(), config_.micro_batch(), inv_micro,
                             deterministic, /*first=*/j == mine.begin);
    if (!loss.ok()) {
      if (absl::IsOutOfRange(loss.status())) {
        return absl::OutOfRangeError(
            absl::StrFormat("step %d, micro-batch %d: gradient does not fit fixed point: %s", step_,
                            j, loss.status().message()));
      }
      return loss.status();
    }
    if (!std::isfinite(*loss)) {
      return absl::InternalError(absl::StrFormat(
          "step %d, micro-batch %d: loss is %f; lower optimizer.lr or check the data", step_, j,
          *loss));
    }
    loss_sum += *loss;
  }

  // The gradient reduction, then one small round carrying the loss and the control value.
  RETURN_IF_ERROR(replica_->ReduceGradients(comm, deterministic, 1.0 / num_micro));
  double control_buf[2] = {loss_sum, static_cast<double>(control)};
  float control_f[2] = {static_cast<float>(control_buf[0]), static_cast<float>(control_buf[1])};
  RETURN_IF_ERROR(comm.AllReduceSum(control_f, 2));

  // Every rank applies the same update to the same state (a failure here is a device
  // fault, not a disagreement).
  ASSIGN_OR_RETURN(const double sumsq, replica_->GradSumOfSquares());
  const float grad_norm = static_cast<float>(std::sqrt(sumsq));
  const float lr = LearningRate(step_, config_);
  RETURN_IF_ERROR(replica_->ApplyAdamW(
      config_.optimizer(), step_ + 1, lr,
      ClipScale(sumsq > 0 ? std::sqrt(sumsq) : 0.0, config_.optimizer().grad_clip())));

  StepStats stats;
  stats.step = step_;
  stats.loss = control_f[0] / static_cast<float>(num_micro);
  stats.grad_norm = grad_norm;
  stats.lr = lr;
  stats.tokens = static_cast<int64_t>(config_.global_batch()) * config_.seq_len();
  stats.control_sum = static_cast<int64_t>(std::llround(control_f[1]));
  ++step_;
  stats.step_ms = absl::ToDoubleMilliseconds(absl::Now() - start);
  return stats;
}

absl::StatusOr<float> Trainer::Evaluate(Communicator& comm) {
  const int batches = config_.eval_batches();
  const Range mine = MicroBatchRange(batches, comm.world_size(), comm.rank());
  float sum[1] = {0};
  for (int e = mine.begin; e < mine.end; ++e) {
    val_->FillEvalBatch(config_.seed(), e, config_.micro_batch(), inputs_.data(), targets_.data());
    ASSIGN_OR_RETURN(const float loss,
                     replica_->Forward(inputs_.data(), targets_.data(), config_.micro_batch()));
    sum[0] += loss;
  }
  RETURN_IF_ERROR(comm.AllReduceSum(sum, 1));
  return sum[0] / static_cast<float>(batches);
}

std::string Trainer::StateDigest() const {
  common::Sha256 sha;
  // In pieces of at most 16 Mi floats, so that a device replica stages little host memory.
  constexpr int64_t kPiece = int64_t{1} << 24;
  std::vector<float> buffer(std::min(kPiece, state_floats()));
  for (int64_t offset = 0; offset < state_floats(); offset += kPiece) {
    const int64_t take = std::min(kPiece, state_floats() - offset);
    replica_->ReadState(offset, take, buffer.data());
    sha.Update(buffer.data(), take * sizeof(float));
  }
  const int64_t step = step_;
  sha.Update(&step, sizeof(step));  // x86-64 and aarch64 are little-endian
  return sha.HexDigest();
}

void Trainer::ReadState(int64_t offset, int64_t length, float* out) const {
  replica_->ReadState(offset, length, out);
}

void Trainer::WriteState(int64_t offset, int64_t length, const float* in) {
  replica_->WriteState(offset, length, in);
}

absl::Status Trainer::BroadcastState(Communicator& comm, int root) {
  RETURN_IF_ERROR(replica_->BroadcastState(comm, root));
  int64_t step = step_;
  RETURN_IF_ERROR(comm.Broadcast(&step, sizeof(step), root));
  step_ = step;
  return absl::OkStatus();
}

}  // namespace spotrain::worker
