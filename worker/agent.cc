#include "worker/agent.h"

#include <unistd.h>

#include <deque>
#include <memory>
#include <optional>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/file_util.h"
#include "common/logging.h"
#include "common/run_config.h"
#include "common/status_macros.h"
#include "worker/checkpoint.h"
#include "worker/epoch_communicator.h"
#include "worker/gloo_communicator.h"
#include "worker/progress.h"
#include "worker/trainer.h"

namespace spotrain::worker {
namespace {

// Control values summed in-band: the plan-pending count in the low part, checkpoint requests
// in multiples of this (more ranks than this never exist in one group).
constexpr int64_t kCheckpointFlag = 1 << 16;

double MsSince(absl::Time t) { return absl::ToDoubleMilliseconds(absl::Now() - t); }

bool Retryable(const absl::Status& status) {
  return status.code() == absl::StatusCode::kUnavailable ||
         status.code() == absl::StatusCode::kDeadlineExceeded;
}

// What the session reader thread has received, for the training thread to act on. The one
// piece of state shared between the agent's threads; every field is guarded by mu_.
class Mailbox {
 public:
  struct PrepareInfo {
    int64_t epoch = 0;
    bool immediate = false;
    absl::Time received;
    bool answered = false;
  };

  void OnMessage(const proto::CoordinatorMessage& message) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    switch (message.kind_case()) {
      case proto::CoordinatorMessage::kPrepare:
        if (message.prepare().epoch() > prepare_.epoch) {
          prepare_ = {message.prepare().epoch(), message.prepare().immediate(), absl::Now(), false};
          SPOTRAIN_LOG(Debug, "prepare epoch %d (%s)", prepare_.epoch,
                       prepare_.immediate ? "immediate" : "at an agreed step");
          if (prepare_.immediate && comm_ != nullptr && prepare_.epoch > comm_epoch_) {
            comm_->Interrupt();  // NCCL revokes (shrinkable), Gloo aborts
          }
        }
        break;
      case proto::CoordinatorMessage::kPlan:
        if (!plan_.has_value() || message.plan().epoch() > plan_->epoch()) {
          plan_ = message.plan();
        }
        break;
      case proto::CoordinatorMessage::kCommand:
        if (message.command().stop()) {
          stop_ = message.command();
          if (comm_ != nullptr) comm_->Abort();
        }
        if (message.command().checkpoint_now()) checkpoint_now_ = true;
        if (message.command().checkpoint_every_steps() > 0) {
          auto_every_steps_ = message.command().checkpoint_every_steps();
        }
        break;
      case proto::CoordinatorMessage::kRejected:
        SPOTRAIN_LOG(Warning, "coordinator rejected a report: %s", message.rejected().message());
        break;
      default:
        break;
    }
  }

  void OnSessionEnd(const grpc::Status& status) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    session_alive_ = false;
    session_end_ = status;
  }
  void OnSessionOpen() ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    session_alive_ = true;
  }
  bool session_alive() const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return session_alive_;
  }

  // The communicator an immediate Prepare must interrupt or a stop abort (null between
  // epochs).
  void SetCommunicator(Communicator* comm, int64_t epoch) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    comm_ = comm;
    comm_epoch_ = epoch;
    if (comm_ == nullptr) return;
    if (stop_) {
      comm_->Abort();
    } else if (prepare_.immediate && prepare_.epoch > epoch) {
      comm_->Interrupt();
    }
  }

  // A planned (non-immediate) Prepare newer than `epoch` is pending: the in-band flag.
  bool PlannedChangePending(int64_t epoch) const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return prepare_.epoch > epoch;
  }
  // every_steps "auto": the coordinator's last announced interval (0: none yet).
  int64_t auto_every_steps() const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return auto_every_steps_;
  }
  bool ConsumeCheckpointNow() ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    bool value = checkpoint_now_;
    checkpoint_now_ = false;
    return value;
  }

  enum class Event { kNone, kStop, kPrepare, kPlan };
  struct Next {
    Event event = Event::kNone;
    PrepareInfo prepare;
    proto::Plan plan;
    proto::Command stop;
  };

  // Waits up to `timeout` for something the training thread must act on while it is not
  // training: a stop, an unanswered Prepare, or a Plan newer than `epoch` (the plan is only
  // returned once its Prepare was answered, or when it is for an epoch we never saw
  // prepared, e.g. a joiner's first plan).
  Next Wait(int64_t epoch, absl::Duration timeout) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return stop_.has_value() || (prepare_.epoch > epoch && !prepare_.answered) ||
             CurrentPlanNewerThan(epoch);
    };
    mu_.AwaitWithTimeout(absl::Condition(&ready), timeout);
    Next next;
    if (stop_.has_value()) {
      next.event = Event::kStop;
      next.stop = *stop_;
    } else if (prepare_.epoch > epoch && !prepare_.answered &&
               !(plan_.has_value() && plan_->epoch() >= prepare_.epoch)) {
      next.event = Event::kPrepare;
      next.prepare = prepare_;
    } else if (CurrentPlanNewerThan(epoch)) {
      next.event = Event::kPlan;
      next.plan = *plan_;
      next.prepare = prepare_;
    }
    return next;
  }

  // True when the epoch now running must end at once: a stop, or an immediate Prepare for
  // a newer epoch (checked between steps, for groups whose collectives Abort cannot reach).
  bool Interrupted(int64_t epoch) const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return stop_.has_value() || (prepare_.immediate && prepare_.epoch > epoch);
  }

  void MarkAnswered(int64_t epoch) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    if (prepare_.epoch == epoch) prepare_.answered = true;
  }

  // When the Prepare of `epoch` arrived (the start of this worker's recovery timeline).
  absl::Time PrepareTime(int64_t epoch) const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return prepare_.epoch == epoch ? prepare_.received : absl::Now();
  }

  // Forget stop / plans after a re-join (a new worker id starts a new conversation).
  void ResetForRejoin() ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    stop_.reset();
    plan_.reset();
    prepare_ = PrepareInfo();
  }

 private:
  // A plan newer than `epoch` that no later Prepare has superseded.
  bool CurrentPlanNewerThan(int64_t epoch) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return plan_.has_value() && plan_->epoch() > epoch && plan_->epoch() >= prepare_.epoch;
  }

  mutable absl::Mutex mu_;
  PrepareInfo prepare_ ABSL_GUARDED_BY(mu_);
  std::optional<proto::Plan> plan_ ABSL_GUARDED_BY(mu_);
  std::optional<proto::Command> stop_ ABSL_GUARDED_BY(mu_);
  bool checkpoint_now_ ABSL_GUARDED_BY(mu_) = false;
  int64_t auto_every_steps_ ABSL_GUARDED_BY(mu_) = 0;
  bool session_alive_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status session_end_ ABSL_GUARDED_BY(mu_);
  Communicator* comm_ ABSL_GUARDED_BY(mu_) = nullptr;
  int64_t comm_epoch_ ABSL_GUARDED_BY(mu_) = 0;
};

class Agent {
 public:
  Agent(const AgentOptions& options, LeaveRequest& leave) : options_(options), leave_(leave) {}

  absl::StatusOr<AgentResult> Run();

 private:
  // Joins (retrying while the coordinator is unreachable, up to `timeout`) and opens the
  // session. Sets worker_id_ and, on the first join, config_ and trainer_.
  absl::Status JoinAndOpenSession(absl::Duration timeout)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(session_mu_);
  // Re-joins unless the session is alive (or always, with `force`: after being fenced).
  // Called by the heartbeat thread after a coordinator restart and by the training thread
  // after a stop; serialised by session_mu_.
  absl::Status Rejoin(absl::Duration timeout, bool force) ABSL_LOCKS_EXCLUDED(session_mu_);
  void HeartbeatLoop();
  // Sends a report. The latest StepDone and the ShardWritten reports of checkpoints not
  // known to be committed are also remembered and sent again after a re-join: reports sent
  // while the coordinator was down (or refused while this worker was fenced) are lost, so
  // those checkpoints would never be committed, and a run that finished during the outage
  // would wait for its final checkpoint forever.
  void Send(const proto::WorkerMessage& message) ABSL_LOCKS_EXCLUDED(replay_mu_) {
    if (message.has_step_done() || message.has_shard_written()) {
      absl::MutexLock lock(&replay_mu_);
      if (message.has_step_done()) {
        last_step_done_ = message;
      } else {
        unconfirmed_shards_.push_back(message);
        // Bounded (a few hundred bytes each); a commit makes every older checkpoint useless,
        // so when an outage outlasts 64 checkpoints the oldest are dropped first.
        while (unconfirmed_shards_.size() > 64) unconfirmed_shards_.pop_front();
      }
    }
    client_->Send(message);
  }
  // Oldest first, so that each can still commit (the coordinator refuses steps older than
  // its newest commit). A checkpoint whose manifest exists is committed: forgotten.
  void ReplayReports(bool step_done) ABSL_LOCKS_EXCLUDED(replay_mu_) {
    absl::MutexLock lock(&replay_mu_);
    std::deque<proto::WorkerMessage> unconfirmed;
    for (proto::WorkerMessage& m : unconfirmed_shards_) {
      if (common::PathExists(
              common::JoinPath(StepDirectory(config_.checkpoint().dir(), m.shard_written().step()),
                               "manifest.json"))) {
        continue;
      }
      client_->Send(m);
      unconfirmed.push_back(std::move(m));
    }
    unconfirmed_shards_.swap(unconfirmed);
    if (step_done && last_step_done_.has_step_done()) client_->Send(last_step_done_);
  }
  void SendReady(int64_t epoch);
  void SendCollectiveFailed(int64_t epoch, const absl::Status& error);
  // Runs one epoch's plan until the epoch ends (a Prepare to answer, a failure, a stop) or
  // training is complete. Errors are fatal for the process (not for the epoch).
  absl::Status ExecutePlan(const proto::Plan& plan);
  // Builds the checkpoint writer when the run has a checkpoint dir (checks it is writable).
  absl::Status SetUpCheckpoints();
  // Loads the plan's checkpoint (or an older one if it is damaged) on every rank and checks
  // that all ranks loaded the same step.
  absl::Status RestoreFromCheckpoint(const proto::StateSource& source, Communicator& comm);
  // Snapshots this rank's shard and writes it in the background (reported when durable).
  void SaveCheckpoint(int64_t epoch, int rank, int world);
  // The collective validation pass of this epoch's group; keeps the loss in last_val_loss_.
  // False when it failed (reported to the coordinator unless an abort or a newer epoch
  // interrupted it): the epoch is over for this worker.
  bool EvaluateInEpoch(Communicator& comm, int64_t epoch);
  void PrintSummary();

  const AgentOptions& options_;
  LeaveRequest& leave_;
  std::unique_ptr<CoordinatorClient> client_;
  Mailbox mailbox_;
  proto::RunConfig config_;
  uint64_t fingerprint_ = 0;
  std::unique_ptr<Trainer> trainer_;
  EpochCommunicatorFactory communicators_{options_.trainer_device};
  // Declared after client_: destroyed first, so its callback never outlives the client.
  std::unique_ptr<CheckpointWriter> writer_;
  int64_t checkpoint_every_ = 0;  // fixed interval in steps; 0: only the final checkpoint
  bool holds_state_ = false;

  std::atomic<uint64_t> worker_id_{0};
  std::atomic<int64_t> epoch_{0};        // epoch of the plan being executed
  std::atomic<int64_t> held_steps_{-1};  // completed steps of our state (-1: none)
  std::atomic<bool> stopping_{false};
  std::atomic<bool> leave_notified_{false};
  absl::Mutex session_mu_;  // serialises re-joins (heartbeat thread, training thread)
  absl::Mutex replay_mu_;
  proto::WorkerMessage last_step_done_ ABSL_GUARDED_BY(replay_mu_);
  std::deque<proto::WorkerMessage> unconfirmed_shards_ ABSL_GUARDED_BY(replay_mu_);
  absl::Mutex fatal_mu_;
  absl::Status fatal_ ABSL_GUARDED_BY(fatal_mu_);  // set by the heartbeat thread
  bool summary_printed_ = false;
  // The last validation loss this worker's group computed, and the step of the state it was
  // computed on (-1: none); the summary shows it only for the state the worker ends with.
  float last_val_loss_ = -1;
  int64_t last_val_step_ = -1;
};

absl::Status Agent::Rejoin(absl::Duration timeout, bool force) {
  absl::MutexLock lock(&session_mu_);
  if (!force && mailbox_.session_alive()) return absl::OkStatus();
  client_->CloseSession();
  RETURN_IF_ERROR(JoinAndOpenSession(timeout));
  // Shard reports in both cases (the coordinator accepts them from the re-joined process);
  // the StepDone only after a coordinator restart (after being fenced it is stale).
  ReplayReports(/*step_done=*/!force);
  return absl::OkStatus();
}

absl::Status Agent::JoinAndOpenSession(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::Duration backoff = absl::Milliseconds(100);
  proto::JoinResponse response;
  while (true) {
    proto::JoinRequest request;
    request.set_name(options_.name);
    request.set_advertise_host(options_.advertise_host);
    request.set_device(options_.device);
    request.set_held_step(holds_state_ ? held_steps_.load() : -1);
    request.set_held_fingerprint(holds_state_ ? fingerprint_ : 0);
    request.set_previous_worker_id(worker_id_.load());
    request.set_current_epoch(epoch_.load());
    // A re-join waits for the channel to reconnect rather than failing during its backoff.
    auto joined = client_->Join(request, /*wait_for_ready=*/worker_id_.load() != 0);
    if (joined.ok()) {
      response = *std::move(joined);
      break;
    }
    if (!Retryable(joined.status()) || absl::Now() + backoff > deadline) {
      return joined.status();
    }
    SPOTRAIN_LOG(Info, "coordinator %s not reachable (%s); retrying in %s", client_->target(),
                 joined.status().message(), absl::FormatDuration(backoff));
    absl::SleepFor(backoff);
    backoff = std::min(backoff * 2, absl::Seconds(2));
  }
  if (fingerprint_ == 0) {
    // The trainer is built after the session is open (Run), so that a slow model
    // allocation never delays the first heartbeat past the timeout.
    config_ = response.config();
    fingerprint_ = response.run_fingerprint();
  } else if (response.run_fingerprint() != fingerprint_) {
    return absl::FailedPreconditionError(
        "the coordinator now runs a different run (config changed): exiting so that a fresh "
        "worker joins it");
  }
  worker_id_ = response.worker_id();
  common::SetLogTag(absl::StrCat("worker ", response.worker_id()));
  mailbox_.ResetForRejoin();
  RETURN_IF_ERROR(client_->OpenSession(
      response.worker_id(), [this](const proto::CoordinatorMessage& m) { mailbox_.OnMessage(m); },
      [this](const grpc::Status& s) {
        if (!stopping_) {
          SPOTRAIN_LOG(Warning, "session with the coordinator ended: %s", s.error_message());
        }
        mailbox_.OnSessionEnd(s);
      }));
  mailbox_.OnSessionOpen();
  leave_notified_ = false;
  SPOTRAIN_LOG(Info, "joined run %s as worker %d (%s, holds step %d)", response.run_id(),
               response.worker_id(), options_.name, holds_state_ ? held_steps_.load() : -1);
  return absl::OkStatus();
}

void Agent::HeartbeatLoop() {
  absl::Time lost_since = absl::InfiniteFuture();
  while (!stopping_) {
    if (!mailbox_.session_alive() && leave_.count.load() == 0) {
      // The coordinator went away (restart, network): keep training and re-join in the
      // background, so that a restarted coordinator finds its members again.
      if (lost_since == absl::InfiniteFuture()) lost_since = absl::Now();
      absl::Status st = Rejoin(absl::Seconds(2), /*force=*/false);
      if (st.ok()) {
        lost_since = absl::InfiniteFuture();
      } else if (!Retryable(st) || absl::Now() - lost_since > options_.reconnect_timeout) {
        absl::MutexLock lock(&fatal_mu_);
        fatal_ = st;
        return;
      }
      continue;
    }
    if (leave_.count.load() > 0 && !leave_notified_.exchange(true)) {
      proto::WorkerMessage m;
      m.mutable_leave()->set_reason(leave_.reason.load());
      m.mutable_leave()->set_deadline_unix_ms(leave_.deadline_unix_ms.load());
      Send(m);
      SPOTRAIN_LOG(Info, "leave requested (%s): told the coordinator", leave_.reason.load());
    }
    proto::WorkerMessage m;
    m.mutable_heartbeat()->set_epoch(epoch_.load());
    m.mutable_heartbeat()->set_completed_steps(held_steps_.load());
    Send(m);
    absl::SleepFor(absl::Milliseconds(config_.heartbeat_ms()));
  }
}

void Agent::SendReady(int64_t epoch) {
  proto::WorkerMessage m;
  m.mutable_ready()->set_epoch(epoch);
  m.mutable_ready()->set_completed_steps(holds_state_ ? held_steps_.load() : -1);
  m.mutable_ready()->set_held_fingerprint(holds_state_ ? fingerprint_ : 0);
  Send(m);
  mailbox_.MarkAnswered(epoch);
}

void Agent::SendCollectiveFailed(int64_t epoch, const absl::Status& error) {
  SPOTRAIN_LOG(Warning, "epoch %d: %s", epoch, error.ToString());
  proto::WorkerMessage m;
  auto* f = m.mutable_collective_failed();
  f->set_epoch(epoch);
  f->set_step(trainer_->step());
  f->set_error(std::string(error.message()));
  f->set_completed_steps(holds_state_ ? held_steps_.load() : -1);
  Send(m);
}

absl::Status Agent::ExecutePlan(const proto::Plan& plan) {
  int rank = -1;
  for (const proto::Member& member : plan.members()) {
    if (member.worker_id() == worker_id_) rank = member.rank();
  }
  if (rank < 0) return absl::OkStatus();  // not a member: a stop will follow
  const absl::Time prepared = mailbox_.PrepareTime(plan.epoch());
  epoch_ = plan.epoch();
  const int64_t held_before = holds_state_ ? held_steps_.load() : -1;

  CoordinatorKeyValue kv(*client_, plan.epoch());
  GlooOptions gloo_options;
  gloo_options.interface_host = options_.advertise_host;
  gloo_options.connect_timeout = absl::Milliseconds(config_.op_timeout_ms());
  gloo_options.op_timeout = absl::Milliseconds(config_.op_timeout_ms());
  const int64_t epoch = plan.epoch();
  gloo_options.cancelled = [this, epoch] { return mailbox_.Interrupted(epoch); };
  auto created = communicators_.Create(kv, plan, rank, gloo_options);
  if (!created.ok()) {
    SendCollectiveFailed(plan.epoch(), created.status());
    return absl::OkStatus();
  }
  std::unique_ptr<Communicator> comm = *std::move(created);
  mailbox_.SetCommunicator(comm.get(), plan.epoch());
  // At the end of the epoch: no more interrupts reach it, then the factory keeps it (an NCCL
  // communicator may be shrunk into the next epoch) or destroys it.
  struct Unregister {
    Mailbox& mailbox;
    EpochCommunicatorFactory& factory;
    std::unique_ptr<Communicator>& comm;
    ~Unregister() {
      mailbox.SetCommunicator(nullptr, 0);
      factory.Retire(std::move(comm));
    }
  } unregister{mailbox_, communicators_, comm};
  const double rebuilt_ms = MsSince(prepared);

  // State sync as the plan says.
  const proto::StateSource& source = plan.state_source();
  switch (source.kind()) {
    case proto::StateSource::KEEP:
      if (!holds_state_ || trainer_->step() != plan.start_step()) {
        SendCollectiveFailed(plan.epoch(),
                             absl::InternalError(absl::StrFormat(
                                 "plan says keep step %d but this worker holds step %d",
                                 plan.start_step(), holds_state_ ? trainer_->step() : -1)));
        return absl::OkStatus();
      }
      break;
    case proto::StateSource::BROADCAST: {
      absl::Status st = trainer_->BroadcastState(*comm, source.broadcast_rank());
      if (!st.ok()) {
        SendCollectiveFailed(plan.epoch(), st);
        return absl::OkStatus();
      }
      if (trainer_->step() != plan.start_step()) {
        return absl::InternalError(absl::StrFormat("broadcast state holds step %d, plan says %d",
                                                   trainer_->step(), plan.start_step()));
      }
      break;
    }
    case proto::StateSource::FRESH:
      trainer_->InitFresh();
      break;
    case proto::StateSource::CHECKPOINT: {
      absl::Status st = RestoreFromCheckpoint(source, *comm);
      if (!st.ok()) {
        if (absl::IsUnavailable(st) || absl::IsAborted(st)) {
          SendCollectiveFailed(plan.epoch(), st);
          return absl::OkStatus();
        }
        return st;  // no usable checkpoint, or one of another model: a person must look
      }
      break;
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("plan has unknown state source ", source.kind()));
  }
  holds_state_ = true;
  held_steps_ = trainer_->step();
  const double synced_ms = MsSince(prepared);
  const int64_t lost_steps = held_before > plan.start_step() ? held_before - plan.start_step() : 0;
  SPOTRAIN_LOG(Info, "epoch %d: rank %d of %d, start at step %d (%s), group ready in %.0f ms",
               plan.epoch(), rank, plan.world_size(), plan.start_step(),
               proto::StateSource::Kind_Name(source.kind()), synced_ms);

  if (plan.start_step() >= config_.steps()) {
    // The epoch starts after the last step: a worker joined, or the group was rebuilt, as
    // the run ended. Nothing is left to train, but a member that received the state here
    // never evaluated it, and every worker's summary line carries the run's final
    // validation loss: the group evaluates once (every rank sees the same start step, so
    // all of them take part in this collective). Before the checkpoint below: its commit
    // can end the run, and the Stop would abort this evaluation. If it fails, the next
    // epoch comes to the same point again.
    if (!EvaluateInEpoch(*comm, plan.epoch())) return absl::OkStatus();
  }
  if (trainer_->step() >= config_.steps() && writer_ != nullptr &&
      !common::PathExists(common::JoinPath(
          StepDirectory(config_.checkpoint().dir(), trainer_->step()), "manifest.json"))) {
    // Training is complete but the final checkpoint is not committed (e.g. the coordinator
    // restarted before it could commit it): write it again with this epoch's ranks.
    SaveCheckpoint(plan.epoch(), rank, plan.world_size());
  }
  bool first_step = true;
  while (trainer_->step() < config_.steps()) {
    if (mailbox_.Interrupted(plan.epoch())) return absl::OkStatus();
    // The in-band agreement channel: summed over the ranks with the step's reduction, so
    // every rank sees the same value after the same step.
    // every_steps "auto" while the coordinator is unreachable: keep checkpointing at its
    // last interval (the ranks agree in-band, whichever of them lost its session).
    const int64_t auto_every = writer_ != nullptr ? mailbox_.auto_every_steps() : 0;
    const bool outage_checkpoint =
        auto_every > 0 && !mailbox_.session_alive() && (trainer_->step() + 1) % auto_every == 0;
    const bool checkpoint_now = mailbox_.ConsumeCheckpointNow();
    const int64_t control = (mailbox_.PlannedChangePending(plan.epoch()) ? 1 : 0) +
                            (checkpoint_now || outage_checkpoint ? kCheckpointFlag : 0);
    auto stats = trainer_->RunStep(*comm, control);
    if (!stats.ok()) {
      if (stats.status().code() == absl::StatusCode::kOutOfRange ||
          stats.status().code() == absl::StatusCode::kInternal) {
        return stats.status();  // diverged or overflowed: every rank would do the same
      }
      if ((!comm->status().ok() && comm->status().code() == absl::StatusCode::kAborted) ||
          mailbox_.Interrupted(plan.epoch())) {
        return absl::OkStatus();  // a newer epoch or a stop interrupted us: not a failure
      }
      SendCollectiveFailed(plan.epoch(), stats.status());
      return absl::OkStatus();
    }
    held_steps_ = trainer_->step();
    // Evaluate before reporting the step: the coordinator ends the run (and stops every
    // worker) as soon as the last step is reported, so the final evaluation comes first.
    float val = -1;
    const int64_t completed = trainer_->step();
    const bool last = completed == config_.steps();
    if (last || (config_.eval_every() > 0 && completed % config_.eval_every() == 0)) {
      if (!EvaluateInEpoch(*comm, plan.epoch())) return absl::OkStatus();
      val = last_val_loss_;
    }
    if (last || completed % config_.log_every() == 0 || val >= 0) {
      std::string line = FormatProgressLine(*stats, config_.steps(), val);
      std::fprintf(options_.progress, "%s | epoch %d rank %d/%d\n", line.c_str(), plan.epoch(),
                   rank, plan.world_size());
      std::fflush(options_.progress);
    }
    if (last) PrintSummary();
    const bool checkpoint_agreed = stats->control_sum >= kCheckpointFlag;
    if (writer_ != nullptr && (last || checkpoint_agreed ||
                               (checkpoint_every_ > 0 && completed % checkpoint_every_ == 0))) {
      SaveCheckpoint(plan.epoch(), rank, plan.world_size());
    }
    if (first_step) {
      first_step = false;
      proto::WorkerMessage report;
      auto* r = report.mutable_recovery_report();
      r->set_epoch(plan.epoch());
      r->set_group_rebuilt_ms(rebuilt_ms);
      r->set_state_synced_ms(synced_ms);
      r->set_first_step_ms(MsSince(prepared));
      r->set_lost_steps(lost_steps);
      Send(report);
    }
    proto::WorkerMessage done;
    auto* d = done.mutable_step_done();
    d->set_epoch(plan.epoch());
    d->set_step(stats->step);
    d->set_loss(stats->loss);
    d->set_tokens(stats->tokens);
    d->set_step_ms(stats->step_ms);
    Send(done);
    if (stats->control_sum % kCheckpointFlag > 0) {
      // Every rank saw the same sum: all stop after this step and answer the Prepare.
      SPOTRAIN_LOG(Info, "epoch %d: all ranks agreed to switch after step %d", plan.epoch(),
                   stats->step);
      return absl::OkStatus();
    }
  }
  PrintSummary();
  return absl::OkStatus();
}

absl::Status Agent::SetUpCheckpoints() {
  const std::string& root = config_.checkpoint().dir();
  if (root.empty()) return absl::OkStatus();
  RETURN_IF_ERROR(common::MakeDirectories(root));
  RETURN_IF_ERROR(common::CheckDirectoryWritable(root));
  checkpoint_every_ = common::FixedCheckpointInterval(config_);
  if (common::AutoCheckpointInterval(config_)) {
    SPOTRAIN_LOG(Info,
                 "checkpoint.every_steps \"auto\": this worker checkpoints when the "
                 "coordinator orders it (Young/Daly interval) and at the end of the run");
  }
  // The digest is hashed on the writer thread: the training stall is then only the copy of
  // the state to host memory (measured: 11 ms against 65 ms for gpt-small), for one extra
  // copy of the state in host memory.
  CheckpointWriterOptions writer_options;
  writer_options.digest_in_background = true;
  writer_ = std::make_unique<CheckpointWriter>(
      root,
      [this](const ShardWriteResult& result) {
        proto::WorkerMessage m;
        if (result.status.ok()) {
          *m.mutable_shard_written() = ToShardWritten(result);
        } else if (absl::IsAlreadyExists(result.status)) {
          return;  // that step is already committed (a re-run after a restart)
        } else {
          SPOTRAIN_LOG(Warning, "checkpoint step %d not written: %s", result.step,
                       result.status.ToString());
          *m.mutable_shard_failed() = ToShardFailed(result);
        }
        Send(m);
      },
      writer_options);
  return absl::OkStatus();
}

void Agent::SaveCheckpoint(int64_t epoch, int rank, int world) {
  auto saved = writer_->Save(*trainer_, epoch, rank, world);
  if (!saved.ok()) {
    // The write itself is reported by the callback; this is a snapshot-side failure.
    SPOTRAIN_LOG(Warning, "checkpoint of step %d not taken: %s", trainer_->step(),
                 saved.status().ToString());
    proto::WorkerMessage m;
    m.mutable_shard_failed()->set_epoch(epoch);
    m.mutable_shard_failed()->set_step(trainer_->step());
    m.mutable_shard_failed()->set_error(std::string(saved.status().message()));
    Send(m);
  }
}

absl::Status Agent::RestoreFromCheckpoint(const proto::StateSource& source, Communicator& comm) {
  RestoreLatestOptions options;
  options.max_step = source.checkpoint_step();
  auto restored = RestoreLatestCheckpoint(config_.checkpoint().dir(), *trainer_, options);
  if (!restored.ok()) {
    return absl::Status(restored.status().code(), absl::StrCat("cannot restore a checkpoint from ",
                                                               config_.checkpoint().dir(), ": ",
                                                               restored.status().message()));
  }
  for (const std::string& skipped : restored->skipped) {
    SPOTRAIN_LOG(Warning, "checkpoint skipped: %s", skipped);
  }
  // Every rank read the same files, so they normally load the same step; check it.
  int64_t agree[2] = {restored->step, 1};
  RETURN_IF_ERROR(comm.AllReduceSum(agree, 2));
  if (agree[0] != restored->step * agree[1]) {
    return absl::DataLossError(absl::StrFormat(
        "ranks loaded different checkpoints (this rank step %d): is the checkpoint directory "
        "the same on every worker?",
        restored->step));
  }
  SPOTRAIN_LOG(Info, "restored checkpoint step %d (written by %d ranks) in %.2f s, %d bytes",
               restored->step, restored->source_world_size, restored->seconds,
               restored->bytes_read);
  return absl::OkStatus();
}

bool Agent::EvaluateInEpoch(Communicator& comm, int64_t epoch) {
  absl::StatusOr<float> evaluated = trainer_->Evaluate(comm);
  if (evaluated.ok()) {
    last_val_loss_ = *evaluated;
    last_val_step_ = trainer_->step();
    return true;
  }
  // An abort or a newer epoch interrupted it: not a failure of this epoch's group.
  if (comm.status().code() != absl::StatusCode::kAborted && !mailbox_.Interrupted(epoch)) {
    SendCollectiveFailed(epoch, evaluated.status());
  }
  return false;
}

void Agent::PrintSummary() {
  if (summary_printed_) return;
  summary_printed_ = true;
  const float val = last_val_step_ == trainer_->step() ? last_val_loss_ : -1.0f;
  std::string line = FormatSummaryLine(trainer_->step(), val, trainer_->StateDigest());
  std::fprintf(options_.progress, "%s\n", line.c_str());
  std::fflush(options_.progress);
}

absl::StatusOr<AgentResult> Agent::Run() {
  ASSIGN_OR_RETURN(client_, CoordinatorClient::Create(options_.coordinator, options_.client));
  {
    absl::MutexLock lock(&session_mu_);
    RETURN_IF_ERROR(JoinAndOpenSession(options_.join_timeout));
  }
  std::thread heartbeat([this] { HeartbeatLoop(); });
  struct JoinHeartbeat {
    Agent* agent;
    std::thread& thread;
    ~JoinHeartbeat() {
      agent->stopping_ = true;
      thread.join();
      agent->client_->CloseSession();
    }
  } join_heartbeat{this, heartbeat};
  ASSIGN_OR_RETURN(trainer_, Trainer::Create(config_, options_.trainer_device));
  SPOTRAIN_LOG(Info, "training on %s", trainer_->device_description());
  RETURN_IF_ERROR(SetUpCheckpoints());

  AgentResult result;
  int rejoins = 0;
  int64_t executed_epoch = 0;
  while (true) {
    // A leave with no session to announce it on: go now.
    if (leave_.count.load() > 0 && !mailbox_.session_alive()) {
      result.message = "left (announced) while the coordinator was unreachable";
      break;
    }
    {
      absl::MutexLock lock(&fatal_mu_);
      if (!fatal_.ok()) return fatal_;
    }
    Mailbox::Next next = mailbox_.Wait(executed_epoch, absl::Milliseconds(500));
    switch (next.event) {
      case Mailbox::Event::kNone:
        continue;
      case Mailbox::Event::kPrepare:
        SendReady(next.prepare.epoch);
        continue;
      case Mailbox::Event::kPlan:
        executed_epoch = next.plan.epoch();
        RETURN_IF_ERROR(ExecutePlan(next.plan));
        continue;
      case Mailbox::Event::kStop:
        break;
    }
    const proto::Command& stop = next.stop;
    if (stop.run_done() || leave_.count.load() > 0 || rejoins >= 3) {
      result.run_done = stop.run_done();
      result.message = stop.message();
      break;
    }
    // Removed without asking (fenced after a silent loss): come back as a newcomer.
    ++rejoins;
    SPOTRAIN_LOG(Warning, "coordinator removed this worker: %s; re-joining as a newcomer",
                 stop.message());
    RETURN_IF_ERROR(Rejoin(options_.reconnect_timeout, /*force=*/true));
  }
  result.completed_steps = holds_state_ ? held_steps_.load() : -1;
  if (result.run_done && holds_state_) {
    result.state_digest = trainer_->StateDigest();
    // A worker that received the final state in an epoch the run's end cut short (before
    // its evaluation) has printed no summary yet; the loss shows as n/a when unknown.
    if (trainer_->step() >= config_.steps()) PrintSummary();
  }
  return result;
}

}  // namespace

absl::StatusOr<AgentResult> RunAgent(const AgentOptions& options, LeaveRequest& leave) {
  Agent agent(options, leave);
  return agent.Run();
}

}  // namespace spotrain::worker
