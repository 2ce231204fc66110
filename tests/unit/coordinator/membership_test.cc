// Table-driven tests of the membership state machine (coordinator/membership.h). Each
// scenario is a list of commands for a small interpreter (Sim below) that plays fake workers
// against a Membership driven by a FakeClock, applies its Actions the way the service does
// (journal into a CoordinatorState, manifests "written" at once) and checks expectations.
#include "coordinator/membership.h"

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/clock.h"
#include "common/run_config.h"
#include "coordinator/durable_state.h"
#include "coordinator/planner.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace spotrain::coordinator {
namespace {

proto::RunConfig TestConfig() {
  proto::RunConfig c;
  c.set_model("gpt-tiny");
  c.mutable_data()->set_train("d/train_*.bin");
  c.mutable_data()->set_val("d/val_*.bin");
  c.set_steps(100);
  c.mutable_checkpoint()->set_dir("/ckpt");
  c.mutable_checkpoint()->mutable_every_steps()->set_number_value(10);
  c.mutable_checkpoint()->set_keep(2);
  c.set_min_workers(1);
  c.set_max_workers(8);
  c.set_heartbeat_ms(100);
  c.set_heartbeat_timeout_ms(1000);
  c.set_join_settle_ms(200);
  c.set_op_timeout_ms(1000);
  common::ApplyDefaults(c);
  return c;
}

// One fake worker process: what it knows from the messages it received.
struct FakeWorker {
  uint64_t id = 0;
  bool session = false;
  std::vector<proto::CoordinatorMessage> inbox;
  std::optional<proto::Prepare> prepare;  // last Prepare
  std::optional<proto::Plan> plan;        // last Plan
  std::optional<proto::Command> command;  // last Command
  std::optional<proto::Rejected> rejected;
  int64_t epoch = 0;  // epoch of the last plan it was in
  int rank = -1, world = 0;
};

class Sim {
 public:
  explicit Sim(proto::RunConfig config) : config_(std::move(config)) {
    state_.set_run_id("test-run");
    state_.set_run_fingerprint(common::RunFingerprint(config_));
    m_ = std::make_unique<Membership>(config_, state_, &clock_);
  }

  void Run(const std::vector<std::string>& lines) {
    for (const std::string& line : lines) {
      SCOPED_TRACE(line);
      Exec(line);
      if (testing::Test::HasFatalFailure()) return;
    }
  }

  Membership& m() { return *m_; }
  const std::vector<MembershipEvent>& events() const { return events_; }
  const proto::CoordinatorState& durable() const { return state_; }
  const std::vector<IntervalDecision>& decisions() const { return decisions_; }

 private:
  void Apply(Actions& a) {
    for (JournalEntry& j : a.journal) {
      j.record.set_seq(state_.seq() + 1);
      ApplyRecord(j.record, state_);
      state_.set_seq(j.record.seq());
    }
    std::vector<ReadyCheckpoint> commits = std::move(a.commits);
    for (const OutgoingMessage& out : a.messages) {
      FakeWorker* w = ById(out.worker_id);
      ASSERT_NE(w, nullptr) << "message to unknown worker " << out.worker_id;
      EXPECT_TRUE(w->session) << "message to worker " << out.worker_id << " without session";
      const proto::CoordinatorMessage& message = *out.message;
      w->inbox.push_back(message);
      if (message.has_prepare()) w->prepare = message.prepare();
      if (message.has_plan()) {
        w->plan = message.plan();
        w->epoch = w->plan->epoch();
        w->world = w->plan->world_size();
        for (const auto& mem : w->plan->members()) {
          if (mem.worker_id() == w->id) w->rank = mem.rank();
        }
      }
      if (message.has_command()) w->command = message.command();
      if (message.has_rejected()) w->rejected = message.rejected();
    }
    for (const StreamClose& c : a.closes) {
      FakeWorker* w = ById(c.worker_id);
      if (w != nullptr) w->session = false;
    }
    for (int64_t s : a.prune_steps) pruned_.push_back(s);
    for (MembershipEvent& e : a.events) {
      // As the service: the journal forgets the open event once its line is written.
      if (e.epoch > 0 && state_.open_event().epoch() == e.epoch) {
        proto::JournalRecord r;
        r.set_event_written(e.epoch);
        ApplyRecord(r, state_);
      }
      events_.push_back(std::move(e));
    }
    for (IntervalDecision& d : a.interval_decisions) decisions_.push_back(std::move(d));
    if (a.run_done) run_done_ = true;
    for (const ReadyCheckpoint& c : commits) {
      commits_.push_back(c.step);
      Actions next;
      m_->OnCheckpointCommitted(
          c, fail_commits_ ? absl::InternalError("disk full") : absl::OkStatus(), &next);
      Apply(next);
    }
  }

  FakeWorker* ById(uint64_t id) {
    for (auto& [name, w] : workers_) {
      if (w.id == id) return &w;
    }
    return nullptr;
  }
  FakeWorker& W(const std::string& name) {
    auto it = workers_.find(name);
    EXPECT_NE(it, workers_.end()) << "no worker " << name;
    return it->second;
  }
  static int64_t Int(absl::string_view s) {
    int64_t v = 0;
    EXPECT_TRUE(absl::SimpleAtoi(s, &v)) << s;
    return v;
  }
  // "key=value" options after the positional arguments.
  static std::map<std::string, std::string> Options(const std::vector<std::string>& args,
                                                    size_t from) {
    std::map<std::string, std::string> out;
    for (size_t i = from; i < args.size(); ++i) {
      std::vector<std::string> kv = absl::StrSplit(args[i], absl::MaxSplits('=', 1));
      out[kv[0]] = kv.size() > 1 ? kv[1] : "";
    }
    return out;
  }
  static absl::StatusCode Code(const std::string& name) {
    static const std::map<std::string, absl::StatusCode> codes = {
        {"OK", absl::StatusCode::kOk},
        {"ABORTED", absl::StatusCode::kAborted},
        {"FAILED_PRECONDITION", absl::StatusCode::kFailedPrecondition},
        {"ALREADY_EXISTS", absl::StatusCode::kAlreadyExists},
        {"INVALID_ARGUMENT", absl::StatusCode::kInvalidArgument},
        {"DATA_LOSS", absl::StatusCode::kDataLoss},
    };
    auto it = codes.find(name);
    EXPECT_NE(it, codes.end()) << name;
    return it->second;
  }

  void Message(const std::string& name, const proto::WorkerMessage& msg,
               absl::StatusCode expected) {
    Actions a;
    absl::Status s = m_->OnMessage(W(name).id, msg, &a);
    EXPECT_EQ(s.code(), expected) << s;
    Apply(a);
  }

  void Exec(const std::string& line) {
    // "cmd args... [-> CODE]"
    absl::StatusCode expected = absl::StatusCode::kOk;
    std::string body = line;
    size_t arrow = line.find(" -> ");
    if (arrow != std::string::npos) {
      expected = Code(line.substr(arrow + 4));
      body = line.substr(0, arrow);
    }
    std::vector<std::string> args = absl::StrSplit(body, ' ', absl::SkipEmpty());
    const std::string& cmd = args[0];
    if (cmd == "join") {
      // join NAME [held=N] [prev=NAME] [epoch=E|current] [device=D] [fp=X]
      auto o = Options(args, 2);
      proto::JoinRequest r;
      r.set_name(args[1]);
      r.set_advertise_host(args[1] + ":1234");
      r.set_device(o.count("device") ? o["device"] : "cpu");
      r.set_held_step(o.count("held") ? Int(o["held"]) : -1);
      r.set_held_fingerprint(o.count("fp") ? Int(o["fp"]) : m_->fingerprint());
      if (o.count("prev")) r.set_previous_worker_id(W(o["prev"]).id);
      if (o.count("epoch")) {
        r.set_current_epoch(o["epoch"] == "current" ? W(args[1]).epoch : Int(o["epoch"]));
      }
      Actions a;
      auto response = m_->Join(r, &a);
      EXPECT_EQ(response.status().code(), expected) << response.status();
      if (response.ok()) {
        FakeWorker& w = workers_[args[1]];
        EXPECT_EQ(response->run_id(), "test-run");
        EXPECT_GT(response->worker_id(), max_id_) << "worker ids must never be reused";
        max_id_ = response->worker_id();
        w.id = response->worker_id();
        w.session = false;
        w.prepare.reset();
        w.command.reset();
      }
      Apply(a);
    } else if (cmd == "hello") {
      Actions a;
      absl::Status s = m_->Hello(W(args[1]).id, &a);
      EXPECT_EQ(s.code(), expected) << s;
      if (s.ok()) W(args[1]).session = true;
      Apply(a);
    } else if (cmd == "start") {
      // start A B C: join and hello each.
      for (size_t i = 1; i < args.size(); ++i) {
        Exec(absl::StrCat("join ", args[i]));
        Exec(absl::StrCat("hello ", args[i]));
      }
    } else if (cmd == "close") {
      FakeWorker& w = W(args[1]);
      Actions a;
      w.session = false;
      m_->OnSessionClosed(w.id, "test", &a);
      Apply(a);
    } else if (cmd == "hb") {
      // hb NAME [steps] [epoch=E]
      FakeWorker& w = W(args[1]);
      auto o = Options(args, 3);
      proto::WorkerMessage msg;
      msg.mutable_heartbeat()->set_epoch(o.count("epoch") ? Int(o["epoch"]) : w.epoch);
      msg.mutable_heartbeat()->set_completed_steps(args.size() > 2 ? Int(args[2]) : -1);
      Message(args[1], msg, expected);
    } else if (cmd == "hball") {
      // Every worker with a session heartbeats (keeps them alive while time passes).
      for (auto& [name, w] : workers_) {
        if (!w.session) continue;
        proto::WorkerMessage msg;
        msg.mutable_heartbeat()->set_epoch(w.epoch);
        msg.mutable_heartbeat()->set_completed_steps(-1);
        Actions a;
        (void)m_->OnMessage(w.id, msg, &a);
        Apply(a);
      }
    } else if (cmd == "step") {
      // step NAME INDEX [epoch=E]
      FakeWorker& w = W(args[1]);
      auto o = Options(args, 3);
      proto::WorkerMessage msg;
      msg.mutable_step_done()->set_epoch(o.count("epoch") ? Int(o["epoch"]) : w.epoch);
      msg.mutable_step_done()->set_step(Int(args[2]));
      msg.mutable_step_done()->set_loss(1.0f);
      msg.mutable_step_done()->set_tokens(1024);
      msg.mutable_step_done()->set_step_ms(50);
      Message(args[1], msg, expected);
    } else if (cmd == "steps") {
      // steps FROM TO NAME...: every named worker completes steps FROM..TO-1.
      for (int64_t s = Int(args[1]); s < Int(args[2]); ++s) {
        for (size_t i = 3; i < args.size(); ++i) Exec(absl::StrCat("step ", args[i], " ", s));
      }
    } else if (cmd == "ready") {
      // ready NAME COMPLETED [epoch=E] [fp=X]
      FakeWorker& w = W(args[1]);
      auto o = Options(args, 3);
      proto::WorkerMessage msg;
      ASSERT_TRUE(w.prepare.has_value() || o.count("epoch")) << args[1] << " got no Prepare";
      msg.mutable_ready()->set_epoch(o.count("epoch") ? Int(o["epoch"]) : w.prepare->epoch());
      msg.mutable_ready()->set_completed_steps(Int(args[2]));
      msg.mutable_ready()->set_held_fingerprint(o.count("fp") ? Int(o["fp"]) : m_->fingerprint());
      Message(args[1], msg, expected);
    } else if (cmd == "leave") {
      proto::WorkerMessage msg;
      msg.mutable_leave()->set_reason("SIGTERM");
      if (args.size() > 2) msg.mutable_leave()->set_deadline_unix_ms(Int(args[2]));
      Message(args[1], msg, expected);
    } else if (cmd == "cfail") {
      // cfail NAME COMPLETED
      FakeWorker& w = W(args[1]);
      proto::WorkerMessage msg;
      msg.mutable_collective_failed()->set_epoch(w.epoch);
      msg.mutable_collective_failed()->set_step(Int(args[2]));
      msg.mutable_collective_failed()->set_completed_steps(Int(args[2]));
      msg.mutable_collective_failed()->set_error("peer closed");
      Message(args[1], msg, expected);
    } else if (cmd == "shard") {
      // shard NAME STEP [digest=d] [epoch=E] [floats=N] [stall=MS] [write=MS]: shard of the
      // worker's current plan (rank and world size of the last plan it got).
      FakeWorker& w = W(args[1]);
      auto o = Options(args, 3);
      const int64_t floats = o.count("floats") ? Int(o["floats"]) : 1000;
      const int world = w.world, rank = w.rank;
      proto::WorkerMessage msg;
      proto::ShardWritten* s = msg.mutable_shard_written();
      s->set_epoch(o.count("epoch") ? Int(o["epoch"]) : w.epoch);
      s->set_step(Int(args[2]));
      s->set_rank(rank);
      s->set_world_size(world);
      s->set_file(ShardFileName(rank, world));
      const int64_t per = (floats + world - 1) / world;
      s->set_offset(std::min<int64_t>(floats, per * rank));
      s->set_length(std::min<int64_t>(floats, per * (rank + 1)) - s->offset());
      s->set_checksum("0123456789abcdef");
      s->set_state_digest(std::string(64, o.count("digest") ? o["digest"][0] : 'a'));
      s->set_state_floats(floats);
      if (o.count("stall")) s->set_snapshot_ms(Int(o["stall"]));
      if (o.count("write")) s->set_write_ms(Int(o["write"]));
      Message(args[1], msg, expected);
    } else if (cmd == "shardfail") {
      FakeWorker& w = W(args[1]);
      proto::WorkerMessage msg;
      msg.mutable_shard_failed()->set_epoch(w.epoch);
      msg.mutable_shard_failed()->set_step(Int(args[2]));
      msg.mutable_shard_failed()->set_error("ENOSPC");
      Message(args[1], msg, expected);
    } else if (cmd == "report") {
      // report NAME: RecoveryReport for its current epoch.
      FakeWorker& w = W(args[1]);
      proto::WorkerMessage msg;
      proto::RecoveryReport* r = msg.mutable_recovery_report();
      r->set_epoch(w.epoch);
      r->set_group_rebuilt_ms(10);
      r->set_state_synced_ms(20);
      r->set_first_step_ms(30);
      r->set_lost_steps(0);
      Message(args[1], msg, expected);
    } else if (cmd == "advance") {
      clock_.Advance(absl::Milliseconds(Int(args[1])));
      Actions a;
      m_->Tick(&a);
      Apply(a);
    } else if (cmd == "wait") {
      // wait MS: time passes in 50 ms ticks while every live worker heartbeats.
      for (int64_t t = 0; t < Int(args[1]); t += 50) {
        Exec("hball");
        Exec("advance 50");
      }
    } else if (cmd == "restart") {
      // The coordinator dies (kill -9) and restarts from its journal; workers keep running
      // but their sessions are gone.
      for (auto& [name, w] : workers_) w.session = false;
      proto::CoordinatorState restored = state_;
      m_ = std::make_unique<Membership>(config_, restored, &clock_);
    } else if (cmd == "fail_commits") {
      fail_commits_ = true;
    } else if (cmd == "expect_prepare") {
      // expect_prepare immediate|planned NAME...: they all got the current Prepare.
      const bool immediate = args[1] == "immediate";
      ASSERT_NE(m_->preparing_epoch(), 0) << "nothing is being prepared";
      EXPECT_EQ(m_->preparing_immediate(), immediate);
      for (size_t i = 2; i < args.size(); ++i) {
        FakeWorker& w = W(args[i]);
        ASSERT_TRUE(w.prepare.has_value()) << args[i];
        EXPECT_EQ(w.prepare->epoch(), m_->preparing_epoch()) << args[i];
        EXPECT_EQ(w.prepare->immediate(), immediate) << args[i];
      }
    } else if (cmd == "expect_not_prepared") {
      // expect_not_prepared NAME: did not get the current Prepare.
      FakeWorker& w = W(args[1]);
      EXPECT_TRUE(!w.prepare.has_value() || w.prepare->epoch() != m_->preparing_epoch());
    } else if (cmd == "expect_preparing") {
      EXPECT_EQ(m_->preparing_epoch() != 0, args[1] == "yes");
    } else if (cmd == "expect_plan") {
      // expect_plan SOURCE START NAME...: current plan, members in rank order, all received it.
      const proto::Plan& plan = m_->plan();
      EXPECT_EQ(m_->preparing_epoch(), 0);
      std::vector<std::string> names;
      for (const auto& mem : plan.members()) {
        std::string n = "?";
        for (auto& [name, w] : workers_) {
          if (w.id == mem.worker_id()) n = name;
        }
        names.push_back(n);
      }
      std::vector<std::string> want(args.begin() + 3, args.end());
      EXPECT_EQ(absl::StrJoin(names, " "), absl::StrJoin(want, " "));
      EXPECT_EQ(plan.world_size(), static_cast<int>(want.size()));
      EXPECT_EQ(plan.start_step(), Int(args[2]));
      std::string source = DescribeSource(plan.state_source());
      std::string want_source = args[1];
      for (char& c : want_source) {
        if (c == '_') c = ' ';
      }
      EXPECT_EQ(source, want_source);
      for (const std::string& n : want) {
        FakeWorker& w = W(n);
        ASSERT_TRUE(w.plan.has_value()) << n << " got no Plan";
        EXPECT_EQ(w.plan->epoch(), plan.epoch()) << n;
      }
    } else if (cmd == "expect_epoch") {
      EXPECT_EQ(m_->plan().epoch(), Int(args[1]));
    } else if (cmd == "expect_state") {
      EXPECT_EQ(RunStateName(m_->run_state()), args[1]);
    } else if (cmd == "expect_worker") {
      // expect_worker NAME STATE
      const Membership::WorkerInfo* info = m_->worker(W(args[1]).id);
      ASSERT_NE(info, nullptr);
      EXPECT_EQ(WorkerStateName(info->state), args[2]);
    } else if (cmd == "expect_stop") {
      // expect_stop NAME substring
      FakeWorker& w = W(args[1]);
      ASSERT_TRUE(w.command.has_value() && w.command->stop()) << args[1] << " was not stopped";
      EXPECT_THAT(w.command->message(), testing::HasSubstr(args[2]));
      EXPECT_FALSE(w.session);
    } else if (cmd == "expect_no_stop") {
      FakeWorker& w = W(args[1]);
      EXPECT_FALSE(w.command.has_value() && w.command->stop());
    } else if (cmd == "expect_checkpoint_now") {
      FakeWorker& w = W(args[1]);
      ASSERT_TRUE(w.command.has_value());
      EXPECT_TRUE(w.command->checkpoint_now());
    } else if (cmd == "expect_orders") {
      // expect_orders NAME N: checkpoint_now commands it received so far.
      int64_t n = 0;
      for (const auto& m : W(args[1]).inbox) {
        if (m.has_command() && m.command().checkpoint_now()) ++n;
      }
      EXPECT_EQ(n, Int(args[2])) << args[1];
    } else if (cmd == "expect_announced") {
      // expect_announced NAME N: the last "auto" interval it was told.
      int64_t every = 0;
      for (const auto& m : W(args[1]).inbox) {
        if (m.has_command() && m.command().checkpoint_every_steps() > 0) {
          every = m.command().checkpoint_every_steps();
        }
      }
      EXPECT_EQ(every, Int(args[2])) << args[1];
    } else if (cmd == "expect_every_steps") {
      ASSERT_NE(m_->checkpoint_policy(), nullptr);
      EXPECT_EQ(m_->checkpoint_policy()->every_steps(), Int(args[1]));
      EXPECT_EQ(m_->Status().checkpoint_every_steps(), Int(args[1]));
    } else if (cmd == "expect_decisions") {
      // expect_decisions REASON...: the interval decisions logged so far.
      std::vector<std::string> got;
      for (const IntervalDecision& d : decisions_) got.push_back(d.reason);
      EXPECT_EQ(absl::StrJoin(got, " "), absl::StrJoin(args.begin() + 1, args.end(), " "));
    } else if (cmd == "expect_rejected") {
      FakeWorker& w = W(args[1]);
      ASSERT_TRUE(w.rejected.has_value());
      EXPECT_EQ(w.rejected->code(), static_cast<int>(Code(args[2])));
      w.rejected.reset();
    } else if (cmd == "expect_commits") {
      std::vector<std::string> got;
      for (int64_t s : commits_) got.push_back(absl::StrCat(s));
      EXPECT_EQ(absl::StrJoin(got, " "), absl::StrJoin(args.begin() + 1, args.end(), " "));
    } else if (cmd == "expect_pruned") {
      std::vector<std::string> got;
      for (int64_t s : pruned_) got.push_back(absl::StrCat(s));
      EXPECT_EQ(absl::StrJoin(got, " "), absl::StrJoin(args.begin() + 1, args.end(), " "));
    } else if (cmd == "expect_last_checkpoint") {
      EXPECT_EQ(m_->registry().LastCommitted(), Int(args[1]));
    } else if (cmd == "expect_counter") {
      const MembershipCounters& c = m_->counters();
      const std::map<std::string, int64_t> values = {
          {"recoveries", c.recoveries}, {"lost_steps", c.lost_steps}, {"losses", c.losses},
          {"leaves", c.leaves},         {"joins", c.joins},           {"plans", c.plans},
      };
      ASSERT_TRUE(values.count(args[1])) << args[1];
      EXPECT_EQ(values.at(args[1]), Int(args[2])) << args[1];
    } else if (cmd == "expect_step") {
      EXPECT_EQ(m_->completed_steps(), Int(args[1]));
    } else if (cmd == "expect_event") {
      // expect_event CAUSE [paused] : the latest event (still open or written).
      const MembershipEvent* e = m_->open_event();
      if (e == nullptr) {
        ASSERT_FALSE(events_.empty());
        e = &events_.back();
      }
      EXPECT_EQ(e->cause, args[1]);
      if (args.size() > 2) {
        EXPECT_EQ(e->paused, args[2] == "paused");
      }
    } else if (cmd == "expect_done") {
      EXPECT_TRUE(run_done_);
      EXPECT_EQ(m_->run_state(), RunState::kDone);
    } else if (cmd == "expect_kv") {
      // expect_kv EPOCH CODE
      EXPECT_EQ(m_->CheckKvEpoch(Int(args[1])).code(), Code(args[2]));
    } else {
      FAIL() << "unknown command " << cmd;
    }
  }

  proto::RunConfig config_;
  common::FakeClock clock_;
  proto::CoordinatorState state_;
  std::unique_ptr<Membership> m_;
  std::map<std::string, FakeWorker> workers_;
  uint64_t max_id_ = 0;
  std::vector<int64_t> commits_, pruned_;
  std::vector<MembershipEvent> events_;
  std::vector<IntervalDecision> decisions_;
  bool run_done_ = false;
  bool fail_commits_ = false;
};

struct Scenario {
  std::string name;
  std::vector<std::string> lines;
  // Applied to TestConfig().
  void (*configure)(proto::RunConfig&) = nullptr;
};

// Three workers a, b, c running epoch 1 from a fresh start.
const std::vector<std::string> kThreeRunning = {
    "start a b c",          "wait 200",   "expect_prepare immediate a b c", "ready a -1",
    "ready b -1",           "ready c -1", "expect_plan fresh 0 a b c",      "expect_epoch 1",
    "expect_state running",
};

std::vector<std::string> With(std::vector<std::string> prefix,
                              const std::vector<std::string>& rest) {
  prefix.insert(prefix.end(), rest.begin(), rest.end());
  return prefix;
}

const Scenario kScenarios[] = {
    {"FirstPlanAfterSettle",
     {"start a", "advance 100", "expect_preparing no", "start b", "advance 150",
      "expect_preparing no", "wait 100", "expect_prepare immediate a b", "ready a -1",
      "expect_preparing yes", "ready b -1", "expect_plan fresh 0 a b", "expect_event joined"}},
    {"SimultaneousLosses", With(kThreeRunning, {"start d",
                                                "wait 300",
                                                "expect_prepare planned a b c d",
                                                "ready a 5",
                                                "ready b 5",
                                                "ready c 5",
                                                "ready d -1",
                                                "expect_plan broadcast_from_rank_0 5 a b c d",
                                                "steps 5 8 a b c d",
                                                "close b",
                                                "close d",
                                                "expect_prepare immediate a c",
                                                "expect_worker b lost",
                                                "expect_worker d lost",
                                                "ready a 8",
                                                "ready c 7",
                                                "expect_plan broadcast_from_rank_0 8 a c",
                                                "expect_counter recoveries 1",
                                                "expect_counter lost_steps 0",
                                                "expect_event lost"})},
    {"SurvivorsThatAgreeKeepTheirState",
     With(kThreeRunning, {"steps 0 4 a b c", "close c", "ready a 4", "ready b 4",
                          "expect_plan keep 4 a b", "expect_epoch 2"})},
    {"LossDuringPendingJoin",
     With(kThreeRunning,
          {"steps 0 3 a b c", "start d", "wait 250", "expect_prepare planned a b c d", "ready d -1",
           "close b",
           // The planned change becomes an immediate one with a new epoch.
           "expect_prepare immediate a c d", "ready a 3", "ready c 3", "ready d -1",
           "expect_plan broadcast_from_rank_0 3 a c d", "expect_epoch 3", "expect_event lost"})},
    {"LeaveAtNextBoundary",
     With(kThreeRunning,
          {"steps 0 2 a b c", "leave b", "expect_prepare planned a b c", "expect_no_stop b",
           "steps 2 3 a b c", "ready a 3", "ready b 3", "ready c 3", "expect_plan keep 3 a c",
           "expect_stop b left", "expect_counter recoveries 0", "expect_counter leaves 1",
           "expect_event left"})},
    {"LeaveAndLossOfTheSameWorker",
     With(kThreeRunning,
          {"leave b", "expect_prepare planned a b c", "ready a 0", "close b",
           "expect_prepare immediate a c", "ready a 0", "ready c 0", "expect_plan keep 0 a c",
           "expect_counter recoveries 1", "expect_event lost"})},
    {"LossOfBroadcastSourceDuringSync",
     {"start a", "wait 250", "ready a -1", "expect_plan fresh 0 a", "steps 0 6 a", "start b",
      "wait 250", "ready a 6", "ready b -1", "expect_plan broadcast_from_rank_0 6 a b",
      // a dies before b received the state: nobody holds it, no checkpoint: fresh.
      "close a", "expect_prepare immediate b", "ready b -1", "expect_plan fresh 0 b",
      "expect_counter lost_steps 6"}},
    {"LossOfBroadcastSourceFallsBackToCheckpoint",
     {"start a", "wait 250", "ready a -1", "steps 0 10 a", "shard a 10", "expect_commits 10",
      "steps 10 12 a", "start b", "wait 250", "ready a 12", "ready b -1",
      "expect_plan broadcast_from_rank_0 12 a b", "close a", "ready b -1",
      "expect_plan checkpoint_step_10 10 b", "expect_counter lost_steps 2"}},
    {"HeartbeatTimeoutDetectsSilentLoss",
     With(kThreeRunning, {"steps 0 2 a b c", "advance 500", "hb a 2", "hb b 2", "advance 400",
                          "hb a 2", "hb b 2", "advance 200", "expect_prepare immediate a b",
                          "expect_worker c lost", "expect_stop c fenced"})},
    {"StaleWorkerReturning",
     With(kThreeRunning,
          {"steps 0 2 a b c", "wait 1100",  // everyone heartbeats: nothing happens
           "expect_epoch 1", "advance 500", "hb a 2", "hb b 2", "advance 600", "hb a 2",
           "ready a 2", "ready b 2", "expect_plan keep 2 a b",
           // c wakes up (SIGCONT): everything it says is refused.
           "hb c 2 -> FAILED_PRECONDITION", "step c 2 epoch=1 -> FAILED_PRECONDITION",
           "hello c -> FAILED_PRECONDITION", "steps 2 4 a b",
           // It re-joins as a newcomer holding step 2 and gets the state by broadcast.
           "join c held=2 prev=c", "hello c", "wait 250", "expect_prepare planned a b c",
           "ready a 4", "ready b 4", "ready c 2", "expect_plan broadcast_from_rank_0 4 a b c"})},
    {"StaleEpochReportsChangeNothing",
     With(kThreeRunning,
          {"steps 0 2 a b c", "close c", "ready a 2", "ready b 2", "expect_epoch 2",
           "step a 2 epoch=1 -> ABORTED", "expect_rejected a ABORTED", "expect_step 2",
           "ready a 2 epoch=1 -> ABORTED", "cfail b 2", "expect_preparing yes"})},
    {"UnknownIdsAndDuplicates",
     With(kThreeRunning,
          {"steps 0 10 a b c", "shard a 10", "shard a 10 -> ALREADY_EXISTS", "shard b 10 digest=b",
           "shard c 10 -> DATA_LOSS", "expect_commits", "steps 10 20 a b c", "shard a 20",
           "shard b 20", "shard c 20", "expect_commits 20", "shard a 20 -> ALREADY_EXISTS",
           "shard a 30 epoch=7 -> FAILED_PRECONDITION"})},
    {"PauseBelowMinWorkersAndResume",
     {"start a b", "wait 250", "ready a -1", "ready b -1", "expect_plan fresh 0 a b",
      "steps 0 3 a b", "close b", "ready a 3", "expect_state paused", "expect_event lost paused",
      "wait 2000", "expect_state paused", "start c", "wait 250", "expect_prepare immediate a c",
      "ready a 3", "ready c -1", "expect_plan broadcast_from_rank_0 3 a c", "expect_state running"},
     [](proto::RunConfig& c) { c.set_min_workers(2); }},
    {"WaitingUntilMinWorkers",
     {"start a", "wait 500", "expect_state waiting", "expect_preparing no", "start b", "wait 250",
      "ready a -1", "ready b -1", "expect_plan fresh 0 a b"},
     [](proto::RunConfig& c) { c.set_min_workers(2); }},
    {"MaxWorkersCapsMembers",
     {"start a b c", "wait 250", "expect_prepare immediate a b", "expect_not_prepared c",
      "ready a -1", "ready b -1", "expect_plan fresh 0 a b", "expect_worker c joining", "close a",
      "ready b 0", "ready c -1", "expect_plan broadcast_from_rank_0 0 b c"},
     [](proto::RunConfig& c) { c.set_max_workers(2); }},
    {"SilentCandidateIsLostAfterDeadline",
     With(kThreeRunning, {"close a", "ready b 0", "advance 500", "hb b 0", "hb c 0", "advance 600",
                          "expect_worker c lost", "expect_plan keep 0 b"})},
    {"MassLeaveCheckpointsFirst",
     {"start a b", "wait 250", "ready a -1", "ready b -1", "steps 0 7 a b", "leave a", "leave b",
      "expect_checkpoint_now a", "expect_checkpoint_now b", "expect_preparing no", "steps 7 8 a b",
      "shard a 8", "shard b 8", "expect_commits 8", "expect_prepare planned a b", "ready a 8",
      "ready b 8", "expect_state paused"},
     [](proto::RunConfig& c) { c.set_min_workers(2); }},
    {"MassLeaveGivesUpWaitingAtDeadline",
     {"start a b", "wait 250", "ready a -1", "ready b -1", "steps 0 7 a b", "leave a", "leave b",
      "expect_preparing no", "wait 2200", "expect_prepare planned a b"},
     [](proto::RunConfig& c) { c.set_min_workers(2); }},
    {"CollectiveFailureReformsGroupWithLiveStreams",
     With(kThreeRunning, {"steps 0 3 a b c", "cfail a 3", "expect_prepare immediate a b c",
                          "ready a 3", "ready b 3", "ready c 3", "expect_plan keep 3 a b c",
                          "expect_event collective_failed", "expect_counter recoveries 1"})},
    {"PruneKeepsNewest",
     {"start a", "wait 250", "ready a -1", "steps 0 10 a", "shard a 10", "steps 10 20 a",
      "shard a 20", "steps 20 30 a", "shard a 30", "expect_commits 10 20 30", "expect_pruned 10",
      "expect_last_checkpoint 30", "shard a 25 -> FAILED_PRECONDITION"}},
    {"RunFinishesAfterFinalCheckpoint",
     {"start a b", "wait 250", "ready a -1", "ready b -1", "steps 0 100 a b",
      "expect_state running", "shard a 100", "shard b 100", "expect_done", "expect_stop a finished",
      "expect_stop b finished", "join c", "hello c", "expect_stop c finished"}},
    {"BackendIsFixedByFirstWorker",
     {"join a device=cuda:NVIDIA_H100", "join b device=cpu -> FAILED_PRECONDITION",
      "join c device=tpu -> INVALID_ARGUMENT", "join d device=cuda:A100"}},
    {"ForeignStateCountsAsNone",
     {"join a held=40 fp=12345", "hello a", "wait 250", "ready a 40 fp=12345",
      "expect_plan fresh 0 a"}},
    {"KvEpochFencing",
     With(kThreeRunning,
          {"expect_kv 1 OK", "expect_kv 2 FAILED_PRECONDITION", "close c", "expect_kv 2 OK",
           "ready a 0", "ready b 0", "expect_kv 1 ABORTED", "expect_kv 0 INVALID_ARGUMENT"})},
    {"RestartBetweenShardReportsAndManifest",
     With(kThreeRunning,
          {"steps 0 10 a b c", "shard a 10", "shard b 10", "restart", "expect_state running",
           // Everyone re-joins still running epoch 1: no new epoch, nothing lost.
           "join a prev=a held=10 epoch=current", "hello a", "join b prev=b held=10 epoch=current",
           "hello b", "join c prev=c held=10 epoch=current", "hello c", "expect_event restored",
           "expect_epoch 1", "expect_preparing no", "shard c 10", "expect_commits 10",
           "steps 10 12 a b c", "expect_step 12"})},
    {"RestartWithAMemberMissing",
     With(kThreeRunning, {"steps 0 4 a b c", "restart", "join a prev=a held=4 epoch=current",
                          "hello a", "join b prev=b held=4 epoch=current", "hello b", "wait 1900",
                          "expect_preparing no", "wait 300", "expect_prepare immediate a b",
                          "ready a 5", "ready b 5", "expect_plan keep 5 a b", "expect_epoch 2"})},
    {"RestartWhenWorkersStoppedWaitingForAPlan",
     With(kThreeRunning,
          {"steps 0 4 a b c", "close c", "restart",
           // a and b had stopped for epoch 2's Prepare: they re-join running no epoch.
           "join a prev=a held=4 epoch=0", "hello a", "join b prev=b held=4 epoch=0", "hello b",
           "wait 250", "expect_prepare immediate a b", "ready a 4", "ready b 4",
           "expect_plan keep 4 a b", "expect_counter lost_steps 0"})},
    {"RestartAfterRunDone",
     {"start a", "wait 250", "ready a -1", "steps 0 100 a", "shard a 100", "expect_done", "restart",
      "expect_state done", "join a", "hello a", "expect_stop a finished"}},
    {"ShardFailureAbandonsCheckpoint",
     With(kThreeRunning,
          {"steps 0 10 a b c", "shard a 10", "shardfail b 10", "shard c 10 -> FAILED_PRECONDITION",
           "expect_commits", "steps 10 20 a b c", "shard a 20", "shard b 20", "shard c 20",
           "expect_commits 20"})},
    {"ManifestWriteFailureLeavesItUncommitted",
     {"fail_commits", "start a", "wait 250", "ready a -1", "steps 0 10 a", "shard a 10",
      "expect_last_checkpoint -1"}},
    {"AutoIntervalOrdersCheckpoints",
     {"start a b", "expect_every_steps 20", "wait 250", "ready a -1", "ready b -1",
      "expect_plan fresh 0 a b", "expect_decisions initial", "steps 0 19 a b", "expect_orders a 0",
      "expect_announced a 20", "expect_announced b 20", "steps 19 20 a b",
      // One rank is told (the flag is summed in-band), once.
      "expect_orders a 1", "expect_orders b 0", "steps 20 21 a b", "expect_orders a 1",
      "shard a 21 stall=10 write=20", "shard b 21 stall=12 write=30", "expect_commits 21",
      "advance 100", "expect_decisions initial measured",
      // C = 12 ms, M = 10 s, 50 ms steps: Daly ~0.48 s, 10 steps.
      "expect_every_steps 10", "expect_announced a 10", "expect_announced b 10", "steps 21 30 a b",
      "expect_orders a 1", "steps 30 31 a b", "expect_orders a 2", "close b", "advance 100",
      "expect_decisions initial measured loss"},
     [](proto::RunConfig& c) {
       c.mutable_checkpoint()->mutable_every_steps()->set_string_value("auto");
       c.mutable_checkpoint()->set_mtbf_prior_s(10);
     }},
    {"FixedIntervalOrdersNothing",
     {"start a", "wait 250", "ready a -1", "steps 0 30 a", "expect_orders a 0",
      "expect_decisions"}},
    {"ShardOfARankThatRejoinedLateCommits",
     With(kThreeRunning,
          {"steps 0 10 a b c", "shard a 10", "shard b 10", "restart",
           "join a prev=a held=10 epoch=current", "hello a", "join b prev=b held=10 epoch=current",
           "hello b",
           // c is too late for the re-join window: the run goes on without it.
           "wait 2200", "expect_prepare immediate a b", "ready a 12", "ready b 12",
           "expect_plan keep 12 a b", "expect_epoch 2", "expect_commits",
           // c comes back as a newcomer and re-sends its shard of epoch 1 (written as rank 2
           // while the coordinator was down): it is still its own, and completes step 10.
           "join c prev=c held=12 epoch=1", "hello c", "shard c 10 epoch=1", "expect_commits 10"})},
    {"ShardOfAnotherWorkersRankIsRefused",
     With(kThreeRunning, {"steps 0 10 a b c", "shard a 10", "close c", "join c", "hello c",
                          "shard c 10 epoch=1 -> FAILED_PRECONDITION", "expect_commits"})},
    {"RecoveryTimelineFromReports",
     With(kThreeRunning, {"steps 0 3 a b c", "close c", "ready a 3", "ready b 3", "step a 3",
                          "report a", "report b", "expect_event lost"})},
};

class MembershipScenarioTest : public testing::TestWithParam<Scenario> {};

TEST_P(MembershipScenarioTest, Runs) {
  proto::RunConfig config = TestConfig();
  if (GetParam().configure != nullptr) GetParam().configure(config);
  Sim sim(config);
  sim.Run(GetParam().lines);
}

INSTANTIATE_TEST_SUITE_P(Scenarios, MembershipScenarioTest, testing::ValuesIn(kScenarios),
                         [](const testing::TestParamInfo<Scenario>& info) {
                           return info.param.name;
                         });

TEST(MembershipTest, RecoveryEventHasTimelineAndLostSteps) {
  Sim sim(TestConfig());
  sim.Run(With(kThreeRunning, {"steps 0 3 a b c", "close c", "advance 20", "ready a 3", "ready b 2",
                               "advance 30", "step a 3", "report a", "report b"}));
  ASSERT_FALSE(sim.events().empty());
  const MembershipEvent& e = sim.events().back();
  EXPECT_EQ(e.cause, "lost");
  EXPECT_EQ(e.epoch, 2);
  EXPECT_EQ(e.before.size(), 3u);
  EXPECT_EQ(e.after.size(), 2u);
  EXPECT_EQ(e.prepare_sent_ms, 0);
  EXPECT_EQ(e.plan_sent_ms, 20);
  EXPECT_EQ(e.first_step_ms, 50);
  EXPECT_EQ(e.group_rebuilt_ms, 10);  // prepare_sent + 10 ms reported
  EXPECT_EQ(e.state_synced_ms, 20);
  EXPECT_EQ(e.lost_steps, 0);
  EXPECT_EQ(e.state_source, "broadcast from rank 0");
}

TEST(MembershipTest, RecoveryEventWrittenWhenReportsPrecedeTheFirstStep) {
  Sim sim(TestConfig());
  sim.Run(With(kThreeRunning, {"steps 0 3 a b c", "close c", "ready a 3", "ready b 3", "report a",
                               "report b", "step a 3"}));
  ASSERT_FALSE(sim.events().empty());
  EXPECT_EQ(sim.events().back().cause, "lost");
  EXPECT_EQ(sim.events().back().epoch, 2);
  EXPECT_GE(sim.events().back().first_step_ms, 0);
  EXPECT_EQ(sim.m().open_event(), nullptr);
}

TEST(MembershipTest, OpenEventIsJournaledUntilItsLineIsWritten) {
  Sim sim(TestConfig());
  sim.Run(
      With(kThreeRunning, {"steps 0 3 a b c", "close c", "advance 20", "ready a 3", "ready b 2"}));
  // The plan of epoch 2 is out; its timeline is open, and in the journal.
  const proto::PendingEvent& open = sim.durable().open_event();
  EXPECT_EQ(open.epoch(), 2);
  EXPECT_EQ(open.cause(), "lost");
  EXPECT_EQ(open.before_size(), 3);
  EXPECT_EQ(open.after_size(), 2);
  EXPECT_EQ(open.plan_sent_ms(), 20);
  EXPECT_EQ(open.first_step_ms(), -1);
  EXPECT_EQ(open.state_source(), "broadcast from rank 0");
  const size_t lines = sim.events().size();
  sim.Run({"advance 30", "step a 3"});
  EXPECT_EQ(sim.durable().open_event().first_step_ms(), 50);  // journaled again
  EXPECT_EQ(sim.events().size(), lines);
  sim.Run({"report a", "report b"});
  ASSERT_EQ(sim.events().size(), lines + 1);
  EXPECT_EQ(sim.events().back().epoch, 2);
  EXPECT_EQ(sim.durable().open_event().epoch(), 0);  // written: forgotten
}

TEST(MembershipTest, PendingEventRoundTrips) {
  MembershipEvent e;
  e.detected = absl::FromUnixMillis(1796000000123);
  e.epoch = 7;
  e.cause = "joined";
  e.detail = "worker 9 joined";
  e.before = {1, 2};
  e.after = {1, 2, 9};
  e.start_step = 40;
  e.state_source = "broadcast from rank 0";
  e.prepare_sent_ms = 0.5;
  e.plan_sent_ms = 12.25;
  e.first_step_ms = 300;
  e.lost_steps = 1;
  const MembershipEvent back = FromPendingEvent(ToPendingEvent(e));
  EXPECT_EQ(back.detected, e.detected);
  EXPECT_EQ(back.epoch, e.epoch);
  EXPECT_EQ(back.cause, e.cause);
  EXPECT_EQ(back.detail, e.detail);
  EXPECT_EQ(back.before, e.before);
  EXPECT_EQ(back.after, e.after);
  EXPECT_EQ(back.start_step, e.start_step);
  EXPECT_EQ(back.state_source, e.state_source);
  EXPECT_EQ(back.prepare_sent_ms, e.prepare_sent_ms);
  EXPECT_EQ(back.plan_sent_ms, e.plan_sent_ms);
  EXPECT_EQ(back.first_step_ms, e.first_step_ms);
  EXPECT_EQ(back.lost_steps, e.lost_steps);
  EXPECT_EQ(back.group_rebuilt_ms, -1);  // not journaled: only the workers' reports give it
  EXPECT_EQ(back.state_synced_ms, -1);
}

TEST(MembershipTest, StatusListsMembersInRankOrder) {
  Sim sim(TestConfig());
  sim.Run(With(kThreeRunning, {"steps 0 2 a b c", "advance 100", "step a 2", "start d"}));
  proto::RunStatus s = sim.m().Status();
  EXPECT_EQ(s.state(), "running");
  EXPECT_EQ(s.epoch(), 1);
  EXPECT_EQ(s.step(), 3);
  EXPECT_EQ(s.world_size(), 3);
  ASSERT_EQ(s.members_size(), 4);
  EXPECT_EQ(s.members(0).rank(), 0);
  EXPECT_EQ(s.members(2).rank(), 2);
  EXPECT_EQ(s.members(3).state(), "joining");
  EXPECT_EQ(s.members(3).rank(), -1);
  EXPECT_EQ(s.last_checkpoint_step(), -1);
  EXPECT_GT(s.tokens_per_s(), 0);
}

TEST(MembershipTest, AutoIntervalShrinksAfterALoss) {
  proto::RunConfig config = TestConfig();
  config.mutable_checkpoint()->mutable_every_steps()->set_string_value("auto");
  config.mutable_checkpoint()->set_mtbf_prior_s(600);
  config.set_steps(100000);
  Sim sim(config);
  sim.Run(With(kThreeRunning, {"steps 0 20 a b c", "shard a 20 stall=40 write=100",
                               "shard b 20 stall=30 write=100", "shard c 20 stall=20 write=90",
                               "advance 100", "wait 1000", "close c", "advance 100"}));
  ASSERT_EQ(sim.decisions().size(), 3u);
  const IntervalDecision& measured = sim.decisions()[1];
  const IntervalDecision& loss = sim.decisions()[2];
  EXPECT_EQ(measured.reason, "measured");
  EXPECT_DOUBLE_EQ(measured.cost_s, 0.04);  // the slowest rank's stall
  EXPECT_DOUBLE_EQ(measured.write_s, 0.1);
  EXPECT_DOUBLE_EQ(measured.step_ms, 50);
  EXPECT_EQ(measured.losses, 0);
  EXPECT_EQ(loss.reason, "loss");
  EXPECT_EQ(loss.losses, 1);
  EXPECT_LT(loss.mtbl_s, measured.mtbl_s);
  EXPECT_LT(loss.every_steps, measured.every_steps);
  EXPECT_EQ(sim.m().Status().checkpoint_every_steps(), loss.every_steps);
  EXPECT_TRUE(sim.m().Status().checkpoint_interval_auto());
}

TEST(MembershipTest, WorkerIdsSurviveRestartWithoutReuse) {
  Sim sim(TestConfig());
  // Sim checks that every id is larger than all earlier ones, across the restart.
  sim.Run({"start a b", "restart", "start c d", "restart", "start e"});
  EXPECT_GE(sim.durable().worker_ids_reserved(), 5u);
}

}  // namespace
}  // namespace spotrain::coordinator
