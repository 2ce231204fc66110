// The GPT-2 style decoder trained by a worker, on the CPU kernels (kernels/cpu/ops.h):
// pre-LayerNorm blocks, causal multi-head attention, a GELU MLP of width 4C, learned
// positions and tied embeddings (the LM head is wte).
//
// Parameters live in ONE flat fp32 buffer in llm.c order, and gradients in a second buffer
// of the same layout, so that a step all-reduces, broadcasts and checkpoints one vector:
//   wte[Vp,C] wpe[maxT,C] ln1w[L,C] ln1b[L,C] qkvw[L,3C,C] qkvb[L,3C] attprojw[L,C,C]
//   attprojb[L,C] ln2w[L,C] ln2b[L,C] fcw[L,4C,C] fcb[L,4C] fcprojw[L,C,4C] fcprojb[L,C]
//   lnfw[C] lnfb[C]
// (Vp the padded vocabulary, maxT the model's context). Its size equals
// common::CountParameters(config). Activations are allocated once, in Create, for
// max_micro_batch sequences of seq_len tokens; a step allocates nothing.
//
// Thread-safety: a GptModel is used by one thread at a time (the trainer thread); it is not
// internally synchronised. The kernels it calls may use ctx.threads OpenMP/BLAS threads;
// results are bit-reproducible for a fixed ctx.threads (OpenBLAS rounds differently with
// one thread and with several, see kernels/cpu/ops.h).
#ifndef SPOTRAIN_WORKER_MODEL_H_
#define SPOTRAIN_WORKER_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cpu/ops.h"
#include "proto/config.pb.h"

namespace spotrain::worker {

class GptModel {
 public:
  // One tensor of the flat parameter buffer.
  struct TensorInfo {
    std::string name;  // "wte", "wpe", "ln1w", ... (llm.c names)
    int64_t offset;    // first float in params() / grads()
    int64_t size;      // floats, all layers together
    bool decay;        // weight decay applies (see decay_mask())
  };

  // Builds a model of shape `config` (e.g. from common::ModelConfigForPreset) for
  // micro-batches of up to `max_micro_batch` sequences of exactly `seq_len` tokens.
  // Parameters are uninitialised (call InitParameters or write params()), grads are zero.
  // kInvalidArgument for an inconsistent shape (heads not dividing channels, seq_len
  // outside [1, max_seq_len], padded_vocab < vocab_size, num_parameters set and different
  // from common::CountParameters, threads < 1, ...); kResourceExhausted when the buffers
  // cannot be allocated.
  static absl::StatusOr<std::unique_ptr<GptModel>> Create(const proto::ModelConfig& config,
                                                          int max_micro_batch, int seq_len,
                                                          kernels::cpu::CpuContext ctx);

  GptModel(const GptModel&) = delete;
  GptModel& operator=(const GptModel&) = delete;

  int64_t num_parameters() const { return num_parameters_; }
  float* params() { return params_.data(); }
  const float* params() const { return params_.data(); }
  float* grads() { return grads_.data(); }
  const float* grads() const { return grads_.data(); }

  // Deterministic GPT-2 initialisation: weights N(0, 0.02), the residual projections
  // (attprojw, fcprojw) N(0, 0.02/sqrt(2L)), LayerNorm weights 1, every bias 0, padded
  // vocabulary rows of wte 0. Parameter k gets a Box-Muller normal drawn from a counter-
  // based splitmix64 stream at (seed, k), so the values depend only on the seed and the
  // shape, never on the machine, library or thread count (computed in double and rounded
  // to float once).
  void InitParameters(uint64_t seed);

  void ZeroGrads();

  // Forward and backward of one micro-batch: inputs and targets are [B, seq_len] token ids
  // below vocab_size, 1 <= B <= max_micro_batch. ADDS grad_scale * d(mean token loss of
  // this micro-batch)/d(params) to grads() and returns that mean loss. Tokens out of range
  // are a broken invariant of the data loader (checked, aborts).
  float ForwardBackward(const int32_t* inputs, const int32_t* targets, int B, float grad_scale);

  // Forward only (evaluation): the mean token loss of the micro-batch. Leaves grads()
  // untouched.
  float Forward(const int32_t* inputs, const int32_t* targets, int B);

  // One byte per parameter: 1 where AdamW applies weight decay, 0 elsewhere. Decayed: the
  // matrices wte (tied with the LM head, as llm.c), qkvw, attprojw, fcw, fcprojw. Not
  // decayed: wpe, every bias and every LayerNorm weight and bias.
  const std::vector<uint8_t>& decay_mask() const { return decay_mask_; }

  // The tensors of the flat buffer, in order.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }

  const proto::ModelConfig& config() const { return config_; }
  int max_micro_batch() const { return max_b_; }
  int seq_len() const { return seq_len_; }
  const kernels::cpu::CpuContext& context() const { return ctx_; }

 private:
  // Pointers to the 16 tensors of a flat buffer (parameters or gradients).
  struct Tensors {
    float* wte;
    float* wpe;
    float* ln1w;
    float* ln1b;
    float* qkvw;
    float* qkvb;
    float* attprojw;
    float* attprojb;
    float* ln2w;
    float* ln2b;
    float* fcw;
    float* fcb;
    float* fcprojw;
    float* fcprojb;
    float* lnfw;
    float* lnfb;
  };
  // Forward activations, [L, ...] arrays laid out for max_micro_batch x seq_len rows per
  // layer, plus the backward scratch buffers (one layer's worth, reused).
  struct Activations {
    float* encoded;    // [N, C]
    float* ln1;        // [L, N, C]
    float* ln1_mean;   // [L, N]
    float* ln1_rstd;   // [L, N]
    float* qkv;        // [L, N, 3C]
    float* atty;       // [L, N, C]
    float* att;        // [L, B, NH, T, T]
    float* residual2;  // [L, N, C]
    float* ln2;        // [L, N, C]
    float* ln2_mean;   // [L, N]
    float* ln2_rstd;   // [L, N]
    float* fch;        // [L, N, 4C]
    float* fch_gelu;   // [L, N, 4C]
    float* residual3;  // [L, N, C]
    float* lnf;        // [N, C]
    float* lnf_mean;   // [N]
    float* lnf_rstd;   // [N]
    float* proj;       // [N, C] output of attproj / fcproj before the residual add
    float* logits;     // [N, Vp]; reused for dlogits in backward
    float* probs;      // [N, Vp]
    float* losses;     // [N]
    // Backward scratch.
    float* dresidual;  // [N, C]
    float* dln;        // [N, C]
    float* datty;      // [N, C]
    float* dqkv;       // [N, 3C]
    float* datt;       // [B, NH, T, T]
    float* dfch_gelu;  // [N, 4C]
    float* dfch;       // [N, 4C]
  };

  GptModel(const proto::ModelConfig& config, int max_micro_batch, int seq_len,
           kernels::cpu::CpuContext ctx);
  absl::Status Allocate();
  Tensors TensorsOf(float* base) const;
  void CheckTokens(const int32_t* inputs, const int32_t* targets, int B) const;
  // Runs the forward pass; returns the mean loss.
  float RunForward(const int32_t* inputs, const int32_t* targets, int B);
  void RunBackward(const int32_t* inputs, const int32_t* targets, int B, float grad_scale);

  const proto::ModelConfig config_;
  const int max_b_;
  const int seq_len_;
  const kernels::cpu::CpuContext ctx_;
  const int L_, C_, NH_, V_, Vp_, maxT_;
  int64_t num_parameters_ = 0;
  std::vector<TensorInfo> tensors_;
  std::vector<float> params_;
  std::vector<float> grads_;
  std::vector<uint8_t> decay_mask_;
  std::vector<float> activation_memory_;
  Activations acts_{};
};

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_MODEL_H_
