#include "worker/cpu_replica.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "common/check.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "worker/fixed_point.h"
#include "worker/optimizer.h"

namespace spotrain::worker {

absl::StatusOr<std::unique_ptr<CpuReplica>> CpuReplica::Create(
    const proto::ModelConfig& model_config, const proto::RunConfig& config) {
  kernels::cpu::CpuContext ctx;
  ctx.threads = config.threads();
  kernels::cpu::CpuContext model_ctx = ctx;
  if (config.deterministic() && config.threads() > 1) {
    // The element-wise kernels give identical bits for any thread count; OpenBLAS does not.
    model_ctx.blas_threads = 1;
    SPOTRAIN_LOG(Info,
                 "deterministic mode: matrix products use 1 OpenBLAS thread (the other "
                 "kernels use %d threads)",
                 config.threads());
  }
  ASSIGN_OR_RETURN(
      std::unique_ptr<GptModel> model,
      GptModel::Create(model_config, config.micro_batch(), config.seq_len(), model_ctx));
  return std::unique_ptr<CpuReplica>(new CpuReplica(std::move(model), ctx, config.deterministic()));
}

CpuReplica::CpuReplica(std::unique_ptr<GptModel> model, kernels::cpu::CpuContext ctx,
                       bool deterministic)
    : model_(std::move(model)), ctx_(ctx) {
  const int64_t n = model_->num_parameters();
  m_.assign(n, 0.0f);
  v_.assign(n, 0.0f);
  if (deterministic) fixed_accum_.assign(n, 0);
}

absl::Status CpuReplica::InitFresh(uint64_t seed) {
  model_->InitParameters(seed);
  std::fill(m_.begin(), m_.end(), 0.0f);
  std::fill(v_.begin(), v_.end(), 0.0f);
  return absl::OkStatus();
}

absl::Status CpuReplica::ZeroGrads() {
  model_->ZeroGrads();
  return absl::OkStatus();
}

absl::StatusOr<float> CpuReplica::MicroBatch(const int32_t* inputs, const int32_t* targets, int B,
                                             float grad_scale, bool deterministic, bool first) {
  if (!deterministic) return model_->ForwardBackward(inputs, targets, B, grad_scale);
  // The micro-batch gradient alone, then exact integer accumulation: the sum does not
  // depend on which rank computed which micro-batch. The drain also zeroes the gradient
  // buffer for the next micro-batch, and the first one assigns the accumulator, so no
  // separate zeroing pass over either buffer is needed.
  const float loss = model_->ForwardBackward(inputs, targets, B, 1.0f);
  RETURN_IF_ERROR(
      DrainToFixedPoint(model_->grads(), model_->num_parameters(), fixed_accum_.data(), first));
  return loss;
}

absl::Status CpuReplica::ClearAccumulator() {
  std::fill(fixed_accum_.begin(), fixed_accum_.end(), 0);
  return absl::OkStatus();
}

absl::Status CpuReplica::ReduceGradients(Communicator& comm, bool deterministic, double factor) {
  const int64_t n = model_->num_parameters();
  if (deterministic)
    return comm.AllReduceFixedPoint(fixed_accum_.data(), n, factor, model_->grads());
  return comm.AllReduceSum(model_->grads(), n);
}

absl::StatusOr<double> CpuReplica::GradSumOfSquares() {
  return kernels::cpu::SumOfSquares(ctx_, model_->grads(), model_->num_parameters());
}

absl::Status CpuReplica::ApplyAdamW(const proto::OptimizerConfig& config, int64_t t, float lr,
                                    float clip_scale) {
  AdamWStep(ctx_, config, t, lr, clip_scale, model_->params(), model_->grads(), m_.data(),
            v_.data(), model_->decay_mask().data(), model_->num_parameters());
  return absl::OkStatus();
}

absl::StatusOr<float> CpuReplica::Forward(const int32_t* inputs, const int32_t* targets, int B) {
  return model_->Forward(inputs, targets, B);
}

float* CpuReplica::StatePiece(int piece) {
  return piece == 0 ? model_->params() : piece == 1 ? m_.data() : v_.data();
}
const float* CpuReplica::StatePiece(int piece) const {
  return piece == 0 ? model_->params() : piece == 1 ? m_.data() : v_.data();
}

namespace {

// Calls fn(piece, within, take, done) for each piece (params, m, v; n floats each) that the
// logical range [offset, offset + length) covers: `take` floats from `within` in the piece,
// which are floats [done, done + take) of the range.
template <typename Fn>
void ForEachStatePiece(int64_t n, int64_t offset, int64_t length, Fn fn) {
  SPOTRAIN_CHECK(offset >= 0 && length >= 0 && offset + length <= 3 * n);
  for (int64_t done = 0; done < length;) {
    const int piece = static_cast<int>((offset + done) / n);
    const int64_t within = (offset + done) % n;
    const int64_t take = std::min(length - done, n - within);
    fn(piece, within, take, done);
    done += take;
  }
}

}  // namespace

void CpuReplica::ReadState(int64_t offset, int64_t length, float* out) const {
  ForEachStatePiece(model_->num_parameters(), offset, length,
                    [&](int piece, int64_t within, int64_t take, int64_t done) {
                      std::memcpy(out + done, StatePiece(piece) + within, take * sizeof(float));
                    });
}

void CpuReplica::WriteState(int64_t offset, int64_t length, const float* in) {
  ForEachStatePiece(model_->num_parameters(), offset, length,
                    [&](int piece, int64_t within, int64_t take, int64_t done) {
                      std::memcpy(StatePiece(piece) + within, in + done, take * sizeof(float));
                    });
}

absl::Status CpuReplica::BroadcastState(Communicator& comm, int root) {
  const int64_t n = model_->num_parameters();
  for (int piece = 0; piece < 3; ++piece) {
    RETURN_IF_ERROR(comm.Broadcast(StatePiece(piece), n * sizeof(float), root));
  }
  return absl::OkStatus();
}

}  // namespace spotrain::worker
