#include "coordinator/service.h"

#include <algorithm>
#include <deque>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/logging.h"
#include "coordinator/checkpoint_store.h"
#include "coordinator/client_auth.h"

namespace spotrain::coordinator {
namespace {

constexpr size_t kMaxQueuedWrites = 4096;
constexpr int kMaxUnhandledReads = 16;
constexpr int kMaxKvWaitMs = 300000;
constexpr absl::Duration kMembershipTick = absl::Milliseconds(100);

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

}  // namespace

// One Session stream. Reactions post to the state thread; Send/Close may be called from the
// state thread (or, before the stream is registered, from the handler).
class CoordinatorService::SessionReactor final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  SessionReactor(CoordinatorService* service, std::string peer)
      : service_(service), peer_(std::move(peer)) {}

  // Reads run ahead of the state thread by at most kMaxUnhandledReads messages per stream:
  // the next read starts on the gRPC thread while few are waiting (no state-thread work per
  // read), and is parked until the state thread catches up otherwise (back-pressure).
  void StartFirstRead() { StartRead(&in_); }

  // State thread: one message of this stream has been handled.
  void MessageHandled() ABSL_LOCKS_EXCLUDED(mu_) {
    bool resume = false;
    {
      absl::MutexLock lock(&mu_);
      --unhandled_;
      if (read_parked_ && unhandled_ < kMaxUnhandledReads && !closing_) {
        read_parked_ = false;
        resume = true;
      }
    }
    if (resume) StartRead(&in_);
  }

  // Queues a message; dropped once the stream is closing.
  void Send(const grpc::ByteBuffer& message) ABSL_LOCKS_EXCLUDED(mu_) {
    const grpc::ByteBuffer* next = nullptr;
    bool overflow = false;
    {
      absl::MutexLock lock(&mu_);
      if (closing_) return;
      if (queue_.size() >= kMaxQueuedWrites) {
        overflow = true;
      } else {
        queue_.push_back(message);
        if (!writing_) {
          writing_ = true;
          next = &queue_.front();
        }
      }
    }
    if (overflow) {
      SPOTRAIN_LOG(Warning, "session of %s: %d messages unsent; closing it", peer_,
                   kMaxQueuedWrites);
      Close(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "worker does not read"));
      return;
    }
    if (next != nullptr) StartWrite(next);
  }

  // Finishes the stream after the queued messages are written.
  void Close(grpc::Status status) ABSL_LOCKS_EXCLUDED(mu_) {
    {
      absl::MutexLock lock(&mu_);
      if (closing_) return;
      closing_ = true;
      status_ = std::move(status);
      if (writing_) return;  // OnWriteDone finishes
      finished_ = true;
    }
    Finish(status_);
  }

  void OnReadDone(bool ok) override {
    if (ok) {
      // Parse here, on a gRPC thread, so the state thread only handles messages.
      proto::WorkerMessage message;
      grpc::Status parsed =
          grpc::SerializationTraits<proto::WorkerMessage>::Deserialize(&in_, &message);
      if (!parsed.ok()) {
        service_->Post([this] {
          SPOTRAIN_LOG(Warning, "session of %s sent a malformed message; closing it", peer_);
          service_->HandleSessionEnd(this, "malformed message");
        });
        Close(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "malformed WorkerMessage"));
        return;
      }
      bool read_more = false;
      {
        absl::MutexLock lock(&mu_);
        ++unhandled_;
        if (closing_) {
        } else if (unhandled_ < kMaxUnhandledReads) {
          read_more = true;
        } else {
          read_parked_ = true;
        }
      }
      service_->Post([this, message = std::move(message)] {
        service_->HandleSessionMessage(this, message);
        MessageHandled();
      });
      if (read_more) StartRead(&in_);
    } else {
      service_->Post([this] { service_->HandleSessionEnd(this, "stream ended"); });
    }
  }

  void OnWriteDone(bool ok) override {
    const grpc::ByteBuffer* next = nullptr;
    bool finish = false;
    {
      absl::MutexLock lock(&mu_);
      queue_.pop_front();
      if (!ok) queue_.clear();  // the peer is gone; the read side reports it
      if (!queue_.empty()) {
        next = &queue_.front();
      } else {
        writing_ = false;
        if (closing_ && !finished_) finished_ = finish = true;
      }
    }
    if (next != nullptr) StartWrite(next);
    if (finish) Finish(status_);
  }

  void OnCancel() override {
    service_->Post([this] { service_->HandleSessionEnd(this, "cancelled"); });
  }

  void OnDone() override {
    service_->Post([this] { service_->HandleSessionDone(this); });
  }

  const std::string& peer() const { return peer_; }

  // State-thread fields.
  uint64_t worker_id = 0;
  bool ended = false;  // no more messages are handled
  bool registered = false;

 private:
  CoordinatorService* const service_;
  const std::string peer_;
  grpc::ByteBuffer in_;
  absl::Mutex mu_;
  std::deque<grpc::ByteBuffer> queue_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  int unhandled_ ABSL_GUARDED_BY(mu_) = 0;
  bool read_parked_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_;  // written once before finished_ is set
};

CoordinatorService::CoordinatorService(Options options, std::unique_ptr<Membership> membership,
                                       std::unique_ptr<Journal> journal,
                                       std::unique_ptr<EventLog> events, Metrics* metrics,
                                       common::Clock* clock)
    : options_(std::move(options)),
      clock_(clock),
      metrics_(metrics),
      membership_(std::move(membership)),
      journal_(std::move(journal)),
      events_(std::move(events)) {}

CoordinatorService::~CoordinatorService() { Stop(); }

void CoordinatorService::Start() {
  state_thread_ = std::thread([this] { StateLoop(); });
}

void CoordinatorService::Post(std::function<void()> fn) {
  absl::MutexLock lock(&queue_mu_);
  queue_.push_back(std::move(fn));
}

void CoordinatorService::StateLoop() {
  absl::Time next_tick = clock_->Now();
  for (;;) {
    std::vector<std::function<void()>> batch;
    bool stop = false;
    {
      absl::MutexLock lock(&queue_mu_);
      auto ready = [this] {
        queue_mu_.AssertHeld();
        return !queue_.empty() || stop_;
      };
      // The deadline uses real time: the injected clock only decides what the state means.
      queue_mu_.AwaitWithTimeout(absl::Condition(&ready),
                                 std::max(absl::ZeroDuration(), next_tick - clock_->Now()));
      batch.swap(queue_);
      stop = stop_;
    }
    for (auto& fn : batch) fn();
    if (stop && batch.empty()) return;
    const absl::Time now = clock_->Now();
    if (now >= next_tick) {
      Tick();
      next_tick = now + options_.tick;
    }
  }
}

void CoordinatorService::Stop() {
  {
    absl::MutexLock lock(&queue_mu_);
    stop_ = true;
  }
  if (state_thread_.joinable()) state_thread_.join();
  // Reactors whose OnDone arrived after the loop ended.
  for (SessionReactor* s : sessions_) delete s;
  sessions_.clear();
}

void CoordinatorService::BeginShutdown() {
  if (shutting_down_.exchange(true)) return;
  absl::Notification done;
  Post([this, &done] {
    for (auto& [id, session] : by_worker_) {
      session->ended = true;
      session->Close(grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down"));
    }
    by_worker_.clear();
    for (SessionReactor* s : sessions_) {
      s->ended = true;
      s->Close(grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down"));
    }
    for (uint64_t token : kv_.TakeAllWaiters()) {
      FinishWaiter(token, nullptr,
                   grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down"));
    }
    Actions actions;
    membership_->FlushEvents(&actions);
    Apply(actions);
    (void)journal_->Compact();
    done.Notify();
  });
  done.WaitForNotification();
}

bool CoordinatorService::WaitUntilDone(absl::Duration timeout) {
  absl::MutexLock lock(&done_mu_);
  auto is_done = [this] {
    done_mu_.AssertHeld();
    return done_;
  };
  return done_mu_.AwaitWithTimeout(absl::Condition(&is_done), timeout);
}

void CoordinatorService::RunOnStateThread(const std::function<void(Membership&)>& fn) {
  absl::Notification done;
  Post([&] {
    fn(*membership_);
    done.Notify();
  });
  done.WaitForNotification();
}

size_t CoordinatorService::BoundSessions() {
  size_t n = 0;
  absl::Notification done;
  Post([&] {
    n = by_worker_.size();
    done.Notify();
  });
  done.WaitForNotification();
  return n;
}

grpc::Status CoordinatorService::Authorize(grpc::CallbackServerContext* context,
                                           const char* rpc) const {
  auto range = context->client_metadata().equal_range(kTokenMetadataKey);
  if (range.first == range.second) {
    SPOTRAIN_LOG(Warning, "%s from %s refused: no run token", rpc, context->peer());
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        "missing run token: set SPOTRAIN_TOKEN or pass --token-file");
  }
  const grpc::string_ref value = range.first->second;
  if (!ConstantTimeEquals(absl::string_view(value.data(), value.size()), options_.token)) {
    SPOTRAIN_LOG(Warning, "%s from %s refused: wrong run token", rpc, context->peer());
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "wrong run token");
  }
  return grpc::Status::OK;
}

// ---------------------------------------------------------------------------------------------
// RPC handlers (gRPC threads): check, then post.

grpc::ServerUnaryReactor* CoordinatorService::Join(grpc::CallbackServerContext* context,
                                                   const proto::JoinRequest* request,
                                                   proto::JoinResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  grpc::Status auth = Authorize(context, "Join");
  if (!auth.ok()) {
    reactor->Finish(auth);
    return reactor;
  }
  if (shutting_down_) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down"));
    return reactor;
  }
  const std::string peer = context->peer();
  Post([this, request, response, reactor, peer] {
    Actions actions;
    auto joined = membership_->Join(*request, &actions);
    Apply(actions);  // the reserved id is durable before the worker learns it
    if (!joined.ok()) {
      SPOTRAIN_LOG(Warning, "Join from %s refused: %s", peer,
                   std::string(joined.status().message()));
      reactor->Finish(ToGrpc(joined.status()));
      return;
    }
    *response = std::move(*joined);
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* CoordinatorService::Session(
    grpc::CallbackServerContext* context) {
  auto* session = new SessionReactor(this, context->peer());
  grpc::Status auth = Authorize(context, "Session");
  if (auth.ok() && shutting_down_) {
    auth = grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down");
  }
  Post([this, session] {
    sessions_.insert(session);
    session->registered = true;
  });
  if (!auth.ok()) {
    Post([session] { session->ended = true; });
    session->Close(auth);
    return session;
  }
  session->StartFirstRead();
  return session;
}

grpc::ServerUnaryReactor* CoordinatorService::KvSet(grpc::CallbackServerContext* context,
                                                    const proto::KvSetRequest* request,
                                                    proto::KvSetResponse*) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  grpc::Status status = Authorize(context, "KvSet");
  if (status.ok()) status = ToGrpc(KvStore::Validate(request->key(), request->value().size()));
  if (status.ok() && shutting_down_) {
    status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down");
  }
  if (!status.ok()) {
    reactor->Finish(status);
    return reactor;
  }
  Post([this, request, reactor] {
    absl::Status s = membership_->CheckKvEpoch(request->epoch());
    if (s.ok()) {
      auto woken = kv_.Set(request->epoch(), request->key(), request->value());
      if (woken.ok()) {
        const std::string* value = kv_.Get(request->epoch(), request->key());
        for (uint64_t token : *woken) FinishWaiter(token, value, grpc::Status::OK);
      } else {
        s = woken.status();
      }
    }
    if (!s.ok()) {
      SPOTRAIN_LOG(Info, "KvSet %s (epoch %d) from worker %d refused: %s", request->key(),
                   request->epoch(), request->worker_id(), std::string(s.message()));
    }
    reactor->Finish(ToGrpc(s));
  });
  return reactor;
}

grpc::ServerUnaryReactor* CoordinatorService::KvGet(grpc::CallbackServerContext* context,
                                                    const proto::KvGetRequest* request,
                                                    proto::KvGetResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  grpc::Status status = Authorize(context, "KvGet");
  if (status.ok()) status = ToGrpc(KvStore::Validate(request->key(), 0));
  if (status.ok() && shutting_down_) {
    status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down");
  }
  if (!status.ok()) {
    reactor->Finish(status);
    return reactor;
  }
  Post([this, request, response, reactor] {
    absl::Status s = membership_->CheckKvEpoch(request->epoch());
    if (!s.ok()) {
      reactor->Finish(ToGrpc(s));
      return;
    }
    const std::string* value = kv_.Get(request->epoch(), request->key());
    if (value != nullptr || request->wait_ms() <= 0) {
      response->set_found(value != nullptr);
      if (value != nullptr) response->set_value(*value);
      reactor->Finish(grpc::Status::OK);
      return;
    }
    // Wait without a thread: the waiter is finished by KvSet, the tick or an epoch change.
    const uint64_t token = next_waiter_++;
    waiters_[token] = {reactor, response};
    kv_.AddWaiter(request->epoch(), request->key(), token,
                  clock_->Now() + absl::Milliseconds(std::min(request->wait_ms(), kMaxKvWaitMs)));
  });
  return reactor;
}

grpc::ServerUnaryReactor* CoordinatorService::GetStatus(grpc::CallbackServerContext* context,
                                                        const proto::StatusRequest*,
                                                        proto::RunStatus* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (!options_.public_status) {
    grpc::Status auth = Authorize(context, "GetStatus");
    if (!auth.ok()) {
      reactor->Finish(auth);
      return reactor;
    }
  }
  if (shutting_down_) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down"));
    return reactor;
  }
  Post([this, response, reactor] {
    *response = membership_->Status();
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

// ---------------------------------------------------------------------------------------------
// State thread.

void CoordinatorService::FinishWaiter(uint64_t token, const std::string* value,
                                      grpc::Status status) {
  auto it = waiters_.find(token);
  if (it == waiters_.end()) return;
  KvWaiter w = it->second;
  waiters_.erase(it);
  if (status.ok()) {
    w.response->set_found(value != nullptr);
    if (value != nullptr) w.response->set_value(*value);
  }
  w.reactor->Finish(status);
}

void CoordinatorService::HandleSessionMessage(SessionReactor* session,
                                              const proto::WorkerMessage& message) {
  if (session->ended) return;
  Actions actions;
  if (session->worker_id == 0) {
    if (!message.has_hello()) {
      session->ended = true;
      session->Close(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                  "the first Session message must be Hello{worker_id}"));
      return;
    }
    const uint64_t id = message.hello().worker_id();
    absl::Status s = membership_->Hello(id, &actions);
    if (!s.ok()) {
      SPOTRAIN_LOG(Warning, "Session from %s refused: %s", session->peer(),
                   std::string(s.message()));
      session->ended = true;
      session->Close(ToGrpc(s));
      Apply(actions);
      return;
    }
    session->worker_id = id;
    by_worker_[id] = session;
    Apply(actions);
  } else {
    absl::Status s = membership_->OnMessage(session->worker_id, message, &actions);
    if (!s.ok()) {
      SPOTRAIN_LOG(Info, "worker %d: report refused (%s): %s", session->worker_id,
                   absl::StatusCodeToString(s.code()), std::string(s.message()));
    }
    Apply(actions);
  }
}

void CoordinatorService::HandleSessionEnd(SessionReactor* session, const std::string& why) {
  if (session->ended) return;
  session->ended = true;
  if (session->worker_id != 0) {
    auto it = by_worker_.find(session->worker_id);
    if (it != by_worker_.end() && it->second == session) {
      by_worker_.erase(it);
      Actions actions;
      membership_->OnSessionClosed(session->worker_id, why, &actions);
      Apply(actions);
    }
  }
  session->Close(grpc::Status::OK);
}

void CoordinatorService::HandleSessionDone(SessionReactor* session) {
  HandleSessionEnd(session, "stream done");
  sessions_.erase(session);
  delete session;
}

void CoordinatorService::Apply(Actions& actions) {
  for (const JournalEntry& entry : actions.journal) {
    absl::Status s = journal_->Append(entry.record, entry.sync);
    if (!s.ok()) SPOTRAIN_LOG(Error, "journal: %s", std::string(s.message()));
  }
  for (const ReadyCheckpoint& checkpoint : actions.commits) {
    absl::Status written = WriteManifest(options_.checkpoint_dir, checkpoint.manifest);
    Actions more;
    membership_->OnCheckpointCommitted(checkpoint, written, &more);
    if (written.ok()) {
      for (int64_t step : PruneStepDirectories(options_.checkpoint_dir, checkpoint.step,
                                               membership_->registry().committed())) {
        SPOTRAIN_LOG(Info, "deleted checkpoint directory of step %d", step);
      }
    }
    Apply(more);
  }
  // Serialise each distinct message once; the streams share its bytes.
  std::map<const proto::CoordinatorMessage*, grpc::ByteBuffer> serialized;
  for (const OutgoingMessage& out : actions.messages) {
    auto it = by_worker_.find(out.worker_id);
    if (it == by_worker_.end()) continue;
    auto [bytes, fresh] = serialized.try_emplace(out.message.get());
    if (fresh) {
      bool own_buffer = false;
      grpc::Status s = grpc::SerializationTraits<proto::CoordinatorMessage>::Serialize(
          *out.message, &bytes->second, &own_buffer);
      if (!s.ok()) SPOTRAIN_LOG(Error, "cannot serialise a message: %s", s.error_message());
    }
    it->second->Send(bytes->second);
  }
  for (const StreamClose& close : actions.closes) {
    auto it = by_worker_.find(close.worker_id);
    if (it == by_worker_.end()) continue;
    SessionReactor* session = it->second;
    by_worker_.erase(it);
    session->ended = true;
    session->Close(grpc::Status::OK);
  }
  for (int64_t step : actions.prune_steps) {
    absl::Status s = DeleteStepDirectory(options_.checkpoint_dir, step);
    if (!s.ok()) SPOTRAIN_LOG(Warning, "pruning step %d: %s", step, std::string(s.message()));
  }
  // Membership finalises an event and opens the next one in different inputs (a plan is sent
  // only after the Ready answers), so the open event in the journal is still this batch's.
  for (const MembershipEvent& e : actions.events) {
    if (events_ != nullptr) {
      absl::Status s = events_->Write(e);
      if (!s.ok()) {
        // The open event stays in the journal: the next start tries its line again.
        SPOTRAIN_LOG(Error, "events: %s", std::string(s.message()));
        continue;
      }
    }
    // After the line (a kill in between writes it again at the restart, where EventLog::
    // Contains finds it): the journal forgets the open event.
    if (e.epoch > 0 && journal_->state().open_event().epoch() == e.epoch) {
      proto::JournalRecord r;
      r.set_event_written(e.epoch);
      absl::Status s = journal_->Append(std::move(r), /*sync=*/false);
      if (!s.ok()) SPOTRAIN_LOG(Error, "journal: %s", std::string(s.message()));
    }
  }
  for (const IntervalDecision& d : actions.interval_decisions) {
    if (events_ != nullptr) {
      absl::Status s = events_->Write(d);
      if (!s.ok()) SPOTRAIN_LOG(Error, "events: %s", std::string(s.message()));
    }
  }
  if (metrics_ != nullptr) {
    for (double s : actions.recovery_seconds) metrics_->ObserveRecovery(s);
    for (double s : actions.checkpoint_commit_seconds) metrics_->ObserveCheckpointCommit(s);
  }
  if (actions.kv_drop_below_epoch > 0) {
    for (uint64_t token : kv_.DropBelow(actions.kv_drop_below_epoch)) {
      FinishWaiter(token, nullptr,
                   grpc::Status(grpc::StatusCode::ABORTED, "the epoch of this key is over"));
    }
  }
  if (actions.run_done) {
    absl::MutexLock lock(&done_mu_);
    done_ = true;
  }
}

void CoordinatorService::Tick() {
  const absl::Time now = clock_->Now();
  // The membership scan is O(workers): every 100 ms is plenty for heartbeat timeouts of
  // seconds. KV deadlines are checked on every tick.
  if (now >= next_membership_tick_) {
    Actions actions;
    membership_->Tick(&actions);
    Apply(actions);
    next_membership_tick_ = now + std::max(options_.tick, kMembershipTick);
  }
  for (uint64_t token : kv_.TakeExpired(now)) FinishWaiter(token, nullptr, grpc::Status::OK);
  if (metrics_ != nullptr && now >= next_metrics_) {
    metrics_->Update(membership_->Status(), membership_->counters());
    next_metrics_ = now + absl::Seconds(1);
  }
}

}  // namespace spotrain::coordinator
