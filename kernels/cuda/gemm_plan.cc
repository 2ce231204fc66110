#include "kernels/cuda/gemm_plan.h"

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

float Scale(int C, int NH) { return 1.0f / std::sqrt(static_cast<float>(C / NH)); }

// Offsets of batch element b's q, k, v, of its out rows and of its att block.
int64_t QkvOffset(int b, int T, int C) { return static_cast<int64_t>(b) * T * 3 * C; }
int64_t OutOffset(int b, int T, int C) { return static_cast<int64_t>(b) * T * C; }
int64_t AttOffset(int b, int T, int NH) { return static_cast<int64_t>(b) * NH * T * T; }

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

GemmPlan AttentionScoresPlan(int b, int T, int C, int NH) {
  const int hs = C / NH;
  // Per head: scores^T[T,T] = k[T,hs] (stored as k^T: transposed) * q^T[hs,T].
  GemmPlan p = Make(true, false, T, T, hs, Scale(C, NH), 0.0f);
  p.a_offset = QkvOffset(b, T, C) + C;
  p.lda = 3 * C;
  p.stride_a = hs;
  p.b_offset = QkvOffset(b, T, C);
  p.ldb = 3 * C;
  p.stride_b = hs;
  p.c_offset = AttOffset(b, T, NH);
  p.ldc = T;
  p.stride_c = static_cast<int64_t>(T) * T;
  p.batch = NH;
  return p;
}

GemmPlan AttentionValuesPlan(int b, int T, int C, int NH) {
  const int hs = C / NH;
  // Per head: out^T[hs,T] = v^T[hs,T] * att^T[T,T].
  GemmPlan p = Make(false, false, hs, T, T, 1.0f, 0.0f);
  p.a_offset = QkvOffset(b, T, C) + 2 * C;
  p.lda = 3 * C;
  p.stride_a = hs;
  p.b_offset = AttOffset(b, T, NH);
  p.ldb = T;
  p.stride_b = static_cast<int64_t>(T) * T;
  p.c_offset = OutOffset(b, T, C);
  p.ldc = C;
  p.stride_c = hs;
  p.batch = NH;
  return p;
}

GemmPlan AttentionGradProbsPlan(int b, int T, int C, int NH) {
  const int hs = C / NH;
  // Per head: datt^T[T,T] = v[T,hs] (stored as v^T: transposed) * dout^T[hs,T].
  GemmPlan p = Make(true, false, T, T, hs, 1.0f, 0.0f);
  p.a_offset = QkvOffset(b, T, C) + 2 * C;
  p.lda = 3 * C;
  p.stride_a = hs;
  p.b_offset = OutOffset(b, T, C);
  p.ldb = C;
  p.stride_b = hs;
  p.c_offset = AttOffset(b, T, NH);
  p.ldc = T;
  p.stride_c = static_cast<int64_t>(T) * T;
  p.batch = NH;
  return p;
}

GemmPlan AttentionGradValuesPlan(int b, int T, int C, int NH) {
  const int hs = C / NH;
  // Per head: dv^T[hs,T] += dout^T[hs,T] * att[T,T] (stored as att^T: transposed).
  GemmPlan p = Make(false, true, hs, T, T, 1.0f, 1.0f);
  p.a_offset = OutOffset(b, T, C);
  p.lda = C;
  p.stride_a = hs;
  p.b_offset = AttOffset(b, T, NH);
  p.ldb = T;
  p.stride_b = static_cast<int64_t>(T) * T;
  p.c_offset = QkvOffset(b, T, C) + 2 * C;
  p.ldc = 3 * C;
  p.stride_c = hs;
  p.batch = NH;
  return p;
}

GemmPlan AttentionGradQueriesPlan(int b, int T, int C, int NH) {
  const int hs = C / NH;
  // Per head: dq^T[hs,T] += scale * k^T[hs,T] * dscores^T[T,T].
  GemmPlan p = Make(false, false, hs, T, T, Scale(C, NH), 1.0f);
  p.a_offset = QkvOffset(b, T, C) + C;
  p.lda = 3 * C;
  p.stride_a = hs;
  p.b_offset = AttOffset(b, T, NH);
  p.ldb = T;
  p.stride_b = static_cast<int64_t>(T) * T;
  p.c_offset = QkvOffset(b, T, C);
  p.ldc = 3 * C;
  p.stride_c = hs;
  p.batch = NH;
  return p;
}

GemmPlan AttentionGradKeysPlan(int b, int T, int C, int NH) {
  const int hs = C / NH;
  // Per head: dk^T[hs,T] += scale * q^T[hs,T] * dscores[T,T] (stored transposed).
  GemmPlan p = Make(false, true, hs, T, T, Scale(C, NH), 1.0f);
  p.a_offset = QkvOffset(b, T, C);
  p.lda = 3 * C;
  p.stride_a = hs;
  p.b_offset = AttOffset(b, T, NH);
  p.ldb = T;
  p.stride_b = static_cast<int64_t>(T) * T;
  p.c_offset = QkvOffset(b, T, C) + C;
  p.ldc = 3 * C;
  p.stride_c = hs;
  p.batch = NH;
  return p;
}

}  // namespace spotrain::kernels::cuda
