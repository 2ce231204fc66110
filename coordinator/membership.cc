#include "coordinator/membership.h"

#include <algorithm>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/model_presets.h"
#include "common/run_config.h"
#include "coordinator/planner.h"

namespace spotrain::coordinator {
namespace {

constexpr uint64_t kWorkerIdBlock = 1024;  // ids reserved per journal record
constexpr size_t kMaxName = 256;
constexpr size_t kPlanHistory = 64;
constexpr size_t kCompactPlanMembers = 256;
constexpr absl::Duration kForgetAfter = absl::Minutes(10);
constexpr absl::Duration kTokenWindow = absl::Seconds(30);
constexpr absl::Duration kEventGrace = absl::Seconds(10);
constexpr absl::Duration kEventMaxOpen = absl::Minutes(5);

double Ms(absl::Duration d) { return absl::ToDoubleMilliseconds(d); }

bool IsHex(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
  });
}

bool IsLive(WorkerState s) {
  return s == WorkerState::kJoining || s == WorkerState::kActive || s == WorkerState::kLeaving;
}

bool IsRecoveryCause(const std::string& cause) {
  return cause == "lost" || cause == "collective_failed";
}

std::string AppendDetail(const std::string& a, const std::string& b) {
  if (a.empty()) return b;
  if (b.empty()) return a;
  // Mass losses would make one events.jsonl line huge: keep the first ones.
  if (a.size() > 1000) return absl::EndsWith(a, " ...") ? a : absl::StrCat(a, "; ...");
  return absl::StrCat(a, "; ", b);
}

}  // namespace

proto::PendingEvent ToPendingEvent(const MembershipEvent& e) {
  proto::PendingEvent p;
  p.set_detected_unix_us(absl::ToUnixMicros(e.detected));
  p.set_epoch(e.epoch);
  p.set_cause(e.cause);
  p.set_detail(e.detail);
  for (uint64_t id : e.before) p.add_before(id);
  for (uint64_t id : e.after) p.add_after(id);
  p.set_start_step(e.start_step);
  p.set_state_source(e.state_source);
  p.set_prepare_sent_ms(e.prepare_sent_ms);
  p.set_plan_sent_ms(e.plan_sent_ms);
  p.set_first_step_ms(e.first_step_ms);
  p.set_lost_steps(e.lost_steps);
  return p;
}

MembershipEvent FromPendingEvent(const proto::PendingEvent& p) {
  MembershipEvent e;
  e.detected = absl::FromUnixMicros(p.detected_unix_us());
  e.epoch = p.epoch();
  e.cause = p.cause();
  e.detail = p.detail();
  e.before.assign(p.before().begin(), p.before().end());
  e.after.assign(p.after().begin(), p.after().end());
  e.start_step = p.start_step();
  e.state_source = p.state_source();
  e.prepare_sent_ms = p.prepare_sent_ms();
  e.plan_sent_ms = p.plan_sent_ms();
  e.first_step_ms = p.first_step_ms();
  e.lost_steps = p.lost_steps();
  return e;
}

const char* WorkerStateName(WorkerState state) {
  switch (state) {
    case WorkerState::kJoining:
      return "joining";
    case WorkerState::kActive:
      return "active";
    case WorkerState::kLeaving:
      return "leaving";
    case WorkerState::kLost:
      return "lost";
    case WorkerState::kRemoved:
      return "removed";
  }
  return "unknown";
}

const char* RunStateName(RunState state) {
  switch (state) {
    case RunState::kWaiting:
      return "waiting";
    case RunState::kRunning:
      return "running";
    case RunState::kPaused:
      return "paused";
    case RunState::kDone:
      return "done";
  }
  return "unknown";
}

Membership::Membership(const proto::RunConfig& config, const proto::CoordinatorState& restored,
                       common::Clock* clock)
    : config_(config),
      fingerprint_(common::RunFingerprint(config)),
      run_id_(restored.run_id()),
      clock_(clock),
      started_(clock->Now()),
      registry_(config.checkpoint().keep()) {
  const absl::Time now = started_;
  last_epoch_ = restored.last_epoch();
  next_worker_id_ = std::max<uint64_t>(1, restored.worker_ids_reserved());
  ids_reserved_ = next_worker_id_;
  backend_ = restored.backend();
  for (int64_t step : restored.committed_steps()) registry_.RestoreCommitted(step);
  for (const proto::ShardWritten& shard : restored.pending_shards()) {
    (void)registry_.AddShard(shard, now);
    last_shard_step_ = std::max(last_shard_step_, shard.step());
  }
  if (common::AutoCheckpointInterval(config_)) {
    CheckpointPolicyOptions options;
    options.mtbl_prior_s = config_.checkpoint().mtbf_prior_s();
    options.max_every_steps = std::max<int64_t>(1, config_.steps());
    policy_.emplace(options, now);
  }
  run_completed_ = restored.progress().completed_steps();
  last_counted_step_ = run_completed_ - 1;
  counters_.recoveries = restored.progress().recoveries();
  counters_.lost_steps = restored.progress().lost_steps();
  if (restored.run_done()) {
    run_state_ = RunState::kDone;
    return;
  }
  if (restored.last_plan().epoch() > 0) {
    plan_ = restored.last_plan();
    plan_history_[plan_.epoch()] = plan_;
    // The members of the last plan are probably still training: wait for them to re-join
    // (placeholders time out after twice heartbeat_timeout_ms).
    for (const proto::Member& m : plan_.members()) {
      WorkerInfo w;
      w.id = m.worker_id();
      w.name = m.name();
      w.address = m.address();
      w.state = WorkerState::kActive;
      w.placeholder = true;
      w.joined_at = w.last_seen = w.state_since = now;
      w.epoch = plan_.epoch();
      w.rank = m.rank();
      workers_[w.id] = w;
      restored_before_.push_back(w.id);
    }
    run_state_ = RunState::kRunning;
    restoring_ = true;
    first_plan_time_ = now;
    SPOTRAIN_LOG(Info,
                 "restored run %s: epoch %d with %d members, %d steps done, last checkpoint %d; "
                 "waiting for the members to re-join",
                 run_id_, plan_.epoch(), plan_.members_size(), run_completed_,
                 registry_.LastCommitted());
  }
}

Membership::WorkerInfo* Membership::Find(uint64_t id) {
  auto it = workers_.find(id);
  return it == workers_.end() ? nullptr : &it->second;
}

const Membership::WorkerInfo* Membership::worker(uint64_t id) const {
  auto it = workers_.find(id);
  return it == workers_.end() ? nullptr : &it->second;
}

void Membership::SetState(WorkerInfo& w, WorkerState state) {
  w.state = state;
  w.state_since = clock_->Now();
  if (state == WorkerState::kJoining || state == WorkerState::kLost ||
      state == WorkerState::kRemoved) {
    w.epoch = 0;
    w.rank = -1;
  }
}

void Membership::Send(uint64_t id, proto::CoordinatorMessage message, Actions* actions) {
  actions->messages.push_back(
      {id, std::make_shared<const proto::CoordinatorMessage>(std::move(message))});
}

void Membership::Broadcast(const std::vector<uint64_t>& ids, proto::CoordinatorMessage message,
                           Actions* actions) {
  auto shared = std::make_shared<const proto::CoordinatorMessage>(std::move(message));
  for (uint64_t id : ids) actions->messages.push_back({id, shared});
}

void Membership::Reject(uint64_t id, absl::Status status, Actions* actions) {
  ++counters_.rejected_reports;
  proto::CoordinatorMessage m;
  m.mutable_rejected()->set_code(static_cast<int32_t>(status.code()));
  m.mutable_rejected()->set_message(std::string(status.message()));
  Send(id, std::move(m), actions);
}

void Membership::Stop(WorkerInfo& w, const std::string& message, bool run_done, Actions* actions) {
  if (!w.session_open) return;
  proto::CoordinatorMessage m;
  m.mutable_command()->set_stop(true);
  m.mutable_command()->set_run_done(run_done);
  m.mutable_command()->set_message(message);
  Send(w.id, std::move(m), actions);
  actions->closes.push_back({w.id, message});
  w.session_open = false;
}

void Membership::Journal(proto::JournalRecord record, bool sync, Actions* actions) {
  actions->journal.push_back({std::move(record), sync});
}

void Membership::JournalProgress(Actions* actions) {
  proto::JournalRecord r;
  r.mutable_progress()->set_recoveries(counters_.recoveries);
  r.mutable_progress()->set_lost_steps(counters_.lost_steps);
  r.mutable_progress()->set_completed_steps(run_completed_);
  Journal(std::move(r), /*sync=*/false, actions);
}

bool Membership::IsPlanMember(uint64_t id) const {
  for (const proto::Member& m : plan_.members()) {
    if (m.worker_id() == id) return true;
  }
  return false;
}

absl::Duration Membership::PreparationTimeout(bool immediate) const {
  const absl::Duration heartbeat = absl::Milliseconds(config_.heartbeat_timeout_ms());
  if (immediate) return heartbeat;
  // A planned change waits for the ranks to finish the step they are in and agree.
  return heartbeat + absl::Milliseconds(config_.op_timeout_ms()) +
         absl::Milliseconds(2 * recent_step_ms_);
}

// ---------------------------------------------------------------------------------------------
// Inputs

absl::StatusOr<proto::JoinResponse> Membership::Join(const proto::JoinRequest& request,
                                                     Actions* actions) {
  const absl::Time now = clock_->Now();
  if (request.name().size() > kMaxName || request.advertise_host().size() > kMaxName ||
      request.device().size() > kMaxName) {
    return absl::InvalidArgumentError("name, advertise_host and device must be at most 256 bytes");
  }
  const std::string backend = request.device().substr(0, request.device().find(':'));
  if (backend != "cpu" && backend != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat(
        "device \"", request.device(), "\" is neither \"cpu\" nor \"cuda:<device name>\""));
  }
  if (request.held_step() < -1 || request.held_step() > config_.steps()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("held_step %d is outside -1..%d", request.held_step(), config_.steps()));
  }
  if (!backend_.empty() && backend_ != backend) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "this run trains on %s (fixed by its first worker); a worker with device \"%s\" cannot "
        "join it",
        backend_, request.device()));
  }
  if (backend_.empty()) {
    backend_ = backend;
    proto::JournalRecord r;
    r.set_backend(backend);
    Journal(std::move(r), /*sync=*/true, actions);
  }
  const uint64_t id = next_worker_id_++;
  if (next_worker_id_ > ids_reserved_) {
    ids_reserved_ = id + kWorkerIdBlock;
    proto::JournalRecord r;
    r.set_worker_ids_reserved(ids_reserved_);
    Journal(std::move(r), /*sync=*/true, actions);
  }
  WorkerInfo& w = workers_[id];
  w.id = id;
  w.name = request.name().empty() ? absl::StrCat("w", id) : request.name();
  w.address = request.advertise_host();
  w.device = request.device();
  w.state = WorkerState::kJoining;
  w.joined_at = w.last_seen = w.state_since = now;
  if (request.held_step() >= 0 && request.held_fingerprint() == fingerprint_) {
    w.completed_steps = request.held_step();
    w.fingerprint = request.held_fingerprint();
  } else if (request.held_step() >= 0) {
    SPOTRAIN_LOG(Warning,
                 "worker %d (%s) holds state of another run (fingerprint %x); "
                 "treating it as holding none",
                 id, w.name, request.held_fingerprint());
  }
  ++counters_.joins;
  if (request.previous_worker_id() != 0 && request.previous_worker_id() != id) {
    w.previous_ids.push_back(request.previous_worker_id());
    const WorkerInfo* earlier = Find(request.previous_worker_id());
    if (earlier != nullptr) {
      for (uint64_t p : earlier->previous_ids) {
        if (w.previous_ids.size() < 16) w.previous_ids.push_back(p);
      }
    }
  }

  if (request.previous_worker_id() != 0 && request.previous_worker_id() != id) {
    WorkerInfo* previous = Find(request.previous_worker_id());
    if (previous != nullptr && IsLive(previous->state)) {
      if (restoring_ && previous->placeholder && previous->state == WorkerState::kActive &&
          request.current_epoch() == plan_.epoch()) {
        // A member of the journaled plan is back and still runs its epoch: adopt it.
        const int rank = previous->rank;
        SetState(*previous, WorkerState::kRemoved);
        previous->placeholder = false;
        w.state = WorkerState::kActive;
        w.epoch = plan_.epoch();
        w.rank = rank;
        plan_.mutable_members(rank)->set_worker_id(id);
        plan_.mutable_members(rank)->set_name(w.name);
        plan_.mutable_members(rank)->set_address(w.address);
        plan_history_[plan_.epoch()] = plan_;
        proto::JournalRecord r;
        *r.mutable_plan() = plan_;
        Journal(std::move(r), /*sync=*/true, actions);
        SPOTRAIN_LOG(Info, "worker %d re-joined as %d, rank %d of epoch %d",
                     request.previous_worker_id(), id, rank, plan_.epoch());
        bool all_back = true;
        for (const auto& [other_id, other] : workers_) {
          if (other.placeholder && IsLive(other.state)) all_back = false;
        }
        if (all_back) {
          restoring_ = false;
          MembershipEvent e;
          e.detected = started_;
          e.epoch = plan_.epoch();
          e.cause = "restored";
          e.detail = "every member re-joined after a coordinator restart";
          e.before = restored_before_;
          for (const proto::Member& m : plan_.members()) e.after.push_back(m.worker_id());
          e.start_step = run_completed_;
          e.state_source = "keep";
          actions->events.push_back(std::move(e));
          SPOTRAIN_LOG(Info, "every member of epoch %d is back; the run goes on", plan_.epoch());
        }
      } else {
        MarkLost(*previous, absl::StrCat("re-joined as worker ", id), actions);
      }
    }
  }
  SPOTRAIN_LOG(Info, "worker %d joined: %s at %s, %s, holds step %d", id, w.name, w.address,
               w.device, w.completed_steps);
  proto::JoinResponse response;
  response.set_worker_id(id);
  response.set_run_id(run_id_);
  *response.mutable_config() = config_;
  response.set_run_fingerprint(fingerprint_);
  Reconcile(actions);
  return response;
}

absl::Status Membership::Hello(uint64_t worker_id, Actions* actions) {
  WorkerInfo* w = Find(worker_id);
  if (w == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrFormat("unknown worker id %d: Join first", worker_id));
  }
  if (w->state == WorkerState::kLost || w->state == WorkerState::kRemoved) {
    return absl::FailedPreconditionError(
        absl::StrFormat("worker %d was %s; Join again for a new id", worker_id,
                        w->state == WorkerState::kLost ? "declared lost" : "removed"));
  }
  if (w->session_open) {
    return absl::FailedPreconditionError(
        absl::StrFormat("worker %d already has a Session", worker_id));
  }
  const absl::Time now = clock_->Now();
  w->session_open = true;
  w->last_seen = now;
  if (run_state_ == RunState::kDone) {
    Stop(*w, "the run is finished", /*run_done=*/true, actions);
    return absl::OkStatus();
  }
  if (w->state == WorkerState::kJoining) last_arrival_ = now;
  Reconcile(actions);
  return absl::OkStatus();
}

absl::Status Membership::OnMessage(uint64_t worker_id, const proto::WorkerMessage& message,
                                   Actions* actions) {
  WorkerInfo* w = Find(worker_id);
  if (w == nullptr || !IsLive(w->state)) {
    ++counters_.rejected_reports;
    const std::string why = w == nullptr ? absl::StrFormat("unknown worker id %d", worker_id)
                                         : absl::StrFormat("fenced: worker %d was %s; Join again",
                                                           worker_id, WorkerStateName(w->state));
    actions->closes.push_back({worker_id, why});
    if (w != nullptr) w->session_open = false;
    return absl::FailedPreconditionError(why);
  }
  w->last_seen = clock_->Now();
  w->heard = true;
  absl::Status status;
  switch (message.kind_case()) {
    case proto::WorkerMessage::kHeartbeat:
      status = OnHeartbeat(*w, message.heartbeat(), actions);
      break;
    case proto::WorkerMessage::kStepDone:
      status = OnStepDone(*w, message.step_done(), actions);
      break;
    case proto::WorkerMessage::kReady:
      status = OnReady(*w, message.ready(), actions);
      break;
    case proto::WorkerMessage::kShardWritten:
      status = OnShardWritten(*w, message.shard_written(), actions);
      break;
    case proto::WorkerMessage::kShardFailed:
      status = OnShardFailed(*w, message.shard_failed(), actions);
      break;
    case proto::WorkerMessage::kLeave:
      status = OnLeave(*w, message.leave(), actions);
      break;
    case proto::WorkerMessage::kCollectiveFailed:
      status = OnCollectiveFailed(*w, message.collective_failed(), actions);
      break;
    case proto::WorkerMessage::kRecoveryReport:
      status = OnRecoveryReport(*w, message.recovery_report(), actions);
      break;
    case proto::WorkerMessage::kHello:
      status = absl::FailedPreconditionError("Hello sent twice on one Session");
      break;
    case proto::WorkerMessage::KIND_NOT_SET:
      status = absl::InvalidArgumentError("empty WorkerMessage");
      break;
  }
  if (!status.ok()) Reject(worker_id, status, actions);
  // Heartbeats and progress reports are most of the traffic and never start or finish a
  // preparation by themselves (Reconcile is O(workers); Tick runs it anyway).
  const bool routine =
      message.has_heartbeat() || message.has_step_done() || message.has_recovery_report();
  if (!routine || loss_detected_) Reconcile(actions);
  return status;
}

absl::Status Membership::OnHeartbeat(WorkerInfo& w, const proto::Heartbeat& m, Actions*) {
  // Any heartbeat proves liveness; only one of the worker's current epoch says where it is.
  if (m.epoch() == w.epoch && m.completed_steps() >= -1 && m.completed_steps() <= config_.steps()) {
    w.completed_steps = m.completed_steps();
    if (w.state != WorkerState::kJoining && w.epoch == plan_.epoch() &&
        run_state_ == RunState::kRunning && !prep_) {
      NoteProgress(m.completed_steps());
    }
  }
  return absl::OkStatus();
}

void Membership::NoteProgress(int64_t completed_steps) {
  if (completed_steps > run_completed_) run_completed_ = completed_steps;
}

absl::Status Membership::OnStepDone(WorkerInfo& w, const proto::StepDone& m, Actions* actions) {
  if (w.state == WorkerState::kJoining || m.epoch() != w.epoch || m.epoch() != plan_.epoch()) {
    return absl::AbortedError(absl::StrFormat(
        "StepDone for epoch %d from worker %d (in epoch %d; current plan %d): stale", m.epoch(),
        w.id, w.epoch, plan_.epoch()));
  }
  if (m.step() < 0 || m.step() >= config_.steps()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("StepDone step %d is outside 0..%d", m.step(), config_.steps() - 1));
  }
  const absl::Time now = clock_->Now();
  const int64_t completed = m.step() + 1;
  w.completed_steps = completed;
  if (m.step() > last_counted_step_) {
    last_counted_step_ = m.step();
    if (m.tokens() > 0) recent_tokens_.emplace_back(now, m.tokens());
    if (m.step_ms() > 0 && m.step_ms() < 1e9) {
      useful_step_ms_ += m.step_ms();
      recent_step_ms_ = m.step_ms();
      if (policy_) policy_->OnStep(m.step_ms());
    }
  }
  if (!prep_) NoteProgress(completed);
  MaybeOrderCheckpoint(actions);
  if (open_event_ && open_event_->event.epoch == m.epoch() &&
      open_event_->first_step_seen == absl::InfiniteFuture()) {
    open_event_->first_step_seen = now;
    open_event_->event.first_step_ms = Ms(now - open_event_->event.detected);
    // Workers may send their RecoveryReport before this StepDone.
    if (static_cast<int>(open_event_->reports.size()) >= plan_.world_size()) {
      FinalizeEvent(actions);
    } else {
      JournalOpenEvent(actions);
    }
  }
  CheckRunDone(actions);
  return absl::OkStatus();
}

absl::Status Membership::OnReady(WorkerInfo& w, const proto::Ready& m, Actions* actions) {
  if (m.completed_steps() < -1 || m.completed_steps() > config_.steps()) {
    return absl::InvalidArgumentError(absl::StrFormat("Ready completed_steps %d is outside -1..%d",
                                                      m.completed_steps(), config_.steps()));
  }
  if (!prep_ || m.epoch() != prep_->epoch) {
    if (!prep_ && m.epoch() > last_epoch_ && run_state_ == RunState::kRunning &&
        w.state != WorkerState::kJoining && w.epoch == plan_.epoch()) {
      // A member stopped training for a preparation this coordinator never made (one from
      // before a restart): its group is stopping, so re-form it now.
      w.completed_steps = m.completed_steps();
      if (!loss_detected_) {
        loss_detected_ = clock_->Now();
        loss_cause_ = "collective_failed";
      }
      loss_detail_ = AppendDetail(
          loss_detail_, absl::StrFormat("worker %d stopped for unknown epoch %d", w.id, m.epoch()));
    }
    return absl::AbortedError(absl::StrFormat("Ready for epoch %d, but %s", m.epoch(),
                                              prep_ ? absl::StrCat("preparing ", prep_->epoch)
                                                    : std::string("nothing is being prepared")));
  }
  if (w.prepared_epoch != prep_->epoch) {
    return absl::FailedPreconditionError(
        absl::StrFormat("worker %d is not a candidate of epoch %d", w.id, m.epoch()));
  }
  ReadyInfo info;
  info.completed_steps = m.held_fingerprint() == fingerprint_ ? m.completed_steps() : -1;
  info.fingerprint = m.held_fingerprint();
  if (m.completed_steps() >= 0 && m.held_fingerprint() != fingerprint_) {
    SPOTRAIN_LOG(Warning, "worker %d is ready holding state of another run; ignoring it", w.id);
  }
  prep_->ready[w.id] = info;
  w.completed_steps = info.completed_steps;
  (void)actions;
  return absl::OkStatus();
}

absl::Status Membership::OnShardWritten(WorkerInfo& w, const proto::ShardWritten& m,
                                        Actions* actions) {
  if (config_.checkpoint().dir().empty()) {
    return absl::FailedPreconditionError("this run has no checkpoint.dir");
  }
  if (m.step() < 0 || m.step() > config_.steps() || m.world_size() < 1 || m.rank() < 0 ||
      m.rank() >= m.world_size() || m.offset() < 0 || m.length() < 0 || m.state_floats() <= 0 ||
      m.file() != ShardFileName(m.rank(), m.world_size()) || m.checksum().empty() ||
      m.checksum().size() > 64 || !IsHex(m.checksum()) || m.state_digest().size() != 64 ||
      !IsHex(m.state_digest())) {
    return absl::InvalidArgumentError(
        absl::StrFormat("malformed ShardWritten (step %d, rank %d of %d, file \"%s\")", m.step(),
                        m.rank(), m.world_size(), m.file().substr(0, 64)));
  }
  auto plan = plan_history_.find(m.epoch());
  if (plan == plan_history_.end()) {
    return absl::FailedPreconditionError(
        absl::StrFormat("ShardWritten for unknown or too old epoch %d", m.epoch()));
  }
  const uint64_t writer =
      plan->second.world_size() == m.world_size() ? plan->second.members(m.rank()).worker_id() : 0;
  // A worker that re-joined (coordinator restart, fenced) reports shards it wrote under its
  // previous id: still its own (the registry checks them against the other ranks').
  const bool own =
      writer == w.id || (writer != 0 && std::find(w.previous_ids.begin(), w.previous_ids.end(),
                                                  writer) != w.previous_ids.end());
  if (!own) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "worker %d is not rank %d of %d in epoch %d", w.id, m.rank(), m.world_size(), m.epoch()));
  }
  auto added = registry_.AddShard(m, clock_->Now());
  if (!added.ok()) {
    if (absl::IsDataLoss(added.status())) {
      ++counters_.checkpoint_failures;
      SPOTRAIN_LOG(Error, "%s", std::string(added.status().message()));
      proto::JournalRecord r;
      r.set_checkpoint_dropped(m.step());
      Journal(std::move(r), /*sync=*/false, actions);
    }
    return added.status();
  }
  proto::JournalRecord r;
  *r.mutable_shard_written() = m;
  Journal(std::move(r), /*sync=*/false, actions);
  last_shard_step_ = std::max(last_shard_step_, m.step());
  if (policy_) {
    policy_->OnShardReport(m.step(), m.snapshot_ms(), m.write_ms());
    if (added->has_value()) policy_->OnCheckpointComplete(m.step());
  }
  if (added->has_value()) {
    ReadyCheckpoint ready = std::move(**added);
    auto model = common::ModelConfigForPreset(config_.model());
    if (model.ok()) *ready.manifest.mutable_model() = *model;
    ready.manifest.set_run_fingerprint(fingerprint_);
    ready.manifest.set_created_at(
        absl::FormatTime(absl::RFC3339_sec, clock_->Now(), absl::UTCTimeZone()));
    actions->commits.push_back(std::move(ready));
  }
  return absl::OkStatus();
}

absl::Status Membership::OnShardFailed(WorkerInfo& w, const proto::ShardFailed& m,
                                       Actions* actions) {
  if (plan_history_.find(m.epoch()) == plan_history_.end()) {
    return absl::FailedPreconditionError(
        absl::StrFormat("ShardFailed for unknown epoch %d", m.epoch()));
  }
  if (registry_.IsCommitted(m.step())) {
    return absl::AlreadyExistsError(
        absl::StrFormat("checkpoint step %d is already committed", m.step()));
  }
  registry_.MarkFailed(m.step(), m.epoch(),
                       absl::StrFormat("worker %d: %s", w.id, m.error().substr(0, 512)));
  if (policy_) policy_->OnCheckpointFailed(m.step());
  ++counters_.checkpoint_failures;
  SPOTRAIN_LOG(Error, "%s", registry_.failure_message());
  proto::JournalRecord r;
  r.set_checkpoint_dropped(m.step());
  Journal(std::move(r), /*sync=*/false, actions);
  return absl::OkStatus();
}

absl::Status Membership::OnLeave(WorkerInfo& w, const proto::LeaveNotice& m, Actions* actions) {
  w.leave_reason = m.reason().substr(0, 256);
  w.leave_deadline_unix_ms = m.deadline_unix_ms();
  if (w.state == WorkerState::kLeaving) return absl::OkStatus();
  ++counters_.leaves;
  SPOTRAIN_LOG(Info, "worker %d (%s) announced its leave: %s", w.id, w.name, w.leave_reason);
  if (w.state == WorkerState::kJoining) {
    if (prep_) {
      auto& c = prep_->candidates;
      c.erase(std::remove(c.begin(), c.end(), w.id), c.end());
      prep_->ready.erase(w.id);
    }
    Stop(w, absl::StrCat("removed: left (", w.leave_reason, ")"), false, actions);
    SetState(w, WorkerState::kRemoved);
    return absl::OkStatus();
  }
  SetState(w, WorkerState::kLeaving);
  return absl::OkStatus();
}

absl::Status Membership::OnCollectiveFailed(WorkerInfo& w, const proto::CollectiveFailed& m,
                                            Actions*) {
  if (w.state == WorkerState::kJoining || m.epoch() != w.epoch || m.epoch() != plan_.epoch()) {
    return absl::AbortedError(absl::StrFormat("CollectiveFailed for epoch %d; current plan %d",
                                              m.epoch(), plan_.epoch()));
  }
  if (m.completed_steps() >= -1 && m.completed_steps() <= config_.steps()) {
    w.completed_steps = m.completed_steps();
  }
  SPOTRAIN_LOG(Warning, "worker %d: collective of epoch %d failed at step %d: %s", w.id, m.epoch(),
               m.step(), m.error().substr(0, 512));
  if (prep_ && prep_->immediate) return absl::OkStatus();  // already re-forming the group
  if (!loss_detected_) {
    loss_detected_ = clock_->Now();
    loss_cause_ = "collective_failed";
  }
  loss_detail_ = AppendDetail(loss_detail_, absl::StrFormat("worker %d: collective failed: %s",
                                                            w.id, m.error().substr(0, 200)));
  return absl::OkStatus();
}

absl::Status Membership::OnRecoveryReport(WorkerInfo& w, const proto::RecoveryReport& m,
                                          Actions* actions) {
  if (!open_event_ || open_event_->event.epoch != m.epoch()) {
    // Late or for a finalised event: harmless.
    return absl::OkStatus();
  }
  if (w.epoch != m.epoch()) {
    return absl::AbortedError(
        absl::StrFormat("RecoveryReport for epoch %d from a worker in %d", m.epoch(), w.epoch));
  }
  open_event_->reports[w.id] = m;
  if (static_cast<int>(open_event_->reports.size()) >= plan_.world_size() &&
      open_event_->first_step_seen != absl::InfiniteFuture()) {
    FinalizeEvent(actions);
  }
  return absl::OkStatus();
}

void Membership::OnSessionClosed(uint64_t worker_id, const std::string& why, Actions* actions) {
  WorkerInfo* w = Find(worker_id);
  if (w == nullptr) return;
  const bool was_open = w->session_open;
  w->session_open = false;
  if (was_open && IsLive(w->state)) {
    MarkLost(*w, absl::StrCat("session closed: ", why), actions);
    Reconcile(actions);
  }
}

void Membership::MarkLost(WorkerInfo& w, const std::string& reason, Actions* actions) {
  const WorkerState previous = w.state;
  const bool was_member = (previous == WorkerState::kActive || previous == WorkerState::kLeaving) &&
                          w.epoch == plan_.epoch() && run_state_ == RunState::kRunning;
  const int64_t epoch = w.epoch;
  ++counters_.losses;
  if (was_member && policy_) policy_->OnLoss(clock_->Now());
  SPOTRAIN_LOG(Warning, "worker %d (%s, %s in epoch %d) lost: %s", w.id, w.name,
               WorkerStateName(previous), epoch, reason);
  Stop(w,
       absl::StrFormat("fenced: declared lost in epoch %d (%s); Join again", plan_.epoch(), reason),
       false, actions);
  SetState(w, WorkerState::kLost);
  w.placeholder = false;
  const std::string detail = absl::StrFormat("worker %d %s", w.id, reason);
  if (prep_) {
    auto& c = prep_->candidates;
    const bool was_candidate = std::find(c.begin(), c.end(), w.id) != c.end();
    c.erase(std::remove(c.begin(), c.end(), w.id), c.end());
    prep_->ready.erase(w.id);
    if (was_member && !prep_->immediate) {
      // The running group is broken: the planned change must become an immediate one.
      if (!loss_detected_) {
        loss_detected_ = clock_->Now();
        loss_cause_ = "lost";
      }
      loss_detail_ = AppendDetail(loss_detail_, detail);
    } else if (was_candidate || was_member) {
      prep_->detail = AppendDetail(prep_->detail, detail);
    }
    return;
  }
  if (was_member) {
    if (!loss_detected_) {
      loss_detected_ = clock_->Now();
      loss_cause_ = "lost";
    } else {
      loss_cause_ = "lost";
    }
    loss_detail_ = AppendDetail(loss_detail_, detail);
  }
}

void Membership::Tick(Actions* actions) {
  const absl::Time now = clock_->Now();
  const absl::Duration timeout = absl::Milliseconds(config_.heartbeat_timeout_ms());
  std::vector<uint64_t> forget;
  for (auto& [id, w] : workers_) {
    // Members of the journaled plan get twice as long: they must notice the restart first.
    if (IsLive(w.state) && now - w.last_seen > (w.placeholder ? 2 * timeout : timeout)) {
      std::string reason;
      if (w.placeholder) {
        reason = "did not re-join after the coordinator restart";
      } else if (!w.session_open) {
        reason = "opened no Session after Join";
      } else {
        reason =
            absl::StrFormat("no heartbeat for %d ms", absl::ToInt64Milliseconds(now - w.last_seen));
      }
      MarkLost(w, reason, actions);
    } else if (!IsLive(w.state) && now - w.state_since > kForgetAfter) {
      forget.push_back(id);
    }
  }
  for (uint64_t id : forget) workers_.erase(id);
  if (prep_ && now >= prep_->deadline) {
    std::vector<uint64_t> silent;
    for (uint64_t id : prep_->candidates) {
      if (!prep_->ready.count(id)) silent.push_back(id);
    }
    const int64_t epoch = prep_->epoch;
    for (uint64_t id : silent) {
      WorkerInfo* w = Find(id);
      if (w != nullptr && IsLive(w->state)) {
        MarkLost(*w, absl::StrFormat("sent no Ready for epoch %d in time", epoch), actions);
      }
    }
    if (prep_ && prep_->epoch == epoch && silent.empty()) prep_->deadline = absl::InfiniteFuture();
  }
  if (open_event_) {
    const bool stepped = open_event_->first_step_seen != absl::InfiniteFuture();
    if ((stepped && now - open_event_->first_step_seen >= kEventGrace) ||
        now - open_event_->plan_sent >= kEventMaxOpen) {
      FinalizeEvent(actions);
    }
  }
  while (!recent_tokens_.empty() && now - recent_tokens_.front().first > kTokenWindow) {
    recent_tokens_.pop_front();
  }
  EvaluateCheckpointInterval(actions);
  Reconcile(actions);
}

void Membership::EvaluateCheckpointInterval(Actions* actions) {
  if (!policy_ || run_state_ == RunState::kDone) return;
  const absl::Time now = clock_->Now();
  policy_->Observe(now, run_state_ == RunState::kRunning);
  std::optional<IntervalDecision> d = policy_->Evaluate(now);
  if (d) {
    SPOTRAIN_LOG(Info,
                 "checkpoint interval (%s): every %d steps; C %.4f s (snapshot stall), write "
                 "%.4f s, M %.1f s = (prior %.0f s x %g + observed %.1f s) / (%g + %d losses), "
                 "step %.2f ms; Young %.2f s, Daly %.2f s, interval %.2f s, bound %s",
                 d->reason, d->every_steps, d->cost_s, d->write_s, d->mtbl_s, d->mtbl_prior_s,
                 d->prior_weight, d->observed_s, d->prior_weight, d->losses, d->step_ms, d->young_s,
                 d->daly_s, d->interval_s, d->bound);
    actions->interval_decisions.push_back(std::move(*d));
  }
  MaybeOrderCheckpoint(actions);
}

void Membership::MaybeOrderCheckpoint(Actions* actions) {
  if (!policy_ || run_state_ != RunState::kRunning || prep_ || restoring_) return;
  if (policy_->every_steps() != announced_every_ || plan_.epoch() != announced_epoch_) {
    // Every member learns the interval, to go on checkpointing through a coordinator outage.
    std::vector<uint64_t> ids;
    for (const proto::Member& m : plan_.members()) {
      const WorkerInfo* w = worker(m.worker_id());
      if (w != nullptr && w->session_open) ids.push_back(w->id);
    }
    proto::CoordinatorMessage msg;
    msg.mutable_command()->set_checkpoint_every_steps(policy_->every_steps());
    Broadcast(ids, std::move(msg), actions);
    announced_every_ = policy_->every_steps();
    announced_epoch_ = plan_.epoch();
  }
  if (run_completed_ >= config_.steps()) return;  // the final checkpoint comes anyway
  const int64_t last = std::max(registry_.LastCommitted(), last_shard_step_);
  if (!policy_->ShouldOrder(run_completed_, last)) return;
  // The flag is summed in-band with the next step's gradients, so one rank is enough (every
  // rank told would make each of them start one checkpoint).
  for (const proto::Member& m : plan_.members()) {
    const WorkerInfo* w = worker(m.worker_id());
    if (w == nullptr || !w->session_open || w->state != WorkerState::kActive) continue;
    proto::CoordinatorMessage msg;
    msg.mutable_command()->set_checkpoint_now(true);
    msg.mutable_command()->set_message(
        absl::StrFormat("periodic checkpoint (every %d steps)", policy_->every_steps()));
    Send(w->id, std::move(msg), actions);
    policy_->OnOrdered(run_completed_);
    SPOTRAIN_LOG(Info, "ordered a checkpoint at step %d (every %d steps, last %d) from worker %d",
                 run_completed_, policy_->every_steps(), last, w->id);
    return;
  }
}

void Membership::OnCheckpointCommitted(const ReadyCheckpoint& checkpoint,
                                       const absl::Status& written, Actions* actions) {
  if (!written.ok()) {
    registry_.MarkFailed(checkpoint.step, checkpoint.epoch,
                         absl::StrCat("writing the manifest failed: ", written.message()));
    ++counters_.checkpoint_failures;
    SPOTRAIN_LOG(Error, "%s", registry_.failure_message());
    proto::JournalRecord r;
    r.set_checkpoint_dropped(checkpoint.step);
    Journal(std::move(r), /*sync=*/false, actions);
    return;
  }
  std::vector<int64_t> prune = registry_.MarkCommitted(checkpoint.step);
  ++counters_.checkpoints_committed;
  proto::JournalRecord r;
  r.set_checkpoint_committed(checkpoint.step);
  Journal(std::move(r), /*sync=*/true, actions);
  JournalProgress(actions);
  for (int64_t step : prune) {
    proto::JournalRecord d;
    d.set_checkpoint_dropped(step);
    Journal(std::move(d), /*sync=*/false, actions);
    actions->prune_steps.push_back(step);
  }
  actions->checkpoint_commit_seconds.push_back(
      absl::ToDoubleSeconds(clock_->Now() - checkpoint.first_report));
  SPOTRAIN_LOG(Info, "checkpoint step %d committed (%d shards)", checkpoint.step,
               checkpoint.manifest.world_size());
  CheckRunDone(actions);
  Reconcile(actions);
}

// ---------------------------------------------------------------------------------------------
// Decisions

void Membership::Reconcile(Actions* actions) {
  if (run_state_ == RunState::kDone) return;
  const absl::Time now = clock_->Now();
  if (prep_) {
    if (loss_detected_ && !prep_->immediate) {
      const std::string detail =
          AppendDetail(loss_detail_, absl::StrCat("during a planned change (", prep_->cause, ")"));
      const absl::Time detected = *loss_detected_;
      const std::string cause = loss_cause_;
      loss_detected_.reset();
      loss_detail_.clear();
      StartPreparation(/*immediate=*/true, cause, detail, detected, actions);
    } else if (loss_detected_) {
      prep_->detail = AppendDetail(prep_->detail, loss_detail_);
      loss_detected_.reset();
      loss_detail_.clear();
    }
    if (prep_ && prep_->ready.size() == prep_->candidates.size()) FinishPreparation(actions);
    return;
  }
  const absl::Duration settle = absl::Milliseconds(config_.join_settle_ms());
  if (run_state_ == RunState::kRunning) {
    if (loss_detected_) {
      const absl::Time detected = *loss_detected_;
      const std::string cause = loss_cause_, detail = loss_detail_;
      loss_detected_.reset();
      loss_detail_.clear();
      StartPreparation(/*immediate=*/true, cause, detail, detected, actions);
      return;
    }
    if (restoring_) return;  // the members of the journaled plan are still re-joining
    int staying = 0, joiners = 0;
    std::vector<const WorkerInfo*> leavers;
    for (const auto& [id, w] : workers_) {
      if (w.state == WorkerState::kLeaving) leavers.push_back(&w);
      if (w.state == WorkerState::kActive) ++staying;
      if (w.state == WorkerState::kJoining && w.session_open) ++joiners;
    }
    if (!leavers.empty()) {
      const int after = std::min(staying + joiners, config_.max_workers());
      if (after < config_.min_workers() && !config_.checkpoint().dir().empty() &&
          registry_.LastCommitted() < run_completed_) {
        if (!leave_checkpoint_ordered_) {
          // A mass reclaim: save the state while the leavers are still here.
          leave_checkpoint_ordered_ = true;
          leave_checkpoint_after_ = run_completed_;
          absl::Time deadline = now + PreparationTimeout(false);
          for (const WorkerInfo* l : leavers) {
            if (l->leave_deadline_unix_ms > 0) {
              deadline = std::min(deadline, absl::FromUnixMillis(l->leave_deadline_unix_ms) -
                                                absl::Milliseconds(config_.heartbeat_timeout_ms()));
            }
          }
          leave_checkpoint_deadline_ = deadline;
          SPOTRAIN_LOG(Warning,
                       "announced leaves take the run below min_workers %d: ordering a "
                       "checkpoint first",
                       config_.min_workers());
          std::vector<uint64_t> ids;
          for (const proto::Member& m : plan_.members()) ids.push_back(m.worker_id());
          proto::CoordinatorMessage msg;
          msg.mutable_command()->set_checkpoint_now(true);
          msg.mutable_command()->set_message("checkpoint before a mass leave");
          Broadcast(ids, std::move(msg), actions);
        }
        if (registry_.LastCommitted() < leave_checkpoint_after_ &&
            now < leave_checkpoint_deadline_) {
          return;  // wait for the checkpoint (or the deadline)
        }
      }
      leave_checkpoint_ordered_ = false;
      std::vector<std::string> names;
      absl::Time detected = now;
      for (const WorkerInfo* l : leavers) {
        names.push_back(absl::StrFormat("worker %d (%s)", l->id, l->leave_reason));
        detected = std::min(detected, l->state_since);
      }
      StartPreparation(/*immediate=*/false, "left",
                       absl::StrCat("announced leave: ", absl::StrJoin(names, ", ")), detected,
                       actions);
      return;
    }
    if (joiners > 0 && plan_.world_size() < config_.max_workers() &&
        now - last_arrival_ >= settle) {
      StartPreparation(/*immediate=*/false, "joined",
                       absl::StrFormat("%d worker(s) joined", joiners), last_arrival_, actions);
    }
    return;
  }
  // Waiting or paused: nothing runs.
  int present = 0;
  for (const auto& [id, w] : workers_) {
    if (w.state == WorkerState::kJoining && w.session_open) ++present;
  }
  if (present >= config_.min_workers() && now - last_arrival_ >= settle) {
    StartPreparation(/*immediate=*/true, "joined", absl::StrFormat("%d worker(s) present", present),
                     last_arrival_, actions);
  } else if (present < config_.min_workers()) {
    pause_message_ = absl::StrFormat("%s: %d worker(s) present, min_workers is %d",
                                     run_state_ == RunState::kPaused ? "paused" : "waiting",
                                     present, config_.min_workers());
  }
}

void Membership::StartPreparation(bool immediate, const std::string& cause,
                                  const std::string& detail, absl::Time detected,
                                  Actions* actions) {
  const absl::Time now = clock_->Now();
  std::string full_detail = detail;
  std::vector<uint64_t> before;
  if (run_state_ == RunState::kRunning) {
    for (const proto::Member& m : plan_.members()) before.push_back(m.worker_id());
  }
  if (prep_) {
    // Superseded: the candidates of the old preparation are reconsidered below.
    full_detail = AppendDetail(prep_->detail, full_detail);
    if (!prep_->before.empty()) before = prep_->before;
    prep_.reset();
  }
  // Members that cannot be reached cannot take part.
  if (run_state_ == RunState::kRunning) {
    for (const proto::Member& m : plan_.members()) {
      WorkerInfo* w = Find(m.worker_id());
      if (w != nullptr && (w->state == WorkerState::kActive || w->state == WorkerState::kLeaving) &&
          !w->session_open) {
        MarkLost(*w,
                 w->placeholder ? "did not re-join after the coordinator restart"
                                : "has no open Session",
                 actions);
      }
    }
    if (loss_detected_) {
      immediate = true;
      full_detail = AppendDetail(full_detail, loss_detail_);
      loss_detected_.reset();
      loss_detail_.clear();
    }
  }
  restoring_ = false;
  leave_checkpoint_ordered_ = false;
  std::vector<uint64_t> candidates;
  std::set<uint64_t> taken;
  int staying = 0;
  auto consider = [&](WorkerInfo& w) {
    if (taken.count(w.id) || !w.session_open || !IsLive(w.state)) return;
    if (w.state == WorkerState::kLeaving) {
      if (immediate) {
        Stop(w, absl::StrCat("removed: left (", w.leave_reason, ")"), false, actions);
        SetState(w, WorkerState::kRemoved);
        return;
      }
    } else {
      if (staying >= config_.max_workers()) return;
      ++staying;
    }
    taken.insert(w.id);
    candidates.push_back(w.id);
  };
  for (const proto::Member& m : plan_.members()) {
    WorkerInfo* w = Find(m.worker_id());
    if (w != nullptr) consider(*w);
  }
  for (auto& [id, w] : workers_) consider(w);

  FinalizeEvent(actions);
  const int64_t epoch = ++last_epoch_;
  proto::JournalRecord r;
  r.set_epoch_prepared(epoch);
  Journal(std::move(r), /*sync=*/true, actions);
  Preparation p;
  p.epoch = epoch;
  p.immediate = immediate;
  p.cause = cause;
  p.detail = full_detail;
  p.detected = detected;
  p.prepare_sent = now;
  p.deadline = now + PreparationTimeout(immediate);
  p.candidates = candidates;
  p.before = before;
  prep_ = std::move(p);
  SPOTRAIN_LOG(Info, "preparing epoch %d (%s, %s): %d candidate(s)%s", epoch, cause,
               immediate ? "immediate" : "at the next agreed step", candidates.size(),
               full_detail.empty() ? "" : absl::StrCat("; ", full_detail));
  for (uint64_t id : candidates) Find(id)->prepared_epoch = epoch;
  proto::CoordinatorMessage prepare;
  prepare.mutable_prepare()->set_epoch(epoch);
  prepare.mutable_prepare()->set_immediate(immediate);
  Broadcast(candidates, std::move(prepare), actions);
  if (prep_->ready.size() == prep_->candidates.size()) FinishPreparation(actions);
}

void Membership::FinishPreparation(Actions* actions) {
  const absl::Time now = clock_->Now();
  Preparation p = std::move(*prep_);
  prep_.reset();
  std::vector<WorkerInfo*> members, leavers;
  for (uint64_t id : p.candidates) {
    WorkerInfo* w = Find(id);
    if (w == nullptr || !IsLive(w->state)) continue;
    (w->state == WorkerState::kLeaving ? leavers : members).push_back(w);
  }
  for (WorkerInfo* l : leavers) {
    Stop(*l, absl::StrCat("removed at the agreed step boundary: left (", l->leave_reason, ")"),
         false, actions);
    SetState(*l, WorkerState::kRemoved);
  }
  MembershipEvent e;
  e.detected = p.detected;
  e.cause = p.cause;
  e.detail = p.detail;
  e.before = p.before;
  e.prepare_sent_ms = Ms(p.prepare_sent - p.detected);
  if (static_cast<int>(members.size()) < config_.min_workers() || members.empty()) {
    // Not enough workers: everyone present waits, holding its state.
    for (WorkerInfo* w : members) {
      auto ready = p.ready.find(w->id);
      if (ready != p.ready.end()) w->completed_steps = ready->second.completed_steps;
      SetState(*w, WorkerState::kJoining);
    }
    run_state_ = plan_.epoch() > 0 ? RunState::kPaused : RunState::kWaiting;
    pause_message_ =
        absl::StrFormat("%s: %d worker(s) present, min_workers is %d", RunStateName(run_state_),
                        members.size(), config_.min_workers());
    SPOTRAIN_LOG(Warning, "epoch %d not started: %s", p.epoch, pause_message_);
    e.paused = true;
    for (WorkerInfo* w : members) e.after.push_back(w->id);
    if (!e.before.empty() || IsRecoveryCause(p.cause) || p.cause == "left") {
      actions->events.push_back(std::move(e));
    }
    return;
  }
  std::vector<HeldState> held;
  for (WorkerInfo* w : members) {
    auto ready = p.ready.find(w->id);
    held.push_back({w->id, ready == p.ready.end() ? -1 : ready->second.completed_steps});
  }
  const StateDecision decision =
      DecideStateSource(held, registry_.LastCommitted(), config_.checkpoint().dir());
  proto::Plan plan;
  plan.set_epoch(p.epoch);
  plan.set_world_size(static_cast<int32_t>(members.size()));
  plan.set_start_step(decision.start_step);
  *plan.mutable_state_source() = decision.source;
  plan.set_run_fingerprint(fingerprint_);
  {
    std::vector<uint64_t> ids;
    for (WorkerInfo* w : members) ids.push_back(w->id);
    DecideShrink(plan_, ids, decision, &plan);
  }
  // Every member gets the whole Plan, so its size is paid world_size times: large groups get
  // ids and ranks only (names and addresses are informational; status has them).
  const bool compact = members.size() > kCompactPlanMembers;
  for (size_t rank = 0; rank < members.size(); ++rank) {
    proto::Member* m = plan.add_members();
    m->set_worker_id(members[rank]->id);
    if (!compact) {
      m->set_name(members[rank]->name);
      m->set_address(members[rank]->address);
    }
    m->set_rank(static_cast<int32_t>(rank));
  }
  const int64_t lost = std::max<int64_t>(0, run_completed_ - decision.start_step);
  run_completed_ = decision.start_step;
  if (policy_) policy_->OnPlan(decision.start_step);
  // A restore may go back before the newest reported shards: count the interval from there.
  last_shard_step_ = std::min(last_shard_step_, decision.start_step);
  if (IsRecoveryCause(p.cause)) ++counters_.recoveries;
  counters_.lost_steps += lost;
  ++counters_.plans;
  proto::JournalRecord r;
  *r.mutable_plan() = plan;
  Journal(std::move(r), /*sync=*/true, actions);
  JournalProgress(actions);
  for (size_t rank = 0; rank < members.size(); ++rank) {
    WorkerInfo* w = members[rank];
    SetState(*w, WorkerState::kActive);
    w->epoch = p.epoch;
    w->rank = static_cast<int32_t>(rank);
    w->completed_steps = decision.start_step;
  }
  {
    std::vector<uint64_t> ids;
    for (WorkerInfo* w : members) ids.push_back(w->id);
    proto::CoordinatorMessage m;
    *m.mutable_plan() = plan;
    Broadcast(ids, std::move(m), actions);
  }
  plan_ = plan;
  plan_history_[plan.epoch()] = plan;
  while (plan_history_.size() > kPlanHistory) plan_history_.erase(plan_history_.begin());
  run_state_ = RunState::kRunning;
  first_plan_time_ = std::min(first_plan_time_, now);
  pause_message_.clear();
  actions->kv_drop_below_epoch = p.epoch - 1;
  SPOTRAIN_LOG(Info, "epoch %d: %d member(s), start step %d, state %s (%s)", p.epoch,
               members.size(), decision.start_step, DescribeSource(decision.source), p.cause);
  e.epoch = p.epoch;
  for (WorkerInfo* w : members) e.after.push_back(w->id);
  e.start_step = decision.start_step;
  e.state_source = DescribeSource(decision.source);
  e.plan_sent_ms = Ms(now - p.detected);
  e.lost_steps = lost;
  OpenEvent open;
  open.event = std::move(e);
  open.plan_sent = now;
  open_event_ = std::move(open);
  JournalOpenEvent(actions);
  CheckRunDone(actions);
}

void Membership::JournalOpenEvent(Actions* actions) {
  proto::JournalRecord r;
  *r.mutable_event_opened() = ToPendingEvent(open_event_->event);
  Journal(std::move(r), /*sync=*/false, actions);
}

void Membership::FinalizeEvent(Actions* actions) {
  if (!open_event_) return;
  MembershipEvent e = std::move(open_event_->event);
  const auto reports = std::move(open_event_->reports);
  open_event_.reset();
  double rebuilt = -1, synced = -1, first = -1;
  int64_t worker_lost = 0;
  for (const auto& [id, r] : reports) {
    if (r.group_rebuilt_ms() >= 0)
      rebuilt = std::max(rebuilt, e.prepare_sent_ms + r.group_rebuilt_ms());
    if (r.state_synced_ms() >= 0)
      synced = std::max(synced, e.prepare_sent_ms + r.state_synced_ms());
    if (r.first_step_ms() >= 0) first = std::max(first, e.prepare_sent_ms + r.first_step_ms());
    worker_lost = std::max(worker_lost, r.lost_steps());
  }
  e.group_rebuilt_ms = rebuilt;
  e.state_synced_ms = synced;
  if (first >= 0) e.first_step_ms = std::max(e.first_step_ms, first);
  if (worker_lost > e.lost_steps) {
    counters_.lost_steps += worker_lost - e.lost_steps;
    e.lost_steps = worker_lost;
  }
  if (IsRecoveryCause(e.cause) && e.first_step_ms >= 0) {
    actions->recovery_seconds.push_back(e.first_step_ms / 1000.0);
  }
  actions->events.push_back(std::move(e));
}

void Membership::CheckRunDone(Actions* actions) {
  if (run_state_ == RunState::kDone || run_completed_ < config_.steps()) return;
  if (!config_.checkpoint().dir().empty() && !registry_.IsCommitted(config_.steps())) return;
  run_state_ = RunState::kDone;
  prep_.reset();
  proto::JournalRecord r;
  r.set_run_done(true);
  JournalProgress(actions);
  Journal(std::move(r), /*sync=*/true, actions);
  FinalizeEvent(actions);
  for (auto& [id, w] : workers_) {
    if (IsLive(w.state)) Stop(w, "the run is finished", /*run_done=*/true, actions);
  }
  actions->run_done = true;
  SPOTRAIN_LOG(Info, "run %s finished: %d steps", run_id_, config_.steps());
}

// ---------------------------------------------------------------------------------------------
// Queries

absl::Status Membership::CheckKvEpoch(int64_t epoch) const {
  if (epoch < 1) return absl::InvalidArgumentError("KV epoch must be at least 1");
  if (epoch > last_epoch_) {
    return absl::FailedPreconditionError(
        absl::StrFormat("KV epoch %d was never prepared (last is %d)", epoch, last_epoch_));
  }
  if (epoch < plan_.epoch()) {
    return absl::AbortedError(
        absl::StrFormat("KV epoch %d is over (current plan: epoch %d)", epoch, plan_.epoch()));
  }
  return absl::OkStatus();
}

double Membership::tokens_per_second() const {
  if (recent_tokens_.size() < 2) return 0;
  const absl::Time now = clock_->Now();
  if (now - recent_tokens_.back().first > kTokenWindow) return 0;
  int64_t tokens = 0;
  for (size_t i = 1; i < recent_tokens_.size(); ++i) tokens += recent_tokens_[i].second;
  const double seconds =
      absl::ToDoubleSeconds(recent_tokens_.back().first - recent_tokens_.front().first);
  return seconds > 0 ? tokens / seconds : 0;
}

double Membership::goodput() const {
  const absl::Time now = clock_->Now();
  if (first_plan_time_ >= now) return 0;
  const double wall_ms = Ms(now - first_plan_time_);
  return wall_ms > 0 ? std::min(1.0, useful_step_ms_ / wall_ms) : 0;
}

proto::RunStatus Membership::Status() const {
  const absl::Time now = clock_->Now();
  proto::RunStatus s;
  s.set_state(RunStateName(run_state_));
  s.set_epoch(plan_.epoch());
  s.set_step(run_completed_);
  s.set_world_size(run_state_ == RunState::kRunning ? plan_.world_size() : 0);
  s.set_last_checkpoint_step(registry_.LastCommitted());
  s.set_recoveries(counters_.recoveries);
  s.set_lost_steps(counters_.lost_steps);
  s.set_tokens_per_s(tokens_per_second());
  s.set_run_id(run_id_);
  s.set_total_steps(config_.steps());
  s.set_preparing_epoch(prep_ ? prep_->epoch : 0);
  s.set_min_workers(config_.min_workers());
  s.set_max_workers(config_.max_workers());
  s.set_goodput(goodput());
  s.set_checkpoint_error(registry_.failure_message());
  s.set_checkpoint_failures(counters_.checkpoint_failures);
  s.set_checkpoint_interval_auto(policy_.has_value());
  s.set_checkpoint_every_steps(policy_ ? policy_->every_steps()
                                       : common::FixedCheckpointInterval(config_));
  s.set_checkpoint_cost_s(policy_ ? policy_->cost_s() : -1);
  s.set_checkpoint_mtbl_s(policy_ ? policy_->mtbl_s() : 0);
  if (prep_) {
    s.set_message(absl::StrFormat("preparing epoch %d (%s): %d of %d ready", prep_->epoch,
                                  prep_->cause, prep_->ready.size(), prep_->candidates.size()));
  } else if (restoring_) {
    s.set_message("coordinator restarted: waiting for the members to re-join");
  } else if (run_state_ == RunState::kWaiting || run_state_ == RunState::kPaused) {
    s.set_message(pause_message_);
  }
  auto add = [&](const WorkerInfo& w) {
    proto::MemberStatus* m = s.add_members();
    m->set_id(w.id);
    m->set_name(w.name);
    m->set_address(w.address);
    m->set_rank(w.rank);
    m->set_state(w.placeholder ? "reconnecting" : WorkerStateName(w.state));
    m->set_heartbeat_age_ms(w.heard ? absl::ToInt64Milliseconds(now - w.last_seen) : -1);
    m->set_step(w.completed_steps);
    m->set_device(w.device);
    m->set_epoch(w.epoch);
  };
  std::set<uint64_t> shown;
  for (const proto::Member& pm : plan_.members()) {
    auto it = workers_.find(pm.worker_id());
    if (it != workers_.end() && IsLive(it->second.state)) {
      add(it->second);
      shown.insert(pm.worker_id());
    }
  }
  for (const auto& [id, w] : workers_) {
    if (!shown.count(id) && w.state != WorkerState::kRemoved) add(w);
  }
  return s;
}

}  // namespace spotrain::coordinator
