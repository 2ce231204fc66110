#include "common/young_daly.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace spotrain::common {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

bool ValidCost(double c) { return c >= 0 && std::isfinite(c); }
bool ValidMtbi(double m) { return m > 0; }  // NaN fails; +infinity passes

}  // namespace

double YoungInterval(double checkpoint_cost_s, double mtbi_s) {
  if (!ValidCost(checkpoint_cost_s) || !ValidMtbi(mtbi_s)) return kNaN;
  if (std::isinf(mtbi_s)) return checkpoint_cost_s == 0 ? 0 : kInf;
  return std::sqrt(2 * checkpoint_cost_s * mtbi_s);
}

double DalyInterval(double checkpoint_cost_s, double mtbi_s) {
  if (!ValidCost(checkpoint_cost_s) || !ValidMtbi(mtbi_s)) return kNaN;
  const double c = checkpoint_cost_s;
  const double m = mtbi_s;
  if (std::isinf(m)) return c == 0 ? 0 : kInf;
  if (c >= 2 * m) return m;
  const double x = c / (2 * m);
  const double t = std::sqrt(2 * c * m) * (1 + std::sqrt(x) / 3 + x / 9) - c;
  // The series is positive for every c < 2m; guard against rounding at c = 0.
  return std::max(t, 0.0);
}

double DalyExpectedWallTime(double solve_s, double interval_s, double checkpoint_cost_s,
                            double restart_s, double mtbi_s) {
  if (!(solve_s >= 0) || !(interval_s > 0) || !ValidCost(checkpoint_cost_s) || !(restart_s >= 0) ||
      !ValidMtbi(mtbi_s)) {
    return kNaN;
  }
  const double segments = solve_s / interval_s;
  if (std::isinf(mtbi_s)) return segments * (interval_s + checkpoint_cost_s);
  // expm1 keeps precision when (T + C) << M.
  return mtbi_s * std::exp(restart_s / mtbi_s) *
         std::expm1((interval_s + checkpoint_cost_s) / mtbi_s) * segments;
}

absl::StatusOr<IntervalChoice> ChooseCheckpointInterval(double checkpoint_cost_s, double mtbi_s,
                                                        const IntervalPolicy& policy) {
  if (!ValidCost(checkpoint_cost_s)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("checkpoint cost %g s must be a finite number >= 0", checkpoint_cost_s));
  }
  if (!ValidMtbi(mtbi_s)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "mean time between interrupts %g s must be > 0 (+infinity: none expected)", mtbi_s));
  }
  if (!(policy.min_interval_s >= 0) || !(policy.max_interval_s >= policy.min_interval_s)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("checkpoint interval bounds [%g, %g] s: need 0 <= min <= max",
                        policy.min_interval_s, policy.max_interval_s));
  }
  IntervalChoice choice;
  choice.checkpoint_cost_s = checkpoint_cost_s;
  choice.mtbi_s = mtbi_s;
  choice.young_s = YoungInterval(checkpoint_cost_s, mtbi_s);
  choice.daly_s = DalyInterval(checkpoint_cost_s, mtbi_s);
  choice.interval_s = choice.daly_s;
  if (choice.interval_s > policy.max_interval_s) {
    choice.interval_s = policy.max_interval_s;
    choice.bound = IntervalBound::kMax;
  } else if (choice.interval_s < policy.min_interval_s) {
    choice.interval_s = policy.min_interval_s;
    choice.bound = IntervalBound::kMin;
  }
  return choice;
}

const char* IntervalBoundName(IntervalBound bound) {
  switch (bound) {
    case IntervalBound::kNone:
      return "none";
    case IntervalBound::kMin:
      return "min";
    case IntervalBound::kMax:
      return "max";
  }
  return "none";
}

}  // namespace spotrain::common
