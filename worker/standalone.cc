#include "worker/standalone.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/logging.h"
#include "common/model_presets.h"
#include "common/status_macros.h"
#include "worker/epoch_communicator.h"
#include "worker/progress.h"
#include "worker/rendezvous_store.h"
#include "worker/trainer.h"

namespace spotrain::worker {

absl::StatusOr<RunSummary> RunStandalone(const proto::RunConfig& config, FILE* out,
                                         const TrainerDevice& device) {
  ASSIGN_OR_RETURN(std::unique_ptr<Trainer> trainer, Trainer::Create(config, device));
  trainer->InitFresh();
  SPOTRAIN_LOG(Info,
               "standalone run: %s, %d parameters, %d steps, global batch %d x %d tokens%s, on %s",
               config.model(), trainer->num_parameters(), config.steps(), config.global_batch(),
               config.seq_len(), config.deterministic() ? ", deterministic" : "",
               trainer->device_description());
  InMemoryKeyValue kv;
  GlooOptions options;
  options.interface_host = "127.0.0.1";
  EpochCommunicatorFactory communicators(device);
  proto::Plan plan;  // one rank, epoch 0
  plan.set_world_size(1);
  ASSIGN_OR_RETURN(std::unique_ptr<Communicator> comm,
                   communicators.Create(kv, plan, /*rank=*/0, options));

  RunSummary summary;
  double tokens = 0, seconds = 0;
  while (trainer->step() < config.steps()) {
    ASSIGN_OR_RETURN(StepStats stats, trainer->RunStep(*comm));
    tokens += stats.tokens;
    seconds += stats.step_ms / 1000.0;
    summary.final_train_loss = stats.loss;
    const int64_t done = trainer->step();
    float val = -1;
    const bool last = done == config.steps();
    if (last || (config.eval_every() > 0 && done % config.eval_every() == 0)) {
      ASSIGN_OR_RETURN(val, trainer->Evaluate(*comm));
      summary.final_val_loss = val;
    }
    if (last || done % config.log_every() == 0 || val >= 0) {
      std::string line = FormatProgressLine(stats, config.steps(), val);
      std::fprintf(out, "%s\n", line.c_str());
      std::fflush(out);
    }
  }
  summary.steps = trainer->step();
  summary.mean_tokens_per_s = seconds > 0 ? tokens / seconds : 0;
  summary.state_digest = trainer->StateDigest();
  std::string line = FormatSummaryLine(summary.steps, summary.final_val_loss, summary.state_digest);
  std::fprintf(out, "%s\n", line.c_str());
  std::fflush(out);
  return summary;
}

}  // namespace spotrain::worker
