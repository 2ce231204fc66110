// Checks the cuBLAS mapping of every matrix product of the CUDA kernels
// (kernels/cuda/gemm_plan.h) without a GPU: each plan is evaluated by a host column-major
// strided-batched GEMM with cuBLAS semantics, and the composed results are compared with
// the CPU reference kernels. This test runs everywhere (nothing here needs CUDA at run time).
#include "kernels/cuda/gemm_plan.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/ops.h"
#include "tests/gpu/gpu_test_util.h"

namespace spotrain::kernels::cuda {
namespace {

using testing_gpu::ExpectAllClose;
using testing_gpu::RandomVector;

// cublasGemmStridedBatchedEx semantics (column-major; beta == 0 ignores C's old contents).
void HostGemm(const GemmPlan& p, const float* a_base, const float* b_base, float* c_base) {
  for (int i = 0; i < p.batch; ++i) {
    const float* a = a_base + p.a_offset + i * p.stride_a;
    const float* b = b_base + p.b_offset + i * p.stride_b;
    float* c = c_base + p.c_offset + i * p.stride_c;
    for (int col = 0; col < p.n; ++col) {
      for (int row = 0; row < p.m; ++row) {
        double sum = 0;
        for (int l = 0; l < p.k; ++l) {
          const float av = p.trans_a ? a[l + static_cast<int64_t>(row) * p.lda]
                                     : a[row + static_cast<int64_t>(l) * p.lda];
          const float bv = p.trans_b ? b[col + static_cast<int64_t>(l) * p.ldb]
                                     : b[l + static_cast<int64_t>(col) * p.ldb];
          sum += static_cast<double>(av) * bv;
        }
        float& out = c[row + static_cast<int64_t>(col) * p.ldc];
        const double prior = p.beta == 0.0f ? 0.0 : static_cast<double>(p.beta) * out;
        out = static_cast<float>(p.alpha * sum + prior);
      }
    }
  }
}

// What CausalSoftmaxKernel computes, on one row of scores.
void HostCausalSoftmax(float* row, int t, int T) {
  float mx = -INFINITY;
  for (int j = 0; j <= t; ++j) mx = std::max(mx, row[j]);
  double sum = 0;
  for (int j = 0; j <= t; ++j) sum += std::exp(static_cast<double>(row[j]) - mx);
  for (int j = 0; j < T; ++j) {
    row[j] = j <= t ? static_cast<float>(std::exp(static_cast<double>(row[j]) - mx) / sum) : 0.f;
  }
}

// What CausalSoftmaxBackwardKernel computes, in place over drow.
void HostCausalSoftmaxBackward(float* drow, const float* prow, int t, int T) {
  double dot = 0;
  for (int j = 0; j <= t; ++j) dot += static_cast<double>(prow[j]) * drow[j];
  for (int j = 0; j < T; ++j) {
    drow[j] = j <= t ? static_cast<float>(prow[j] * (drow[j] - dot)) : 0.f;
  }
}

cpu::CpuContext Cpu() { return cpu::CpuContext{1}; }

TEST(GemmPlanTest, MatmulForwardMatchesCpu) {
  const int N = 37, C = 24, OC = 40;
  auto inp = RandomVector(N * C, 1), w = RandomVector(OC * C, 2), bias = RandomVector(OC, 3);
  std::vector<float> want(N * OC), got(N * OC, 123.f);
  cpu::MatmulForward(Cpu(), want.data(), inp.data(), w.data(), bias.data(), N, C, OC);
  HostGemm(MatmulForwardPlan(N, C, OC), w.data(), inp.data(), got.data());
  for (int n = 0; n < N; ++n) {
    for (int o = 0; o < OC; ++o) got[n * OC + o] += bias[o];
  }
  ExpectAllClose("out", got, want, 1e-5f, 1e-5f);
}

TEST(GemmPlanTest, MatmulBackwardMatchesCpu) {
  const int N = 29, C = 16, OC = 44;
  auto inp = RandomVector(N * C, 4), w = RandomVector(OC * C, 5), dout = RandomVector(N * OC, 6);
  auto dinp = RandomVector(N * C, 7), dw = RandomVector(OC * C, 8);
  auto dinp_want = dinp, dw_want = dw;
  cpu::MatmulBackward(Cpu(), dinp_want.data(), dw_want.data(), nullptr, dout.data(), inp.data(),
                      w.data(), N, C, OC);
  HostGemm(MatmulBackwardInputPlan(N, C, OC), w.data(), dout.data(), dinp.data());
  HostGemm(MatmulBackwardWeightPlan(N, C, OC), inp.data(), dout.data(), dw.data());
  ExpectAllClose("dinp", dinp, dinp_want, 1e-5f, 1e-5f);
  ExpectAllClose("dweight", dw, dw_want, 1e-5f, 1e-5f);
}

class GemmPlanAttentionTest : public ::testing::TestWithParam<std::tuple<int, int, int, int>> {};

TEST_P(GemmPlanAttentionTest, ForwardAndBackwardMatchCpu) {
  const auto [B, T, C, NH] = GetParam();
  auto inp = RandomVector(B * T * 3 * C, 10 + T);
  auto dout = RandomVector(B * T * C, 11 + T);
  auto dinp = RandomVector(B * T * 3 * C, 12 + T);
  const size_t att_size = static_cast<size_t>(B) * NH * T * T;
  std::vector<float> out_want(B * T * C), att_want(att_size), datt_want(att_size);
  auto dinp_want = dinp;
  cpu::AttentionForward(Cpu(), out_want.data(), att_want.data(), inp.data(), B, T, C, NH);
  cpu::AttentionBackward(Cpu(), dinp_want.data(), datt_want.data(), dout.data(), inp.data(),
                         att_want.data(), B, T, C, NH);

  // The same sequence of steps as AttentionForward / AttentionBackward in ops.cu.
  std::vector<float> out(B * T * C, 7.f), att(att_size, 7.f), datt(att_size, 7.f);
  for (int b = 0; b < B; ++b) {
    HostGemm(AttentionScoresPlan(b, T, C, NH), inp.data(), inp.data(), att.data());
  }
  for (int r = 0; r < B * NH * T; ++r)
    HostCausalSoftmax(&att[r * static_cast<size_t>(T)], r % T, T);
  for (int b = 0; b < B; ++b) {
    HostGemm(AttentionValuesPlan(b, T, C, NH), inp.data(), att.data(), out.data());
  }
  ExpectAllClose("att", att, att_want, 1e-6f, 1e-4f);
  ExpectAllClose("out", out, out_want, 1e-5f, 1e-4f);

  for (int b = 0; b < B; ++b) {
    HostGemm(AttentionGradProbsPlan(b, T, C, NH), inp.data(), dout.data(), datt.data());
    HostGemm(AttentionGradValuesPlan(b, T, C, NH), dout.data(), att.data(), dinp.data());
  }
  for (int r = 0; r < B * NH * T; ++r) {
    HostCausalSoftmaxBackward(&datt[r * static_cast<size_t>(T)], &att[r * static_cast<size_t>(T)],
                              r % T, T);
  }
  for (int b = 0; b < B; ++b) {
    HostGemm(AttentionGradQueriesPlan(b, T, C, NH), inp.data(), datt.data(), dinp.data());
    HostGemm(AttentionGradKeysPlan(b, T, C, NH), inp.data(), datt.data(), dinp.data());
  }
  ExpectAllClose("dinp", dinp, dinp_want, 1e-5f, 1e-4f);
}

INSTANTIATE_TEST_SUITE_P(Shapes, GemmPlanAttentionTest,
                         ::testing::Values(std::make_tuple(2, 8, 16, 2),
                                           std::make_tuple(3, 13, 24, 3),
                                           std::make_tuple(1, 33, 32, 4)));

}  // namespace
}  // namespace spotrain::kernels::cuda
