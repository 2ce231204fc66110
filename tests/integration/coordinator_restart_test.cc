// Multi-process test of the coordinator's durability: the real spotrain-coordinator binary is
// killed with SIGKILL (kill -9) and restarted from its state dir while fake workers
// (tests/support/fake_worker.h) keep their state and re-join. Checks that the run
// config, epoch, worker ids and committed checkpoints survive, that a checkpoint half-reported
// before the kill is committed after it, and that the run then finishes (exit 0).
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/file_util.h"
#include "coordinator/checkpoint_store.h"
#include "coordinator/client_auth.h"
#include "coordinator/planner.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/fake_worker.h"

extern char** environ;

namespace spotrain::coordinator {
namespace {

using ::spotrain::coordinator::testing::Eventually;
using ::spotrain::coordinator::testing::FakeWorker;
using ::testing::HasSubstr;

constexpr char kToken[] = "integration-token";
constexpr int64_t kStateFloats = 512;

int FreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

std::string CoordinatorBinary() {
  if (const char* bin = std::getenv("SPOTRAIN_COORDINATOR_BIN")) return bin;
  if (const char* build = std::getenv("SPOTRAIN_BUILD_DIR")) {
    return absl::StrCat(build, "/bin/spotrain-coordinator");
  }
  return "spotrain-coordinator";
}

// One spotrain-coordinator process, its output appended to `log`.
class Process {
 public:
  Process(const std::vector<std::string>& args, const std::string& log) {
    std::vector<char*> argv;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    EXPECT_EQ(posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), environ), 0)
        << "cannot start " << args[0];
    posix_spawn_file_actions_destroy(&actions);
  }
  ~Process() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      Wait();
    }
  }
  void Kill9() {
    ASSERT_EQ(::kill(pid_, SIGKILL), 0);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    EXPECT_TRUE(WIFSIGNALED(status));
    pid_ = -1;
  }
  // Exit code, or -1 when it has not exited within the timeout / was killed.
  int Wait(absl::Duration timeout = absl::Seconds(60)) {
    int status = 0;
    const bool exited =
        Eventually([&] { return ::waitpid(pid_, &status, WNOHANG) == pid_; }, timeout);
    if (!exited) return -1;
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  bool Alive() const { return pid_ > 0 && ::kill(pid_, 0) == 0; }

 private:
  pid_t pid_ = -1;
};

class CoordinatorRestartTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = "/tmp/spotrain_restart_test_XXXXXX";
    dir_ = ::mkdtemp(tmpl.data());
    checkpoint_dir_ = dir_ + "/ckpt";
    port_ = FreePort();
    ::setenv("SPOTRAIN_TOKEN", kToken, 1);
  }
  void TearDown() override {
    workers_.clear();
    process_.reset();
    if (!HasFailure()) (void)std::system(("rm -rf " + dir_).c_str());
  }

  void WriteConfig(int steps, int heartbeat_timeout_ms = 3000) {
    const std::string json = absl::StrFormat(
        R"({"model": "gpt-tiny", "data": {"train": "d/train_*.bin", "val": "d/val_*.bin"},
            "steps": %d, "global_batch": 8, "micro_batch": 2,
            "checkpoint": {"dir": "%s", "every_steps": 5, "keep": 3},
            "heartbeat_ms": 50, "heartbeat_timeout_ms": %d, "join_settle_ms": 100})",
        steps, checkpoint_dir_, heartbeat_timeout_ms);
    ASSERT_TRUE(common::WriteFileAtomically(dir_ + "/run.json", json).ok());
  }

  // Starts the coordinator and waits until it answers.
  void StartCoordinator() {
    process_ = std::make_unique<Process>(
        std::vector<std::string>{CoordinatorBinary(), "--config", dir_ + "/run.json", "--host",
                                 "127.0.0.1", "--port", absl::StrCat(port_), "--state-dir",
                                 dir_ + "/state"},
        dir_ + "/coordinator.log");
    channel_ =
        ConnectToCoordinator(absl::StrCat("127.0.0.1:", port_), grpc::InsecureChannelCredentials());
    ASSERT_TRUE(Eventually([&] {
      grpc::Status s;
      Status(&s);
      return s.ok();
    })) << "coordinator did not answer; log:\n"
        << Log();
  }

  proto::RunStatus Status(grpc::Status* out = nullptr) {
    auto stub = proto::Coordinator::NewStub(channel_);
    grpc::ClientContext ctx;
    AttachToken(&ctx, kToken);
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    proto::RunStatus status;
    grpc::Status s = stub->GetStatus(&ctx, proto::StatusRequest(), &status);
    if (out != nullptr) *out = s;
    return status;
  }

  std::string Log() {
    auto text = common::ReadFile(dir_ + "/coordinator.log");
    return text.ok() ? *text : "";
  }

  FakeWorker& NewWorker(const std::string& name) {
    workers_.push_back(std::make_unique<FakeWorker>(name, channel_, kToken));
    return *workers_.back();
  }

  void WriteShard(FakeWorker& w, int64_t step) {
    coordinator::testing::WriteShard(w, checkpoint_dir_, step, kStateFloats, 'e');
  }

  std::string Manifest(int64_t step) {
    return StepDirectory(checkpoint_dir_, step) + "/manifest.json";
  }

  // The workers join, answer the Prepare and receive the first Plan.
  void JoinAndPlan(const std::vector<FakeWorker*>& workers) {
    for (FakeWorker* w : workers) {
      ASSERT_TRUE(w->Join().ok());
      w->Open();
    }
    for (FakeWorker* w : workers) ASSERT_GT(w->AnswerPrepare(-1), 0);
    for (FakeWorker* w : workers) ASSERT_TRUE(w->WaitPlan().has_value());
  }

  // The lines of events.jsonl for `epoch` with `cause`.
  std::vector<std::string> EventLines(int64_t epoch, const std::string& cause) {
    std::vector<std::string> found;
    auto text = common::ReadFile(dir_ + "/state/events.jsonl");
    if (!text.ok()) return found;
    const std::string key = absl::StrFormat("\"epoch\":%d,\"cause\":\"%s\"", epoch, cause);
    for (absl::string_view line : absl::StrSplit(*text, '\n', absl::SkipEmpty())) {
      if (absl::StrContains(line, key)) found.emplace_back(line);
    }
    return found;
  }

  std::string dir_, checkpoint_dir_;
  int port_ = 0;
  std::unique_ptr<Process> process_;
  std::shared_ptr<grpc::Channel> channel_;
  std::vector<std::unique_ptr<FakeWorker>> workers_;
};

TEST_F(CoordinatorRestartTest, KillDashNineAndRestartKeepsTheRun) {
  WriteConfig(/*steps=*/20);
  StartCoordinator();
  FakeWorker& a = NewWorker("a");
  FakeWorker& b = NewWorker("b");
  ASSERT_NO_FATAL_FAILURE(JoinAndPlan({&a, &b}));
  const int64_t epoch = a.epoch();
  const uint64_t old_a = a.id(), old_b = b.id();
  for (int64_t s = 0; s < 5; ++s) a.StepDone(s);
  WriteShard(a, 5);
  WriteShard(b, 5);
  ASSERT_TRUE(Eventually([&] { return common::PathExists(Manifest(5)); })) << Log();
  for (int64_t s = 5; s < 10; ++s) a.StepDone(s);
  // Half of checkpoint 10 is reported, then the coordinator dies.
  WriteShard(a, 10);
  ASSERT_TRUE(Eventually([&] { return Status().step() == 10; }));
  const std::string run_id = Status().run_id();
  process_->Kill9();
  EXPECT_TRUE(a.WaitEnded());
  EXPECT_TRUE(b.WaitEnded());
  EXPECT_FALSE(common::PathExists(Manifest(10)));

  // The workers keep their state and re-join with backoff while the coordinator restarts.
  StartCoordinator();
  proto::RunStatus restored = Status();
  EXPECT_EQ(restored.run_id(), run_id);
  EXPECT_EQ(restored.epoch(), epoch);
  EXPECT_EQ(restored.last_checkpoint_step(), 5);
  EXPECT_EQ(restored.state(), "running");
  FakeWorker& a2 = NewWorker("a");
  FakeWorker& b2 = NewWorker("b");
  ASSERT_TRUE(a2.Join(/*held_step=*/10, old_a, epoch, a.fingerprint()).ok());
  ASSERT_TRUE(b2.Join(/*held_step=*/10, old_b, epoch, b.fingerprint()).ok());
  EXPECT_GT(a2.id(), std::max(old_a, old_b)) << "worker ids must not be reused";
  EXPECT_GT(b2.id(), a2.id());
  a2.Open();
  b2.Open();
  ASSERT_TRUE(Eventually([&] {
    proto::RunStatus s = Status();
    return s.members_size() == 2 && s.members(0).state() == "active" &&
           s.members(1).state() == "active" && s.message().empty();
  })) << Log();
  // No new epoch: nothing was lost.
  EXPECT_EQ(Status().epoch(), epoch);
  EXPECT_EQ(Status().lost_steps(), 0);

  // The ranks of epoch `epoch` are now held by the new ids; b's shard completes step 10.
  {
    proto::WorkerMessage m;
    proto::ShardWritten* s = m.mutable_shard_written();
    s->set_epoch(epoch);
    s->set_step(10);
    s->set_rank(1);
    s->set_world_size(2);
    s->set_file(ShardFileName(1, 2));
    s->set_offset(kStateFloats / 2);
    s->set_length(kStateFloats / 2);
    s->set_checksum("0011223344556677");
    s->set_state_digest(std::string(64, 'e'));
    s->set_state_floats(kStateFloats);
    ASSERT_TRUE(common::WriteFileAtomically(
                    common::JoinPath(StepDirectory(checkpoint_dir_, 10), ShardFileName(1, 2)),
                    std::string(kStateFloats / 2 * 4, '\0'))
                    .ok());
    b2.Send(m);
  }
  ASSERT_TRUE(Eventually([&] { return common::PathExists(Manifest(10)); })) << Log();
  EXPECT_EQ(Status().last_checkpoint_step(), 10);

  // The run goes on to the end; the coordinator exits 0 after the final checkpoint.
  auto step_done = [&](FakeWorker& w, int64_t step) {
    proto::WorkerMessage m;
    m.mutable_step_done()->set_epoch(epoch);
    m.mutable_step_done()->set_step(step);
    m.mutable_step_done()->set_tokens(1024);
    m.mutable_step_done()->set_step_ms(5);
    w.Send(m);
  };
  for (int64_t s = 10; s < 20; ++s) step_done(a2, s);
  for (int rank = 0; rank < 2; ++rank) {
    FakeWorker& w = rank == 0 ? a2 : b2;
    ASSERT_TRUE(common::MakeDirectories(StepDirectory(checkpoint_dir_, 20)).ok());
    ASSERT_TRUE(common::WriteFileAtomically(
                    common::JoinPath(StepDirectory(checkpoint_dir_, 20), ShardFileName(rank, 2)),
                    std::string(kStateFloats / 2 * 4, '\0'))
                    .ok());
    proto::WorkerMessage m;
    proto::ShardWritten* s = m.mutable_shard_written();
    s->set_epoch(epoch);
    s->set_step(20);
    s->set_rank(rank);
    s->set_world_size(2);
    s->set_file(ShardFileName(rank, 2));
    s->set_offset(rank * kStateFloats / 2);
    s->set_length(kStateFloats / 2);
    s->set_checksum("0011223344556677");
    s->set_state_digest(std::string(64, 'e'));
    s->set_state_floats(kStateFloats);
    w.Send(m);
  }
  auto stop = a2.WaitStop();
  ASSERT_TRUE(stop.has_value()) << Log();
  EXPECT_TRUE(stop->run_done());
  EXPECT_EQ(process_->Wait(), 0) << Log();
  auto events = common::ReadFile(dir_ + "/state/events.jsonl");
  ASSERT_TRUE(events.ok());
  EXPECT_THAT(*events, HasSubstr("\"cause\":\"restored\""));
  // The first plan's line: written once, whether its timeline was still open at the kill
  // (then by the restarted process) or not.
  EXPECT_EQ(EventLines(epoch, "joined").size(), 1u) << *events;
  // keep = 3: steps 5, 10 and 20 are all still there.
  EXPECT_TRUE(common::PathExists(Manifest(5)));
}

TEST_F(CoordinatorRestartTest, EventLeftOpenByTheKillIsWrittenAfterTheRestart) {
  WriteConfig(/*steps=*/20);
  StartCoordinator();
  FakeWorker& a = NewWorker("a");
  FakeWorker& b = NewWorker("b");
  ASSERT_NO_FATAL_FAILURE(JoinAndPlan({&a, &b}));
  const int64_t epoch = a.epoch();
  // No step and no recovery report: the timeline stays open (for 5 minutes), no line yet.
  EXPECT_TRUE(EventLines(epoch, "joined").empty());
  process_->Kill9();
  EXPECT_TRUE(a.WaitEnded());
  EXPECT_TRUE(b.WaitEnded());

  StartCoordinator();
  std::vector<std::string> lines = EventLines(epoch, "joined");
  ASSERT_EQ(lines.size(), 1u) << Log();
  EXPECT_THAT(lines[0], HasSubstr("line written at a coordinator restart (the last process did "
                                  "not write it)"));
  EXPECT_THAT(lines[0], HasSubstr("\"members_after\":["));
  EXPECT_THAT(lines[0], ::testing::Not(HasSubstr("\"plan_sent_ms\":null")));
  EXPECT_THAT(lines[0], HasSubstr("\"first_step_ms\":null"));

  // Killed and restarted again: the line is not written twice.
  process_->Kill9();
  StartCoordinator();
  EXPECT_EQ(EventLines(epoch, "joined").size(), 1u) << Log();
}

// events.jsonl on a full disk (a link to /dev/full): the finished timeline's line cannot be
// written, so the event stays open in the journal, and the next start writes it.
TEST_F(CoordinatorRestartTest, EventLineFailedOnAFullDiskIsWrittenAtTheNextStart) {
  WriteConfig(/*steps=*/20);
  ASSERT_TRUE(common::MakeDirectories(dir_ + "/state").ok());
  ASSERT_EQ(::symlink("/dev/full", (dir_ + "/state/events.jsonl").c_str()), 0);
  StartCoordinator();
  FakeWorker& a = NewWorker("a");
  FakeWorker& b = NewWorker("b");
  ASSERT_NO_FATAL_FAILURE(JoinAndPlan({&a, &b}));
  const int64_t epoch = a.epoch();
  a.StepDone(0);
  ASSERT_TRUE(Eventually([&] { return Status().step() == 1; }));
  // Both recovery reports complete the timeline: the line is due now.
  for (FakeWorker* w : {&a, &b}) {
    proto::WorkerMessage m;
    m.mutable_recovery_report()->set_epoch(epoch);
    m.mutable_recovery_report()->set_group_rebuilt_ms(5);
    m.mutable_recovery_report()->set_state_synced_ms(6);
    m.mutable_recovery_report()->set_first_step_ms(7);
    w->Send(m);
  }
  ASSERT_TRUE(Eventually([&] { return absl::StrContains(Log(), "No space left on device"); },
                         absl::Seconds(60)))
      << Log();
  process_->Kill9();
  EXPECT_TRUE(a.WaitEnded());
  EXPECT_TRUE(b.WaitEnded());

  ASSERT_EQ(::unlink((dir_ + "/state/events.jsonl").c_str()), 0);  // space again
  StartCoordinator();
  std::vector<std::string> lines = EventLines(epoch, "joined");
  ASSERT_EQ(lines.size(), 1u) << Log();
  EXPECT_THAT(lines[0], HasSubstr("line written at a coordinator restart"));
  // The first step was journaled with the open event.
  EXPECT_THAT(lines[0], ::testing::Not(HasSubstr("\"first_step_ms\":null")));
}

TEST_F(CoordinatorRestartTest, KillAtRandomMomentsNeverCorruptsTheState) {
  WriteConfig(/*steps=*/100000, /*heartbeat_timeout_ms=*/600);
  std::mt19937 rng(12345);
  uint64_t max_id = 0;
  int64_t max_epoch = 0;
  std::string run_id;
  for (int round = 0; round < 6; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    StartCoordinator();
    proto::RunStatus status = Status();
    if (round == 0) run_id = status.run_id();
    EXPECT_EQ(status.run_id(), run_id);
    EXPECT_GE(status.epoch(), max_epoch);
    // Busy traffic: joins (journaled id reservations), plans (journaled), reports.
    std::vector<std::unique_ptr<FakeWorker>> burst;
    for (int i = 0; i < 3; ++i) {
      burst.push_back(std::make_unique<FakeWorker>(absl::StrCat("w", i), channel_, kToken));
      ASSERT_TRUE(burst.back()->Join().ok());
      EXPECT_GT(burst.back()->id(), max_id) << "a worker id was reused after a restart";
      max_id = burst.back()->id();
      burst.back()->Open();
    }
    for (auto& w : burst) w->AnswerPrepare(-1);
    std::uniform_int_distribution<int> delay_ms(0, 60);
    const absl::Time kill_at = absl::Now() + absl::Milliseconds(delay_ms(rng));
    int64_t step = 0;
    while (absl::Now() < kill_at) {
      for (auto& w : burst) w->StepDone(step);
      ++step;
    }
    max_epoch = std::max(max_epoch, Status().epoch());
    process_->Kill9();
    for (auto& w : burst) w->Kill();
  }
  StartCoordinator();
  EXPECT_EQ(Status().run_id(), run_id);
  EXPECT_THAT(Log(), ::testing::Not(HasSubstr("state dir"))) << "state refused after a kill";
}

}  // namespace
}  // namespace spotrain::coordinator
