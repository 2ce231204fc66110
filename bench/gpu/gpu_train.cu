// spotrain-gpu-train: single-GPU training throughput of the CUDA GPT model
// (worker/cuda_model.h). Each timed step is what a one-worker trainer does: zero the
// gradients, forward and backward of one micro-batch, the global gradient norm, clipping and
// one AdamW step, then a stream synchronisation. Tokens are uniformly random (no dataset
// needed); the model starts from a GPT-2 style random initialisation. Prints one line per
// configuration and a table last; --json writes the results.
//
// MFU uses llm.c's count of training FLOPs per token, 6 N + 6 L C T (N parameters including
// the padded embedding, L layers, C channels, T sequence length), against the peak of the
// precision's arithmetic: fp32 -> the non-tensor fp32 peak, tf32 -> the dense TF32 tensor
// peak, bf16 -> the dense bf16 tensor peak (H100 SXM: 67, 495, 989 TFLOP/s). The attention
// here materialises full T x T products (twice the causal FLOPs), which the count ignores,
// as llm.c's does.
//
// Every configuration also prints its loss after each step (warm-up included), so that a
// run that diverges shows where.
//
// --compare-bf16 S (a diagnosis of bf16 training, no timing): an fp32 and a bf16 model side
// by side on the same shape and batches. For each of S steps the bf16 model gets the fp32
// model's current parameters, both compute the gradient of the same micro-batch, and the
// relative L2 difference and cosine of every gradient tensor are printed; then only the
// fp32 model takes its AdamW step (so both gradients are always taken at the same point).
// A bf16 gradient that is wrong at this shape shows at step 0; one that goes wrong as the
// weights move shows later. Needs memory for both models (about 46 GiB for 16 x 1024).
//
// Usage: spotrain-gpu-train [--model gpt2-124m] [--batch 16] [--seq 1024] [--steps 20]
//          [--warmup 3] [--precision fp32,tf32,bf16] [--deterministic] [--device 0]
//          [--peak-fp32 T] [--peak-tf32 T] [--peak-bf16 T] [--json FILE]
//          [--compare-bf16 S]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/model_presets.h"
#include "common/status_macros.h"
#include "kernels/cuda/context.h"
#include "worker/cuda_model.h"

namespace {

using spotrain::worker::CudaGptModel;
using spotrain::worker::CudaModelOptions;
using spotrain::worker::CudaPrecision;

struct Flags {
  std::string model = "gpt2-124m";
  int batch = 16;
  int seq = 0;  // 0: the model's context
  int steps = 20;
  int warmup = 3;
  std::string precisions = "fp32,tf32,bf16";
  bool deterministic = false;
  int device = 0;
  double peak_fp32 = 0, peak_tf32 = 0, peak_bf16 = 0;  // TFLOP/s; 0: from the device name
  std::string json;
  int compare_bf16 = 0;  // > 0: the --compare-bf16 diagnosis instead of the benchmark
};

void Usage() {
  std::fprintf(stderr,
               "usage: spotrain-gpu-train [--model gpt2-124m|gpt-small|gpt-tiny] [--batch B] "
               "[--seq T] [--steps S] [--warmup W] [--precision fp32,tf32,bf16] "
               "[--deterministic] [--device D] [--peak-fp32 TFLOPS] [--peak-tf32 TFLOPS] "
               "[--peak-bf16 TFLOPS] [--json FILE] [--compare-bf16 STEPS]\n");
}

bool ParseFlags(int argc, char** argv, Flags* f) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](const char* name) -> const char* {
      if (arg != name) return nullptr;
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", name);
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--help" || arg == "-h") {
      Usage();
      std::exit(0);
    } else if (arg == "--deterministic") {
      f->deterministic = true;
    } else if (const char* v = value("--model")) {
      f->model = v;
    } else if (const char* v = value("--batch")) {
      f->batch = std::atoi(v);
    } else if (const char* v = value("--seq")) {
      f->seq = std::atoi(v);
    } else if (const char* v = value("--steps")) {
      f->steps = std::atoi(v);
    } else if (const char* v = value("--warmup")) {
      f->warmup = std::atoi(v);
    } else if (const char* v = value("--precision")) {
      f->precisions = v;
    } else if (const char* v = value("--device")) {
      f->device = std::atoi(v);
    } else if (const char* v = value("--peak-fp32")) {
      f->peak_fp32 = std::atof(v);
    } else if (const char* v = value("--peak-tf32")) {
      f->peak_tf32 = std::atof(v);
    } else if (const char* v = value("--peak-bf16")) {
      f->peak_bf16 = std::atof(v);
    } else if (const char* v = value("--json")) {
      f->json = v;
    } else if (const char* v = value("--compare-bf16")) {
      f->compare_bf16 = std::atoi(v);
    } else {
      std::fprintf(stderr, "unknown argument %s\n", arg.c_str());
      Usage();
      return false;
    }
  }
  if (f->batch < 1 || f->steps < 1 || f->warmup < 0 || f->seq < 0) {
    std::fprintf(stderr, "--batch and --steps must be >= 1, --warmup and --seq >= 0\n");
    return false;
  }
  return true;
}

// Dense peaks in TFLOP/s of the GPUs we know, by name (NVIDIA datasheets).
void DefaultPeaks(const std::string& name, Flags* f) {
  double fp32 = 0, tf32 = 0, bf16 = 0;
  if (name.find("H100") != std::string::npos && name.find("PCIe") != std::string::npos) {
    fp32 = 51, tf32 = 378, bf16 = 756;
  } else if (name.find("H100") != std::string::npos || name.find("H200") != std::string::npos) {
    fp32 = 67, tf32 = 495, bf16 = 989;  // SXM
  } else if (name.find("A100") != std::string::npos) {
    fp32 = 19.5, tf32 = 156, bf16 = 312;
  }
  if (f->peak_fp32 == 0) f->peak_fp32 = fp32;
  if (f->peak_tf32 == 0) f->peak_tf32 = tf32;
  if (f->peak_bf16 == 0) f->peak_bf16 = bf16;
}

// GPT-2 style initialisation: N(0, 0.02) matrices and embeddings, residual projections
// N(0, 0.02 / sqrt(2 L)), LayerNorm weights 1, biases 0, padded vocabulary rows 0.
std::vector<float> InitParams(const CudaGptModel& model, const spotrain::proto::ModelConfig& c) {
  std::vector<float> p(static_cast<size_t>(model.num_parameters()), 0.0f);
  std::mt19937_64 rng(1337);
  for (const CudaGptModel::TensorInfo& t : model.tensors()) {
    float* x = p.data() + t.offset;
    const std::string& n = t.name;
    if (n == "ln1w" || n == "ln2w" || n == "lnfw") {
      std::fill(x, x + t.size, 1.0f);
      continue;
    }
    if (n.back() == 'b') continue;  // biases (and LayerNorm biases) stay 0
    const double stddev =
        (n == "attprojw" || n == "fcprojw") ? 0.02 / std::sqrt(2.0 * c.num_layers()) : 0.02;
    std::normal_distribution<float> dist(0.0f, static_cast<float>(stddev));
    int64_t live = t.size;
    if (n == "wte") live = static_cast<int64_t>(c.vocab_size()) * c.channels();
    for (int64_t i = 0; i < live; ++i) x[i] = dist(rng);
  }
  return p;
}

std::string JsonEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      out += ' ';
      continue;
    }
    out += c;
  }
  return out;
}

struct Result {
  std::string precision;
  bool ok = false;
  std::string error;
  double ms_mean = 0, ms_median = 0, ms_min = 0;
  double tokens_per_s = 0;
  double tflops = 0;  // achieved, by the 6N + 6LCT count
  double peak = 0;    // TFLOP/s used for MFU (0: unknown)
  double mfu = 0;     // fraction
  float first_loss = 0, last_loss = 0;
  std::vector<float> losses;  // every step's loss, warm-up included
  double device_gib = 0;
};

// A few distinct random batches, cycled: step s reads batches[s % kBatches] and predicts
// batches[s % kBatches + 1].
constexpr int kBatches = 4;
std::vector<std::vector<int32_t>> RandomBatches(int64_t n, int vocab_size) {
  std::vector<std::vector<int32_t>> tokens(kBatches + 1, std::vector<int32_t>(n));
  std::mt19937_64 rng(42);
  std::uniform_int_distribution<int32_t> dist(0, vocab_size - 1);
  for (auto& b : tokens) {
    for (int32_t& x : b) x = dist(rng);
  }
  return tokens;
}

// The clip factor for a global gradient norm (clip at 1, as the trainer does).
float ClipFactor(double sum_sq) {
  const double norm = std::sqrt(sum_sq);
  return norm > 1.0 ? static_cast<float>(1.0 / (norm + 1e-6)) : 1.0f;
}

std::string LossList(const std::vector<float>& losses) {
  std::string out;
  for (size_t i = 0; i < losses.size(); ++i) {
    absl::StrAppendFormat(&out, "%s%.3f", i ? " " : "", losses[i]);
  }
  return out;
}

Result RunOne(const Flags& f, const spotrain::proto::ModelConfig& config, int T,
              const std::string& precision) {
  Result r;
  r.precision = precision;
  CudaModelOptions options;
  options.device = f.device;
  options.deterministic = f.deterministic;
  if (precision == "bf16") {
    options.precision = CudaPrecision::kBf16;
    r.peak = f.peak_bf16;
  } else if (precision == "tf32") {
    options.allow_tf32 = true;
    r.peak = f.deterministic ? f.peak_fp32 : f.peak_tf32;  // deterministic mode forbids TF32
  } else if (precision == "fp32") {
    r.peak = f.peak_fp32;
  } else {
    r.error = "unknown precision " + precision;
    return r;
  }
  auto created = CudaGptModel::Create(config, f.batch, T, options);
  if (!created.ok()) {
    r.error = std::string(created.status().message());
    return r;
  }
  CudaGptModel& model = **created;
  r.device_gib = model.device_bytes() / 1073741824.0;
  const std::vector<float> init = InitParams(model, config);
  if (auto s = model.CopyParamsFromHost(init.data()); !s.ok()) {
    r.error = std::string(s.message());
    return r;
  }
  const int64_t n = static_cast<int64_t>(f.batch) * T;
  const std::vector<std::vector<int32_t>> tokens = RandomBatches(n, config.vocab_size());

  std::vector<double> times_ms;
  const int total = f.warmup + f.steps;
  for (int step = 0; step < total; ++step) {
    const auto& inputs = tokens[step % kBatches];
    const auto& targets = tokens[step % kBatches + 1];
    float loss = 0;
    const auto t0 = std::chrono::steady_clock::now();
    const absl::Status s = [&]() -> absl::Status {
      RETURN_IF_ERROR(model.ZeroGrads());
      ASSIGN_OR_RETURN(loss, model.ForwardBackward(inputs.data(), targets.data(), f.batch, 1.0f));
      ASSIGN_OR_RETURN(const double sum_sq, model.GradSumOfSquares());
      const float clip = ClipFactor(sum_sq);
      RETURN_IF_ERROR(model.AdamWStep({6e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, clip, step + 1}));
      return model.Synchronize();
    }();
    const auto t1 = std::chrono::steady_clock::now();
    if (!s.ok()) {
      r.error = absl::StrFormat("step %d: %s", step, s.message());
      return r;
    }
    if (!std::isfinite(loss)) {
      r.error = absl::StrFormat("step %d: non-finite loss", step);
      return r;
    }
    if (step == 0) r.first_loss = loss;
    r.last_loss = loss;
    r.losses.push_back(loss);
    if (step >= f.warmup) {
      times_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
  }
  std::vector<double> sorted = times_ms;
  std::sort(sorted.begin(), sorted.end());
  double sum = 0;
  for (double t : times_ms) sum += t;
  r.ms_mean = sum / times_ms.size();
  r.ms_median = sorted[sorted.size() / 2];
  r.ms_min = sorted.front();
  r.tokens_per_s = n / (r.ms_mean / 1000.0);
  const double flops_per_token =
      6.0 * static_cast<double>(model.num_parameters()) +
      6.0 * config.num_layers() * static_cast<double>(config.channels()) * T;
  r.tflops = flops_per_token * r.tokens_per_s / 1e12;
  r.mfu = r.peak > 0 ? r.tflops / r.peak : 0;
  r.ok = true;
  return r;
}

// --compare-bf16: see the header comment. Returns the process exit code.
int CompareBf16(const Flags& f, const spotrain::proto::ModelConfig& config, int T) {
  CudaModelOptions options;
  options.device = f.device;
  options.deterministic = f.deterministic;
  auto fail = [](const std::string& what, const absl::Status& s) {
    std::printf("compare-bf16 FAILED: %s: %s\n", what.c_str(), std::string(s.message()).c_str());
    return 1;
  };
  auto fp32_or = CudaGptModel::Create(config, f.batch, T, options);
  if (!fp32_or.ok()) return fail("fp32 model", fp32_or.status());
  options.precision = CudaPrecision::kBf16;
  auto bf16_or = CudaGptModel::Create(config, f.batch, T, options);
  if (!bf16_or.ok()) return fail("bf16 model", bf16_or.status());
  CudaGptModel& fp32 = **fp32_or;
  CudaGptModel& bf16 = **bf16_or;
  std::vector<float> params = InitParams(fp32, config);
  if (auto s = fp32.CopyParamsFromHost(params.data()); !s.ok()) return fail("init", s);
  const int64_t n = static_cast<int64_t>(f.batch) * T;
  const std::vector<std::vector<int32_t>> tokens = RandomBatches(n, config.vocab_size());
  std::vector<float> g32(static_cast<size_t>(fp32.num_parameters()));
  std::vector<float> g16(g32.size());
  std::printf(
      "compare-bf16: %d steps, batch %d x %d, %s mode; gradients of the same parameters "
      "and batch, bf16 vs fp32\n",
      f.compare_bf16, f.batch, T, f.deterministic ? "deterministic" : "fast");
  int worst_step = -1;
  double worst_rel = 0;
  for (int step = 0; step < f.compare_bf16; ++step) {
    const auto& inputs = tokens[step % kBatches];
    const auto& targets = tokens[step % kBatches + 1];
    if (auto s = fp32.CopyParamsToHost(params.data()); !s.ok()) return fail("params", s);
    if (auto s = bf16.CopyParamsFromHost(params.data()); !s.ok()) return fail("params", s);
    float loss32 = 0, loss16 = 0;
    double sq32 = 0, sq16 = 0;
    const absl::Status s = [&]() -> absl::Status {
      RETURN_IF_ERROR(fp32.ZeroGrads());
      ASSIGN_OR_RETURN(loss32, fp32.ForwardBackward(inputs.data(), targets.data(), f.batch, 1.0f));
      ASSIGN_OR_RETURN(sq32, fp32.GradSumOfSquares());
      RETURN_IF_ERROR(fp32.CopyGradsToHost(g32.data()));
      RETURN_IF_ERROR(bf16.ZeroGrads());
      ASSIGN_OR_RETURN(loss16, bf16.ForwardBackward(inputs.data(), targets.data(), f.batch, 1.0f));
      ASSIGN_OR_RETURN(sq16, bf16.GradSumOfSquares());
      return bf16.CopyGradsToHost(g16.data());
    }();
    if (!s.ok()) return fail(absl::StrFormat("step %d", step), s);
    std::printf("step %d: loss fp32 %.4f bf16 %.4f; grad norm fp32 %.4e bf16 %.4e\n", step, loss32,
                loss16, std::sqrt(sq32), std::sqrt(sq16));
    for (const CudaGptModel::TensorInfo& t : fp32.tensors()) {
      double diff = 0, n32 = 0, n16 = 0, dot = 0;
      for (int64_t i = t.offset; i < t.offset + t.size; ++i) {
        const double a = g32[i], b = g16[i];
        diff += (a - b) * (a - b);
        n32 += a * a;
        n16 += b * b;
        dot += a * b;
      }
      const double rel = n32 > 0 ? std::sqrt(diff / n32) : std::sqrt(diff);
      const double cosine = n32 > 0 && n16 > 0 ? dot / std::sqrt(n32 * n16) : 0.0;
      std::printf("  %-9s relative L2 %.2e  cosine %.6f  norm fp32 %.3e bf16 %.3e%s\n",
                  t.name.c_str(), rel, cosine, std::sqrt(n32), std::sqrt(n16),
                  rel > 0.05 ? "  <-- off" : "");
      if (rel > worst_rel) {
        worst_rel = rel;
        worst_step = step;
      }
    }
    std::fflush(stdout);
    if (auto st = fp32.AdamWStep({6e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, ClipFactor(sq32), step + 1});
        !st.ok()) {
      return fail("AdamW", st);
    }
  }
  std::printf("compare-bf16 done: worst tensor relative L2 %.2e (step %d)%s\n", worst_rel,
              worst_step, worst_rel > 0.05 ? ": bf16 gradients are OFF at this shape" : "");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Flags f;
  if (!ParseFlags(argc, argv, &f)) return 2;
  auto count = spotrain::kernels::cuda::CudaDeviceCount();
  if (!count.ok() || *count == 0) {
    std::fprintf(
        stderr, "spotrain-gpu-train: no usable GPU: %s\n",
        count.ok() ? "no CUDA device visible" : std::string(count.status().message()).c_str());
    return 1;
  }
  auto desc = spotrain::kernels::cuda::CudaDeviceDescription(f.device);
  if (!desc.ok()) {
    std::fprintf(stderr, "spotrain-gpu-train: %s\n", std::string(desc.status().message()).c_str());
    return 1;
  }
  DefaultPeaks(*desc, &f);
  auto config = spotrain::common::ModelConfigForPreset(f.model);
  if (!config.ok()) {
    std::fprintf(stderr, "spotrain-gpu-train: %s\n",
                 std::string(config.status().message()).c_str());
    return 2;
  }
  const int T = f.seq > 0 ? f.seq : config->max_seq_len();
  if (f.compare_bf16 > 0) {
    std::printf("device: %s\nmodel: %s, batch %d x %d tokens, random tokens\n", desc->c_str(),
                f.model.c_str(), f.batch, T);
    return CompareBf16(f, *config, T);
  }
  std::printf("device: %s\n", desc->c_str());
  std::printf(
      "model: %s (%lld params incl. padded vocab), batch %d x %d tokens, %d timed steps "
      "after %d warm-up, random tokens, %s mode\n",
      f.model.c_str(), static_cast<long long>(spotrain::common::CountParameters(*config)), f.batch,
      T, f.steps, f.warmup, f.deterministic ? "deterministic" : "fast");
  std::printf(
      "peaks used for MFU (TFLOP/s, dense): fp32 %.1f (non-tensor), tf32 %.1f, bf16 %.1f%s\n",
      f.peak_fp32, f.peak_tf32, f.peak_bf16,
      f.peak_bf16 == 0 ? " (unknown GPU: pass --peak-*)" : "");
  std::fflush(stdout);

  std::vector<Result> results;
  const std::vector<std::string> precisions = absl::StrSplit(f.precisions, ',', absl::SkipEmpty());
  for (const std::string& p : precisions) {
    Result r = RunOne(f, *config, T, p);
    if (r.ok) {
      std::printf(
          "%-5s ok: %.1f ms/step (median %.1f, min %.1f), %.0f tokens/s, %.1f TFLOP/s, "
          "MFU %.1f%%, loss %.3f -> %.3f, %.1f GiB\n",
          p.c_str(), r.ms_mean, r.ms_median, r.ms_min, r.tokens_per_s, r.tflops, 100 * r.mfu,
          r.first_loss, r.last_loss, r.device_gib);
    } else {
      std::printf("%-5s FAILED: %s\n", p.c_str(), r.error.c_str());
    }
    if (!r.losses.empty()) std::printf("%-5s losses: %s\n", p.c_str(), LossList(r.losses).c_str());
    std::fflush(stdout);
    results.push_back(r);
  }

  std::printf(
      "\n| precision | ms/step | tokens/s | TFLOP/s | peak TFLOP/s | MFU | loss first -> last |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  bool all_ok = true;
  for (const Result& r : results) {
    if (!r.ok) {
      all_ok = false;
      std::printf("| %s | failed: %s | | | | | |\n", r.precision.c_str(), r.error.c_str());
      continue;
    }
    std::printf("| %s | %.1f | %.0f | %.1f | %.0f | %s | %.3f -> %.3f |\n", r.precision.c_str(),
                r.ms_mean, r.tokens_per_s, r.tflops, r.peak,
                r.peak > 0 ? absl::StrFormat("%.1f%%", 100 * r.mfu).c_str() : "n/a", r.first_loss,
                r.last_loss);
  }
  if (!f.json.empty()) {
    std::ofstream out(f.json);
    out << "{\"device\": \"" << JsonEscape(*desc) << "\", \"model\": \"" << f.model
        << "\", \"batch\": " << f.batch << ", \"seq\": " << T << ", \"steps\": " << f.steps
        << ", \"deterministic\": " << (f.deterministic ? "true" : "false")
        << ", \"tokens\": \"uniform random\", \"results\": [";
    for (size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      out << (i ? ", " : "")
          << absl::StrFormat(
                 "{\"precision\": \"%s\", \"ok\": %s, \"error\": \"%s\", \"ms_per_step\": %.3f, "
                 "\"ms_median\": %.3f, \"tokens_per_s\": %.1f, \"tflops\": %.2f, "
                 "\"peak_tflops\": %.1f, \"mfu\": %.4f, \"first_loss\": %.4f, "
                 "\"last_loss\": %.4f, \"device_gib\": %.2f, \"losses\": [%s]}",
                 r.precision, r.ok ? "true" : "false", JsonEscape(r.error), r.ms_mean, r.ms_median,
                 r.tokens_per_s, r.tflops, r.peak, r.mfu, r.first_loss, r.last_loss, r.device_gib,
                 absl::StrJoin(r.losses, ", ", [](std::string* out, float x) {
                   absl::StrAppendFormat(out, "%.4f", x);
                 }));
    }
    out << "]}\n";
  }
  return all_ok ? 0 : 1;
}
