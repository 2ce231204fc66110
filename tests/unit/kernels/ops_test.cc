// Tests of the CPU kernels (kernels/cpu/ops.h): every forward against a double-precision
// reference, every backward against central finite differences of that reference (so the
// float kernels are checked against exact derivatives), AdamW against a hand-written step,
// and bit-identical results for any thread count outside BLAS. Inputs are random, never
// zero; gradient buffers start from random values to check that kernels accumulate.
#include "kernels/cpu/ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"

namespace spotrain::kernels::cpu {
namespace {

// Uniform random floats in [lo, hi), never exactly zero.
inline std::vector<float> RandomFloats(std::mt19937_64& rng, size_t n, float lo = -1.0f,
                                       float hi = 1.0f) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) {
    do {
      x = dist(rng);
    } while (x == 0.0f);
  }
  return v;
}

inline std::vector<int32_t> RandomTokens(std::mt19937_64& rng, size_t n, int vocab) {
  std::uniform_int_distribution<int32_t> dist(0, vocab - 1);
  std::vector<int32_t> v(n);
  for (int32_t& x : v) x = dist(rng);
  return v;
}

inline std::vector<double> ToDouble(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// sum_i a[i] * w[i]: the scalar "loss" whose gradient w.r.t. a is w.
inline double Dot(const std::vector<double>& a, const std::vector<double>& w) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * w[i];
  return s;
}

// Central differences of f() w.r.t. every element of *x (which f reads), in double.
inline std::vector<double> FiniteDiff(const std::function<double()>& f, std::vector<double>* x,
                                      double h = 1e-6) {
  std::vector<double> g(x->size());
  for (size_t i = 0; i < x->size(); ++i) {
    const double keep = (*x)[i];
    (*x)[i] = keep + h;
    const double up = f();
    (*x)[i] = keep - h;
    const double down = f();
    (*x)[i] = keep;
    g[i] = (up - down) / (2 * h);
  }
  return g;
}

// Every |got - want| <= atol + rtol * |want|; reports the first few offenders.
inline void ExpectClose(const std::vector<float>& got, const std::vector<double>& want, double atol,
                        double rtol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int failures = 0;
  for (size_t i = 0; i < got.size() && failures < 5; ++i) {
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    if (!(err <= atol + rtol * std::abs(want[i]))) {
      ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << ", want " << want[i] << " (error "
                    << err << ")";
      ++failures;
    }
  }
}

// got - base, elementwise (to check accumulating kernels that start from base).
inline std::vector<float> Minus(const std::vector<float>& got, const std::vector<float>& base) {
  std::vector<float> d(got.size());
  for (size_t i = 0; i < got.size(); ++i) d[i] = got[i] - base[i];
  return d;
}

// ---------------------------------------------------------------------------------------
// Double-precision references of the forward passes (same layouts as ops.h).

inline std::vector<double> EncoderRef(const std::vector<int32_t>& inp,
                                      const std::vector<double>& wte,
                                      const std::vector<double>& wpe, int B, int T, int C) {
  std::vector<double> out(size_t(B) * T * C);
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) {
      for (int c = 0; c < C; ++c) {
        out[(size_t(b) * T + t) * C + c] = wte[size_t(inp[b * T + t]) * C + c] + wpe[t * C + c];
      }
    }
  }
  return out;
}

inline std::vector<double> LayerNormRef(const std::vector<double>& x, const std::vector<double>& w,
                                        const std::vector<double>& bias, int N, int C) {
  std::vector<double> out(x.size());
  for (int i = 0; i < N; ++i) {
    const double* r = &x[size_t(i) * C];
    double mean = 0, var = 0;
    for (int c = 0; c < C; ++c) mean += r[c];
    mean /= C;
    for (int c = 0; c < C; ++c) var += (r[c] - mean) * (r[c] - mean);
    var /= C;
    const double s = 1.0 / std::sqrt(var + 1e-5);
    for (int c = 0; c < C; ++c) out[size_t(i) * C + c] = (r[c] - mean) * s * w[c] + bias[c];
  }
  return out;
}

inline std::vector<double> MatmulRef(const std::vector<double>& x, const std::vector<double>& w,
                                     const std::vector<double>* bias, int N, int C, int OC) {
  std::vector<double> out(size_t(N) * OC);
  for (int i = 0; i < N; ++i) {
    for (int o = 0; o < OC; ++o) {
      double s = bias ? (*bias)[o] : 0.0;
      for (int c = 0; c < C; ++c) s += x[size_t(i) * C + c] * w[size_t(o) * C + c];
      out[size_t(i) * OC + o] = s;
    }
  }
  return out;
}

// Causal attention over fused qkv [B,T,3C]; returns out [B,T,C] and fills att [B,NH,T,T].
inline std::vector<double> AttentionRef(const std::vector<double>& qkv, int B, int T, int C, int NH,
                                        std::vector<double>* att = nullptr) {
  const int hs = C / NH;
  std::vector<double> out(size_t(B) * T * C, 0.0);
  if (att) att->assign(size_t(B) * NH * T * T, 0.0);
  std::vector<double> p(T);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < NH; ++h) {
      for (int i = 0; i < T; ++i) {
        const double* q = &qkv[(size_t(b) * T + i) * 3 * C + h * hs];
        double mx = -1e300;
        for (int j = 0; j <= i; ++j) {
          const double* k = &qkv[(size_t(b) * T + j) * 3 * C + C + h * hs];
          double s = 0;
          for (int d = 0; d < hs; ++d) s += q[d] * k[d];
          p[j] = s / std::sqrt(static_cast<double>(hs));
          mx = std::max(mx, p[j]);
        }
        double sum = 0;
        for (int j = 0; j <= i; ++j) sum += (p[j] = std::exp(p[j] - mx));
        for (int j = 0; j <= i; ++j) {
          p[j] /= sum;
          if (att) (*att)[((size_t(b) * NH + h) * T + i) * T + j] = p[j];
          const double* v = &qkv[(size_t(b) * T + j) * 3 * C + 2 * C + h * hs];
          for (int d = 0; d < hs; ++d) out[(size_t(b) * T + i) * C + h * hs + d] += p[j] * v[d];
        }
      }
    }
  }
  return out;
}

inline double GeluRef(double x) {
  const double k = std::sqrt(2.0 / M_PI);
  return 0.5 * x * (1.0 + std::tanh(k * (x + 0.044715 * x * x * x)));
}

// Per-row cross-entropy losses; fills probs [N,Vp] (padded columns 0) when given.
inline std::vector<double> SoftmaxCrossEntropyRef(const std::vector<double>& logits,
                                                  const std::vector<int32_t>& targets, int N, int V,
                                                  int Vp, std::vector<double>* probs = nullptr) {
  std::vector<double> losses(N);
  if (probs) probs->assign(size_t(N) * Vp, 0.0);
  for (int i = 0; i < N; ++i) {
    const double* x = &logits[size_t(i) * Vp];
    double mx = -1e300;
    for (int j = 0; j < V; ++j) mx = std::max(mx, x[j]);
    double sum = 0;
    for (int j = 0; j < V; ++j) sum += std::exp(x[j] - mx);
    if (probs) {
      for (int j = 0; j < V; ++j) (*probs)[size_t(i) * Vp + j] = std::exp(x[j] - mx) / sum;
    }
    losses[i] = std::log(sum) - (x[targets[i]] - mx);
  }
  return losses;
}

const CpuContext kOne{1};

// Runs a test body once per instruction-set path of the kernels (skipped where the CPU
// lacks it); the second element of the parameter is the test's own.
template <class P>
class IsaTest : public ::testing::TestWithParam<std::tuple<CpuIsa, P>> {
 protected:
  void SetUp() override {
    if (!SetCpuIsa(std::get<0>(this->GetParam()))) GTEST_SKIP() << "this CPU lacks the ISA";
  }
  void TearDown() override { SetCpuIsa(CpuIsa::kAuto); }
  const P& param() const { return std::get<1>(this->GetParam()); }
};

const auto kIsas = ::testing::Values(CpuIsa::kBaseline, CpuIsa::kAvx2);

// ---------------------------------------------------------------------------------------
// Encoder

TEST(EncoderTest, ForwardAndBackwardMatchReference) {
  std::mt19937_64 rng(1);
  const int B = 2, T = 3, C = 11, V = 5;
  // Repeated tokens exercise accumulation into the same dwte row.
  const std::vector<int32_t> inp = {1, 3, 1, 4, 1, 0};
  std::vector<float> wte = RandomFloats(rng, V * C), wpe = RandomFloats(rng, T * C);
  std::vector<float> out(B * T * C);
  EncoderForward(kOne, out.data(), inp.data(), wte.data(), wpe.data(), B, T, C);
  std::vector<double> wte_d = ToDouble(wte), wpe_d = ToDouble(wpe);
  ExpectClose(out, EncoderRef(inp, wte_d, wpe_d, B, T, C), 1e-7, 1e-6, "out");

  const std::vector<float> dout = RandomFloats(rng, out.size());
  const std::vector<double> w = ToDouble(dout);
  const std::vector<float> dwte0 = RandomFloats(rng, wte.size()),
                           dwpe0 = RandomFloats(rng, wpe.size());
  std::vector<float> dwte = dwte0, dwpe = dwpe0;
  EncoderBackward(kOne, dwte.data(), dwpe.data(), dout.data(), inp.data(), B, T, C);
  auto loss = [&] { return Dot(EncoderRef(inp, wte_d, wpe_d, B, T, C), w); };
  ExpectClose(Minus(dwte, dwte0), FiniteDiff(loss, &wte_d), 1e-5, 1e-5, "dwte");
  ExpectClose(Minus(dwpe, dwpe0), FiniteDiff(loss, &wpe_d), 1e-5, 1e-5, "dwpe");
}

// ---------------------------------------------------------------------------------------
// LayerNorm

class LayerNormTest : public IsaTest<int> {};

TEST_P(LayerNormTest, ForwardAndBackwardMatchReference) {
  std::mt19937_64 rng(2);
  const int N = 5, C = param();
  std::vector<float> x = RandomFloats(rng, N * C, -2.0f, 3.0f);
  std::vector<float> weight = RandomFloats(rng, C, 0.5f, 1.5f), bias = RandomFloats(rng, C);
  std::vector<float> out(N * C), mean(N), rstd(N);
  LayerNormForward(kOne, out.data(), mean.data(), rstd.data(), x.data(), weight.data(), bias.data(),
                   N, C);
  std::vector<double> xd = ToDouble(x), wd = ToDouble(weight), bd = ToDouble(bias);
  ExpectClose(out, LayerNormRef(xd, wd, bd, N, C), 1e-5, 1e-5, "out");

  const std::vector<float> dout = RandomFloats(rng, out.size());
  const std::vector<double> w = ToDouble(dout);
  const std::vector<float> dx0 = RandomFloats(rng, x.size()), dw0 = RandomFloats(rng, C),
                           db0 = RandomFloats(rng, C);
  std::vector<float> dx = dx0, dw = dw0, db = db0;
  LayerNormBackward(kOne, dx.data(), dw.data(), db.data(), dout.data(), x.data(), weight.data(),
                    mean.data(), rstd.data(), N, C);
  auto loss = [&] { return Dot(LayerNormRef(xd, wd, bd, N, C), w); };
  ExpectClose(Minus(dx, dx0), FiniteDiff(loss, &xd), 1e-4, 1e-3, "dinp");
  ExpectClose(Minus(dw, dw0), FiniteDiff(loss, &wd), 1e-5, 1e-4, "dweight");
  ExpectClose(Minus(db, db0), FiniteDiff(loss, &bd), 1e-5, 1e-4, "dbias");
}

// 13: vector tail only; 24: whole vectors; 37: both.
INSTANTIATE_TEST_SUITE_P(Widths, LayerNormTest,
                         ::testing::Combine(kIsas, ::testing::Values(13, 24, 37)));

// ---------------------------------------------------------------------------------------
// Matmul

class MatmulTest : public ::testing::TestWithParam<bool> {};

TEST_P(MatmulTest, ForwardAndBackwardMatchReference) {
  const bool with_bias = GetParam();
  std::mt19937_64 rng(3);
  const int N = 6, C = 7, OC = 9;
  std::vector<float> x = RandomFloats(rng, N * C), weight = RandomFloats(rng, OC * C),
                     bias = RandomFloats(rng, OC);
  std::vector<float> out(N * OC);
  MatmulForward(kOne, out.data(), x.data(), weight.data(), with_bias ? bias.data() : nullptr, N, C,
                OC);
  std::vector<double> xd = ToDouble(x), wd = ToDouble(weight), bd = ToDouble(bias);
  const std::vector<double>* bp = with_bias ? &bd : nullptr;
  ExpectClose(out, MatmulRef(xd, wd, bp, N, C, OC), 1e-5, 1e-5, "out");

  const std::vector<float> dout = RandomFloats(rng, out.size());
  const std::vector<double> w = ToDouble(dout);
  const std::vector<float> dx0 = RandomFloats(rng, x.size()),
                           dw0 = RandomFloats(rng, weight.size()), db0 = RandomFloats(rng, OC);
  std::vector<float> dx = dx0, dw = dw0, db = db0;
  MatmulBackward(kOne, dx.data(), dw.data(), with_bias ? db.data() : nullptr, dout.data(), x.data(),
                 weight.data(), N, C, OC);
  auto loss = [&] { return Dot(MatmulRef(xd, wd, bp, N, C, OC), w); };
  ExpectClose(Minus(dx, dx0), FiniteDiff(loss, &xd), 1e-5, 1e-4, "dinp");
  ExpectClose(Minus(dw, dw0), FiniteDiff(loss, &wd), 1e-5, 1e-4, "dweight");
  if (with_bias) {
    ExpectClose(Minus(db, db0), FiniteDiff(loss, &bd), 1e-5, 1e-4, "dbias");
  } else {
    EXPECT_EQ(db, db0);
  }
}

INSTANTIATE_TEST_SUITE_P(Bias, MatmulTest, ::testing::Bool());

TEST(MatmulTest, LargerForwardMatchesReference) {
  std::mt19937_64 rng(4);
  const int N = 70, C = 48, OC = 40;
  std::vector<float> x = RandomFloats(rng, N * C), weight = RandomFloats(rng, OC * C),
                     bias = RandomFloats(rng, OC);
  std::vector<float> out(N * OC);
  MatmulForward(kOne, out.data(), x.data(), weight.data(), bias.data(), N, C, OC);
  std::vector<double> bd = ToDouble(bias);
  ExpectClose(out, MatmulRef(ToDouble(x), ToDouble(weight), &bd, N, C, OC), 1e-5, 1e-5, "out");
}

// ---------------------------------------------------------------------------------------
// Attention

struct AttentionShape {
  int B, T, C, NH;
};

class AttentionTest : public IsaTest<AttentionShape> {};

TEST_P(AttentionTest, ForwardAndBackwardMatchReference) {
  const auto [B, T, C, NH] = param();
  std::mt19937_64 rng(5);
  std::vector<float> qkv = RandomFloats(rng, size_t(B) * T * 3 * C, -1.5f, 1.5f);
  std::vector<float> out(size_t(B) * T * C), att(size_t(B) * NH * T * T, 7.0f);
  AttentionForward(kOne, out.data(), att.data(), qkv.data(), B, T, C, NH);
  std::vector<double> qd = ToDouble(qkv), att_ref;
  ExpectClose(out, AttentionRef(qd, B, T, C, NH, &att_ref), 1e-5, 1e-4, "out");
  // Probabilities, with exact zeros above the diagonal.
  ExpectClose(att, att_ref, 1e-6, 1e-4, "att");
  for (int bh = 0; bh < B * NH; ++bh) {
    for (int i = 0; i < T; ++i) {
      for (int j = i + 1; j < T; ++j) ASSERT_EQ(att[(size_t(bh) * T + i) * T + j], 0.0f);
    }
  }

  const std::vector<float> dout = RandomFloats(rng, out.size());
  const std::vector<double> w = ToDouble(dout);
  const std::vector<float> dqkv0 = RandomFloats(rng, qkv.size());
  std::vector<float> dqkv = dqkv0, datt(att.size(), 3.0f);
  AttentionBackward(kOne, dqkv.data(), datt.data(), dout.data(), qkv.data(), att.data(), B, T, C,
                    NH);
  auto loss = [&] { return Dot(AttentionRef(qd, B, T, C, NH), w); };
  ExpectClose(Minus(dqkv, dqkv0), FiniteDiff(loss, &qd), 1e-5, 1e-3, "dinp");
}

// T=5, 45: the sgemm path (T not a multiple of 8), with one and two row blocks (32 + 13)
// and vector tails. With AVX2, T=16/24 with head sizes 16, 24 (three 8-lane column groups)
// and 64 (two groups of four) take the hand-blocked kernel, including an odd number of
// 8-key panels (T=24).
INSTANTIATE_TEST_SUITE_P(
    Shapes, AttentionTest,
    ::testing::Combine(kIsas,
                       ::testing::Values(AttentionShape{2, 5, 8, 2}, AttentionShape{1, 45, 12, 3},
                                         AttentionShape{2, 16, 32, 2}, AttentionShape{1, 24, 48, 2},
                                         AttentionShape{1, 16, 64, 1})));

// ---------------------------------------------------------------------------------------
// GELU and residual

class GeluTest : public IsaTest<int> {};

TEST_P(GeluTest, ForwardAndBackwardMatchReference) {
  std::mt19937_64 rng(6);
  const int n = 203;  // not a multiple of 8
  std::vector<float> x = RandomFloats(rng, n, -6.0f, 6.0f);
  x[0] = -30.0f;  // saturated tails
  x[1] = 30.0f;
  std::vector<float> out(n);
  GeluForward(kOne, out.data(), x.data(), n);
  std::vector<double> xd = ToDouble(x), ref(n);
  for (int i = 0; i < n; ++i) ref[i] = GeluRef(xd[i]);
  ExpectClose(out, ref, 1e-6, 1e-5, "out");

  const std::vector<float> dout = RandomFloats(rng, n), dx0 = RandomFloats(rng, n);
  std::vector<float> dx = dx0;
  GeluBackward(kOne, dx.data(), x.data(), dout.data(), n);
  std::vector<double> want(n);
  for (int i = 0; i < n; ++i) {
    const double h = 1e-6;
    want[i] = (GeluRef(xd[i] + h) - GeluRef(xd[i] - h)) / (2 * h) * dout[i];
  }
  ExpectClose(Minus(dx, dx0), want, 1e-5, 1e-4, "dinp");
}

INSTANTIATE_TEST_SUITE_P(Isa, GeluTest, ::testing::Combine(kIsas, ::testing::Values(0)));

TEST(ResidualTest, ForwardAndBackward) {
  std::mt19937_64 rng(7);
  const int n = 37;
  std::vector<float> a = RandomFloats(rng, n), b = RandomFloats(rng, n), out(n);
  ResidualForward(kOne, out.data(), a.data(), b.data(), n);
  for (int i = 0; i < n; ++i) EXPECT_EQ(out[i], a[i] + b[i]);
  const std::vector<float> dout = RandomFloats(rng, n);
  std::vector<float> da = a, db = b;
  ResidualBackward(kOne, da.data(), db.data(), dout.data(), n);
  for (int i = 0; i < n; ++i) {
    EXPECT_EQ(da[i], a[i] + dout[i]);
    EXPECT_EQ(db[i], b[i] + dout[i]);
  }
}

// ---------------------------------------------------------------------------------------
// Softmax + cross-entropy

class SoftmaxCrossEntropyTest : public IsaTest<int> {};

TEST_P(SoftmaxCrossEntropyTest, ForwardAndBackwardMatchReference) {
  std::mt19937_64 rng(8);
  const int N = 4, V = 11, Vp = 16;
  std::vector<float> logits = RandomFloats(rng, N * Vp, -4.0f, 4.0f);
  const std::vector<int32_t> targets = RandomTokens(rng, N, V);
  std::vector<float> probs(N * Vp, 5.0f), losses(N);
  SoftmaxCrossEntropyForward(kOne, probs.data(), losses.data(), logits.data(), targets.data(), N, V,
                             Vp);
  std::vector<double> ld = ToDouble(logits), probs_ref;
  ExpectClose(losses, SoftmaxCrossEntropyRef(ld, targets, N, V, Vp, &probs_ref), 1e-6, 1e-5,
              "losses");
  ExpectClose(probs, probs_ref, 1e-7, 1e-5, "probs");

  const float scale = 0.37f;
  std::vector<float> dlogits(N * Vp, 9.0f);
  SoftmaxCrossEntropyBackward(kOne, dlogits.data(), probs.data(), targets.data(), scale, N, V, Vp);
  auto loss = [&] {
    const std::vector<double> l = SoftmaxCrossEntropyRef(ld, targets, N, V, Vp);
    double s = 0;
    for (double x : l) s += x;
    return s * scale;
  };
  // Padded columns have zero gradient in the reference too.
  ExpectClose(dlogits, FiniteDiff(loss, &ld), 1e-6, 1e-4, "dlogits");
}

INSTANTIATE_TEST_SUITE_P(Isa, SoftmaxCrossEntropyTest,
                         ::testing::Combine(kIsas, ::testing::Values(0)));

// ---------------------------------------------------------------------------------------
// Optimiser kernels

TEST(SumOfSquaresTest, MatchesDoubleSum) {
  std::mt19937_64 rng(9);
  const int n = 100003;
  const std::vector<float> g = RandomFloats(rng, n);
  double want = 0;
  for (float x : g) want += double(x) * x;
  EXPECT_NEAR(SumOfSquares(kOne, g.data(), n), want, 1e-9 * want);
  EXPECT_EQ(SumOfSquares(kOne, g.data(), 0), 0.0);
  EXPECT_NEAR(SumOfSquares(kOne, g.data(), 3),
              double(g[0]) * g[0] + double(g[1]) * g[1] + double(g[2]) * g[2], 1e-12);
}

TEST(AdamWTest, MatchesDoubleReference) {
  std::mt19937_64 rng(10);
  const int n = 45;
  std::vector<float> params = RandomFloats(rng, n), grads = RandomFloats(rng, n),
                     m = RandomFloats(rng, n, -0.1f, 0.1f), v = RandomFloats(rng, n, 0.01f, 0.1f);
  std::vector<uint8_t> mask(n);
  for (int i = 0; i < n; ++i) mask[i] = i % 3 != 0;
  const AdamWParams p{/*lr=*/0.01f,          /*beta1=*/0.9f,      /*beta2=*/0.95f,
                      /*eps=*/1e-8f,
                      /*weight_decay=*/0.1f, /*grad_scale=*/0.5f, /*t=*/3};
  std::vector<double> want_p(n), want_m(n), want_v(n);
  for (int i = 0; i < n; ++i) {
    const double g = double(grads[i]) * p.grad_scale;
    want_m[i] = double(p.beta1) * m[i] + (1 - double(p.beta1)) * g;
    want_v[i] = double(p.beta2) * v[i] + (1 - double(p.beta2)) * g * g;
    const double mh = want_m[i] / (1 - std::pow(double(p.beta1), 3));
    const double vh = want_v[i] / (1 - std::pow(double(p.beta2), 3));
    const double wd = mask[i] ? p.weight_decay : 0.0;
    want_p[i] = params[i] - double(p.lr) * (mh / (std::sqrt(vh) + p.eps) + wd * params[i]);
  }
  AdamWUpdate(kOne, params.data(), grads.data(), m.data(), v.data(), mask.data(), n, p);
  ExpectClose(m, want_m, 1e-7, 1e-5, "m");
  ExpectClose(v, want_v, 1e-8, 1e-5, "v");
  ExpectClose(params, want_p, 1e-7, 1e-5, "params");
}

TEST(AdamWTest, NullMaskDecaysEverything) {
  std::vector<float> params = {1.0f, -2.0f}, grads = {0.0f, 0.0f}, m = {0, 0}, v = {0, 0};
  const AdamWParams p{0.1f, 0.9f, 0.95f, 1e-8f, 0.5f, 1.0f, 1};
  AdamWUpdate(kOne, params.data(), grads.data(), m.data(), v.data(), nullptr, 2, p);
  EXPECT_FLOAT_EQ(params[0], 1.0f - 0.1f * 0.5f * 1.0f);
  EXPECT_FLOAT_EQ(params[1], -2.0f + 0.1f * 0.5f * 2.0f);
}

// ---------------------------------------------------------------------------------------
// Thread-count independence: every non-BLAS kernel, and attention (whose BLAS calls run
// single-threaded per (batch, head)), gives bit-identical results with 1, 2 and 3 threads,
// on each ISA path. T=40 and head size 8 take the AVX2 attention kernel where available.

template <typename F>
void ExpectSameForThreads(F run) {
  const auto one = run(CpuContext{1});
  for (int threads : {2, 3}) {
    const auto many = run(CpuContext{threads});
    ASSERT_EQ(one.size(), many.size());
    for (size_t k = 0; k < one.size(); ++k) {
      ASSERT_EQ(one[k].size(), many[k].size());
      EXPECT_EQ(0, std::memcmp(one[k].data(), many[k].data(), one[k].size() * sizeof(float)))
          << "output " << k << " differs with " << threads << " threads";
    }
  }
}

class ThreadIndependenceTest : public IsaTest<int> {};

TEST_P(ThreadIndependenceTest, NonBlasKernelsAreBitIdentical) {
  std::mt19937_64 rng(11);
  const int B = 3, T = 37, C = 40, NH = 4, V = 50, Vp = 64, N = B * T;
  const std::vector<int32_t> tokens = RandomTokens(rng, N, V);
  const std::vector<float> wte = RandomFloats(rng, Vp * C), wpe = RandomFloats(rng, T * C);
  const std::vector<float> x = RandomFloats(rng, N * C), dout = RandomFloats(rng, N * C);
  const std::vector<float> weight = RandomFloats(rng, C), bias = RandomFloats(rng, C);
  const std::vector<float> wmat = RandomFloats(rng, C * C);
  const std::vector<float> qkv = RandomFloats(rng, N * 3 * C), logits = RandomFloats(rng, N * Vp);
  const std::vector<float> big = RandomFloats(rng, 4 * N * C, -5.0f, 5.0f);
  const std::vector<float> dbig = RandomFloats(rng, big.size());

  ExpectSameForThreads([&](const CpuContext& ctx) {
    std::vector<float> out(N * C), dwte(wte.size(), 0.5f), dwpe(wpe.size(), 0.25f);
    EncoderForward(ctx, out.data(), tokens.data(), wte.data(), wpe.data(), B, T, C);
    EncoderBackward(ctx, dwte.data(), dwpe.data(), dout.data(), tokens.data(), B, T, C);
    return std::vector<std::vector<float>>{out, dwte, dwpe};
  });
  ExpectSameForThreads([&](const CpuContext& ctx) {
    std::vector<float> out(N * C), mean(N), rstd(N), dx(N * C, 0.1f), dw(C, 0.2f), db(C, 0.3f);
    LayerNormForward(ctx, out.data(), mean.data(), rstd.data(), x.data(), weight.data(),
                     bias.data(), N, C);
    LayerNormBackward(ctx, dx.data(), dw.data(), db.data(), dout.data(), x.data(), weight.data(),
                      mean.data(), rstd.data(), N, C);
    return std::vector<std::vector<float>>{out, mean, rstd, dx, dw, db};
  });
  ExpectSameForThreads([&](const CpuContext& ctx) {
    std::vector<float> out(N * C), att(size_t(B) * NH * T * T), dqkv(qkv.size(), 0.1f),
        datt(att.size());
    AttentionForward(ctx, out.data(), att.data(), qkv.data(), B, T, C, NH);
    AttentionBackward(ctx, dqkv.data(), datt.data(), dout.data(), qkv.data(), att.data(), B, T, C,
                      NH);
    return std::vector<std::vector<float>>{out, att, dqkv};
  });
  {
    // A shape for the AVX2 attention kernel (T and head size multiples of 8).
    const int T2 = 40, C2 = 32, NH2 = 4;
    const std::vector<float> qkv2 = RandomFloats(rng, B * T2 * 3 * C2);
    const std::vector<float> dout2 = RandomFloats(rng, B * T2 * C2);
    ExpectSameForThreads([&](const CpuContext& ctx) {
      std::vector<float> out(B * T2 * C2), att(size_t(B) * NH2 * T2 * T2), dqkv(qkv2.size(), 0.1f),
          datt(att.size());
      AttentionForward(ctx, out.data(), att.data(), qkv2.data(), B, T2, C2, NH2);
      AttentionBackward(ctx, dqkv.data(), datt.data(), dout2.data(), qkv2.data(), att.data(), B, T2,
                        C2, NH2);
      return std::vector<std::vector<float>>{out, att, dqkv};
    });
  }
  ExpectSameForThreads([&](const CpuContext& ctx) {
    std::vector<float> out(big.size()), dx(big.size(), 0.5f), r(big.size()), da(dx), db(dx);
    GeluForward(ctx, out.data(), big.data(), big.size());
    GeluBackward(ctx, dx.data(), big.data(), dbig.data(), big.size());
    ResidualForward(ctx, r.data(), big.data(), dbig.data(), big.size());
    ResidualBackward(ctx, da.data(), db.data(), dbig.data(), big.size());
    return std::vector<std::vector<float>>{out, dx, r, da, db};
  });
  ExpectSameForThreads([&](const CpuContext& ctx) {
    std::vector<float> probs(N * Vp), losses(N), dlogits(N * Vp);
    SoftmaxCrossEntropyForward(ctx, probs.data(), losses.data(), logits.data(), tokens.data(), N, V,
                               Vp);
    SoftmaxCrossEntropyBackward(ctx, dlogits.data(), probs.data(), tokens.data(), 0.3f, N, V, Vp);
    return std::vector<std::vector<float>>{probs, losses, dlogits};
  });
  ExpectSameForThreads([&](const CpuContext& ctx) {
    std::vector<float> dx(N * C, 0.0f), dw(C * C, 0.0f), db(C, 0.5f);
    // Only the bias gradient of the matmul is computed outside BLAS.
    MatmulBackward(ctx, dx.data(), dw.data(), db.data(), dout.data(), x.data(), wmat.data(), N, C,
                   C);
    return std::vector<std::vector<float>>{db};
  });
  ExpectSameForThreads([&](const CpuContext& ctx) {
    std::vector<float> p = big, m(big.size(), 0.01f), v(big.size(), 0.02f);
    std::vector<uint8_t> mask(big.size());
    for (size_t i = 0; i < mask.size(); ++i) mask[i] = i % 2;
    AdamWUpdate(ctx, p.data(), dbig.data(), m.data(), v.data(), mask.data(), p.size(),
                AdamWParams{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.7f, 5});
    const double ss = SumOfSquares(ctx, big.data(), big.size());
    std::vector<float> ss_bits(2);
    std::memcpy(ss_bits.data(), &ss, sizeof(ss));
    return std::vector<std::vector<float>>{p, m, v, ss_bits};
  });
}

INSTANTIATE_TEST_SUITE_P(Isa, ThreadIndependenceTest,
                         ::testing::Combine(kIsas, ::testing::Values(0)));

TEST(CpuIsaTest, SelectionReportsTheActivePath) {
  ASSERT_TRUE(SetCpuIsa(CpuIsa::kBaseline));
  EXPECT_STREQ(ActiveCpuIsa(), "baseline");
  if (SetCpuIsa(CpuIsa::kAvx2)) EXPECT_STREQ(ActiveCpuIsa(), "avx2");
  ASSERT_TRUE(SetCpuIsa(CpuIsa::kAuto));
}

}  // namespace
}  // namespace spotrain::kernels::cpu
