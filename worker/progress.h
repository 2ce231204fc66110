// Formatting of the progress and summary lines a worker prints, shared by the standalone and
// the elastic modes so that scripts parse one format. Pure functions; thread-safe.
//
//   step 12/300 | loss 3.1234 | val 3.0101 | lr 1.00e-03 | 10234 tok/s | 100.1 ms/step
//   done | steps 300 | final val loss 2.0123 | state_digest 3fa9...
#ifndef SPOTRAIN_WORKER_PROGRESS_H_
#define SPOTRAIN_WORKER_PROGRESS_H_

#include <optional>
#include <string>

#include "worker/trainer.h"

namespace spotrain::worker {

// `val_loss` < 0 means "not evaluated at this step" (NaN prints as nan).
std::string FormatProgressLine(const StepStats& stats, int64_t total_steps, float val_loss);
// `final_val_loss` < 0 prints as "n/a": a worker that received the final state but whose
// evaluation of it the run's end cut short.
std::string FormatSummaryLine(int64_t steps, float final_val_loss, const std::string& digest);

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_PROGRESS_H_
