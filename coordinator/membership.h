// The coordinator's brain: worker membership, epochs, plans, fencing, run progress and the
// checkpoint registry, as one pure state machine (DESIGN.md sections 2, 3 and 8;
// docs/protocol.md). It does no I/O, starts no threads and reads time only from the injected
// Clock: every input is a method call and every effect is returned in an Actions value that
// the caller applies in order (journal records first, then manifests, messages, stream
// closes, prunes and events). Unit tests drive it step by step with a FakeClock.
//
// Thread-safety: none. One thread (the coordinator's state thread, or a test) owns it.
#ifndef SPOTRAIN_COORDINATOR_MEMBERSHIP_H_
#define SPOTRAIN_COORDINATOR_MEMBERSHIP_H_

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "coordinator/checkpoint_policy.h"
#include "coordinator/checkpoint_registry.h"
#include "proto/config.pb.h"
#include "proto/spotrain.pb.h"

namespace spotrain::coordinator {

enum class WorkerState {
  kJoining,  // joined; not in a running plan (new, or waiting while the run is paused)
  kActive,   // member of the current plan
  kLeaving,  // member that announced its leave; removed at the next plan
  kLost,     // declared lost (fenced): every later report is refused
  kRemoved,  // left, was removed, or re-joined under a new id
};
const char* WorkerStateName(WorkerState state);

enum class RunState { kWaiting, kRunning, kPaused, kDone };
const char* RunStateName(RunState state);

// One line of events.jsonl: a membership change and, once known, its recovery timeline.
// Times are milliseconds since `detected`; -1 when unknown.
struct MembershipEvent {
  absl::Time detected;
  int64_t epoch = 0;  // epoch of the new plan; 0 when the change paused the run
  std::string cause;  // lost, left, joined, restored, collective_failed
  std::string detail;
  std::vector<uint64_t> before, after;
  bool paused = false;
  int64_t start_step = -1;
  std::string state_source;
  double prepare_sent_ms = -1, plan_sent_ms = -1, group_rebuilt_ms = -1, state_synced_ms = -1,
         first_step_ms = -1;
  int64_t lost_steps = 0;
};

// The journal's form of an open event (its group_rebuilt_ms and state_synced_ms, which only
// the workers' reports give, are not kept) and back. Pure.
proto::PendingEvent ToPendingEvent(const MembershipEvent& event);
MembershipEvent FromPendingEvent(const proto::PendingEvent& pending);

// A message for one worker. A broadcast (a Plan, a Prepare) shares one message object between
// its recipients, so that it is built and serialised once, not once per worker.
struct OutgoingMessage {
  uint64_t worker_id = 0;
  std::shared_ptr<const proto::CoordinatorMessage> message;
};

struct StreamClose {
  uint64_t worker_id = 0;
  std::string reason;
};

struct JournalEntry {
  proto::JournalRecord record;
  bool sync = true;
};

// Effects of one input, to be applied by the caller in this order: journal (write-ahead),
// commits (write the manifest, then call Membership::OnCheckpointCommitted), messages,
// closes (after the messages to that worker), prune_steps, events.
struct Actions {
  std::vector<JournalEntry> journal;
  std::vector<ReadyCheckpoint> commits;  // manifest complete (model, fingerprint, created_at)
  std::vector<OutgoingMessage> messages;
  std::vector<StreamClose> closes;
  std::vector<int64_t> prune_steps;  // committed checkpoints to delete
  std::vector<MembershipEvent> events;
  // checkpoint.every_steps "auto": interval decisions to log (events.jsonl).
  std::vector<IntervalDecision> interval_decisions;
  // Observations for metrics.
  std::vector<double> recovery_seconds;
  std::vector<double> checkpoint_commit_seconds;
  int64_t kv_drop_below_epoch = 0;  // 0: nothing to drop
  bool run_done = false;            // the run just finished: stop serving (unless asked not to)
};

struct MembershipCounters {
  int64_t joins = 0;
  int64_t losses = 0;
  int64_t leaves = 0;
  int64_t recoveries = 0;
  int64_t lost_steps = 0;
  int64_t plans = 0;
  int64_t checkpoints_committed = 0;
  int64_t checkpoint_failures = 0;
  int64_t rejected_reports = 0;
};

class Membership {
 public:
  struct WorkerInfo {
    uint64_t id = 0;
    std::string name, address, device;
    WorkerState state = WorkerState::kJoining;
    bool session_open = false;
    bool placeholder = false;  // restored from the journal, not reconnected yet
    absl::Time joined_at, last_seen, state_since;
    bool heard = false;  // a message arrived on its Session
    int64_t completed_steps = -1;
    uint64_t fingerprint = 0;
    int64_t epoch = 0;  // epoch it is active in (0: none)
    int32_t rank = -1;
    int64_t prepared_epoch = 0;  // epoch of the last Prepare it was sent
    int64_t leave_deadline_unix_ms = 0;
    std::string leave_reason;
    // Ids this process had before (JoinRequest.previous_worker_id, and theirs): its shard
    // reports of an epoch it was a member of under one of them are still its own.
    std::vector<uint64_t> previous_ids;
  };

  // `restored` is the durable state read from the state dir (an empty one for a new run;
  // run_id must be set). Members of its last plan become placeholders awaiting re-joins.
  Membership(const proto::RunConfig& config, const proto::CoordinatorState& restored,
             common::Clock* clock);

  // Registers a worker. kInvalidArgument for a malformed request, kFailedPrecondition for a
  // device of the other backend.
  absl::StatusOr<proto::JoinResponse> Join(const proto::JoinRequest& request, Actions* actions);

  // The worker's Session stream sent Hello. kFailedPrecondition: unknown, lost, removed or
  // already connected id (the caller ends the stream with that status).
  absl::Status Hello(uint64_t worker_id, Actions* actions);

  // A message after Hello. A non-OK result means the message changed nothing (the caller
  // only logs it): kAborted stale epoch, kFailedPrecondition inconsistent report or fenced
  // worker, kAlreadyExists duplicate, kInvalidArgument malformed. A Rejected message or a
  // stream close is already in `actions` when the worker must hear about it.
  absl::Status OnMessage(uint64_t worker_id, const proto::WorkerMessage& message, Actions* actions);

  // The worker's Session ended (broken connection, cancel, or half-close).
  void OnSessionClosed(uint64_t worker_id, const std::string& why, Actions* actions);

  // Time-driven work: heartbeat timeouts, preparation deadlines, join settling, event
  // finalisation. Call every few tens of milliseconds.
  void Tick(Actions* actions);

  // The caller wrote (or failed to write) the manifest of `checkpoint`.
  void OnCheckpointCommitted(const ReadyCheckpoint& checkpoint, const absl::Status& written,
                             Actions* actions);

  // Writes out the event of the current plan with whatever timeline is known (shutdown).
  void FlushEvents(Actions* actions) { FinalizeEvent(actions); }

  // kAborted for an epoch older than the current plan's, kFailedPrecondition for one that
  // was never prepared.
  absl::Status CheckKvEpoch(int64_t epoch) const;

  proto::RunStatus Status() const;

  RunState run_state() const { return run_state_; }
  const proto::Plan& plan() const { return plan_; }
  // Epoch being prepared, 0 when none.
  int64_t preparing_epoch() const { return prep_ ? prep_->epoch : 0; }
  bool preparing_immediate() const { return prep_ && prep_->immediate; }
  const WorkerInfo* worker(uint64_t id) const;
  const MembershipCounters& counters() const { return counters_; }
  // The event of the current plan while its recovery timeline is still being filled in.
  const MembershipEvent* open_event() const { return open_event_ ? &open_event_->event : nullptr; }
  const CheckpointRegistry& registry() const { return registry_; }
  // The automatic checkpoint interval; null unless checkpoint.every_steps is "auto".
  const CheckpointPolicy* checkpoint_policy() const { return policy_ ? &*policy_ : nullptr; }
  int64_t completed_steps() const { return run_completed_; }
  const std::string& run_id() const { return run_id_; }
  uint64_t fingerprint() const { return fingerprint_; }
  double tokens_per_second() const;
  double goodput() const;

 private:
  struct ReadyInfo {
    int64_t completed_steps = -1;
    uint64_t fingerprint = 0;
  };
  struct Preparation {
    int64_t epoch = 0;
    bool immediate = false;
    std::string cause, detail;
    absl::Time detected, prepare_sent, deadline;
    std::vector<uint64_t> candidates;  // rank order of the plan to come
    std::map<uint64_t, ReadyInfo> ready;
    std::vector<uint64_t> before;  // members of the running plan when it started
  };
  struct OpenEvent {
    MembershipEvent event;
    absl::Time plan_sent;
    std::map<uint64_t, proto::RecoveryReport> reports;
    absl::Time first_step_seen = absl::InfiniteFuture();
  };

  // Journals the open event (unsynced: it only has to survive a kill of the process).
  void JournalOpenEvent(Actions* actions);
  WorkerInfo* Find(uint64_t id);
  void SetState(WorkerInfo& w, WorkerState state);
  void Send(uint64_t id, proto::CoordinatorMessage message, Actions* actions);
  void Broadcast(const std::vector<uint64_t>& ids, proto::CoordinatorMessage message,
                 Actions* actions);
  void Reject(uint64_t id, absl::Status status, Actions* actions);
  void Stop(WorkerInfo& w, const std::string& message, bool run_done, Actions* actions);
  void MarkLost(WorkerInfo& w, const std::string& reason, Actions* actions);
  void Reconcile(Actions* actions);
  void StartPreparation(bool immediate, const std::string& cause, const std::string& detail,
                        absl::Time detected, Actions* actions);
  void FinishPreparation(Actions* actions);
  void Pause(Actions* actions);
  void CheckRunDone(Actions* actions);
  void FinalizeEvent(Actions* actions);
  void NoteProgress(int64_t completed_steps);
  // "auto" interval: re-evaluates it when due and orders a checkpoint when one is due.
  void EvaluateCheckpointInterval(Actions* actions);
  void MaybeOrderCheckpoint(Actions* actions);
  void Journal(proto::JournalRecord record, bool sync, Actions* actions);
  void JournalProgress(Actions* actions);
  bool IsPlanMember(uint64_t id) const;
  absl::Duration PreparationTimeout(bool immediate) const;

  absl::Status OnHeartbeat(WorkerInfo& w, const proto::Heartbeat& m, Actions* actions);
  absl::Status OnStepDone(WorkerInfo& w, const proto::StepDone& m, Actions* actions);
  absl::Status OnReady(WorkerInfo& w, const proto::Ready& m, Actions* actions);
  absl::Status OnShardWritten(WorkerInfo& w, const proto::ShardWritten& m, Actions* actions);
  absl::Status OnShardFailed(WorkerInfo& w, const proto::ShardFailed& m, Actions* actions);
  absl::Status OnLeave(WorkerInfo& w, const proto::LeaveNotice& m, Actions* actions);
  absl::Status OnCollectiveFailed(WorkerInfo& w, const proto::CollectiveFailed& m,
                                  Actions* actions);
  absl::Status OnRecoveryReport(WorkerInfo& w, const proto::RecoveryReport& m, Actions* actions);

  const proto::RunConfig config_;
  const uint64_t fingerprint_;
  const std::string run_id_;
  common::Clock* const clock_;
  const absl::Time started_;

  std::map<uint64_t, WorkerInfo> workers_;
  uint64_t next_worker_id_ = 1;
  uint64_t ids_reserved_ = 1;  // ids below this are journaled as possibly issued
  std::string backend_;

  RunState run_state_ = RunState::kWaiting;
  int64_t last_epoch_ = 0;  // highest epoch prepared or planned
  proto::Plan plan_;        // last plan sent (epoch 0: none)
  std::map<int64_t, proto::Plan> plan_history_;
  std::optional<Preparation> prep_;
  bool restoring_ = false;  // waiting for the members of the journaled plan to re-join
  std::vector<uint64_t> restored_before_;

  // A loss (or collective failure) of a running member not yet handled by a preparation.
  std::optional<absl::Time> loss_detected_;
  std::string loss_cause_, loss_detail_;
  absl::Time last_arrival_ = absl::InfinitePast();
  // Mass reclaim: checkpoint ordered before the leaves take the run below min_workers.
  bool leave_checkpoint_ordered_ = false;
  int64_t leave_checkpoint_after_ = -1;  // committed step that satisfies it
  absl::Time leave_checkpoint_deadline_ = absl::InfiniteFuture();

  int64_t run_completed_ = 0;  // highest completed-step count seen
  int64_t last_counted_step_ = -1;
  std::deque<std::pair<absl::Time, int64_t>> recent_tokens_;
  double useful_step_ms_ = 0;
  double recent_step_ms_ = 0;
  absl::Time first_plan_time_ = absl::InfiniteFuture();
  std::optional<OpenEvent> open_event_;
  std::string pause_message_;

  CheckpointRegistry registry_;
  std::optional<CheckpointPolicy> policy_;
  int64_t last_shard_step_ = -1;  // newest checkpoint step any rank reported
  // "auto": the interval last announced to the members of plan epoch announced_epoch_.
  int64_t announced_every_ = 0;
  int64_t announced_epoch_ = 0;
  MembershipCounters counters_;
};

}  // namespace spotrain::coordinator

#endif  // SPOTRAIN_COORDINATOR_MEMBERSHIP_H_
