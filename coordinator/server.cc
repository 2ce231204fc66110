#include "coordinator/server.h"

#include <signal.h>
#include <sys/random.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "common/file_util.h"
#include "common/hash.h"
#include "common/logging.h"
#include "common/run_config.h"
#include "common/status_macros.h"
#include "coordinator/checkpoint_store.h"
#include "coordinator/durable_state.h"
#include "coordinator/event_log.h"
#include "coordinator/membership.h"

namespace spotrain::coordinator {
namespace {

absl::StatusOr<std::string> RandomHex(size_t bytes) {
  std::string raw(bytes, '\0');
  size_t done = 0;
  while (done < bytes) {
    ssize_t n = ::getrandom(raw.data() + done, bytes - done, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(absl::StrCat("getrandom: ", std::strerror(errno)));
    }
    done += static_cast<size_t>(n);
  }
  std::string hex;
  for (unsigned char c : raw) hex += absl::StrFormat("%02x", c);
  return hex;
}

// SPOTRAIN_TOKEN / --token-file, else <state-dir>/token (created 0600 on first start).
absl::StatusOr<std::string> ResolveToken(const CoordinatorOptions& options) {
  auto given = ReadRunToken(options.token_file);
  if (given.ok() || !absl::IsNotFound(given.status())) return given;
  const std::string path = common::JoinPath(options.state_dir, "token");
  if (common::PathExists(path)) return ReadRunToken(path);
  ASSIGN_OR_RETURN(std::string token, RandomHex(32));
  RETURN_IF_ERROR(common::WriteFileAtomically(path, token + "\n"));
  if (::chmod(path.c_str(), 0600) != 0) {
    return absl::InternalError(absl::StrCat("chmod 0600 ", path, ": ", std::strerror(errno)));
  }
  SPOTRAIN_LOG(Info,
               "no run token given: generated one in %s (mode 0600); give it to every worker "
               "with --token-file or SPOTRAIN_TOKEN",
               path);
  return token;
}

// Opens the journal, refusing the state of another run unless forced.
absl::StatusOr<std::unique_ptr<Journal>> OpenState(const CoordinatorOptions& options,
                                                   const proto::RunConfig& config) {
  bool existed = false;
  ASSIGN_OR_RETURN(std::unique_ptr<Journal> journal, Journal::Open(options.state_dir, &existed));
  const uint64_t fingerprint = common::RunFingerprint(config);
  if (existed && journal->state().run_fingerprint() != fingerprint) {
    if (!options.force_new_run) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "state dir %s belongs to another run (run %s, fingerprint %016x; this config has "
          "%016x): use another --state-dir, or --force-new-run to start over",
          options.state_dir, journal->state().run_id(), journal->state().run_fingerprint(),
          fingerprint));
    }
    SPOTRAIN_LOG(Warning, "--force-new-run: discarding the state of run %s in %s",
                 journal->state().run_id(), options.state_dir);
    existed = false;
  }
  if (!existed) {
    proto::CoordinatorState state;
    ASSIGN_OR_RETURN(std::string run_id, RandomHex(8));
    state.set_run_id(run_id);
    state.set_run_fingerprint(fingerprint);
    state.set_created_at(absl::FormatTime(absl::RFC3339_sec, absl::Now(), absl::UTCTimeZone()));
    RETURN_IF_ERROR(journal->Reset(state));
    SPOTRAIN_LOG(Info, "new run %s (state in %s)", run_id, options.state_dir);
  } else {
    SPOTRAIN_LOG(Info, "resuming run %s from %s: epoch %d, %d committed checkpoint(s)%s",
                 journal->state().run_id(), options.state_dir, journal->state().last_epoch(),
                 journal->state().committed_steps_size(),
                 journal->state().run_done() ? ", run already done" : "");
  }
  RETURN_IF_ERROR(common::WriteFileAtomically(common::JoinPath(options.state_dir, "config.json"),
                                              common::RunConfigToJson(config)));
  return journal;
}

// The manifests on disk are the truth about committed checkpoints: a manifest written just
// before a crash may be missing from the journal, and one may have been deleted by hand.
absl::Status ReconcileCheckpoints(const proto::RunConfig& config, Journal& journal) {
  const std::string& dir = config.checkpoint().dir();
  if (dir.empty()) return absl::OkStatus();
  if (!common::MakeDirectories(dir).ok()) {
    SPOTRAIN_LOG(Warning,
                 "checkpoint dir %s is not reachable from the coordinator: checkpoints cannot be "
                 "committed until it is (mount the shared volume here too)",
                 dir);
    return absl::OkStatus();
  }
  const std::vector<int64_t> on_disk = FindCommittedSteps(dir, journal.state().run_fingerprint());
  std::set<int64_t> disk(on_disk.begin(), on_disk.end());
  std::set<int64_t> journaled(journal.state().committed_steps().begin(),
                              journal.state().committed_steps().end());
  for (int64_t step : journaled) {
    if (disk.count(step)) continue;
    SPOTRAIN_LOG(Warning, "committed checkpoint step %d has no manifest in %s any more", step, dir);
    proto::JournalRecord r;
    r.set_checkpoint_dropped(step);
    RETURN_IF_ERROR(journal.Append(r, true));
  }
  for (int64_t step : disk) {
    if (journaled.count(step)) continue;
    SPOTRAIN_LOG(Info, "found committed checkpoint step %d in %s", step, dir);
    proto::JournalRecord r;
    r.set_checkpoint_committed(step);
    RETURN_IF_ERROR(journal.Append(r, true));
  }
  return absl::OkStatus();
}

// A change whose timeline was still open when the last process died has no line yet: it
// gets one now with what was journaled (later points null), unless it was written just
// before the kill. The journal forgets it only once the line is there.
absl::Status WriteEventLeftOpen(Journal& journal, EventLog& events) {
  const proto::PendingEvent& pending = journal.state().open_event();
  if (pending.epoch() == 0) return absl::OkStatus();
  MembershipEvent e = FromPendingEvent(pending);
  ASSIGN_OR_RETURN(const bool written, events.Contains(e));
  if (!written) {
    e.detail = absl::StrCat(e.detail, e.detail.empty() ? "" : "; ",
                            "line written at a coordinator restart (the last process did not "
                            "write it): the workers' recovery points are unknown");
    RETURN_IF_ERROR(events.Write(e));
    SPOTRAIN_LOG(Info, "events.jsonl: wrote epoch %d's line, left open by the last process",
                 e.epoch);
  }
  proto::JournalRecord r;
  r.set_event_written(e.epoch);
  return journal.Append(std::move(r), /*sync=*/true);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Coordinator>> Coordinator::Start(const CoordinatorOptions& options) {
  std::unique_ptr<Coordinator> c(new Coordinator());
  common::Clock* clock = options.clock != nullptr ? options.clock : common::RealClock::Get();
  ASSIGN_OR_RETURN(c->config_, common::LoadRunConfig(options.config_path));
  if (options.state_dir.empty()) {
    return absl::InvalidArgumentError("--state-dir is required");
  }
  RETURN_IF_ERROR(common::MakeDirectories(options.state_dir));
  RETURN_IF_ERROR(common::CheckDirectoryWritable(options.state_dir));
  ASSIGN_OR_RETURN(c->token_, ResolveToken(options));
  ASSIGN_OR_RETURN(std::unique_ptr<Journal> journal, OpenState(options, c->config_));
  RETURN_IF_ERROR(ReconcileCheckpoints(c->config_, *journal));
  ASSIGN_OR_RETURN(std::unique_ptr<EventLog> events,
                   EventLog::Open(common::JoinPath(options.state_dir, "events.jsonl")));
  if (absl::Status s = WriteEventLeftOpen(*journal, *events); !s.ok()) {
    SPOTRAIN_LOG(Warning,
                 "events.jsonl: the line left open by the last process is not written "
                 "(tried again at the next start): %s",
                 std::string(s.message()));
  }
  ASSIGN_OR_RETURN(c->metrics_, Metrics::Create(options.host, options.metrics_port));
  auto membership = std::make_unique<Membership>(c->config_, journal->state(), clock);

  CoordinatorService::Options service_options;
  service_options.token = c->token_;
  service_options.public_status = options.public_status;
  service_options.checkpoint_dir = c->config_.checkpoint().dir();
  service_options.tick = options.tick;
  c->service_ = std::make_unique<CoordinatorService>(service_options, std::move(membership),
                                                     std::move(journal), std::move(events),
                                                     c->metrics_.get(), clock);
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                   MakeServerCredentials(options.tls));
  grpc::ServerBuilder builder;
  builder.AddListeningPort(absl::StrCat(options.host, ":", options.port), credentials, &c->port_);
  builder.RegisterService(c->service_.get());
  builder.SetMaxReceiveMessageSize(4 << 20);
  // Find dead peers whose TCP connection stays open, and accept the clients' keepalives.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 5000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  c->service_->Start();
  c->server_ = builder.BuildAndStart();
  if (c->server_ == nullptr || c->port_ == 0) {
    c->service_->Stop();
    return absl::UnavailableError(absl::StrFormat(
        "cannot listen on %s:%d (in use? another coordinator?)", options.host, options.port));
  }
  SPOTRAIN_LOG(Info, "coordinator listening on %s:%d%s%s", options.host, c->port_,
               options.tls.cert.empty() ? "" : " (TLS)",
               options.metrics_port > 0
                   ? absl::StrFormat(", metrics on :%d/metrics", options.metrics_port).c_str()
                   : "");
  return c;
}

void Coordinator::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  service_->BeginShutdown();
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  server_->Wait();
  service_->Stop();
}

Coordinator::~Coordinator() {
  if (server_ != nullptr) Shutdown();
}

int RunCoordinator(const CoordinatorOptions& options) {
  // Handle SIGTERM/SIGINT here (graceful stop) rather than in a signal handler.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
  // Debian's Abseil checks every Mutex acquisition for lock-order cycles; the per-heartbeat
  // cost is not worth it in production.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);

  auto coordinator = Coordinator::Start(options);
  if (!coordinator.ok()) {
    std::fprintf(stderr, "spotrain-coordinator: %s\n",
                 std::string(coordinator.status().message()).c_str());
    return absl::IsInvalidArgument(coordinator.status()) ? 2 : 1;
  }
  int exit_code = 0;
  for (;;) {
    if (!options.serve_after_done && (*coordinator)->WaitUntilDone(absl::ZeroDuration())) {
      // Let the final Command{stop} messages reach the workers.
      absl::SleepFor(absl::Milliseconds(500));
      SPOTRAIN_LOG(Info, "run finished; exiting");
      break;
    }
    timespec wait = {0, 100 * 1000 * 1000};
    int sig = sigtimedwait(&signals, nullptr, &wait);
    if (sig == SIGTERM || sig == SIGINT) {
      SPOTRAIN_LOG(Info, "%s: shutting down (the state dir keeps the run; restart to resume)",
                   sig == SIGTERM ? "SIGTERM" : "SIGINT");
      exit_code = 0;
      break;
    }
  }
  (*coordinator)->Shutdown();
  return exit_code;
}

}  // namespace spotrain::coordinator
