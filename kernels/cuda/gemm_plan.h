// How each matrix product of the decoder maps onto one column-major cuBLAS strided-batched
// GEMM: operations, sizes, leading dimensions, batch strides and operand offsets. Pure
// arithmetic with no CUDA dependency, so that the mapping (the easiest part of the GPU
// kernels to get wrong) is checked on any machine: tests/unit/kernels/gemm_plan_test.cc evaluates
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
#include <vector>

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

// Attention runs on head-major copies of its operands, so that one strided-batched product
// covers every (batch element, head) pair at once. The token-major tensors of the model are
// [B, T, S, NH, hs] (S slots of C = NH * hs channels per token: S = 3 for the fused q|k|v,
// 1 for the attention output); the head-major copy of batch elements [b0, b0 + Bc) is
// [S][Bc, NH, T, hs], each (slot, batch element, head) a contiguous row-major [T, hs]
// matrix. This struct is the index map between the two, used by the copy kernels on the
// device and by the host test.
#if defined(__CUDACC__)
#define SPOTRAIN_HOST_DEVICE __host__ __device__
#else
#define SPOTRAIN_HOST_DEVICE
#endif
struct HeadLayout {
  int b0 = 0;  // first batch element of the copy
  int Bc = 0;  // batch elements in the copy
  int T = 0, S = 0, NH = 0, hs = 0;

  // Elements of the head-major copy; each slot holds slot_size() of them.
  SPOTRAIN_HOST_DEVICE int64_t slot_size() const { return static_cast<int64_t>(Bc) * NH * T * hs; }
  SPOTRAIN_HOST_DEVICE int64_t size() const { return slot_size() * S; }
  // Token-major offset (from the tensor's start, batch element 0) of head-major element i.
  SPOTRAIN_HOST_DEVICE int64_t TokenMajorIndex(int64_t i) const {
    const int64_t d = i % hs;
    i /= hs;
    const int64_t t = i % T;
    i /= T;
    const int64_t h = i % NH;
    i /= NH;
    const int64_t b = i % Bc;
    const int64_t s = i / Bc;
    const int64_t C = static_cast<int64_t>(NH) * hs;
    return ((b0 + b) * T + t) * S * C + s * C + h * hs + d;
  }
};

// Causal attention needs the scores of key j <= query t only, so the products run over
// blocks of positions and skip the tiles wholly above the diagonal: queries [begin, end) need
// keys [0, end); keys [begin, end) get gradient from queries [begin, T) only. With K equal
// blocks that is (K + 1) / 2K of the full square (K = 4: 62.5%). Entries above the diagonal
// inside the computed tiles are computed and then zeroed by the softmax kernels; entries
// beyond the row's block (columns >= CausalRowEnd) are never written by the products nor by
// the softmax kernels (which may only round a partly needed 16-byte pack out with zeros),
// and no product reads them (the packed softmax kernels load the pack holding the diagonal
// and ignore its elements past it).
struct PositionBlock {
  int begin = 0;
  int end = 0;
  int size() const { return end - begin; }
};
// `count` blocks of [0, T) (clamped to [1, T]), sizes differing by at most one, in order.
std::vector<PositionBlock> CausalBlocks(int T, int count);
// The block count the kernels use for sequence length T: blocks of at least 256 positions
// (smaller products lose more to launch and tile overheads than the skipped work saves), at
// most 4.
int DefaultCausalBlockCount(int T);
// The end of the block of CausalBlocks(T, count) that holds position t (count in [1, T]):
// row t of att and datt is used in columns [0, CausalRowEnd) only.
SPOTRAIN_HOST_DEVICE inline int CausalRowEnd(int T, int count, int t) {
  for (int i = 1; i < count; ++i) {
    const int end = static_cast<int>(static_cast<int64_t>(T) * i / count);
    if (t < end) return end;
  }
  return T;
}
#undef SPOTRAIN_HOST_DEVICE

// The attention products over BH = Bc * NH head-major [T, hs] matrices (q, k, v, the output
// y and their gradients, each from its own base pointer) and att / datt [BH, T, T] (row t =
// query position, column j = key position), for one position block. scale = 1/sqrt(hs).
// Gradients are overwritten (beta 0): they land in head-major scratch and are added to the
// token-major gradient by the copy back.
// att[q, :q.end] = scale * q[q] k[:q.end]^T (query block q): A = k, B = q, C = att.
GemmPlan HeadScoresPlan(int BH, int T, int hs, PositionBlock q);
// y[q] = att[q, :q.end] v[:q.end]: A = v, B = att, C = y.
GemmPlan HeadValuesPlan(int BH, int T, int hs, PositionBlock q);
// datt[q, :q.end] = dy[q] v[:q.end]^T: A = v, B = dy, C = datt.
GemmPlan HeadGradProbsPlan(int BH, int T, int hs, PositionBlock q);
// dv[k] = att[k.begin:, k]^T dy[k.begin:] (key block k): A = dy, B = att, C = dv.
GemmPlan HeadGradValuesPlan(int BH, int T, int hs, PositionBlock k);
// dq[q] = scale * dscores[q, :q.end] k[:q.end]: A = k, B = dscores (in datt), C = dq.
GemmPlan HeadGradQueriesPlan(int BH, int T, int hs, PositionBlock q);
// dk[k] = scale * dscores[k.begin:, k]^T q[k.begin:]: A = q, B = dscores, C = dk.
GemmPlan HeadGradKeysPlan(int BH, int T, int hs, PositionBlock k);

}  // namespace spotrain::kernels::cuda

#endif  // SPOTRAIN_KERNELS_CUDA_GEMM_PLAN_H_
