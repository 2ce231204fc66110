#include "coordinator/durable_state.h"

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <string>

#include "common/file_util.h"
#include "gtest/gtest.h"

namespace spotrain::coordinator {
namespace {

std::string TempDir() {
  std::string tmpl = "/tmp/spotrain_journal_test_XXXXXX";
  return ::mkdtemp(tmpl.data());
}

proto::JournalRecord Epoch(int64_t e) {
  proto::JournalRecord r;
  r.set_epoch_prepared(e);
  return r;
}

TEST(JournalTest, ReplaysRecordsAfterTheSnapshot) {
  const std::string dir = TempDir();
  bool existed = true;
  {
    auto journal = Journal::Open(dir, &existed);
    ASSERT_TRUE(journal.ok());
    EXPECT_FALSE(existed);
    proto::CoordinatorState fresh;
    fresh.set_run_id("r1");
    ASSERT_TRUE((*journal)->Reset(fresh).ok());
    ASSERT_TRUE((*journal)->Append(Epoch(3), true).ok());
    proto::JournalRecord ids;
    ids.set_worker_ids_reserved(1025);
    ASSERT_TRUE((*journal)->Append(ids, true).ok());
    proto::JournalRecord committed;
    committed.set_checkpoint_committed(50);
    ASSERT_TRUE((*journal)->Append(committed, false).ok());
  }
  auto journal = Journal::Open(dir, &existed);
  ASSERT_TRUE(journal.ok());
  EXPECT_TRUE(existed);
  const proto::CoordinatorState& s = (*journal)->state();
  EXPECT_EQ(s.run_id(), "r1");
  EXPECT_EQ(s.last_epoch(), 3);
  EXPECT_EQ(s.worker_ids_reserved(), 1025u);
  ASSERT_EQ(s.committed_steps_size(), 1);
  EXPECT_EQ(s.committed_steps(0), 50);
}

TEST(JournalTest, TornLastLineIsIgnored) {
  const std::string dir = TempDir();
  bool existed = false;
  {
    auto journal = Journal::Open(dir, &existed);
    ASSERT_TRUE(journal.ok());
    proto::CoordinatorState fresh;
    fresh.set_run_id("r2");
    ASSERT_TRUE((*journal)->Reset(fresh).ok());
    ASSERT_TRUE((*journal)->Append(Epoch(4), true).ok());
    ASSERT_TRUE((*journal)->Append(Epoch(5), true).ok());
  }
  // Cut the last line in half, as a kill during write() could.
  const std::string log = dir + "/journal.log";
  auto text = common::ReadFile(log);
  ASSERT_TRUE(text.ok());
  ASSERT_EQ(::truncate(log.c_str(), static_cast<off_t>(text->size() - 10)), 0);
  auto journal = Journal::Open(dir, &existed);
  ASSERT_TRUE(journal.ok());
  EXPECT_EQ((*journal)->state().last_epoch(), 4);
  // The journal is usable afterwards.
  ASSERT_TRUE((*journal)->Append(Epoch(6), true).ok());
  journal->reset();
  auto again = Journal::Open(dir, &existed);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ((*again)->state().last_epoch(), 6);
}

TEST(JournalTest, CorruptSnapshotIsAnError) {
  const std::string dir = TempDir();
  ASSERT_TRUE(common::WriteFileAtomically(dir + "/state.json", "{not json").ok());
  bool existed = false;
  auto journal = Journal::Open(dir, &existed);
  EXPECT_EQ(journal.status().code(), absl::StatusCode::kDataLoss);
}

TEST(ApplyRecordTest, CommitDropsPendingShardsOfThatAndOlderSteps) {
  proto::CoordinatorState s;
  for (int64_t step : {10, 20, 30}) {
    proto::JournalRecord r;
    r.mutable_shard_written()->set_step(step);
    ApplyRecord(r, s);
  }
  proto::JournalRecord c;
  c.set_checkpoint_committed(20);
  ApplyRecord(c, s);
  ASSERT_EQ(s.pending_shards_size(), 1);
  EXPECT_EQ(s.pending_shards(0).step(), 30);
  proto::JournalRecord d;
  d.set_checkpoint_dropped(20);
  ApplyRecord(d, s);
  EXPECT_EQ(s.committed_steps_size(), 0);
}

TEST(ApplyRecordTest, EventWrittenClearsOnlyItsOwnOpenEvent) {
  proto::CoordinatorState s;
  proto::JournalRecord opened;
  opened.mutable_event_opened()->set_epoch(3);
  opened.mutable_event_opened()->set_cause("lost");
  ApplyRecord(opened, s);
  EXPECT_EQ(s.open_event().epoch(), 3);
  proto::JournalRecord older;
  older.set_event_written(2);
  ApplyRecord(older, s);
  EXPECT_EQ(s.open_event().epoch(), 3);
  opened.mutable_event_opened()->set_first_step_ms(42);
  ApplyRecord(opened, s);  // journaled again: replaces
  EXPECT_EQ(s.open_event().first_step_ms(), 42);
  proto::JournalRecord written;
  written.set_event_written(3);
  ApplyRecord(written, s);
  EXPECT_EQ(s.open_event().epoch(), 0);
}

}  // namespace
}  // namespace spotrain::coordinator
