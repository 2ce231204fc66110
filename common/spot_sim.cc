#include "common/spot_sim.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"

namespace spotrain::common {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kHour = 3600;

absl::Status Invalid(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, " ", what));
}

// Seeds for trial i from the plan's seed: SplitMix64, so nearby seeds give unrelated
// streams.
uint64_t TrialSeed(uint64_t seed, uint64_t trial) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (trial + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Min-heap order for (time, slot): earliest first, lower slot first on ties.
struct LaterEvent {
  bool operator()(const std::pair<double, int>& a, const std::pair<double, int>& b) const {
    return a.first != b.first ? a.first > b.first : a.second > b.second;
  }
};

}  // namespace

// ---- Capacity traces ---------------------------------------------------------------------

absl::StatusOr<CapacityTrace> ParseCapacityTrace(absl::string_view text, absl::string_view source) {
  CapacityTrace trace;
  int line_number = 0;
  bool seen_data = false;
  int64_t previous_ms = -1;
  for (absl::string_view raw : absl::StrSplit(text, '\n')) {
    ++line_number;
    absl::string_view line = absl::StripAsciiWhitespace(raw);
    if (line.empty() || line[0] == '#') continue;
    if (!seen_data && line == "time_ms,live_instances") {
      seen_data = true;  // the header may only come first
      continue;
    }
    seen_data = true;
    auto fail = [&](absl::string_view why) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "trace %s line %d: %s (expected \"time_ms,live_instances\", two integers such as "
          "\"60000,19\"; got \"%s\")",
          source, line_number, why, line.substr(0, 80)));
    };
    std::vector<absl::string_view> fields = absl::StrSplit(line, ',');
    if (fields.size() != 2) {
      return fail(absl::StrFormat("%d field(s) instead of 2", fields.size()));
    }
    int64_t time_ms = 0;
    int64_t live = 0;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(fields[0]), &time_ms)) {
      return fail("the time is not an integer");
    }
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(fields[1]), &live)) {
      return fail("the live count is not an integer");
    }
    if (time_ms < 0) return fail("the time is negative");
    if (live < 0 || live > 1000000) return fail("the live count is outside 0..1000000");
    if (time_ms < previous_ms) {
      return fail(
          absl::StrFormat("the time goes backwards (%d ms after %d ms)", time_ms, previous_ms));
    }
    const double time_s = static_cast<double>(time_ms) / 1000.0;
    if (time_ms == previous_ms) {
      trace.points.back().live = static_cast<int>(live);  // same instant: merge
    } else {
      trace.points.push_back({time_s, static_cast<int>(live)});
    }
    previous_ms = time_ms;
  }
  if (trace.points.size() < 2) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "trace %s: %d distinct time(s); a trace needs at least two", source, trace.points.size()));
  }
  int peak = 0;
  for (const TracePoint& p : trace.points) peak = std::max(peak, p.live);
  if (peak == 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("trace %s: no instance is ever live", source));
  }
  return trace;
}

absl::StatusOr<TraceStats> SummarizeTrace(const CapacityTrace& trace) {
  TraceStats stats;
  const std::vector<TracePoint>& p = trace.points;
  for (const TracePoint& point : p) stats.peak = std::max(stats.peak, point.live);
  size_t start = 0;
  while (start < p.size() && p[start].live != stats.peak) ++start;
  if (stats.peak == 0 || start + 1 >= p.size()) {
    return absl::InvalidArgumentError(
        "the trace has no replay window: its fleet reaches its peak only at the last point");
  }
  stats.window_start_s = p[start].time_s;
  stats.window_s = p.back().time_s - p[start].time_s;
  stats.min_live = stats.peak;
  double live_s = 0;
  double missing_s = 0;
  for (size_t i = start + 1; i < p.size(); ++i) {
    const double dt = p[i].time_s - p[i - 1].time_s;
    live_s += p[i - 1].live * dt;
    missing_s += (stats.peak - p[i - 1].live) * dt;
    const int change = p[i].live - p[i - 1].live;
    if (change < 0) {
      ++stats.loss_events;
      stats.losses += -change;
    } else if (change > 0) {
      ++stats.return_events;
      stats.returns += change;
    }
    stats.min_live = std::min(stats.min_live, p[i].live);
  }
  stats.live_instance_hours = live_s / kHour;
  if (stats.live_instance_hours > 0) {
    stats.loss_rate_per_instance_hour = stats.losses / stats.live_instance_hours;
  }
  if (stats.losses > 0) stats.mean_missing_s = missing_s / stats.losses;
  return stats;
}

// ---- Capacity models ---------------------------------------------------------------------

absl::StatusOr<CapacityProcess> CapacityProcess::Create(const CapacityModel& model, int gpus,
                                                        uint64_t seed) {
  if (gpus < 1 || gpus > 1000000) return Invalid("gpus", "must be in 1..1000000");
  CapacityProcess process;
  process.gpus_ = gpus;
  process.rng_.seed(seed);
  if (model.trace != nullptr) {
    ASSIGN_OR_RETURN(TraceStats stats, SummarizeTrace(*model.trace));
    process.replay_ = true;
    const int scale = (gpus + stats.peak - 1) / stats.peak;
    process.pool_ = stats.peak * scale;
    process.period_s_ = stats.window_s;
    for (const TracePoint& p : model.trace->points) {
      if (p.time_s < stats.window_start_s) continue;
      process.window_.push_back({p.time_s - stats.window_start_s, p.live * scale});
    }
    process.offset_s_ = model.trace_start_s >= 0 ? std::fmod(model.trace_start_s, process.period_s_)
                                                 : process.Uniform() * process.period_s_;
    // The fleet at the offset: the last point at or before it.
    size_t i = 0;
    while (i + 1 < process.window_.size() && process.window_[i + 1].time_s <= process.offset_s_) {
      ++i;
    }
    process.fleet_ = process.window_[i].live;
    process.next_index_ = i + 1;
    // The job holds `gpus` random slots of the pool; those among the live ones are up.
    process.live_ = process.Hypergeometric(process.pool_, gpus, process.fleet_);
    return process;
  }
  if (!(model.loss_rate_per_hour >= 0) || std::isinf(model.loss_rate_per_hour)) {
    return Invalid("preemption rate", "must be a finite number >= 0 (per instance-hour)");
  }
  if (!(model.replacement_s >= 0) || std::isinf(model.replacement_s)) {
    return Invalid("replacement time", "must be a finite number of seconds >= 0");
  }
  process.rate_per_s_ = model.loss_rate_per_hour / kHour;
  process.replacement_s_ = model.replacement_s;
  process.live_ = gpus;
  process.slot_alive_.assign(gpus, true);
  if (process.rate_per_s_ > 0) {
    for (int s = 0; s < gpus; ++s) {
      process.heap_.push_back({process.Exponential(1 / process.rate_per_s_), s});
    }
    std::make_heap(process.heap_.begin(), process.heap_.end(), LaterEvent());
  }
  return process;
}

double CapacityProcess::Uniform() {
  // 53 random bits: the same value on every platform for a given seed.
  return static_cast<double>(rng_() >> 11) * 0x1.0p-53;
}

double CapacityProcess::Exponential(double mean_s) {
  if (mean_s <= 0) return 0;
  return -mean_s * std::log1p(-Uniform());
}

int CapacityProcess::Hypergeometric(int population, int successes, int draws) {
  int drawn = 0;
  for (int i = 0; i < draws && successes > 0 && population > 0; ++i) {
    if (Uniform() * population < successes) {
      ++drawn;
      --successes;
    }
    --population;
  }
  return drawn;
}

double CapacityProcess::next_time_s() const {
  if (replay_) {
    const size_t n = window_.size();
    const double cycle_start = static_cast<double>(cycle_) * period_s_ - offset_s_;
    if (next_index_ < n) return cycle_start + window_[next_index_].time_s;
    return cycle_start + period_s_;  // the next cycle's first point
  }
  return heap_.empty() ? kInf : heap_.front().first;
}

int CapacityProcess::Advance() {
  if (replay_) {
    if (next_index_ >= window_.size()) {
      ++cycle_;
      next_index_ = 0;
    }
    const int target = window_[next_index_++].live;
    if (target < fleet_) {
      // k random live slots go; ours among them are lost.
      live_ -= Hypergeometric(fleet_, live_, fleet_ - target);
    } else if (target > fleet_) {
      // k random missing slots come back; ours among them rejoin.
      live_ += Hypergeometric(pool_ - fleet_, gpus_ - live_, target - fleet_);
    }
    fleet_ = target;
    return live_;
  }
  // Independent instances: the slot with the earliest change flips.
  if (heap_.empty()) return live_;
  std::pop_heap(heap_.begin(), heap_.end(), LaterEvent());
  auto [now, slot] = heap_.back();
  if (slot_alive_[slot]) {
    slot_alive_[slot] = false;
    --live_;
    heap_.back().first = now + Exponential(replacement_s_);
  } else {
    slot_alive_[slot] = true;
    ++live_;
    heap_.back().first = now + Exponential(1 / rate_per_s_);
  }
  std::push_heap(heap_.begin(), heap_.end(), LaterEvent());
  return live_;
}

absl::StatusOr<CapacityStats> MeasureCapacity(const CapacityModel& model, int gpus, uint64_t seed,
                                              double horizon_s) {
  if (!(horizon_s > 0) || std::isinf(horizon_s)) {
    return Invalid("horizon", "must be a finite number of seconds > 0");
  }
  ASSIGN_OR_RETURN(CapacityProcess process, CapacityProcess::Create(model, gpus, seed));
  CapacityStats stats;
  stats.horizon_s = horizon_s;
  double t = 0;
  double live_s = 0;
  int live = process.live();
  while (true) {
    const double next = std::min(process.next_time_s(), horizon_s);
    live_s += live * (next - t);
    t = next;
    if (t >= horizon_s) break;
    const int now = process.Advance();
    if (now < live) {
      ++stats.loss_events;
      stats.losses += live - now;
      if (now == 0) ++stats.wipes;
    } else if (now > live) {
      ++stats.return_events;
    }
    live = now;
  }
  stats.mean_live = live_s / horizon_s;
  return stats;
}

double IndependentWipeMtbiSeconds(int gpus, double loss_rate_per_hour, double replacement_s) {
  if (gpus < 1 || !(loss_rate_per_hour > 0)) return kInf;
  const double r = loss_rate_per_hour / kHour;
  const double rd = r * replacement_s;
  const double q = rd / (1 + rd);
  // q^(gpus-1) underflows to 0 for large fleets: the wipe rate is then 0 and M infinite.
  const double rate = gpus * (1 - q) * std::pow(q, gpus - 1) * r;
  return rate > 0 ? 1 / rate : kInf;
}

// ---- One job -----------------------------------------------------------------------------

const char* RecoveryName(Recovery recovery) {
  return recovery == Recovery::kPeer ? "peer" : "restart";
}

absl::Status ValidateJobSpec(const JobSpec& job) {
  auto non_negative = [](double v) { return v >= 0 && std::isfinite(v); };
  if (job.gpus < 1 || job.gpus > 1000000) return Invalid("gpus", "must be in 1..1000000");
  if (!(job.work_gpu_s > 0) || std::isinf(job.work_gpu_s)) {
    return Invalid("work", "must be a finite number of GPU-hours > 0");
  }
  if (!(job.step_s > 0) || std::isinf(job.step_s)) {
    return Invalid("step_seconds", "must be a finite number > 0");
  }
  if (!non_negative(job.checkpoint_cost_s)) return Invalid("checkpoint_cost_s", "must be >= 0");
  if (!non_negative(job.restore_cost_s)) return Invalid("restore_cost_s", "must be >= 0");
  if (!non_negative(job.notice_s)) return Invalid("notice_s", "must be >= 0");
  if (!non_negative(job.peer_recovery_s)) return Invalid("peer_recovery_s", "must be >= 0");
  if (!non_negative(job.restart_overhead_s)) {
    return Invalid("restart_overhead_s", "must be >= 0");
  }
  if (job.min_gpus < 1 || job.min_gpus > job.gpus) {
    return Invalid("min_gpus", absl::StrFormat("must be in 1..gpus (%d)", job.gpus));
  }
  if (!non_negative(job.max_wall_s)) return Invalid("max_wall_s", "must be >= 0");
  if (!std::isfinite(job.join_recovery_s)) return Invalid("join_recovery_s", "must be finite");
  if (!non_negative(job.join_delay_s)) return Invalid("join_delay_s", "must be >= 0");
  if (job.checkpoint_every_steps < 0) return Invalid("checkpoint_every_steps", "must be >= 0");
  if (!job.step_s_by_live.empty()) {
    if (job.step_s_by_live.size() != static_cast<size_t>(job.gpus) + 1) {
      return Invalid("step_s_by_live",
                     absl::StrFormat("must give the step time for each of 1..%d live", job.gpus));
    }
    if (job.step_s_by_live[job.gpus] != job.step_s) {
      return Invalid("step_s", "must equal step_s_by_live[gpus] when step_s_by_live is given");
    }
    for (int k = 1; k <= job.gpus; ++k) {
      const double s = job.step_s_by_live[k];
      if (!(s > 0) || std::isinf(s)) {
        return Invalid("step_s_by_live", absl::StrFormat("for %d live must be > 0 s", k));
      }
    }
  }
  return absl::OkStatus();
}

namespace {

// The discrete-event simulation of one job. Between events the job is in one of three
// states: running (progress at Rate() GPU-seconds per second), stalled (instances up and
// paid, no progress: a checkpoint, a recovery, a restart, a newcomer still joining, or
// fewer than min_gpus working), or waiting (no instance). Events: capacity changes, a
// newcomer joining, the end of a stall, a checkpoint falling due and the end of the work.
// Work is counted in GPU-seconds of the full job: one step is step_s * gpus of it.
class JobSimulation {
 public:
  JobSimulation(const JobSpec& job, Recovery recovery, double interval_s, CapacityProcess capacity,
                std::vector<TimelinePoint>* timeline)
      : job_(job),
        recovery_(recovery),
        interval_s_(interval_s),
        capacity_(std::move(capacity)),
        timeline_(timeline),
        step_work_(job.step_s * job.gpus),
        join_recovery_s_(job.join_recovery_s >= 0 ? job.join_recovery_s : job.peer_recovery_s),
        delayed_joins_(recovery == Recovery::kPeer && job.join_delay_s > 0) {}

  SimResult Run() {
    const double ideal = job_.work_gpu_s / job_.gpus;
    const double horizon =
        job_.max_wall_s > 0 ? job_.max_wall_s : std::max(50 * ideal, ideal + 7 * 24 * kHour);
    live_ = capacity_.live();
    if (delayed_joins_) {
      joining_.assign(live_, job_.join_delay_s);  // the first instances start too
    } else {
      working_ = live_;
    }
    Record();
    while (true) {
      const bool running = Running();
      const double rate = Rate(working_);
      const double t_capacity = capacity_.next_time_s();
      const double t_join = joining_.empty() ? kInf : joining_.front();
      const double t_busy = live_ > 0 && busy_until_ > t_ ? busy_until_ : kInf;
      const double t_finish = running ? t_ + (job_.work_gpu_s - progress_) / rate : kInf;
      const double t_checkpoint = running ? NextCheckpoint(rate) : kInf;
      const double next =
          std::min({t_capacity, t_join, t_busy, t_finish, t_checkpoint, std::max(horizon, t_)});

      const double dt = next - t_;
      result_.paid_gpu_s += live_ * dt;
      if (running) {
        ever_ran_ = true;
        progress_ += rate * dt;
        since_checkpoint_ += dt;
      } else if (live_ > 0) {
        result_.stalled_s += dt;
      } else {
        result_.waiting_s += dt;
      }
      t_ = next;

      if (running && t_finish <= next) {
        progress_ = job_.work_gpu_s;
        result_.finished = true;
        break;
      }
      if (t_ >= horizon) break;
      if (ckpt_in_flight_ && busy_until_ <= t_) {
        committed_ = ckpt_progress_;
        ckpt_in_flight_ = false;
        ++result_.checkpoints;
      }
      if (running && t_checkpoint <= next) StartCheckpoint();
      int joined = 0;
      while (!joining_.empty() && joining_.front() <= t_) {
        joining_.pop_front();
        ++joined;
      }
      if (joined > 0) Joined(joined);
      while (capacity_.next_time_s() <= t_) OnCapacity(capacity_.Advance());
      Record();
    }
    result_.wall_s = t_;
    Record();
    return result_;
  }

 private:
  bool Running() const { return working_ >= job_.min_gpus && t_ >= busy_until_ && !needs_restore_; }

  // Seconds per step with `k` instances working (k >= 1).
  double StepSeconds(int k) const {
    if (!job_.step_s_by_live.empty()) return job_.step_s_by_live[k];
    return job_.step_s * job_.gpus / k;
  }
  // GPU-seconds of the job's work done per second with `k` working.
  double Rate(int k) const { return k > 0 ? step_work_ / StepSeconds(k) : 0; }

  double NextCheckpoint(double rate) const {
    if (job_.checkpoint_every_steps > 0) {
      const double target = static_cast<double>(checkpoint_index_ + 1) *
                            static_cast<double>(job_.checkpoint_every_steps) * step_work_;
      return t_ + std::max(0.0, target - progress_) / rate;
    }
    return std::isfinite(interval_s_) ? t_ + (interval_s_ - since_checkpoint_) : kInf;
  }

  // The checkpoint multiple at or below `progress` (steps mode).
  int64_t CheckpointIndex(double progress) const {
    if (job_.checkpoint_every_steps <= 0) return 0;
    const double every = static_cast<double>(job_.checkpoint_every_steps) * step_work_;
    return static_cast<int64_t>(std::floor(progress / every + 1e-6));
  }

  void Record() {
    if (timeline_ == nullptr) return;
    timeline_->push_back({t_, progress_ / step_work_, live_, working_});
  }

  void StartCheckpoint() {
    since_checkpoint_ = 0;
    ckpt_progress_ = progress_;
    checkpoint_index_ = CheckpointIndex(progress_);
    if (job_.checkpoint_cost_s == 0) {
      committed_ = progress_;
      ++result_.checkpoints;
      return;
    }
    ckpt_in_flight_ = true;
    busy_until_ = t_ + job_.checkpoint_cost_s;
  }

  // Rolls back to the last committed checkpoint. With `checkpoint_first` and a notice long
  // enough to write one, the job checkpoints just before the loss instead and loses only
  // the work that checkpoint's stall displaced.
  void RollBack(int working_before, bool checkpoint_first) {
    double lost = progress_ - committed_;
    if (checkpoint_first && job_.notice_s >= job_.checkpoint_cost_s && lost > 0) {
      lost = std::min(lost, job_.checkpoint_cost_s * Rate(working_before));
      committed_ = progress_ - lost;
      ++result_.emergency_checkpoints;
    }
    result_.lost_gpu_s += lost;
    progress_ = committed_;
    ckpt_in_flight_ = false;
    since_checkpoint_ = 0;
    checkpoint_index_ = CheckpointIndex(committed_);
  }

  void OnCapacity(int now) {
    const int before = live_;
    if (now == before) return;
    const bool was_running = Running();
    live_ = now;
    if (now < before) {
      ++result_.loss_events;
      result_.losses += before - now;
    } else {
      ++result_.return_events;
    }
    if (recovery_ == Recovery::kRestart) {
      if (now == 0) ++result_.wipes;
      working_ = now;
      // torchrun: any change, loss or join, stops every worker (no notice handling); they
      // start again from the last checkpoint once at least min_gpus are there.
      RollBack(before, /*checkpoint_first=*/false);
      busy_until_ = t_;
      if (live_ >= job_.min_gpus && ever_ran_) {
        ++result_.restarts;
        const double restore = committed_ > 0 ? job_.restore_cost_s : 0;
        busy_until_ = t_ + job_.restart_overhead_s + restore;
      }
      return;
    }
    // Peer recovery.
    if (now > before) {
      if (delayed_joins_) {
        joining_.insert(joining_.end(), now - before, t_ + job_.join_delay_s);
      } else {
        Joined(now - before);
      }
      return;
    }
    // A loss hits working instances first, then newcomers that have not joined yet.
    const int working_before = working_;
    const int from_working = std::min(before - now, working_);
    for (int i = from_working; i < before - now && !joining_.empty(); ++i) joining_.pop_front();
    if (from_working == 0) return;  // only newcomers: the group does not notice
    working_ -= from_working;
    if (working_ == 0) {  // a full wipe: nobody holds the state any more
      ++result_.wipes;
      RollBack(working_before, /*checkpoint_first=*/true);
      needs_restore_ = true;
      busy_until_ = t_;
      return;
    }
    // The survivors redo the interrupted step, unless the notice let the leaver finish it
    // and leave at its end.
    if (was_running && !(job_.notice_s > 0 && job_.notice_s >= StepSeconds(working_before))) {
      const double lost = std::fmod(progress_, step_work_);
      progress_ -= lost;
      result_.lost_gpu_s += lost;
    }
    ++result_.peer_recoveries;
    busy_until_ = std::max(busy_until_, t_ + job_.peer_recovery_s);
  }

  // `k` instances start working (at once, or after join_delay_s).
  void Joined(int k) {
    working_ += k;
    if (needs_restore_) {
      if (working_ < job_.min_gpus) return;
      needs_restore_ = false;
      ++result_.restarts;
      const double restore = committed_ > 0 ? job_.restore_cost_s : 0;
      busy_until_ = t_ + restore + (ever_ran_ ? job_.peer_recovery_s : 0);
      return;
    }
    if (!ever_ran_) return;     // the job's first instances arriving
    ++result_.peer_recoveries;  // joiners get the state by broadcast
    busy_until_ = std::max(busy_until_, t_ + join_recovery_s_);
  }

  const JobSpec job_;
  const Recovery recovery_;
  const double interval_s_;
  CapacityProcess capacity_;
  std::vector<TimelinePoint>* const timeline_;
  const double step_work_;  // GPU-seconds of work in one step
  const double join_recovery_s_;
  const bool delayed_joins_;
  SimResult result_;
  double t_ = 0;
  int live_ = 0;                // instances paid
  int working_ = 0;             // of them in the group (live_ minus those still joining)
  std::deque<double> joining_;  // when each newcomer starts working, earliest first
  bool ever_ran_ = false;
  bool needs_restore_ = false;    // peer: wiped, waiting for min_gpus to load the checkpoint
  double progress_ = 0;           // GPU-seconds of useful work done
  double committed_ = 0;          // progress in the last committed checkpoint
  double since_checkpoint_ = 0;   // running seconds since the last checkpoint started
  int64_t checkpoint_index_ = 0;  // steps mode: the multiple of the last checkpoint
  double busy_until_ = 0;
  bool ckpt_in_flight_ = false;
  double ckpt_progress_ = 0;  // progress of the checkpoint in flight
};

}  // namespace

absl::StatusOr<SimResult> SimulateRun(const JobSpec& job, Recovery recovery, double interval_s,
                                      CapacityProcess capacity,
                                      std::vector<TimelinePoint>* timeline) {
  RETURN_IF_ERROR(ValidateJobSpec(job));
  if (!(interval_s > 0)) return Invalid("checkpoint interval", "must be > 0 s");
  if (capacity.gpus() != job.gpus) {
    return Invalid("capacity", "was made for a different number of GPUs than the job");
  }
  return JobSimulation(job, recovery, interval_s, std::move(capacity), timeline).Run();
}

// ---- The plan ----------------------------------------------------------------------------

namespace {

Distribution Summarize(std::vector<double> values) {
  Distribution d;
  if (values.empty()) return d;
  std::sort(values.begin(), values.end());
  double sum = 0;
  for (double v : values) sum += v;
  d.mean = sum / values.size();
  // Nearest rank.
  auto at = [&](double q) {
    size_t rank = static_cast<size_t>(std::ceil(q * values.size()));
    return values[std::min(values.size() - 1, rank == 0 ? 0 : rank - 1)];
  };
  d.p10 = at(0.10);
  d.p50 = at(0.50);
  d.p90 = at(0.90);
  return d;
}

absl::Status ValidatePlanRequest(const PlanRequest& r) {
  auto price_ok = [](double p) { return p >= 0 && std::isfinite(p); };
  if (!price_ok(r.spot_price)) return Invalid("spot_price", "must be >= 0 (per GPU-hour)");
  if (!price_ok(r.on_demand_price)) {
    return Invalid("on_demand_price", "must be >= 0 (per GPU-hour)");
  }
  RETURN_IF_ERROR(ValidateJobSpec(r.job));
  if (!(r.interval_override_s >= 0) || std::isinf(r.interval_override_s)) {
    return Invalid("checkpoint_interval_s", "must be >= 0 (0: Young/Daly)");
  }
  if (!(r.max_interval_s > 0)) return Invalid("max_interval_s", "must be > 0");
  if (r.trials < 1 || r.trials > 100000) return Invalid("trials", "must be in 1..100000");
  return absl::OkStatus();
}

// Runs `trials` jobs of one spot mode and summarises them.
absl::StatusOr<ModeEstimate> EstimateMode(const PlanRequest& request, Recovery recovery,
                                          const IntervalChoice& choice, const std::string& basis,
                                          double ideal_wall_s) {
  ModeEstimate mode;
  mode.name = recovery == Recovery::kPeer ? "spot+spotrain" : "spot+restart";
  mode.price_per_gpu_hour = request.spot_price;
  mode.simulated = true;
  mode.interval = choice;
  mode.mtbi_basis = basis;
  mode.interval_overridden =
      request.interval_override_s > 0 || request.job.checkpoint_every_steps > 0;
  mode.interval_s = mode.interval_overridden ? request.interval_override_s : choice.interval_s;
  if (request.job.checkpoint_every_steps > 0) {  // in steps; shown as its full-fleet seconds
    mode.interval_s = static_cast<double>(request.job.checkpoint_every_steps) * request.job.step_s;
  }
  mode.trials = request.trials;
  std::vector<double> wall, cost;
  double goodput = 0, useful_per_paid = 0;
  for (int i = 0; i < request.trials; ++i) {
    ASSIGN_OR_RETURN(
        CapacityProcess capacity,
        CapacityProcess::Create(request.capacity, request.job.gpus, TrialSeed(request.seed, i)));
    std::vector<TimelinePoint>* timeline =
        i == 0 && recovery == Recovery::kPeer ? request.timeline : nullptr;
    ASSIGN_OR_RETURN(SimResult r, SimulateRun(request.job, recovery, mode.interval_s,
                                              std::move(capacity), timeline));
    if (r.finished) ++mode.finished;
    wall.push_back(r.wall_s);
    cost.push_back(r.paid_gpu_s / kHour * request.spot_price);
    goodput += ideal_wall_s / r.wall_s;
    useful_per_paid +=
        r.paid_gpu_s > 0 ? (r.finished ? request.job.work_gpu_s : 0) / r.paid_gpu_s : 0;
    mode.paid_gpu_s += r.paid_gpu_s;
    mode.lost_gpu_s += r.lost_gpu_s;
    mode.stalled_s += r.stalled_s;
    mode.waiting_s += r.waiting_s;
    mode.loss_events += r.loss_events;
    mode.wipes += r.wipes;
    mode.peer_recoveries += r.peer_recoveries;
    mode.restarts += r.restarts;
    mode.checkpoints += r.checkpoints;
  }
  const double n = request.trials;
  mode.wall_s = Summarize(wall);
  mode.cost = Summarize(cost);
  mode.goodput = goodput / n;
  mode.useful_per_paid = useful_per_paid / n;
  for (double* mean :
       {&mode.paid_gpu_s, &mode.lost_gpu_s, &mode.stalled_s, &mode.waiting_s, &mode.loss_events,
        &mode.wipes, &mode.peer_recoveries, &mode.restarts, &mode.checkpoints}) {
    *mean /= n;
  }
  return mode;
}

}  // namespace

absl::StatusOr<Plan> MakePlan(const PlanRequest& request) {
  RETURN_IF_ERROR(ValidatePlanRequest(request));
  const JobSpec& job = request.job;
  Plan plan;
  plan.recovery = request.recovery;
  plan.ideal_wall_s = job.work_gpu_s / job.gpus;

  // What the capacity does on its own, over a long horizon: enough fleet events to count
  // rare full wipes, bounded in work.
  double loss_rate = request.capacity.loss_rate_per_hour;
  double horizon_s = 0;
  if (request.capacity.trace != nullptr) {
    ASSIGN_OR_RETURN(plan.trace, SummarizeTrace(*request.capacity.trace));
    plan.has_trace_stats = true;
    loss_rate = plan.trace.loss_rate_per_instance_hour;
    const double events_per_cycle =
        std::max<double>(1, plan.trace.loss_events + plan.trace.return_events);
    horizon_s = plan.trace.window_s * std::clamp(2e5 / events_per_cycle, 10.0, 1000.0);
  } else {
    const double events_per_hour = 2.0 * job.gpus * loss_rate;
    horizon_s = events_per_hour > 0 ? std::min(2e5 / events_per_hour * kHour, 1e7 * kHour)
                                    : std::max(plan.ideal_wall_s, kHour);
  }
  plan.loss_rate_per_instance_hour = loss_rate;
  ASSIGN_OR_RETURN(plan.capacity,
                   MeasureCapacity(request.capacity, job.gpus, request.seed, horizon_s));

  // On demand: no interruption, no checkpoint needed, exact.
  plan.on_demand.name = "on-demand";
  plan.on_demand.price_per_gpu_hour = request.on_demand_price;
  plan.on_demand.trials = plan.on_demand.finished = 1;
  ASSIGN_OR_RETURN(plan.on_demand.interval,
                   ChooseCheckpointInterval(job.checkpoint_cost_s, kInf, {0, kInf}));
  plan.on_demand.interval_s = kInf;
  plan.on_demand.mtbi_basis = "no interruptions";
  const double on_demand_cost = job.work_gpu_s / kHour * request.on_demand_price;
  plan.on_demand.wall_s = {plan.ideal_wall_s, plan.ideal_wall_s, plan.ideal_wall_s,
                           plan.ideal_wall_s};
  plan.on_demand.cost = {on_demand_cost, on_demand_cost, on_demand_cost, on_demand_cost};
  plan.on_demand.goodput = plan.on_demand.useful_per_paid = 1;
  plan.on_demand.paid_gpu_s = job.work_gpu_s;

  // M for each spot mode. With no loss at all in the model, no periodic checkpoint is worth
  // its stall, and the cap does not apply either.
  const bool any_loss = loss_rate > 0;
  IntervalPolicy policy;
  policy.min_interval_s = job.step_s;
  policy.max_interval_s = any_loss ? std::max(request.max_interval_s, job.step_s) : kInf;

  double restart_mtbi = kInf;
  std::string restart_basis = "no losses in the capacity model";
  if (any_loss) {
    restart_mtbi = kHour / (job.gpus * loss_rate);
    restart_basis = absl::StrFormat("1/(gpus x rate) = 1/(%d x %.3g/h)", job.gpus, loss_rate);
  }
  double peer_mtbi = kInf;
  std::string peer_basis = "no losses in the capacity model";
  if (any_loss && request.capacity.trace != nullptr) {
    // Posterior mean under a flat prior on the wipe rate: (k + 1) / T.
    peer_mtbi = plan.capacity.horizon_s / (plan.capacity.wipes + 1);
    peer_basis = absl::StrFormat(
        "trace replay: %d full wipe(s) of %d instance(s) in %.0f h, M = T/(wipes+1)",
        plan.capacity.wipes, job.gpus, plan.capacity.horizon_s / kHour);
  } else if (any_loss) {
    peer_mtbi = IndependentWipeMtbiSeconds(job.gpus, loss_rate, request.capacity.replacement_s);
    peer_basis = absl::StrFormat(
        "full wipe of %d independent instance(s), replacement after %.0f s on average", job.gpus,
        request.capacity.replacement_s);
  }
  ASSIGN_OR_RETURN(IntervalChoice restart_choice,
                   ChooseCheckpointInterval(job.checkpoint_cost_s, restart_mtbi, policy));
  ASSIGN_OR_RETURN(IntervalChoice peer_choice,
                   ChooseCheckpointInterval(job.checkpoint_cost_s, peer_mtbi, policy));

  ASSIGN_OR_RETURN(plan.spotrain, EstimateMode(request, Recovery::kPeer, peer_choice, peer_basis,
                                               plan.ideal_wall_s));
  ASSIGN_OR_RETURN(plan.restart, EstimateMode(request, Recovery::kRestart, restart_choice,
                                              restart_basis, plan.ideal_wall_s));
  return plan;
}

}  // namespace spotrain::common
