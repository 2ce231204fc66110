// The elastic worker: joins a run through the coordinator, trains in whatever epoch the
// coordinator plans, survives the loss and arrival of peers without restarting, and leaves
// cleanly on an announced preemption (DESIGN.md sections 2 and 3, docs/protocol.md).
//
// Threads: RunAgent's caller is the training thread (it owns the Trainer and each epoch's
// Communicator). The agent starts a session reader thread (CoordinatorClient) that records
// Prepare / Plan / Command messages in a mailbox and aborts the current communicator when an
// immediate Prepare or a stop arrives, and a heartbeat thread that also reconnects after a
// coordinator restart and turns a leave request into a LeaveNotice.
#ifndef SPOTRAIN_WORKER_AGENT_H_
#define SPOTRAIN_WORKER_AGENT_H_

#include <atomic>
#include <cstdio>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/coordinator_client.h"
#include "worker/trainer.h"

namespace spotrain::worker {

// Set from a signal handler or the preemption watcher; read by the agent. Lock-free.
struct LeaveRequest {
  std::atomic<int> count{0};                   // requests so far (SIGTERMs, notices)
  std::atomic<int64_t> deadline_unix_ms{0};    // 0: unknown
  std::atomic<const char*> reason{"SIGTERM"};  // static string
};

struct AgentOptions {
  std::string coordinator;  // HOST:PORT
  std::string name;         // default: hostname-pid
  std::string advertise_host = "127.0.0.1";
  std::string device = "cpu";    // announced at Join ("cpu" or "cuda:<name>")
  TrainerDevice trainer_device;  // where the trainer computes (matches `device`)
  ClientOptions client;
  // Keep retrying the first Join this long while the coordinator is unreachable.
  absl::Duration join_timeout = absl::Minutes(10);
  // After a coordinator restart, keep retrying to re-join this long before giving up.
  absl::Duration reconnect_timeout = absl::Minutes(10);
  FILE* progress = stdout;
};

struct AgentResult {
  bool run_done = false;  // the run finished (else: this worker left or was removed)
  int64_t completed_steps = -1;
  std::string state_digest;  // of the final state, when run_done
  std::string message;       // why it stopped
};

// Runs the worker until the run is done or this worker leaves. OK for a finished run and
// for an announced leave; an error for anything that should make the process exit non-zero
// (bad data or config, token refused, coordinator gone for longer than reconnect_timeout).
absl::StatusOr<AgentResult> RunAgent(const AgentOptions& options, LeaveRequest& leave);

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_AGENT_H_
