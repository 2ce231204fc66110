// The optimiser's arithmetic: the learning-rate schedule, gradient-clipping scale and the
// AdamW step over the flat parameter vector (through kernels/cpu AdamWUpdate). Pure
// functions of their arguments; thread-safe (AdamWStep writes only the buffers it is
// given, and may use ctx.threads threads).
#ifndef SPOTRAIN_WORKER_OPTIMIZER_H_
#define SPOTRAIN_WORKER_OPTIMIZER_H_

#include <cstdint>

#include "kernels/cpu/ops.h"
#include "proto/config.pb.h"

namespace spotrain::worker {

// Learning rate for the step with 0-based index `step` (the step that takes the state from
// `step` completed steps to step + 1), with W = warmup_steps, S = total_steps, peak = lr
// and floor = lr * min_lr_fraction:
//   step < W:  peak * (step + 1) / W            (linear warmup from 0; reaches peak at W - 1)
//   step >= W: floor + (peak - floor) * 0.5 * (1 + cos(pi * p)),
//              p = (step - W) / (S - W) clamped to [0, 1] (1 when S <= W)
// so the cosine starts at peak at step W and reaches floor at step S.
// `config` must carry the defaults (common::ApplyDefaults).
float LearningRate(int64_t step, int64_t total_steps, const proto::OptimizerConfig& config);
// Same, with total_steps = config.steps() and config.optimizer().
float LearningRate(int64_t step, const proto::RunConfig& config);

// Factor applied to the gradients so that their global L2 norm is at most grad_clip:
// min(1, grad_clip / (grad_norm + 1e-6)); 1 when grad_clip <= 0 (clipping disabled). A NaN
// norm gives NaN (the caller decides what a non-finite gradient means); an infinite norm
// gives 0.
float ClipScale(double grad_norm, float grad_clip);

// The AdamW kernel parameters for step t (1-based: t = step + 1) at learning rate lr, with
// the gradients multiplied by grad_scale first (the clipping scale, possibly times a
// 1/world averaging factor).
kernels::cpu::AdamWParams MakeAdamWParams(const proto::OptimizerConfig& config, int64_t t, float lr,
                                          float grad_scale);

// One AdamW step (decoupled weight decay where decay_mask is 1, bias correction with the
// 1-based step t) over n parameters, updating params, m and v in place:
//   g = grad * grad_scale; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2
//   param -= lr * (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd * mask * param)
void AdamWStep(const kernels::cpu::CpuContext& ctx, const proto::OptimizerConfig& config, int64_t t,
               float lr, float grad_scale, float* params, const float* grads, float* m, float* v,
               const uint8_t* decay_mask, int64_t n);

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_OPTIMIZER_H_
