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
#include "kernels/cpu/ops.h"
#include "worker/fixed_point.h"
#include "worker/optimizer.h"
#include "worker/sampler.h"

namespace spotrain::worker {

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const proto::RunConfig& config) {
  ASSIGN_OR_RETURN(proto::ModelConfig model_config, common::ModelConfigForPreset(config.model()));
  kernels::cpu::CpuContext ctx;
  ctx.threads = config.threads();
  if (config.deterministic() && config.threads() > 1) {
    // The element-wise kernels give identical bits for any thread count; OpenBLAS does not.
    ctx.blas_threads = 1;
    SPOTRAIN_LOG(Info,
                 "deterministic mode: matrix products use 1 OpenBLAS thread (the other "
                 "kernels use %d threads)",
                 config.threads());
  }
  ASSIGN_OR_RETURN(std::unique_ptr<GptModel> model,
                   GptModel::Create(model_config, config.micro_batch(), config.seq_len(), ctx));
  ASSIGN_OR_RETURN(
      std::unique_ptr<TokenDataset> train,
      TokenDataset::Open(config.data().train(), model_config.vocab_size(), config.seq_len()));
  ASSIGN_OR_RETURN(
      std::unique_ptr<TokenDataset> val,
      TokenDataset::Open(config.data().val(), model_config.vocab_size(), config.seq_len()));
  return std::unique_ptr<Trainer>(new Trainer(config, std::move(model_config), std::move(model),
                                              std::move(train), std::move(val)));
}

Trainer::Trainer(proto::RunConfig config, proto::ModelConfig model_config,
                 std::unique_ptr<GptModel> model, std::unique_ptr<TokenDataset> train,
                 std::unique_ptr<TokenDataset> val)
    : config_(std::move(config)),
      model_config_(std::move(model_config)),
      model_(std::move(model)),
      train_(std::move(train)),
      val_(std::move(val)) {
  const int64_t n = model_->num_parameters();
  m_.assign(n, 0.0f);
  v_.assign(n, 0.0f);
  if (config_.deterministic()) fixed_accum_.assign(n, 0);
  const size_t tokens = static_cast<size_t>(config_.micro_batch()) * config_.seq_len();
  inputs_.resize(tokens);
  targets_.resize(tokens);
}

void Trainer::InitFresh() {
  model_->InitParameters(config_.seed());
  std::fill(m_.begin(), m_.end(), 0.0f);
  std::fill(v_.begin(), v_.end(), 0.0f);
  step_ = 0;
}

absl::StatusOr<StepStats> Trainer::RunStep(Communicator& comm, int64_t control) {
  const absl::Time start = absl::Now();
  const int num_micro = num_micro_batches();
  const Range mine = MicroBatchRange(num_micro, comm.world_size(), comm.rank());
  const int64_t n = model_->num_parameters();
  const bool deterministic = config_.deterministic();
  const float inv_micro = 1.0f / static_cast<float>(num_micro);

  double loss_sum = 0;
  model_->ZeroGrads();
  if (deterministic && mine.begin == mine.end) {
    std::fill(fixed_accum_.begin(), fixed_accum_.end(), 0);  // a rank with no micro-batch
  }
  for (int j = mine.begin; j < mine.end; ++j) {
    train_->FillMicroBatch(config_.seed(), step_, j, config_.micro_batch(), inputs_.data(),
                           targets_.data());
    float loss;
    if (deterministic) {
      // Each micro-batch gradient alone, then exact integer accumulation: the sum does not
      // depend on which rank computed which micro-batch. The drain also zeroes the gradient
      // buffer for the next micro-batch, and the first one assigns the accumulator, so no
      // separate zeroing pass over either buffer is needed.
      loss = model_->ForwardBackward(inputs_.data(), targets_.data(), config_.micro_batch(), 1.0f);
      absl::Status st = DrainToFixedPoint(model_->grads(), n, fixed_accum_.data(),
                                          /*assign=*/j == mine.begin);
      if (!st.ok()) {
        return absl::OutOfRangeError(
            absl::StrFormat("step %d, micro-batch %d: gradient does not fit fixed point: %s", step_,
                            j, st.message()));
      }
    } else {
      loss = model_->ForwardBackward(inputs_.data(), targets_.data(), config_.micro_batch(),
                                     inv_micro);
    }
    if (!std::isfinite(loss)) {
      return absl::InternalError(absl::StrFormat(
          "step %d, micro-batch %d: loss is %f; lower optimizer.lr or check the data", step_, j,
          loss));
    }
    loss_sum += loss;
  }

  // The gradient reduction, then one small round carrying the loss and the control value.
  if (deterministic) {
    RETURN_IF_ERROR(
        comm.AllReduceFixedPoint(fixed_accum_.data(), n, 1.0 / num_micro, model_->grads()));
  } else {
    RETURN_IF_ERROR(comm.AllReduceSum(model_->grads(), n));
  }
  double control_buf[2] = {loss_sum, static_cast<double>(control)};
  float control_f[2] = {static_cast<float>(control_buf[0]), static_cast<float>(control_buf[1])};
  RETURN_IF_ERROR(comm.AllReduceSum(control_f, 2));

  // Nothing below can fail: every rank applies the same update to the same state.
  kernels::cpu::CpuContext ctx;
  ctx.threads = config_.threads();
  const double sumsq = kernels::cpu::SumOfSquares(ctx, model_->grads(), n);
  const float grad_norm = static_cast<float>(std::sqrt(sumsq));
  const float lr = LearningRate(step_, config_);
  AdamWStep(ctx, config_.optimizer(), step_ + 1, lr,
            ClipScale(sumsq > 0 ? std::sqrt(sumsq) : 0.0, config_.optimizer().grad_clip()),
            model_->params(), model_->grads(), m_.data(), v_.data(), model_->decay_mask().data(),
            n);

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
    sum[0] += model_->Forward(inputs_.data(), targets_.data(), config_.micro_batch());
  }
  RETURN_IF_ERROR(comm.AllReduceSum(sum, 1));
  return sum[0] / static_cast<float>(batches);
}

float* Trainer::StatePiece(int piece) {
  return piece == 0 ? model_->params() : piece == 1 ? m_.data() : v_.data();
}
const float* Trainer::StatePiece(int piece) const {
  return piece == 0 ? model_->params() : piece == 1 ? m_.data() : v_.data();
}

std::string Trainer::StateDigest() const {
  common::Sha256 sha;
  const int64_t n = model_->num_parameters();
  for (int piece = 0; piece < 3; ++piece) sha.Update(StatePiece(piece), n * sizeof(float));
  const int64_t step = step_;
  sha.Update(&step, sizeof(step));  // x86-64 and aarch64 are little-endian
  return sha.HexDigest();
}

void Trainer::ReadState(int64_t offset, int64_t length, float* out) const {
  const int64_t n = model_->num_parameters();
  SPOTRAIN_CHECK(offset >= 0 && length >= 0 && offset + length <= 3 * n);
  while (length > 0) {
    const int piece = static_cast<int>(offset / n);
    const int64_t within = offset % n;
    const int64_t take = std::min(length, n - within);
    std::memcpy(out, StatePiece(piece) + within, take * sizeof(float));
    out += take;
    offset += take;
    length -= take;
  }
}

void Trainer::WriteState(int64_t offset, int64_t length, const float* in) {
  const int64_t n = model_->num_parameters();
  SPOTRAIN_CHECK(offset >= 0 && length >= 0 && offset + length <= 3 * n);
  while (length > 0) {
    const int piece = static_cast<int>(offset / n);
    const int64_t within = offset % n;
    const int64_t take = std::min(length, n - within);
    std::memcpy(StatePiece(piece) + within, in, take * sizeof(float));
    in += take;
    offset += take;
    length -= take;
  }
}

absl::Status Trainer::BroadcastState(Communicator& comm, int root) {
  const int64_t n = model_->num_parameters();
  for (int piece = 0; piece < 3; ++piece) {
    RETURN_IF_ERROR(comm.Broadcast(StatePiece(piece), n * sizeof(float), root));
  }
  int64_t step = step_;
  RETURN_IF_ERROR(comm.Broadcast(&step, sizeof(step), root));
  step_ = step;
  return absl::OkStatus();
}

}  // namespace spotrain::worker
