#include "coordinator/metrics.h"

#include <exception>
#include <map>

#include "absl/strings/str_cat.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"

namespace spotrain::coordinator {

struct Metrics::Impl {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::unique_ptr<prometheus::Exposer> exposer;

  prometheus::Family<prometheus::Gauge>& members = prometheus::BuildGauge()
                                                       .Name("spotrain_members")
                                                       .Help("Workers by state")
                                                       .Register(*registry);
  prometheus::Family<prometheus::Gauge>& run_state = prometheus::BuildGauge()
                                                         .Name("spotrain_run_state")
                                                         .Help("1 for the current run state")
                                                         .Register(*registry);
  prometheus::Gauge& epoch = Gauge("spotrain_epoch", "Epoch of the current plan");
  prometheus::Gauge& step = Gauge("spotrain_step", "Completed steps of the run");
  prometheus::Gauge& world_size = Gauge("spotrain_world_size", "Members of the running plan");
  prometheus::Gauge& tokens_per_second =
      Gauge("spotrain_tokens_per_second", "Training throughput over the last 30 s");
  prometheus::Gauge& goodput =
      Gauge("spotrain_goodput_ratio", "Useful step time over wall time since the first plan");
  prometheus::Gauge& last_checkpoint =
      Gauge("spotrain_last_checkpoint_step", "Step of the newest committed checkpoint (-1: none)");
  prometheus::Gauge& checkpoint_interval =
      Gauge("spotrain_checkpoint_interval_steps",
            "Current checkpoint interval in steps (every_steps, or the \"auto\" decision)");
  prometheus::Gauge& checkpoint_cost =
      Gauge("spotrain_checkpoint_cost_seconds",
            "\"auto\": measured checkpoint cost C, the snapshot stall (-1: not measured)");
  prometheus::Gauge& checkpoint_mtbl =
      Gauge("spotrain_checkpoint_mtbl_seconds",
            "\"auto\": mean time between losses M used for the interval (0: fixed interval)");
  prometheus::Family<prometheus::Gauge>& checkpoint_error =
      prometheus::BuildGauge()
          .Name("spotrain_checkpoint_last_error")
          .Help("1, labelled with the last checkpoint that could not be committed and why")
          .Register(*registry);
  prometheus::Gauge* checkpoint_error_gauge = nullptr;
  std::string checkpoint_error_text;
  prometheus::Counter& losses = Counter("spotrain_worker_losses_total", "Workers declared lost");
  prometheus::Counter& leaves =
      Counter("spotrain_announced_leaves_total", "Announced leaves (preemption notices)");
  prometheus::Counter& joins = Counter("spotrain_joins_total", "Join calls accepted");
  prometheus::Counter& recoveries =
      Counter("spotrain_recoveries_total", "New epochs caused by a loss");
  prometheus::Counter& lost_steps =
      Counter("spotrain_lost_steps_total", "Steps redone because of losses");
  prometheus::Counter& plans = Counter("spotrain_plans_total", "Plans sent (epochs started)");
  prometheus::Counter& checkpoints =
      Counter("spotrain_checkpoints_committed_total", "Checkpoints committed");
  prometheus::Counter& checkpoint_failures =
      Counter("spotrain_checkpoint_failures_total", "Checkpoints that could not be committed");
  prometheus::Counter& rejected =
      Counter("spotrain_rejected_reports_total", "Worker reports refused (stale, fenced, bad)");
  prometheus::Histogram& recovery_seconds =
      prometheus::BuildHistogram()
          .Name("spotrain_recovery_duration_seconds")
          .Help("From loss detection to the first step of the new epoch")
          .Register(*registry)
          .Add({}, prometheus::Histogram::BucketBoundaries{0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120,
                                                           300});
  prometheus::Histogram& checkpoint_seconds =
      prometheus::BuildHistogram()
          .Name("spotrain_checkpoint_commit_seconds")
          .Help("From the first shard report to the manifest written")
          .Register(*registry)
          .Add({}, prometheus::Histogram::BucketBoundaries{0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60,
                                                           300});
  MembershipCounters seen;

  prometheus::Gauge& Gauge(const std::string& name, const std::string& help) {
    return prometheus::BuildGauge().Name(name).Help(help).Register(*registry).Add({});
  }
  prometheus::Counter& Counter(const std::string& name, const std::string& help) {
    return prometheus::BuildCounter().Name(name).Help(help).Register(*registry).Add({});
  }
};

Metrics::Metrics() : impl_(std::make_unique<Impl>()) {}
Metrics::~Metrics() = default;

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Create(const std::string& host, int port) {
  auto metrics = std::make_unique<Metrics>();
  if (port > 0) {
    try {
      metrics->impl_->exposer =
          std::make_unique<prometheus::Exposer>(absl::StrCat(host, ":", port), 1);
    } catch (const std::exception& e) {
      return absl::UnavailableError(
          absl::StrCat("cannot serve metrics on ", host, ":", port, ": ", e.what()));
    }
    metrics->impl_->exposer->RegisterCollectable(metrics->impl_->registry);
  }
  return metrics;
}

void Metrics::Update(const proto::RunStatus& status, const MembershipCounters& c) {
  Impl& m = *impl_;
  std::map<std::string, int> by_state = {
      {"joining", 0}, {"active", 0}, {"leaving", 0}, {"lost", 0}, {"reconnecting", 0}};
  for (const proto::MemberStatus& member : status.members()) ++by_state[member.state()];
  for (const auto& [state, n] : by_state) m.members.Add({{"state", state}}).Set(n);
  for (const char* state : {"waiting", "running", "paused", "done"}) {
    m.run_state.Add({{"state", state}}).Set(status.state() == state ? 1 : 0);
  }
  m.epoch.Set(static_cast<double>(status.epoch()));
  m.step.Set(static_cast<double>(status.step()));
  m.world_size.Set(status.world_size());
  m.tokens_per_second.Set(status.tokens_per_s());
  m.goodput.Set(status.goodput());
  m.last_checkpoint.Set(static_cast<double>(status.last_checkpoint_step()));
  m.checkpoint_interval.Set(static_cast<double>(status.checkpoint_every_steps()));
  m.checkpoint_cost.Set(status.checkpoint_interval_auto() ? status.checkpoint_cost_s() : -1);
  m.checkpoint_mtbl.Set(status.checkpoint_mtbl_s());
  if (status.checkpoint_error() != m.checkpoint_error_text) {
    if (m.checkpoint_error_gauge != nullptr) m.checkpoint_error.Remove(m.checkpoint_error_gauge);
    m.checkpoint_error_gauge = nullptr;
    m.checkpoint_error_text = status.checkpoint_error();
    if (!m.checkpoint_error_text.empty()) {
      m.checkpoint_error_gauge = &m.checkpoint_error.Add({{"error", m.checkpoint_error_text}});
      m.checkpoint_error_gauge->Set(1);
    }
  }
  auto advance = [](prometheus::Counter& counter, int64_t now, int64_t& seen) {
    if (now > seen) counter.Increment(static_cast<double>(now - seen));
    seen = std::max(seen, now);
  };
  advance(m.losses, c.losses, m.seen.losses);
  advance(m.leaves, c.leaves, m.seen.leaves);
  advance(m.joins, c.joins, m.seen.joins);
  advance(m.recoveries, c.recoveries, m.seen.recoveries);
  advance(m.lost_steps, c.lost_steps, m.seen.lost_steps);
  advance(m.plans, c.plans, m.seen.plans);
  advance(m.checkpoints, c.checkpoints_committed, m.seen.checkpoints_committed);
  advance(m.checkpoint_failures, c.checkpoint_failures, m.seen.checkpoint_failures);
  advance(m.rejected, c.rejected_reports, m.seen.rejected_reports);
}

void Metrics::ObserveRecovery(double seconds) { impl_->recovery_seconds.Observe(seconds); }

void Metrics::ObserveCheckpointCommit(double seconds) {
  impl_->checkpoint_seconds.Observe(seconds);
}

std::string Metrics::Render() const {
  prometheus::TextSerializer serializer;
  return serializer.Serialize(impl_->registry->Collect());
}

}  // namespace spotrain::coordinator
