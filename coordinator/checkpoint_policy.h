// The checkpoint interval for `checkpoint.every_steps: "auto"` (DESIGN.md section 5,
// docs/coordinator.md "Automatic checkpoint interval"): Young/Daly T = sqrt(2 C M) through
// common/young_daly.h (the code `spotrain plan` uses), converted to steps, and when to order
// the next checkpoint. Pure logic: the coordinator's Membership feeds it what workers report
// (step times, checkpoint costs), the worker losses it declares, and the time of its injected
// clock; it returns decisions to log. No I/O, no threads.
//
// Inputs and what they mean:
// - C, the checkpoint cost: what training pays for one checkpoint. Saving is asynchronous, so
//   that is the snapshot stall (copy to host memory, plus any wait for the previous write),
//   not the background write. Per checkpoint the slowest rank's stall counts (the step is
//   synchronous); C is the mean of that over the last `cost_window` checkpoints.
// - W, the background write time (slowest rank, largest of the last `cost_window`
//   checkpoints): a new snapshot waits for the previous write, so the interval is never
//   shorter than W * write_margin (Young/Daly's lower bound, reported as bound "min").
// - M, the mean time between losses of the pool: (prior * k + observed) / (k + losses), where
//   the prior is checkpoint.mtbf_prior_s counted as k pseudo-intervals, observed is the time
//   the run has been running (a plan active) under this coordinator, and losses are members
//   of a running plan declared lost (announced leaves lose nothing and do not count).
//   Counting every loss as an interrupt is conservative: a single loss costs survivors no
//   rollback, but any loss may be the first of a mass reclaim.
// - the step time: mean of the last `step_window` StepDone step_ms.
// Until C and the step time are both known the interval is `initial_every_steps`.
//
// Thread-safety: none; one thread (the coordinator's state thread, or a test) owns it.
#ifndef SPOTRAIN_COORDINATOR_CHECKPOINT_POLICY_H_
#define SPOTRAIN_COORDINATOR_CHECKPOINT_POLICY_H_

#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>

#include "absl/time/time.h"

namespace spotrain::coordinator {

struct CheckpointPolicyOptions {
  double mtbl_prior_s = 3600;  // checkpoint.mtbf_prior_s
  double prior_weight = 1;     // k: the prior counts as this many observed intervals
  // Interval before any measurement; also the first checkpoint, which gives the measurement.
  int64_t initial_every_steps = 20;
  double write_margin = 1.25;  // interval >= background write time * this
  absl::Duration reevaluate_every = absl::Seconds(30);
  double max_interval_s = 3600;  // never more work than this between checkpoints
  int64_t max_every_steps = 0;   // 0: no cap in steps (the coordinator passes the run's steps)
  int cost_window = 5;           // checkpoints averaged for C (and W)
  int step_window = 20;          // StepDone reports averaged for the step time
};

// One evaluation of the interval with every input. Unknown values are -1.
struct IntervalDecision {
  absl::Time time;
  std::string reason;   // initial, measured, loss, periodic
  double cost_s = -1;   // C
  double write_s = -1;  // W
  double mtbl_s = 0;    // M
  double mtbl_prior_s = 0;
  double prior_weight = 0;
  double observed_s = 0;  // pool time observed
  int64_t losses = 0;
  double step_ms = -1;
  double young_s = -1, daly_s = -1;
  double interval_s = -1;  // chosen interval in seconds (-1: initial, no measurement)
  std::string bound;       // initial (no measurement), none, min (write time), max
  int64_t every_steps = 0;
};

class CheckpointPolicy {
 public:
  CheckpointPolicy(const CheckpointPolicyOptions& options, absl::Time now);

  // Time passes; pool time accumulates while `running` (a plan is active).
  void Observe(absl::Time now, bool running);
  // A completed step's wall time on the worker (ms; ignored unless positive and finite).
  void OnStep(double step_ms);
  // One rank's checkpoint shard of `step`: its snapshot stall and background write (ms).
  void OnShardReport(int64_t step, double snapshot_ms, double write_ms);
  // Every shard of `step` has been reported: its cost is known; re-evaluate at the next call.
  void OnCheckpointComplete(int64_t step);
  // A member of the running plan was declared lost; re-evaluate at the next call.
  void OnLoss(absl::Time now);

  // Re-evaluates when something is pending (the first call, a loss, a new measurement) or
  // reevaluate_every has passed. Returns the decision to log: always for the first call, a
  // loss or the first measurement; for later measurements and periodic evaluations only when
  // every_steps changed.
  std::optional<IntervalDecision> Evaluate(absl::Time now);

  // Whether to order a checkpoint now: `completed_steps` is at least every_steps past the
  // newest of `last_checkpoint_step` (committed or reported) and the last order, and no
  // order is outstanding. An order is outstanding until a shard of a later step is reported
  // (OnShardReport), its checkpoint fails (OnCheckpointFailed), a new plan starts, or
  // 2 * every_steps + 10 steps pass (a lost order). The coordinator's step count lags the
  // workers' and the checkpoint lands a step or two after the order arrives: without this,
  // a second order would go out before the first checkpoint is reported.
  bool ShouldOrder(int64_t completed_steps, int64_t last_checkpoint_step) const;
  void OnOrdered(int64_t completed_steps);
  void OnCheckpointFailed(int64_t step);
  // A new plan starts at `start_step` (a restore may go back before the last order).
  void OnPlan(int64_t start_step);

  int64_t every_steps() const { return every_steps_; }
  const IntervalDecision& last() const { return last_; }
  // C and M as they would be used now (-1 for C when not measured).
  double cost_s() const;
  double mtbl_s() const;

 private:
  struct Costs {
    double snapshot_ms = 0;  // max over ranks
    double write_ms = 0;
  };
  IntervalDecision Compute(absl::Time now, const std::string& reason) const;
  double write_s() const;
  double step_ms() const;

  const CheckpointPolicyOptions options_;
  absl::Time last_observed_;
  bool running_ = false;
  double observed_s_ = 0;
  int64_t losses_ = 0;
  std::deque<double> step_ms_;
  std::map<int64_t, Costs> costs_;      // by step, newest cost_window complete ones kept
  std::map<int64_t, Costs> reporting_;  // steps whose shards are still being reported
  bool evaluated_ = false;
  bool measured_ = false;  // a decision used a measured cost
  bool loss_pending_ = false;
  bool measure_pending_ = false;
  absl::Time last_evaluation_ = absl::InfinitePast();
  int64_t every_steps_;
  int64_t last_ordered_ = -1;
  bool order_outstanding_ = false;
  IntervalDecision last_;
};

}  // namespace spotrain::coordinator

#endif  // SPOTRAIN_COORDINATOR_CHECKPOINT_POLICY_H_
