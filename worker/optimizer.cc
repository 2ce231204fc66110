#include "worker/optimizer.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace spotrain::worker {

float LearningRate(int64_t step, int64_t total_steps, const proto::OptimizerConfig& config) {
  const double peak = config.lr();
  const int64_t warmup = config.warmup_steps();
  if (step < warmup) return static_cast<float>(peak * static_cast<double>(step + 1) / warmup);
  const double floor = peak * config.min_lr_fraction();
  double progress = 1.0;
  if (total_steps > warmup) {
    progress = static_cast<double>(step - warmup) / static_cast<double>(total_steps - warmup);
    progress = std::min(1.0, std::max(0.0, progress));
  }
  const double coeff = 0.5 * (1.0 + std::cos(M_PI * progress));
  return static_cast<float>(floor + (peak - floor) * coeff);
}

float LearningRate(int64_t step, const proto::RunConfig& config) {
  return LearningRate(step, config.steps(), config.optimizer());
}

float ClipScale(double grad_norm, float grad_clip) {
  if (!(grad_clip > 0.0f)) return 1.0f;
  if (std::isnan(grad_norm)) return std::numeric_limits<float>::quiet_NaN();
  const double scale = grad_clip / (grad_norm + 1e-6);
  return scale < 1.0 ? static_cast<float>(scale) : 1.0f;
}

kernels::cpu::AdamWParams MakeAdamWParams(const proto::OptimizerConfig& config, int64_t t, float lr,
                                          float grad_scale) {
  kernels::cpu::AdamWParams p;
  p.lr = lr;
  p.beta1 = config.beta1();
  p.beta2 = config.beta2();
  p.eps = config.eps();
  p.weight_decay = config.weight_decay();
  p.grad_scale = grad_scale;
  p.t = t;
  return p;
}

void AdamWStep(const kernels::cpu::CpuContext& ctx, const proto::OptimizerConfig& config, int64_t t,
               float lr, float grad_scale, float* params, const float* grads, float* m, float* v,
               const uint8_t* decay_mask, int64_t n) {
  kernels::cpu::AdamWUpdate(ctx, params, grads, m, v, decay_mask, n,
                            MakeAdamWParams(config, t, lr, grad_scale));
}

}  // namespace spotrain::worker
