// Tests of worker/optimizer.h: the learning-rate schedule, the clipping scale and one AdamW
// step against values computed by hand.
#include "worker/optimizer.h"

#include <cmath>
#include <limits>
#include <vector>

#include "gtest/gtest.h"

namespace spotrain::worker {
namespace {

proto::OptimizerConfig Config(float lr, int warmup, float min_fraction) {
  proto::OptimizerConfig c;
  c.set_lr(lr);
  c.set_warmup_steps(warmup);
  c.set_min_lr_fraction(min_fraction);
  c.set_weight_decay(0.1f);
  c.set_grad_clip(1.0f);
  c.set_beta1(0.9f);
  c.set_beta2(0.95f);
  c.set_eps(1e-8f);
  return c;
}

TEST(LearningRateTest, WarmupIsLinear) {
  const proto::OptimizerConfig c = Config(1e-3f, 10, 0.1f);
  EXPECT_FLOAT_EQ(LearningRate(0, 100, c), 1e-4f);
  EXPECT_FLOAT_EQ(LearningRate(4, 100, c), 5e-4f);
  EXPECT_FLOAT_EQ(LearningRate(9, 100, c), 1e-3f);
}

TEST(LearningRateTest, CosineDecaysToFloorAtTotalSteps) {
  const proto::OptimizerConfig c = Config(1e-3f, 10, 0.1f);
  EXPECT_FLOAT_EQ(LearningRate(10, 110, c), 1e-3f);  // peak at the end of warmup
  // Halfway through the decay: the mean of peak and floor.
  EXPECT_FLOAT_EQ(LearningRate(60, 110, c), 0.5f * (1e-3f + 1e-4f));
  // A quarter of the way: floor + (peak - floor) * (1 + cos(pi/4)) / 2.
  EXPECT_NEAR(LearningRate(35, 110, c), 1e-4 + 9e-4 * (1 + std::cos(M_PI / 4)) / 2, 1e-9);
  EXPECT_FLOAT_EQ(LearningRate(110, 110, c), 1e-4f);
  EXPECT_FLOAT_EQ(LearningRate(500, 110, c), 1e-4f);  // clamped past the end
  // Monotone non-increasing after warmup.
  for (int s = 10; s < 110; ++s) EXPECT_GE(LearningRate(s, 110, c), LearningRate(s + 1, 110, c));
}

TEST(LearningRateTest, NoWarmupAndRunConfigOverload) {
  const proto::OptimizerConfig c = Config(2e-3f, 0, 0.0f);
  EXPECT_FLOAT_EQ(LearningRate(0, 50, c), 2e-3f);
  EXPECT_FLOAT_EQ(LearningRate(25, 50, c), 1e-3f);
  EXPECT_NEAR(LearningRate(50, 50, c), 0.0f, 1e-12);
  proto::RunConfig run;
  run.set_steps(50);
  *run.mutable_optimizer() = c;
  EXPECT_EQ(LearningRate(25, run), LearningRate(25, 50, c));
  // Warmup longer than the run: only warmup values.
  const proto::OptimizerConfig long_warmup = Config(1e-3f, 100, 0.1f);
  EXPECT_FLOAT_EQ(LearningRate(49, 50, long_warmup), 5e-4f);
}

TEST(ClipScaleTest, Values) {
  EXPECT_EQ(ClipScale(0.5, 1.0f), 1.0f);
  EXPECT_FLOAT_EQ(ClipScale(1.0, 1.0f), static_cast<float>(1.0 / (1.0 + 1e-6)));
  EXPECT_NEAR(ClipScale(4.0, 1.0f), 0.25f, 1e-7);
  EXPECT_NEAR(ClipScale(10.0, 2.0f), 0.2f, 1e-7);
  EXPECT_EQ(ClipScale(1e9, 0.0f), 1.0f);  // disabled
  EXPECT_EQ(ClipScale(std::numeric_limits<double>::infinity(), 1.0f), 0.0f);
  EXPECT_TRUE(std::isnan(ClipScale(std::nan(""), 1.0f)));
}

TEST(AdamWStepTest, MatchesHandComputedSteps) {
  proto::OptimizerConfig c = Config(0.1f, 0, 0.1f);
  const kernels::cpu::CpuContext ctx{1};
  // Two parameters, the first decayed, the second not; gradient 1.0 scaled by 0.5.
  std::vector<float> p = {1.0f, 1.0f}, g = {1.0f, 1.0f}, m = {0, 0}, v = {0, 0};
  const std::vector<uint8_t> mask = {1, 0};
  AdamWStep(ctx, c, /*t=*/1, /*lr=*/0.1f, /*grad_scale=*/0.5f, p.data(), g.data(), m.data(),
            v.data(), mask.data(), 2);
  // g = 0.5: m = 0.05, v = 0.0125; m_hat = 0.5, v_hat = 0.25, m_hat / sqrt(v_hat) = 1.
  EXPECT_FLOAT_EQ(m[0], 0.05f);
  EXPECT_FLOAT_EQ(v[0], 0.0125f);
  EXPECT_FLOAT_EQ(p[0], 1.0f - 0.1f * (1.0f + 0.1f * 1.0f));  // 0.89
  EXPECT_FLOAT_EQ(p[1], 1.0f - 0.1f * 1.0f);                  // 0.9, no decay
  // Step 2 with gradient -1 (scaled to -0.5).
  g = {-1.0f, -1.0f};
  AdamWStep(ctx, c, 2, 0.1f, 0.5f, p.data(), g.data(), m.data(), v.data(), mask.data(), 2);
  // m = 0.9*0.05 - 0.05 = -0.005; v = 0.95*0.0125 + 0.05*0.25 = 0.024375
  // m_hat = -0.005/0.19, v_hat = 0.024375/0.0975 = 0.25
  const double m_hat = -0.005 / 0.19, v_hat = 0.024375 / 0.0975;
  const double upd = m_hat / (std::sqrt(v_hat) + 1e-8);
  EXPECT_NEAR(m[0], -0.005, 1e-8);
  EXPECT_NEAR(v[0], 0.024375, 1e-8);
  EXPECT_NEAR(p[0], 0.89 - 0.1 * (upd + 0.1 * 0.89), 1e-6);
  EXPECT_NEAR(p[1], 0.9 - 0.1 * upd, 1e-6);
}

TEST(AdamWStepTest, ParamsComeFromConfig) {
  proto::OptimizerConfig c = Config(0.1f, 0, 0.1f);
  c.set_beta1(0.8f);
  c.set_beta2(0.99f);
  c.set_eps(1e-6f);
  c.set_weight_decay(0.05f);
  const kernels::cpu::AdamWParams p = MakeAdamWParams(c, 7, 0.03f, 0.5f);
  EXPECT_EQ(p.lr, 0.03f);
  EXPECT_EQ(p.beta1, 0.8f);
  EXPECT_EQ(p.beta2, 0.99f);
  EXPECT_EQ(p.eps, 1e-6f);
  EXPECT_EQ(p.weight_decay, 0.05f);
  EXPECT_EQ(p.grad_scale, 0.5f);
  EXPECT_EQ(p.t, 7);
}

}  // namespace
}  // namespace spotrain::worker
