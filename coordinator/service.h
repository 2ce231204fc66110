// The coordinator's gRPC service: a thin adapter between proto::Coordinator (gRPC callback API:
// one ServerBidiReactor per Session, unary reactors for the rest, no thread per stream) and the
// pure Membership state machine.
//
// Threading: gRPC's callback threads never touch the state. Every RPC event (a Join, a
// Session message, a stream that ended, a KvGet that waits) is posted as a closure to ONE
// state thread, which owns Membership, KvStore, the journal, the event log and the session
// map, applies the resulting Actions in order (journal first: write-ahead) and completes
// the RPCs. Reactions therefore never block (apart from a short queue lock); only the state
// thread does disk I/O. The state thread also ticks every `tick` (KV deadlines) and runs the
// membership's timeouts every 100 ms. Each session
// reads ahead of the state thread by at most a few messages (back-pressure). Outgoing messages are
// queued per session under the session's own mutex.
#ifndef SPOTRAIN_COORDINATOR_SERVICE_H_
#define SPOTRAIN_COORDINATOR_SERVICE_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "coordinator/durable_state.h"
#include "coordinator/event_log.h"
#include "coordinator/kv_store.h"
#include "coordinator/membership.h"
#include "coordinator/metrics.h"
#include "grpcpp/grpcpp.h"
#include "proto/spotrain.grpc.pb.h"

namespace spotrain::coordinator {

// Session is a raw (ByteBuffer) method so that a message sent to many workers (a Plan, a
// Prepare) is serialised once and its bytes shared between the streams.
using CoordinatorServiceBase =
    proto::Coordinator::WithCallbackMethod_Join<proto::Coordinator::WithRawCallbackMethod_Session<
        proto::Coordinator::WithCallbackMethod_KvSet<proto::Coordinator::WithCallbackMethod_KvGet<
            proto::Coordinator::WithCallbackMethod_GetStatus<proto::Coordinator::Service>>>>>;

class CoordinatorService final : public CoordinatorServiceBase {
 public:
  struct Options {
    std::string token;  // required on every RPC (GetStatus: unless public_status)
    bool public_status = false;
    std::string checkpoint_dir;  // RunConfig.checkpoint.dir (empty: none)
    absl::Duration tick = absl::Milliseconds(20);
  };

  // `journal` is required; `events` and `metrics` may be null. Takes ownership of all but
  // `metrics` and `clock`.
  CoordinatorService(Options options, std::unique_ptr<Membership> membership,
                     std::unique_ptr<Journal> journal, std::unique_ptr<EventLog> events,
                     Metrics* metrics, common::Clock* clock);
  ~CoordinatorService() override;

  // Starts the state thread.
  void Start();
  // Ends every Session (the workers see the stream end) and pending KvGet, and refuses new
  // RPCs with UNAVAILABLE. Call before grpc::Server::Shutdown. Blocks until done.
  void BeginShutdown();
  // Stops the state thread once the server has shut down (every reactor finished).
  void Stop();
  // Blocks until the run is done (its final checkpoint committed) or `timeout` passes.
  bool WaitUntilDone(absl::Duration timeout);
  // Runs `fn` on the state thread and waits for it (tests inspect the state this way).
  void RunOnStateThread(const std::function<void(Membership&)>& fn);
  // Number of Session streams bound to a worker (state thread view; for tests and benches).
  size_t BoundSessions();

  grpc::ServerUnaryReactor* Join(grpc::CallbackServerContext* context,
                                 const proto::JoinRequest* request,
                                 proto::JoinResponse* response) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* Session(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* KvSet(grpc::CallbackServerContext* context,
                                  const proto::KvSetRequest* request,
                                  proto::KvSetResponse* response) override;
  grpc::ServerUnaryReactor* KvGet(grpc::CallbackServerContext* context,
                                  const proto::KvGetRequest* request,
                                  proto::KvGetResponse* response) override;
  grpc::ServerUnaryReactor* GetStatus(grpc::CallbackServerContext* context,
                                      const proto::StatusRequest* request,
                                      proto::RunStatus* response) override;

 private:
  class SessionReactor;
  struct KvWaiter {
    grpc::ServerUnaryReactor* reactor = nullptr;
    proto::KvGetResponse* response = nullptr;
  };

  grpc::Status Authorize(grpc::CallbackServerContext* context, const char* rpc) const;
  void Post(std::function<void()> fn) ABSL_LOCKS_EXCLUDED(queue_mu_);
  void StateLoop();

  // State-thread only.
  void Apply(Actions& actions);
  void Tick();
  void HandleSessionMessage(SessionReactor* session, const proto::WorkerMessage& message);
  void HandleSessionEnd(SessionReactor* session, const std::string& why);
  void HandleSessionDone(SessionReactor* session);
  void FinishWaiter(uint64_t token, const std::string* value, grpc::Status status);

  const Options options_;
  common::Clock* const clock_;
  Metrics* const metrics_;

  // Owned by the state thread after Start().
  std::unique_ptr<Membership> membership_;
  std::unique_ptr<Journal> journal_;
  std::unique_ptr<EventLog> events_;
  KvStore kv_;
  std::map<uint64_t, KvWaiter> waiters_;
  uint64_t next_waiter_ = 1;
  std::set<SessionReactor*> sessions_;
  std::map<uint64_t, SessionReactor*> by_worker_;
  absl::Time next_metrics_ = absl::InfinitePast();
  absl::Time next_membership_tick_ = absl::InfinitePast();

  std::atomic<bool> shutting_down_{false};
  absl::Mutex queue_mu_;
  std::vector<std::function<void()>> queue_ ABSL_GUARDED_BY(queue_mu_);
  bool stop_ ABSL_GUARDED_BY(queue_mu_) = false;
  std::thread state_thread_;

  absl::Mutex done_mu_;
  bool done_ ABSL_GUARDED_BY(done_mu_) = false;
};

}  // namespace spotrain::coordinator

#endif  // SPOTRAIN_COORDINATOR_SERVICE_H_
