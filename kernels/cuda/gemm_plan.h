// How each matrix product of the decoder maps onto one column-major cuBLAS strided-batched
// GEMM: operations, sizes, leading dimensions, batch strides and operand offsets. Pure
// arithmetic with no CUDA dependency, so that the mapping (the easiest part of the GPU
// kernels to get wrong) is checked on any machine: tests/gpu/gemm_plan_test.cc evaluates
// these plans with a host GEMM and compares against the CPU reference kernels.
//
// cuBLAS is column-major; a row-major matrix M[r][c] with row stride ld is, to cuBLAS, the
// column-major matrix M^T with leading dimension ld. So row-major Y = X W^T is computed as
// column-major Y^T = W X^T, and so on (each plan says which).
//
// Thread-safety: pure functions.
#ifndef SPOTRAIN_KERNELS_CUDA_GEMM_PLAN_H_
#define SPOTRAIN_KERNELS_CUDA_GEMM_PLAN_H_

#include <cstdint>

namespace spotrain::kernels::cuda {

// C[i] = alpha * op(A[i]) * op(B[i]) + beta * C[i] for i in [0, batch), column-major, with
// op(X) = X^T when trans_x. X[i] starts at x_offset + i * stride_x elements from the
// operand's base pointer.
struct GemmPlan {
  bool trans_a = false;
  bool trans_b = false;
  int m = 0, n = 0, k = 0;
  float alpha = 1.0f, beta = 0.0f;
  int64_t a_offset = 0, stride_a = 0;
  int lda = 0;
  int64_t b_offset = 0, stride_b = 0;
  int ldb = 0;
  int64_t c_offset = 0, stride_c = 0;
  int ldc = 0;
  int batch = 1;
};

// Linear layer, row-major out[N,OC] = inp[N,C] weight[OC,C]^T: A = weight, B = inp, C = out.
GemmPlan MatmulForwardPlan(int N, int C, int OC);
// dinp[N,C] += dout[N,OC] weight[OC,C]: A = weight, B = dout, C = dinp.
GemmPlan MatmulBackwardInputPlan(int N, int C, int OC);
// dweight[OC,C] += dout^T inp: A = inp, B = dout, C = dweight.
GemmPlan MatmulBackwardWeightPlan(int N, int C, int OC);

// Attention for batch element b, batched over the NH heads. inp/dinp are [B,T,3C] (q|k|v),
// out/dout [B,T,C], att/datt [B,NH,T,T], scale = 1/sqrt(C/NH).
// att[b,h] = scale * q k^T: A = inp (k), B = inp (q), C = att.
GemmPlan AttentionScoresPlan(int b, int T, int C, int NH);
// out[b,:,h] = att v: A = inp (v), B = att, C = out.
GemmPlan AttentionValuesPlan(int b, int T, int C, int NH);
// datt = dout v^T: A = inp (v), B = dout, C = datt (overwritten).
GemmPlan AttentionGradProbsPlan(int b, int T, int C, int NH);
// dv += att^T dout: A = dout, B = att, C = dinp (v part).
GemmPlan AttentionGradValuesPlan(int b, int T, int C, int NH);
// dq += scale * dscores k: A = inp (k), B = datt (holding dscores), C = dinp (q part).
GemmPlan AttentionGradQueriesPlan(int b, int T, int C, int NH);
// dk += scale * dscores^T q: A = inp (q), B = datt, C = dinp (k part).
GemmPlan AttentionGradKeysPlan(int b, int T, int C, int NH);

}  // namespace spotrain::kernels::cuda

#endif  // SPOTRAIN_KERNELS_CUDA_GEMM_PLAN_H_
