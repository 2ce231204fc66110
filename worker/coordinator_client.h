// The worker's side of the coordinator protocol (proto/spotrain.proto, docs/protocol.md):
// Join, the Session stream and the key-value rendezvous, over one gRPC channel with the run
// token attached to every call and optional TLS.
//
// Threading: Join and the Kv calls may be called from any thread. The Session has one
// reader thread of its own that hands every CoordinatorMessage to the handler given to
// OpenSession (the handler must not block for long); Send may be called from any thread
// (writes are serialised here). CloseSession joins the reader thread.
#ifndef SPOTRAIN_WORKER_COORDINATOR_CLIENT_H_
#define SPOTRAIN_WORKER_COORDINATOR_CLIENT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "proto/spotrain.grpc.pb.h"
#include "worker/rendezvous_store.h"

namespace spotrain::worker {

struct ClientOptions {
  std::string token;     // the run token (SPOTRAIN_TOKEN or --token-file)
  std::string tls_ca;    // PEM file of the CA that signed the coordinator's cert; empty: no TLS
  std::string tls_cert;  // optional client certificate and key (PEM files) for mutual TLS
  std::string tls_key;
  absl::Duration rpc_timeout = absl::Seconds(10);
};

// Reads the run token: the SPOTRAIN_TOKEN environment variable, else `token_file` (trailing
// whitespace dropped). kFailedPrecondition says how to provide one when neither is set.
absl::StatusOr<std::string> ReadRunToken(const std::string& token_file);

class CoordinatorClient {
 public:
  using Handler = std::function<void(const proto::CoordinatorMessage&)>;
  // Called once when the session stream ends (coordinator gone, or stream closed), with
  // the final status.
  using EndHandler = std::function<void(const grpc::Status&)>;

  static absl::StatusOr<std::unique_ptr<CoordinatorClient>> Create(const std::string& target,
                                                                   const ClientOptions& options);
  ~CoordinatorClient();

  // One Join attempt. kUnavailable when the coordinator cannot be reached;
  // kPermissionDenied for a wrong token; kFailedPrecondition when refused (message says why).
  // With `wait_for_ready` the call waits (up to the RPC timeout) for the channel to connect
  // instead of failing at once while it is in reconnect backoff: used for re-joins, where
  // the coordinator is known to exist and is coming back.
  absl::StatusOr<proto::JoinResponse> Join(const proto::JoinRequest& request,
                                           bool wait_for_ready = false);

  // Opens the Session stream, sends Hello{worker_id} and starts the reader thread.
  absl::Status OpenSession(uint64_t worker_id, Handler on_message, EndHandler on_end);
  // Writes one message; false when the stream is closed or broken. Thread-safe.
  bool Send(const proto::WorkerMessage& message) ABSL_LOCKS_EXCLUDED(write_mu_);
  // Half-closes and cancels the stream, joins the reader thread. Idempotent.
  void CloseSession();

  absl::Status KvSet(int64_t epoch, const std::string& key, const std::string& value);
  // kDeadlineExceeded when the key was not set within `wait`.
  absl::StatusOr<std::string> KvGet(int64_t epoch, const std::string& key, absl::Duration wait);

  const std::string& target() const { return target_; }

 private:
  CoordinatorClient(std::string target, ClientOptions options,
                    std::shared_ptr<grpc::Channel> channel);
  void Authorize(grpc::ClientContext& context, absl::Duration timeout) const;

  const std::string target_;
  const ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<proto::Coordinator::Stub> stub_;

  using Stream = grpc::ClientReaderWriter<proto::WorkerMessage, proto::CoordinatorMessage>;
  absl::Mutex write_mu_;
  std::unique_ptr<grpc::ClientContext> session_context_ ABSL_GUARDED_BY(write_mu_);
  std::shared_ptr<Stream> session_ ABSL_GUARDED_BY(write_mu_);
  bool writes_done_ ABSL_GUARDED_BY(write_mu_) = false;
  std::thread reader_;  // touched by Open/CloseSession only (one caller thread)
};

// A KeyValueClient bound to one epoch of the coordinator's rendezvous store, for the Gloo
// store of that epoch's group. Thread-safe; `client` must outlive it.
class CoordinatorKeyValue : public KeyValueClient {
 public:
  CoordinatorKeyValue(CoordinatorClient& client, int64_t epoch) : client_(client), epoch_(epoch) {}
  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::string> Get(const std::string& key, absl::Duration wait) override;

 private:
  CoordinatorClient& client_;
  const int64_t epoch_;
};

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_COORDINATOR_CLIENT_H_
