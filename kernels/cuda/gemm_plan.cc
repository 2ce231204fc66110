#include "kernels/cuda/gemm_plan.h"

#include <algorithm>
#include <cmath>

namespace spotrain::kernels::cuda {
namespace {

GemmPlan Make(bool trans_a, bool trans_b, int m, int n, int k, float alpha, float beta) {
  GemmPlan p;
  p.trans_a = trans_a;
  p.trans_b = trans_b;
  p.m = m;
  p.n = n;
  p.k = k;
  p.alpha = alpha;
  p.beta = beta;
  return p;
}

float Scale(int hs) { return 1.0f / std::sqrt(static_cast<float>(hs)); }

}  // namespace

GemmPlan MatmulForwardPlan(int N, int C, int OC) {
  // out^T[OC,N] = weight[OC,C] (stored as weight^T, so transposed) * inp^T[C,N].
  GemmPlan p = Make(true, false, OC, N, C, 1.0f, 0.0f);
  p.lda = C;
  p.ldb = C;
  p.ldc = OC;
  return p;
}

GemmPlan MatmulBackwardInputPlan(int N, int C, int OC) {
  // dinp^T[C,N] += weight^T[C,OC] * dout^T[OC,N].
  GemmPlan p = Make(false, false, C, N, OC, 1.0f, 1.0f);
  p.lda = C;
  p.ldb = OC;
  p.ldc = C;
  return p;
}

GemmPlan MatmulBackwardWeightPlan(int N, int C, int OC) {
  // dweight^T[C,OC] += inp^T[C,N] * dout[N,OC] (dout stored as dout^T, so transposed).
  GemmPlan p = Make(false, true, C, OC, N, 1.0f, 1.0f);
  p.lda = C;
  p.ldb = OC;
  p.ldc = C;
  return p;
}

std::vector<PositionBlock> CausalBlocks(int T, int count) {
  count = std::max(1, std::min(count, T));
  std::vector<PositionBlock> blocks;
  for (int i = 0; i < count; ++i) {
    blocks.push_back({static_cast<int>(static_cast<int64_t>(T) * i / count),
                      static_cast<int>(static_cast<int64_t>(T) * (i + 1) / count)});
  }
  return blocks;
}

int DefaultCausalBlockCount(int T) { return std::max(1, std::min(4, T / 256)); }

// The head-major plans: every operand is a contiguous row-major matrix per (batch element,
// head), either [T, hs] (to cuBLAS: column-major [hs, T], ld hs) or [T, T] (ld T), entered at
// some row (and column) of it.
namespace {
struct HeadOperand {
  int ld;
  int64_t stride;
  int64_t offset;
};
// Row `row` of a [T, hs] matrix.
HeadOperand Th(int T, int hs, int row) {
  return {hs, static_cast<int64_t>(T) * hs, static_cast<int64_t>(row) * hs};
}
// Element (row, col) of a [T, T] matrix.
HeadOperand Tt(int T, int row, int col) {
  return {T, static_cast<int64_t>(T) * T, static_cast<int64_t>(row) * T + col};
}

GemmPlan HeadPlan(bool trans_a, bool trans_b, int m, int n, int k, float alpha, int BH,
                  HeadOperand a, HeadOperand b, HeadOperand c) {
  GemmPlan p = Make(trans_a, trans_b, m, n, k, alpha, 0.0f);
  p.lda = a.ld;
  p.stride_a = a.stride;
  p.a_offset = a.offset;
  p.ldb = b.ld;
  p.stride_b = b.stride;
  p.b_offset = b.offset;
  p.ldc = c.ld;
  p.stride_c = c.stride;
  p.c_offset = c.offset;
  p.batch = BH;
  return p;
}
}  // namespace

GemmPlan HeadScoresPlan(int BH, int T, int hs, PositionBlock q) {
  // att^T[:q.end, q] = k[:q.end] (stored as k^T: transposed) * q^T[:, q].
  return HeadPlan(true, false, q.end, q.size(), hs, Scale(hs), BH, Th(T, hs, 0), Th(T, hs, q.begin),
                  Tt(T, q.begin, 0));
}

GemmPlan HeadValuesPlan(int BH, int T, int hs, PositionBlock q) {
  // y^T[:, q] = v^T[:, :q.end] * att^T[:q.end, q].
  return HeadPlan(false, false, hs, q.size(), q.end, 1.0f, BH, Th(T, hs, 0), Tt(T, q.begin, 0),
                  Th(T, hs, q.begin));
}

GemmPlan HeadGradProbsPlan(int BH, int T, int hs, PositionBlock q) {
  // datt^T[:q.end, q] = v[:q.end] (stored as v^T: transposed) * dy^T[:, q].
  return HeadPlan(true, false, q.end, q.size(), hs, 1.0f, BH, Th(T, hs, 0), Th(T, hs, q.begin),
                  Tt(T, q.begin, 0));
}

GemmPlan HeadGradValuesPlan(int BH, int T, int hs, PositionBlock k) {
  // dv^T[:, k] = dy^T[:, k.begin:] * att[k.begin:, k] (stored as att^T: transposed).
  return HeadPlan(false, true, hs, k.size(), T - k.begin, 1.0f, BH, Th(T, hs, k.begin),
                  Tt(T, k.begin, k.begin), Th(T, hs, k.begin));
}

GemmPlan HeadGradQueriesPlan(int BH, int T, int hs, PositionBlock q) {
  // dq^T[:, q] = scale * k^T[:, :q.end] * dscores^T[:q.end, q].
  return HeadPlan(false, false, hs, q.size(), q.end, Scale(hs), BH, Th(T, hs, 0), Tt(T, q.begin, 0),
                  Th(T, hs, q.begin));
}

GemmPlan HeadGradKeysPlan(int BH, int T, int hs, PositionBlock k) {
  // dk^T[:, k] = scale * q^T[:, k.begin:] * dscores[k.begin:, k] (stored transposed).
  return HeadPlan(false, true, hs, k.size(), T - k.begin, Scale(hs), BH, Th(T, hs, k.begin),
                  Tt(T, k.begin, k.begin), Th(T, hs, k.begin));
}

}  // namespace spotrain::kernels::cuda
