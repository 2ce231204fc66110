// CUDA kernels of the GPT-2 style decoder, forward and backward, and the AdamW update: the
// same operations, shapes and conventions as the CPU reference kernels/cpu/ops.h, which
// they are tested against (tests/gpu/). Read that header first; in short: B batch, T
// sequence length, C channels, NH heads, V vocab, Vp padded vocab, N = B*T rows, row-major
// activations [N, C], linear weights [OC, C] with out = inp * weight^T + bias. Backward
// kernels ACCUMULATE (+=) into parameter gradients and into activation gradients exactly
// where the CPU ones do (the caller zeroes gradient buffers); CrossEntropyBackward's dlogits
// and the attention scratch `datt` are overwritten. The cross-entropy pair differs from the
// CPU's SoftmaxCrossEntropy pair in what the forward keeps (see CrossEntropyForward).
//
// All pointers are device pointers. Every function enqueues work on ctx.stream() and
// returns without waiting, except SumOfSquares and Sum, which return a host value and so
// synchronise the stream. Errors come back as absl::Status (bad shapes: kInvalidArgument;
// scratch too small: kResourceExhausted; CUDA or cuBLAS failures: see cuda_status.h);
// errors of kernels that fail while running surface at the next synchronising call.
//
// Precision. Activations are `Act` = float or bf16 (__nv_bfloat16); every kernel computes in
// fp32 and rounds once when it stores a bf16 value. Parameters read by non-matrix kernels
// (embeddings, LayerNorm weights, biases) and all parameter gradients are fp32 (the flat fp32
// buffers of DESIGN.md section 7); matrix products take both inputs in the activation type
// (the bf16 model casts its fp32 master weights once per step) and accumulate in fp32 in
// cuBLAS (CUBLAS_COMPUTE_32F; TF32 only for fp32 inputs when ctx.use_tf32()).
//
// Determinism. No kernel here uses atomics: column reductions (bias and LayerNorm weight
// gradients, position embedding gradients) and the token embedding gradient (a stable sort
// by token id, then one ordered sum per token) run in a fixed order that depends only on the
// shapes, so a computation repeated on the same GPU model gives identical bits. cuBLAS is
// deterministic for a fixed GPU model, library version and workspace, with atomics
// disallowed in deterministic mode (kernels/cuda/context.h).
//
// Thread-safety: as CudaContext: one thread per context; the kernels of one context share
// its scratch memory in stream order.
#ifndef SPOTRAIN_KERNELS_CUDA_OPS_CUH_
#define SPOTRAIN_KERNELS_CUDA_OPS_CUH_

#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cuda/context.h"

namespace spotrain::kernels::cuda {

using bf16 = __nv_bfloat16;

// How a backward kernel writes an activation gradient: added to what the buffer holds (the
// CPU reference's contract, the default), or written over it (GPU only: the old contents are
// never read, so the caller need not zero the buffer first: two passes over it less).
enum class GradWrite { kAccumulate, kOverwrite };

// out[b,t,:] = wte[inp[b,t],:] + wpe[t,:]. inp values must lie in [0, rows of wte).
template <typename Act>
absl::Status EncoderForward(CudaContext& ctx, Act* out, const int32_t* inp, const float* wte,
                            const float* wpe, int B, int T, int C);
// dwte[inp[b,t],:] += dout[b,t,:] (summed in (b,t) order per token); dwpe[t,:] += sum over b.
// `Vp` (rows of dwte) bounds the token ids and sizes the sort.
template <typename Act>
absl::Status EncoderBackward(CudaContext& ctx, float* dwte, float* dwpe, const Act* dout,
                             const int32_t* inp, int B, int T, int C, int Vp);

// Row-wise LayerNorm over C with eps 1e-5; saves mean and 1/std per row (fp32) for backward.
template <typename Act>
absl::Status LayerNormForward(CudaContext& ctx, Act* out, float* mean, float* rstd, const Act* inp,
                              const float* weight, const float* bias, int N, int C);
// dinp += ...; dweight += ...; dbias += ...
template <typename Act>
absl::Status LayerNormBackward(CudaContext& ctx, Act* dinp, float* dweight, float* dbias,
                               const Act* dout, const Act* inp, const float* weight,
                               const float* mean, const float* rstd, int N, int C);

// out[N,OC] = inp[N,C] * weight[OC,C]^T + bias[OC] (bias may be null). Instantiated for
// <float, float>, <bf16, bf16> and <bf16, float> (bf16 products with an fp32 result).
template <typename In, typename Out>
absl::Status MatmulForward(CudaContext& ctx, Out* out, const In* inp, const In* weight,
                           const float* bias, int N, int C, int OC);
// dinp[N,C] += dout*weight (kOverwrite: dinp = ..., its old contents never read);
// dweight[OC,C] += dout^T*inp; dbias[OC] += sum of dout rows. dinp and dbias may be null.
template <typename Act>
absl::Status MatmulBackward(CudaContext& ctx, Act* dinp, float* dweight, float* dbias,
                            const Act* dout, const Act* inp, const Act* weight, int N, int C,
                            int OC, GradWrite dinp_write = GradWrite::kAccumulate);

// Causal multi-head self-attention; inp is the fused qkv [B,T,3C], out [B,T,C], att
// [B,NH,T,T] the softmax probabilities, saved for backward: row t holds them in columns
// [0, t], zeros up to the end of t's causal position block (CausalRowEnd in gemm_plan.h;
// rounded up to a 16-byte pack), and the columns beyond are left as they were (no product
// reads them). With
// inp_bias ([3C], fp32), inp is the qkv product without its bias and the attention adds it as
// it copies q, k, v (the same bits as adding it to inp first, without a pass over inp).
template <typename Act>
absl::Status AttentionForward(CudaContext& ctx, Act* out, Act* att, const Act* inp, int B, int T,
                              int C, int NH, const float* inp_bias = nullptr);
// dinp[B,T,3C] += ... (kOverwrite: dinp = ..., its old contents never read); datt
// [B,NH,T,T] is scratch the kernel overwrites. inp and inp_bias as in AttentionForward.
template <typename Act>
absl::Status AttentionBackward(CudaContext& ctx, Act* dinp, Act* datt, const Act* dout,
                               const Act* inp, const Act* att, int B, int T, int C, int NH,
                               GradWrite dinp_write = GradWrite::kAccumulate,
                               const float* inp_bias = nullptr);
// The products of AttentionBackward land in head-major scratch in the activation type and are
// then added to (or written over) dinp, so with bf16 accumulating into a non-zero dinp sees
// two roundings. Both attention calls work on head-major copies of q, k, v and the output in the
// context's scratch memory, batch elements in chunks as many as it holds (at least one: less
// scratch than that is kResourceExhausted). With this many scratch bytes the whole batch B is one
// chunk: every product is one strided-batched call over all B x NH heads (the fastest).
template <typename Act>
size_t AttentionScratchBytes(int B, int T, int C);

// GELU, tanh approximation.
template <typename Act>
absl::Status GeluForward(CudaContext& ctx, Act* out, const Act* inp, int64_t n);
// dinp += gelu'(inp) * dout (kOverwrite: dinp = ..., its old contents never read).
template <typename Act>
absl::Status GeluBackward(CudaContext& ctx, Act* dinp, const Act* inp, const Act* dout, int64_t n,
                          GradWrite write = GradWrite::kAccumulate);

// out = a + b.
template <typename Act>
absl::Status ResidualForward(CudaContext& ctx, Act* out, const Act* a, const Act* b, int64_t n);
// da += dout; db += dout.
template <typename Act>
absl::Status ResidualBackward(CudaContext& ctx, Act* da, Act* db, const Act* dout, int64_t n);

// A linear layer's bias added where its output is consumed (GPU only: it saves the pass over
// the output that MatmulForward's bias addition makes). Same bits as MatmulForward with the
// bias followed by ResidualForward / GeluForward: the biased value is rounded to Act first.
// out[N,C] = a + (b + bias), b being the product without its bias (b is not changed).
template <typename Act>
absl::Status BiasResidualForward(CudaContext& ctx, Act* out, const Act* a, const Act* b,
                                 const float* bias, int N, int C);
// pre[N,C] += bias (pre is what GeluBackward reads), then out = gelu(pre).
template <typename Act>
absl::Status BiasGeluForward(CudaContext& ctx, Act* out, Act* pre, const float* bias, int N, int C);

// Softmax cross-entropy over the first V of Vp logits per row (fp32, or bf16 in a bf16 model:
// half the bytes of the largest activation; every value is computed in fp32). Unlike the CPU
// reference's pair (which writes the probabilities [N, Vp] and reads them back: 3.3 GB each
// way at GPT-2 124M and 16 x 1024 tokens), the forward reads the logits once and keeps two
// floats per row, stats[2n] = max logit and stats[2n + 1] = 1 / sum exp(logit - max); the
// backward recomputes the probabilities from the logits. Same arithmetic per element as the
// CPU's (exp(x - max) * (1 / sum)); the sum is taken online, in another order.
// losses [N], stats [N, 2]. Targets must lie in [0, V).
template <typename Logit>
absl::Status CrossEntropyForward(CudaContext& ctx, float* losses, float* stats, const Logit* logits,
                                 const int32_t* targets, int N, int V, int Vp);
// dlogits[N,Vp] = (softmax(logits) - onehot(target)) * dloss_scale (overwritten, padded
// columns 0), from the forward's stats. dlogits may be the logits' own memory when both have
// one type (each element is read before it is written, by the same thread); any other overlap
// is refused. Instantiated for <float, float>, <bf16, bf16> and <float, bf16>.
template <typename Logit, typename Act>
absl::Status CrossEntropyBackward(CudaContext& ctx, Act* dlogits, const Logit* logits,
                                  const float* stats, const int32_t* targets, float dloss_scale,
                                  int N, int V, int Vp);
// Both in one pass over each row (the fused classifier of a training step): the forward's
// losses and stats, then the backward's dlogits from the row while it is still in cache, the
// same bits as the two calls above; one read of the logits less. Same aliasing rule.
template <typename Logit, typename Act>
absl::Status CrossEntropyForwardBackward(CudaContext& ctx, float* losses, float* stats,
                                         Act* dlogits, const Logit* logits, const int32_t* targets,
                                         float dloss_scale, int N, int V, int Vp);

// Sum of squares of x in double, in a fixed order that does not depend on the GPU (a fixed
// grid of partial sums, then one ordered final sum: no atomics). Synchronises the stream.
absl::StatusOr<double> SumOfSquares(CudaContext& ctx, const float* x, int64_t n);
// Plain sum of x, same order and guarantees (used for the mean loss).
absl::StatusOr<double> Sum(CudaContext& ctx, const float* x, int64_t n);

struct AdamWParams {
  float lr;
  float beta1;
  float beta2;
  float eps;
  float weight_decay;  // applied only where decay_mask is non-zero (or everywhere if null)
  float grad_scale;    // grads are multiplied by this first (gradient clipping)
  int64_t t;           // 1-based step count for bias correction
};
// One AdamW step (decoupled weight decay) over n parameters, in place; the same arithmetic,
// in the same order, as kernels/cpu AdamWUpdate. decay_mask is a device array or null.
absl::Status AdamWUpdate(CudaContext& ctx, float* params, const float* grads, float* m, float* v,
                         const uint8_t* decay_mask, int64_t n, const AdamWParams& p);

// dst[i] = src[i] rounded to bf16 (round to nearest even): the bf16 working copy of fp32
// master weights.
absl::Status CastToBf16(CudaContext& ctx, bf16* dst, const float* src, int64_t n);
// dst[i] = float(src[i]).
absl::Status CastToFloat(CudaContext& ctx, float* dst, const bf16* src, int64_t n);

}  // namespace spotrain::kernels::cuda

#endif  // SPOTRAIN_KERNELS_CUDA_OPS_CUH_
