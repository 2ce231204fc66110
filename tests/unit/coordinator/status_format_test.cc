#include "coordinator/status_format.h"

#include "gmock/gmock.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"

namespace spotrain::coordinator {
namespace {

proto::RunStatus Example() {
  proto::RunStatus s;
  s.set_state("running");
  s.set_epoch(3);
  s.set_step(120);
  s.set_world_size(2);
  s.set_last_checkpoint_step(100);
  s.set_recoveries(1);
  s.set_lost_steps(2);
  s.set_tokens_per_s(1234.5);
  s.set_run_id("abc");
  s.set_message("a \"quoted\"\nmessage");
  for (int i = 0; i < 2; ++i) {
    proto::MemberStatus* m = s.add_members();
    m->set_id(7 + i);
    m->set_name(i == 0 ? "pod-a" : "pod-b");
    m->set_address("10.0.0.1");
    m->set_rank(i);
    m->set_state("active");
    m->set_heartbeat_age_ms(12);
    m->set_step(120);
  }
  return s;
}

TEST(StatusFormatTest, JsonHasTheDocumentedFieldsAsNumbers) {
  const std::string json = RunStatusToJson(Example());
  google::protobuf::Struct parsed;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(json, &parsed).ok()) << json;
  const auto& f = parsed.fields();
  EXPECT_EQ(f.at("state").string_value(), "running");
  EXPECT_EQ(f.at("epoch").number_value(), 3);
  EXPECT_EQ(f.at("step").number_value(), 120);
  EXPECT_EQ(f.at("world_size").number_value(), 2);
  EXPECT_EQ(f.at("last_checkpoint_step").number_value(), 100);
  EXPECT_EQ(f.at("recoveries").number_value(), 1);
  EXPECT_EQ(f.at("lost_steps").number_value(), 2);
  EXPECT_EQ(f.at("tokens_per_s").number_value(), 1234.5);
  EXPECT_EQ(f.at("message").string_value(), "a \"quoted\"\nmessage");
  const auto& members = f.at("members").list_value();
  ASSERT_EQ(members.values_size(), 2);
  const auto& m = members.values(1).struct_value().fields();
  EXPECT_EQ(m.at("id").number_value(), 8);
  EXPECT_EQ(m.at("name").string_value(), "pod-b");
  EXPECT_EQ(m.at("rank").number_value(), 1);
  EXPECT_EQ(m.at("state").string_value(), "active");
  EXPECT_EQ(m.at("heartbeat_age_ms").number_value(), 12);
  EXPECT_EQ(m.at("step").number_value(), 120);
}

TEST(StatusFormatTest, TableShowsEveryMember) {
  const std::string table = RunStatusToTable(Example());
  EXPECT_THAT(table, testing::HasSubstr("running, epoch 3, step 120"));
  EXPECT_THAT(table, testing::HasSubstr("pod-a"));
  EXPECT_THAT(table, testing::HasSubstr("pod-b"));
  EXPECT_THAT(table, testing::HasSubstr("recoveries: 1"));
}

TEST(StatusFormatTest, CheckpointIntervalAndFailures) {
  proto::RunStatus s = Example();
  s.set_checkpoint_interval_auto(true);
  s.set_checkpoint_every_steps(37);
  s.set_checkpoint_cost_s(0.25);
  s.set_checkpoint_mtbl_s(1800);
  s.set_checkpoint_failures(2);
  s.set_checkpoint_error("checkpoint step 110 (epoch 3) not committed: /ckpt/x: No space");
  google::protobuf::Struct parsed;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(RunStatusToJson(s), &parsed).ok());
  const auto& f = parsed.fields();
  EXPECT_TRUE(f.at("checkpoint_interval_auto").bool_value());
  EXPECT_EQ(f.at("checkpoint_every_steps").number_value(), 37);
  EXPECT_EQ(f.at("checkpoint_cost_s").number_value(), 0.25);
  EXPECT_EQ(f.at("checkpoint_mtbl_s").number_value(), 1800);
  EXPECT_EQ(f.at("checkpoint_failures").number_value(), 2);
  EXPECT_THAT(f.at("checkpoint_error").string_value(), testing::HasSubstr("/ckpt/x"));
  const std::string table = RunStatusToTable(s);
  EXPECT_THAT(table, testing::HasSubstr("checkpoint interval: auto, every 37 steps (C 0.250 s, "
                                        "M 1800 s)"));
  EXPECT_THAT(table, testing::HasSubstr("checkpoint error (2 failed so far): checkpoint step 110"));
  s.set_checkpoint_interval_auto(false);
  s.set_checkpoint_cost_s(-1);
  EXPECT_THAT(RunStatusToTable(s), testing::HasSubstr("checkpoint interval: every 37 steps"));
}

}  // namespace
}  // namespace spotrain::coordinator
