// A fake worker for gRPC-level tests of the coordinator: Join, a Session stream with a reader
// thread and a heartbeat thread, and helpers to send reports (shards written to disk
// included) and wait for messages. It plays the protocol of docs/protocol.md by hand (no
// training). Shared by tests/unit/coordinator/service_test.cc and
// tests/integration/coordinator_restart_test.cc. Thread-safe: tests call it from the test
// thread while its own threads read and heartbeat.
#ifndef SPOTRAIN_TESTS_SUPPORT_FAKE_WORKER_H_
#define SPOTRAIN_TESTS_SUPPORT_FAKE_WORKER_H_

#include <algorithm>
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/file_util.h"
#include "coordinator/client_auth.h"
#include "coordinator/planner.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/spotrain.grpc.pb.h"

namespace spotrain::coordinator::testing {

// Polls `condition` until it holds or `timeout` passes.
inline bool Eventually(const std::function<bool()>& condition,
                       absl::Duration timeout = absl::Seconds(20)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (condition()) return true;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return condition();
}

class FakeWorker {
 public:
  FakeWorker(std::string name, std::shared_ptr<grpc::Channel> channel, std::string token)
      : name_(std::move(name)),
        stub_(proto::Coordinator::NewStub(channel)),
        token_(std::move(token)) {}
  ~FakeWorker() { Kill(); }

  grpc::Status Join(int64_t held_step = -1, uint64_t previous_id = 0, int64_t current_epoch = 0,
                    uint64_t fingerprint = 0) {
    grpc::ClientContext ctx;
    AttachToken(&ctx, token_);
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    proto::JoinRequest request;
    request.set_name(name_);
    request.set_advertise_host(name_ + ".local");
    request.set_device("cpu");
    request.set_held_step(held_step);
    request.set_held_fingerprint(fingerprint != 0 ? fingerprint : fingerprint_);
    request.set_previous_worker_id(previous_id);
    request.set_current_epoch(current_epoch);
    proto::JoinResponse response;
    grpc::Status status = stub_->Join(&ctx, request, &response);
    if (status.ok()) {
      id_ = response.worker_id();
      fingerprint_ = response.run_fingerprint();
      config_ = response.config();
    }
    return status;
  }

  // Opens the Session, sends Hello and starts the reader and heartbeat threads.
  void Open() {
    ctx_ = std::make_unique<grpc::ClientContext>();
    AttachToken(ctx_.get(), token_);
    stream_ = stub_->Session(ctx_.get());
    proto::WorkerMessage hello;
    hello.mutable_hello()->set_worker_id(id_);
    Send(hello);
    alive_ = true;
    reader_ = std::thread([this] {
      proto::CoordinatorMessage m;
      while (stream_->Read(&m)) {
        absl::MutexLock lock(&mu_);
        inbox_.push_back(m);
        if (m.has_plan()) {
          epoch_ = m.plan().epoch();
          for (const auto& member : m.plan().members()) {
            if (member.worker_id() == id_) rank_ = member.rank();
          }
          world_ = m.plan().world_size();
        }
      }
      finish_status_ = stream_->Finish();
      absl::MutexLock lock(&mu_);
      ended_ = true;
    });
    heartbeat_ = std::thread([this] {
      while (alive_) {
        if (heartbeating_) {
          proto::WorkerMessage m;
          m.mutable_heartbeat()->set_epoch(epoch());
          m.mutable_heartbeat()->set_completed_steps(completed_);
          Send(m);
        }
        absl::SleepFor(absl::Milliseconds(heartbeat_ms_));
      }
    });
  }

  void Send(const proto::WorkerMessage& m) {
    absl::MutexLock lock(&write_mu_);
    if (stream_ != nullptr && !closed_) stream_->Write(m);
  }

  // The process dies: the connection breaks (like kill -9).
  void Kill() {
    alive_ = false;
    if (ctx_ != nullptr) ctx_->TryCancel();
    if (heartbeat_.joinable()) heartbeat_.join();
    if (reader_.joinable()) reader_.join();
  }
  // SIGSTOP: the stream stays open but nothing is sent.
  void Freeze() { heartbeating_ = false; }

  // Waits for a message matching `pred` among those received since index `from`; returns it.
  std::optional<proto::CoordinatorMessage> WaitFor(
      const std::function<bool(const proto::CoordinatorMessage&)>& pred,
      absl::Duration timeout = absl::Seconds(20)) {
    std::optional<proto::CoordinatorMessage> found;
    Eventually(
        [&] {
          absl::MutexLock lock(&mu_);
          for (size_t i = seen_; i < inbox_.size(); ++i) {
            if (pred(inbox_[i])) {
              found = inbox_[i];
              seen_ = i + 1;
              return true;
            }
          }
          return false;
        },
        timeout);
    return found;
  }
  std::optional<proto::Prepare> WaitPrepare() {
    auto m = WaitFor([](const proto::CoordinatorMessage& m) { return m.has_prepare(); });
    if (!m) return std::nullopt;
    return m->prepare();
  }
  std::optional<proto::Plan> WaitPlan() {
    auto m = WaitFor([](const proto::CoordinatorMessage& m) { return m.has_plan(); });
    if (!m) return std::nullopt;
    return m->plan();
  }
  std::optional<proto::Command> WaitStop() {
    auto m = WaitFor(
        [](const proto::CoordinatorMessage& m) { return m.has_command() && m.command().stop(); });
    if (!m) return std::nullopt;
    return m->command();
  }
  bool WaitEnded(absl::Duration timeout = absl::Seconds(20)) {
    return Eventually(
        [&] {
          absl::MutexLock lock(&mu_);
          return ended_;
        },
        timeout);
  }

  void Ready(int64_t epoch, int64_t completed) {
    proto::WorkerMessage m;
    m.mutable_ready()->set_epoch(epoch);
    m.mutable_ready()->set_completed_steps(completed);
    m.mutable_ready()->set_held_fingerprint(fingerprint_);
    Send(m);
  }
  // Answers the next Prepare with `completed` steps; returns its epoch (0 if none came).
  int64_t AnswerPrepare(int64_t completed) {
    auto p = WaitPrepare();
    if (!p) return 0;
    Ready(p->epoch(), completed);
    return p->epoch();
  }
  void StepDone(int64_t step) {
    completed_ = step + 1;
    proto::WorkerMessage m;
    m.mutable_step_done()->set_epoch(epoch());
    m.mutable_step_done()->set_step(step);
    m.mutable_step_done()->set_loss(2.5f);
    m.mutable_step_done()->set_tokens(1024);
    m.mutable_step_done()->set_step_ms(10);
    Send(m);
  }
  void Leave() {
    proto::WorkerMessage m;
    m.mutable_leave()->set_reason("SIGTERM");
    Send(m);
  }

  uint64_t id() const { return id_; }
  int64_t epoch() {
    absl::MutexLock lock(&mu_);
    return epoch_;
  }
  int rank() {
    absl::MutexLock lock(&mu_);
    return rank_;
  }
  int world() {
    absl::MutexLock lock(&mu_);
    return world_;
  }
  uint64_t fingerprint() const { return fingerprint_; }
  const proto::RunConfig& config() const { return config_; }
  proto::Coordinator::Stub* stub() { return stub_.get(); }
  void set_completed(int64_t c) { completed_ = c; }
  grpc::Status finish_status() {
    absl::MutexLock lock(&mu_);
    return finish_status_;
  }

 private:
  const std::string name_;
  std::unique_ptr<proto::Coordinator::Stub> stub_;
  const std::string token_;
  uint64_t id_ = 0;
  uint64_t fingerprint_ = 0;
  proto::RunConfig config_;
  std::unique_ptr<grpc::ClientContext> ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<proto::WorkerMessage, proto::CoordinatorMessage>>
      stream_;
  absl::Mutex write_mu_;
  bool closed_ = false;
  std::thread reader_, heartbeat_;
  std::atomic<bool> alive_{false}, heartbeating_{true};
  std::atomic<int64_t> completed_{-1};
  int heartbeat_ms_ = 50;
  absl::Mutex mu_;
  std::vector<proto::CoordinatorMessage> inbox_;
  size_t seen_ = 0;
  int64_t epoch_ = 0;
  int rank_ = -1, world_ = 0;
  bool ended_ = false;
  grpc::Status finish_status_;
};

// Writes `w`'s shard of `step` under `checkpoint_dir` (zero payload; its rank's contiguous
// part of `state_floats`, the last rank's possibly shorter) for the world size and rank of
// the last Plan it got, and reports it with ShardWritten (state digest: 64 x `digest`).
inline void WriteShard(FakeWorker& w, const std::string& checkpoint_dir, int64_t step,
                       int64_t state_floats, char digest = 'd') {
  const int world = w.world(), rank = w.rank();
  ASSERT_GT(world, 0) << "the worker got no Plan";
  const int64_t per = (state_floats + world - 1) / world;
  const int64_t offset = std::min(state_floats, per * rank);
  const int64_t length = std::min(state_floats, per * (rank + 1)) - offset;
  const std::string step_dir = StepDirectory(checkpoint_dir, step);
  ASSERT_TRUE(common::MakeDirectories(step_dir).ok());
  ASSERT_TRUE(common::WriteFileAtomically(common::JoinPath(step_dir, ShardFileName(rank, world)),
                                          std::string(length * 4, '\0'))
                  .ok());
  proto::WorkerMessage m;
  proto::ShardWritten* s = m.mutable_shard_written();
  s->set_epoch(w.epoch());
  s->set_step(step);
  s->set_rank(rank);
  s->set_world_size(world);
  s->set_file(ShardFileName(rank, world));
  s->set_offset(offset);
  s->set_length(length);
  s->set_checksum("00112233aabbccdd");
  s->set_state_digest(std::string(64, digest));
  s->set_state_floats(state_floats);
  w.Send(m);
}

}  // namespace spotrain::coordinator::testing

#endif  // SPOTRAIN_TESTS_SUPPORT_FAKE_WORKER_H_
