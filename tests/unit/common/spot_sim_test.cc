#include "common/spot_sim.h"

#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "common/file_util.h"
#include "common/young_daly.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace spotrain::common {
namespace {

using ::testing::HasSubstr;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kHour = 3600;

std::shared_ptr<const CapacityTrace> Trace(const std::string& text) {
  auto trace = ParseCapacityTrace(text, "test");
  EXPECT_TRUE(trace.ok()) << trace.status();
  return std::make_shared<CapacityTrace>(trace.ok() ? *trace : CapacityTrace{});
}

// The repository root: $SPOTRAIN_SOURCE_DIR, else derived from this file's path (ctest
// does not always pass the variable through).
std::string SourceDir() {
  const char* env = std::getenv("SPOTRAIN_SOURCE_DIR");
  if (env != nullptr && *env != '\0') return env;
  const std::string file = __FILE__;
  const std::string suffix = "tests/unit/common/spot_sim_test.cc";
  if (file.size() >= suffix.size() &&
      file.compare(file.size() - suffix.size(), suffix.size(), suffix) == 0) {
    const std::string root = file.substr(0, file.size() - suffix.size());
    return root.empty() ? "." : root;
  }
  return ".";
}

// The real 32-instance AWS trace, from the copy in the repository.
absl::StatusOr<CapacityTrace> RealTrace() {
  const std::string path = SourceDir() + "/examples/traces/aws-p3-spot-32.csv";
  auto text = ReadFile(path);
  if (!text.ok()) return text.status();
  return ParseCapacityTrace(*text, path);
}

// Replays a trace from its start with a job as large as the fleet: the job's live count is
// the trace's, with no randomness left.
SimResult Scripted(const std::string& trace, const JobSpec& job, Recovery recovery,
                   double interval_s) {
  CapacityModel model;
  model.trace = Trace(trace);
  model.trace_start_s = 0;
  auto capacity = CapacityProcess::Create(model, job.gpus, 1);
  EXPECT_TRUE(capacity.ok()) << capacity.status();
  auto result = SimulateRun(job, recovery, interval_s, std::move(*capacity));
  EXPECT_TRUE(result.ok()) << result.status();
  return result.ok() ? *result : SimResult{};
}

// ---- Trace parsing --------------------------------------------------------------------------

TEST(CapacityTraceTest, ParsesMergesAndSkips) {
  auto trace = ParseCapacityTrace(
      "time_ms,live_instances\n# a comment\n0,1\n0,2\n\n 60000 , 3 \r\n120000,2\n", "t.csv");
  ASSERT_TRUE(trace.ok()) << trace.status();
  ASSERT_EQ(trace->points.size(), 3u);
  EXPECT_DOUBLE_EQ(trace->points[0].time_s, 0);
  EXPECT_EQ(trace->points[0].live, 2);  // same instant: the last count wins
  EXPECT_DOUBLE_EQ(trace->points[1].time_s, 60);
  EXPECT_EQ(trace->points[1].live, 3);
  EXPECT_EQ(trace->points[2].live, 2);
}

TEST(CapacityTraceTest, MalformedLinesNameTheLine) {
  struct Case {
    const char* text;
    const char* expect;
  };
  const Case cases[] = {
      {"0,4\n60000;3\n", "line 2: 1 field(s) instead of 2"},
      {"0,4\n60000,3,1\n", "line 2: 3 field(s)"},
      {"0,4\n\n60000,x\n", "line 3: the live count is not an integer"},
      {"0,4\n6e4,3\n", "line 2: the time is not an integer"},
      {"0,4\n-5,3\n", "line 2: the time is negative"},
      {"0,4\n60000,-1\n", "line 2: the live count is outside"},
      {"0,4\n60000,3\n30000,4\n", "line 3: the time goes backwards (30000 ms after 60000 ms)"},
      {"0,4\ntime_ms,live_instances\n", "line 2"},  // a header only on the first line
      {"0,4\n0,5\n", "1 distinct time(s)"},
      {"", "0 distinct time(s)"},
      {"0,0\n1000,0\n", "no instance is ever live"},
  };
  for (const Case& c : cases) {
    auto trace = ParseCapacityTrace(c.text, "bad.csv");
    ASSERT_FALSE(trace.ok()) << c.text;
    EXPECT_EQ(trace.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(trace.status().message(), HasSubstr(c.expect)) << c.text;
    EXPECT_THAT(trace.status().message(), HasSubstr("bad.csv"));
  }
  auto bad = ParseCapacityTrace("0,4\n60000;3\n", "bad.csv");
  EXPECT_THAT(bad.status().message(), HasSubstr("got \"60000;3\""));
}

TEST(CapacityTraceTest, RealTraceMatchesItsReadme) {
  auto trace = RealTrace();
  ASSERT_TRUE(trace.ok()) << trace.status();
  auto stats = SummarizeTrace(*trace);
  ASSERT_TRUE(stats.ok()) << stats.status();
  // ../shared/traces/README.md: 167 preemptions in 79 events over the 10.95 h after the
  // fleet first reaches 32, about 0.64 per instance-hour, as low as 10.
  EXPECT_EQ(stats->peak, 32);
  EXPECT_EQ(stats->losses, 167);
  EXPECT_EQ(stats->loss_events, 79);
  EXPECT_NEAR(stats->window_s / kHour, 10.95, 0.005);
  EXPECT_NEAR(stats->loss_rate_per_instance_hour, 0.64, 0.005);
  EXPECT_EQ(stats->min_live, 10);
  EXPECT_EQ(stats->return_events, 74);
  EXPECT_EQ(stats->returns, 145);
}

TEST(CapacityTraceTest, NoWindowIsAnError) {
  auto stats = SummarizeTrace(*Trace("0,1\n1000,2\n"));
  EXPECT_FALSE(stats.ok());
  EXPECT_THAT(stats.status().message(), HasSubstr("replay window"));
}

// ---- Capacity processes ---------------------------------------------------------------------

TEST(CapacityProcessTest, IndependentWipeRateMatchesMonteCarlo) {
  // 3 instances, 1 loss per instance-hour, 30 min replacement: q = 1/3, wipe rate
  // 3 * (2/3) * (1/9) per hour = 2/9 per hour.
  EXPECT_NEAR(IndependentWipeMtbiSeconds(3, 1.0, 1800) / kHour, 4.5, 1e-9);
  EXPECT_NEAR(IndependentWipeMtbiSeconds(1, 1.0, 0) / kHour, 1.0, 1e-12);
  EXPECT_EQ(IndependentWipeMtbiSeconds(4, 1.0, 0), kInf);
  EXPECT_EQ(IndependentWipeMtbiSeconds(4, 0.0, 600), kInf);

  CapacityModel model;
  model.loss_rate_per_hour = 1.0;
  model.replacement_s = 1800;
  auto stats = MeasureCapacity(model, 3, 7, 20000 * kHour);
  ASSERT_TRUE(stats.ok()) << stats.status();
  const double measured_mtbi_h = 20000.0 / stats->wipes;
  EXPECT_NEAR(measured_mtbi_h, 4.5, 4.5 * 0.05);
  // Availability 1/(1 + rD) = 2/3 of 3 instances.
  EXPECT_NEAR(stats->mean_live, 2.0, 0.03);
}

TEST(CapacityProcessTest, ReplayKeepsThePerInstanceRate) {
  auto trace = RealTrace();
  ASSERT_TRUE(trace.ok()) << trace.status();
  CapacityModel model;
  model.trace = std::make_shared<CapacityTrace>(*trace);
  for (int gpus : {8, 32, 64}) {
    auto stats = MeasureCapacity(model, gpus, 3, 300 * 10.95 * kHour);
    ASSERT_TRUE(stats.ok()) << stats.status();
    const double rate = stats->losses / (stats->mean_live * stats->horizon_s / kHour);
    EXPECT_NEAR(rate, 0.638, 0.04) << gpus;
    // 23.9 of 32 live on average.
    EXPECT_NEAR(stats->mean_live / gpus, 23.9 / 32, 0.03) << gpus;
  }
}

TEST(CapacityProcessTest, SameSeedSameStream) {
  CapacityModel model;
  model.loss_rate_per_hour = 2;
  model.replacement_s = 300;
  auto a = CapacityProcess::Create(model, 5, 42);
  auto b = CapacityProcess::Create(model, 5, 42);
  auto c = CapacityProcess::Create(model, 5, 43);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  bool differs = false;
  for (int i = 0; i < 200; ++i) {
    ASSERT_EQ(a->next_time_s(), b->next_time_s());
    if (a->next_time_s() != c->next_time_s()) differs = true;
    ASSERT_EQ(a->Advance(), b->Advance());
    c->Advance();
  }
  EXPECT_TRUE(differs);
}

// ---- One job, scripted capacity -------------------------------------------------------------

// Four instances; one lost at 1 h, back at 2 h; the trace runs long enough not to wrap.
constexpr char kOneLoss[] = "0,4\n3600000,3\n7200000,4\n360000000,4\n";
// All four lost at 1 h, back at 2 h.
constexpr char kWipe[] = "0,4\n3600000,0\n7200000,4\n360000000,4\n";

JobSpec FourGpuJob(double work_gpu_s) {
  JobSpec job;
  job.gpus = 4;
  job.work_gpu_s = work_gpu_s;
  job.step_s = 1;
  job.checkpoint_cost_s = 10;
  job.restore_cost_s = 30;
  job.restart_overhead_s = 45;
  job.peer_recovery_s = 1;
  return job;
}

TEST(SimulateRunTest, PeerRecoveryCarriesOnWithFewerInstances) {
  const SimResult r = Scripted(kOneLoss, FourGpuJob(4 * 36000), Recovery::kPeer, kInf);
  ASSERT_TRUE(r.finished);
  // 0-3600 s on 4; a 1 s recovery; 3601-7200 on 3; a 1 s recovery; the rest on 4.
  const double rest = (4 * 36000.0 - 4 * 3600 - 3 * 3599) / 4;
  EXPECT_NEAR(r.wall_s, 7201 + rest, 1e-6);
  EXPECT_NEAR(r.paid_gpu_s, 4 * 3600 + 3 * 3600 + 4 * (1 + rest), 1e-6);
  EXPECT_EQ(r.loss_events, 1);
  EXPECT_EQ(r.return_events, 1);
  EXPECT_EQ(r.peer_recoveries, 2);
  EXPECT_EQ(r.restarts, 0);
  EXPECT_EQ(r.wipes, 0);
  EXPECT_DOUBLE_EQ(r.lost_gpu_s, 0);  // the loss fell on a step boundary
  EXPECT_NEAR(r.stalled_s, 2, 1e-9);
}

TEST(SimulateRunTest, PeerLossCostsTheStepInFlightUnlessAnnounced) {
  JobSpec job = FourGpuJob(4 * 36000);
  job.step_s = 7;  // 28 GPU-seconds per step; 14400 at the loss = 514 steps + 8
  EXPECT_NEAR(Scripted(kOneLoss, job, Recovery::kPeer, kInf).lost_gpu_s, 8, 1e-6);
  job.notice_s = 10;  // enough to finish the step and leave at its end
  EXPECT_DOUBLE_EQ(Scripted(kOneLoss, job, Recovery::kPeer, kInf).lost_gpu_s, 0);
}

TEST(SimulateRunTest, RestartRollsBackOnEveryChange) {
  const SimResult r = Scripted(kOneLoss, FourGpuJob(4 * 36000), Recovery::kRestart, 1800);
  ASSERT_TRUE(r.finished);
  // Checkpoint at 1800 s (stall to 1810, commits 7200). Loss at 3600 with 14360 done:
  // 7160 lost, restart until 3675 on 3 instances. Checkpoint at 5475 (to 5485, commits
  // 12600). The join at 7200 restarts again: 17745 - 12600 = 5145 lost, busy until 7275.
  // Then 131400 / 4 = 32850 s of compute with 18 checkpoints of 10 s.
  EXPECT_NEAR(r.wall_s, 7275 + 32850 + 180, 1e-6);
  EXPECT_NEAR(r.lost_gpu_s, 7160 + 5145, 1e-6);
  EXPECT_EQ(r.restarts, 2);
  EXPECT_EQ(r.checkpoints, 20);
  EXPECT_EQ(r.peer_recoveries, 0);
}

TEST(SimulateRunTest, PeerWipeRollsBackToTheCheckpoint) {
  const double work = 4 * 36000 + 400;
  const SimResult r = Scripted(kWipe, FourGpuJob(work), Recovery::kPeer, 1800);
  ASSERT_TRUE(r.finished);
  // Checkpoint at 1800 (commits 7200); the wipe at 3600 loses 14360 - 7200; nothing runs
  // until 7200; restore + recovery until 7231; (work - 7200) / 4 = 34300 s of compute with
  // 19 checkpoints.
  EXPECT_NEAR(r.wall_s, 7231 + 34300 + 190, 1e-6);
  EXPECT_NEAR(r.lost_gpu_s, 7160, 1e-6);
  EXPECT_NEAR(r.waiting_s, 3600, 1e-6);
  EXPECT_NEAR(r.paid_gpu_s, 4 * (r.wall_s - 3600), 1e-6);
  EXPECT_EQ(r.wipes, 1);
  EXPECT_EQ(r.restarts, 1);
  EXPECT_EQ(r.emergency_checkpoints, 0);

  // With a 2-minute notice the job checkpoints before the wipe and loses only what the
  // checkpoint's 10 s stall displaced.
  JobSpec noticed = FourGpuJob(work);
  noticed.notice_s = 120;
  const SimResult n = Scripted(kWipe, noticed, Recovery::kPeer, 1800);
  EXPECT_NEAR(n.lost_gpu_s, 40, 1e-6);
  EXPECT_EQ(n.emergency_checkpoints, 1);
  EXPECT_LT(n.wall_s, r.wall_s);
}

TEST(SimulateRunTest, RestartIgnoresTheNotice) {
  JobSpec job = FourGpuJob(4 * 36000);
  const SimResult plain = Scripted(kOneLoss, job, Recovery::kRestart, 1800);
  job.notice_s = 120;
  const SimResult noticed = Scripted(kOneLoss, job, Recovery::kRestart, 1800);
  EXPECT_DOUBLE_EQ(noticed.lost_gpu_s, plain.lost_gpu_s);
  EXPECT_DOUBLE_EQ(noticed.wall_s, plain.wall_s);
  EXPECT_EQ(noticed.emergency_checkpoints, 0);
}

TEST(SimulateRunTest, BelowMinGpusTheJobWaits) {
  const double work = 4 * 36000 + 400;
  JobSpec job = FourGpuJob(work);
  job.min_gpus = 4;
  // Restart: the loss at 3600 s rolls back to the checkpoint of 1800 s (7160 lost) and
  // nothing runs on 3; the return at 7200 restarts (busy to 7275); (work - 7200) / 4 =
  // 34300 s of compute with 19 checkpoints. The 3 survivors are paid while they wait.
  const SimResult r = Scripted(kOneLoss, job, Recovery::kRestart, 1800);
  ASSERT_TRUE(r.finished);
  EXPECT_NEAR(r.wall_s, 7275 + 34300 + 190, 1e-6);
  EXPECT_NEAR(r.lost_gpu_s, 7160, 1e-6);
  EXPECT_EQ(r.restarts, 1);
  EXPECT_NEAR(r.paid_gpu_s, 4 * 3600 + 3 * 3600 + 4 * (r.wall_s - 7200), 1e-6);
  // Peer: the survivors keep the state while paused; the return costs one recovery.
  const SimResult p = Scripted(kOneLoss, job, Recovery::kPeer, kInf);
  ASSERT_TRUE(p.finished);
  EXPECT_NEAR(p.wall_s, 7201 + (work - 4 * 3600) / 4, 1e-6);
  EXPECT_DOUBLE_EQ(p.lost_gpu_s, 0);
  EXPECT_EQ(p.restarts, 0);
}

TEST(SimulateRunTest, MeasuredStepTimesReplaceLinearScaling) {
  JobSpec job = FourGpuJob(4 * 36000);
  job.step_s_by_live = {0, 4, 2, 1.6, 1};  // 3 working: 1.6 s per step, not 4/3
  const SimResult r = Scripted(kOneLoss, job, Recovery::kPeer, kInf);
  ASSERT_TRUE(r.finished);
  // 0-3600 s at 4 GPU-s/s (14400, a step boundary); 1 s recovery; 3601-7200 at 4/1.6 = 2.5
  // (8997.5); 1 s recovery; the rest at 4.
  EXPECT_NEAR(r.wall_s, 7201 + (4 * 36000.0 - 14400 - 8997.5) / 4, 1e-6);
  EXPECT_EQ(r.peer_recoveries, 2);

  job.step_s_by_live = {0, 4, 2, 1.6};  // one entry short
  CapacityModel model;
  model.trace = Trace(kOneLoss);
  model.trace_start_s = 0;
  auto capacity = CapacityProcess::Create(model, 4, 1);
  ASSERT_TRUE(capacity.ok());
  EXPECT_THAT(SimulateRun(job, Recovery::kPeer, kInf, *capacity).status().message(),
              HasSubstr("step_s_by_live"));
}

TEST(SimulateRunTest, NewcomersWorkAfterTheJoinDelay) {
  JobSpec job = FourGpuJob(4 * 36000);
  job.join_delay_s = 100;
  job.join_recovery_s = 5;
  std::vector<TimelinePoint> timeline;
  CapacityModel model;
  model.trace = Trace(kOneLoss);
  model.trace_start_s = 0;
  auto capacity = CapacityProcess::Create(model, 4, 1);
  ASSERT_TRUE(capacity.ok());
  auto r = SimulateRun(job, Recovery::kPeer, kInf, *capacity, &timeline);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE(r->finished);
  // The first four work from 100 s (no stall: nothing to broadcast); 14000 done at the loss
  // (a step boundary); 1 s recovery; 3601-7300 on 3 (the newcomer joins at 7300): 11097;
  // a 5 s join stall; the rest on 4.
  EXPECT_NEAR(r->wall_s, 7305 + (4 * 36000.0 - 14000 - 11097) / 4, 1e-6);
  EXPECT_NEAR(r->stalled_s, 100 + 1 + 5, 1e-9);
  EXPECT_NEAR(r->paid_gpu_s, 4 * 3600 + 3 * 3600 + 4 * (r->wall_s - 7200), 1e-6);
  ASSERT_FALSE(timeline.empty());
  EXPECT_EQ(timeline.front().working, 0);
  EXPECT_EQ(timeline.front().live, 4);
  EXPECT_NEAR(timeline.back().steps, 36000, 1e-6);
  EXPECT_NEAR(timeline.back().time_s, r->wall_s, 1e-9);
}

TEST(SimulateRunTest, CheckpointEveryStepsRollsBackToAStepMultiple) {
  JobSpec job = FourGpuJob(4 * 36000 + 400);
  job.checkpoint_every_steps = 1000;  // 4000 GPU-s, 1000 s on 4
  const SimResult r = Scripted(kWipe, job, Recovery::kPeer, kInf);
  ASSERT_TRUE(r.finished);
  // Checkpoints commit 4000, 8000 and 12000 (10 s stalls, at 1000, 2010, 3020 s); the wipe
  // at 3600 s loses 2280; restore + recovery until 7231; then 132400 / 4 s of compute with
  // 33 checkpoints (16000 .. 144000).
  EXPECT_NEAR(r.lost_gpu_s, 2280, 1e-6);
  EXPECT_EQ(r.checkpoints, 36);
  EXPECT_NEAR(r.wall_s, 7231 + 33100 + 330, 1e-6);
}

TEST(SimulateRunTest, RejectsBadInput) {
  CapacityModel model;
  auto capacity = CapacityProcess::Create(model, 2, 1);
  ASSERT_TRUE(capacity.ok());
  JobSpec job = FourGpuJob(1000);
  auto mismatch = SimulateRun(job, Recovery::kPeer, 100, *capacity);
  EXPECT_THAT(mismatch.status().message(), HasSubstr("different number of GPUs"));
  job.gpus = 2;
  EXPECT_THAT(SimulateRun(job, Recovery::kPeer, 0, *capacity).status().message(),
              HasSubstr("interval"));
  job.min_gpus = 3;
  EXPECT_THAT(SimulateRun(job, Recovery::kPeer, 100, *capacity).status().message(),
              HasSubstr("min_gpus must be in 1..gpus (2)"));
  job.min_gpus = 1;
  job.step_s = 0;
  EXPECT_THAT(SimulateRun(job, Recovery::kPeer, 100, *capacity).status().message(),
              HasSubstr("step_seconds"));
}

TEST(SimulateRunTest, RestartMatchesDalysExpectedWallTime) {
  // One instance, losses at rate 2/h replaced at once, restart in R: exactly Daly's model
  // (interrupts also strike during checkpoints and restarts), so the mean wall time of many
  // runs matches his closed form.
  const double m = kHour / 2, c = 60, r = 120, interval = 900;
  JobSpec job;
  job.gpus = 1;
  job.work_gpu_s = 100 * interval + interval / 2;
  job.checkpoint_cost_s = c;
  job.restore_cost_s = 0;
  job.restart_overhead_s = r;
  CapacityModel model;
  model.loss_rate_per_hour = kHour / m;
  model.replacement_s = 0;
  double sum = 0;
  const int trials = 300;
  for (int i = 0; i < trials; ++i) {
    auto capacity = CapacityProcess::Create(model, 1, 1000 + i);
    ASSERT_TRUE(capacity.ok());
    auto result = SimulateRun(job, Recovery::kRestart, interval, std::move(*capacity));
    ASSERT_TRUE(result.ok() && result->finished);
    sum += result->wall_s;
  }
  // Daly counts a checkpoint after the last (here half) segment; the simulation does not.
  const double daly = DalyExpectedWallTime(job.work_gpu_s, interval, c, r, m);
  EXPECT_NEAR(sum / trials, daly, daly * 0.03);
}

// ---- The plan -------------------------------------------------------------------------------

PlanRequest BasePlan() {
  PlanRequest request;
  request.spot_price = 0.232;
  request.on_demand_price = 0.491;
  request.job.gpus = 1;
  request.job.work_gpu_s = 24 * kHour;
  request.trials = 20;
  return request;
}

TEST(MakePlanTest, NoPreemptionsIsTheAnalyticCost) {
  const PlanRequest request = BasePlan();
  auto plan = MakePlan(request);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_NEAR(plan->on_demand.cost.mean, 11.784, 1e-9);
  EXPECT_NEAR(plan->on_demand.wall_s.mean, 24 * kHour, 1e-9);
  for (const ModeEstimate* spot : {&plan->spotrain, &plan->restart}) {
    EXPECT_NEAR(spot->cost.mean, 5.568, 1e-9) << spot->name;
    EXPECT_NEAR(spot->cost.p90, 5.568, 1e-9) << spot->name;
    EXPECT_NEAR(spot->wall_s.mean, 24 * kHour, 1e-6) << spot->name;
    EXPECT_NEAR(spot->goodput, 1.0, 1e-12) << spot->name;
    EXPECT_EQ(spot->finished, 20);
    // No interruption: no periodic checkpoint is worth its stall.
    EXPECT_EQ(spot->interval_s, kInf);
    EXPECT_EQ(spot->checkpoints, 0);
  }
  EXPECT_EQ(std::round(plan->on_demand.cost.mean * 100) / 100, 11.78);
  EXPECT_EQ(std::round(plan->spotrain.cost.mean * 100) / 100, 5.57);
}

TEST(MakePlanTest, DeterministicForASeed) {
  PlanRequest request = BasePlan();
  request.job.gpus = 8;
  request.job.work_gpu_s = 8 * 24 * kHour;
  request.capacity.loss_rate_per_hour = 0.5;
  auto a = MakePlan(request);
  auto b = MakePlan(request);
  ASSERT_TRUE(a.ok() && b.ok());
  for (auto [x, y] : {std::pair{&a->spotrain, &b->spotrain}, std::pair{&a->restart, &b->restart}}) {
    EXPECT_EQ(x->wall_s.mean, y->wall_s.mean);
    EXPECT_EQ(x->wall_s.p90, y->wall_s.p90);
    EXPECT_EQ(x->cost.mean, y->cost.mean);
    EXPECT_EQ(x->lost_gpu_s, y->lost_gpu_s);
    EXPECT_EQ(x->loss_events, y->loss_events);
  }
  request.seed = 2;
  auto c = MakePlan(request);
  ASSERT_TRUE(c.ok());
  EXPECT_NE(a->spotrain.wall_s.mean, c->spotrain.wall_s.mean);
  EXPECT_NE(a->restart.wall_s.mean, c->restart.wall_s.mean);
}

TEST(MakePlanTest, SpotrainGoodputAtLeastRestartUnderLosses) {
  PlanRequest request = BasePlan();
  request.job.gpus = 8;
  request.job.work_gpu_s = 8 * 24 * kHour;
  for (double rate : {0.05, 0.5, 1.6}) {
    request.capacity.loss_rate_per_hour = rate;
    auto plan = MakePlan(request);
    ASSERT_TRUE(plan.ok()) << plan.status();
    EXPECT_GE(plan->spotrain.goodput, plan->restart.goodput) << rate;
    EXPECT_GE(plan->spotrain.useful_per_paid, plan->restart.useful_per_paid) << rate;
    EXPECT_LE(plan->spotrain.cost.mean, plan->restart.cost.mean) << rate;
    EXPECT_LE(plan->spotrain.lost_gpu_s, plan->restart.lost_gpu_s) << rate;
    EXPECT_GT(plan->restart.restarts, 0) << rate;
    EXPECT_LT(plan->restart.goodput, 1.0) << rate;
  }
}

TEST(MakePlanTest, IntervalsFollowYoungDaly) {
  PlanRequest request = BasePlan();
  request.job.gpus = 8;
  request.job.work_gpu_s = 8 * 24 * kHour;
  request.capacity.loss_rate_per_hour = 0.5;
  auto plan = MakePlan(request);
  ASSERT_TRUE(plan.ok());
  // Restart: M = 1/(8 x 0.5/h) = 900 s, C = 10 s.
  EXPECT_NEAR(plan->restart.interval.mtbi_s, 900, 1e-9);
  EXPECT_NEAR(plan->restart.interval_s, DalyInterval(10, 900), 1e-9);
  EXPECT_EQ(plan->restart.interval.bound, IntervalBound::kNone);
  // spotrain: M is the time between full wipes of 8 independent instances (each missing
  // with probability q = 0.2): 1/(8 x 0.8 x 0.2^7 x 0.5/h) = 24414 h, far beyond the cap.
  EXPECT_NEAR(plan->spotrain.interval.mtbi_s / kHour, 24414.0625, 1e-6);
  EXPECT_EQ(plan->spotrain.interval.bound, IntervalBound::kMax);
  EXPECT_DOUBLE_EQ(plan->spotrain.interval_s, 3600);
  // An explicit interval wins in both modes.
  request.interval_override_s = 600;
  auto fixed = MakePlan(request);
  ASSERT_TRUE(fixed.ok());
  EXPECT_DOUBLE_EQ(fixed->spotrain.interval_s, 600);
  EXPECT_DOUBLE_EQ(fixed->restart.interval_s, 600);
  EXPECT_TRUE(fixed->restart.interval_overridden);
}

TEST(MakePlanTest, RealTraceWithEightGpus) {
  auto trace = RealTrace();
  ASSERT_TRUE(trace.ok()) << trace.status();
  PlanRequest request = BasePlan();
  request.job.gpus = 8;
  request.job.work_gpu_s = 8 * 24 * kHour;
  request.capacity.trace = std::make_shared<CapacityTrace>(*trace);
  auto plan = MakePlan(request);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_TRUE(plan->has_trace_stats);
  EXPECT_NEAR(plan->loss_rate_per_instance_hour, 0.638, 0.001);
  EXPECT_NEAR(plan->restart.interval.mtbi_s, kHour / (8 * 0.6378), 1);
  EXPECT_GE(plan->spotrain.goodput, plan->restart.goodput);
  EXPECT_LE(plan->spotrain.cost.mean, plan->restart.cost.mean);
  EXPECT_EQ(plan->spotrain.finished, request.trials);
  // About a quarter of the capacity is missing on average, so even spotrain takes longer
  // than on demand, while paying only for what it uses.
  EXPECT_GT(plan->spotrain.wall_s.mean, plan->on_demand.wall_s.mean);
  EXPECT_GT(plan->spotrain.useful_per_paid, 0.99);
}

TEST(MakePlanTest, RejectsBadRequests) {
  PlanRequest request = BasePlan();
  request.trials = 0;
  EXPECT_THAT(MakePlan(request).status().message(), HasSubstr("trials"));
  request = BasePlan();
  request.spot_price = -1;
  EXPECT_THAT(MakePlan(request).status().message(), HasSubstr("spot_price"));
  request = BasePlan();
  request.job.work_gpu_s = 0;
  EXPECT_THAT(MakePlan(request).status().message(), HasSubstr("work"));
  request = BasePlan();
  request.capacity.loss_rate_per_hour = -0.1;
  EXPECT_THAT(MakePlan(request).status().message(), HasSubstr("preemption rate"));
  EXPECT_EQ(MakePlan(request).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace spotrain::common
