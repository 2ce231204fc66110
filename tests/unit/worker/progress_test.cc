// The progress and summary lines that scripts (scripts/demo.py, tests/integration/harness.py)
// parse.
#include "worker/progress.h"

#include <cmath>
#include <string>

#include "gtest/gtest.h"

namespace spotrain::worker {
namespace {

TEST(ProgressTest, StepLineWithAndWithoutValidation) {
  StepStats stats;
  stats.step = 11;
  stats.loss = 3.12345f;
  stats.lr = 1e-3f;
  stats.tokens = 1024;
  stats.step_ms = 100;
  EXPECT_EQ(FormatProgressLine(stats, 300, -1),
            "step 12/300 | loss 3.1235 | lr 1.00e-03 | 10240 tok/s | 100.0 ms/step");
  EXPECT_EQ(FormatProgressLine(stats, 300, 3.0101f),
            "step 12/300 | loss 3.1235 | val 3.0101 | lr 1.00e-03 | 10240 tok/s | 100.0 ms/step");
}

TEST(ProgressTest, SummaryLineCarriesTheFinalValidationLoss) {
  EXPECT_EQ(FormatSummaryLine(300, 2.01234f, "3fa9"),
            "done | steps 300 | final val loss 2.0123 | state_digest 3fa9");
  EXPECT_EQ(FormatSummaryLine(300, 0.0f, "3fa9"),
            "done | steps 300 | final val loss 0.0000 | state_digest 3fa9");
}

TEST(ProgressTest, DivergedValidationLossShowsAsNan) {
  StepStats stats;
  stats.step = 0;
  stats.tokens = 1;
  stats.step_ms = 1000;
  const float nan = std::nanf("");
  EXPECT_EQ(FormatSummaryLine(5, nan, "ab"),
            "done | steps 5 | final val loss nan | state_digest ab");
  EXPECT_NE(FormatProgressLine(stats, 5, nan).find(" | val nan | "), std::string::npos)
      << FormatProgressLine(stats, 5, nan);
}

TEST(ProgressTest, UnknownFinalValidationLossIsNotANumber) {
  // A worker that received the final state in an epoch the run's end cut short never
  // evaluated it: no made-up number for scripts to average.
  EXPECT_EQ(FormatSummaryLine(300, -1.0f, "3fa9"),
            "done | steps 300 | final val loss n/a | state_digest 3fa9");
}

}  // namespace
}  // namespace spotrain::worker
