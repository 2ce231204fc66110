#include "common/flags.h"

#include "gtest/gtest.h"

namespace spotrain::common {
namespace {

TEST(FlagsTest, DashesInNamesBecomeUnderscores) {
  EXPECT_EQ(NormalizeFlagArgument("--val-fraction=0.1"), "--val_fraction=0.1");
  EXPECT_EQ(NormalizeFlagArgument("--state-dir"), "--state_dir");
  EXPECT_EQ(NormalizeFlagArgument("--name=a-b-c"), "--name=a-b-c");  // values are kept
  EXPECT_EQ(NormalizeFlagArgument("file-name.txt"), "file-name.txt");
  EXPECT_EQ(NormalizeFlagArgument("-x"), "-x");
  EXPECT_EQ(NormalizeFlagArgument("--"), "--");
}

}  // namespace
}  // namespace spotrain::common
