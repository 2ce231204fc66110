// Starting and stopping a coordinator: loads and checks the run config, opens (or creates)
// the state dir (journal, token, config copy, events.jsonl), reconciles committed
// checkpoints with the disk, and serves the gRPC service and the metrics. `main.cc` maps flags
// onto CoordinatorOptions and calls RunCoordinator; tests start a Coordinator in-process.
// Thread-safety: Coordinator's methods may be called from any thread.
#ifndef SPOTRAIN_COORDINATOR_SERVER_H_
#define SPOTRAIN_COORDINATOR_SERVER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "coordinator/client_auth.h"
#include "coordinator/metrics.h"
#include "coordinator/service.h"
#include "grpcpp/grpcpp.h"
#include "proto/config.pb.h"

namespace spotrain::coordinator {

struct CoordinatorOptions {
  std::string config_path;
  std::string host = "0.0.0.0";
  int port = 0;  // 0: any free port (see Coordinator::port)
  std::string state_dir;
  int metrics_port = 0;  // 0: no metrics server
  std::string token_file;
  bool public_status = false;
  TlsFiles tls;
  bool force_new_run = false;
  bool serve_after_done = false;
  common::Clock* clock = nullptr;  // default: the real clock
  absl::Duration tick = absl::Milliseconds(20);
};

class Coordinator {
 public:
  // Everything up to serving. kInvalidArgument (config, naming the field),
  // kFailedPrecondition (state dir of another run, unusable dir), kUnavailable (port).
  static absl::StatusOr<std::unique_ptr<Coordinator>> Start(const CoordinatorOptions& options);
  ~Coordinator();

  int port() const { return port_; }
  const std::string& token() const { return token_; }
  const proto::RunConfig& config() const { return config_; }
  CoordinatorService& service() { return *service_; }
  Metrics& metrics() { return *metrics_; }

  // Blocks until the run is done or `timeout` passes.
  bool WaitUntilDone(absl::Duration timeout) { return service_->WaitUntilDone(timeout); }
  // Ends the sessions, stops serving and the state thread. Idempotent.
  void Shutdown();

 private:
  Coordinator() = default;

  proto::RunConfig config_;
  std::string token_;
  int port_ = 0;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<CoordinatorService> service_;
  std::unique_ptr<grpc::Server> server_;
  bool shut_down_ = false;
};

// The whole binary: validates, serves until the run is done (exit 0; or until SIGTERM/SIGINT
// when serve_after_done), and returns the exit status. --check-config is handled by main.
int RunCoordinator(const CoordinatorOptions& options);

}  // namespace spotrain::coordinator

#endif  // SPOTRAIN_COORDINATOR_SERVER_H_
