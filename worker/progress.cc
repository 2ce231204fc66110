#include "worker/progress.h"

#include <cmath>

#include "absl/strings/str_format.h"

namespace spotrain::worker {
namespace {

// Negative means "not evaluated"; NaN is an evaluation that diverged and must show as such.
bool Evaluated(float val_loss) { return val_loss >= 0 || std::isnan(val_loss); }

}  // namespace

std::string FormatProgressLine(const StepStats& stats, int64_t total_steps, float val_loss) {
  std::string val = Evaluated(val_loss) ? absl::StrFormat(" | val %.4f", val_loss) : "";
  const double tokens_per_s = stats.step_ms > 0 ? stats.tokens / (stats.step_ms / 1000.0) : 0;
  return absl::StrFormat("step %d/%d | loss %.4f%s | lr %.2e | %.0f tok/s | %.1f ms/step",
                         stats.step + 1, total_steps, stats.loss, val, stats.lr, tokens_per_s,
                         stats.step_ms);
}

std::string FormatSummaryLine(int64_t steps, float final_val_loss, const std::string& digest) {
  const std::string loss =
      Evaluated(final_val_loss) ? absl::StrFormat("%.4f", final_val_loss) : std::string("n/a");
  return absl::StrFormat("done | steps %d | final val loss %s | state_digest %s", steps, loss,
                         digest);
}

}  // namespace spotrain::worker
