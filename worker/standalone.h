// The standalone run: one process, no coordinator, from fresh state to `steps`. It is the
// reference every elastic run is compared with (same config, same final state digest in
// deterministic mode), so it stays a first-class mode of the worker.
//
// Thread-safety: RunStandalone runs on the calling thread and returns when the run ends.
#ifndef SPOTRAIN_WORKER_STANDALONE_H_
#define SPOTRAIN_WORKER_STANDALONE_H_

#include <cstdio>
#include <string>

#include "absl/status/statusor.h"
#include "proto/config.pb.h"
#include "worker/trainer.h"

namespace spotrain::worker {

struct RunSummary {
  int64_t steps = 0;
  float final_train_loss = 0;
  float final_val_loss = 0;
  double mean_tokens_per_s = 0;
  std::string state_digest;
};

// Trains `config` to the end in this process, printing progress lines and a summary line
// to `out`. Errors: the trainer's (bad data, bad config) and kOutOfRange/kInternal from a
// diverging step.
// `device`: where to compute (a GPU trains with a one-rank NCCL communicator).
absl::StatusOr<RunSummary> RunStandalone(const proto::RunConfig& config, FILE* out,
                                         const TrainerDevice& device = {});

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_STANDALONE_H_
