#include "common/run_config.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace spotrain::common {
namespace {

using ::testing::HasSubstr;

constexpr char kValid[] = R"({
  "model": "gpt-tiny",
  "data": {"train": "d/train_*.bin", "val": "d/val_*.bin"},
  "seq_len": 64, "global_batch": 8, "micro_batch": 2, "steps": 10,
  "optimizer": {"lr": 0.001, "weight_decay": 0.0},
  "checkpoint": {"dir": "/tmp/ck", "every_steps": 5}
})";

std::string Replace(std::string s, const std::string& from, const std::string& to) {
  size_t pos = s.find(from);
  EXPECT_NE(pos, std::string::npos) << from;
  return s.replace(pos, from.size(), to);
}

TEST(RunConfigTest, ParsesAndDefaults) {
  auto config = ParseRunConfig(kValid);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->seq_len(), 64);
  EXPECT_EQ(config->seed(), 1337u);
  EXPECT_FLOAT_EQ(config->optimizer().weight_decay(), 0.0f);  // explicit zero is kept
  EXPECT_FLOAT_EQ(config->optimizer().beta2(), 0.95f);
  EXPECT_EQ(FixedCheckpointInterval(*config), 5);
  EXPECT_FALSE(AutoCheckpointInterval(*config));
  EXPECT_EQ(config->precision(), "fp32");
}

TEST(RunConfigTest, AutoInterval) {
  auto config = ParseRunConfig(Replace(kValid, "\"every_steps\": 5", "\"every_steps\": \"auto\""));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(AutoCheckpointInterval(*config));
  EXPECT_EQ(FixedCheckpointInterval(*config), 0);
}

struct BadCase {
  std::string from, to, expected;
};

TEST(RunConfigTest, RejectsBadInputNamingTheField) {
  const BadCase cases[] = {
      {"\"steps\": 10", "\"steps\": 0", "steps"},
      {"\"micro_batch\": 2", "\"micro_batch\": 3", "global_batch"},
      {"\"model\": \"gpt-tiny\"", "\"model\": \"gpt-huge\"", "gpt-huge"},
      {"\"seq_len\": 64", "\"seq_len\": 4096", "seq_len"},
      {"\"seq_len\": 64", "\"seq_len\": \"long\"", "seq_len"},
      {"\"steps\": 10", "\"steps\": 10, \"stepz\": 3", "stepz"},
      {"\"every_steps\": 5", "\"every_steps\": \"often\"", "checkpoint.every_steps"},
      {"\"every_steps\": 5", "\"every_steps\": 2.5", "checkpoint.every_steps"},
      {"\"train\": \"d/train_*.bin\", ", "", "data.train"},
      {"\"lr\": 0.001", "\"lr\": -1", "optimizer.lr"},
  };
  for (const BadCase& c : cases) {
    auto config = ParseRunConfig(Replace(kValid, c.from, c.to));
    ASSERT_FALSE(config.ok()) << c.to;
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(config.status().message()), HasSubstr(c.expected)) << c.to;
  }
}

TEST(RunConfigTest, DefaultConfigIsValidAndFingerprintTracksMath) {
  proto::RunConfig a = DefaultRunConfig("/data");
  EXPECT_TRUE(ValidateRunConfig(a).ok());
  proto::RunConfig b = a;
  b.set_heartbeat_ms(100);  // operational, not mathematical
  EXPECT_EQ(RunFingerprint(a), RunFingerprint(b));
  b.set_seed(7);
  EXPECT_NE(RunFingerprint(a), RunFingerprint(b));
}

}  // namespace
}  // namespace spotrain::common
