#include "worker/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/check.h"
#include "common/model_presets.h"

namespace spotrain::worker {
namespace {

namespace ops = ::spotrain::kernels::cpu;

// splitmix64's output function; its n-th output for state s is Mix(s + n * kGamma).
constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;
uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// A standard normal for counter k of the stream `key` (Box-Muller on two splitmix64
// outputs). Uses only IEEE double arithmetic plus log/cos/sqrt; the float it is rounded to
// is the same wherever libm is correctly rounded to within far less than a float ulp.
double NormalAt(uint64_t key, uint64_t k) {
  const uint64_t a = Mix(key + (2 * k + 1) * kGamma);
  const uint64_t b = Mix(key + (2 * k + 2) * kGamma);
  const double u1 = static_cast<double>((a >> 11) + 1) * 0x1.0p-53;  // (0, 1]
  const double u2 = static_cast<double>(b >> 11) * 0x1.0p-53;        // [0, 1)
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

absl::Status Invalid(const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("model: ", what));
}

}  // namespace

GptModel::GptModel(const proto::ModelConfig& config, int max_micro_batch, int seq_len,
                   kernels::cpu::CpuContext ctx)
    : config_(config),
      max_b_(max_micro_batch),
      seq_len_(seq_len),
      ctx_(ctx),
      L_(config.num_layers()),
      C_(config.channels()),
      NH_(config.num_heads()),
      V_(config.vocab_size()),
      Vp_(config.padded_vocab()),
      maxT_(config.max_seq_len()) {}

absl::StatusOr<std::unique_ptr<GptModel>> GptModel::Create(const proto::ModelConfig& config,
                                                           int max_micro_batch, int seq_len,
                                                           kernels::cpu::CpuContext ctx) {
  if (config.num_layers() < 1) return Invalid("num_layers must be at least 1");
  if (config.channels() < 1) return Invalid("channels must be at least 1");
  if (config.num_heads() < 1 || config.channels() % config.num_heads() != 0) {
    return Invalid(absl::StrCat("num_heads ", config.num_heads(), " must divide channels ",
                                config.channels()));
  }
  if (config.vocab_size() < 1) return Invalid("vocab_size must be at least 1");
  if (config.padded_vocab() < config.vocab_size()) {
    return Invalid(absl::StrCat("padded_vocab ", config.padded_vocab(), " is below vocab_size ",
                                config.vocab_size()));
  }
  if (config.max_seq_len() < 1) return Invalid("max_seq_len must be at least 1");
  if (seq_len < 1 || seq_len > config.max_seq_len()) {
    return Invalid(absl::StrCat("seq_len ", seq_len, " must be in [1, ", config.max_seq_len(),
                                "] (the model's context)"));
  }
  if (max_micro_batch < 1) return Invalid("max_micro_batch must be at least 1");
  if (ctx.threads < 1) return Invalid("threads must be at least 1");
  const int64_t expected = common::CountParameters(config);
  if (config.num_parameters() != 0 && config.num_parameters() != expected) {
    return Invalid(absl::StrCat("num_parameters ", config.num_parameters(),
                                " does not match the shape (", expected, ")"));
  }
  // Kernels index rows with int: keep every [N, width] product addressable.
  const int64_t rows = int64_t{max_micro_batch} * seq_len;
  if (rows * std::max<int64_t>(4 * config.channels(), config.padded_vocab()) > (int64_t{1} << 31)) {
    return Invalid("max_micro_batch x seq_len is too large for one micro-batch");
  }
  std::unique_ptr<GptModel> model(new GptModel(config, max_micro_batch, seq_len, ctx));
  absl::Status status = model->Allocate();
  if (!status.ok()) return status;
  SPOTRAIN_CHECK(model->num_parameters_ == expected);
  return model;
}

absl::Status GptModel::Allocate() {
  const int64_t L = L_, C = C_;
  // name, floats, decayed
  const std::pair<const char*, std::pair<int64_t, bool>> layout[] = {
      {"wte", {int64_t{Vp_} * C, true}},
      {"wpe", {int64_t{maxT_} * C, false}},
      {"ln1w", {L * C, false}},
      {"ln1b", {L * C, false}},
      {"qkvw", {L * 3 * C * C, true}},
      {"qkvb", {L * 3 * C, false}},
      {"attprojw", {L * C * C, true}},
      {"attprojb", {L * C, false}},
      {"ln2w", {L * C, false}},
      {"ln2b", {L * C, false}},
      {"fcw", {L * 4 * C * C, true}},
      {"fcb", {L * 4 * C, false}},
      {"fcprojw", {L * C * 4 * C, true}},
      {"fcprojb", {L * C, false}},
      {"lnfw", {C, false}},
      {"lnfb", {C, false}},
  };
  int64_t offset = 0;
  for (const auto& [name, spec] : layout) {
    tensors_.push_back(TensorInfo{name, offset, spec.first, spec.second});
    offset += spec.first;
  }
  num_parameters_ = offset;

  const int64_t T = seq_len_, N = int64_t{max_b_} * T, NH = NH_, Vp = Vp_;
  const int64_t att = int64_t{max_b_} * NH * T * T;
  std::pair<float**, int64_t> buffers[] = {
      {&acts_.encoded, N * C},
      {&acts_.ln1, L * N * C},
      {&acts_.ln1_mean, L * N},
      {&acts_.ln1_rstd, L * N},
      {&acts_.qkv, L * N * 3 * C},
      {&acts_.atty, L * N * C},
      {&acts_.att, L * att},
      {&acts_.residual2, L * N * C},
      {&acts_.ln2, L * N * C},
      {&acts_.ln2_mean, L * N},
      {&acts_.ln2_rstd, L * N},
      {&acts_.fch, L * N * 4 * C},
      {&acts_.fch_gelu, L * N * 4 * C},
      {&acts_.residual3, L * N * C},
      {&acts_.lnf, N * C},
      {&acts_.lnf_mean, N},
      {&acts_.lnf_rstd, N},
      {&acts_.proj, N * C},
      {&acts_.logits, N * Vp},
      {&acts_.probs, N * Vp},
      {&acts_.losses, N},
      {&acts_.dresidual, N * C},
      {&acts_.dln, N * C},
      {&acts_.datty, N * C},
      {&acts_.dqkv, N * 3 * C},
      {&acts_.datt, att},
      {&acts_.dfch_gelu, N * 4 * C},
      {&acts_.dfch, N * 4 * C},
  };
  int64_t total = 0;
  // Each buffer starts on a 64-byte boundary relative to the block.
  for (const auto& b : buffers) total += (b.second + 15) / 16 * 16;
  try {
    params_.assign(num_parameters_, 0.0f);
    grads_.assign(num_parameters_, 0.0f);
    decay_mask_.assign(num_parameters_, 0);
    activation_memory_.assign(total, 0.0f);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat("model: cannot allocate ", (3 * num_parameters_ + total) * 4 >> 20,
                     " MiB for parameters, gradients and activations; lower micro_batch"));
  }
  for (const TensorInfo& t : tensors_) {
    if (t.decay) std::memset(decay_mask_.data() + t.offset, 1, t.size);
  }
  float* base = activation_memory_.data();
  for (auto& b : buffers) {
    *b.first = base;
    base += (b.second + 15) / 16 * 16;
  }
  return absl::OkStatus();
}

GptModel::Tensors GptModel::TensorsOf(float* base) const {
  float* p[16];
  for (int i = 0; i < 16; ++i) p[i] = base + tensors_[i].offset;
  return Tensors{p[0], p[1], p[2],  p[3],  p[4],  p[5],  p[6],  p[7],
                 p[8], p[9], p[10], p[11], p[12], p[13], p[14], p[15]};
}

void GptModel::InitParameters(uint64_t seed) {
  const uint64_t key = Mix(seed + kGamma);
  const double residual_std = 0.02 / std::sqrt(2.0 * L_);
  for (const TensorInfo& t : tensors_) {
    float* p = params_.data() + t.offset;
    const std::string& n = t.name;
    if (n == "ln1w" || n == "ln2w" || n == "lnfw") {
      std::fill(p, p + t.size, 1.0f);
    } else if (!t.decay && n != "wpe") {  // biases
      std::fill(p, p + t.size, 0.0f);
    } else {
      const double stddev = (n == "attprojw" || n == "fcprojw") ? residual_std : 0.02;
      // Padded vocabulary rows of wte stay zero: no token ever selects them and their
      // logits are masked, so they never receive a gradient.
      const int64_t live = n == "wte" ? int64_t{V_} * C_ : t.size;
      for (int64_t i = 0; i < t.size; ++i) {
        p[i] = i < live ? static_cast<float>(stddev * NormalAt(key, t.offset + i)) : 0.0f;
      }
    }
  }
}

void GptModel::ZeroGrads() { std::memset(grads_.data(), 0, sizeof(float) * grads_.size()); }

void GptModel::CheckTokens(const int32_t* inputs, const int32_t* targets, int B) const {
  SPOTRAIN_CHECK(B >= 1 && B <= max_b_);
  const int64_t n = int64_t{B} * seq_len_;
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    ok &= inputs[i] >= 0 && inputs[i] < V_ && targets[i] >= 0 && targets[i] < V_;
  }
  SPOTRAIN_CHECK(ok && "token id outside [0, vocab_size)");
}

float GptModel::Forward(const int32_t* inputs, const int32_t* targets, int B) {
  CheckTokens(inputs, targets, B);
  return RunForward(inputs, targets, B);
}

float GptModel::ForwardBackward(const int32_t* inputs, const int32_t* targets, int B,
                                float grad_scale) {
  CheckTokens(inputs, targets, B);
  const float loss = RunForward(inputs, targets, B);
  RunBackward(inputs, targets, B, grad_scale);
  return loss;
}

float GptModel::RunForward(const int32_t* inputs, const int32_t* targets, int B) {
  const int T = seq_len_, C = C_, NH = NH_, N = B * T;
  // Per-layer strides are those of the largest micro-batch.
  const int64_t NC = int64_t{max_b_} * T * C, Nmax = int64_t{max_b_} * T;
  const int64_t att_stride = int64_t{max_b_} * NH * T * T;
  const Tensors p = TensorsOf(params_.data());
  const Activations& a = acts_;

  ops::EncoderForward(ctx_, a.encoded, inputs, p.wte, p.wpe, B, T, C);
  for (int l = 0; l < L_; ++l) {
    const float* residual = l == 0 ? a.encoded : a.residual3 + (l - 1) * NC;
    float* ln1 = a.ln1 + l * NC;
    float* ln1_mean = a.ln1_mean + l * Nmax;
    float* ln1_rstd = a.ln1_rstd + l * Nmax;
    float* qkv = a.qkv + l * 3 * NC;
    float* atty = a.atty + l * NC;
    float* att = a.att + l * att_stride;
    float* residual2 = a.residual2 + l * NC;
    float* ln2 = a.ln2 + l * NC;
    float* ln2_mean = a.ln2_mean + l * Nmax;
    float* ln2_rstd = a.ln2_rstd + l * Nmax;
    float* fch = a.fch + l * 4 * NC;
    float* fch_gelu = a.fch_gelu + l * 4 * NC;
    float* residual3 = a.residual3 + l * NC;

    ops::LayerNormForward(ctx_, ln1, ln1_mean, ln1_rstd, residual, p.ln1w + l * C, p.ln1b + l * C,
                          N, C);
    ops::MatmulForward(ctx_, qkv, ln1, p.qkvw + int64_t{l} * 3 * C * C, p.qkvb + l * 3 * C, N, C,
                       3 * C);
    ops::AttentionForward(ctx_, atty, att, qkv, B, T, C, NH);
    ops::MatmulForward(ctx_, a.proj, atty, p.attprojw + int64_t{l} * C * C, p.attprojb + l * C, N,
                       C, C);
    ops::ResidualForward(ctx_, residual2, residual, a.proj, int64_t{N} * C);
    ops::LayerNormForward(ctx_, ln2, ln2_mean, ln2_rstd, residual2, p.ln2w + l * C, p.ln2b + l * C,
                          N, C);
    ops::MatmulForward(ctx_, fch, ln2, p.fcw + int64_t{l} * 4 * C * C, p.fcb + l * 4 * C, N, C,
                       4 * C);
    ops::GeluForward(ctx_, fch_gelu, fch, int64_t{N} * 4 * C);
    ops::MatmulForward(ctx_, a.proj, fch_gelu, p.fcprojw + int64_t{l} * C * 4 * C,
                       p.fcprojb + l * C, N, 4 * C, C);
    ops::ResidualForward(ctx_, residual3, residual2, a.proj, int64_t{N} * C);
  }
  const float* last = a.residual3 + (L_ - 1) * NC;
  ops::LayerNormForward(ctx_, a.lnf, a.lnf_mean, a.lnf_rstd, last, p.lnfw, p.lnfb, N, C);
  ops::MatmulForward(ctx_, a.logits, a.lnf, p.wte, nullptr, N, C, Vp_);
  ops::SoftmaxCrossEntropyForward(ctx_, a.probs, a.losses, a.logits, targets, N, V_, Vp_);
  double sum = 0.0;
  for (int i = 0; i < N; ++i) sum += a.losses[i];
  return static_cast<float>(sum / N);
}

void GptModel::RunBackward(const int32_t* inputs, const int32_t* targets, int B, float grad_scale) {
  const int T = seq_len_, C = C_, NH = NH_, N = B * T;
  const int64_t NC = int64_t{max_b_} * T * C, Nmax = int64_t{max_b_} * T;
  const int64_t att_stride = int64_t{max_b_} * NH * T * T;
  const Tensors p = TensorsOf(params_.data());
  const Tensors g = TensorsOf(grads_.data());
  const Activations& a = acts_;
  auto zero = [](float* x, int64_t n) { std::memset(x, 0, sizeof(float) * n); };

  // The loss is the mean over N tokens, scaled by grad_scale. dlogits reuses logits.
  float* dlogits = a.logits;
  ops::SoftmaxCrossEntropyBackward(ctx_, dlogits, a.probs, targets, grad_scale / N, N, V_, Vp_);
  zero(a.dln, int64_t{N} * C);
  ops::MatmulBackward(ctx_, a.dln, g.wte, nullptr, dlogits, a.lnf, p.wte, N, C, Vp_);
  // dresidual carries the gradient of the residual stream down the layers; LayerNorm
  // backward and the projections' residual branches add into it.
  zero(a.dresidual, int64_t{N} * C);
  const float* last = a.residual3 + (L_ - 1) * NC;
  ops::LayerNormBackward(ctx_, a.dresidual, g.lnfw, g.lnfb, a.dln, last, p.lnfw, a.lnf_mean,
                         a.lnf_rstd, N, C);

  for (int l = L_ - 1; l >= 0; --l) {
    const float* residual = l == 0 ? a.encoded : a.residual3 + (l - 1) * NC;
    const float* ln1 = a.ln1 + l * NC;
    const float* ln1_mean = a.ln1_mean + l * Nmax;
    const float* ln1_rstd = a.ln1_rstd + l * Nmax;
    const float* qkv = a.qkv + l * 3 * NC;
    const float* atty = a.atty + l * NC;
    const float* att = a.att + l * att_stride;
    const float* residual2 = a.residual2 + l * NC;
    const float* ln2 = a.ln2 + l * NC;
    const float* ln2_mean = a.ln2_mean + l * Nmax;
    const float* ln2_rstd = a.ln2_rstd + l * Nmax;
    const float* fch = a.fch + l * 4 * NC;
    const float* fch_gelu = a.fch_gelu + l * 4 * NC;

    // residual3 = residual2 + fcproj(gelu(fc(ln2(residual2)))): the residual add passes
    // dresidual through unchanged to both branches.
    zero(a.dfch_gelu, int64_t{N} * 4 * C);
    ops::MatmulBackward(ctx_, a.dfch_gelu, g.fcprojw + int64_t{l} * C * 4 * C, g.fcprojb + l * C,
                        a.dresidual, fch_gelu, p.fcprojw + int64_t{l} * C * 4 * C, N, 4 * C, C);
    zero(a.dfch, int64_t{N} * 4 * C);
    ops::GeluBackward(ctx_, a.dfch, fch, a.dfch_gelu, int64_t{N} * 4 * C);
    zero(a.dln, int64_t{N} * C);
    ops::MatmulBackward(ctx_, a.dln, g.fcw + int64_t{l} * 4 * C * C, g.fcb + l * 4 * C, a.dfch, ln2,
                        p.fcw + int64_t{l} * 4 * C * C, N, C, 4 * C);
    ops::LayerNormBackward(ctx_, a.dresidual, g.ln2w + l * C, g.ln2b + l * C, a.dln, residual2,
                           p.ln2w + l * C, ln2_mean, ln2_rstd, N, C);
    // residual2 = residual + attproj(attention(qkv(ln1(residual)))).
    zero(a.datty, int64_t{N} * C);
    ops::MatmulBackward(ctx_, a.datty, g.attprojw + int64_t{l} * C * C, g.attprojb + l * C,
                        a.dresidual, atty, p.attprojw + int64_t{l} * C * C, N, C, C);
    zero(a.dqkv, int64_t{N} * 3 * C);
    ops::AttentionBackward(ctx_, a.dqkv, a.datt, a.datty, qkv, att, B, T, C, NH);
    zero(a.dln, int64_t{N} * C);
    ops::MatmulBackward(ctx_, a.dln, g.qkvw + int64_t{l} * 3 * C * C, g.qkvb + l * 3 * C, a.dqkv,
                        ln1, p.qkvw + int64_t{l} * 3 * C * C, N, C, 3 * C);
    ops::LayerNormBackward(ctx_, a.dresidual, g.ln1w + l * C, g.ln1b + l * C, a.dln, residual,
                           p.ln1w + l * C, ln1_mean, ln1_rstd, N, C);
  }
  ops::EncoderBackward(ctx_, g.wte, g.wpe, a.dresidual, inputs, B, T, C);
}

}  // namespace spotrain::worker
