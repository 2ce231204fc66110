// Young/Daly checkpoint intervals: how often to checkpoint so that the time spent writing
// checkpoints plus the work expected to be lost to interruptions is smallest. Used by
// `spotrain plan` (common/spot_sim.h) and by the coordinator's `every_steps: "auto"`
// (coordinator/checkpoint_policy.h, DESIGN.md section 5). Pure functions of their arguments;
// thread-safe.
//
// Notation (all in seconds): C the checkpoint cost (the time training stalls for one
// checkpoint), M the mean time between interrupts that roll the job back to its last
// checkpoint, R the restart time after such an interrupt, T the interval between checkpoints
// (compute time, checkpoint stalls excluded).
//
// - Young (1974): T = sqrt(2 C M), the first-order optimum of C/T + T/(2M).
// - Daly (2006, "A higher order estimate of the optimum checkpoint interval for restart
//   dumps", FGCS 22(3)): T = sqrt(2 C M) * (1 + sqrt(C/(2M))/3 + (C/(2M))/9) - C while
//   C < 2M, and T = M once C >= 2M. It matters when C is not small against M.
#ifndef SPOTRAIN_COMMON_YOUNG_DALY_H_
#define SPOTRAIN_COMMON_YOUNG_DALY_H_

#include "absl/status/statusor.h"

namespace spotrain::common {

// sqrt(2 C M). C >= 0, M > 0 (M may be +infinity: the result is +infinity); NaN otherwise.
double YoungInterval(double checkpoint_cost_s, double mtbi_s);

// Daly's higher-order optimum (see above). Same domain as YoungInterval. Never negative.
double DalyInterval(double checkpoint_cost_s, double mtbi_s);

// Daly's expected wall time of a job that needs `solve_s` of compute, checkpointing every
// `interval_s` of compute at cost C, restarting in R after each interrupt, with interrupts a
// Poisson process of mean M that also strikes during checkpoints and restarts:
//   M * exp(R/M) * (exp((T + C)/M) - 1) * solve_s / T.
// (It counts a checkpoint after the last segment too.) M = +infinity gives
// solve_s * (1 + C/T). NaN outside the domain (solve_s >= 0, T > 0, C, R >= 0, M > 0).
double DalyExpectedWallTime(double solve_s, double interval_s, double checkpoint_cost_s,
                            double restart_s, double mtbi_s);

// Bounds applied to the Daly interval.
struct IntervalPolicy {
  // Never checkpoint more often than this (e.g. one step).
  double min_interval_s = 0;
  // Never less often than this: the most work a rollback may lose when the estimate of M is
  // wrong (correlated reclaims, a coordinator restart). +infinity disables the cap.
  double max_interval_s = 3600;
};

enum class IntervalBound {
  kNone,  // the Daly interval as it is
  kMin,   // raised to min_interval_s
  kMax,   // lowered to max_interval_s (always the case when M is +infinity and the cap finite)
};

struct IntervalChoice {
  double checkpoint_cost_s = 0;
  double mtbi_s = 0;      // M as given; +infinity when no rollback is expected
  double young_s = 0;     // sqrt(2 C M)
  double daly_s = 0;      // Daly's estimate
  double interval_s = 0;  // the choice: daly_s clamped to the policy (may be +infinity)
  IntervalBound bound = IntervalBound::kNone;
};

// Daly's interval for (C, M), clamped to `policy`. kInvalidArgument for C < 0 or not finite,
// M <= 0 or NaN, or a policy with min > max or min < 0.
absl::StatusOr<IntervalChoice> ChooseCheckpointInterval(double checkpoint_cost_s, double mtbi_s,
                                                        const IntervalPolicy& policy);

// "none", "min" or "max".
const char* IntervalBoundName(IntervalBound bound);

}  // namespace spotrain::common

#endif  // SPOTRAIN_COMMON_YOUNG_DALY_H_
