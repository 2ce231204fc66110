// kernels/cuda against the CPU reference kernels/cpu on fresh random inputs (fixed seeds,
// never zeros), fp32 and bf16, plus determinism (same inputs twice -> same bits) and error
// handling. Every test skips without a usable GPU.
#include "kernels/cpu/ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/gemm_plan.h"
#include "kernels/cuda/ops.cuh"
#include "tests/gpu/gpu_test_util.h"

namespace spotrain::kernels {
namespace {

using testing_gpu::BitIdentical;
using testing_gpu::DeviceBuffer;
using testing_gpu::ExpectAllClose;
using testing_gpu::FromBf16Bits;
using testing_gpu::RandomTokens;
using testing_gpu::RandomVector;
using testing_gpu::RoundToBf16;
using testing_gpu::ToBf16Bits;
using Bf16Buffer = DeviceBuffer<uint16_t>;

// fp32 results of different summation orders (GPU trees vs CPU loops, cuBLAS vs OpenBLAS).
constexpr float kAtol32 = 1e-5f;
constexpr float kRtol32 = 1e-4f;
// bf16 outputs: one rounding to 8 significant bits (relative 2^-9) plus fp32 differences.
constexpr float kAtol16 = 2e-3f;
constexpr float kRtol16 = 1.6e-2f;

cuda::bf16* AsBf16(const Bf16Buffer& b) { return reinterpret_cast<cuda::bf16*>(b.get()); }

std::vector<float> Download16(const Bf16Buffer& b) { return FromBf16Bits(b.Download()); }

// att and datt rows are defined up to the end of their causal position block only
// (kernels/cuda/gemm_plan.h CausalRowEnd): beyond it the kernels write nothing but the zeros
// that round out a 16-byte pack (at most 8 elements), so the buffers' NaN fill must still be
// there. Returns `got` with those entries set to `want`'s, to be compared whole.
std::vector<float> CheckBeyondCausalBlocks(std::vector<float> got, const std::vector<float>& want,
                                           int T) {
  const int count = cuda::DefaultCausalBlockCount(T);
  int bad = 0;
  for (size_t r = 0; r < got.size() / T; ++r) {
    const int end = cuda::CausalRowEnd(T, count, static_cast<int>(r % T));
    for (int j = end; j < T; ++j) {
      float& g = got[r * T + j];
      const bool pack_zero = g == 0.f && j < (end + 7) / 8 * 8;
      if (!std::isnan(g) && !pack_zero && bad++ < 5) {
        ADD_FAILURE() << "row " << r << " column " << j << " beyond the row's block end " << end
                      << " was written: " << g;
      }
      g = want[r * T + j];
    }
  }
  return got;
}

// `v` with NaN beyond each row's causal block: what no kernel may read.
std::vector<float> NanBeyondCausalBlocks(std::vector<float> v, int T) {
  const int count = cuda::DefaultCausalBlockCount(T);
  for (size_t r = 0; r < v.size() / T; ++r) {
    for (int j = cuda::CausalRowEnd(T, count, static_cast<int>(r % T)); j < T; ++j) {
      v[r * T + j] = std::numeric_limits<float>::quiet_NaN();
    }
  }
  return v;
}

// The GPU-side mirror of "+=": CPU and GPU accumulate into the same random starting values.
class GpuOpsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SPOTRAIN_SKIP_WITHOUT_GPU();
    cuda::CudaContextOptions options;
    options.deterministic = true;
    auto ctx = cuda::CudaContext::Create(options);
    ASSERT_TRUE(ctx.ok()) << ctx.status();
    ctx_ = std::move(ctx).value();
  }
  cuda::CudaContext& ctx() { return *ctx_; }

  cpu::CpuContext cpu_{4};
  std::unique_ptr<cuda::CudaContext> ctx_;
};

// Runs without a GPU too: the capability check must answer, never crash.
TEST(GpuCapabilityTest, DeviceCountAnswersWithoutCrashing) {
  auto count = cuda::CudaDeviceCount();
  if (!count.ok()) {
    EXPECT_EQ(count.status().code(), absl::StatusCode::kFailedPrecondition) << count.status();
    EXPECT_FALSE(count.status().message().empty());
    return;
  }
  EXPECT_GE(*count, 0);
  if (*count > 0) {
    auto desc = cuda::CudaDeviceDescription(0);
    ASSERT_TRUE(desc.ok()) << desc.status();
    EXPECT_NE(desc->find("SMs"), std::string::npos) << *desc;
    std::printf("device 0: %s\n", desc->c_str());
  }
  EXPECT_EQ(cuda::CudaDeviceDescription(-1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(GpuCapabilityTest, ContextCreationFailsCleanlyWithoutGpu) {
  auto count = cuda::CudaDeviceCount();
  if (count.ok() && *count > 0) GTEST_SKIP() << "a GPU is present; nothing to check";
  auto ctx = cuda::CudaContext::Create({});
  ASSERT_FALSE(ctx.ok());
  EXPECT_EQ(ctx.status().code(), absl::StatusCode::kFailedPrecondition) << ctx.status();
}

TEST_F(GpuOpsTest, EncoderForwardBackward) {
  const int B = 3, T = 40, C = 72, V = 50, Vp = 64;  // few tokens: many repeats
  auto wte = RandomVector(Vp * C, 1), wpe = RandomVector(T * C, 2);
  auto inp = RandomTokens(B * T, V, 3);
  auto dout = RandomVector(B * T * C, 4);
  auto dwte = RandomVector(Vp * C, 5), dwpe = RandomVector(T * C, 6);
  std::vector<float> out(B * T * C);
  cpu::EncoderForward(cpu_, out.data(), inp.data(), wte.data(), wpe.data(), B, T, C);
  auto dwte_ref = dwte, dwpe_ref = dwpe;
  cpu::EncoderBackward(cpu_, dwte_ref.data(), dwpe_ref.data(), dout.data(), inp.data(), B, T, C);

  DeviceBuffer<float> d_wte(wte), d_wpe(wpe), d_out(out.size()), d_dout(dout), d_dwte(dwte),
      d_dwpe(dwpe);
  DeviceBuffer<int32_t> d_inp(inp);
  ASSERT_TRUE(
      cuda::EncoderForward(ctx(), d_out.get(), d_inp.get(), d_wte.get(), d_wpe.get(), B, T, C)
          .ok());
  ASSERT_TRUE(cuda::EncoderBackward(ctx(), d_dwte.get(), d_dwpe.get(),
                                    static_cast<const float*>(d_dout.get()), d_inp.get(), B, T, C,
                                    Vp)
                  .ok());
  // Same additions in the same order as the CPU loops: exact.
  ExpectAllClose("encoder out", d_out.Download(), out, 0, 0);
  ExpectAllClose("dwte", d_dwte.Download(), dwte_ref, 0, 0);
  ExpectAllClose("dwpe", d_dwpe.Download(), dwpe_ref, 0, 0);
}

TEST_F(GpuOpsTest, LayerNormForwardBackward) {
  const int N = 300, C = 200;  // C not a multiple of 32
  auto inp = RandomVector(N * C, 10, 2.0f);
  auto w = RandomVector(C, 11), b = RandomVector(C, 12);
  auto dout = RandomVector(N * C, 13);
  auto dinp = RandomVector(N * C, 14), dw = RandomVector(C, 15), db = RandomVector(C, 16);
  std::vector<float> out(N * C), mean(N), rstd(N);
  cpu::LayerNormForward(cpu_, out.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(),
                        N, C);
  auto dinp_ref = dinp, dw_ref = dw, db_ref = db;
  cpu::LayerNormBackward(cpu_, dinp_ref.data(), dw_ref.data(), db_ref.data(), dout.data(),
                         inp.data(), w.data(), mean.data(), rstd.data(), N, C);

  DeviceBuffer<float> d_inp(inp), d_w(w), d_b(b), d_out(N * C), d_mean(N), d_rstd(N), d_dout(dout),
      d_dinp(dinp), d_dw(dw), d_db(db);
  ASSERT_TRUE(cuda::LayerNormForward(ctx(), d_out.get(), d_mean.get(), d_rstd.get(),
                                     static_cast<const float*>(d_inp.get()), d_w.get(), d_b.get(),
                                     N, C)
                  .ok());
  ExpectAllClose("ln out", d_out.Download(), out, kAtol32, kRtol32);
  ExpectAllClose("ln mean", d_mean.Download(), mean, kAtol32, kRtol32);
  ExpectAllClose("ln rstd", d_rstd.Download(), rstd, kAtol32, kRtol32);
  // Backward from the CPU's saved statistics so that only backward is compared.
  d_mean.Upload(mean);
  d_rstd.Upload(rstd);
  ASSERT_TRUE(cuda::LayerNormBackward(ctx(), d_dinp.get(), d_dw.get(), d_db.get(),
                                      static_cast<const float*>(d_dout.get()),
                                      static_cast<const float*>(d_inp.get()), d_w.get(),
                                      d_mean.get(), d_rstd.get(), N, C)
                  .ok());
  ExpectAllClose("ln dinp", d_dinp.Download(), dinp_ref, kAtol32, kRtol32);
  ExpectAllClose("ln dweight", d_dw.Download(), dw_ref, 1e-4f, kRtol32);
  ExpectAllClose("ln dbias", d_db.Download(), db_ref, 1e-4f, kRtol32);
}

TEST_F(GpuOpsTest, MatmulForwardBackward) {
  const int N = 260, C = 96, OC = 136;
  auto inp = RandomVector(N * C, 20), w = RandomVector(OC * C, 21), bias = RandomVector(OC, 22);
  auto dout = RandomVector(N * OC, 23);
  auto dinp = RandomVector(N * C, 24), dw = RandomVector(OC * C, 25), db = RandomVector(OC, 26);
  std::vector<float> out(N * OC);
  cpu::MatmulForward(cpu_, out.data(), inp.data(), w.data(), bias.data(), N, C, OC);
  auto dinp_ref = dinp, dw_ref = dw, db_ref = db;
  cpu::MatmulBackward(cpu_, dinp_ref.data(), dw_ref.data(), db_ref.data(), dout.data(), inp.data(),
                      w.data(), N, C, OC);

  DeviceBuffer<float> d_inp(inp), d_w(w), d_bias(bias), d_out(N * OC), d_dout(dout), d_dinp(dinp),
      d_dw(dw), d_db(db);
  ASSERT_TRUE(cuda::MatmulForward(ctx(), d_out.get(), static_cast<const float*>(d_inp.get()),
                                  static_cast<const float*>(d_w.get()), d_bias.get(), N, C, OC)
                  .ok());
  ASSERT_TRUE(cuda::MatmulBackward(ctx(), d_dinp.get(), d_dw.get(), d_db.get(),
                                   static_cast<const float*>(d_dout.get()),
                                   static_cast<const float*>(d_inp.get()),
                                   static_cast<const float*>(d_w.get()), N, C, OC)
                  .ok());
  ExpectAllClose("matmul out", d_out.Download(), out, 1e-4f, kRtol32);
  ExpectAllClose("matmul dinp", d_dinp.Download(), dinp_ref, 1e-4f, kRtol32);
  ExpectAllClose("matmul dweight", d_dw.Download(), dw_ref, 1e-4f, kRtol32);
  ExpectAllClose("matmul dbias", d_db.Download(), db_ref, 1e-4f, kRtol32);
}

void AttentionCase(cpu::CpuContext cpu_ctx, cuda::CudaContext& ctx, int B, int T, int C, int NH) {
  SCOPED_TRACE(::testing::Message() << "B=" << B << " T=" << T << " C=" << C << " NH=" << NH);
  auto inp = RandomVector(B * T * 3 * C, 30 + T);
  auto dout = RandomVector(B * T * C, 31 + T);
  auto dinp = RandomVector(B * T * 3 * C, 32 + T);
  std::vector<float> out(B * T * C), att(B * NH * T * T), datt(B * NH * T * T);
  cpu::AttentionForward(cpu_ctx, out.data(), att.data(), inp.data(), B, T, C, NH);
  auto dinp_ref = dinp;
  cpu::AttentionBackward(cpu_ctx, dinp_ref.data(), datt.data(), dout.data(), inp.data(), att.data(),
                         B, T, C, NH);

  // Old contents in the outputs: the forward must overwrite them, not add to them; the
  // scores start as NaN (the products skip tiles above the diagonal, and nothing may read an
  // entry before it is written).
  DeviceBuffer<float> d_inp(inp), d_out(RandomVector(out.size(), 33 + T)), d_att(att.size()),
      d_dout(dout), d_dinp(dinp), d_datt(datt.size());
  d_att.FillBytes(0xFF);
  d_datt.FillBytes(0xFF);
  ASSERT_TRUE(cuda::AttentionForward(ctx, d_out.get(), d_att.get(),
                                     static_cast<const float*>(d_inp.get()), B, T, C, NH)
                  .ok());
  ExpectAllClose("attention out", d_out.Download(), out, kAtol32, kRtol32);
  ExpectAllClose("attention probs", CheckBeyondCausalBlocks(d_att.Download(), att, T), att, kAtol32,
                 kRtol32);
  // The backward may not read att beyond the causal blocks either, nor write datt there.
  d_att.Upload(NanBeyondCausalBlocks(att, T));
  ASSERT_TRUE(cuda::AttentionBackward(ctx, d_dinp.get(), d_datt.get(),
                                      static_cast<const float*>(d_dout.get()),
                                      static_cast<const float*>(d_inp.get()),
                                      static_cast<const float*>(d_att.get()), B, T, C, NH)
                  .ok());
  ExpectAllClose("attention dinp", d_dinp.Download(), dinp_ref, 1e-4f, kRtol32);
  CheckBeyondCausalBlocks(d_datt.Download(), datt, T);
}

TEST_F(GpuOpsTest, AttentionForwardBackward) {
  AttentionCase(cpu_, ctx(), 2, 64, 64, 4);
  AttentionCase(cpu_, ctx(), 3, 37, 48, 3);  // T not a multiple of 32, hs 16
  AttentionCase(cpu_, ctx(), 2, 19, 30, 3);  // hs 10: not whole 16-byte packs (element copies)
  // Products by causal position blocks (kernels/cuda/gemm_plan.h DefaultCausalBlockCount).
  AttentionCase(cpu_, ctx(), 1, 512, 64, 2);   // 2 blocks
  AttentionCase(cpu_, ctx(), 1, 1024, 32, 2);  // 4 blocks, GPT-2's T
  AttentionCase(cpu_, ctx(), 1, 777, 32, 2);   // 3 uneven blocks, unaligned operand offsets
  AttentionCase(cpu_, ctx(), 1, 896, 32, 2);   // packed rows, block ends inside a 16-byte pack
}

// With less scratch than the whole batch needs, the attention runs in chunks of batch
// elements (here 3 + 2 forward, 2 + 2 + 1 backward) and gives the same results; with less
// than one batch element needs, it says so.
TEST_F(GpuOpsTest, AttentionInChunksWhenScratchIsSmall) {
  cuda::CudaContextOptions options;
  options.deterministic = true;
  options.scratch_bytes = size_t{1} << 20;
  auto small = cuda::CudaContext::Create(options);
  ASSERT_TRUE(small.ok()) << small.status();
  ASSERT_LT((*small)->scratch_bytes(), cuda::AttentionScratchBytes<float>(5, 128, 128));
  AttentionCase(cpu_, **small, 5, 128, 128, 4);
  AttentionCase(cpu_, **small, 3, 512, 32, 2);  // chunks of 2 + 1, 2 position blocks

  const int B = 1, T = 256, C = 256, NH = 4;
  ASSERT_LT((*small)->scratch_bytes(), cuda::AttentionScratchBytes<float>(B, T, C));
  DeviceBuffer<float> inp(B * T * 3 * C), dinp(B * T * 3 * C), out(B * T * C), dout(B * T * C),
      att(B * NH * T * T), datt(B * NH * T * T);
  const auto status = cuda::AttentionBackward(
      **small, dinp.get(), datt.get(), static_cast<const float*>(dout.get()),
      static_cast<const float*>(inp.get()), static_cast<const float*>(att.get()), B, T, C, NH);
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted) << status;
  EXPECT_THAT(std::string(status.message()), ::testing::HasSubstr("scratch"));
}

TEST_F(GpuOpsTest, GeluAndResidual) {
  const int64_t n = 100003;
  auto x = RandomVector(n, 40, 4.0f), y = RandomVector(n, 41), dout = RandomVector(n, 42);
  auto dinp = RandomVector(n, 43), da = RandomVector(n, 44), db = RandomVector(n, 45);
  std::vector<float> gelu(n), sum(n);
  cpu::GeluForward(cpu_, gelu.data(), x.data(), n);
  auto dinp_ref = dinp, da_ref = da, db_ref = db;
  cpu::GeluBackward(cpu_, dinp_ref.data(), x.data(), dout.data(), n);
  cpu::ResidualForward(cpu_, sum.data(), x.data(), y.data(), n);
  cpu::ResidualBackward(cpu_, da_ref.data(), db_ref.data(), dout.data(), n);

  DeviceBuffer<float> d_x(x), d_y(y), d_dout(dout), d_dinp(dinp), d_da(da), d_db(db), d_gelu(n),
      d_sum(n);
  const float* cx = d_x.get();
  const float* cdout = d_dout.get();
  ASSERT_TRUE(cuda::GeluForward(ctx(), d_gelu.get(), cx, n).ok());
  ASSERT_TRUE(cuda::GeluBackward(ctx(), d_dinp.get(), cx, cdout, n).ok());
  ASSERT_TRUE(
      cuda::ResidualForward(ctx(), d_sum.get(), cx, static_cast<const float*>(d_y.get()), n).ok());
  ASSERT_TRUE(cuda::ResidualBackward(ctx(), d_da.get(), d_db.get(), cdout, n).ok());
  ExpectAllClose("gelu", d_gelu.Download(), gelu, kAtol32, kRtol32);
  ExpectAllClose("gelu dinp", d_dinp.Download(), dinp_ref, kAtol32, kRtol32);
  ExpectAllClose("residual", d_sum.Download(), sum, 0, 0);
  ExpectAllClose("residual da", d_da.Download(), da_ref, 0, 0);
  ExpectAllClose("residual db", d_db.Download(), db_ref, 0, 0);
}

// The CPU reference of the cross-entropy: its losses and dlogits, and what
// CrossEntropyForward keeps per row (the max logit and 1 / sum exp(logit - max), the sum in
// double).
struct CrossEntropyReference {
  std::vector<float> losses, dlogits, stats;
};
CrossEntropyReference CpuCrossEntropy(cpu::CpuContext cpu_ctx, const std::vector<float>& logits,
                                      const std::vector<int32_t>& targets, int N, int V, int Vp,
                                      float scale) {
  CrossEntropyReference r{std::vector<float>(N), std::vector<float>(N * Vp),
                          std::vector<float>(2 * N)};
  std::vector<float> probs(N * Vp);
  cpu::SoftmaxCrossEntropyForward(cpu_ctx, probs.data(), r.losses.data(), logits.data(),
                                  targets.data(), N, V, Vp);
  cpu::SoftmaxCrossEntropyBackward(cpu_ctx, r.dlogits.data(), probs.data(), targets.data(), scale,
                                   N, V, Vp);
  for (int n = 0; n < N; ++n) {
    const float* x = &logits[static_cast<size_t>(n) * Vp];
    const float mx = *std::max_element(x, x + V);
    double sum = 0;
    for (int j = 0; j < V; ++j) sum += std::exp(static_cast<double>(x[j]) - mx);
    r.stats[2 * n] = mx;
    r.stats[2 * n + 1] = static_cast<float>(1.0 / sum);
  }
  return r;
}

// The fused pair against the CPU's SoftmaxCrossEntropy pair: losses, stats (max and 1/sum
// per row) and dlogits, with 16-byte loads (Vp a multiple of 4, V not: a scalar tail) and
// without (Vp odd), and with dlogits written over the logits (fp32).
void CrossEntropyCase(cpu::CpuContext cpu_ctx, cuda::CudaContext& ctx, int N, int V, int Vp,
                      bool in_place, bool masked = false) {
  SCOPED_TRACE(::testing::Message() << "N=" << N << " V=" << V << " Vp=" << Vp
                                    << " in_place=" << in_place << " masked=" << masked);
  auto logits = RandomVector(N * Vp, 50 + Vp, 8.0f);
  auto targets = RandomTokens(N, V, 51);
  if (masked) {  // -inf logits (masked-out tokens) contribute 0, never NaN; not the targets
    for (int n = 0; n < N; ++n) {
      for (int j = n % 3; j < V; j += 3) {
        if (j != targets[n]) logits[static_cast<size_t>(n) * Vp + j] = -INFINITY;
      }
    }
  }
  const float scale = 1.0f / N;
  const auto [losses, dlogits, stats] = CpuCrossEntropy(cpu_ctx, logits, targets, N, V, Vp, scale);
  DeviceBuffer<float> d_logits(logits), d_stats(2 * N), d_losses(N), d_dlogits(N * Vp);
  DeviceBuffer<int32_t> d_targets(targets);
  ASSERT_TRUE(cuda::CrossEntropyForward(ctx, d_losses.get(), d_stats.get(), d_logits.get(),
                                        d_targets.get(), N, V, Vp)
                  .ok());
  float* out = in_place ? d_logits.get() : d_dlogits.get();
  ASSERT_TRUE(cuda::CrossEntropyBackward(ctx, out, static_cast<const float*>(d_logits.get()),
                                         static_cast<const float*>(d_stats.get()), d_targets.get(),
                                         scale, N, V, Vp)
                  .ok());
  ExpectAllClose("losses", d_losses.Download(), losses, kAtol32, kRtol32);
  ExpectAllClose("stats", d_stats.Download(), stats, 0, kRtol32);
  ExpectAllClose("dlogits", in_place ? d_logits.Download() : d_dlogits.Download(), dlogits, 1e-8f,
                 kRtol32);

  // The fused form (CrossEntropyForwardBackward) gives the same bits as the two calls, in
  // fp32 (in place or not, as above) and into bf16 dlogits.
  const std::vector<float> two_losses = d_losses.Download(), two_stats = d_stats.Download();
  const std::vector<float> two_dlogits = in_place ? d_logits.Download() : d_dlogits.Download();
  DeviceBuffer<float> f_logits(logits), f_stats(2 * N), f_losses(N), f_dlogits(N * Vp);
  f_stats.FillBytes(0xFF);
  f_dlogits.FillBytes(0xFF);
  float* f_out = in_place ? f_logits.get() : f_dlogits.get();
  ASSERT_TRUE(cuda::CrossEntropyForwardBackward(ctx, f_losses.get(), f_stats.get(), f_out,
                                                static_cast<const float*>(f_logits.get()),
                                                d_targets.get(), scale, N, V, Vp)
                  .ok());
  EXPECT_TRUE(BitIdentical(f_losses.Download(), two_losses)) << "fused losses";
  EXPECT_TRUE(BitIdentical(f_stats.Download(), two_stats)) << "fused stats";
  EXPECT_TRUE(BitIdentical(in_place ? f_logits.Download() : f_dlogits.Download(), two_dlogits))
      << "fused dlogits";
  if (!in_place) {
    DeviceBuffer<float> b_logits(logits);
    DeviceBuffer<uint16_t> two16(N * Vp), fused16(N * Vp);
    fused16.FillBytes(0xFF);
    auto* t16 = reinterpret_cast<cuda::bf16*>(two16.get());
    auto* f16 = reinterpret_cast<cuda::bf16*>(fused16.get());
    ASSERT_TRUE(cuda::CrossEntropyBackward(ctx, t16, static_cast<const float*>(b_logits.get()),
                                           static_cast<const float*>(d_stats.get()),
                                           d_targets.get(), scale, N, V, Vp)
                    .ok());
    ASSERT_TRUE(cuda::CrossEntropyForwardBackward(ctx, f_losses.get(), f_stats.get(), f16,
                                                  static_cast<const float*>(b_logits.get()),
                                                  d_targets.get(), scale, N, V, Vp)
                    .ok());
    EXPECT_EQ(fused16.Download(), two16.Download()) << "fused bf16 dlogits";
  }
}

// bf16 logits (a bf16 model's classifier): the values are rounded to bf16 first, so the CPU
// pair in fp32 on the same values is the reference for the losses and stats (computed in
// fp32 by both) and, to bf16's rounding, for the dlogits, written over the logits (in place)
// or into their own buffer. `offset` elements before the logits: 1 makes them 2-byte aligned
// only, so the kernels take their element loop although Vp is a multiple of 4. The fused form
// gives the same bits as the two calls.
void Bf16LogitsCrossEntropyCase(cpu::CpuContext cpu_ctx, cuda::CudaContext& ctx, int N, int V,
                                int Vp, bool in_place, int offset = 0) {
  SCOPED_TRACE(::testing::Message() << "bf16 logits N=" << N << " V=" << V << " Vp=" << Vp
                                    << " in_place=" << in_place << " offset=" << offset);
  const auto logits = RoundToBf16(RandomVector(N * Vp, 60 + Vp, 8.0f));
  const auto targets = RandomTokens(N, V, 61);
  const float scale = 1.0f / N;
  const auto [losses, dlogits, stats] = CpuCrossEntropy(cpu_ctx, logits, targets, N, V, Vp, scale);
  std::vector<uint16_t> bits(offset, 0);
  for (uint16_t b : ToBf16Bits(logits)) bits.push_back(b);
  const auto strip = [&](std::vector<uint16_t> v) {
    return std::vector<uint16_t>(v.begin() + offset, v.end());
  };
  Bf16Buffer d_logits(bits), d_dlogits(offset + N * Vp);
  DeviceBuffer<float> d_stats(2 * N), d_losses(N);
  DeviceBuffer<int32_t> d_targets(targets);
  d_dlogits.FillBytes(0xFF);
  const cuda::bf16* x = AsBf16(d_logits) + offset;
  cuda::bf16* out = (in_place ? AsBf16(d_logits) : AsBf16(d_dlogits)) + offset;
  ASSERT_TRUE(
      cuda::CrossEntropyForward(ctx, d_losses.get(), d_stats.get(), x, d_targets.get(), N, V, Vp)
          .ok());
  ASSERT_TRUE(cuda::CrossEntropyBackward(ctx, out, x, static_cast<const float*>(d_stats.get()),
                                         d_targets.get(), scale, N, V, Vp)
                  .ok());
  ExpectAllClose("losses", d_losses.Download(), losses, kAtol32, kRtol32);
  ExpectAllClose("stats", d_stats.Download(), stats, 0, kRtol32);
  const std::vector<uint16_t> two = strip(in_place ? d_logits.Download() : d_dlogits.Download());
  ExpectAllClose("bf16 dlogits", FromBf16Bits(two), dlogits, 1e-8f, 1.0f / 128);
  for (int n = 0; n < N; ++n) {  // padded columns exactly 0
    for (int j = V; j < Vp; ++j) {
      ASSERT_EQ(two[static_cast<size_t>(n) * Vp + j], 0) << n << "," << j;
    }
  }

  Bf16Buffer f_logits(bits), f_dlogits(offset + N * Vp);
  DeviceBuffer<float> f_stats(2 * N), f_losses(N);
  f_stats.FillBytes(0xFF);
  f_dlogits.FillBytes(0xFF);
  cuda::bf16* f_out = (in_place ? AsBf16(f_logits) : AsBf16(f_dlogits)) + offset;
  ASSERT_TRUE(
      cuda::CrossEntropyForwardBackward(ctx, f_losses.get(), f_stats.get(), f_out,
                                        static_cast<const cuda::bf16*>(AsBf16(f_logits) + offset),
                                        d_targets.get(), scale, N, V, Vp)
          .ok());
  EXPECT_TRUE(BitIdentical(f_losses.Download(), d_losses.Download())) << "fused losses";
  EXPECT_TRUE(BitIdentical(f_stats.Download(), d_stats.Download())) << "fused stats";
  EXPECT_EQ(strip(in_place ? f_logits.Download() : f_dlogits.Download()), two) << "fused dlogits";
}

TEST_F(GpuOpsTest, Bf16LogitsCrossEntropy) {
  Bf16LogitsCrossEntropyCase(cpu_, ctx(), 33, 1001, 1024, true);  // 8-byte loads, scalar tail
  Bf16LogitsCrossEntropyCase(cpu_, ctx(), 33, 1001, 1024, false);
  Bf16LogitsCrossEntropyCase(cpu_, ctx(), 17, 997, 999, true);     // Vp odd: element loads
  Bf16LogitsCrossEntropyCase(cpu_, ctx(), 5, 50257, 50304, true);  // GPT-2's vocabulary
  Bf16LogitsCrossEntropyCase(cpu_, ctx(), 9, 1001, 1024, true, /*offset=*/1);  // 2-byte aligned
  Bf16LogitsCrossEntropyCase(cpu_, ctx(), 9, 1001, 1024, false, /*offset=*/1);

  // Only exactly the logits' memory may take the dlogits: a shifted view is refused.
  const int N = 4, V = 60, Vp = 64;
  Bf16Buffer d_logits(N * Vp + 8);
  DeviceBuffer<float> d_stats(2 * N);
  DeviceBuffer<int32_t> d_targets(RandomTokens(N, V, 62));
  const cuda::bf16* x = AsBf16(d_logits);
  const auto shifted = cuda::CrossEntropyBackward(ctx(), AsBf16(d_logits) + 4, x,
                                                  static_cast<const float*>(d_stats.get()),
                                                  d_targets.get(), 1.f, N, V, Vp);
  EXPECT_EQ(shifted.code(), absl::StatusCode::kInvalidArgument) << shifted;
}

TEST_F(GpuOpsTest, CrossEntropy) {
  CrossEntropyCase(cpu_, ctx(), 70, 1000, 1024, false);
  CrossEntropyCase(cpu_, ctx(), 33, 1001, 1024, false);  // V % 4 == 1, as GPT-2's 50257
  CrossEntropyCase(cpu_, ctx(), 17, 997, 999, false);    // Vp odd: no 16-byte loads
  CrossEntropyCase(cpu_, ctx(), 33, 1001, 1024, true);
  CrossEntropyCase(cpu_, ctx(), 17, 997, 999, true);
  CrossEntropyCase(cpu_, ctx(), 33, 1001, 1024, false, /*masked=*/true);
  CrossEntropyCase(cpu_, ctx(), 17, 997, 999, false, /*masked=*/true);
  CrossEntropyCase(cpu_, ctx(), 5, 50257, 50304, false);  // GPT-2's vocabulary
}

// The fused bias additions against what MatmulForward's bias addition followed by
// ResidualForward / GeluForward compute: the biased value rounded to the activation type,
// then the consumer. Residuals are exact; GELU within the kernel tolerances. C 96: 16-byte
// packs; C 30: element by element.
TEST_F(GpuOpsTest, BiasResidualAndBiasGelu) {
  const int N = 37;
  for (const int C : {96, 30}) {
    for (const bool bf16 : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "C=" << C << (bf16 ? " bf16" : " fp32"));
      const auto round = [&](std::vector<float> v) { return bf16 ? RoundToBf16(std::move(v)) : v; };
      const auto a = round(RandomVector(N * C, 110)), b = round(RandomVector(N * C, 111));
      const auto pre = round(RandomVector(N * C, 112, 3.0f));
      const auto bias = RandomVector(C, 113);
      std::vector<float> biased_b(N * C), biased_pre(N * C), sum(N * C), gelu(N * C);
      for (int i = 0; i < N * C; ++i) {
        biased_b[i] = b[i] + bias[i % C];
        biased_pre[i] = pre[i] + bias[i % C];
      }
      biased_b = round(biased_b);
      biased_pre = round(biased_pre);
      for (int i = 0; i < N * C; ++i) sum[i] = a[i] + biased_b[i];
      sum = round(sum);
      cpu::GeluForward(cpu_, gelu.data(), biased_pre.data(), N * C);
      const float atol = bf16 ? kAtol16 : kAtol32, rtol = bf16 ? kRtol16 : kRtol32;
      if (bf16) {
        Bf16Buffer d_a(ToBf16Bits(a)), d_b(ToBf16Bits(b)), d_pre(ToBf16Bits(pre)), d_out(N * C),
            d_gelu(N * C);
        DeviceBuffer<float> d_bias(bias);
        const cuda::bf16* cb = AsBf16(d_b);
        ASSERT_TRUE(cuda::BiasResidualForward(ctx(), AsBf16(d_out),
                                              static_cast<const cuda::bf16*>(AsBf16(d_a)), cb,
                                              d_bias.get(), N, C)
                        .ok());
        ASSERT_TRUE(
            cuda::BiasGeluForward(ctx(), AsBf16(d_gelu), AsBf16(d_pre), d_bias.get(), N, C).ok());
        ExpectAllClose("residual", Download16(d_out), sum, 0, 0);
        ExpectAllClose("b unchanged", Download16(d_b), b, 0, 0);
        ExpectAllClose("pre + bias", Download16(d_pre), biased_pre, 0, 0);
        ExpectAllClose("gelu", Download16(d_gelu), gelu, atol, rtol);
      } else {
        DeviceBuffer<float> d_a(a), d_b(b), d_pre(pre), d_out(N * C), d_gelu(N * C), d_bias(bias);
        const float* cb = d_b.get();
        ASSERT_TRUE(cuda::BiasResidualForward(ctx(), d_out.get(),
                                              static_cast<const float*>(d_a.get()), cb,
                                              d_bias.get(), N, C)
                        .ok());
        ASSERT_TRUE(
            cuda::BiasGeluForward(ctx(), d_gelu.get(), d_pre.get(), d_bias.get(), N, C).ok());
        ExpectAllClose("residual", d_out.Download(), sum, 0, 0);
        ExpectAllClose("b unchanged", d_b.Download(), b, 0, 0);
        ExpectAllClose("pre + bias", d_pre.Download(), biased_pre, 0, 0);
        ExpectAllClose("gelu", d_gelu.Download(), gelu, atol, rtol);
      }
    }
  }
}

// A device buffer of Act as the host sees it: floats, or bf16 as raw bits.
template <typename Act>
using RawOf = std::conditional_t<sizeof(Act) == 2, uint16_t, float>;
template <typename Act>
std::vector<RawOf<Act>> ToRaw(const std::vector<float>& v) {
  if constexpr (sizeof(Act) == 2) {
    return ToBf16Bits(v);
  } else {
    return v;
  }
}

// The claim of ops.cuh, on the device: a product with its bias then ResidualForward /
// GeluForward, and the product without it then BiasResidualForward / BiasGeluForward, give the
// same bits.
template <typename Act>
void FusedBiasSameBits(cuda::CudaContext& ctx, int N, int Cin, int OC) {
  SCOPED_TRACE(::testing::Message() << "OC=" << OC << (sizeof(Act) == 2 ? " bf16" : " fp32"));
  using Raw = RawOf<Act>;
  const auto to_raw = ToRaw<Act>;
  DeviceBuffer<Raw> x(to_raw(RandomVector(N * Cin, 120))), w(to_raw(RandomVector(OC * Cin, 121))),
      a(to_raw(RandomVector(N * OC, 122))), with_bias(N * OC), without(N * OC), out1(N * OC),
      out2(N * OC);
  DeviceBuffer<float> bias(RandomVector(OC, 123));
  const auto* cx = reinterpret_cast<const Act*>(x.get());
  const auto* cw = reinterpret_cast<const Act*>(w.get());
  const auto* ca = reinterpret_cast<const Act*>(a.get());
  auto* wb = reinterpret_cast<Act*>(with_bias.get());
  auto* wo = reinterpret_cast<Act*>(without.get());
  auto* o1 = reinterpret_cast<Act*>(out1.get());
  auto* o2 = reinterpret_cast<Act*>(out2.get());
  ASSERT_TRUE(cuda::MatmulForward(ctx, wb, cx, cw, bias.get(), N, Cin, OC).ok());
  ASSERT_TRUE(
      cuda::ResidualForward(ctx, o1, ca, static_cast<const Act*>(wb), static_cast<int64_t>(N) * OC)
          .ok());
  ASSERT_TRUE(
      cuda::MatmulForward(ctx, wo, cx, cw, static_cast<const float*>(nullptr), N, Cin, OC).ok());
  ASSERT_TRUE(
      cuda::BiasResidualForward(ctx, o2, ca, static_cast<const Act*>(wo), bias.get(), N, OC).ok());
  EXPECT_EQ(out1.Download(), out2.Download()) << "residual";
  ASSERT_TRUE(
      cuda::GeluForward(ctx, o1, static_cast<const Act*>(wb), static_cast<int64_t>(N) * OC).ok());
  ASSERT_TRUE(cuda::BiasGeluForward(ctx, o2, wo, bias.get(), N, OC).ok());
  EXPECT_EQ(with_bias.Download(), without.Download()) << "pre + bias";
  EXPECT_EQ(out1.Download(), out2.Download()) << "gelu";
}

TEST_F(GpuOpsTest, FusedBiasGivesTheSameBits) {
  for (const int OC : {96, 30}) {
    FusedBiasSameBits<float>(ctx(), 37, 24, OC);
    FusedBiasSameBits<cuda::bf16>(ctx(), 37, 24, OC);
  }
}

// The attention with the qkv bias passed to it (added as q, k, v are copied) and the attention
// on the input with the bias already added (AddBias's arithmetic, then rounding to Act) give
// the same bits, forward and backward; hs 8 copies in packs, hs 10 element by element.
template <typename Act>
void AttentionInputBiasSameBits(cuda::CudaContext& ctx, int B, int T, int C, int NH) {
  SCOPED_TRACE(::testing::Message()
               << "C=" << C << " NH=" << NH << (sizeof(Act) == 2 ? " bf16" : " fp32"));
  using Raw = RawOf<Act>;
  const auto to_raw = ToRaw<Act>;
  const auto round = [](std::vector<float> v) {
    return sizeof(Act) == 2 ? RoundToBf16(std::move(v)) : v;
  };
  const int64_t n = static_cast<int64_t>(B) * T * 3 * C;
  const auto raw = round(RandomVector(n, 140, 2.0f));
  const auto bias = RandomVector(3 * C, 141);
  std::vector<float> biased(n);
  for (int64_t i = 0; i < n; ++i) biased[i] = raw[i] + bias[i % (3 * C)];
  biased = round(biased);
  const int64_t att_n = static_cast<int64_t>(B) * NH * T * T;
  DeviceBuffer<Raw> d_raw(to_raw(raw)), d_biased(to_raw(biased)),
      d_dout(to_raw(RandomVector(static_cast<int64_t>(B) * T * C, 142))), out1(B * T * C),
      out2(B * T * C), att1(att_n), att2(att_n), datt(att_n), dinp1(n), dinp2(n);
  att1.FillBytes(0xFF);  // the same fill where neither writes (beyond the causal blocks)
  att2.FillBytes(0xFF);
  DeviceBuffer<float> d_bias(bias);
  const auto act = [](DeviceBuffer<Raw>& b) { return reinterpret_cast<Act*>(b.get()); };
  const auto cact = [](DeviceBuffer<Raw>& b) { return reinterpret_cast<const Act*>(b.get()); };
  ASSERT_TRUE(cuda::AttentionForward(ctx, act(out1), act(att1), cact(d_biased), B, T, C, NH).ok());
  ASSERT_TRUE(
      cuda::AttentionForward(ctx, act(out2), act(att2), cact(d_raw), B, T, C, NH, d_bias.get())
          .ok());
  EXPECT_EQ(out1.Download(), out2.Download()) << "out";
  EXPECT_EQ(att1.Download(), att2.Download()) << "att";
  ASSERT_TRUE(cuda::AttentionBackward(ctx, act(dinp1), act(datt), cact(d_dout), cact(d_biased),
                                      cact(att1), B, T, C, NH, cuda::GradWrite::kOverwrite)
                  .ok());
  ASSERT_TRUE(cuda::AttentionBackward(ctx, act(dinp2), act(datt), cact(d_dout), cact(d_raw),
                                      cact(att1), B, T, C, NH, cuda::GradWrite::kOverwrite,
                                      d_bias.get())
                  .ok());
  EXPECT_EQ(dinp1.Download(), dinp2.Download()) << "dinp";
  EXPECT_EQ(d_raw.Download(), to_raw(raw)) << "the input is not modified";
}

TEST_F(GpuOpsTest, AttentionInputBiasGivesTheSameBits) {
  AttentionInputBiasSameBits<float>(ctx(), 2, 40, 24, 3);
  AttentionInputBiasSameBits<cuda::bf16>(ctx(), 2, 40, 24, 3);
  AttentionInputBiasSameBits<float>(ctx(), 2, 40, 30, 3);
  AttentionInputBiasSameBits<cuda::bf16>(ctx(), 2, 40, 30, 3);
}

// GradWrite::kOverwrite: the gradient buffer starts as NaN and must come out equal to what
// accumulating into a zeroed buffer gives (GELU bit for bit; the products within tolerance,
// cuBLAS may pick another algorithm for beta 0), parameter gradients still accumulated.
TEST_F(GpuOpsTest, OverwritingGradientsNeverReadTheBuffer) {
  const auto overwrite = cuda::GradWrite::kOverwrite;
  // GELU, fp32 and bf16: n 4099 element by element, 4096 in 16-byte packs (the model's path).
  for (const int64_t n : {int64_t{4099}, int64_t{4096}}) {
    SCOPED_TRACE(::testing::Message() << "gelu n=" << n);
    auto x = RandomVector(n, 130, 3.0f), g = RandomVector(n, 131);
    DeviceBuffer<float> d_x(x), d_g(g), acc(n), over(n);
    acc.Zero();
    over.FillBytes(0xFF);
    const float* cx = d_x.get();
    const float* cg = d_g.get();
    ASSERT_TRUE(cuda::GeluBackward(ctx(), acc.get(), cx, cg, n).ok());
    ASSERT_TRUE(cuda::GeluBackward(ctx(), over.get(), cx, cg, n, overwrite).ok());
    EXPECT_TRUE(BitIdentical(over.Download(), acc.Download())) << "fp32 gelu";
    Bf16Buffer x16(ToBf16Bits(x)), g16(ToBf16Bits(g)), acc16(n), over16(n);
    acc16.Zero();
    over16.FillBytes(0xFF);
    const auto* cx16 = static_cast<const cuda::bf16*>(AsBf16(x16));
    const auto* cg16 = static_cast<const cuda::bf16*>(AsBf16(g16));
    ASSERT_TRUE(cuda::GeluBackward(ctx(), AsBf16(acc16), cx16, cg16, n).ok());
    ASSERT_TRUE(cuda::GeluBackward(ctx(), AsBf16(over16), cx16, cg16, n, overwrite).ok());
    EXPECT_EQ(over16.Download(), acc16.Download()) << "bf16 gelu";
  }

  // Linear layer: dinp written over, dweight and dbias added to.
  const int N = 45, C = 32, OC = 96;
  auto inp = RandomVector(N * C, 132), w = RandomVector(OC * C, 133);
  auto dout = RandomVector(N * OC, 134), dw = RandomVector(OC * C, 135), db = RandomVector(OC, 136);
  std::vector<float> dinp_ref(N * C, 0.f);
  auto dw_ref = dw, db_ref = db;
  cpu::MatmulBackward(cpu_, dinp_ref.data(), dw_ref.data(), db_ref.data(), dout.data(), inp.data(),
                      w.data(), N, C, OC);
  DeviceBuffer<float> d_inp(inp), d_w(w), d_dout(dout), d_dw(dw), d_db(db), d_dinp(N * C);
  d_dinp.FillBytes(0xFF);
  ASSERT_TRUE(cuda::MatmulBackward(ctx(), d_dinp.get(), d_dw.get(), d_db.get(),
                                   static_cast<const float*>(d_dout.get()),
                                   static_cast<const float*>(d_inp.get()),
                                   static_cast<const float*>(d_w.get()), N, C, OC, overwrite)
                  .ok());
  ExpectAllClose("matmul dinp", d_dinp.Download(), dinp_ref, 1e-4f, kRtol32);
  ExpectAllClose("matmul dweight", d_dw.Download(), dw_ref, 1e-4f, kRtol32);
  ExpectAllClose("matmul dbias", d_db.Download(), db_ref, 1e-4f, kRtol32);

  // Attention (T 512: position blocks and packed rows).
  const int B = 1, T = 512, AC = 32, NH = 2;
  auto qkv = RandomVector(B * T * 3 * AC, 137), ady = RandomVector(B * T * AC, 138);
  std::vector<float> aout(B * T * AC), att(B * NH * T * T), datt(att.size());
  std::vector<float> adinp_ref(B * T * 3 * AC, 0.f);
  cpu::AttentionForward(cpu_, aout.data(), att.data(), qkv.data(), B, T, AC, NH);
  cpu::AttentionBackward(cpu_, adinp_ref.data(), datt.data(), ady.data(), qkv.data(), att.data(), B,
                         T, AC, NH);
  DeviceBuffer<float> d_qkv(qkv), d_ady(ady), d_att(att), d_datt(datt.size()),
      d_adinp(adinp_ref.size());
  d_datt.FillBytes(0xFF);
  d_adinp.FillBytes(0xFF);
  ASSERT_TRUE(cuda::AttentionBackward(
                  ctx(), d_adinp.get(), d_datt.get(), static_cast<const float*>(d_ady.get()),
                  static_cast<const float*>(d_qkv.get()), static_cast<const float*>(d_att.get()), B,
                  T, AC, NH, overwrite)
                  .ok());
  ExpectAllClose("attention dinp", d_adinp.Download(), adinp_ref, 1e-4f, kRtol32);
}

TEST_F(GpuOpsTest, SumOfSquaresAndSum) {
  const int64_t n = 1000003;
  auto x = RandomVector(n, 60);
  DeviceBuffer<float> d_x(x);
  auto ss = cuda::SumOfSquares(ctx(), d_x.get(), n);
  ASSERT_TRUE(ss.ok()) << ss.status();
  const double ref = cpu::SumOfSquares(cpu_, x.data(), n);
  EXPECT_NEAR(*ss, ref, 1e-10 * ref);
  double plain = 0;
  for (float v : x) plain += v;
  auto s = cuda::Sum(ctx(), d_x.get(), n);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_NEAR(*s, plain, 1e-9 * n);
  auto again = cuda::SumOfSquares(ctx(), d_x.get(), n);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *ss);  // fixed order: same bits
  auto empty = cuda::SumOfSquares(ctx(), d_x.get(), 0);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(*empty, 0.0);
}

TEST_F(GpuOpsTest, AdamWMatchesCpu) {
  const int64_t n = 100003;
  auto params = RandomVector(n, 70), grads = RandomVector(n, 71, 0.1f);
  auto m = RandomVector(n, 72, 0.01f), v = RandomVector(n, 73, 0.001f);
  for (float& x : v) x = std::fabs(x);
  std::vector<uint8_t> mask(n);
  for (int64_t i = 0; i < n; ++i) mask[i] = (i / 7) % 2;
  DeviceBuffer<float> d_params(params), d_grads(grads), d_m(m), d_v(v);
  DeviceBuffer<uint8_t> d_mask(mask);
  for (int64_t t = 1; t <= 3; ++t) {
    cpu::AdamWParams cp{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.7f, t};
    cuda::AdamWParams gp{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.7f, t};
    cpu::AdamWUpdate(cpu_, params.data(), grads.data(), m.data(), v.data(), mask.data(), n, cp);
    ASSERT_TRUE(cuda::AdamWUpdate(ctx(), d_params.get(), d_grads.get(), d_m.get(), d_v.get(),
                                  d_mask.get(), n, gp)
                    .ok());
  }
  // The kernel repeats the CPU baseline's IEEE operations without FMA contraction (equal
  // bits); the CPU's AVX2+FMA path rounds differently in the last bit, which the absolute
  // terms (an ulp of the operands: m ~ 1e-2, params ~ 1) cover where terms cancel.
  ExpectAllClose("adamw params", d_params.Download(), params, 1e-7f, 1e-6f);
  ExpectAllClose("adamw m", d_m.Download(), m, 1e-9f, 1e-6f);
  ExpectAllClose("adamw v", d_v.Download(), v, 1e-12f, 1e-6f);
}

// bf16 activations: inputs rounded to bf16 on the host feed both sides; the GPU stores its
// outputs in bf16, hence the looser tolerance.
// The packed row kernels (16-byte loads, one pass) take rows that are a whole number of
// warp-wide packs: C or T a multiple of 128 (fp32) or 256 (bf16), up to 8 packs. These
// shapes go through them; the cases above (C = 200, T = 37 / 64) through the per-element
// loops.
TEST_F(GpuOpsTest, PackedRowKernelsMatchCpu) {
  AttentionCase(cpu_, ctx(), 2, 128, 64, 4);  // fp32: 1 pack per row
  AttentionCase(cpu_, ctx(), 1, 384, 64, 2);  // fp32: 3 packs per row
  for (int C : {256, 768}) {
    SCOPED_TRACE(::testing::Message() << "LayerNorm, C=" << C);
    const int N = 67;
    auto inp = RandomVector(N * C, 90 + C, 2.0f);
    auto w = RandomVector(C, 91), b = RandomVector(C, 92);
    auto dout = RandomVector(N * C, 93);
    std::vector<float> out(N * C), mean(N), rstd(N);
    cpu::LayerNormForward(cpu_, out.data(), mean.data(), rstd.data(), inp.data(), w.data(),
                          b.data(), N, C);
    // fp32.
    auto dinp = RandomVector(N * C, 94), dw = RandomVector(C, 95), db = RandomVector(C, 96);
    auto dinp_ref = dinp, dw_ref = dw, db_ref = db;
    cpu::LayerNormBackward(cpu_, dinp_ref.data(), dw_ref.data(), db_ref.data(), dout.data(),
                           inp.data(), w.data(), mean.data(), rstd.data(), N, C);
    DeviceBuffer<float> d_inp(inp), d_w(w), d_mean(mean), d_rstd(rstd), d_dout(dout), d_dinp(dinp),
        d_dw(dw), d_db(db);
    ASSERT_TRUE(cuda::LayerNormBackward(ctx(), d_dinp.get(), d_dw.get(), d_db.get(),
                                        static_cast<const float*>(d_dout.get()),
                                        static_cast<const float*>(d_inp.get()), d_w.get(),
                                        d_mean.get(), d_rstd.get(), N, C)
                    .ok());
    ExpectAllClose("packed ln dinp", d_dinp.Download(), dinp_ref, kAtol32, kRtol32);
    // bf16 activations (the CPU gets the same rounded inputs).
    auto x16 = RoundToBf16(inp), g16 = RoundToBf16(dout), acc16 = RoundToBf16(dinp);
    std::vector<float> mean16(N), rstd16(N);
    cpu::LayerNormForward(cpu_, out.data(), mean16.data(), rstd16.data(), x16.data(), w.data(),
                          b.data(), N, C);
    auto ref16 = acc16, dw16 = dw, db16 = db;
    cpu::LayerNormBackward(cpu_, ref16.data(), dw16.data(), db16.data(), g16.data(), x16.data(),
                           w.data(), mean16.data(), rstd16.data(), N, C);
    Bf16Buffer h_x(ToBf16Bits(x16)), h_g(ToBf16Bits(g16)), h_dinp(ToBf16Bits(acc16));
    DeviceBuffer<float> h_mean(mean16), h_rstd(rstd16), h_dw(dw), h_db(db);
    ASSERT_TRUE(cuda::LayerNormBackward(ctx(), AsBf16(h_dinp), h_dw.get(), h_db.get(),
                                        static_cast<const cuda::bf16*>(AsBf16(h_g)),
                                        static_cast<const cuda::bf16*>(AsBf16(h_x)), d_w.get(),
                                        h_mean.get(), h_rstd.get(), N, C)
                    .ok());
    ExpectAllClose("packed bf16 ln dinp", Download16(h_dinp), ref16, 2e-2f, kRtol16);

    // Forward, fp32 and bf16 (out still holds the CPU's bf16-input forward).
    DeviceBuffer<float> f_out(N * C), f_mean(N), f_rstd(N), d_b(b);
    ASSERT_TRUE(cuda::LayerNormForward(ctx(), f_out.get(), f_mean.get(), f_rstd.get(),
                                       static_cast<const float*>(d_inp.get()), d_w.get(), d_b.get(),
                                       N, C)
                    .ok());
    std::vector<float> out32(N * C);
    cpu::LayerNormForward(cpu_, out32.data(), mean.data(), rstd.data(), inp.data(), w.data(),
                          b.data(), N, C);
    ExpectAllClose("packed ln out", f_out.Download(), out32, kAtol32, kRtol32);
    ExpectAllClose("packed ln mean", f_mean.Download(), mean, kAtol32, kRtol32);
    ExpectAllClose("packed ln rstd", f_rstd.Download(), rstd, kAtol32, kRtol32);
    Bf16Buffer h_out(N * C);
    ASSERT_TRUE(cuda::LayerNormForward(ctx(), AsBf16(h_out), f_mean.get(), f_rstd.get(),
                                       static_cast<const cuda::bf16*>(AsBf16(h_x)), d_w.get(),
                                       d_b.get(), N, C)
                    .ok());
    ExpectAllClose("packed bf16 ln out", Download16(h_out), out, kAtol16, kRtol16);
    ExpectAllClose("packed bf16 ln mean", f_mean.Download(), mean16, kAtol32, kRtol32);
    ExpectAllClose("packed bf16 ln rstd", f_rstd.Download(), rstd16, kAtol32, kRtol32);
  }
  // bf16 attention backward at T = 256 (1 pack per row): the CPU backward from the same
  // bf16-rounded inputs and probabilities.
  const int B = 1, T = 256, C = 64, NH = 2;
  auto qkv = RoundToBf16(RandomVector(B * T * 3 * C, 97));
  auto dout = RoundToBf16(RandomVector(B * T * C, 98));
  std::vector<float> out(B * T * C), att(B * NH * T * T), datt(B * NH * T * T);
  cpu::AttentionForward(cpu_, out.data(), att.data(), qkv.data(), B, T, C, NH);
  att = RoundToBf16(att);
  std::vector<float> dqkv_ref(B * T * 3 * C, 0.0f);
  cpu::AttentionBackward(cpu_, dqkv_ref.data(), datt.data(), dout.data(), qkv.data(), att.data(), B,
                         T, C, NH);
  Bf16Buffer d_qkv(ToBf16Bits(qkv)), d_dout(ToBf16Bits(dout)), d_att(ToBf16Bits(att)),
      d_datt(B * NH * T * T), d_dqkv(ToBf16Bits(std::vector<float>(B * T * 3 * C, 0.0f)));
  ASSERT_TRUE(cuda::AttentionBackward(ctx(), AsBf16(d_dqkv), AsBf16(d_datt),
                                      static_cast<const cuda::bf16*>(AsBf16(d_dout)),
                                      static_cast<const cuda::bf16*>(AsBf16(d_qkv)),
                                      static_cast<const cuda::bf16*>(AsBf16(d_att)), B, T, C, NH)
                  .ok());
  ExpectAllClose("packed bf16 attention dqkv", Download16(d_dqkv), dqkv_ref, 2e-2f, 5e-2f);
}

TEST_F(GpuOpsTest, Bf16LayerNormMatmulGeluAttention) {
  const int B = 2, T = 48, C = 64, NH = 4, OC = 96;
  const int N = B * T;
  auto x = RoundToBf16(RandomVector(N * C, 80, 2.0f));
  auto lw = RandomVector(C, 81), lb = RandomVector(C, 82);
  auto w = RoundToBf16(RandomVector(OC * C, 83, 0.2f));
  auto bias = RandomVector(OC, 84);

  // LayerNorm.
  std::vector<float> ln(N * C), mean(N), rstd(N);
  cpu::LayerNormForward(cpu_, ln.data(), mean.data(), rstd.data(), x.data(), lw.data(), lb.data(),
                        N, C);
  Bf16Buffer d_x(ToBf16Bits(x)), d_ln(N * C);
  DeviceBuffer<float> d_lw(lw), d_lb(lb), d_mean(N), d_rstd(N);
  ASSERT_TRUE(cuda::LayerNormForward(ctx(), AsBf16(d_ln), d_mean.get(), d_rstd.get(),
                                     static_cast<const cuda::bf16*>(AsBf16(d_x)), d_lw.get(),
                                     d_lb.get(), N, C)
                  .ok());
  ExpectAllClose("bf16 ln", Download16(d_ln), ln, kAtol16, kRtol16);
  ExpectAllClose("bf16 ln rstd", d_rstd.Download(), rstd, kAtol32, kRtol32);

  // Matmul, bf16 out and fp32 out, from the same bf16 inputs.
  std::vector<float> out(N * OC);
  cpu::MatmulForward(cpu_, out.data(), x.data(), w.data(), bias.data(), N, C, OC);
  Bf16Buffer d_w(ToBf16Bits(w)), d_out16(N * OC);
  DeviceBuffer<float> d_bias(bias), d_out32(N * OC);
  const cuda::bf16* cx = AsBf16(d_x);
  const cuda::bf16* cw = AsBf16(d_w);
  ASSERT_TRUE(cuda::MatmulForward(ctx(), AsBf16(d_out16), cx, cw, d_bias.get(), N, C, OC).ok());
  ASSERT_TRUE(cuda::MatmulForward(ctx(), d_out32.get(), cx, cw, d_bias.get(), N, C, OC).ok());
  ExpectAllClose("bf16 matmul (bf16 out)", Download16(d_out16), out, 2e-2f, kRtol16);
  ExpectAllClose("bf16 matmul (fp32 out)", d_out32.Download(), out, 1e-4f, 1e-4f);

  // Matmul backward: fp32 weight gradient from bf16 operands, bf16 input gradient.
  auto dout = RoundToBf16(RandomVector(N * OC, 85));
  auto dinp = RoundToBf16(RandomVector(N * C, 86));
  auto dw = RandomVector(OC * C, 87), db = RandomVector(OC, 88);
  auto dinp_ref = dinp, dw_ref = dw, db_ref = db;
  cpu::MatmulBackward(cpu_, dinp_ref.data(), dw_ref.data(), db_ref.data(), dout.data(), x.data(),
                      w.data(), N, C, OC);
  Bf16Buffer d_dout(ToBf16Bits(dout)), d_dinp(ToBf16Bits(dinp));
  DeviceBuffer<float> d_dw(dw), d_db(db);
  ASSERT_TRUE(cuda::MatmulBackward(ctx(), AsBf16(d_dinp), d_dw.get(), d_db.get(),
                                   static_cast<const cuda::bf16*>(AsBf16(d_dout)), cx, cw, N, C, OC)
                  .ok());
  ExpectAllClose("bf16 matmul dinp", Download16(d_dinp), dinp_ref, 2e-2f, kRtol16);
  ExpectAllClose("bf16 matmul dweight", d_dw.Download(), dw_ref, 1e-3f, 1e-4f);
  ExpectAllClose("bf16 matmul dbias", d_db.Download(), db_ref, 1e-3f, 1e-4f);

  // GELU.
  std::vector<float> gelu(N * C);
  cpu::GeluForward(cpu_, gelu.data(), x.data(), N * C);
  Bf16Buffer d_gelu(N * C);
  ASSERT_TRUE(cuda::GeluForward(ctx(), AsBf16(d_gelu), cx, N * C).ok());
  ExpectAllClose("bf16 gelu", Download16(d_gelu), gelu, kAtol16, kRtol16);

  // Attention forward: scores are rounded to bf16 before the softmax, so compare loosely.
  // hs 16: 16-byte head copies; hs 10: element copies; T 512: packed softmax rows and two
  // causal position blocks.
  struct Shape {
    int B, T, C, NH;
  };
  for (const Shape& a : {Shape{B, T, C, NH}, Shape{B, T, 30, 3}, Shape{1, 512, 64, 4}}) {
    SCOPED_TRACE(::testing::Message()
                 << "attention B=" << a.B << " T=" << a.T << " C=" << a.C << " NH=" << a.NH);
    const int an = a.B * a.T;
    auto qkv = RoundToBf16(RandomVector(an * 3 * a.C, 89));
    std::vector<float> aout(an * a.C), att(a.B * a.NH * a.T * a.T);
    cpu::AttentionForward(cpu_, aout.data(), att.data(), qkv.data(), a.B, a.T, a.C, a.NH);
    Bf16Buffer d_qkv(ToBf16Bits(qkv)), d_aout(ToBf16Bits(RandomVector(an * a.C, 79))),
        d_att(att.size());
    d_att.FillBytes(0xFF);  // NaN
    ASSERT_TRUE(cuda::AttentionForward(ctx(), AsBf16(d_aout), AsBf16(d_att),
                                       static_cast<const cuda::bf16*>(AsBf16(d_qkv)), a.B, a.T, a.C,
                                       a.NH)
                    .ok());
    const auto probs = CheckBeyondCausalBlocks(Download16(d_att), att, a.T);
    ExpectAllClose("bf16 attention probs", probs, att, 4e-3f, 3e-2f);
    ExpectAllClose("bf16 attention out", Download16(d_aout), aout, 1e-2f, 3e-2f);
    // Probabilities are ~1/t at T 512, under the absolute tolerance: each row must also sum
    // to 1 (a missed or zeroed pack would not).
    for (int r = 0; r < a.B * a.NH * a.T; ++r) {
      double row_sum = 0;
      for (int j = 0; j < a.T; ++j) row_sum += probs[static_cast<size_t>(r) * a.T + j];
      ASSERT_NEAR(row_sum, 1.0, 2e-2) << "row " << r;
    }
  }
}

TEST_F(GpuOpsTest, Bf16EncoderAndCrossEntropyBackward) {
  const int B = 2, T = 32, C = 64, V = 40, Vp = 64;
  auto inp = RandomTokens(B * T, V, 90);
  auto wte = RandomVector(Vp * C, 91), wpe = RandomVector(T * C, 92);
  std::vector<float> out(B * T * C);
  cpu::EncoderForward(cpu_, out.data(), inp.data(), wte.data(), wpe.data(), B, T, C);
  DeviceBuffer<float> d_wte(wte), d_wpe(wpe);
  DeviceBuffer<int32_t> d_inp(inp);
  Bf16Buffer d_out(B * T * C);
  ASSERT_TRUE(
      cuda::EncoderForward(ctx(), AsBf16(d_out), d_inp.get(), d_wte.get(), d_wpe.get(), B, T, C)
          .ok());
  ExpectAllClose("bf16 encoder", Download16(d_out), out, 0, 1.0f / 256);

  auto dout = RoundToBf16(RandomVector(B * T * C, 93));
  auto dwte = RandomVector(Vp * C, 94), dwpe = RandomVector(T * C, 95);
  auto dwte_ref = dwte, dwpe_ref = dwpe;
  cpu::EncoderBackward(cpu_, dwte_ref.data(), dwpe_ref.data(), dout.data(), inp.data(), B, T, C);
  Bf16Buffer d_dout(ToBf16Bits(dout));
  DeviceBuffer<float> d_dwte(dwte), d_dwpe(dwpe);
  ASSERT_TRUE(cuda::EncoderBackward(ctx(), d_dwte.get(), d_dwpe.get(),
                                    static_cast<const cuda::bf16*>(AsBf16(d_dout)), d_inp.get(), B,
                                    T, C, Vp)
                  .ok());
  ExpectAllClose("bf16 dwte", d_dwte.Download(), dwte_ref, 0, 0);
  ExpectAllClose("bf16 dwpe", d_dwpe.Download(), dwpe_ref, 0, 0);

  // bf16 dlogits from fp32 logits, with (Vp 64) and without (Vp 63) 8-byte stores.
  const int N = B * T;
  for (const auto& [cv, cvp] : {std::pair<int, int>{V, Vp}, std::pair<int, int>{41, 63}}) {
    SCOPED_TRACE(::testing::Message() << "cross-entropy V=" << cv << " Vp=" << cvp);
    auto logits = RandomVector(N * cvp, 96, 4.0f);
    auto targets = RandomTokens(N, cv, 97);
    std::vector<float> probs(N * cvp), losses(N), dlogits(N * cvp);
    cpu::SoftmaxCrossEntropyForward(cpu_, probs.data(), losses.data(), logits.data(),
                                    targets.data(), N, cv, cvp);
    cpu::SoftmaxCrossEntropyBackward(cpu_, dlogits.data(), probs.data(), targets.data(), 0.5f, N,
                                     cv, cvp);
    DeviceBuffer<float> d_logits(logits), d_stats(2 * N), d_losses(N);
    DeviceBuffer<int32_t> d_targets(targets);
    Bf16Buffer d_dlogits(N * cvp);
    ASSERT_TRUE(cuda::CrossEntropyForward(ctx(), d_losses.get(), d_stats.get(), d_logits.get(),
                                          d_targets.get(), N, cv, cvp)
                    .ok());
    ASSERT_TRUE(cuda::CrossEntropyBackward(
                    ctx(), AsBf16(d_dlogits), static_cast<const float*>(d_logits.get()),
                    static_cast<const float*>(d_stats.get()), d_targets.get(), 0.5f, N, cv, cvp)
                    .ok());
    ExpectAllClose("losses", d_losses.Download(), losses, kAtol32, kRtol32);
    ExpectAllClose("bf16 dlogits", Download16(d_dlogits), dlogits, 1e-6f, 1.0f / 256);
  }
  // bf16 dlogits cannot be written over the fp32 logits.
  DeviceBuffer<float> d_logits(N * Vp), d_stats(2 * N);
  DeviceBuffer<int32_t> d_targets(RandomTokens(N, V, 98));
  const auto overlap = cuda::CrossEntropyBackward(
      ctx(), reinterpret_cast<cuda::bf16*>(d_logits.get()),
      static_cast<const float*>(d_logits.get()), static_cast<const float*>(d_stats.get()),
      d_targets.get(), 0.5f, N, V, Vp);
  EXPECT_EQ(overlap.code(), absl::StatusCode::kInvalidArgument) << overlap;
}

// Deterministic mode: the reductions have a fixed order, so repeating the same calls on the
// same inputs gives the same bits.
TEST_F(GpuOpsTest, DeterministicBackwardIsBitIdentical) {
  const int B = 4, T = 64, C = 128, NH = 4, Vp = 96, V = 80;
  const int N = B * T;
  auto inp = RandomTokens(N, V, 100);
  auto x = RandomVector(N * C, 101), dout = RandomVector(N * C, 102);
  auto w = RandomVector(4 * C * C, 103), lw = RandomVector(C, 104);
  auto qkv = RandomVector(N * 3 * C, 105), dqkv_out = RandomVector(N * C, 106);
  std::vector<float> mean(N), rstd(N), ln(N * C);
  cpu::LayerNormForward(cpu_, ln.data(), mean.data(), rstd.data(), x.data(), lw.data(), lw.data(),
                        N, C);
  DeviceBuffer<float> d_x(x), d_dout(dout), d_w(w), d_lw(lw), d_mean(mean), d_rstd(rstd),
      d_qkv(qkv), d_aout(N * C), d_att(B * NH * T * T), d_datt(B * NH * T * T),
      d_dqkv_out(dqkv_out), d_dmlp(N * 4 * C);
  DeviceBuffer<int32_t> d_inp(inp);
  auto run = [&]() -> std::vector<std::vector<float>> {
    DeviceBuffer<float> dwte(Vp * C), dwpe(T * C), dinp(N * C), dw(C), db(C), dmw(4 * C * C),
        dmb(4 * C), dmi(N * C), dqkv(N * 3 * C);
    for (DeviceBuffer<float>* b : {&dwte, &dwpe, &dinp, &dw, &db, &dmw, &dmb, &dmi, &dqkv}) {
      b->Zero();
    }
    const float* cdout = d_dout.get();
    const float* cx = d_x.get();
    EXPECT_TRUE(
        cuda::EncoderBackward(ctx(), dwte.get(), dwpe.get(), cdout, d_inp.get(), B, T, C, Vp).ok());
    EXPECT_TRUE(cuda::LayerNormBackward(ctx(), dinp.get(), dw.get(), db.get(), cdout, cx,
                                        d_lw.get(), d_mean.get(), d_rstd.get(), N, C)
                    .ok());
    // A [N, 4C] gradient through a C -> 4C linear layer.
    EXPECT_TRUE(cuda::MatmulForward(ctx(), d_dmlp.get(), cx, static_cast<const float*>(d_w.get()),
                                    static_cast<const float*>(nullptr), N, C, 4 * C)
                    .ok());
    EXPECT_TRUE(cuda::MatmulBackward(ctx(), dmi.get(), dmw.get(), dmb.get(),
                                     static_cast<const float*>(d_dmlp.get()), cx,
                                     static_cast<const float*>(d_w.get()), N, C, 4 * C)
                    .ok());
    EXPECT_TRUE(cuda::AttentionForward(ctx(), d_aout.get(), d_att.get(),
                                       static_cast<const float*>(d_qkv.get()), B, T, C, NH)
                    .ok());
    EXPECT_TRUE(cuda::AttentionBackward(ctx(), dqkv.get(), d_datt.get(),
                                        static_cast<const float*>(d_dqkv_out.get()),
                                        static_cast<const float*>(d_qkv.get()),
                                        static_cast<const float*>(d_att.get()), B, T, C, NH)
                    .ok());
    return {dwte.Download(), dwpe.Download(), dinp.Download(), dw.Download(),  db.Download(),
            dmw.Download(),  dmb.Download(),  dmi.Download(),  dqkv.Download()};
  };
  const auto first = run();
  const auto second = run();
  ASSERT_EQ(first.size(), second.size());
  for (size_t i = 0; i < first.size(); ++i) {
    EXPECT_TRUE(BitIdentical(first[i], second[i])) << "output " << i << " differs between runs";
  }
}

TEST_F(GpuOpsTest, RejectsBadShapes) {
  DeviceBuffer<float> buf(64);
  const float* c = buf.get();
  EXPECT_EQ(cuda::MatmulForward(ctx(), buf.get(), c, c, nullptr, 0, 4, 4).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::AttentionForward(ctx(), buf.get(), buf.get(), c, 1, 2, 6, 4).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::CrossEntropyForward(ctx(), buf.get(), buf.get(), c, nullptr, 1, 8, 4).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cuda::CrossEntropyBackward(ctx(), buf.get(), c, c, nullptr, 1.f, 1, 8, 4).code(),
            absl::StatusCode::kInvalidArgument);
  cuda::AdamWParams p{1e-3f, 0.9f, 0.95f, 1e-8f, 0.f, 1.f, 0};
  EXPECT_EQ(cuda::AdamWUpdate(ctx(), buf.get(), c, buf.get(), buf.get(), nullptr, 64, p).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace spotrain::kernels
