// The CUDA GPT model (worker/cuda_model.h) against the CPU model (worker/model.h): a whole
// training step (loss, every gradient tensor, AdamW) in fp32 and bf16, on a small model and
// on the real GPT-2 124M shape; bf16 against fp32 on the GPU at GPT-2 124M with T = 1024;
// determinism (the same step twice gives the same bits); and input validation. GPU tests
// skip without a usable GPU.
#include "worker/cuda_model.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "common/model_presets.h"
#include "gtest/gtest.h"
#include "kernels/cpu/ops.h"
#include "tests/gpu/gpu_test_util.h"
#include "worker/model.h"

namespace spotrain::worker {
namespace {

using testing_gpu::BitIdentical;
using testing_gpu::ExpectAllClose;
using testing_gpu::RandomTokens;
using testing_gpu::RelativeL2;

proto::ModelConfig SmallConfig() {
  proto::ModelConfig c;
  c.set_preset("test-small");
  c.set_vocab_size(100);
  c.set_padded_vocab(128);
  c.set_max_seq_len(64);
  c.set_num_layers(2);
  c.set_num_heads(4);
  c.set_channels(64);
  c.set_num_parameters(common::CountParameters(c));
  return c;
}

std::unique_ptr<GptModel> MakeCpuModel(const proto::ModelConfig& config, int B, int T,
                                       uint64_t seed) {
  auto model = GptModel::Create(config, B, T, kernels::cpu::CpuContext{4});
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return nullptr;
  (*model)->InitParameters(seed);
  return std::move(model).value();
}

std::unique_ptr<CudaGptModel> MakeGpuModel(const proto::ModelConfig& config, int B, int T,
                                           CudaPrecision precision, const GptModel& init) {
  CudaModelOptions options;
  options.precision = precision;
  options.deterministic = true;
  auto model = CudaGptModel::Create(config, B, T, options);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return nullptr;
  EXPECT_EQ((*model)->num_parameters(), init.num_parameters());
  EXPECT_TRUE((*model)->CopyParamsFromHost(init.params()).ok());
  return std::move(model).value();
}

std::vector<float> Slice(const std::vector<float>& v, int64_t offset, int64_t size) {
  return std::vector<float>(v.begin() + offset, v.begin() + offset + size);
}

double MaxAbs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, static_cast<double>(std::fabs(x)));
  return m;
}

// Per tensor: fp32 gradients agree element-wise (tolerance scaled by the tensor's largest
// gradient); bf16 ones in relative L2 norm.
void CompareGrads(const GptModel& cpu, const std::vector<float>& gpu_grads, bool bf16,
                  double bf16_rel_l2) {
  const std::vector<float> cpu_grads(cpu.grads(), cpu.grads() + cpu.num_parameters());
  ASSERT_EQ(cpu.tensors().size(), 16u);
  for (const GptModel::TensorInfo& t : cpu.tensors()) {
    const auto want = Slice(cpu_grads, t.offset, t.size);
    const auto got = Slice(gpu_grads, t.offset, t.size);
    const double scale = MaxAbs(want);
    if (bf16) {
      // Printed so that the run's log records how far bf16 is from fp32, tensor by tensor.
      const double rel = RelativeL2(got, want);
      std::printf("  bf16 vs fp32 gradient %-9s relative L2 %.2e (max |grad| %.2e)\n",
                  t.name.c_str(), rel, scale);
      EXPECT_LT(rel, bf16_rel_l2) << t.name << " (max |grad| " << scale << ")";
    } else {
      ExpectAllClose(t.name, got, want, static_cast<float>(1e-4 * scale), 1e-3f);
      EXPECT_LT(RelativeL2(got, want), 1e-4) << t.name;
    }
  }
}

class CudaModelTest : public ::testing::Test {
 protected:
  void SetUp() override { SPOTRAIN_SKIP_WITHOUT_GPU(); }
};

// Shape validation happens before the device is touched, so it runs anywhere.
TEST(CudaModelValidationTest, RejectsInconsistentShapes) {
  proto::ModelConfig bad_heads = SmallConfig();
  bad_heads.set_num_heads(5);
  bad_heads.set_num_parameters(0);
  EXPECT_EQ(CudaGptModel::Create(bad_heads, 2, 16, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CudaGptModel::Create(SmallConfig(), 2, 65, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CudaGptModel::Create(SmallConfig(), 0, 16, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  proto::ModelConfig wrong_count = SmallConfig();
  wrong_count.set_num_parameters(123);
  EXPECT_EQ(CudaGptModel::Create(wrong_count, 2, 16, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseCudaPrecision("fp16").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(*ParseCudaPrecision("bf16"), CudaPrecision::kBf16);
  EXPECT_EQ(*ParseCudaPrecision(""), CudaPrecision::kFp32);
}

TEST_F(CudaModelTest, LayoutMatchesCpuModel) {
  const auto config = SmallConfig();
  auto cpu = MakeCpuModel(config, 2, 32, 1);
  auto gpu = MakeGpuModel(config, 2, 32, CudaPrecision::kFp32, *cpu);
  ASSERT_NE(gpu, nullptr);
  ASSERT_EQ(gpu->tensors().size(), cpu->tensors().size());
  for (size_t i = 0; i < cpu->tensors().size(); ++i) {
    EXPECT_EQ(gpu->tensors()[i].name, cpu->tensors()[i].name);
    EXPECT_EQ(gpu->tensors()[i].offset, cpu->tensors()[i].offset);
    EXPECT_EQ(gpu->tensors()[i].size, cpu->tensors()[i].size);
    EXPECT_EQ(gpu->tensors()[i].decay, cpu->tensors()[i].decay);
  }
  std::vector<float> back(gpu->num_parameters());
  ASSERT_TRUE(gpu->CopyParamsToHost(back.data()).ok());
  EXPECT_TRUE(
      BitIdentical(back, std::vector<float>(cpu->params(), cpu->params() + cpu->num_parameters())));
}

TEST_F(CudaModelTest, Fp32StepMatchesCpu) {
  const auto config = SmallConfig();
  const int B = 4, T = 32;  // T below the context: wpe rows past T stay untouched
  auto cpu = MakeCpuModel(config, B, T, 7);
  auto gpu = MakeGpuModel(config, B, T, CudaPrecision::kFp32, *cpu);
  ASSERT_NE(gpu, nullptr);
  const auto inputs = RandomTokens(B * T, config.vocab_size(), 8);
  const auto targets = RandomTokens(B * T, config.vocab_size(), 9);

  cpu->ZeroGrads();
  const float cpu_loss = cpu->ForwardBackward(inputs.data(), targets.data(), B, 0.5f);
  ASSERT_TRUE(gpu->ZeroGrads().ok());
  auto gpu_loss = gpu->ForwardBackward(inputs.data(), targets.data(), B, 0.5f);
  ASSERT_TRUE(gpu_loss.ok()) << gpu_loss.status();
  EXPECT_NEAR(*gpu_loss, cpu_loss, 1e-5 * cpu_loss);
  std::vector<float> grads(gpu->num_parameters());
  ASSERT_TRUE(gpu->CopyGradsToHost(grads.data()).ok());
  CompareGrads(*cpu, grads, /*bf16=*/false, 0);

  // Gradient norm.
  auto gpu_ss = gpu->GradSumOfSquares();
  ASSERT_TRUE(gpu_ss.ok());
  const double cpu_ss =
      kernels::cpu::SumOfSquares(kernels::cpu::CpuContext{1}, cpu->grads(), cpu->num_parameters());
  EXPECT_NEAR(*gpu_ss, cpu_ss, 1e-4 * cpu_ss);

  // A micro-batch smaller than the maximum, accumulated onto the existing gradients.
  const float cpu_loss2 = cpu->ForwardBackward(inputs.data(), targets.data(), 2, 1.0f);
  auto gpu_loss2 = gpu->ForwardBackward(inputs.data(), targets.data(), 2, 1.0f);
  ASSERT_TRUE(gpu_loss2.ok()) << gpu_loss2.status();
  EXPECT_NEAR(*gpu_loss2, cpu_loss2, 1e-5 * cpu_loss2);
  ASSERT_TRUE(gpu->CopyGradsToHost(grads.data()).ok());
  CompareGrads(*cpu, grads, /*bf16=*/false, 0);

  // AdamW on identical gradients: the device step (with the model's decay mask) matches.
  ASSERT_TRUE(gpu->CopyGradsFromHost(cpu->grads()).ok());
  std::vector<float> m(cpu->num_parameters(), 0.f), v(cpu->num_parameters(), 0.f);
  kernels::cpu::AdamWParams cp{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.8f, 1};
  kernels::cpu::AdamWUpdate(kernels::cpu::CpuContext{1}, cpu->params(), cpu->grads(), m.data(),
                            v.data(), cpu->decay_mask().data(), cpu->num_parameters(), cp);
  ASSERT_TRUE(gpu->AdamWStep({1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.8f, 1}).ok());
  std::vector<float> params(gpu->num_parameters());
  ASSERT_TRUE(gpu->CopyParamsToHost(params.data()).ok());
  ExpectAllClose("params after AdamW", params,
                 std::vector<float>(cpu->params(), cpu->params() + cpu->num_parameters()), 1e-7f,
                 1e-6f);
  std::vector<float> gm(gpu->num_parameters()), gv(gpu->num_parameters());
  ASSERT_TRUE(gpu->CopyMomentsToHost(gm.data(), gv.data()).ok());
  ExpectAllClose("m", gm, m, 1e-12f, 1e-6f);
  ExpectAllClose("v", gv, v, 1e-15f, 1e-6f);
}

// T = 512: the attention's packed softmax kernels (rows of whole 16-byte packs) and its
// products by causal position blocks (2 at this length) run, which the T <= 64 tests above
// do not reach; fp32 must match the CPU as closely as there, bf16 as loosely.
TEST_F(CudaModelTest, LongSequenceStepMatchesCpu) {
  auto config = SmallConfig();
  config.set_max_seq_len(512);
  config.set_num_parameters(common::CountParameters(config));
  const int B = 2, T = 512;
  auto cpu = MakeCpuModel(config, B, T, 71);
  ASSERT_NE(cpu, nullptr);
  const auto inputs = RandomTokens(B * T, config.vocab_size(), 72);
  const auto targets = RandomTokens(B * T, config.vocab_size(), 73);
  cpu->ZeroGrads();
  const float cpu_loss = cpu->ForwardBackward(inputs.data(), targets.data(), B, 1.0f);
  for (CudaPrecision precision : {CudaPrecision::kFp32, CudaPrecision::kBf16}) {
    SCOPED_TRACE(CudaPrecisionName(precision));
    const bool bf16 = precision == CudaPrecision::kBf16;
    auto gpu = MakeGpuModel(config, B, T, precision, *cpu);
    ASSERT_NE(gpu, nullptr);
    ASSERT_TRUE(gpu->ZeroGrads().ok());
    auto loss = gpu->ForwardBackward(inputs.data(), targets.data(), B, 1.0f);
    ASSERT_TRUE(loss.ok()) << loss.status();
    EXPECT_NEAR(*loss, cpu_loss, (bf16 ? 1e-2 : 1e-5) * cpu_loss);
    std::vector<float> grads(gpu->num_parameters());
    ASSERT_TRUE(gpu->CopyGradsToHost(grads.data()).ok());
    CompareGrads(*cpu, grads, bf16, 0.1);
  }
}

TEST_F(CudaModelTest, ForwardOnlyMatchesAndLeavesGradsAlone) {
  const auto config = SmallConfig();
  const int B = 2, T = 64;
  auto cpu = MakeCpuModel(config, B, T, 11);
  for (CudaPrecision precision : {CudaPrecision::kFp32, CudaPrecision::kBf16}) {
    auto gpu = MakeGpuModel(config, B, T, precision, *cpu);
    ASSERT_NE(gpu, nullptr);
    const auto inputs = RandomTokens(B * T, config.vocab_size(), 12);
    const auto targets = RandomTokens(B * T, config.vocab_size(), 13);
    const float cpu_loss = cpu->Forward(inputs.data(), targets.data(), B);
    ASSERT_TRUE(gpu->ZeroGrads().ok());
    auto loss = gpu->Forward(inputs.data(), targets.data(), B);
    ASSERT_TRUE(loss.ok()) << loss.status();
    const double tol = precision == CudaPrecision::kBf16 ? 1e-2 : 1e-5;
    EXPECT_NEAR(*loss, cpu_loss, tol * cpu_loss) << CudaPrecisionName(precision);
    auto ss = gpu->GradSumOfSquares();
    ASSERT_TRUE(ss.ok());
    EXPECT_EQ(*ss, 0.0);
  }
}

TEST_F(CudaModelTest, Bf16StepCloseToCpu) {
  const auto config = SmallConfig();
  const int B = 4, T = 64;
  auto cpu = MakeCpuModel(config, B, T, 21);
  auto gpu = MakeGpuModel(config, B, T, CudaPrecision::kBf16, *cpu);
  ASSERT_NE(gpu, nullptr);
  const auto inputs = RandomTokens(B * T, config.vocab_size(), 22);
  const auto targets = RandomTokens(B * T, config.vocab_size(), 23);
  cpu->ZeroGrads();
  const float cpu_loss = cpu->ForwardBackward(inputs.data(), targets.data(), B, 1.0f);
  ASSERT_TRUE(gpu->ZeroGrads().ok());
  auto loss = gpu->ForwardBackward(inputs.data(), targets.data(), B, 1.0f);
  ASSERT_TRUE(loss.ok()) << loss.status();
  EXPECT_NEAR(*loss, cpu_loss, 1e-2 * cpu_loss);
  std::vector<float> grads(gpu->num_parameters());
  ASSERT_TRUE(gpu->CopyGradsToHost(grads.data()).ok());
  CompareGrads(*cpu, grads, /*bf16=*/true, 0.1);
  // The master state stays fp32 and untouched by the bf16 working copy.
  std::vector<float> params(gpu->num_parameters());
  ASSERT_TRUE(gpu->CopyParamsToHost(params.data()).ok());
  EXPECT_TRUE(BitIdentical(
      params, std::vector<float>(cpu->params(), cpu->params() + cpu->num_parameters())));
}

// Five optimiser steps on a fixed batch, CPU and GPU side by side: the loss curves agree
// (fp32 closely, bf16 loosely) and go down.
TEST_F(CudaModelTest, ShortTrainingRunTracksCpu) {
  const auto config = SmallConfig();
  const int B = 4, T = 32;
  const auto inputs = RandomTokens(B * T, config.vocab_size(), 31);
  const auto targets = RandomTokens(B * T, config.vocab_size(), 32);
  for (CudaPrecision precision : {CudaPrecision::kFp32, CudaPrecision::kBf16}) {
    SCOPED_TRACE(CudaPrecisionName(precision));
    auto cpu = MakeCpuModel(config, B, T, 30);
    auto gpu = MakeGpuModel(config, B, T, precision, *cpu);
    ASSERT_NE(gpu, nullptr);
    std::vector<float> m(cpu->num_parameters(), 0.f), v(cpu->num_parameters(), 0.f);
    std::vector<float> cpu_losses, gpu_losses;
    for (int t = 1; t <= 5; ++t) {
      cpu->ZeroGrads();
      cpu_losses.push_back(cpu->ForwardBackward(inputs.data(), targets.data(), B, 1.0f));
      kernels::cpu::AdamWUpdate(kernels::cpu::CpuContext{1}, cpu->params(), cpu->grads(), m.data(),
                                v.data(), cpu->decay_mask().data(), cpu->num_parameters(),
                                {3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f, t});
      ASSERT_TRUE(gpu->ZeroGrads().ok());
      auto loss = gpu->ForwardBackward(inputs.data(), targets.data(), B, 1.0f);
      ASSERT_TRUE(loss.ok()) << loss.status();
      gpu_losses.push_back(*loss);
      ASSERT_TRUE(gpu->AdamWStep({3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f, t}).ok());
    }
    const double tol = precision == CudaPrecision::kBf16 ? 2e-2 : 1e-3;
    for (int i = 0; i < 5; ++i) {
      EXPECT_NEAR(gpu_losses[i], cpu_losses[i], tol * cpu_losses[i]) << "step " << i;
    }
    EXPECT_LT(gpu_losses.back(), gpu_losses.front());
  }
}

TEST_F(CudaModelTest, DeterministicStepsAreBitIdentical) {
  const auto config = SmallConfig();
  const int B = 3, T = 48;
  auto cpu = MakeCpuModel(config, B, T, 41);
  const auto inputs = RandomTokens(B * T, config.vocab_size(), 42);
  const auto targets = RandomTokens(B * T, config.vocab_size(), 43);
  for (CudaPrecision precision : {CudaPrecision::kFp32, CudaPrecision::kBf16}) {
    SCOPED_TRACE(CudaPrecisionName(precision));
    std::vector<std::vector<float>> runs;
    std::vector<float> losses;
    // Twice on one model, then once on a fresh model.
    auto first = MakeGpuModel(config, B, T, precision, *cpu);
    auto second = MakeGpuModel(config, B, T, precision, *cpu);
    ASSERT_NE(first, nullptr);
    ASSERT_NE(second, nullptr);
    for (CudaGptModel* model : {first.get(), first.get(), second.get()}) {
      ASSERT_TRUE(model->ZeroGrads().ok());
      auto loss = model->ForwardBackward(inputs.data(), targets.data(), B, 1.0f);
      ASSERT_TRUE(loss.ok()) << loss.status();
      losses.push_back(*loss);
      runs.emplace_back(model->num_parameters());
      ASSERT_TRUE(model->CopyGradsToHost(runs.back().data()).ok());
    }
    EXPECT_EQ(losses[0], losses[1]);
    EXPECT_EQ(losses[0], losses[2]);
    EXPECT_TRUE(BitIdentical(runs[0], runs[1])) << "same model, second step differs";
    EXPECT_TRUE(BitIdentical(runs[0], runs[2])) << "fresh model differs";
  }
}

TEST_F(CudaModelTest, RejectsBadMicroBatches) {
  const auto config = SmallConfig();
  auto cpu = MakeCpuModel(config, 2, 16, 51);
  auto gpu = MakeGpuModel(config, 2, 16, CudaPrecision::kFp32, *cpu);
  ASSERT_NE(gpu, nullptr);
  auto inputs = RandomTokens(3 * 16, config.vocab_size(), 52);
  auto targets = inputs;
  EXPECT_EQ(gpu->ForwardBackward(inputs.data(), targets.data(), 3, 1.0f).status().code(),
            absl::StatusCode::kInvalidArgument);
  inputs[5] = config.vocab_size();  // out of range
  EXPECT_EQ(gpu->ForwardBackward(inputs.data(), targets.data(), 2, 1.0f).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// The real GPT-2 124M shape (padded vocabulary 50304, 12 heads of 64) against the CPU model
// on a short sequence, so that the CPU side stays quick.
TEST_F(CudaModelTest, Gpt2SmallShapeMatchesCpu) {
  auto preset = common::ModelConfigForPreset("gpt2-124m");
  ASSERT_TRUE(preset.ok()) << preset.status();
  const int B = 1, T = 64;
  auto cpu = MakeCpuModel(*preset, B, T, 61);
  ASSERT_NE(cpu, nullptr);
  const auto inputs = RandomTokens(B * T, preset->vocab_size(), 62);
  const auto targets = RandomTokens(B * T, preset->vocab_size(), 63);
  cpu->ZeroGrads();
  const float cpu_loss = cpu->ForwardBackward(inputs.data(), targets.data(), B, 1.0f);
  EXPECT_NEAR(cpu_loss, std::log(50257.0), 1.0);
  for (CudaPrecision precision : {CudaPrecision::kFp32, CudaPrecision::kBf16}) {
    SCOPED_TRACE(CudaPrecisionName(precision));
    auto gpu = MakeGpuModel(*preset, B, T, precision, *cpu);
    ASSERT_NE(gpu, nullptr);
    auto loss = gpu->ForwardBackward(inputs.data(), targets.data(), B, 1.0f);
    ASSERT_TRUE(loss.ok()) << loss.status();
    const bool bf16 = precision == CudaPrecision::kBf16;
    EXPECT_NEAR(*loss, cpu_loss, (bf16 ? 1e-2 : 1e-5) * cpu_loss);
    std::vector<float> grads(gpu->num_parameters());
    ASSERT_TRUE(gpu->CopyGradsToHost(grads.data()).ok());
    CompareGrads(*cpu, grads, bf16, 0.1);
  }
}

// bf16 training at the scale where the first H100 run diverged (GPT-2 124M, T = 1024, fast
// mode: the benchmark's loss rose 10.98 -> 12.78 in 23 steps while fp32 fell to 10.46; see
// docs/gpu-results.md), on a smaller batch so that both models fit next to each other
// quickly. GPU only (the CPU model would take minutes): bf16 against the fp32 CUDA model, which
// matches the CPU above. First the gradients of the same parameters and batch along the fp32
// model's trajectory; then 8 steps of bf16 training on its own, whose loss must stay close
// to the fp32 run's at every step. On the H100 (2026-11-27, second run) bf16 tracked fp32
// within 1% at every step, and BOTH rose from 10.99 to about 12.7 at step 6: with a constant
// lr of 6e-4, no warm-up and two random batches cycled, the model memorises and overshoots
// in either precision. So the benchmark's rising loss is this set-up, not bf16 arithmetic,
// and the loss is deliberately not required to go down here.
TEST_F(CudaModelTest, Bf16TrainingTracksFp32AtGpt2Scale) {
  SPOTRAIN_SKIP_UNDER_EMULATION("8 steps of GPT-2 124M at 4 x 1024 tokens, ~25 TFLOP");
  auto preset = common::ModelConfigForPreset("gpt2-124m");
  ASSERT_TRUE(preset.ok()) << preset.status();
  const int B = 4, T = 1024, kSteps = 8;
  // Initial parameters from the CPU model (its activations for B = 1, T = 16 are small).
  auto init = MakeCpuModel(*preset, 1, 16, 71);
  ASSERT_NE(init, nullptr);
  std::vector<float> params(init->params(), init->params() + init->num_parameters());
  init.reset();
  std::vector<std::vector<int32_t>> batches;
  for (int i = 0; i < 3; ++i) batches.push_back(RandomTokens(B * T, preset->vocab_size(), 72 + i));
  auto make = [&](CudaPrecision precision) {
    CudaModelOptions options;
    options.precision = precision;
    options.deterministic = false;  // as the benchmark
    auto model = CudaGptModel::Create(*preset, B, T, options);
    EXPECT_TRUE(model.ok()) << model.status();
    if (!model.ok()) return std::unique_ptr<CudaGptModel>();
    EXPECT_TRUE((*model)->CopyParamsFromHost(params.data()).ok());
    return std::move(model).value();
  };
  auto fp32 = make(CudaPrecision::kFp32);
  auto bf16 = make(CudaPrecision::kBf16);
  ASSERT_NE(fp32, nullptr);
  ASSERT_NE(bf16, nullptr);
  const kernels::cuda::AdamWParams adamw{6e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f, 0};
  auto step_params = [&](int t, double sum_sq) {
    kernels::cuda::AdamWParams p = adamw;
    const double norm = std::sqrt(sum_sq);
    p.grad_scale = norm > 1.0 ? static_cast<float>(1.0 / (norm + 1e-6)) : 1.0f;
    p.t = t;
    return p;
  };

  // 1. Gradients at the same point, for 3 points of the fp32 trajectory.
  std::vector<float> g32(fp32->num_parameters()), g16(fp32->num_parameters()), p(params.size());
  for (int t = 1; t <= 3; ++t) {
    SCOPED_TRACE("gradient comparison, fp32 step " + std::to_string(t));
    const auto& in = batches[(t - 1) % 2];
    const auto& tg = batches[(t - 1) % 2 + 1];
    ASSERT_TRUE(fp32->CopyParamsToHost(p.data()).ok());
    ASSERT_TRUE(bf16->CopyParamsFromHost(p.data()).ok());
    ASSERT_TRUE(fp32->ZeroGrads().ok());
    auto l32 = fp32->ForwardBackward(in.data(), tg.data(), B, 1.0f);
    ASSERT_TRUE(l32.ok()) << l32.status();
    ASSERT_TRUE(bf16->ZeroGrads().ok());
    auto l16 = bf16->ForwardBackward(in.data(), tg.data(), B, 1.0f);
    ASSERT_TRUE(l16.ok()) << l16.status();
    EXPECT_NEAR(*l16, *l32, 1e-2 * *l32);
    ASSERT_TRUE(fp32->CopyGradsToHost(g32.data()).ok());
    ASSERT_TRUE(bf16->CopyGradsToHost(g16.data()).ok());
    for (const CudaGptModel::TensorInfo& info : fp32->tensors()) {
      const double rel =
          RelativeL2(Slice(g16, info.offset, info.size), Slice(g32, info.offset, info.size));
      std::printf("  step %d bf16 vs fp32 gradient %-9s relative L2 %.2e\n", t, info.name.c_str(),
                  rel);
      EXPECT_LT(rel, 0.1) << info.name;
    }
    auto sum_sq = fp32->GradSumOfSquares();
    ASSERT_TRUE(sum_sq.ok()) << sum_sq.status();
    ASSERT_TRUE(fp32->AdamWStep(step_params(t, *sum_sq)).ok());
  }

  // 2. Each model trains on its own from the same start.
  std::vector<float> losses[2];
  CudaGptModel* models[2] = {fp32.get(), bf16.get()};
  for (int m = 0; m < 2; ++m) {
    SCOPED_TRACE(m == 0 ? "fp32 training" : "bf16 training");
    CudaGptModel& model = *models[m];
    ASSERT_TRUE(model.CopyParamsFromHost(params.data()).ok());
    ASSERT_TRUE(model.ZeroMoments().ok());
    for (int t = 1; t <= kSteps; ++t) {
      ASSERT_TRUE(model.ZeroGrads().ok());
      auto loss = model.ForwardBackward(batches[(t - 1) % 2].data(),
                                        batches[(t - 1) % 2 + 1].data(), B, 1.0f);
      ASSERT_TRUE(loss.ok()) << loss.status();
      losses[m].push_back(*loss);
      auto sum_sq = model.GradSumOfSquares();
      ASSERT_TRUE(sum_sq.ok()) << sum_sq.status();
      ASSERT_TRUE(model.AdamWStep(step_params(t, *sum_sq)).ok());
    }
  }
  for (int t = 0; t < kSteps; ++t) {
    std::printf("  step %d loss fp32 %.4f bf16 %.4f\n", t + 1, losses[0][t], losses[1][t]);
    EXPECT_NEAR(losses[1][t], losses[0][t], 2e-2 * losses[0][t]) << "step " << t + 1;
  }
  for (int m = 0; m < 2; ++m) {
    for (float loss : losses[m]) EXPECT_TRUE(std::isfinite(loss));
  }
}

}  // namespace
}  // namespace spotrain::worker
