// gRPC-level tests of the coordinator: a real server in-process on a free port, fake workers
// (fake_worker.h) speaking the protocol over real channels.
#include "coordinator/service.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/file_util.h"
#include "coordinator/checkpoint_store.h"
#include "coordinator/planner.h"
#include "coordinator/server.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/fake_worker.h"

namespace spotrain::coordinator {
namespace {

using ::spotrain::coordinator::testing::Eventually;
using ::spotrain::coordinator::testing::FakeWorker;
using ::testing::HasSubstr;

constexpr int64_t kStateFloats = 1000;

std::string MakeTempDir() {
  std::string tmpl = "/tmp/spotrain_coord_test_XXXXXX";
  char* dir = ::mkdtemp(tmpl.data());
  EXPECT_NE(dir, nullptr);
  return dir;
}

class CoordinatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir();
    checkpoint_dir_ = dir_ + "/ckpt";
    ASSERT_TRUE(common::WriteFileAtomically(dir_ + "/token", "secret-token\n").ok());
  }
  void TearDown() override {
    workers_.clear();
    coordinator_.reset();
    std::string cmd = "rm -rf " + dir_;
    (void)std::system(cmd.c_str());
  }

  void WriteConfig(int steps = 6, int min_workers = 1, const std::string& extra = "") {
    const std::string json = absl::StrFormat(
        R"({"model": "gpt-tiny", "data": {"train": "d/train_*.bin", "val": "d/val_*.bin"},
            "steps": %d, "global_batch": 8, "micro_batch": 2,
            "checkpoint": {"dir": "%s", "every_steps": 3, "keep": 2},
            "min_workers": %d, "heartbeat_ms": 50, "heartbeat_timeout_ms": 600,
            "join_settle_ms": 100, "op_timeout_ms": 1000 %s})",
        steps, checkpoint_dir_, min_workers, extra);
    ASSERT_TRUE(common::WriteFileAtomically(dir_ + "/run.json", json).ok());
  }

  CoordinatorOptions Options() {
    CoordinatorOptions o;
    o.config_path = dir_ + "/run.json";
    o.host = "127.0.0.1";
    o.port = 0;
    o.state_dir = dir_ + "/state";
    o.token_file = dir_ + "/token";
    o.tick = absl::Milliseconds(10);
    return o;
  }

  void StartCoordinator(CoordinatorOptions o) {
    auto c = Coordinator::Start(o);
    ASSERT_TRUE(c.ok()) << c.status();
    coordinator_ = std::move(*c);
    channel_ = ConnectToCoordinator(absl::StrCat("127.0.0.1:", coordinator_->port()),
                                    grpc::InsecureChannelCredentials());
  }
  void StartCoordinator() { StartCoordinator(Options()); }

  FakeWorker& AddWorker(const std::string& name, const std::string& token = "secret-token") {
    workers_.push_back(std::make_unique<FakeWorker>(name, channel_, token));
    return *workers_.back();
  }
  FakeWorker& StartWorker(const std::string& name) {
    FakeWorker& w = AddWorker(name);
    grpc::Status s = w.Join();
    EXPECT_TRUE(s.ok()) << s.error_message();
    w.Open();
    return w;
  }

  // The worker's shard of `step` on disk (payload only) and its report.
  void WriteShard(FakeWorker& w, int64_t step, char digest = 'd') {
    coordinator::testing::WriteShard(w, checkpoint_dir_, step, kStateFloats, digest);
  }

  proto::RunStatus Status(const std::string& token = "secret-token", grpc::Status* out = nullptr) {
    auto stub = proto::Coordinator::NewStub(channel_);
    grpc::ClientContext ctx;
    if (!token.empty()) AttachToken(&ctx, token);
    proto::RunStatus status;
    grpc::Status s = stub->GetStatus(&ctx, proto::StatusRequest(), &status);
    if (out != nullptr) *out = s;
    return status;
  }

  std::vector<std::string> Events() {
    auto text = common::ReadFile(dir_ + "/state/events.jsonl");
    if (!text.ok()) return {};
    return absl::StrSplit(*text, '\n', absl::SkipEmpty());
  }

  std::string dir_, checkpoint_dir_;
  std::unique_ptr<Coordinator> coordinator_;
  std::shared_ptr<grpc::Channel> channel_;
  std::vector<std::unique_ptr<FakeWorker>> workers_;
};

TEST_F(CoordinatorTest, TwoWorkersTrainCheckpointAndFinish) {
  WriteConfig(/*steps=*/6);
  StartCoordinator();
  FakeWorker& a = StartWorker("a");
  FakeWorker& b = StartWorker("b");
  const int64_t epoch = a.AnswerPrepare(-1);
  ASSERT_GT(epoch, 0);
  ASSERT_EQ(b.AnswerPrepare(-1), epoch);
  auto plan = a.WaitPlan();
  ASSERT_TRUE(plan.has_value());
  ASSERT_TRUE(b.WaitPlan().has_value());
  EXPECT_EQ(plan->world_size(), 2);
  EXPECT_EQ(plan->start_step(), 0);
  EXPECT_EQ(plan->state_source().kind(), proto::StateSource::FRESH);
  EXPECT_EQ(plan->members(0).worker_id(), a.id());
  EXPECT_EQ(plan->members(1).worker_id(), b.id());
  EXPECT_EQ(plan->members(0).address(), "a.local");
  for (int64_t s = 0; s < 3; ++s) a.StepDone(s);
  WriteShard(a, 3);
  WriteShard(b, 3);
  const std::string manifest_path = StepDirectory(checkpoint_dir_, 3) + "/manifest.json";
  ASSERT_TRUE(Eventually([&] { return common::PathExists(manifest_path); }));
  auto manifest = ParseManifest(*common::ReadFile(manifest_path));
  ASSERT_TRUE(manifest.ok());
  EXPECT_EQ(manifest->step(), 3);
  EXPECT_EQ(manifest->world_size(), 2);
  ASSERT_EQ(manifest->shards_size(), 2);
  EXPECT_EQ(manifest->shards(1).file(), "shard-00001-of-00002.bin");
  EXPECT_EQ(manifest->state_floats(), kStateFloats);
  EXPECT_EQ(manifest->model().preset(), "gpt-tiny");
  EXPECT_EQ(manifest->run_fingerprint(), a.fingerprint());
  for (int64_t s = 3; s < 6; ++s) {
    a.StepDone(s);
    b.StepDone(s);
  }
  EXPECT_FALSE(coordinator_->WaitUntilDone(absl::Milliseconds(50)));  // final checkpoint missing
  WriteShard(a, 6);
  WriteShard(b, 6);
  auto stop = a.WaitStop();
  ASSERT_TRUE(stop.has_value());
  EXPECT_TRUE(stop->run_done());
  ASSERT_TRUE(b.WaitStop().has_value());
  EXPECT_TRUE(coordinator_->WaitUntilDone(absl::Seconds(10)));
  proto::RunStatus status = Status();
  EXPECT_EQ(status.state(), "done");
  EXPECT_EQ(status.step(), 6);
  EXPECT_EQ(status.last_checkpoint_step(), 6);
  EXPECT_TRUE(a.WaitEnded());
  // The first plan is an event line.
  ASSERT_FALSE(Events().empty());
  EXPECT_THAT(Events()[0], HasSubstr("\"cause\":\"joined\""));
}

TEST_F(CoordinatorTest, BrokenStreamIsALossAndSurvivorsGetANewPlan) {
  WriteConfig(/*steps=*/100);
  StartCoordinator();
  FakeWorker& a = StartWorker("a");
  FakeWorker& b = StartWorker("b");
  FakeWorker& c = StartWorker("c");
  for (FakeWorker* w : {&a, &b, &c}) ASSERT_GT(w->AnswerPrepare(-1), 0);
  for (FakeWorker* w : {&a, &b, &c}) ASSERT_TRUE(w->WaitPlan().has_value());
  for (int64_t s = 0; s < 4; ++s) {
    for (FakeWorker* w : {&a, &b, &c}) w->StepDone(s);
  }
  const absl::Time killed = absl::Now();
  b.Kill();
  auto prepare = a.WaitPrepare();
  ASSERT_TRUE(prepare.has_value());
  EXPECT_TRUE(prepare->immediate());
  EXPECT_LT(absl::Now() - killed, absl::Seconds(5));
  a.Ready(prepare->epoch(), 4);
  ASSERT_EQ(c.AnswerPrepare(4), prepare->epoch());
  auto plan = c.WaitPlan();
  ASSERT_TRUE(plan.has_value());
  EXPECT_EQ(plan->epoch(), prepare->epoch());
  ASSERT_EQ(plan->world_size(), 2);
  EXPECT_EQ(plan->members(0).worker_id(), a.id());
  EXPECT_EQ(plan->members(1).worker_id(), c.id());
  EXPECT_EQ(plan->state_source().kind(), proto::StateSource::KEEP);
  EXPECT_EQ(plan->start_step(), 4);
  // The recovery is written to events.jsonl once the first step of the new epoch is reported.
  a.StepDone(4);
  proto::WorkerMessage report;
  report.mutable_recovery_report()->set_epoch(plan->epoch());
  report.mutable_recovery_report()->set_group_rebuilt_ms(5);
  report.mutable_recovery_report()->set_state_synced_ms(6);
  report.mutable_recovery_report()->set_first_step_ms(7);
  a.Send(report);
  c.Send(report);
  ASSERT_TRUE(Eventually([&] { return Events().size() >= 2; }));
  EXPECT_THAT(Events()[1], HasSubstr("\"cause\":\"lost\""));
  EXPECT_THAT(Events()[1], HasSubstr("\"lost_steps\":0"));
  EXPECT_THAT(Events()[1], HasSubstr("\"group_rebuilt_ms\":"));
  proto::RunStatus status = Status();
  EXPECT_EQ(status.recoveries(), 1);
  EXPECT_EQ(status.world_size(), 2);
}

TEST_F(CoordinatorTest, SilentWorkerIsLostAfterHeartbeatTimeoutAndFenced) {
  WriteConfig(/*steps=*/100);
  StartCoordinator();
  FakeWorker& a = StartWorker("a");
  FakeWorker& b = StartWorker("b");
  for (FakeWorker* w : {&a, &b}) ASSERT_GT(w->AnswerPrepare(-1), 0);
  for (FakeWorker* w : {&a, &b}) ASSERT_TRUE(w->WaitPlan().has_value());
  const absl::Time frozen = absl::Now();
  b.Freeze();
  auto prepare = a.WaitPrepare();
  ASSERT_TRUE(prepare.has_value());
  const absl::Duration detection = absl::Now() - frozen;
  EXPECT_GE(detection, absl::Milliseconds(550));
  EXPECT_LT(detection, absl::Milliseconds(600 + 1000));  // heartbeat timeout + 1 s
  // The frozen worker is told it was fenced and its stream ends.
  auto stop = b.WaitStop();
  ASSERT_TRUE(stop.has_value());
  EXPECT_THAT(stop->message(), HasSubstr("fenced"));
  EXPECT_TRUE(b.WaitEnded());
  a.Ready(prepare->epoch(), 0);
  auto plan = a.WaitPlan();
  ASSERT_TRUE(plan.has_value());
  EXPECT_EQ(plan->world_size(), 1);
}

TEST_F(CoordinatorTest, WithoutTheTokenNothingIsPossible) {
  WriteConfig();
  StartCoordinator();
  for (const std::string token : {"", "wrong-token"}) {
    FakeWorker& intruder = AddWorker("intruder", token);
    grpc::Status s = intruder.Join();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
    EXPECT_FALSE(intruder.config().has_data());  // did not read the config
    auto stub = proto::Coordinator::NewStub(channel_);
    {
      grpc::ClientContext ctx;
      if (!token.empty()) AttachToken(&ctx, token);
      proto::KvSetRequest request;
      request.set_epoch(1);
      request.set_key("k");
      request.set_value("v");
      proto::KvSetResponse response;
      EXPECT_EQ(stub->KvSet(&ctx, request, &response).error_code(),
                grpc::StatusCode::PERMISSION_DENIED);
    }
    {
      grpc::ClientContext ctx;
      if (!token.empty()) AttachToken(&ctx, token);
      proto::KvGetRequest request;
      request.set_epoch(1);
      request.set_key("k");
      proto::KvGetResponse response;
      EXPECT_EQ(stub->KvGet(&ctx, request, &response).error_code(),
                grpc::StatusCode::PERMISSION_DENIED);
    }
    {
      grpc::ClientContext ctx;
      if (!token.empty()) AttachToken(&ctx, token);
      auto stream = stub->Session(&ctx);
      proto::WorkerMessage hello;
      hello.mutable_hello()->set_worker_id(1);
      stream->Write(hello);
      proto::CoordinatorMessage m;
      EXPECT_FALSE(stream->Read(&m));
      EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::PERMISSION_DENIED);
    }
    grpc::Status status_rpc;
    Status(token, &status_rpc);
    EXPECT_EQ(status_rpc.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  }
  // Nothing changed.
  proto::RunStatus status = Status();
  EXPECT_EQ(status.members_size(), 0);
  EXPECT_EQ(status.state(), "waiting");
}

TEST_F(CoordinatorTest, PublicStatusNeedsNoToken) {
  WriteConfig();
  CoordinatorOptions o = Options();
  o.public_status = true;
  StartCoordinator(o);
  grpc::Status s;
  proto::RunStatus status = Status("", &s);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(status.state(), "waiting");
  FakeWorker& w = AddWorker("w", "");
  EXPECT_EQ(w.Join().error_code(), grpc::StatusCode::PERMISSION_DENIED);
}

TEST_F(CoordinatorTest, KeyValueRendezvous) {
  WriteConfig();
  StartCoordinator();
  FakeWorker& a = StartWorker("a");
  const int64_t epoch = a.AnswerPrepare(-1);
  ASSERT_TRUE(a.WaitPlan().has_value());
  auto stub = proto::Coordinator::NewStub(channel_);
  auto set = [&](int64_t e, const std::string& key, const std::string& value) {
    grpc::ClientContext ctx;
    AttachToken(&ctx, "secret-token");
    proto::KvSetRequest request;
    request.set_epoch(e);
    request.set_key(key);
    request.set_value(value);
    proto::KvSetResponse response;
    return stub->KvSet(&ctx, request, &response);
  };
  auto get = [&](int64_t e, const std::string& key, int wait_ms, proto::KvGetResponse* response) {
    grpc::ClientContext ctx;
    AttachToken(&ctx, "secret-token");
    proto::KvGetRequest request;
    request.set_epoch(e);
    request.set_key(key);
    request.set_wait_ms(wait_ms);
    return stub->KvGet(&ctx, request, response);
  };
  // A waiting get is answered when the key arrives.
  proto::KvGetResponse waited;
  grpc::Status waited_status;
  std::thread waiter([&] { waited_status = get(epoch, "rank0", 10000, &waited); });
  absl::SleepFor(absl::Milliseconds(100));  // let the get start waiting (not required)
  ASSERT_TRUE(set(epoch, "rank0", "addr0").ok());
  waiter.join();
  ASSERT_TRUE(waited_status.ok()) << waited_status.error_message();
  EXPECT_TRUE(waited.found());
  EXPECT_EQ(waited.value(), "addr0");
  // A get that times out is OK with found = false.
  proto::KvGetResponse missing;
  const absl::Time start = absl::Now();
  ASSERT_TRUE(get(epoch, "nobody", 200, &missing).ok());
  EXPECT_FALSE(missing.found());
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(150));
  // Bad input.
  EXPECT_EQ(set(epoch, std::string(600, 'k'), "v").error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(set(epoch, "big", std::string((1 << 20) + 1, 'v')).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(set(epoch + 5, "k", "v").error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  // A new epoch makes the old keys stale.
  FakeWorker& b = StartWorker("b");
  ASSERT_GT(a.AnswerPrepare(0), epoch);
  ASSERT_GT(b.AnswerPrepare(-1), epoch);
  ASSERT_TRUE(a.WaitPlan().has_value());
  EXPECT_EQ(set(epoch, "late", "v").error_code(), grpc::StatusCode::ABORTED);
  proto::KvGetResponse stale;
  EXPECT_EQ(get(epoch, "rank0", 0, &stale).error_code(), grpc::StatusCode::ABORTED);
}

TEST_F(CoordinatorTest, MalformedSessionsGetAStatusAndChangeNothing) {
  WriteConfig();
  StartCoordinator();
  auto stub = proto::Coordinator::NewStub(channel_);
  auto session_status = [&](const proto::WorkerMessage& first) {
    grpc::ClientContext ctx;
    AttachToken(&ctx, "secret-token");
    auto stream = stub->Session(&ctx);
    stream->Write(first);
    proto::CoordinatorMessage m;
    while (stream->Read(&m)) {
    }
    return stream->Finish();
  };
  proto::WorkerMessage heartbeat;
  heartbeat.mutable_heartbeat()->set_epoch(1);
  EXPECT_EQ(session_status(heartbeat).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  proto::WorkerMessage unknown;
  unknown.mutable_hello()->set_worker_id(12345);
  EXPECT_EQ(session_status(unknown).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  // A Join with a bad device.
  FakeWorker& w = AddWorker("w");
  grpc::ClientContext ctx;
  AttachToken(&ctx, "secret-token");
  proto::JoinRequest request;
  request.set_device("abacus");
  proto::JoinResponse response;
  EXPECT_EQ(stub->Join(&ctx, request, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // Two Sessions for one id: the second is refused.
  ASSERT_TRUE(w.Join().ok());
  w.Open();
  proto::WorkerMessage hello;
  hello.mutable_hello()->set_worker_id(w.id());
  ASSERT_TRUE(Eventually([&] { return coordinator_->service().BoundSessions() == 1; }));
  EXPECT_EQ(session_status(hello).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Status().members_size(), 1);
  EXPECT_EQ(Status().members(0).state(), "joining");
}

TEST_F(CoordinatorTest, StateDirOfAnotherRunIsRefused) {
  WriteConfig(/*steps=*/6);
  StartCoordinator();
  coordinator_.reset();
  WriteConfig(/*steps=*/7);
  auto refused = Coordinator::Start(Options());
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("another run"));
  CoordinatorOptions forced = Options();
  forced.force_new_run = true;
  auto started = Coordinator::Start(forced);
  EXPECT_TRUE(started.ok()) << started.status();
}

TEST_F(CoordinatorTest, BadConfigNamesTheField) {
  WriteConfig(/*steps=*/6, /*min_workers=*/3, R"(, "max_workers": 2)");
  auto refused = Coordinator::Start(Options());
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("max_workers"));
}

TEST_F(CoordinatorTest, GeneratesATokenWhenNoneIsGiven) {
  WriteConfig();
  CoordinatorOptions o = Options();
  o.token_file.clear();
  ::unsetenv("SPOTRAIN_TOKEN");
  StartCoordinator(o);
  const std::string path = dir_ + "/state/token";
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600);
  auto token = ReadRunToken(path);
  ASSERT_TRUE(token.ok());
  EXPECT_EQ(*token, coordinator_->token());
  EXPECT_GE(token->size(), 32u);
  FakeWorker& w = AddWorker("w", *token);
  EXPECT_TRUE(w.Join().ok());
}

TEST_F(CoordinatorTest, MetricsAreExported) {
  WriteConfig(/*steps=*/100);
  StartCoordinator();
  FakeWorker& a = StartWorker("a");
  ASSERT_GT(a.AnswerPrepare(-1), 0);
  ASSERT_TRUE(a.WaitPlan().has_value());
  a.StepDone(0);
  ASSERT_TRUE(Eventually([&] {
    return coordinator_->metrics().Render().find("spotrain_step 1") != std::string::npos;
  }));
  const std::string text = coordinator_->metrics().Render();
  for (const char* name :
       {"spotrain_members{state=\"active\"} 1", "spotrain_epoch 1", "spotrain_joins_total 1",
        "spotrain_worker_losses_total", "spotrain_announced_leaves_total",
        "spotrain_recovery_duration_seconds_bucket", "spotrain_lost_steps_total",
        "spotrain_checkpoint_commit_seconds_bucket", "spotrain_goodput_ratio",
        "spotrain_tokens_per_second", "spotrain_run_state{state=\"running\"} 1"}) {
    EXPECT_THAT(text, HasSubstr(name));
  }
}

// TLS through gRPC's SSL credentials, with a throwaway CA made by the openssl command.
TEST_F(CoordinatorTest, TlsWhenAsked) {
  if (std::system("command -v openssl > /dev/null 2>&1") != 0) {
    GTEST_SKIP() << "openssl command not found";
  }
  const std::string cmd = absl::StrCat(
      "cd ", dir_,
      " && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 "
      "-subj /CN=spotrain-test-ca 2>/dev/null"
      " && openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr "
      "-subj /CN=localhost 2>/dev/null"
      " && printf 'subjectAltName=DNS:localhost,IP:127.0.0.1' > san.ext"
      " && openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial "
      "-out server.pem -days 2 -extfile san.ext 2>/dev/null");
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  WriteConfig();
  CoordinatorOptions o = Options();
  o.tls.cert = dir_ + "/server.pem";
  o.tls.key = dir_ + "/server.key";
  StartCoordinator(o);
  const std::string address = absl::StrCat("localhost:", coordinator_->port());
  TlsFiles client;
  client.ca = dir_ + "/ca.pem";
  auto credentials = MakeChannelCredentials(client);
  ASSERT_TRUE(credentials.ok());
  FakeWorker secure("secure", ConnectToCoordinator(address, *credentials), "secret-token");
  grpc::Status s = secure.Join();
  EXPECT_TRUE(s.ok()) << s.error_message();
  FakeWorker plain("plain", ConnectToCoordinator(address, grpc::InsecureChannelCredentials()),
                   "secret-token");
  EXPECT_FALSE(plain.Join().ok());
}

}  // namespace
}  // namespace spotrain::coordinator
