// `spotrain plan`: what a training job costs and how long it takes on demand, on spot with
// spotrain (peer recovery), and on spot with checkpoint-restart, with the Young/Daly
// checkpoint interval for each; a table, or JSON with --json. A thin adapter: flags in,
// common::MakePlan (common/spot_sim.h), text out. The model is in docs/planner.md.
// Single-threaded.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/file_util.h"
#include "common/json_util.h"
#include "common/spot_sim.h"
#include "common/status_macros.h"
#include "common/young_daly.h"
#include "tools/command.h"

ABSL_FLAG(double, spot_price, -1, "plan: spot price, dollars per GPU-hour (required)");
ABSL_FLAG(double, on_demand_price, -1, "plan: on-demand price, dollars per GPU-hour (required)");
ABSL_FLAG(int, gpus, 1, "plan: GPUs (one per instance) the job runs on");
ABSL_FLAG(int, min_gpus, 1,
          "plan: with fewer live GPUs the job waits (torchrun --nnodes MIN, spotrain "
          "min_workers); --min_gpus = --gpus models a fixed-size job");
ABSL_FLAG(double, hours, 0,
          "plan: job length in GPU-hours of useful work (24 on 8 GPUs: 3 h at best); or give "
          "--steps and --step_seconds");
ABSL_FLAG(int64_t, steps, 0, "plan: job length in steps (with --step_seconds)");
ABSL_FLAG(double, step_seconds, 0,
          "plan: seconds per step on all --gpus (default 1 with --hours: only sizes the step a "
          "loss interrupts)");
ABSL_FLAG(double, preemption_rate, -1,
          "plan: preemptions per live instance-hour, independent instances (public traces: "
          "0.02 to 1.6); or give --trace");
ABSL_FLAG(double, replacement_s, 1800,
          "plan: with --preemption_rate, mean seconds until a lost instance's capacity returns "
          "(the AWS trace: about 1900)");
ABSL_FLAG(std::string, trace, "",
          "plan: replay a spot availability trace, time_ms,live_instances per line (e.g. "
          "examples/traces/aws-p3-spot-32.csv), scaled to --gpus");
ABSL_FLAG(double, trace_offset_s, -1,
          "plan: with --trace, start every replay this many seconds into the trace's window "
          "(-1: a random offset per trial); with --gpus equal to the trace's peak and an "
          "offset of 0 the replay is the trace itself, the same in every trial");
ABSL_FLAG(std::string, step_seconds_by_live, "",
          "plan: measured seconds per step for each number of working GPUs, \"1:0.31,2:0.17,"
          "3:0.12\" (every count 1..--gpus); replaces linear scaling, and the entry for --gpus "
          "is the step time (--step_seconds may be left out)");
ABSL_FLAG(double, join_delay_s, 0,
          "plan: spotrain: seconds from an instance's appearance (also the first ones) to its "
          "first step in the group (process start, Join, settle window, switch); paid, no work");
ABSL_FLAG(double, join_recovery_s, -1,
          "plan: spotrain: seconds every worker stalls when joiners switch in (-1: "
          "--peer_recovery_s)");
ABSL_FLAG(int64_t, checkpoint_every_steps, 0,
          "plan: checkpoint every this many steps in both spot modes, as checkpoint.every_steps "
          "does (0: by seconds, see --checkpoint_interval_s)");
ABSL_FLAG(std::string, timeline_out, "",
          "plan: write trial 0 of spot+spotrain here: one line per event, \"time_s steps live "
          "working\" (useful steps done so far, instances paid, instances in the group)");
ABSL_FLAG(double, checkpoint_cost_s, 10,
          "plan: seconds training stalls per checkpoint (spotrain: the snapshot to host memory)");
ABSL_FLAG(double, restore_cost_s, 30, "plan: seconds to load the last checkpoint after a rollback");
ABSL_FLAG(double, notice_s, 0,
          "plan: seconds of warning before a preemption (AWS 120, GCP 30, none: 0)");
ABSL_FLAG(double, peer_recovery_s, 1,
          "plan: seconds spotrain stalls per membership change (survivors rebuild the group and "
          "redo the step; measured 0.24 s for a loss, 1.1 s for a join on the CPU demo)");
ABSL_FLAG(double, restart_overhead_s, 45,
          "plan: checkpoint-restart: seconds from a membership change to restarted workers, "
          "before the restore (torchrun measured 44 s on CPU)");
ABSL_FLAG(std::string, recovery, "peer",
          "plan: the recovery the recommendation is for: peer (spotrain) or restart "
          "(checkpoint-restart, torchrun)");
ABSL_FLAG(double, checkpoint_interval_s, 0,
          "plan: simulate this checkpoint interval in both spot modes (0: Young/Daly)");
ABSL_FLAG(double, max_interval_s, 3600,
          "plan: cap on the Young/Daly interval: the most work one rollback may lose when the "
          "estimate of the time between rollbacks is wrong");
ABSL_FLAG(uint64_t, seed, 1, "plan: seed of the simulation (same seed, same numbers)");
ABSL_FLAG(int, trials, 200, "plan: simulated runs per spot mode");
ABSL_DECLARE_FLAG(bool, json);  // defined in tools/status.cc

namespace spotrain::tools {
namespace {

constexpr double kHour = 3600;

absl::Status Usage(absl::string_view message) { return absl::InvalidArgumentError(message); }

// "1:0.31,2:0.17,3:0.12" -> {0, 0.31, 0.17, 0.12}: every count 1..gpus exactly once.
absl::StatusOr<std::vector<double>> ParseStepTimes(const std::string& text, int gpus) {
  std::vector<double> times(gpus + 1, 0);
  for (absl::string_view item : absl::StrSplit(text, ',')) {
    std::vector<absl::string_view> kv = absl::StrSplit(item, ':');
    int live = 0;
    double seconds = 0;
    if (kv.size() != 2 || !absl::SimpleAtoi(absl::StripAsciiWhitespace(kv[0]), &live) ||
        !absl::SimpleAtod(absl::StripAsciiWhitespace(kv[1]), &seconds)) {
      return Usage(absl::StrCat("--step_seconds_by_live: \"", item,
                                "\" is not LIVE:SECONDS (e.g. \"1:0.31,2:0.17\")"));
    }
    if (live < 1 || live > gpus) {
      return Usage(
          absl::StrFormat("--step_seconds_by_live: %d live is outside 1..--gpus (%d)", live, gpus));
    }
    if (!(seconds > 0) || std::isinf(seconds)) {
      return Usage(
          absl::StrFormat("--step_seconds_by_live: the time for %d live must be > 0", live));
    }
    if (times[live] != 0) {
      return Usage(absl::StrFormat("--step_seconds_by_live: %d live is given twice", live));
    }
    times[live] = seconds;
  }
  for (int k = 1; k <= gpus; ++k) {
    if (times[k] == 0) {
      return Usage(absl::StrFormat(
          "--step_seconds_by_live: no step time for %d live (give every count 1..%d)", k, gpus));
    }
  }
  return times;
}

// The request the flags describe; reads --trace.
absl::StatusOr<common::PlanRequest> RequestFromFlags(std::string* capacity_source) {
  common::PlanRequest request;
  request.spot_price = absl::GetFlag(FLAGS_spot_price);
  request.on_demand_price = absl::GetFlag(FLAGS_on_demand_price);
  if (request.spot_price < 0) return Usage("--spot_price is required (dollars per GPU-hour)");
  if (request.on_demand_price < 0) {
    return Usage("--on_demand_price is required (dollars per GPU-hour)");
  }
  common::JobSpec& job = request.job;
  job.gpus = absl::GetFlag(FLAGS_gpus);
  if (job.gpus < 1) return Usage("--gpus must be at least 1");
  const double hours = absl::GetFlag(FLAGS_hours);
  const int64_t steps = absl::GetFlag(FLAGS_steps);
  double step_seconds = absl::GetFlag(FLAGS_step_seconds);
  const std::string by_live = absl::GetFlag(FLAGS_step_seconds_by_live);
  if (!by_live.empty()) {
    ASSIGN_OR_RETURN(job.step_s_by_live, ParseStepTimes(by_live, job.gpus));
    if (step_seconds > 0 && step_seconds != job.step_s_by_live[job.gpus]) {
      return Usage(absl::StrFormat(
          "--step_seconds %g differs from --step_seconds_by_live's entry for --gpus %d (%g); "
          "leave --step_seconds out",
          step_seconds, job.gpus, job.step_s_by_live[job.gpus]));
    }
    step_seconds = job.step_s_by_live[job.gpus];
  }
  if ((hours > 0) == (steps > 0)) {
    return Usage(
        "give the job length as either --hours (GPU-hours of useful work) or --steps with "
        "--step_seconds");
  }
  if (hours < 0 || steps < 0 || step_seconds < 0) {
    return Usage("--hours, --steps and --step_seconds must not be negative");
  }
  if (steps > 0) {
    if (step_seconds <= 0) return Usage("--steps needs --step_seconds (seconds per step)");
    job.step_s = step_seconds;
    job.work_gpu_s = static_cast<double>(steps) * step_seconds * job.gpus;
  } else {
    job.step_s = step_seconds > 0 ? step_seconds : 1;
    job.work_gpu_s = hours * kHour;
  }
  job.checkpoint_cost_s = absl::GetFlag(FLAGS_checkpoint_cost_s);
  job.restore_cost_s = absl::GetFlag(FLAGS_restore_cost_s);
  job.notice_s = absl::GetFlag(FLAGS_notice_s);
  job.peer_recovery_s = absl::GetFlag(FLAGS_peer_recovery_s);
  job.restart_overhead_s = absl::GetFlag(FLAGS_restart_overhead_s);
  job.join_delay_s = absl::GetFlag(FLAGS_join_delay_s);
  job.join_recovery_s = absl::GetFlag(FLAGS_join_recovery_s);
  job.checkpoint_every_steps = absl::GetFlag(FLAGS_checkpoint_every_steps);
  if (job.checkpoint_every_steps < 0) return Usage("--checkpoint_every_steps must be >= 0");
  if (job.join_delay_s < 0) return Usage("--join_delay_s must be >= 0");
  job.min_gpus = absl::GetFlag(FLAGS_min_gpus);
  if (job.min_gpus < 1 || job.min_gpus > job.gpus) {
    return Usage(
        absl::StrFormat("--min_gpus %d must be in 1..--gpus (%d)", job.min_gpus, job.gpus));
  }

  const double rate = absl::GetFlag(FLAGS_preemption_rate);
  const std::string trace_path = absl::GetFlag(FLAGS_trace);
  if (rate < 0 && rate != -1) {
    return Usage("--preemption_rate must be >= 0 (preemptions per live instance-hour)");
  }
  if ((rate >= 0) == !trace_path.empty()) {
    return Usage(
        "give the capacity as either --preemption_rate R (per instance-hour; 0: none) or "
        "--trace FILE (e.g. examples/traces/aws-p3-spot-32.csv)");
  }
  if (!trace_path.empty()) {
    auto text = common::ReadFile(trace_path);
    if (!text.ok()) {
      return absl::Status(text.status().code(), absl::StrCat("cannot read --trace ", trace_path,
                                                             ": ", text.status().message()));
    }
    ASSIGN_OR_RETURN(common::CapacityTrace trace, common::ParseCapacityTrace(*text, trace_path));
    request.capacity.trace = std::make_shared<common::CapacityTrace>(std::move(trace));
    request.capacity.trace_start_s = absl::GetFlag(FLAGS_trace_offset_s);
    if (request.capacity.trace_start_s < 0 && request.capacity.trace_start_s != -1) {
      return Usage("--trace_offset_s must be >= 0 (or -1: random)");
    }
    *capacity_source = trace_path;
  } else {
    request.capacity.loss_rate_per_hour = rate;
    request.capacity.replacement_s = absl::GetFlag(FLAGS_replacement_s);
  }

  const std::string recovery = absl::GetFlag(FLAGS_recovery);
  if (recovery == "peer") {
    request.recovery = common::Recovery::kPeer;
  } else if (recovery == "restart") {
    request.recovery = common::Recovery::kRestart;
  } else {
    return Usage(absl::StrCat("--recovery must be peer or restart, not \"", recovery, "\""));
  }
  request.interval_override_s = absl::GetFlag(FLAGS_checkpoint_interval_s);
  request.max_interval_s = absl::GetFlag(FLAGS_max_interval_s);
  request.seed = absl::GetFlag(FLAGS_seed);
  request.trials = absl::GetFlag(FLAGS_trials);
  return request;
}

std::string Duration(double s) {
  if (std::isinf(s)) return "never";
  if (s < 10) return absl::StrFormat("%.3g s", s);
  if (s < 90) return absl::StrFormat("%.0f s", s);
  if (s < 90 * 60) return absl::StrFormat("%.1f min", s / 60);
  return absl::StrFormat("%.1f h", s / kHour);
}

std::string IntervalText(const common::ModeEstimate& mode) {
  if (!mode.simulated) return "none needed";
  const int64_t every_steps = absl::GetFlag(FLAGS_checkpoint_every_steps);
  if (every_steps > 0) return absl::StrFormat("%d steps (given)", every_steps);
  if (std::isinf(mode.interval_s)) return "none (no losses)";
  std::string why;
  if (mode.interval_overridden) {
    why = "given";
  } else if (mode.interval.bound == common::IntervalBound::kMax) {
    why = "cap";
  } else if (mode.interval.bound == common::IntervalBound::kMin) {
    why = "1 step";
  } else {
    why = "Daly";
  }
  return absl::StrFormat("%s (%s)", Duration(mode.interval_s), why);
}

double Rollbacks(const common::ModeEstimate& mode) { return mode.restarts; }

std::string Table(const common::PlanRequest& request, const common::Plan& plan,
                  const std::string& source) {
  const common::JobSpec& job = request.job;
  std::string out;
  absl::StrAppendFormat(&out,
                        "job: %d GPU(s) (runs on %d or more), %.1f GPU-hours of work (%.2f h at "
                        "best), %s steps\n",
                        job.gpus, job.min_gpus, job.work_gpu_s / kHour, plan.ideal_wall_s / kHour,
                        Duration(job.step_s));
  const double live_fraction = plan.capacity.mean_live / job.gpus;
  if (plan.has_trace_stats) {
    absl::StrAppendFormat(
        &out,
        "capacity: trace %s: %d instances at peak, %d losses in %d events over %.2f h "
        "(%.3f per live instance-hour), as low as %d;\n"
        "          replayed for %d GPU(s) from %s: %.1f%% of them live on average\n",
        source, plan.trace.peak, plan.trace.losses, plan.trace.loss_events,
        plan.trace.window_s / kHour, plan.trace.loss_rate_per_instance_hour, plan.trace.min_live,
        job.gpus,
        request.capacity.trace_start_s >= 0
            ? absl::StrFormat("%s into its window", Duration(request.capacity.trace_start_s))
            : std::string("random offsets"),
        100 * live_fraction);
  } else {
    absl::StrAppendFormat(&out,
                          "capacity: independent instances, %.3g preemptions per instance-hour, "
                          "lost capacity back after %s on average: %.1f%% live on average\n",
                          plan.loss_rate_per_instance_hour,
                          Duration(request.capacity.replacement_s), 100 * live_fraction);
  }
  absl::StrAppendFormat(&out,
                        "costs: checkpoint %s, restore %s, restart %s, peer recovery %s, "
                        "notice %s; %d trials, seed %d\n",
                        Duration(job.checkpoint_cost_s), Duration(job.restore_cost_s),
                        Duration(job.restart_overhead_s), Duration(job.peer_recovery_s),
                        Duration(job.notice_s), request.trials, request.seed);
  if (job.join_delay_s > 0 || job.join_recovery_s >= 0 || !job.step_s_by_live.empty() ||
      job.checkpoint_every_steps > 0) {
    std::string times = "linear in the working GPUs";
    if (!job.step_s_by_live.empty()) {
      std::vector<std::string> items;
      for (int k = 1; k <= job.gpus; ++k) {
        items.push_back(absl::StrFormat("%d: %.4g s", k, job.step_s_by_live[k]));
      }
      times = absl::StrJoin(items, ", ");
    }
    absl::StrAppendFormat(
        &out, "spotrain: join delay %.3g s, join stall %.3g s; step time by working GPUs: %s\n",
        job.join_delay_s, job.join_recovery_s >= 0 ? job.join_recovery_s : job.peer_recovery_s,
        times);
  }
  out += "\n";

  absl::StrAppendFormat(&out, "%-13s %7s %7s %6s %9s %9s %7s %6s %9s %6s %9s  %s\n", "mode",
                        "$/GPU-h", "wall h", "p90", "cost $", "p90", "goodput", "useful", "lost",
                        "losses", "rollbacks", "checkpoint every");
  out += std::string(absl::StripTrailingAsciiWhitespace(absl::StrFormat(
      "%-13s %7s %7s %6s %9s %9s %7s %6s %9s", "", "", "", "", "", "", "", "/paid", "GPU-h")));
  out += "\n";
  for (const common::ModeEstimate* mode : {&plan.on_demand, &plan.spotrain, &plan.restart}) {
    absl::StrAppendFormat(
        &out, "%-13s %7.3f %7.2f %6.2f %9.2f %9.2f %7.3f %6.3f %9.2f %6.1f %9.1f  %s\n", mode->name,
        mode->price_per_gpu_hour, mode->wall_s.mean / kHour, mode->wall_s.p90 / kHour,
        mode->cost.mean, mode->cost.p90, mode->goodput, mode->useful_per_paid,
        mode->lost_gpu_s / kHour, mode->loss_events, Rollbacks(*mode), IntervalText(*mode));
  }
  out +=
      "(means per run, p90 = 90th percentile; goodput = ideal wall time / wall time; useful/paid "
      "= work / paid GPU-hours)\n";
  out += "\n";
  for (const common::ModeEstimate* mode : {&plan.spotrain, &plan.restart}) {
    if (mode->finished < mode->trials) {
      absl::StrAppendFormat(&out,
                            "WARNING: %s: %d of %d runs did not finish within the simulated "
                            "limit; its wall time and cost are lower bounds\n",
                            mode->name, mode->trials - mode->finished, mode->trials);
    }
    const common::IntervalChoice& c = mode->interval;
    absl::StrAppendFormat(&out, "%s: M = %s between rollbacks (%s); Young %s, Daly %s\n",
                          mode->name, Duration(c.mtbi_s), mode->mtbi_basis, Duration(c.young_s),
                          Duration(c.daly_s));
  }
  const common::ModeEstimate& pick = plan.recommended();
  const double saving = 1 - pick.cost.mean / plan.on_demand.cost.mean;
  const double slower = pick.wall_s.mean / plan.on_demand.wall_s.mean - 1;
  absl::StrAppendFormat(
      &out,
      "\nrecommendation (--recovery %s): %s, %s: $%.2f expected (%.0f%% %s than on-demand), "
      "%.2f h (%+.0f%% wall time)\n",
      common::RecoveryName(plan.recovery), pick.name,
      std::isinf(pick.interval_s) ? "no periodic checkpoint needed"
                                  : absl::StrCat("checkpoint every ", Duration(pick.interval_s)),
      pick.cost.mean, 100 * std::abs(saving), saving >= 0 ? "less" : "more",
      pick.wall_s.mean / kHour, 100 * slower);
  return out;
}

// ---- JSON ----------------------------------------------------------------------------------

std::string JsonString(absl::string_view s) { return common::JsonQuote(s); }

// JSON has no infinity: null stands for "never" / "unbounded".
std::string JsonNumber(double v) {
  if (!std::isfinite(v)) return "null";
  return absl::StrFormat("%.10g", v);
}

std::string JsonDistribution(const common::Distribution& d, double scale) {
  return absl::StrFormat("{\"mean\": %s, \"p10\": %s, \"p50\": %s, \"p90\": %s}",
                         JsonNumber(d.mean / scale), JsonNumber(d.p10 / scale),
                         JsonNumber(d.p50 / scale), JsonNumber(d.p90 / scale));
}

std::string JsonMode(const common::ModeEstimate& m) {
  const common::IntervalChoice& c = m.interval;
  std::vector<std::string> fields = {
      absl::StrCat("\"name\": ", JsonString(m.name)),
      absl::StrCat("\"price_per_gpu_hour\": ", JsonNumber(m.price_per_gpu_hour)),
      absl::StrCat("\"simulated\": ", m.simulated ? "true" : "false"),
      absl::StrFormat("\"trials\": %d, \"finished\": %d", m.trials, m.finished),
      absl::StrCat("\"wall_hours\": ", JsonDistribution(m.wall_s, kHour)),
      absl::StrCat("\"cost\": ", JsonDistribution(m.cost, 1)),
      absl::StrCat("\"goodput\": ", JsonNumber(m.goodput)),
      absl::StrCat("\"useful_per_paid\": ", JsonNumber(m.useful_per_paid)),
      absl::StrCat("\"paid_gpu_hours\": ", JsonNumber(m.paid_gpu_s / kHour)),
      absl::StrCat("\"lost_gpu_hours\": ", JsonNumber(m.lost_gpu_s / kHour)),
      absl::StrCat("\"stalled_hours\": ", JsonNumber(m.stalled_s / kHour)),
      absl::StrCat("\"waiting_hours\": ", JsonNumber(m.waiting_s / kHour)),
      absl::StrCat("\"loss_events\": ", JsonNumber(m.loss_events)),
      absl::StrCat("\"wipes\": ", JsonNumber(m.wipes)),
      absl::StrCat("\"peer_recoveries\": ", JsonNumber(m.peer_recoveries)),
      absl::StrCat("\"rollbacks\": ", JsonNumber(m.restarts)),
      absl::StrCat("\"checkpoints\": ", JsonNumber(m.checkpoints)),
      absl::StrFormat("\"checkpoint\": {\"interval_s\": %s, \"overridden\": %s, \"young_s\": %s, "
                      "\"daly_s\": %s, \"bound\": %s, \"mtbi_s\": %s, \"mtbi_basis\": %s}",
                      JsonNumber(m.interval_s), m.interval_overridden ? "true" : "false",
                      JsonNumber(c.young_s), JsonNumber(c.daly_s),
                      JsonString(common::IntervalBoundName(c.bound)), JsonNumber(c.mtbi_s),
                      JsonString(m.mtbi_basis)),
  };
  return absl::StrCat("    {", absl::StrJoin(fields, ", "), "}");
}

// {"1": 0.31, "2": 0.17, ...}, or null when steps scale linearly.
std::string StepTimesJson(const common::JobSpec& job) {
  if (job.step_s_by_live.empty()) return "null";
  std::vector<std::string> items;
  for (int k = 1; k <= job.gpus; ++k) {
    items.push_back(absl::StrFormat("\"%d\": %s", k, JsonNumber(job.step_s_by_live[k])));
  }
  return absl::StrCat("{", absl::StrJoin(items, ", "), "}");
}

std::string Json(const common::PlanRequest& request, const common::Plan& plan,
                 const std::string& source) {
  const common::JobSpec& job = request.job;
  std::string out = "{\n";
  absl::StrAppendFormat(
      &out,
      "  \"inputs\": {\"gpus\": %d, \"min_gpus\": %d, \"work_gpu_hours\": %s, \"step_s\": %s, "
      "\"spot_price\": %s, "
      "\"on_demand_price\": %s, \"checkpoint_cost_s\": %s, \"restore_cost_s\": %s, "
      "\"notice_s\": %s, \"peer_recovery_s\": %s, \"restart_overhead_s\": %s, "
      "\"join_delay_s\": %s, \"join_recovery_s\": %s, \"checkpoint_every_steps\": %d, "
      "\"step_s_by_live\": %s, \"recovery\": %s, \"trials\": %d, \"seed\": %d},\n",
      job.gpus, job.min_gpus, JsonNumber(job.work_gpu_s / kHour), JsonNumber(job.step_s),
      JsonNumber(request.spot_price), JsonNumber(request.on_demand_price),
      JsonNumber(job.checkpoint_cost_s), JsonNumber(job.restore_cost_s), JsonNumber(job.notice_s),
      JsonNumber(job.peer_recovery_s), JsonNumber(job.restart_overhead_s),
      JsonNumber(job.join_delay_s),
      JsonNumber(job.join_recovery_s >= 0 ? job.join_recovery_s : job.peer_recovery_s),
      job.checkpoint_every_steps, StepTimesJson(job),
      JsonString(common::RecoveryName(request.recovery)), request.trials, request.seed);
  absl::StrAppendFormat(&out, "  \"ideal_wall_hours\": %s,\n",
                        JsonNumber(plan.ideal_wall_s / kHour));
  std::string capacity = absl::StrFormat(
      "\"loss_rate_per_instance_hour\": %s, \"mean_live_fraction\": %s, "
      "\"measured_over_hours\": %s, \"full_wipes_measured\": %d",
      JsonNumber(plan.loss_rate_per_instance_hour), JsonNumber(plan.capacity.mean_live / job.gpus),
      JsonNumber(plan.capacity.horizon_s / kHour), plan.capacity.wipes);
  if (plan.has_trace_stats) {
    const common::TraceStats& t = plan.trace;
    absl::StrAppendFormat(
        &out,
        "  \"capacity\": {\"model\": \"trace\", \"trace\": %s, \"peak\": %d, \"min_live\": %d, "
        "\"window_hours\": %s, \"loss_events\": %d, \"losses\": %d, \"return_events\": %d, "
        "\"returns\": %d, %s},\n",
        JsonString(source), t.peak, t.min_live, JsonNumber(t.window_s / kHour), t.loss_events,
        t.losses, t.return_events, t.returns, capacity);
  } else {
    absl::StrAppendFormat(
        &out, "  \"capacity\": {\"model\": \"independent\", \"replacement_s\": %s, %s},\n",
        JsonNumber(request.capacity.replacement_s), capacity);
  }
  std::vector<std::string> modes;
  for (const common::ModeEstimate* mode : {&plan.on_demand, &plan.spotrain, &plan.restart}) {
    modes.push_back(JsonMode(*mode));
  }
  absl::StrAppendFormat(&out, "  \"modes\": [\n%s\n  ],\n", absl::StrJoin(modes, ",\n"));
  const common::ModeEstimate& pick = plan.recommended();
  absl::StrAppendFormat(
      &out,
      "  \"recommendation\": {\"recovery\": %s, \"mode\": %s, \"checkpoint_interval_s\": %s, "
      "\"expected_cost\": %s, \"expected_wall_hours\": %s, \"saving_vs_on_demand\": %s}\n}\n",
      JsonString(common::RecoveryName(plan.recovery)), JsonString(pick.name),
      JsonNumber(pick.interval_s), JsonNumber(pick.cost.mean), JsonNumber(pick.wall_s.mean / kHour),
      JsonNumber(plan.on_demand.cost.mean > 0 ? 1 - pick.cost.mean / plan.on_demand.cost.mean : 0));
  return out;
}

int RunPlan(int argc, char** argv) {
  if (argc > 1) {
    std::fprintf(stderr, "spotrain plan: unexpected argument \"%s\" (everything is a flag)\n",
                 argv[1]);
    return 2;
  }
  std::string source;
  auto request = RequestFromFlags(&source);
  if (!request.ok()) {
    std::fprintf(stderr, "spotrain plan: %s\n", std::string(request.status().message()).c_str());
    return absl::IsInvalidArgument(request.status()) ? 2 : 1;
  }
  std::vector<common::TimelinePoint> timeline;
  const std::string timeline_path = absl::GetFlag(FLAGS_timeline_out);
  if (!timeline_path.empty()) request->timeline = &timeline;
  auto plan = common::MakePlan(*request);
  if (!plan.ok()) {
    std::fprintf(stderr, "spotrain plan: %s\n", std::string(plan.status().message()).c_str());
    return absl::IsInvalidArgument(plan.status()) ? 2 : 1;
  }
  if (!timeline_path.empty()) {
    std::string lines = "# time_s steps live working (trial 0 of spot+spotrain)\n";
    for (const common::TimelinePoint& p : timeline) {
      absl::StrAppendFormat(&lines, "%.4f %.4f %d %d\n", p.time_s, p.steps, p.live, p.working);
    }
    const absl::Status written = common::WriteFileAtomically(timeline_path, lines);
    if (!written.ok()) {
      std::fprintf(stderr, "spotrain plan: cannot write --timeline_out %s: %s\n",
                   timeline_path.c_str(), std::string(written.message()).c_str());
      return 1;
    }
  }
  const std::string text =
      absl::GetFlag(FLAGS_json) ? Json(*request, *plan, source) : Table(*request, *plan, source);
  std::fputs(text.c_str(), stdout);
  return 0;
}

}  // namespace

SPOTRAIN_REGISTER_COMMAND(plan_registrar, "plan",
                          "cost, wall time and checkpoint interval: on-demand vs spot with "
                          "spotrain vs spot with checkpoint-restart (--json for scripts)",
                          RunPlan);

}  // namespace spotrain::tools
