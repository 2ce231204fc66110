// Checks the cuBLAS mapping of every matrix product of the CUDA kernels and the head-major
// index map of their attention (kernels/cuda/gemm_plan.h) without a GPU: each plan is
// evaluated by a host column-major strided-batched GEMM with cuBLAS semantics, the copies by
// the same HeadLayout the device kernels use, and the composed results are compared with
// the CPU reference kernels. Needs no CUDA: it runs in every build.
#include "kernels/cuda/gemm_plan.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/ops.h"
#include "tests/support/host_arrays.h"

namespace spotrain::kernels::cuda {
namespace {

using testing_arrays::ExpectAllClose;
using testing_arrays::RandomVector;

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
void HostCausalSoftmax(float* row, int t, int end) {
  float mx = -INFINITY;
  for (int j = 0; j <= t; ++j) mx = std::max(mx, row[j]);
  double sum = 0;
  for (int j = 0; j <= t; ++j) sum += std::exp(static_cast<double>(row[j]) - mx);
  for (int j = 0; j < end; ++j) {
    row[j] = j <= t ? static_cast<float>(std::exp(static_cast<double>(row[j]) - mx) / sum) : 0.f;
  }
}

// What CausalSoftmaxBackwardKernel computes, in place over drow.
void HostCausalSoftmaxBackward(float* drow, const float* prow, int t, int end) {
  double dot = 0;
  for (int j = 0; j <= t; ++j) dot += static_cast<double>(prow[j]) * drow[j];
  for (int j = 0; j < end; ++j) {
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

// Token-major -> head-major copy of `layout` (what the device's gather kernel does).
std::vector<float> ToHeadMajor(const std::vector<float>& token, const HeadLayout& layout) {
  std::vector<float> head(layout.size());
  for (int64_t i = 0; i < layout.size(); ++i) head[i] = token[layout.TokenMajorIndex(i)];
  return head;
}

// Head-major -> token-major: stored, or added to what is there (the gradients).
void FromHeadMajor(const std::vector<float>& head, const HeadLayout& layout, bool accumulate,
                   std::vector<float>* token) {
  for (int64_t i = 0; i < layout.size(); ++i) {
    float& dst = (*token)[layout.TokenMajorIndex(i)];
    dst = accumulate ? dst + head[i] : head[i];
  }
}

TEST(HeadLayoutTest, IsABijectionOntoTheChunksTokens) {
  const int B = 5, T = 7, NH = 3, hs = 4;
  for (int S : {1, 3}) {
    const int64_t token_size = static_cast<int64_t>(B) * T * S * NH * hs;
    std::vector<int> hits(token_size, 0);
    for (int b0 = 0; b0 < B; b0 += 2) {
      const HeadLayout layout{b0, std::min(2, B - b0), T, S, NH, hs};
      for (int64_t i = 0; i < layout.size(); ++i) {
        const int64_t j = layout.TokenMajorIndex(i);
        ASSERT_GE(j, 0);
        ASSERT_LT(j, token_size);
        ++hits[j];
      }
    }
    EXPECT_TRUE(std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }))
        << "S=" << S << ": every token-major element must be copied exactly once";
  }
  // Element (slot s, chunk element b, head h, position t, d) of batch element b0 + b.
  const HeadLayout layout{2, 2, T, 3, NH, hs};
  const int64_t s = 2, b = 1, h = 1, t = 5, d = 3;
  const int64_t i = (((s * 2 + b) * NH + h) * T + t) * hs + d;
  EXPECT_EQ(layout.TokenMajorIndex(i), ((2 + b) * T + t) * 3 * NH * hs + s * NH * hs + h * hs + d);
}

// Forward and backward of the attention as AttentionForward / AttentionBackward in ops.cu run
// them: chunks of `chunk` batch elements copied to head-major form, the six batched products
// by causal position blocks around the causal softmax, results copied back.
class GemmPlanAttentionTest
    : public ::testing::TestWithParam<std::tuple<int, int, int, int, int, int>> {};

TEST_P(GemmPlanAttentionTest, ForwardAndBackwardMatchCpu) {
  const auto [B, T, C, NH, chunk, block_count] = GetParam();
  const int hs = C / NH;
  const std::vector<PositionBlock> blocks = CausalBlocks(T, block_count);
  auto inp = RandomVector(B * T * 3 * C, 10 + T);
  auto dout = RandomVector(B * T * C, 11 + T);
  auto dinp = RandomVector(B * T * 3 * C, 12 + T);
  const size_t att_size = static_cast<size_t>(B) * NH * T * T;
  std::vector<float> out_want(B * T * C), att_want(att_size), datt_want(att_size);
  auto dinp_want = dinp;
  cpu::AttentionForward(Cpu(), out_want.data(), att_want.data(), inp.data(), B, T, C, NH);
  cpu::AttentionBackward(Cpu(), dinp_want.data(), datt_want.data(), dout.data(), inp.data(),
                         att_want.data(), B, T, C, NH);

  // Scores, their gradients and the head-major results start as NaN: an entry a product
  // should have written but did not, or one read before anything wrote it, shows.
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> out(B * T * C, 7.f), att(att_size, kNaN), datt(att_size, kNaN);
  for (int b0 = 0; b0 < B; b0 += chunk) {
    const int bc = std::min(chunk, B - b0);
    const int BH = bc * NH;
    const HeadLayout qkv_layout{b0, bc, T, 3, NH, hs}, y_layout{b0, bc, T, 1, NH, hs};
    const auto qkv = ToHeadMajor(inp, qkv_layout);
    const float* q = qkv.data();
    const float* k = q + qkv_layout.slot_size();
    const float* v = k + qkv_layout.slot_size();
    float* att_chunk = att.data() + static_cast<size_t>(b0) * NH * T * T;
    for (const PositionBlock& blk : blocks) {
      HostGemm(HeadScoresPlan(BH, T, hs, blk), k, q, att_chunk);
    }
    const int count = static_cast<int>(blocks.size());
    for (int r = 0; r < BH * T; ++r) {
      HostCausalSoftmax(&att_chunk[r * static_cast<size_t>(T)], r % T,
                        CausalRowEnd(T, count, r % T));
    }
    std::vector<float> y(y_layout.size(), kNaN);
    for (const PositionBlock& blk : blocks) {
      HostGemm(HeadValuesPlan(BH, T, hs, blk), v, att_chunk, y.data());
    }
    FromHeadMajor(y, y_layout, /*accumulate=*/false, &out);

    const auto dy = ToHeadMajor(dout, y_layout);
    float* datt_chunk = datt.data() + static_cast<size_t>(b0) * NH * T * T;
    std::vector<float> dqkv(qkv_layout.size(), kNaN);  // beta 0: old contents must not matter
    float* dq = dqkv.data();
    float* dk = dq + qkv_layout.slot_size();
    float* dv = dk + qkv_layout.slot_size();
    for (const PositionBlock& blk : blocks) {
      HostGemm(HeadGradProbsPlan(BH, T, hs, blk), v, dy.data(), datt_chunk);
      HostGemm(HeadGradValuesPlan(BH, T, hs, blk), dy.data(), att_chunk, dv);
    }
    for (int r = 0; r < BH * T; ++r) {
      HostCausalSoftmaxBackward(&datt_chunk[r * static_cast<size_t>(T)],
                                &att_chunk[r * static_cast<size_t>(T)], r % T,
                                CausalRowEnd(T, count, r % T));
    }
    for (const PositionBlock& blk : blocks) {
      HostGemm(HeadGradQueriesPlan(BH, T, hs, blk), k, datt_chunk, dq);
      HostGemm(HeadGradKeysPlan(BH, T, hs, blk), q, datt_chunk, dk);
    }
    FromHeadMajor(dqkv, qkv_layout, /*accumulate=*/true, &dinp);
  }
  // Beyond each row's block nothing was written (still NaN), and nothing read it (or out and
  // dinp would be NaN); within it, the CPU's probabilities and zeros.
  const int count = static_cast<int>(blocks.size());
  for (size_t r = 0; r < att_size / T; ++r) {
    const int end = CausalRowEnd(T, count, static_cast<int>(r % T));
    for (int j = end; j < T; ++j) {
      ASSERT_TRUE(std::isnan(att[r * T + j])) << "att row " << r << " col " << j;
      ASSERT_TRUE(std::isnan(datt[r * T + j])) << "datt row " << r << " col " << j;
      att[r * T + j] = att_want[r * T + j];
    }
  }
  ExpectAllClose("att", att, att_want, 1e-6f, 1e-4f);
  ExpectAllClose("out", out, out_want, 1e-5f, 1e-4f);
  ExpectAllClose("dinp", dinp, dinp_want, 1e-5f, 1e-4f);
}

// (B, T, C, NH, batch elements per chunk, causal blocks): one chunk, several, and a short
// last one; one position block (the full square), several, uneven ones, one per position.
INSTANTIATE_TEST_SUITE_P(Shapes, GemmPlanAttentionTest,
                         ::testing::Values(std::make_tuple(2, 8, 16, 2, 2, 1),
                                           std::make_tuple(2, 8, 16, 2, 2, 4),
                                           std::make_tuple(3, 13, 24, 3, 2, 3),
                                           std::make_tuple(3, 13, 24, 3, 1, 13),
                                           std::make_tuple(1, 33, 32, 4, 4, 4)));

TEST(CausalBlocksTest, RowEndIsTheEndOfTheRowsBlock) {
  for (const int T : {1, 7, 13, 256, 520, 1000, 1024}) {
    for (const int count : {1, 2, 3, 4, 13}) {
      if (count > T) continue;
      for (const PositionBlock& b : CausalBlocks(T, count)) {
        for (int t = b.begin; t < b.end; ++t) {
          ASSERT_EQ(CausalRowEnd(T, count, t), b.end)
              << "T " << T << " count " << count << " t " << t;
        }
      }
    }
  }
}

TEST(CausalBlocksTest, CoverThePositionsInOrder) {
  for (const int T : {1, 7, 256, 1000, 1024}) {
    for (const int count : {1, 3, 4, 2000}) {
      const auto blocks = CausalBlocks(T, count);
      ASSERT_EQ(static_cast<int>(blocks.size()), std::min(count, T));
      int next = 0;
      for (const PositionBlock& b : blocks) {
        EXPECT_EQ(b.begin, next);
        EXPECT_GT(b.size(), 0);
        EXPECT_LE(b.size(), (T + count - 1) / count);
        next = b.end;
      }
      EXPECT_EQ(next, T);
    }
  }
  EXPECT_EQ(DefaultCausalBlockCount(64), 1);
  EXPECT_EQ(DefaultCausalBlockCount(512), 2);
  EXPECT_EQ(DefaultCausalBlockCount(1024), 4);
  EXPECT_EQ(DefaultCausalBlockCount(8192), 4);
}

}  // namespace
}  // namespace spotrain::kernels::cuda
