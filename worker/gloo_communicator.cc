#include "worker/gloo_communicator.h"

#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <exception>
#include <mutex>
#include <typeinfo>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "gloo/broadcast.h"
#include "gloo/common/error.h"
#include "gloo/common/logging.h"
#include "gloo/rendezvous/context.h"
#include "gloo/transport/context.h"
#include "gloo/transport/tcp/device.h"
#include "gloo/transport/unbound_buffer.h"
#include "gloo/types.h"
#include "worker/fixed_point.h"

namespace spotrain::worker {
namespace gloo_internal {

// gloo::transport::tcp::Context::signalException(const std::string&): marks every pair of a
// TCP context as failed with an IoException carrying `message`, wakes every send/receive
// posted on those pairs, and closes their sockets. Gloo calls it itself (from the user
// thread, concurrently with its device thread) when an operation times out; the pairs take
// their own locks. The member is protected and its header (gloo/transport/tcp/context.h)
// includes a header this Gloo package does not ship, so it is bound here by its symbol
// name: a non-virtual member function taking (this, const std::string&) has the same
// calling convention as this free function. Call it only on an object whose dynamic type
// is exactly gloo::transport::tcp::Context (checked by IsTcpContext below). A Gloo build
// without the symbol fails at link time, not at run time.
void TcpContextSignalException(void* tcp_context, const std::string& message) __asm__(
    "_ZN4gloo9transport3tcp7Context15signalExceptionERKNSt7__cxx1112basic_stringIcSt11char_"
    "traitsIcESaIcEEE");

}  // namespace gloo_internal

namespace {

constexpr char kTcpContextTypeName[] = "N4gloo9transport3tcp7ContextE";

bool IsTcpContext(const gloo::transport::Context& context) {
  return std::strcmp(typeid(context).name(), kTcpContextTypeName) == 0;
}

// gloo::rendezvous::Context with access to its transport context (a protected member).
class EpochContext : public gloo::rendezvous::Context {
 public:
  using gloo::rendezvous::Context::Context;
  gloo::transport::Context* transport_context() const { return transportContext_.get(); }
};

template <typename T>
void SumInto(void* out, const void* a, const void* b, size_t n);

template <>
void SumInto<float>(void* out, const void* a, const void* b, size_t n) {
  float* o = static_cast<float*>(out);
  const float* x = static_cast<const float*>(a);
  const float* y = static_cast<const float*>(b);
  for (size_t i = 0; i < n; ++i) o[i] = x[i] + y[i];
}

template <>
void SumInto<int64_t>(void* out, const void* a, const void* b, size_t n) {
  int64_t* o = static_cast<int64_t*>(out);
  const int64_t* x = static_cast<const int64_t*>(a);
  const int64_t* y = static_cast<const int64_t*>(b);
  // Unsigned addition wraps instead of overflowing (undefined for signed integers).
  for (size_t i = 0; i < n; ++i) {
    o[i] = static_cast<int64_t>(static_cast<uint64_t>(x[i]) + static_cast<uint64_t>(y[i]));
  }
}

// The slot prefix of the messages of this module's ring collectives (all-reduce, fixed-point
// all-reduce, barrier): distinct from Gloo's own collectives (gloo/types.h uses 0x01-0x08),
// so with the per-call tag no other operation's message can match their receives.
constexpr uint8_t kRingSlotPrefix = 0x53;

bool LooksLikeTimeout(const std::string& what) {
  const std::string lower = absl::AsciiStrToLower(what);
  return absl::StrContains(lower, "timed out") || absl::StrContains(lower, "timeout");
}

class GlooCommunicator : public Communicator {
 public:
  // `context` is null for world size 1.
  GlooCommunicator(int64_t epoch, int rank, int world_size, const GlooOptions& options,
                   std::shared_ptr<EpochContext> context)
      : epoch_(epoch),
        rank_(rank),
        world_size_(world_size),
        op_timeout_(options.op_timeout),
        max_chunk_bytes_(std::max<int64_t>(options.max_chunk_bytes, 1)),
        context_(std::move(context)) {
    if (context_ != nullptr) {
      gloo::transport::Context* transport = context_->transport_context();
      if (transport != nullptr && IsTcpContext(*transport)) {
        tcp_context_ = transport;
      } else {
        SPOTRAIN_LOG(Warning,
                     "gloo: transport context is not gloo::transport::tcp::Context; Abort() "
                     "will only close connections (a blocked op waits for its timeout)");
      }
    }
  }

  ~GlooCommunicator() override = default;

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }

  absl::Status AllReduceSum(float* data, int64_t n) override {
    return AllReduce<float>(data, n, "all-reduce(float)");
  }
  absl::Status AllReduceSum(int64_t* data, int64_t n) override {
    return AllReduce<int64_t>(data, n, "all-reduce(int64)");
  }

  // Ring reduce-scatter of the int64 sums, conversion of the slice this rank owns, ring
  // all-gather of the floats, per segment of at most max_chunk_bytes_ of int64s. 12 bytes per
  // element cross the wire per rank (x (W-1)/W) instead of the 16 of an int64 all-reduce, and each
  // rank converts 1/W of the elements.
  absl::Status AllReduceFixedPoint(int64_t* acc, int64_t n, double factor, float* out) override {
    if (n < 0 || (n > 0 && (acc == nullptr || out == nullptr))) {
      return absl::InvalidArgumentError(
          absl::StrCat("all-reduce(fixed point): bad buffers (", n, " elements)"));
    }
    absl::Status status = CheckUsable();
    if (!status.ok()) return status;
    if (world_size_ == 1 || n == 0) {
      FromFixedPoint(acc, n, factor, out);
      return absl::OkStatus();
    }
    const int64_t segment =
        std::max<int64_t>(world_size_, max_chunk_bytes_ / int64_t{sizeof(int64_t)});
    for (int64_t offset = 0; offset < n; offset += segment) {
      const int64_t count = std::min(segment, n - offset);
      status = RunGloo("all-reduce(fixed point)",
                       [&] { RingFixedPoint(acc + offset, count, factor, out + offset); });
      if (!status.ok()) return status;
    }
    return absl::OkStatus();
  }

  absl::Status Broadcast(void* data, int64_t bytes, int root) override {
    if (bytes < 0 || (bytes > 0 && data == nullptr)) {
      return absl::InvalidArgumentError(absl::StrCat("broadcast: bad buffer (", bytes, " bytes)"));
    }
    if (root < 0 || root >= world_size_) {
      return absl::InvalidArgumentError(
          absl::StrCat("broadcast: root ", root, " outside [0, ", world_size_, ")"));
    }
    absl::Status status = CheckUsable();
    if (!status.ok() || bytes == 0 || world_size_ == 1) return status;
    uint8_t* base = static_cast<uint8_t*>(data);
    for (int64_t offset = 0; offset < bytes; offset += max_chunk_bytes_) {
      const int64_t count = std::min(max_chunk_bytes_, bytes - offset);
      status = RunGloo("broadcast", [&] {
        gloo::BroadcastOptions opts(context_);
        std::unique_ptr<gloo::transport::UnboundBuffer> buffer =
            context_->createUnboundBuffer(base + offset, static_cast<size_t>(count));
        ActiveBuffer active(this, buffer.get());
        opts.setOutput<uint8_t>(std::move(buffer));
        opts.setRoot(root);
        opts.setTag(next_tag_++);
        opts.setTimeout(ToMillis(op_timeout_));
        gloo::broadcast(opts);
      });
      if (!status.ok()) return status;
    }
    return absl::OkStatus();
  }

  absl::Status Barrier() override {
    absl::Status status = CheckUsable();
    if (!status.ok() || world_size_ == 1) return status;
    // A ring all-reduce of one element: no rank can finish it before every rank has
    // contributed.
    int64_t one = 1;
    return RunGloo("barrier", [&] { RingAllReduce<int64_t>(&one, 1); });
  }

  void Abort() override {
    aborted_.store(true);
    {
      absl::MutexLock lock(&mu_);
      if (status_.ok()) {
        status_ = absl::AbortedError(
            absl::StrCat("communicator of epoch ", epoch_, " (rank ", rank_, ") was aborted"));
      }
    }
    if (context_ == nullptr) return;
    // First fail every pair (closing the sockets, so no more data lands in user buffers),
    // then release the waits on our own buffers.
    Poison(absl::StrCat("aborted: communicator of epoch ", epoch_, " rank ", rank_));
    absl::MutexLock lock(&mu_);
    for (gloo::transport::UnboundBuffer* buffer : active_buffers_) {
      buffer->abortWaitRecv();
      buffer->abortWaitSend();
    }
  }

  absl::Status status() const override {
    absl::MutexLock lock(&mu_);
    return status_;
  }

 private:
  // Registers a user buffer of the operation in flight so that Abort() can release waits
  // on it; unregistered before the buffer is destroyed.
  class ActiveBuffer {
   public:
    ActiveBuffer(GlooCommunicator* comm, gloo::transport::UnboundBuffer* buffer)
        : comm_(comm), buffer_(buffer) {
      absl::MutexLock lock(&comm_->mu_);
      comm_->active_buffers_.push_back(buffer_);
    }
    ~ActiveBuffer() {
      absl::MutexLock lock(&comm_->mu_);
      auto& v = comm_->active_buffers_;
      v.erase(std::remove(v.begin(), v.end(), buffer_), v.end());
    }
    ActiveBuffer(const ActiveBuffer&) = delete;
    ActiveBuffer& operator=(const ActiveBuffer&) = delete;

   private:
    GlooCommunicator* const comm_;
    gloo::transport::UnboundBuffer* const buffer_;
  };

  static std::chrono::milliseconds ToMillis(absl::Duration d) {
    return std::max(std::chrono::milliseconds(1), absl::ToChronoMilliseconds(d));
  }

  absl::Status CheckUsable() const {
    absl::MutexLock lock(&mu_);
    return status_;
  }

  // Slice k of a segment of `count` elements among the world_size_ ranks: contiguous, the
  // first count % W slices one element longer. Returns {begin, length}; k is taken mod W.
  std::pair<int64_t, int64_t> Slice(int64_t count, int k) const {
    const int w = world_size_;
    k = ((k % w) + w) % w;
    const int64_t base = count / w, extra = count % w;
    const int64_t begin = k * base + std::min<int64_t>(k, extra);
    return {begin, base + (k < extra ? 1 : 0)};
  }

  // The ring collectives below post every receive and send on a user buffer or on
  // scratch_, each registered with ActiveBuffer, never on a buffer inside Gloo: Abort()
  // can then release every wait of an operation in flight, whatever state the transfer is
  // in (Gloo's own all-reduce waits on an internal buffer that a peer lost in the middle of
  // a message leaves blocked until the op timeout). They throw Gloo's exceptions (RunGloo
  // turns them into the sticky status) and return false when a wait was aborted. Messages
  // on a link are matched in the order they are posted, and both ends of a link skip the
  // same empty slices.

  // Reduce-scatter of `count` elements of `data`: at step s, rank r sends its partial sum of
  // slice (r - s - 1) to its right neighbour and adds the partial sum of slice (r - s - 2)
  // that its left neighbour sends (received into `scratch`, at least one slice long); after
  // W - 1 steps it holds the complete sum of slice r.
  template <typename T>
  bool RingReduceScatter(T* data, int64_t count, gloo::transport::UnboundBuffer& data_buffer,
                         T* scratch, gloo::transport::UnboundBuffer& scratch_buffer,
                         uint64_t slot) {
    const int right = (rank_ + 1) % world_size_;
    const int left = (rank_ + world_size_ - 1) % world_size_;
    const std::chrono::milliseconds timeout = ToMillis(op_timeout_);
    for (int s = 0; s + 1 < world_size_; ++s) {
      const auto [send_begin, send_len] = Slice(count, rank_ - s - 1);
      const auto [recv_begin, recv_len] = Slice(count, rank_ - s - 2);
      if (recv_len > 0) scratch_buffer.recv(left, slot, 0, recv_len * sizeof(T));
      if (send_len > 0) {
        data_buffer.send(right, slot, send_begin * sizeof(T), send_len * sizeof(T));
      }
      if (recv_len > 0 && !scratch_buffer.waitRecv(timeout)) return false;
      if (send_len > 0 && !data_buffer.waitSend(timeout)) return false;
      SumInto<T>(data + recv_begin, data + recv_begin, scratch, static_cast<size_t>(recv_len));
    }
    return true;
  }

  // All-gather of `count` elements of size `element_bytes` in `buffer`, where slice r is
  // complete on rank r: at step s rank r sends finished slice (r - s) to the right and
  // receives slice (r - s - 1) from the left, in place.
  bool RingAllGather(int64_t count, size_t element_bytes, gloo::transport::UnboundBuffer& buffer,
                     uint64_t slot) {
    const int right = (rank_ + 1) % world_size_;
    const int left = (rank_ + world_size_ - 1) % world_size_;
    const std::chrono::milliseconds timeout = ToMillis(op_timeout_);
    for (int s = 0; s + 1 < world_size_; ++s) {
      const auto [send_begin, send_len] = Slice(count, rank_ - s);
      const auto [recv_begin, recv_len] = Slice(count, rank_ - s - 1);
      if (recv_len > 0)
        buffer.recv(left, slot, recv_begin * element_bytes, recv_len * element_bytes);
      if (send_len > 0)
        buffer.send(right, slot, send_begin * element_bytes, send_len * element_bytes);
      if (recv_len > 0 && !buffer.waitRecv(timeout)) return false;
      if (send_len > 0 && !buffer.waitSend(timeout)) return false;
    }
    return true;
  }

  // scratch_ with room for at least `bytes`, as a buffer for one call.
  std::unique_ptr<gloo::transport::UnboundBuffer> ScratchBuffer(int64_t bytes) {
    if (scratch_bytes_ < bytes) {
      scratch_ = std::make_unique<unsigned char[]>(static_cast<size_t>(bytes));
      scratch_bytes_ = bytes;
    }
    return context_->createUnboundBuffer(scratch_.get(), static_cast<size_t>(scratch_bytes_));
  }

  // One ring all-reduce of `count` elements in place. The result has the same bits on every
  // rank: each slice is summed once, on the way to its owner, and then copied.
  template <typename T>
  void RingAllReduce(T* data, int64_t count) {
    const uint64_t slot = gloo::Slot::build(kRingSlotPrefix, next_tag_++);
    std::unique_ptr<gloo::transport::UnboundBuffer> data_buffer =
        context_->createUnboundBuffer(data, static_cast<size_t>(count) * sizeof(T));
    std::unique_ptr<gloo::transport::UnboundBuffer> scratch_buffer =
        ScratchBuffer(Slice(count, 0).second * int64_t{sizeof(T)});
    ActiveBuffer active_data(this, data_buffer.get());
    ActiveBuffer active_scratch(this, scratch_buffer.get());
    if (!RingReduceScatter<T>(data, count, *data_buffer, reinterpret_cast<T*>(scratch_.get()),
                              *scratch_buffer, slot)) {
      return;
    }
    RingAllGather(count, sizeof(T), *data_buffer, slot);
  }

  // One segment of AllReduceFixedPoint: reduce-scatter of the int64 sums, conversion of the
  // slice this rank owns into `out`, all-gather of the floats straight into `out`. The
  // integer sums are exact, so every rank ends with exactly FromFixedPoint of the plain sum,
  // whatever the ring order.
  void RingFixedPoint(int64_t* acc, int64_t count, double factor, float* out) {
    const uint64_t slot = gloo::Slot::build(kRingSlotPrefix, next_tag_++);
    std::unique_ptr<gloo::transport::UnboundBuffer> acc_buffer =
        context_->createUnboundBuffer(acc, static_cast<size_t>(count) * sizeof(int64_t));
    std::unique_ptr<gloo::transport::UnboundBuffer> scratch_buffer =
        ScratchBuffer(Slice(count, 0).second * int64_t{sizeof(int64_t)});
    std::unique_ptr<gloo::transport::UnboundBuffer> out_buffer =
        context_->createUnboundBuffer(out, static_cast<size_t>(count) * sizeof(float));
    ActiveBuffer active_acc(this, acc_buffer.get());
    ActiveBuffer active_scratch(this, scratch_buffer.get());
    ActiveBuffer active_out(this, out_buffer.get());
    if (!RingReduceScatter<int64_t>(acc, count, *acc_buffer,
                                    reinterpret_cast<int64_t*>(scratch_.get()), *scratch_buffer,
                                    slot)) {
      return;
    }
    const auto [mine_begin, mine_len] = Slice(count, rank_);
    FromFixedPoint(acc + mine_begin, mine_len, factor, out + mine_begin);
    RingAllGather(count, sizeof(float), *out_buffer, slot);
  }

  template <typename T>
  absl::Status AllReduce(T* data, int64_t n, const char* op) {
    if (n < 0 || (n > 0 && data == nullptr)) {
      return absl::InvalidArgumentError(absl::StrCat(op, ": bad buffer (", n, " elements)"));
    }
    absl::Status status = CheckUsable();
    if (!status.ok() || n == 0 || world_size_ == 1) return status;
    const int64_t chunk = std::max<int64_t>(1, max_chunk_bytes_ / int64_t{sizeof(T)});
    for (int64_t offset = 0; offset < n; offset += chunk) {
      const int64_t count = std::min(chunk, n - offset);
      status = RunGloo(op, [&] { RingAllReduce<T>(data + offset, count); });
      if (!status.ok()) return status;
    }
    return absl::OkStatus();
  }

  // Runs one Gloo call and turns whatever it throws into the communicator's sticky status.
  template <typename Fn>
  absl::Status RunGloo(const char* op, Fn&& fn) {
    absl::Status status = CheckUsable();
    if (!status.ok()) return status;
    try {
      fn();
    } catch (const gloo::IoException& e) {
      return Fail(op, e.what());
    } catch (const gloo::EnforceNotMet& e) {
      return Fail(op, e.what());
    } catch (const gloo::Exception& e) {
      return Fail(op, e.what());
    } catch (const std::exception& e) {
      return Fail(op, e.what());
    } catch (...) {
      return Fail(op, "unknown exception");
    }
    // An aborted wait can make Gloo return normally with an incomplete result.
    if (aborted_.load()) return CheckUsable();
    return absl::OkStatus();
  }

  absl::Status Fail(const char* op, const std::string& what) {
    absl::Status result;
    bool first = false;
    {
      absl::MutexLock lock(&mu_);
      if (status_.ok()) {
        const std::string where =
            absl::StrCat(" (epoch ", epoch_, ", rank ", rank_, " of ", world_size_, "): ");
        if (LooksLikeTimeout(what)) {
          status_ = absl::UnavailableError(absl::StrCat(
              op, " timed out after ", absl::FormatDuration(op_timeout_), where,
              "a peer stalled or is gone; rebuild the group in a new epoch. gloo: ", what));
        } else {
          status_ = absl::UnavailableError(absl::StrCat(
              op, " failed", where,
              "a peer is gone or a connection broke; rebuild the group in a new epoch. gloo: ",
              what));
        }
        first = true;
      }
      result = status_;
    }
    if (first) {
      SPOTRAIN_LOG(Warning, "gloo: %s", std::string(result.message()));
      // Close every connection now, so that ranks that are not our ring neighbours see the
      // failure at once instead of after their own timeout.
      Poison(std::string(result.message()));
    }
    return result;
  }

  // Thread-safe (Gloo's pairs take their own locks); may run on the owner thread and on an
  // Abort() thread at the same time: only the first call has an effect on each pair.
  void Poison(const std::string& message) {
    if (tcp_context_ != nullptr) {
      gloo_internal::TcpContextSignalException(tcp_context_, message);
    } else if (context_ != nullptr) {
      context_->closeConnections();
    }
  }

  const int64_t epoch_;
  const int rank_;
  const int world_size_;
  const absl::Duration op_timeout_;
  const int64_t max_chunk_bytes_;
  const std::shared_ptr<EpochContext> context_;
  // The tcp transport context of context_ when its type was verified; else null.
  gloo::transport::Context* tcp_context_ = nullptr;

  // Owner thread only: the tag of the next Gloo call (distinct tags make a mismatched
  // collective sequence time out rather than mix data).
  uint32_t next_tag_ = 1;
  // Owner thread only: the ring collectives' receive buffer (one slice of a segment; new[]
  // aligns it for any element type), kept between calls.
  std::unique_ptr<unsigned char[]> scratch_;
  int64_t scratch_bytes_ = 0;

  std::atomic<bool> aborted_{false};
  mutable absl::Mutex mu_;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  std::vector<gloo::transport::UnboundBuffer*> active_buffers_ ABSL_GUARDED_BY(mu_);
};

// Gloo writes to its sockets without MSG_NOSIGNAL, so a write to a connection the peer has
// closed raises SIGPIPE, whose default action kills the process: exactly the event this
// module must survive. Processes that embed Gloo usually ignore SIGPIPE (Python does at
// start-up); do the same unless the program installed a handler of its own.
void IgnoreSigpipeUnlessHandled() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction current;
    if (sigaction(SIGPIPE, nullptr, &current) != 0) return;
    if (!(current.sa_flags & SA_SIGINFO) && current.sa_handler == SIG_DFL) {
      struct sigaction ignore = {};
      ignore.sa_handler = SIG_IGN;
      sigemptyset(&ignore.sa_mask);
      sigaction(SIGPIPE, &ignore, nullptr);
    }
  });
}

absl::Status RendezvousError(const KvRendezvousStore& store, int64_t epoch, int rank,
                             const GlooOptions& options, const std::string& what) {
  const std::string where = absl::StrCat("gloo rendezvous for epoch ", epoch, " (rank ", rank);
  const absl::Status& kv_error = store.first_error();
  if (!kv_error.ok()) {
    if (kv_error.code() == absl::StatusCode::kDeadlineExceeded) {
      return absl::UnavailableError(absl::StrCat(where, ") timed out: ", kv_error.message()));
    }
    return absl::Status(kv_error.code(), absl::StrCat(where, "): ", kv_error.message()));
  }
  if (LooksLikeTimeout(what)) {
    return absl::UnavailableError(absl::StrCat(where, ") timed out connecting to peers within ",
                                               absl::FormatDuration(options.connect_timeout), ": ",
                                               what));
  }
  return absl::UnavailableError(absl::StrCat(where, ") failed to connect to peers: ", what));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> CreateGlooCommunicator(KeyValueClient& kv,
                                                                     int64_t epoch, int rank,
                                                                     int world_size,
                                                                     const GlooOptions& options) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("gloo: rank ", rank, " / world size ", world_size, " is invalid"));
  }
  if (epoch < 0) {
    return absl::InvalidArgumentError(absl::StrCat("gloo: epoch ", epoch, " is negative"));
  }
  if (options.connect_timeout <= absl::ZeroDuration() ||
      options.op_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("gloo: connect_timeout and op_timeout must be positive");
  }
  if (world_size == 1) {
    return std::unique_ptr<Communicator>(
        new GlooCommunicator(epoch, rank, world_size, options, nullptr));
  }
  if (options.interface_host.empty()) {
    return absl::InvalidArgumentError("gloo: interface_host is empty");
  }

  IgnoreSigpipeUnlessHandled();
  std::shared_ptr<gloo::transport::Device> device;
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = options.interface_host;
    device = gloo::transport::tcp::CreateDevice(attr);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("gloo: cannot use interface_host '", options.interface_host,
                     "' (it must be an address of this host): ", e.what()));
  }

  auto context = std::make_shared<EpochContext>(rank, world_size);
  // Gloo waits up to 5x the pair timeout for the TCP connections; the store bounds the
  // rendezvous itself by connect_timeout.
  context->setTimeout(std::max(std::chrono::milliseconds(100),
                               absl::ToChronoMilliseconds(options.connect_timeout / 5)));
  KvRendezvousStore::Options store_options;
  store_options.timeout = options.connect_timeout;
  store_options.cancelled = options.cancelled;
  KvRendezvousStore store(kv, epoch, store_options);
  try {
    context->connectFullMesh(store, device);
  } catch (const gloo::EnforceNotMet& e) {
    return RendezvousError(store, epoch, rank, options, e.what());
  } catch (const std::exception& e) {
    return RendezvousError(store, epoch, rank, options, e.what());
  } catch (...) {
    return RendezvousError(store, epoch, rank, options, "unknown exception");
  }
  const std::chrono::milliseconds op_timeout =
      std::max(std::chrono::milliseconds(1), absl::ToChronoMilliseconds(options.op_timeout));
  context->setTimeout(op_timeout);
  if (gloo::transport::Context* transport = context->transport_context()) {
    transport->setTimeout(op_timeout);
  }
  return std::unique_ptr<Communicator>(
      new GlooCommunicator(epoch, rank, world_size, options, std::move(context)));
}

}  // namespace spotrain::worker
