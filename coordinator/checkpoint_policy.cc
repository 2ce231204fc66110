#include "coordinator/checkpoint_policy.h"

#include <algorithm>
#include <cmath>

#include "common/young_daly.h"

namespace spotrain::coordinator {
namespace {

bool Usable(double ms) { return ms > 0 && std::isfinite(ms) && ms < 1e9; }

}  // namespace

CheckpointPolicy::CheckpointPolicy(const CheckpointPolicyOptions& options, absl::Time now)
    : options_(options),
      last_observed_(now),
      every_steps_(std::max<int64_t>(1, options.initial_every_steps)) {
  if (options_.max_every_steps > 0) every_steps_ = std::min(every_steps_, options_.max_every_steps);
}

void CheckpointPolicy::Observe(absl::Time now, bool running) {
  if (running_ && now > last_observed_) {
    observed_s_ += absl::ToDoubleSeconds(now - last_observed_);
  }
  last_observed_ = now;
  running_ = running;
}

void CheckpointPolicy::OnStep(double step_ms) {
  if (!Usable(step_ms)) return;
  step_ms_.push_back(step_ms);
  while (static_cast<int>(step_ms_.size()) > std::max(1, options_.step_window)) {
    step_ms_.pop_front();
  }
}

void CheckpointPolicy::OnShardReport(int64_t step, double snapshot_ms, double write_ms) {
  if (step > last_ordered_) order_outstanding_ = false;
  if (!Usable(snapshot_ms) && !Usable(write_ms)) return;  // an older worker: nothing measured
  Costs& c = reporting_[step];
  if (Usable(snapshot_ms)) c.snapshot_ms = std::max(c.snapshot_ms, snapshot_ms);
  if (Usable(write_ms)) c.write_ms = std::max(c.write_ms, write_ms);
  // Reports of steps that never complete (a rank failed) must not pile up.
  while (reporting_.size() > 16) reporting_.erase(reporting_.begin());
}

void CheckpointPolicy::OnCheckpointComplete(int64_t step) {
  auto it = reporting_.find(step);
  if (it == reporting_.end()) return;
  costs_[step] = it->second;
  reporting_.erase(reporting_.begin(), std::next(it));
  while (static_cast<int>(costs_.size()) > std::max(1, options_.cost_window)) {
    costs_.erase(costs_.begin());
  }
  measure_pending_ = true;
}

void CheckpointPolicy::OnLoss(absl::Time now) {
  Observe(now, running_);
  ++losses_;
  loss_pending_ = true;
}

void CheckpointPolicy::OnPlan(int64_t start_step) {
  last_ordered_ = std::min(last_ordered_, start_step);
  order_outstanding_ = false;
}

void CheckpointPolicy::OnOrdered(int64_t completed_steps) {
  last_ordered_ = completed_steps;
  order_outstanding_ = true;
}

void CheckpointPolicy::OnCheckpointFailed(int64_t step) {
  if (step >= last_ordered_) order_outstanding_ = false;
}

double CheckpointPolicy::cost_s() const {
  if (costs_.empty()) return -1;
  double sum = 0;
  for (const auto& [step, c] : costs_) sum += c.snapshot_ms;
  return sum / costs_.size() / 1000;
}

double CheckpointPolicy::write_s() const {
  if (costs_.empty()) return -1;
  double worst = 0;
  for (const auto& [step, c] : costs_) worst = std::max(worst, c.write_ms);
  return worst / 1000;
}

double CheckpointPolicy::step_ms() const {
  if (step_ms_.empty()) return -1;
  double sum = 0;
  for (double ms : step_ms_) sum += ms;
  return sum / step_ms_.size();
}

double CheckpointPolicy::mtbl_s() const {
  const double k = std::max(0.0, options_.prior_weight);
  const double denominator = k + static_cast<double>(losses_);
  // No prior weight and no loss yet: no loss expected.
  if (denominator <= 0) return HUGE_VAL;
  return (options_.mtbl_prior_s * k + observed_s_) / denominator;
}

IntervalDecision CheckpointPolicy::Compute(absl::Time now, const std::string& reason) const {
  IntervalDecision d;
  d.time = now;
  d.reason = reason;
  d.cost_s = cost_s();
  d.write_s = write_s();
  d.mtbl_s = mtbl_s();
  d.mtbl_prior_s = options_.mtbl_prior_s;
  d.prior_weight = options_.prior_weight;
  d.observed_s = observed_s_;
  d.losses = losses_;
  d.step_ms = step_ms();
  d.every_steps = std::max<int64_t>(1, options_.initial_every_steps);
  d.bound = "initial";
  if (d.cost_s >= 0 && d.step_ms > 0) {
    common::IntervalPolicy bounds;
    bounds.min_interval_s = std::max(0.0, d.write_s) * options_.write_margin;
    bounds.max_interval_s = std::max(options_.max_interval_s, bounds.min_interval_s);
    auto choice = common::ChooseCheckpointInterval(d.cost_s, d.mtbl_s, bounds);
    if (choice.ok()) {
      d.young_s = choice->young_s;
      d.daly_s = choice->daly_s;
      d.interval_s = choice->interval_s;
      d.bound = common::IntervalBoundName(choice->bound);
      const double step_s = d.step_ms / 1000;
      double steps = std::isfinite(d.interval_s) ? std::round(d.interval_s / step_s) : 1e12;
      // Rounding must not undercut the write time.
      steps = std::max(steps, std::ceil(bounds.min_interval_s / step_s));
      d.every_steps = static_cast<int64_t>(std::clamp(steps, 1.0, 1e12));
    }
  }
  if (options_.max_every_steps > 0) {
    d.every_steps = std::min(d.every_steps, options_.max_every_steps);
  }
  return d;
}

std::optional<IntervalDecision> CheckpointPolicy::Evaluate(absl::Time now) {
  std::string reason;
  if (!evaluated_) {
    reason = "initial";
  } else if (loss_pending_) {
    reason = "loss";
  } else if (measure_pending_) {
    reason = "measured";
  } else if (now - last_evaluation_ >= options_.reevaluate_every) {
    reason = "periodic";
  } else {
    return std::nullopt;
  }
  Observe(now, running_);
  IntervalDecision d = Compute(now, reason);
  const bool changed = !evaluated_ || d.every_steps != every_steps_;
  const bool first_measurement = reason == "measured" && !measured_;
  if (d.cost_s >= 0) measured_ = true;
  evaluated_ = true;
  loss_pending_ = measure_pending_ = false;
  last_evaluation_ = now;
  every_steps_ = d.every_steps;
  last_ = d;
  if ((reason == "periodic" || reason == "measured") && !changed && !first_measurement) {
    return std::nullopt;
  }
  return d;
}

bool CheckpointPolicy::ShouldOrder(int64_t completed_steps, int64_t last_checkpoint_step) const {
  if (every_steps_ <= 0) return false;
  if (order_outstanding_ && last_checkpoint_step <= last_ordered_ &&
      completed_steps - last_ordered_ < 2 * every_steps_ + 10) {
    return false;
  }
  const int64_t anchor = std::max<int64_t>({0, last_checkpoint_step, last_ordered_});
  return completed_steps - anchor >= every_steps_;
}

}  // namespace spotrain::coordinator
