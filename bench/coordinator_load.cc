// spotrain-coordinator-load: a load generator for the coordinator. It opens N simulated worker
// Sessions (gRPC callback client API, a few channels, no thread per stream) that answer
// Prepare with Ready and heartbeat at 1 Hz, then measures:
//   - the coordinator's CPU (% of one core, from /proc/PID/stat) and RSS during a steady
//     window of heartbeats;
//   - one simulated worker's silent death (it stops heartbeating but keeps its stream open):
//     time from its last heartbeat to the first Prepare reaching a survivor (detection), and
//     from then until the new Plan has reached every survivor.
// Prints one table row. bench/coordinator_load.sh runs it for several N. Never run by ctest.
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <deque>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/flags.h"
#include "coordinator/client_auth.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "proto/spotrain.grpc.pb.h"

ABSL_FLAG(std::string, coordinator, "127.0.0.1:7777", "Coordinator HOST:PORT.");
ABSL_FLAG(std::string, token_file, "", "Run token file (default: $SPOTRAIN_TOKEN).");
ABSL_FLAG(int, workers, 100, "Simulated workers.");
ABSL_FLAG(int, per_channel, 100, "Sessions per channel (TCP connection).");
ABSL_FLAG(int, heartbeat_ms, 1000, "Heartbeat period of each simulated worker.");
ABSL_FLAG(int, steady_s, 20, "Length of the steady measurement window.");
ABSL_FLAG(int, coordinator_pid, 0, "PID of the coordinator, for CPU and RSS (0: not measured).");
ABSL_FLAG(bool, kill_one, true, "Measure detection of a silent death and plan delivery.");
ABSL_FLAG(bool, header, false, "Print the table header first.");

namespace spotrain::bench {
namespace {

using Clock = absl::Time;

struct CpuSample {
  double seconds = 0;  // utime + stime
  absl::Time at;
};

CpuSample ProcessCpu(int pid) {
  CpuSample s;
  s.at = absl::Now();
  std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t close = text.rfind(')');
  if (close == std::string::npos) return s;
  std::istringstream fields(text.substr(close + 2));
  std::string f;
  long utime = 0, stime = 0;
  // Fields after "pid (comm) ": state is field 3; utime 14, stime 15.
  for (int i = 3; i <= 15 && fields >> f; ++i) {
    if (i == 14) utime = std::stol(f);
    if (i == 15) stime = std::stol(f);
  }
  s.seconds = static_cast<double>(utime + stime) / sysconf(_SC_CLK_TCK);
  return s;
}

double RssMb(int pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  }
  return 0;
}

double SelfCpuSeconds() {
  rusage u;
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_utime.tv_usec / 1e6 + u.ru_stime.tv_sec +
         u.ru_stime.tv_usec / 1e6;
}

// Parses the varint at data[*pos]; false when it runs past `size`.
bool ReadVarint(const uint8_t* data, size_t size, size_t* pos, uint64_t* value) {
  *value = 0;
  for (int shift = 0; shift < 64 && *pos < size; shift += 7) {
    const uint8_t byte = data[(*pos)++];
    *value |= static_cast<uint64_t>(byte & 0x7f) << shift;
    if ((byte & 0x80) == 0) return true;
  }
  return false;
}

// One simulated worker: a raw (ByteBuffer) Session stream. A real worker parses only its own
// copy of each Plan; this process plays thousands of workers, so it reads just the epoch of a
// Plan (field 1 of Plan, serialised first) instead of parsing the whole member list.
class SimWorker final : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  SimWorker(uint64_t id, uint64_t fingerprint, grpc::GenericStub* stub, const std::string& token)
      : id_(id), fingerprint_(fingerprint) {
    coordinator::AttachToken(&ctx_, token);
    stub->PrepareBidiStreamingCall(&ctx_, "/spotrain.proto.Coordinator/Session", {}, this);
    proto::WorkerMessage hello;
    hello.mutable_hello()->set_worker_id(id_);
    Write(hello);
    StartRead(&in_);
    StartCall();
  }

  void Write(const proto::WorkerMessage& m) {
    grpc::ByteBuffer bytes;
    bool own = false;
    (void)grpc::SerializationTraits<proto::WorkerMessage>::Serialize(m, &bytes, &own);
    const grpc::ByteBuffer* next = nullptr;
    {
      absl::MutexLock lock(&mu_);
      if (done_) return;
      queue_.push_back(std::move(bytes));
      if (!writing_) {
        writing_ = true;
        next = &queue_.front();
      }
    }
    if (next != nullptr) StartWrite(next);
  }

  // Sends a heartbeat unless one is still queued (never piles up).
  void Heartbeat() {
    if (silent_) return;
    {
      absl::MutexLock lock(&mu_);
      if (queue_.size() > 1) return;
    }
    proto::WorkerMessage m;
    m.mutable_heartbeat()->set_epoch(epoch_);
    m.mutable_heartbeat()->set_completed_steps(epoch_ > 0 ? 0 : -1);
    Write(m);
    last_heartbeat_ = absl::Now();
  }

  void OnWriteDone(bool ok) override {
    const grpc::ByteBuffer* next = nullptr;
    {
      absl::MutexLock lock(&mu_);
      queue_.pop_front();
      if (!ok) queue_.clear();
      if (!queue_.empty()) {
        next = &queue_.front();
      } else {
        writing_ = false;
      }
    }
    if (next != nullptr) StartWrite(next);
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;
    const absl::Time now = absl::Now();
    std::vector<grpc::Slice> slices;
    (void)in_.Dump(&slices);
    std::string head;
    for (const grpc::Slice& slice : slices) {
      head.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
      if (head.size() >= 32) break;
    }
    const auto* data = reinterpret_cast<const uint8_t*>(head.data());
    if (!head.empty() && (data[0] >> 3) == proto::CoordinatorMessage::kPlanFieldNumber) {
      size_t pos = 1;
      uint64_t length = 0, tag = 0, epoch = 0;
      if (ReadVarint(data, head.size(), &pos, &length) &&
          ReadVarint(data, head.size(), &pos, &tag) && tag == 0x08 &&
          ReadVarint(data, head.size(), &pos, &epoch)) {
        absl::MutexLock lock(&mu_);
        epoch_ = static_cast<int64_t>(epoch);
        plan_time_ = now;
      }
    } else {
      proto::CoordinatorMessage m;
      if (grpc::SerializationTraits<proto::CoordinatorMessage>::Deserialize(&in_, &m).ok() &&
          m.has_prepare()) {
        {
          absl::MutexLock lock(&mu_);
          if (prepare_time_ == absl::InfiniteFuture() && m.prepare().epoch() > epoch_) {
            prepare_time_ = now;
          }
        }
        proto::WorkerMessage ready;
        ready.mutable_ready()->set_epoch(m.prepare().epoch());
        ready.mutable_ready()->set_completed_steps(epoch_ > 0 ? 0 : -1);
        ready.mutable_ready()->set_held_fingerprint(fingerprint_);
        Write(ready);
      }
    }
    in_.Clear();
    StartRead(&in_);
  }

  void OnDone(const grpc::Status& status) override {
    static std::atomic<bool> reported{false};
    if (!status.ok() && !cancelled_ && !reported.exchange(true)) {
      std::fprintf(stderr, "first unexpected end of a session: %d %s\n",
                   static_cast<int>(status.error_code()), status.error_message().c_str());
    }
    absl::MutexLock lock(&mu_);
    done_ = true;
    ended_ = true;
  }

  // Forget the times of the last transition.
  void ResetTimes() {
    absl::MutexLock lock(&mu_);
    prepare_time_ = plan_time_ = absl::InfiniteFuture();
  }
  absl::Time prepare_time() {
    absl::MutexLock lock(&mu_);
    return prepare_time_;
  }
  absl::Time plan_time() {
    absl::MutexLock lock(&mu_);
    return plan_time_;
  }
  int64_t epoch() const { return epoch_; }
  bool ended() {
    absl::MutexLock lock(&mu_);
    return ended_;
  }
  void Silence() { silent_ = true; }
  absl::Time last_heartbeat() const { return last_heartbeat_; }
  void Cancel() {
    cancelled_ = true;
    ctx_.TryCancel();
  }

 private:
  const uint64_t id_;
  const uint64_t fingerprint_;
  grpc::ClientContext ctx_;
  grpc::ByteBuffer in_;
  absl::Mutex mu_;
  std::deque<grpc::ByteBuffer> queue_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  bool ended_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time prepare_time_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  absl::Time plan_time_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  std::atomic<int64_t> epoch_{0};
  std::atomic<bool> silent_{false};
  std::atomic<bool> cancelled_{false};
  std::atomic<absl::Time> last_heartbeat_{absl::InfinitePast()};
};

template <typename Pred>
bool WaitFor(Pred pred, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (pred()) return true;
    absl::SleepFor(absl::Milliseconds(2));
  }
  return pred();
}

int Run() {
  const int n = absl::GetFlag(FLAGS_workers);
  const int pid = absl::GetFlag(FLAGS_coordinator_pid);
  auto token = coordinator::ReadRunToken(absl::GetFlag(FLAGS_token_file));
  if (!token.ok()) {
    std::fprintf(stderr, "%s\n", std::string(token.status().message()).c_str());
    return 2;
  }
  const int per_channel = std::max(1, absl::GetFlag(FLAGS_per_channel));
  std::vector<std::unique_ptr<proto::Coordinator::Stub>> stubs;
  std::vector<std::unique_ptr<grpc::GenericStub>> generic_stubs;
  for (int c = 0; c * per_channel < n; ++c) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // one TCP connection per channel
    args.SetInt("spotrain.bench.channel", c);
    args.SetMaxReceiveMessageSize(64 << 20);
    auto channel = grpc::CreateCustomChannel(absl::GetFlag(FLAGS_coordinator),
                                             grpc::InsecureChannelCredentials(), args);
    stubs.push_back(proto::Coordinator::NewStub(channel));
    generic_stubs.push_back(std::make_unique<grpc::GenericStub>(channel));
  }

  // Join everyone (at most 256 Joins in flight), then open the Sessions.
  const absl::Time join_start = absl::Now();
  std::vector<uint64_t> ids(n, 0);
  std::atomic<uint64_t> fingerprint{0};
  std::atomic<int> in_flight{0}, joined{0}, failed{0};
  struct Call {
    grpc::ClientContext ctx;
    proto::JoinRequest request;
    proto::JoinResponse response;
  };
  std::vector<std::unique_ptr<Call>> calls(n);
  for (int i = 0; i < n; ++i) {
    while (in_flight.load() >= 256) absl::SleepFor(absl::Microseconds(200));
    calls[i] = std::make_unique<Call>();
    Call* call = calls[i].get();
    coordinator::AttachToken(&call->ctx, *token);
    call->request.set_name(absl::StrCat("sim", i));
    call->request.set_advertise_host(absl::StrCat("10.0.", i / 256, ".", i % 256));
    call->request.set_device("cpu");
    call->request.set_held_step(-1);
    ++in_flight;
    stubs[i / per_channel]->async()->Join(&call->ctx, &call->request, &call->response,
                                          [&, i, call](grpc::Status s) {
                                            if (s.ok()) {
                                              ids[i] = call->response.worker_id();
                                              fingerprint = call->response.run_fingerprint();
                                              ++joined;
                                            } else {
                                              ++failed;
                                            }
                                            --in_flight;
                                          });
  }
  WaitFor([&] { return joined + failed == n; }, absl::Minutes(5));
  if (failed > 0) {
    std::fprintf(stderr, "%d Joins failed\n", failed.load());
    return 1;
  }
  const double join_s = absl::ToDoubleSeconds(absl::Now() - join_start);
  std::vector<std::unique_ptr<SimWorker>> workers;
  for (int i = 0; i < n; ++i) {
    workers.push_back(std::make_unique<SimWorker>(ids[i], fingerprint.load(),
                                                  generic_stubs[i / per_channel].get(), *token));
  }

  // Heartbeats at 1 Hz, spread evenly over the period.
  std::atomic<bool> running{true};
  const absl::Duration period = absl::Milliseconds(absl::GetFlag(FLAGS_heartbeat_ms));
  std::thread heartbeats([&] {
    const absl::Time start = absl::Now();
    std::vector<absl::Time> next(n);
    for (int i = 0; i < n; ++i) next[i] = start + period * i / n;
    while (running) {
      const absl::Time now = absl::Now();
      for (int i = 0; i < n; ++i) {
        if (next[i] <= now) {
          workers[i]->Heartbeat();
          next[i] += period;
          if (next[i] < now) next[i] = now + period;
        }
      }
      absl::SleepFor(absl::Milliseconds(5));
    }
  });

  // The first plan reaches everyone.
  const absl::Time sessions_opened = absl::Now();
  const bool planned = WaitFor(
      [&] {
        for (auto& w : workers) {
          if (w->epoch() == 0) return false;
        }
        return true;
      },
      absl::Minutes(3));
  const double first_plan_s = absl::ToDoubleSeconds(absl::Now() - sessions_opened);
  if (!planned) std::fprintf(stderr, "not every worker got the first plan\n");

  // Steady state: heartbeats only.
  absl::SleepFor(absl::Seconds(2));
  const CpuSample cpu0 = pid > 0 ? ProcessCpu(pid) : CpuSample{};
  const double self0 = SelfCpuSeconds();
  const absl::Time steady_start = absl::Now();
  absl::SleepFor(absl::Seconds(absl::GetFlag(FLAGS_steady_s)));
  const CpuSample cpu1 = pid > 0 ? ProcessCpu(pid) : CpuSample{};
  const double wall = absl::ToDoubleSeconds(absl::Now() - steady_start);
  const double coordinator_cpu =
      pid > 0 ? 100.0 * (cpu1.seconds - cpu0.seconds) / absl::ToDoubleSeconds(cpu1.at - cpu0.at)
              : -1;
  const double self_cpu = 100.0 * (SelfCpuSeconds() - self0) / wall;
  const double rss = pid > 0 ? RssMb(pid) : -1;

  double detection_ms = -1, delivery_ms = -1, total_ms = -1;
  if (absl::GetFlag(FLAGS_kill_one) && n >= 2 && planned) {
    for (auto& w : workers) w->ResetTimes();
    SimWorker& victim = *workers.back();
    const int64_t old_epoch = victim.epoch();
    // Die silently right after a heartbeat: the stream stays open, nothing more is sent.
    const absl::Time before = victim.last_heartbeat();
    WaitFor([&] { return victim.last_heartbeat() != before; }, absl::Seconds(5));
    victim.Silence();
    const absl::Time death = victim.last_heartbeat();
    const bool replanned = WaitFor(
        [&] {
          for (int i = 0; i + 1 < n; ++i) {
            if (workers[i]->epoch() <= old_epoch) return false;
          }
          return true;
        },
        absl::Minutes(2));
    if (replanned) {
      absl::Time first_prepare = absl::InfiniteFuture(), last_plan = absl::InfinitePast();
      for (int i = 0; i + 1 < n; ++i) {
        first_prepare = std::min(first_prepare, workers[i]->prepare_time());
        last_plan = std::max(last_plan, workers[i]->plan_time());
      }
      detection_ms = absl::ToDoubleMilliseconds(first_prepare - death);
      delivery_ms = absl::ToDoubleMilliseconds(last_plan - first_prepare);
      total_ms = absl::ToDoubleMilliseconds(last_plan - death);
    } else {
      std::fprintf(stderr, "the survivors did not all get a new plan\n");
    }
  }
  running = false;
  heartbeats.join();

  if (absl::GetFlag(FLAGS_header)) {
    std::printf("%8s %8s %12s %10s %10s %9s %11s %11s %12s %10s %13s\n", "workers", "channels",
                "coord_cpu_%", "coord_rss", "load_cpu_%", "join_s", "1st_plan_s", "detect_ms",
                "plan_all_ms", "total_ms", "plan_sent_ms");
  }
  std::printf("%8d %8zu %12.1f %8.1fMB %10.1f %9.2f %11.2f %11.0f %12.0f %10.0f\n", n, stubs.size(),
              coordinator_cpu, rss, self_cpu, join_s, first_plan_s, detection_ms, delivery_ms,
              total_ms);
  std::fflush(stdout);
  for (auto& w : workers) w->Cancel();
  WaitFor(
      [&] {
        for (auto& w : workers) {
          if (!w->ended()) return false;
        }
        return true;
      },
      absl::Seconds(30));
  return 0;
}

}  // namespace
}  // namespace spotrain::bench

int main(int argc, char** argv) {
  spotrain::common::ParseFlags(argc, argv,
                               "N simulated worker sessions against a running coordinator",
                               "bench/coordinator_load.cc");
  return spotrain::bench::Run();
}
