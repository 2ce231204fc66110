// CPU reference kernels of the GPT-2 style decoder, forward and backward, and the AdamW
// update. These are the reference every other backend (kernels/cuda) is tested against.
//
// Conventions (as in llm.c): B batch, T sequence length, C channels, NH heads, V vocab
// (padded), N = B*T rows. Activations are row-major [N, C]. A linear layer's weight is
// [OC, C] (out-features first) and computes out = inp * weight^T + bias.
// Backward kernels ACCUMULATE (+=) into parameter gradients (dweight, dbias, dwte, dwpe) and
// into activation gradients that have several consumers (the residual stream); the caller
// zeroes gradient buffers before a micro-batch. Kernels never allocate on the heap.
//
// Threading: every kernel takes a CpuContext; work is split over ctx.threads OpenMP threads
// by output element, each output computed by exactly one thread in a fixed order, so the
// result is bit-identical whatever the thread count. The exception is the linear layers'
// matrix products (MatmulForward/Backward), which go to OpenBLAS with ctx.threads threads:
// with more than one thread OpenBLAS changes the last bits (measured with 0.3.21), so a
// run is reproducible bit for bit only at a fixed thread count. Kernels are reentrant;
// distinct calls may run concurrently on distinct buffers (OpenBLAS's thread count is
// process-wide, so concurrent calls with different ctx.threads only affect each other's
// speed). With ctx.threads > 1 two thread pools (OpenMP's and OpenBLAS's) alternate and
// both spin while idle: run with OMP_WAIT_POLICY=passive, or one thread per process.
//
// Instruction sets: the non-BLAS kernels have a baseline path (the build's target ISA) and
// an AVX2+FMA path chosen at run time on CPUs that have it (see SetCpuIsa). Each path is
// bit-identical across thread counts; the two paths differ from each other in the last
// bits, as OpenBLAS's own kernels differ between CPU models.
#ifndef SPOTRAIN_KERNELS_CPU_OPS_H_
#define SPOTRAIN_KERNELS_CPU_OPS_H_

#include <cstdint>

namespace spotrain::kernels::cpu {

struct CpuContext {
  int threads = 1;
  // OpenBLAS threads for matrix products; 0: the same as `threads`. OpenBLAS rounds
  // differently with several threads, so deterministic runs pin it to 1.
  int blas_threads = 0;
};

// Which code path the non-BLAS kernels use. kAuto (the default) picks AVX2+FMA when the CPU
// has both, else the baseline.
enum class CpuIsa { kAuto, kBaseline, kAvx2 };
// Selects the path for subsequent kernel calls, process-wide (tests and benchmarks; never
// while kernels run). Returns false, changing nothing, if the CPU lacks the instructions.
bool SetCpuIsa(CpuIsa isa);
// "avx2" or "baseline": the path kernels use now.
const char* ActiveCpuIsa();

// out[b,t,:] = wte[inp[b,t],:] + wpe[t,:].
void EncoderForward(const CpuContext& ctx, float* out, const int32_t* inp, const float* wte,
                    const float* wpe, int B, int T, int C);
void EncoderBackward(const CpuContext& ctx, float* dwte, float* dwpe, const float* dout,
                     const int32_t* inp, int B, int T, int C);

// Row-wise LayerNorm over C with eps 1e-5; saves mean and 1/std per row for backward.
void LayerNormForward(const CpuContext& ctx, float* out, float* mean, float* rstd, const float* inp,
                      const float* weight, const float* bias, int N, int C);
// dinp += ...; dweight += ...; dbias += ...
void LayerNormBackward(const CpuContext& ctx, float* dinp, float* dweight, float* dbias,
                       const float* dout, const float* inp, const float* weight, const float* mean,
                       const float* rstd, int N, int C);

// out[N,OC] = inp[N,C] * weight[OC,C]^T + bias[OC] (bias may be null).
void MatmulForward(const CpuContext& ctx, float* out, const float* inp, const float* weight,
                   const float* bias, int N, int C, int OC);
// dinp[N,C] += dout*weight; dweight[OC,C] += dout^T*inp; dbias[OC] += sum of dout rows
// (dbias may be null).
void MatmulBackward(const CpuContext& ctx, float* dinp, float* dweight, float* dbias,
                    const float* dout, const float* inp, const float* weight, int N, int C, int OC);

// Causal multi-head self-attention. inp is the fused qkv [B,T,3C] (q | k | v, each split
// into NH heads of C/NH); out [B,T,C]; att [B,NH,T,T] holds the softmax probabilities
// (entries above the diagonal are 0) and is saved for backward.
void AttentionForward(const CpuContext& ctx, float* out, float* att, const float* inp, int B, int T,
                      int C, int NH);
// dinp[B,T,3C] += ...; datt [B,NH,T,T] is scratch the kernel overwrites.
void AttentionBackward(const CpuContext& ctx, float* dinp, float* datt, const float* dout,
                       const float* inp, const float* att, int B, int T, int C, int NH);

// GELU, tanh approximation (as GPT-2).
void GeluForward(const CpuContext& ctx, float* out, const float* inp, int64_t n);
// dinp += gelu'(inp) * dout.
void GeluBackward(const CpuContext& ctx, float* dinp, const float* inp, const float* dout,
                  int64_t n);

// out = a + b.
void ResidualForward(const CpuContext& ctx, float* out, const float* a, const float* b, int64_t n);
// da += dout; db += dout.
void ResidualBackward(const CpuContext& ctx, float* da, float* db, const float* dout, int64_t n);

// Softmax over the first V of Vp logits per row, then cross-entropy against targets.
// probs [N,Vp] (padded columns 0), losses [N].
void SoftmaxCrossEntropyForward(const CpuContext& ctx, float* probs, float* losses,
                                const float* logits, const int32_t* targets, int N, int V, int Vp);
// dlogits[N,Vp] = (probs - onehot(target)) * dloss_scale (overwritten, padded columns 0).
void SoftmaxCrossEntropyBackward(const CpuContext& ctx, float* dlogits, const float* probs,
                                 const int32_t* targets, float dloss_scale, int N, int V, int Vp);

// Sum of squares of grads in double, in a fixed order (deterministic).
double SumOfSquares(const CpuContext& ctx, const float* grads, int64_t n);

struct AdamWParams {
  float lr;
  float beta1;
  float beta2;
  float eps;
  float weight_decay;  // applied only where decay_mask is non-zero (or everywhere if null)
  float grad_scale;    // grads are multiplied by this first (gradient clipping)
  int64_t t;           // 1-based step count for bias correction
};
// One AdamW step (decoupled weight decay) over n parameters, in place.
void AdamWUpdate(const CpuContext& ctx, float* params, const float* grads, float* m, float* v,
                 const uint8_t* decay_mask, int64_t n, const AdamWParams& p);

}  // namespace spotrain::kernels::cpu

#endif  // SPOTRAIN_KERNELS_CPU_OPS_H_
