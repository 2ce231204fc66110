// What a training job costs on spot capacity, and how long it takes: spot capacity traces,
// a seeded discrete-event simulation of one job on a fleet that loses and regains
// instances, and the planner behind `spotrain plan` that compares on-demand, spot with
// spotrain's peer recovery, and spot with checkpoint-restart (docs/planner.md has the model
// and its assumptions). No I/O, no threads, no clock: every function is a pure function of
// its arguments (and of the seed), so the same inputs give bit-identical results.
// Thread-safe: no shared state; a CapacityProcess is a value owned by one caller.
#ifndef SPOTRAIN_COMMON_SPOT_SIM_H_
#define SPOTRAIN_COMMON_SPOT_SIM_H_

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/young_daly.h"

namespace spotrain::common {

// ---- Capacity traces ---------------------------------------------------------------------

// The fleet size just after an instant at which it changed.
struct TracePoint {
  double time_s = 0;
  int live = 0;
};

// A spot availability trace: the number of live instances over time. Points have strictly
// increasing times (input lines sharing a time are merged: a drop of k at one time is k
// instances preempted at once).
struct CapacityTrace {
  std::vector<TracePoint> points;
};

// Parses the `time_ms,live_instances` format of ../shared/traces/ (one event per line, time
// in integer milliseconds since the start, live count just after the event). Blank lines
// and lines starting with '#' are skipped; the first line may be the header
// `time_ms,live_instances`. Errors are kInvalidArgument naming `source` and the line:
// a malformed line, a negative value, a time earlier than the line before, or a trace
// with fewer than two distinct times or no live instance at all.
absl::StatusOr<CapacityTrace> ParseCapacityTrace(absl::string_view text, absl::string_view source);

// What a trace says about preemptions over its replay window: from the first time the
// fleet reaches its peak to the last point (the ramp-up before is acquisition, not loss).
struct TraceStats {
  int peak = 0;
  int min_live = 0;  // within the window
  double window_start_s = 0;
  double window_s = 0;
  int64_t loss_events = 0;    // instants at which the fleet shrank
  int64_t losses = 0;         // instances lost in them
  int64_t return_events = 0;  // instants at which it grew
  int64_t returns = 0;
  double live_instance_hours = 0;
  // losses / live_instance_hours: the hazard of one live instance.
  double loss_rate_per_instance_hour = 0;
  // Missing instance-seconds (peak - live, integrated) per loss: how long lost capacity
  // stays away on average.
  double mean_missing_s = 0;
};

// kInvalidArgument when the window is empty (the peak is only reached at the last point).
absl::StatusOr<TraceStats> SummarizeTrace(const CapacityTrace& trace);

// ---- Capacity models ---------------------------------------------------------------------

// Where the job's instances come from. Either independent instances (the default) or the
// replay of a trace.
struct CapacityModel {
  // Independent instances: each live instance is preempted at this rate (per live
  // instance-hour, exponential inter-arrival); a lost instance's capacity comes back after
  // an exponential delay of mean `replacement_s` (0: at once).
  double loss_rate_per_hour = 0;
  double replacement_s = 1800;
  // Replay (when set, the two fields above are ignored). The trace's fleet is the pool the
  // job draws from: the job holds `gpus` of its instance slots, picked at random; a drop
  // of k instances hits k random live slots, a rise revives k random missing ones. Fleets
  // smaller than `gpus` are scaled up by ceil(gpus / peak) (each event then moves that
  // many instances). The window (see TraceStats) is replayed in a loop from a random offset.
  std::shared_ptr<const CapacityTrace> trace;
  // Where in the window the replay starts (seconds from the window start, taken modulo its
  // length); < 0: a random offset drawn from the seed.
  double trace_start_s = -1;
};

// The job's live instance count over time under a CapacityModel: a seeded stream of
// changes, independent of what the job does with them (so two recovery strategies run
// with the same seed see the same capacity).
class CapacityProcess {
 public:
  // kInvalidArgument for gpus < 1, a negative or NaN rate or replacement time, or a trace
  // that SummarizeTrace rejects.
  static absl::StatusOr<CapacityProcess> Create(const CapacityModel& model, int gpus,
                                                uint64_t seed);

  int gpus() const { return gpus_; }
  // Live instances of the job now (0..gpus).
  int live() const { return live_; }
  // Time of the next change of the fleet (the job's count may stay the same); +infinity
  // when nothing will ever change.
  double next_time_s() const;
  // Applies the next change; returns the job's new live count.
  int Advance();

 private:
  CapacityProcess() = default;
  double Uniform();  // [0, 1)
  double Exponential(double mean_s);
  int Hypergeometric(int population, int successes, int draws);

  int gpus_ = 0;
  int live_ = 0;
  std::mt19937_64 rng_;
  // Independent instances.
  bool replay_ = false;
  double rate_per_s_ = 0;
  double replacement_s_ = 0;
  // Min-heap of (time of the slot's next change, slot): earliest first, lower slot on ties.
  std::vector<std::pair<double, int>> heap_;
  std::vector<bool> slot_alive_;
  // Replay.
  std::vector<TracePoint> window_;  // times relative to the window start, fleet scaled
  double period_s_ = 0;
  double offset_s_ = 0;
  int64_t cycle_ = 0;
  size_t next_index_ = 0;
  int pool_ = 0;   // instance slots in the (scaled) fleet
  int fleet_ = 0;  // live slots in the fleet now
};

// What a capacity process does over a long horizon (no job involved).
struct CapacityStats {
  double horizon_s = 0;
  int64_t loss_events = 0;  // changes that lowered the job's count
  int64_t losses = 0;
  int64_t return_events = 0;  // changes that raised it
  int64_t wipes = 0;          // changes that took it to zero
  double mean_live = 0;       // time-averaged live instances of the job
};
absl::StatusOr<CapacityStats> MeasureCapacity(const CapacityModel& model, int gpus, uint64_t seed,
                                              double horizon_s);

// Mean time between full wipes (all `gpus` instances missing at once) of independent
// instances: in steady state each instance is missing with probability q = r D / (1 + r D)
// (r the loss rate, D the mean replacement delay), and the process enters "all missing" at
// rate gpus * (1 - q) * q^(gpus - 1) * r. Seconds; +infinity when it never happens (r = 0,
// or D = 0 with two or more instances).
double IndependentWipeMtbiSeconds(int gpus, double loss_rate_per_hour, double replacement_s);

// ---- One job -----------------------------------------------------------------------------

enum class Recovery {
  // spotrain: survivors carry on from memory (a loss costs the step in flight plus
  // `peer_recovery_s`; a join costs `peer_recovery_s`); only a full wipe rolls back to the
  // last checkpoint (`restore_cost_s` + `peer_recovery_s` once min_gpus are back).
  kPeer,
  // Checkpoint-restart (torchrun elastic): every membership change, loss or join, stops
  // every worker and rolls back to the last checkpoint; they restart
  // (`restart_overhead_s` + `restore_cost_s`) once at least min_gpus are live. No notice
  // handling.
  kRestart,
};
const char* RecoveryName(Recovery recovery);  // "peer" or "restart"

struct JobSpec {
  int gpus = 1;
  // Useful work: GPU-seconds (a job of H GPU-hours on N GPUs takes H/N hours at best).
  // Throughput is proportional to the live instances.
  double work_gpu_s = 0;
  // Wall seconds of one step with all `gpus` live (gpus/live times that with fewer).
  double step_s = 1;
  // Training stalls this long per checkpoint (spotrain: the snapshot; writes are async).
  double checkpoint_cost_s = 10;
  // Loading the last checkpoint after a rollback.
  double restore_cost_s = 30;
  // Warning before a preemption (peer recovery only: torchrun does nothing with it). A
  // notice of at least one step lets a leaving instance finish its step (nothing lost); a
  // notice of at least checkpoint_cost_s turns a full wipe's rollback into a checkpoint
  // taken just before it (only checkpoint_cost_s of work lost).
  double notice_s = 0;
  // Fewer live instances than this: no training (torchrun's --nnodes MIN, spotrain's
  // min_workers). Instances held meanwhile are paid. 1..gpus.
  int min_gpus = 1;
  // Peer recovery: survivors rebuild their group and redo the interrupted step.
  double peer_recovery_s = 1;
  // Peer recovery: the stall of every worker when joiners switch in (group rebuild and the
  // broadcast of the state to them); < 0: peer_recovery_s.
  double join_recovery_s = -1;
  // Peer recovery: an instance that appears (also the first ones at time 0) does no work
  // for this long: process start, Join, the coordinator's settle window, the switch at a
  // step boundary. Paid meanwhile; the others keep training. A loss hits working
  // instances first (the longest-running), then these newcomers, oldest first.
  double join_delay_s = 0;
  // Optional measured step times: step_s_by_live[k] = seconds per step with k instances
  // working (k = 1..gpus; index 0 unused). Empty: step_s * gpus / k (linear scaling).
  // When set, step_s must equal step_s_by_live[gpus] (the ideal wall time uses it).
  std::vector<double> step_s_by_live;
  // > 0: checkpoint whenever progress reaches a multiple of this many steps (the
  // coordinator's checkpoint.every_steps) instead of after every interval of compute.
  int64_t checkpoint_every_steps = 0;
  // Checkpoint-restart: detection, process restart and rendezvous, before the restore.
  double restart_overhead_s = 45;
  // Give up (finished = false) at this wall time; 0: 50x the ideal wall time, at least 7 days.
  double max_wall_s = 0;
};

// kInvalidArgument naming the field when a JobSpec is unusable.
absl::Status ValidateJobSpec(const JobSpec& job);

struct SimResult {
  bool finished = false;
  double wall_s = 0;          // to completion (or the give-up time)
  double paid_gpu_s = 0;      // live instances integrated over the wall time
  double lost_gpu_s = 0;      // work done and then lost (rollbacks, interrupted steps)
  double stalled_s = 0;       // instances up, no progress: checkpoints, recoveries, restarts
  double waiting_s = 0;       // no instance at all
  int64_t loss_events = 0;    // changes that lowered the live count
  int64_t losses = 0;         // instances lost
  int64_t return_events = 0;  // changes that raised it
  int64_t wipes = 0;          // the live count reached zero
  int64_t peer_recoveries = 0;
  int64_t restarts = 0;               // checkpoint-restarts (restart mode; restores after wipes)
  int64_t checkpoints = 0;            // committed periodic checkpoints
  int64_t emergency_checkpoints = 0;  // taken on a notice
};

// Runs one job to completion under `capacity` (consumed), checkpointing after every
// `interval_s` of compute (+infinity: never; ignored with job.checkpoint_every_steps).
// Errors: ValidateJobSpec's, interval_s <= 0.
// One point of a run's timeline: after an event at time_s, `steps` of useful progress
// (work done so far, in steps of the whole job: progress / (step_s * gpus)), `live`
// instances paid and `working` of them in the group.
struct TimelinePoint {
  double time_s = 0;
  double steps = 0;
  int live = 0;
  int working = 0;
};

// With `timeline`, also appends a point after every event (and at the end).
absl::StatusOr<SimResult> SimulateRun(const JobSpec& job, Recovery recovery, double interval_s,
                                      CapacityProcess capacity,
                                      std::vector<TimelinePoint>* timeline = nullptr);

// ---- The plan ----------------------------------------------------------------------------

struct PlanRequest {
  double spot_price = 0;       // per GPU-hour
  double on_demand_price = 0;  // per GPU-hour
  JobSpec job;
  CapacityModel capacity;
  // The recovery the recommendation is for.
  Recovery recovery = Recovery::kPeer;
  // > 0: checkpoint every this many seconds in both spot modes instead of Young/Daly.
  double interval_override_s = 0;
  // Cap on the Young/Daly interval (seconds): the most work a rollback may cost when the
  // estimate of M is wrong. The floor is one step.
  double max_interval_s = 3600;
  int trials = 200;
  uint64_t seed = 1;
  // When set, trial 0 of spot+spotrain appends its timeline here (see SimulateRun).
  std::vector<TimelinePoint>* timeline = nullptr;
};

struct Distribution {
  double mean = 0;
  double p10 = 0;
  double p50 = 0;
  double p90 = 0;
};

struct ModeEstimate {
  std::string name;  // "on-demand", "spot+spotrain", "spot+restart"
  double price_per_gpu_hour = 0;
  bool simulated = false;   // on-demand is exact, not simulated
  IntervalChoice interval;  // Young/Daly for this mode (interval_s may be +infinity)
  bool interval_overridden = false;
  double interval_s = 0;   // what the simulation used
  std::string mtbi_basis;  // how M was estimated, in words
  int trials = 0;
  int finished = 0;  // trials that finished before max_wall_s
  Distribution wall_s;
  Distribution cost;
  double goodput = 0;          // mean of ideal wall time / wall time
  double useful_per_paid = 0;  // mean of useful GPU-hours / paid GPU-hours
  // Means over the trials.
  double paid_gpu_s = 0;
  double lost_gpu_s = 0;
  double stalled_s = 0;
  double waiting_s = 0;
  double loss_events = 0;
  double wipes = 0;
  double peer_recoveries = 0;
  double restarts = 0;
  double checkpoints = 0;
};

struct Plan {
  double ideal_wall_s = 0;  // work / gpus
  // The capacity the job sees, measured on the capacity process alone over a long horizon.
  CapacityStats capacity;
  double loss_rate_per_instance_hour = 0;  // the model's rate, or the trace's
  bool has_trace_stats = false;
  TraceStats trace;
  ModeEstimate on_demand;
  ModeEstimate spotrain;
  ModeEstimate restart;
  Recovery recovery = Recovery::kPeer;
  // The spot mode named by `recovery`.
  const ModeEstimate& recommended() const {
    return recovery == Recovery::kPeer ? spotrain : restart;
  }
};

// Validates the request (kInvalidArgument naming the field), estimates M and the
// Young/Daly interval for each spot mode, and runs `trials` simulations of each with seeds
// derived from `seed` (trial i of both modes sees the same capacity).
absl::StatusOr<Plan> MakePlan(const PlanRequest& request);

}  // namespace spotrain::common

#endif  // SPOTRAIN_COMMON_SPOT_SIM_H_
