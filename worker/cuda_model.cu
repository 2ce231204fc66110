#include <algorithm>
#include <type_traits>
#include <utility>

#include "absl/strings/str_format.h"
#include "common/model_presets.h"
#include "common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "worker/cuda_model.h"

namespace spotrain::worker {
namespace {

namespace kc = ::spotrain::kernels::cuda;
using kc::bf16;

// Pointers to the 16 tensors of a flat buffer of element type W (params, grads or the bf16
// working copy), all layers of a tensor together.
template <typename W>
struct Tensors {
  W* wte;
  W* wpe;
  W* ln1w;
  W* ln1b;
  W* qkvw;
  W* qkvb;
  W* attprojw;
  W* attprojb;
  W* ln2w;
  W* ln2b;
  W* fcw;
  W* fcb;
  W* fcprojw;
  W* fcprojb;
  W* lnfw;
  W* lnfb;
};

template <typename W>
Tensors<W> TensorsOf(W* base, const std::vector<CudaGptModel::TensorInfo>& info) {
  W* p[16];
  for (int i = 0; i < 16; ++i) p[i] = base + info[i].offset;
  return Tensors<W>{p[0], p[1], p[2],  p[3],  p[4],  p[5],  p[6],  p[7],
                    p[8], p[9], p[10], p[11], p[12], p[13], p[14], p[15]};
}

// Hands out aligned pieces of one device allocation (first pass: only counts bytes).
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  template <typename X>
  X* Take(int64_t count) {
    offset_ = (offset_ + 255) / 256 * 256;
    X* p = base_ == nullptr ? nullptr : reinterpret_cast<X*>(base_ + offset_);
    offset_ += count * static_cast<int64_t>(sizeof(X));
    return p;
  }
  int64_t bytes() const { return offset_; }

 private:
  char* base_;
  int64_t offset_ = 0;
};

}  // namespace

// Device activations for max_micro_batch x seq_len rows. Buffers typed `void*` hold the
// activation type of the model's precision (float or bf16); per-layer arrays are indexed
// with the current micro-batch's row count.
struct CudaGptModel::Buffers {
  int32_t* inputs;
  int32_t* targets;
  bf16* params_bf16;  // bf16 working copy of the parameters (kBf16 only)
  void* encoded;      // [N, C]
  void* ln1;          // [L, N, C]
  float* ln1_mean;    // [L, N]
  float* ln1_rstd;    // [L, N]
  void* qkv;          // [L, N, 3C] without the qkv bias (the attention adds it)
  void* atty;         // [L, N, C]
  void* att;          // [L, B, NH, T, T]
  void* residual2;    // [L, N, C]
  void* ln2;          // [L, N, C]
  float* ln2_mean;    // [L, N]
  float* ln2_rstd;    // [L, N]
  void* fch;          // [L, N, 4C]
  void* fch_gelu;     // [L, N, 4C]
  void* residual3;    // [L, N, C]
  void* lnf;          // [N, C]
  float* lnf_mean;    // [N]
  float* lnf_rstd;    // [N]
  void* proj;         // [N, C]
  void* logits;       // [N, Vp] activations; the backward's dlogits are written over them
  float* ce_stats;    // [N, 2] the softmax's max and 1/sum per row (CrossEntropyForward)
  float* losses;      // [N]
  void* dresidual;    // [N, C]
  void* dln;          // [N, C]
  void* datty;        // [N, C]
  void* dqkv;         // [N, 3C]
  void* datt;         // [B, NH, T, T]
  void* dfch_gelu;    // [N, 4C]
  void* dfch;         // [N, 4C]
};

absl::StatusOr<CudaPrecision> ParseCudaPrecision(const std::string& name) {
  if (name.empty() || name == "fp32") return CudaPrecision::kFp32;
  if (name == "bf16") return CudaPrecision::kBf16;
  return absl::InvalidArgumentError(
      absl::StrFormat("precision: unknown value \"%s\"; use \"fp32\" or \"bf16\"", name));
}

const char* CudaPrecisionName(CudaPrecision precision) {
  return precision == CudaPrecision::kBf16 ? "bf16" : "fp32";
}

CudaGptModel::CudaGptModel(const proto::ModelConfig& config, int max_micro_batch, int seq_len,
                           const CudaModelOptions& options)
    : config_(config),
      max_b_(max_micro_batch),
      seq_len_(seq_len),
      options_(options),
      L_(config.num_layers()),
      C_(config.channels()),
      NH_(config.num_heads()),
      V_(config.vocab_size()),
      Vp_(config.padded_vocab()),
      maxT_(config.max_seq_len()) {}

CudaGptModel::~CudaGptModel() {
  if (ctx_ != nullptr) {
    // Nothing can be reported from a destructor; drain the stream so that no kernel still
    // uses the memory freed below.
    (void)ctx_->Synchronize();
  }
  for (void* p : allocations_) cudaFree(p);
}

absl::StatusOr<std::unique_ptr<CudaGptModel>> CudaGptModel::Create(
    const proto::ModelConfig& config, int max_micro_batch, int seq_len,
    const CudaModelOptions& options) {
  const int L = config.num_layers(), C = config.channels(), NH = config.num_heads();
  if (L < 1 || C < 1 || NH < 1 || config.vocab_size() < 1 || config.max_seq_len() < 1) {
    return absl::InvalidArgumentError(
        "model config: layers, channels, heads, vocab_size and max_seq_len must be positive");
  }
  if (C % NH != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("model config: %d heads do not divide %d channels", NH, C));
  }
  if (config.padded_vocab() < config.vocab_size()) {
    return absl::InvalidArgumentError("model config: padded_vocab < vocab_size");
  }
  if (seq_len < 1 || seq_len > config.max_seq_len()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "seq_len %d outside [1, %d] (the model's context)", seq_len, config.max_seq_len()));
  }
  if (max_micro_batch < 1) {
    return absl::InvalidArgumentError("max_micro_batch must be >= 1");
  }
  const int64_t expected = common::CountParameters(config);
  if (config.num_parameters() != 0 && config.num_parameters() != expected) {
    return absl::InvalidArgumentError(
        absl::StrFormat("model config: num_parameters %d, but the shape has %d",
                        config.num_parameters(), expected));
  }
  std::unique_ptr<CudaGptModel> model(new CudaGptModel(config, max_micro_batch, seq_len, options));
  kc::CudaContextOptions ctx_options;
  ctx_options.device = options.device;
  ctx_options.deterministic = options.deterministic;
  ctx_options.allow_tf32 = options.allow_tf32;
  // Room for the attention of a whole micro-batch at once (one batched product per step).
  const size_t attention_scratch =
      options.precision == CudaPrecision::kBf16
          ? kc::AttentionScratchBytes<bf16>(max_micro_batch, seq_len, config.channels())
          : kc::AttentionScratchBytes<float>(max_micro_batch, seq_len, config.channels());
  ctx_options.scratch_bytes = std::max(ctx_options.scratch_bytes, attention_scratch);
  auto ctx = kc::CudaContext::Create(ctx_options);
  if (absl::IsResourceExhausted(ctx.status())) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "CUDA model (micro-batch %d x %d tokens) needs %.2f GiB of kernel scratch memory: %s; "
        "use a smaller micro_batch",
        max_micro_batch, seq_len, ctx_options.scratch_bytes / 1073741824.0,
        ctx.status().message()));
  }
  if (!ctx.ok()) return ctx.status();
  model->ctx_ = std::move(ctx).value();
  RETURN_IF_ERROR(model->Allocate());
  return model;
}

absl::Status CudaGptModel::Allocate() {
  const int64_t C = C_, L = L_, Vp = Vp_, maxT = maxT_;
  // Tensor table, llm.c order.
  struct Spec {
    const char* name;
    int64_t size;
    bool decay;
  };
  const Spec specs[16] = {
      {"wte", Vp * C, true},
      {"wpe", maxT * C, false},
      {"ln1w", L * C, false},
      {"ln1b", L * C, false},
      {"qkvw", L * 3 * C * C, true},
      {"qkvb", L * 3 * C, false},
      {"attprojw", L * C * C, true},
      {"attprojb", L * C, false},
      {"ln2w", L * C, false},
      {"ln2b", L * C, false},
      {"fcw", L * 4 * C * C, true},
      {"fcb", L * 4 * C, false},
      {"fcprojw", L * C * 4 * C, true},
      {"fcprojb", L * C, false},
      {"lnfw", C, false},
      {"lnfb", C, false},
  };
  int64_t offset = 0;
  for (const Spec& s : specs) {
    tensors_.push_back(TensorInfo{s.name, offset, s.size, s.decay});
    offset += s.size;
  }
  num_parameters_ = offset;
  const int64_t P = num_parameters_;

  const bool bf16_mode = options_.precision == CudaPrecision::kBf16;
  const int64_t act = bf16_mode ? sizeof(bf16) : sizeof(float);
  const int64_t B = max_b_, T = seq_len_, NH = NH_;
  const int64_t N = B * T;

  // Two passes: count the bytes, then carve them out of one allocation.
  auto carve = [&](char* base, Buffers* b) {
    Carver cv(base);
    float* params = cv.Take<float>(P);
    float* grads = cv.Take<float>(P);
    float* m = cv.Take<float>(P);
    float* v = cv.Take<float>(P);
    uint8_t* mask = cv.Take<uint8_t>(P);
    b->params_bf16 = bf16_mode ? cv.Take<bf16>(P) : nullptr;
    b->inputs = cv.Take<int32_t>(N);
    b->targets = cv.Take<int32_t>(N);
    auto acts = [&](int64_t count) { return static_cast<void*>(cv.Take<char>(count * act)); };
    b->encoded = acts(N * C);
    b->ln1 = acts(L * N * C);
    b->ln1_mean = cv.Take<float>(L * N);
    b->ln1_rstd = cv.Take<float>(L * N);
    b->qkv = acts(L * N * 3 * C);
    b->atty = acts(L * N * C);
    b->att = acts(L * B * NH * T * T);
    b->residual2 = acts(L * N * C);
    b->ln2 = acts(L * N * C);
    b->ln2_mean = cv.Take<float>(L * N);
    b->ln2_rstd = cv.Take<float>(L * N);
    b->fch = acts(L * N * 4 * C);
    b->fch_gelu = acts(L * N * 4 * C);
    b->residual3 = acts(L * N * C);
    b->lnf = acts(N * C);
    b->lnf_mean = cv.Take<float>(N);
    b->lnf_rstd = cv.Take<float>(N);
    b->proj = acts(N * C);
    b->logits = acts(N * Vp);
    b->ce_stats = cv.Take<float>(N * 2);
    b->losses = cv.Take<float>(N);
    b->dresidual = acts(N * C);
    b->dln = acts(N * C);
    b->datty = acts(N * C);
    b->dqkv = acts(N * 3 * C);
    b->datt = acts(B * NH * T * T);
    b->dfch_gelu = acts(N * 4 * C);
    b->dfch = acts(N * 4 * C);
    params_ = params;
    grads_ = grads;
    m_ = m;
    v_ = v;
    decay_mask_ = mask;
    return cv.bytes();
  };
  buffers_ = std::make_unique<Buffers>();
  const int64_t bytes = carve(nullptr, buffers_.get());
  void* base = nullptr;
  const cudaError_t err = cudaMalloc(&base, static_cast<size_t>(bytes));
  if (err != cudaSuccess) {
    cudaGetLastError();
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    return absl::ResourceExhaustedError(absl::StrFormat(
        "CUDA model (%s, %d params, micro-batch %d x %d tokens, %s) needs %.2f GiB of device "
        "memory; %.2f GiB of %.2f GiB free (%s): use a smaller micro_batch",
        config_.preset(), P, max_b_, seq_len_, CudaPrecisionName(options_.precision),
        bytes / 1073741824.0, free_bytes / 1073741824.0, total_bytes / 1073741824.0,
        cudaGetErrorString(err)));
  }
  allocations_.push_back(base);
  carve(static_cast<char*>(base), buffers_.get());
  device_bytes_ = bytes + static_cast<int64_t>(ctx_->scratch_bytes());

  std::vector<uint8_t> mask(static_cast<size_t>(P), 0);
  for (const TensorInfo& t : tensors_) {
    if (t.decay) std::fill(mask.begin() + t.offset, mask.begin() + t.offset + t.size, 1);
  }
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(decay_mask_, mask.data(), mask.size(),
                                       cudaMemcpyHostToDevice, ctx_->stream()));
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(params_, 0, P * sizeof(float), ctx_->stream()));
  RETURN_IF_ERROR(ZeroGrads());
  RETURN_IF_ERROR(ZeroMoments());
  return ctx_->Synchronize();
}

absl::Status CudaGptModel::CopyParamsFromHost(const float* host) {
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(params_, host, num_parameters_ * sizeof(float),
                                       cudaMemcpyHostToDevice, ctx_->stream()));
  return ctx_->Synchronize();
}

absl::Status CudaGptModel::CopyParamsToHost(float* host) {
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host, params_, num_parameters_ * sizeof(float),
                                       cudaMemcpyDeviceToHost, ctx_->stream()));
  return ctx_->Synchronize();
}

absl::Status CudaGptModel::CopyGradsFromHost(const float* host) {
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(grads_, host, num_parameters_ * sizeof(float),
                                       cudaMemcpyHostToDevice, ctx_->stream()));
  return ctx_->Synchronize();
}

absl::Status CudaGptModel::CopyGradsToHost(float* host) {
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host, grads_, num_parameters_ * sizeof(float),
                                       cudaMemcpyDeviceToHost, ctx_->stream()));
  return ctx_->Synchronize();
}

absl::Status CudaGptModel::CopyMomentsFromHost(const float* m, const float* v) {
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(m_, m, num_parameters_ * sizeof(float),
                                       cudaMemcpyHostToDevice, ctx_->stream()));
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(v_, v, num_parameters_ * sizeof(float),
                                       cudaMemcpyHostToDevice, ctx_->stream()));
  return ctx_->Synchronize();
}

absl::Status CudaGptModel::CopyMomentsToHost(float* m, float* v) {
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(m, m_, num_parameters_ * sizeof(float),
                                       cudaMemcpyDeviceToHost, ctx_->stream()));
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(v, v_, num_parameters_ * sizeof(float),
                                       cudaMemcpyDeviceToHost, ctx_->stream()));
  return ctx_->Synchronize();
}

absl::Status CudaGptModel::ZeroGrads() {
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(grads_, 0, num_parameters_ * sizeof(float), ctx_->stream()));
  return absl::OkStatus();
}

absl::Status CudaGptModel::ZeroMoments() {
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(m_, 0, num_parameters_ * sizeof(float), ctx_->stream()));
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(v_, 0, num_parameters_ * sizeof(float), ctx_->stream()));
  return absl::OkStatus();
}

absl::Status CudaGptModel::Synchronize() { return ctx_->Synchronize(); }

absl::Status CudaGptModel::UploadTokens(const int32_t* inputs, const int32_t* targets, int B) {
  if (B < 1 || B > max_b_) {
    return absl::InvalidArgumentError(
        absl::StrFormat("micro-batch of %d sequences outside [1, %d]", B, max_b_));
  }
  const int64_t N = static_cast<int64_t>(B) * seq_len_;
  for (int64_t i = 0; i < N; ++i) {
    if (inputs[i] < 0 || inputs[i] >= V_ || targets[i] < 0 || targets[i] >= V_) {
      return absl::InvalidArgumentError(
          absl::StrFormat("token %d: input %d / target %d outside the vocabulary [0, %d)", i,
                          inputs[i], targets[i], V_));
    }
  }
  // Pageable host memory: the copy has been staged when the call returns, so the caller
  // may reuse its buffers at once.
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(buffers_->inputs, inputs, N * sizeof(int32_t),
                                       cudaMemcpyHostToDevice, ctx_->stream()));
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(buffers_->targets, targets, N * sizeof(int32_t),
                                       cudaMemcpyHostToDevice, ctx_->stream()));
  return absl::OkStatus();
}

template <typename Act>
absl::Status CudaGptModel::RunForward(int B, bool backward, float grad_scale) {
  kc::CudaContext& ctx = *ctx_;
  Buffers& a = *buffers_;
  const int T = seq_len_, C = C_, L = L_, NH = NH_, Vp = Vp_;
  const int64_t N = static_cast<int64_t>(B) * T;
  const int Ni = static_cast<int>(N);
  const Tensors<float> p = TensorsOf(params_, tensors_);
  // Matrix product operands in the activation type: the bf16 working copy, refreshed here
  // because the trainer may have changed the fp32 master weights since the last call.
  const Act* wbase;
  if constexpr (std::is_same_v<Act, bf16>) {
    RETURN_IF_ERROR(kc::CastToBf16(ctx, a.params_bf16, params_, num_parameters_));
    wbase = a.params_bf16;
  } else {
    wbase = params_;
  }
  const Tensors<const Act> w = TensorsOf(wbase, tensors_);
  auto act = [](void* ptr) { return static_cast<Act*>(ptr); };
  const int64_t NC = N * C;
  const int64_t att_layer = static_cast<int64_t>(B) * NH * T * T;

  RETURN_IF_ERROR(kc::EncoderForward(ctx, act(a.encoded), a.inputs, p.wte, p.wpe, B, T, C));
  for (int l = 0; l < L; ++l) {
    const Act* residual = l == 0 ? act(a.encoded) : act(a.residual3) + (l - 1) * NC;
    Act* ln1 = act(a.ln1) + l * NC;
    Act* qkv = act(a.qkv) + l * 3 * NC;
    Act* atty = act(a.atty) + l * NC;
    Act* att = act(a.att) + l * att_layer;
    Act* residual2 = act(a.residual2) + l * NC;
    Act* ln2 = act(a.ln2) + l * NC;
    Act* fch = act(a.fch) + l * 4 * NC;
    Act* fch_gelu = act(a.fch_gelu) + l * 4 * NC;
    Act* residual3 = act(a.residual3) + l * NC;
    const int64_t cc = static_cast<int64_t>(C) * C;
    RETURN_IF_ERROR(kc::LayerNormForward(ctx, ln1, a.ln1_mean + l * N, a.ln1_rstd + l * N, residual,
                                         p.ln1w + l * C, p.ln1b + l * C, Ni, C));
    // qkv holds the product without its bias: the attention adds it as it copies q, k, v to
    // its head-major scratch (the backward does again), saving a pass over qkv.
    RETURN_IF_ERROR(kc::MatmulForward(ctx, qkv, static_cast<const Act*>(ln1), w.qkvw + l * 3 * cc,
                                      static_cast<const float*>(nullptr), Ni, C, 3 * C));
    RETURN_IF_ERROR(kc::AttentionForward(ctx, atty, att, static_cast<const Act*>(qkv), B, T, C, NH,
                                         p.qkvb + l * 3 * C));
    // The biases of the three layers below are added by the kernel that consumes the product.
    RETURN_IF_ERROR(kc::MatmulForward(ctx, act(a.proj), static_cast<const Act*>(atty),
                                      w.attprojw + l * cc, static_cast<const float*>(nullptr), Ni,
                                      C, C));
    RETURN_IF_ERROR(kc::BiasResidualForward(
        ctx, residual2, residual, static_cast<const Act*>(act(a.proj)), p.attprojb + l * C, Ni, C));
    RETURN_IF_ERROR(kc::LayerNormForward(ctx, ln2, a.ln2_mean + l * N, a.ln2_rstd + l * N,
                                         static_cast<const Act*>(residual2), p.ln2w + l * C,
                                         p.ln2b + l * C, Ni, C));
    RETURN_IF_ERROR(kc::MatmulForward(ctx, fch, static_cast<const Act*>(ln2), w.fcw + l * 4 * cc,
                                      static_cast<const float*>(nullptr), Ni, C, 4 * C));
    RETURN_IF_ERROR(kc::BiasGeluForward(ctx, fch_gelu, fch, p.fcb + l * 4 * C, Ni, 4 * C));
    RETURN_IF_ERROR(kc::MatmulForward(ctx, act(a.proj), static_cast<const Act*>(fch_gelu),
                                      w.fcprojw + l * 4 * cc, static_cast<const float*>(nullptr),
                                      Ni, 4 * C, C));
    RETURN_IF_ERROR(kc::BiasResidualForward(ctx, residual3, static_cast<const Act*>(residual2),
                                            static_cast<const Act*>(act(a.proj)), p.fcprojb + l * C,
                                            Ni, C));
  }
  RETURN_IF_ERROR(kc::LayerNormForward(ctx, act(a.lnf), a.lnf_mean, a.lnf_rstd,
                                       static_cast<const Act*>(act(a.residual3) + (L - 1) * NC),
                                       p.lnfw, p.lnfb, Ni, C));
  // Logits in the activations' precision (bf16 halves the largest activation's traffic, as
  // llm.c); the softmax and the loss are computed in fp32 from them.
  Act* logits = act(a.logits);
  RETURN_IF_ERROR(kc::MatmulForward(ctx, logits, static_cast<const Act*>(act(a.lnf)), w.wte,
                                    static_cast<const float*>(nullptr), Ni, C, Vp));
  if (!backward) {
    return kc::CrossEntropyForward(ctx, a.losses, a.ce_stats, static_cast<const Act*>(logits),
                                   a.targets, Ni, V_, Vp);
  }
  // d(mean loss * grad_scale)/dlogits in the same pass over each row, written over the
  // logits (no longer needed).
  return kc::CrossEntropyForwardBackward(ctx, a.losses, a.ce_stats, logits,
                                         static_cast<const Act*>(logits), a.targets,
                                         grad_scale / static_cast<float>(N), Ni, V_, Vp);
}

template <typename Act>
absl::Status CudaGptModel::RunBackward(int B) {
  kc::CudaContext& ctx = *ctx_;
  Buffers& a = *buffers_;
  const int T = seq_len_, C = C_, L = L_, NH = NH_, Vp = Vp_;
  const int64_t N = static_cast<int64_t>(B) * T;
  const int Ni = static_cast<int>(N);
  const Tensors<float> p = TensorsOf(params_, tensors_);
  const Tensors<float> g = TensorsOf(grads_, tensors_);
  const Act* wbase;
  if constexpr (std::is_same_v<Act, bf16>) {
    wbase = a.params_bf16;  // cast by RunForward of this micro-batch
  } else {
    wbase = params_;
  }
  const Tensors<const Act> w = TensorsOf(wbase, tensors_);
  auto act = [](void* ptr) { return static_cast<Act*>(ptr); };
  auto cact = [](void* ptr) { return static_cast<const Act*>(ptr); };
  auto zero = [&](void* ptr, int64_t count) -> absl::Status {
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(ptr, 0, count * sizeof(Act), ctx.stream()));
    return absl::OkStatus();
  };
  const int64_t NC = N * C;
  const int64_t cc = static_cast<int64_t>(C) * C;
  const int64_t att_layer = static_cast<int64_t>(B) * NH * T * T;

  // d(mean loss * grad_scale)/dlogits, written over the logits by RunForward's cross-entropy.
  const Act* dlogits = cact(a.logits);
  constexpr kc::GradWrite kOverwrite = kc::GradWrite::kOverwrite;
  RETURN_IF_ERROR(kc::MatmulBackward(ctx, act(a.dln), g.wte, static_cast<float*>(nullptr),
                                     static_cast<const Act*>(dlogits), cact(a.lnf), w.wte, Ni, C,
                                     Vp, kOverwrite));
  // dresidual holds d(residual stream) from here on; the blocks add into it.
  RETURN_IF_ERROR(zero(a.dresidual, NC));
  RETURN_IF_ERROR(kc::LayerNormBackward(ctx, act(a.dresidual), g.lnfw, g.lnfb, cact(a.dln),
                                        cact(a.residual3) + (L - 1) * NC, p.lnfw, a.lnf_mean,
                                        a.lnf_rstd, Ni, C));
  for (int l = L - 1; l >= 0; --l) {
    const Act* residual = l == 0 ? cact(a.encoded) : cact(a.residual3) + (l - 1) * NC;
    const Act* ln1 = cact(a.ln1) + l * NC;
    const Act* qkv = cact(a.qkv) + l * 3 * NC;
    const Act* atty = cact(a.atty) + l * NC;
    const Act* att = cact(a.att) + l * att_layer;
    const Act* residual2 = cact(a.residual2) + l * NC;
    const Act* ln2 = cact(a.ln2) + l * NC;
    const Act* fch = cact(a.fch) + l * 4 * NC;
    const Act* fch_gelu = cact(a.fch_gelu) + l * 4 * NC;
    // residual3 = residual2 + fcproj: d(fcproj) is d(residual3), which dresidual holds and
    // which also flows unchanged into d(residual2).
    // The per-layer gradient buffers (dfch_gelu, dfch, dln, datty, dqkv) have one writer
    // each, which writes them over (kOverwrite) instead of adding to a zeroed buffer.
    RETURN_IF_ERROR(kc::MatmulBackward(ctx, act(a.dfch_gelu), g.fcprojw + l * 4 * cc,
                                       g.fcprojb + l * C, cact(a.dresidual), fch_gelu,
                                       w.fcprojw + l * 4 * cc, Ni, 4 * C, C, kOverwrite));
    RETURN_IF_ERROR(kc::GeluBackward(ctx, act(a.dfch), fch, cact(a.dfch_gelu), 4 * NC, kOverwrite));
    RETURN_IF_ERROR(kc::MatmulBackward(ctx, act(a.dln), g.fcw + l * 4 * cc, g.fcb + l * 4 * C,
                                       cact(a.dfch), ln2, w.fcw + l * 4 * cc, Ni, C, 4 * C,
                                       kOverwrite));
    RETURN_IF_ERROR(kc::LayerNormBackward(ctx, act(a.dresidual), g.ln2w + l * C, g.ln2b + l * C,
                                          cact(a.dln), residual2, p.ln2w + l * C,
                                          a.ln2_mean + l * N, a.ln2_rstd + l * N, Ni, C));
    // residual2 = residual + attproj: likewise.
    RETURN_IF_ERROR(kc::MatmulBackward(ctx, act(a.datty), g.attprojw + l * cc, g.attprojb + l * C,
                                       cact(a.dresidual), atty, w.attprojw + l * cc, Ni, C, C,
                                       kOverwrite));
    RETURN_IF_ERROR(kc::AttentionBackward(ctx, act(a.dqkv), act(a.datt), cact(a.datty), qkv, att, B,
                                          T, C, NH, kOverwrite, p.qkvb + l * 3 * C));
    RETURN_IF_ERROR(kc::MatmulBackward(ctx, act(a.dln), g.qkvw + l * 3 * cc, g.qkvb + l * 3 * C,
                                       cact(a.dqkv), ln1, w.qkvw + l * 3 * cc, Ni, C, 3 * C,
                                       kOverwrite));
    RETURN_IF_ERROR(kc::LayerNormBackward(ctx, act(a.dresidual), g.ln1w + l * C, g.ln1b + l * C,
                                          cact(a.dln), residual, p.ln1w + l * C, a.ln1_mean + l * N,
                                          a.ln1_rstd + l * N, Ni, C));
  }
  return kc::EncoderBackward(ctx, g.wte, g.wpe, cact(a.dresidual), a.inputs, B, T, C, Vp);
}

absl::StatusOr<float> CudaGptModel::MeanLoss(int B) {
  const int64_t N = static_cast<int64_t>(B) * seq_len_;
  ASSIGN_OR_RETURN(const double total, kc::Sum(*ctx_, buffers_->losses, N));
  return static_cast<float>(total / static_cast<double>(N));
}

absl::StatusOr<float> CudaGptModel::ForwardBackward(const int32_t* inputs, const int32_t* targets,
                                                    int B, float grad_scale) {
  RETURN_IF_ERROR(ctx_->Activate());
  RETURN_IF_ERROR(UploadTokens(inputs, targets, B));
  if (options_.precision == CudaPrecision::kBf16) {
    RETURN_IF_ERROR(RunForward<bf16>(B, /*backward=*/true, grad_scale));
    RETURN_IF_ERROR(RunBackward<bf16>(B));
  } else {
    RETURN_IF_ERROR(RunForward<float>(B, /*backward=*/true, grad_scale));
    RETURN_IF_ERROR(RunBackward<float>(B));
  }
  // The losses survive the backward pass (it overwrites only the logits).
  return MeanLoss(B);
}

absl::StatusOr<float> CudaGptModel::Forward(const int32_t* inputs, const int32_t* targets, int B) {
  RETURN_IF_ERROR(ctx_->Activate());
  RETURN_IF_ERROR(UploadTokens(inputs, targets, B));
  if (options_.precision == CudaPrecision::kBf16) {
    RETURN_IF_ERROR(RunForward<bf16>(B, /*backward=*/false, 0.0f));
  } else {
    RETURN_IF_ERROR(RunForward<float>(B, /*backward=*/false, 0.0f));
  }
  return MeanLoss(B);
}

absl::StatusOr<double> CudaGptModel::GradSumOfSquares() {
  return kc::SumOfSquares(*ctx_, grads_, num_parameters_);
}

absl::Status CudaGptModel::AdamWStep(const kc::AdamWParams& p) {
  return kc::AdamWUpdate(*ctx_, params_, grads_, m_, v_, decay_mask_, num_parameters_, p);
}

}  // namespace spotrain::worker
