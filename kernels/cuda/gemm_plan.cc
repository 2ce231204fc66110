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

// The head-major plans: every operand is a contiguous row-major matrix per (batch element,
// head), either [T, hs] (to cuBLAS: column-major [hs, T], ld hs) or [T, T] (ld T).
namespace {
struct HeadOperand {
  int ld;
  int64_t stride;
};
HeadOperand Th(int T, int hs) { return {hs, static_cast<int64_t>(T) * hs}; }
HeadOperand Tt(int T) { return {T, static_cast<int64_t>(T) * T}; }

GemmPlan HeadPlan(bool trans_a, bool trans_b, int m, int n, int k, float alpha, int BH,
                  HeadOperand a, HeadOperand b, HeadOperand c) {
  GemmPlan p = Make(trans_a, trans_b, m, n, k, alpha, 0.0f);
  p.lda = a.ld;
  p.stride_a = a.stride;
  p.ldb = b.ld;
  p.stride_b = b.stride;
  p.ldc = c.ld;
  p.stride_c = c.stride;
  p.batch = BH;
  return p;
}
}  // namespace

GemmPlan HeadScoresPlan(int BH, int T, int hs) {
  // att^T[T,T] = k[T,hs] (stored as k^T: transposed) * q^T[hs,T].
  return HeadPlan(true, false, T, T, hs, Scale(hs), BH, Th(T, hs), Th(T, hs), Tt(T));
}

GemmPlan HeadValuesPlan(int BH, int T, int hs) {
  // y^T[hs,T] = v^T[hs,T] * att^T[T,T].
  return HeadPlan(false, false, hs, T, T, 1.0f, BH, Th(T, hs), Tt(T), Th(T, hs));
}

GemmPlan HeadGradProbsPlan(int BH, int T, int hs) {
  // datt^T[T,T] = v[T,hs] (stored as v^T: transposed) * dy^T[hs,T].
  return HeadPlan(true, false, T, T, hs, 1.0f, BH, Th(T, hs), Th(T, hs), Tt(T));
}

GemmPlan HeadGradValuesPlan(int BH, int T, int hs) {
  // dv^T[hs,T] = dy^T[hs,T] * att[T,T] (stored as att^T: transposed).
  return HeadPlan(false, true, hs, T, T, 1.0f, BH, Th(T, hs), Tt(T), Th(T, hs));
}

GemmPlan HeadGradQueriesPlan(int BH, int T, int hs) {
  // dq^T[hs,T] = scale * k^T[hs,T] * dscores^T[T,T].
  return HeadPlan(false, false, hs, T, T, Scale(hs), BH, Th(T, hs), Tt(T), Th(T, hs));
}

GemmPlan HeadGradKeysPlan(int BH, int T, int hs) {
  // dk^T[hs,T] = scale * q^T[hs,T] * dscores[T,T] (stored transposed).
  return HeadPlan(false, true, hs, T, T, Scale(hs), BH, Th(T, hs), Tt(T), Th(T, hs));
}

}  // namespace spotrain::kernels::cuda
