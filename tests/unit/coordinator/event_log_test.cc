#include "coordinator/event_log.h"

#include <stdlib.h>

#include <string>

#include "common/file_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace spotrain::coordinator {
namespace {

using ::testing::HasSubstr;

std::string TempDir() {
  std::string tmpl = "/tmp/spotrain_event_log_test_XXXXXX";
  return ::mkdtemp(tmpl.data());
}

MembershipEvent Event(int64_t epoch, const std::string& cause, int64_t unix_ms) {
  MembershipEvent e;
  e.detected = absl::FromUnixMillis(unix_ms);
  e.epoch = epoch;
  e.cause = cause;
  e.detail = "worker 3 no heartbeat";
  e.before = {1, 2, 3};
  e.after = {1, 2};
  e.start_step = 41;
  e.state_source = "broadcast from rank 0";
  e.prepare_sent_ms = 0;
  e.plan_sent_ms = 3.75;
  return e;
}

TEST(EventLogTest, LineHasEveryFieldAndNullForUnknownPoints) {
  const std::string json = EventToJson(Event(2, "lost", 1796000000123));
  EXPECT_THAT(json, HasSubstr("{\"time\":\"2026-11-30T"));
  EXPECT_THAT(json, HasSubstr(".123Z\",\"epoch\":2,\"cause\":\"lost\",\"detail\":"));
  EXPECT_THAT(json, HasSubstr("\"members_before\":[1,2,3],\"members_after\":[1,2]"));
  EXPECT_THAT(json, HasSubstr("\"plan_sent_ms\":3.8"));
  EXPECT_THAT(json, HasSubstr("\"group_rebuilt_ms\":null"));
  EXPECT_THAT(json, HasSubstr("\"first_step_ms\":null"));
}

TEST(EventLogTest, ContainsFindsOnlyTheSameEvent) {
  const std::string dir = TempDir();
  auto log = EventLog::Open(dir + "/events.jsonl");
  ASSERT_TRUE(log.ok()) << log.status();
  const MembershipEvent written = Event(2, "lost", 1796000000123);
  EXPECT_FALSE(*(*log)->Contains(written));  // empty file
  ASSERT_TRUE((*log)->Write(Event(1, "joined", 1796000000000)).ok());
  ASSERT_TRUE((*log)->Write(written).ok());
  EXPECT_TRUE(*(*log)->Contains(written));
  EXPECT_TRUE(*(*log)->Contains(Event(1, "joined", 1796000000000)));
  EXPECT_FALSE(*(*log)->Contains(Event(3, "lost", 1796000000123)));      // other epoch
  EXPECT_FALSE(*(*log)->Contains(Event(2, "lost", 1796000000124)));      // other time
  EXPECT_FALSE(*(*log)->Contains(Event(2, "restored", 1796000000123)));  // other cause
  (void)std::system(("rm -rf " + dir).c_str());
}

TEST(EventLogTest, ContainsLooksAtTheLastMebibyteOnly) {
  const std::string dir = TempDir();
  const MembershipEvent old = Event(1, "joined", 1796000000000);
  // The old line, then 1.5 MiB of later lines push it out of the window.
  std::string text = EventToJson(old) + "\n";
  for (int i = 0; i < 6000; ++i)
    text += EventToJson(Event(2 + i, "lost", 1796000001000 + i)) + "\n";
  ASSERT_GT(text.size(), 1536u * 1024);
  ASSERT_TRUE(common::WriteFileAtomically(dir + "/events.jsonl", text).ok());
  auto log = EventLog::Open(dir + "/events.jsonl");
  ASSERT_TRUE(log.ok()) << log.status();
  const MembershipEvent last = Event(6002, "lost", 1796000009000);
  ASSERT_TRUE((*log)->Write(last).ok());
  EXPECT_FALSE(*(*log)->Contains(old));
  EXPECT_TRUE(*(*log)->Contains(last));
  EXPECT_TRUE(*(*log)->Contains(Event(4000, "lost", 1796000004998)));
  (void)std::system(("rm -rf " + dir).c_str());
}

}  // namespace
}  // namespace spotrain::coordinator
