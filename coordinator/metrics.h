// Prometheus metrics of the coordinator (prometheus-cpp), served on --metrics-port at
// /metrics: members by state, epoch, step, world size, tokens/s, goodput, run state, losses,
// announced leaves, joins, recoveries, lost steps, checkpoints, and histograms of recovery
// duration and checkpoint commit time. Thread-safe (prometheus-cpp metrics are atomic); the
// coordinator's state thread updates them, the exposer's threads read them.
#ifndef SPOTRAIN_COORDINATOR_METRICS_H_
#define SPOTRAIN_COORDINATOR_METRICS_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "coordinator/membership.h"
#include "proto/spotrain.pb.h"

namespace spotrain::coordinator {

class Metrics {
 public:
  // Metrics that are kept but not served.
  Metrics();
  ~Metrics();
  // Serves /metrics on host:port (port 0: not served). kUnavailable when the port cannot
  // be bound.
  static absl::StatusOr<std::unique_ptr<Metrics>> Create(const std::string& host, int port);

  // Sets gauges and advances counters from a status snapshot and the running totals.
  void Update(const proto::RunStatus& status, const MembershipCounters& counters);
  void ObserveRecovery(double seconds);
  void ObserveCheckpointCommit(double seconds);

  // The exposition text (what /metrics serves), for tests.
  std::string Render() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace spotrain::coordinator

#endif  // SPOTRAIN_COORDINATOR_METRICS_H_
