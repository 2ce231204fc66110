// NCCL for the CPU emulator of the CUDA code (cuda_emulation.h): the functions
// worker/nccl_api.cu calls, over host memory and TCP on this machine, so that several
// emulated GPU workers (processes) form communicators of several ranks, lose peers, shrink and
// re-initialise as on GPUs.
//
// What it keeps of NCCL's behaviour (the parts spotrain's NCCL communicator relies on):
//   - Non-blocking communicators: ncclCommInitRankConfig and ncclCommShrink return
//     ncclInProgress and finish on a thread of their own; ncclCommGetAsyncError says when.
//   - ncclGetUniqueId starts the bootstrap root in the calling process (a thread); every rank
//     meets it there to learn the others' addresses; nranks must agree.
//   - Collectives are enqueued on the stream (emulated_streams.h) and return at once; the
//     stream stays busy until the data has moved. A peer that dies (its socket closes) sets
//     the async error ncclRemoteError, and the collective then hangs, as an NCCL kernel does,
//     until ncclCommRevoke or ncclCommAbort. A peer that stops (SIGSTOP) hangs it too.
//   - ncclCommShrink(parent, exclude) builds the child over the parent's other ranks,
//     renumbered in order, without a new unique id, also after a revoke; not while
//     collectives are in flight. A rank is ready once the hub has acknowledged its link.
//   - ncclCommRevoke stops in-flight collectives and refuses new ones: the state is
//     ncclInProgress until they have stopped, then ncclSuccess (NCCL 2.28's nccl.h).
//     ncclCommAbort frees the communicator at once.
// How data moves: the lowest rank is the hub of a star; an all-reduce sends every rank's
// buffer to it, which sums them in rank order and sends the sum back; a broadcast goes
// through it. Types: int8/uint8, int32/uint32, int64/uint64, float32, float64; sum only.
// Three switches make it behave as NCCL may elsewhere: SPOTRAIN_EMULATED_NCCL_SILENT_LOSS=1
// (a dead peer sets no async error, the collective only hangs),
// SPOTRAIN_EMULATED_NCCL_DEFER_MS=N (collectives return ncclInProgress and reach the stream
// N ms later) and SPOTRAIN_EMULATED_NCCL_REVOKE_MS=N (a revoke takes N ms to finish).
//
// Each process has one listening socket (127.0.0.1, a free port), started on first use; a
// connection says which communicator (a key) and which rank it is for.
#include <arpa/inet.h>
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "tests/emulation/emulated_streams.h"

namespace {

thread_local std::string g_last_error;

ncclResult_t Fail(ncclResult_t result, const std::string& why) {
  g_last_error = why;
  return result;
}

size_t ElementBytes(ncclDataType_t type) {
  switch (type) {
    case ncclInt8:
    case ncclUint8:
      return 1;
    case ncclFloat16:
    case ncclBfloat16:
      return 2;
    case ncclInt32:
    case ncclUint32:
    case ncclFloat32:
      return 4;
    case ncclInt64:
    case ncclUint64:
    case ncclFloat64:
      return 8;
    default:
      return 0;
  }
}

template <typename T>
void AddInto(void* acc, const void* in, size_t count) {
  T* a = static_cast<T*>(acc);
  const T* b = static_cast<const T*>(in);
  for (size_t i = 0; i < count; ++i) a[i] = static_cast<T>(a[i] + b[i]);
}

// acc += in, element-wise; false for a type the emulator does not sum.
bool Sum(ncclDataType_t type, void* acc, const void* in, size_t count) {
  switch (type) {
    case ncclInt8:
      AddInto<int8_t>(acc, in, count);
      return true;
    case ncclUint8:
      AddInto<uint8_t>(acc, in, count);
      return true;
    case ncclInt32:
      AddInto<int32_t>(acc, in, count);
      return true;
    case ncclUint32:
      AddInto<uint32_t>(acc, in, count);
      return true;
    case ncclInt64:
      AddInto<int64_t>(acc, in, count);
      return true;
    case ncclUint64:
      AddInto<uint64_t>(acc, in, count);
      return true;
    case ncclFloat32:
      AddInto<float>(acc, in, count);
      return true;
    case ncclFloat64:
      AddInto<double>(acc, in, count);
      return true;
    default:
      return false;
  }
}

// ---- sockets ----------------------------------------------------------------------------------

bool WriteAll(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

bool ReadAll(int fd, void* data, size_t n) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    const ssize_t k = recv(fd, p, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

bool WriteString(int fd, const std::string& s) {
  const uint32_t n = static_cast<uint32_t>(s.size());
  return WriteAll(fd, &n, sizeof(n)) && WriteAll(fd, s.data(), n);
}

bool ReadString(int fd, std::string* s, uint32_t max_bytes) {
  uint32_t n = 0;
  if (!ReadAll(fd, &n, sizeof(n)) || n > max_bytes) return false;
  s->resize(n);
  return ReadAll(fd, s->data(), n);
}

// A connected TCP socket to host:port, or -1.
int Connect(const std::string& host, int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1 ||
      connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

constexpr uint32_t kMagic = 0x434e5053;  // "SPNC"

// What a connection says first: the communicator's key, the sender's rank, its number of
// ranks and the port of its own listening socket.
struct Hello {
  std::string key;
  uint32_t rank = 0;
  uint32_t nranks = 0;
  uint32_t port = 0;
};

bool SendHello(int fd, const Hello& h) {
  const uint32_t head[4] = {kMagic, h.rank, h.nranks, h.port};
  return WriteAll(fd, head, sizeof(head)) && WriteString(fd, h.key);
}

// ---- the process's listening socket -------------------------------------------------------------

struct Arrival {
  int fd = -1;
  std::string host;  // the peer's address as seen here
  Hello hello;
};

class Listener {
 public:
  static Listener& Get() {
    static Listener* listener = new Listener;  // never destroyed: its thread runs to the end
    return *listener;
  }

  bool ok() const { return port_ > 0; }
  int port() const { return port_; }
  const std::string& host() const { return host_; }
  const std::string& error() const { return error_; }

  // The connection rank `rank` opened for `key`; nullopt-like (fd -1) once stop() is true.
  Arrival Take(const std::string& key, int rank, const std::function<bool()>& stop) {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      auto it = arrived_.find({key, rank});
      if (it != arrived_.end()) {
        Arrival a = std::move(it->second);
        arrived_.erase(it);
        return a;
      }
      if (stop()) return Arrival{};
      cv_.wait_for(lock, std::chrono::milliseconds(20));
    }
  }

  // Closes connections for `key` that nobody took (an aborted communicator's).
  void Forget(const std::string& key) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = arrived_.begin(); it != arrived_.end();) {
      if (it->first.first == key) {
        close(it->second.fd);
        it = arrived_.erase(it);
      } else {
        ++it;
      }
    }
  }

 private:
  Listener() {
    fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = 0;
    inet_pton(AF_INET, host_.c_str(), &addr.sin_addr);
    socklen_t len = sizeof(addr);
    if (fd_ < 0 || bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        listen(fd_, 64) != 0 || getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      error_ =
          std::string("the emulated NCCL cannot listen on ") + host_ + ": " + std::strerror(errno);
      return;
    }
    port_ = ntohs(addr.sin_port);
    std::thread([this] { AcceptLoop(); }).detach();
  }

  void AcceptLoop() {
    while (true) {
      sockaddr_in peer{};
      socklen_t len = sizeof(peer);
      const int fd = accept4(fd_, reinterpret_cast<sockaddr*>(&peer), &len, SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
          std::this_thread::sleep_for(std::chrono::milliseconds(100));  // wait for free fds
        }
        if (errno != EBADF && errno != EINVAL) continue;
        return;  // the listening socket itself is gone
      }
      // Each hello is read on a thread of its own, so that a peer stopped halfway through
      // one holds up no other connection.
      std::thread([this, fd, peer] { Register(fd, peer); }).detach();
    }
  }

  // Reads a new connection's hello and files the connection under (key, rank).
  void Register(int fd, sockaddr_in peer) {
    // A connection that does not say who it is within 10 s is dropped.
    timeval timeout{10, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    uint32_t head[4];
    Arrival a;
    if (!ReadAll(fd, head, sizeof(head)) || head[0] != kMagic ||
        !ReadString(fd, &a.hello.key, 1 << 16)) {
      close(fd);
      return;
    }
    timeval none{0, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof(none));
    const int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    a.fd = fd;
    a.hello.rank = head[1];
    a.hello.nranks = head[2];
    a.hello.port = head[3];
    char ip[INET_ADDRSTRLEN] = "";
    inet_ntop(AF_INET, &peer.sin_addr, ip, sizeof(ip));
    a.host = ip;
    std::lock_guard<std::mutex> lock(mu_);
    auto slot = std::make_pair(a.hello.key, static_cast<int>(a.hello.rank));
    auto old = arrived_.find(slot);
    if (old != arrived_.end()) close(old->second.fd);  // a retry replaces the first try
    arrived_[slot] = std::move(a);
    cv_.notify_all();
  }

  std::string host_ = "127.0.0.1";
  int fd_ = -1;
  int port_ = 0;
  std::string error_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::pair<std::string, int>, Arrival> arrived_;
};

// ---- communicators ------------------------------------------------------------------------------

struct Address {
  std::string host;
  int port = 0;
};

// The state of one communicator, shared by its handle, its bootstrap thread and the
// collectives in flight on the stream.
struct CommState {
  std::string key;
  int rank = 0;
  int nranks = 0;
  std::vector<Address> listeners;  // every rank's listening socket, once bootstrapped
  std::vector<int> links;          // lowest rank: links[r] to rank r; others: links[0]

  std::mutex mu;
  std::condition_variable cv;
  ncclResult_t init_state = ncclInProgress;  // the bootstrap's outcome
  ncclResult_t async_error = ncclSuccess;    // a collective's failure
  bool revoked = false;
  bool aborted = false;
  int in_flight = 0;          // collectives enqueued and not finished
  int deferred = 0;           // of those, not yet on the stream (DeferMs)
  uint64_t issued = 0;        // collectives enqueued so far (their numbers)
  int shrinks = 0;            // children made (their keys count them)
  std::vector<int> open_fds;  // every socket, for revoke / abort
  std::string error;          // for ncclGetLastError
  std::thread bootstrap;

  ~CommState() {
    for (int fd : open_fds) close(fd);
  }

  // Aborted or revoked: a bootstrap in progress gives up.
  bool stopped() {
    std::lock_guard<std::mutex> lock(mu);
    return aborted || revoked;
  }
  // Keeps `fd` for revoke / abort / the destructor; false (and not kept) once stopped.
  bool Track(int fd) {
    std::lock_guard<std::mutex> lock(mu);
    if (aborted || revoked) return false;
    open_fds.push_back(fd);
    return true;
  }
  void ShutdownLocked() {
    for (int fd : open_fds) shutdown(fd, SHUT_RDWR);
  }
  void Finish(ncclResult_t result, const std::string& why) {
    std::lock_guard<std::mutex> lock(mu);
    init_state = result;
    if (result != ncclSuccess) error = why;
    cv.notify_all();
  }
};

}  // namespace

struct ncclComm {
  std::shared_ptr<CommState> state;
};

namespace {

constexpr char kIdPrefix[] = "emulated-nccl";

// Connects to `to` for `key` until it answers, or -1 once the communicator is aborted or
// revoked.
int Dial(CommState& s, const Address& to, const std::string& key) {
  const Hello hello{key, static_cast<uint32_t>(s.rank), static_cast<uint32_t>(s.nranks),
                    static_cast<uint32_t>(Listener::Get().port())};
  while (!s.stopped()) {
    const int fd = Connect(to.host, to.port);
    if (fd >= 0) {
      if (SendHello(fd, hello) && s.Track(fd)) return fd;
      close(fd);  // not tracked: a failed try, or the communicator stopped meanwhile
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return -1;
}

// The star's links: the lowest rank takes one from every other rank, checks that they agree
// on the number of ranks, and acknowledges each once it has them all; a rank is ready only
// then (a hello the hub never takes leaves the sender in progress, as NCCL stays).
void ConnectLinks(CommState& s) {
  const std::string key = s.key + "/data";
  s.links.assign(s.nranks, -1);
  const uint8_t ack = 1;
  if (s.rank == 0) {
    for (int r = 1; r < s.nranks; ++r) {
      Arrival a = Listener::Get().Take(key, r, [&] { return s.stopped(); });
      if (a.fd < 0) return;  // aborted or revoked
      if (!s.Track(a.fd)) {
        close(a.fd);
        return;
      }
      s.links[r] = a.fd;
      if (static_cast<int>(a.hello.nranks) != s.nranks) {
        s.Finish(ncclInvalidUsage, "rank " + std::to_string(r) + " joins a communicator of " +
                                       std::to_string(a.hello.nranks) +
                                       " ranks, the lowest rank one of " +
                                       std::to_string(s.nranks) + " (different exclude lists?)");
        return;
      }
    }
    for (int r = 1; r < s.nranks; ++r) {
      if (!WriteAll(s.links[r], &ack, 1)) {
        if (!s.stopped()) s.Finish(ncclRemoteError, "a rank left while the links formed");
        return;
      }
    }
  } else {
    s.links[0] = Dial(s, s.listeners[0], key);
    if (s.links[0] < 0) return;
    uint8_t got = 0;
    if (!ReadAll(s.links[0], &got, 1) || got != ack) {
      if (!s.stopped()) {
        s.Finish(ncclRemoteError,
                 "the lowest rank closed the link before acknowledging it (it is gone, or the "
                 "ranks disagree on the number of ranks)");
      }
      return;
    }
  }
  s.Finish(ncclSuccess, "");
}

std::string EncodeListeners(const std::vector<Address>& listeners) {
  std::ostringstream out;
  for (const Address& a : listeners) out << a.host << ' ' << a.port << ' ';
  return out.str();
}

bool DecodeListeners(const std::string& text, int nranks, std::vector<Address>* listeners) {
  std::istringstream in(text);
  listeners->assign(nranks, Address{});
  for (Address& a : *listeners) {
    if (!(in >> a.host >> a.port)) return false;
  }
  return true;
}

std::mutex g_roots_mutex;
std::set<std::string> g_roots_unused;  // ids a one-rank communicator took: no rank will come

// The bootstrap root of one unique id, on a thread of the process that drew it (as NCCL's):
// takes every rank's hello (rank 0 first, which says how many ranks there are), then sends
// each the table of every rank's listener. Gives up after 10 minutes without all ranks, or
// when a one-rank communicator took the id.
void ServeRoot(std::string key) {
  const std::string boot = key + "/boot";
  Listener& listener = Listener::Get();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(10);
  const auto expired = [&] {
    std::lock_guard<std::mutex> lock(g_roots_mutex);
    return g_roots_unused.count(key) > 0 || std::chrono::steady_clock::now() > deadline;
  };
  std::vector<Arrival> ranks;
  ranks.push_back(listener.Take(boot, 0, expired));
  const int nranks = ranks[0].fd < 0 ? 0 : static_cast<int>(ranks[0].hello.nranks);
  for (int r = 1; r < nranks; ++r) {
    ranks.push_back(listener.Take(boot, r, expired));
    if (ranks.back().fd < 0) break;
  }
  bool agree = static_cast<int>(ranks.size()) == nranks && nranks > 0;
  std::vector<Address> table;
  for (const Arrival& a : ranks) {
    agree = agree && a.fd >= 0 && static_cast<int>(a.hello.nranks) == nranks;
    table.push_back(Address{a.host, static_cast<int>(a.hello.port)});
  }
  // Ranks that disagree on the number of ranks (or a rank that never came) get no table:
  // their connection closes and their init fails with the reason.
  const std::string text = agree ? EncodeListeners(table) : std::string();
  for (const Arrival& a : ranks) {
    if (a.fd < 0) continue;
    if (agree) WriteString(a.fd, text);
    close(a.fd);
  }
  listener.Forget(boot);
  std::lock_guard<std::mutex> lock(g_roots_mutex);
  g_roots_unused.erase(key);
}

// ncclCommInitRankConfig's work: meet at the id's root, learn every rank's listener, link.
void Bootstrap(CommState* sp, Address root) {
  CommState& s = *sp;
  const int fd = Dial(s, root, s.key + "/boot");
  if (fd < 0) return;  // aborted
  std::string table;
  if (!ReadString(fd, &table, 1 << 20) || !DecodeListeners(table, s.nranks, &s.listeners)) {
    if (!s.stopped()) {
      s.Finish(ncclRemoteError,
               "the bootstrap root closed the connection: its process is gone, or the ranks "
               "disagree on the number of ranks");
    }
    return;
  }
  ConnectLinks(s);
}

// ---- collectives --------------------------------------------------------------------------------

struct Header {
  uint64_t seq;
  uint64_t bytes;
};

bool SendBlock(int fd, uint64_t seq, const void* data, size_t bytes) {
  const Header h{seq, bytes};
  return WriteAll(fd, &h, sizeof(h)) && WriteAll(fd, data, bytes);
}

// Reads one block of exactly `bytes` for operation `seq`; *why says what went wrong.
bool ReceiveBlock(int fd, uint64_t seq, void* data, size_t bytes, std::string* why) {
  Header h{};
  if (!ReadAll(fd, &h, sizeof(h))) {
    *why = "a peer closed its connection (it is gone)";
    return false;
  }
  if (h.seq != seq || h.bytes != bytes) {
    *why = "ranks issued different collectives (operation " + std::to_string(seq) + ", " +
           std::to_string(bytes) + " bytes here; a peer sent operation " + std::to_string(h.seq) +
           ", " + std::to_string(h.bytes) + " bytes)";
    return false;
  }
  if (!ReadAll(fd, data, bytes)) {
    *why = "a peer closed its connection mid-collective (it is gone)";
    return false;
  }
  return true;
}

bool RunAllReduce(CommState& s, uint64_t seq, void* buffer, size_t count, ncclDataType_t type,
                  std::string* why) {
  const size_t bytes = count * ElementBytes(type);
  if (s.rank != 0) {
    if (!SendBlock(s.links[0], seq, buffer, bytes)) {
      *why = "the lowest rank closed its connection (it is gone)";
      return false;
    }
    return ReceiveBlock(s.links[0], seq, buffer, bytes, why);
  }
  std::vector<char> incoming(bytes);
  for (int r = 1; r < s.nranks; ++r) {  // in rank order: the same sum every time
    if (!ReceiveBlock(s.links[r], seq, incoming.data(), bytes, why)) return false;
    Sum(type, buffer, incoming.data(), count);
  }
  for (int r = 1; r < s.nranks; ++r) {
    if (!SendBlock(s.links[r], seq, buffer, bytes)) {
      *why = "rank " + std::to_string(r) + " closed its connection (it is gone)";
      return false;
    }
  }
  return true;
}

bool RunBroadcast(CommState& s, uint64_t seq, void* buffer, size_t bytes, int root,
                  std::string* why) {
  if (s.rank == 0) {
    if (root != 0 && !ReceiveBlock(s.links[root], seq, buffer, bytes, why)) return false;
    for (int r = 1; r < s.nranks; ++r) {
      if (r == root) continue;
      if (!SendBlock(s.links[r], seq, buffer, bytes)) {
        *why = "rank " + std::to_string(r) + " closed its connection (it is gone)";
        return false;
      }
    }
    return true;
  }
  if (s.rank == root) {
    if (SendBlock(s.links[0], seq, buffer, bytes)) return true;
    *why = "the lowest rank closed its connection (it is gone)";
    return false;
  }
  return ReceiveBlock(s.links[0], seq, buffer, bytes, why);
}

// SPOTRAIN_EMULATED_NCCL_SILENT_LOSS=1: a peer that is gone sets no async error; the
// collective just hangs (as over NVLink / shared memory on one node, where nothing reports a
// dead process) until a deadline or the coordinator makes its owner revoke or abort.
bool SilentPeerLoss() {
  const char* v = std::getenv("SPOTRAIN_EMULATED_NCCL_SILENT_LOSS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// SPOTRAIN_EMULATED_NCCL_DEFER_MS=N (> 0): every collective returns ncclInProgress and reaches
// the stream N ms later (ncclCommGetAsyncError says ncclInProgress until then), as a
// non-blocking NCCL call may; the caller must not order stream work after it before that.
int DeferMs() {
  const char* v = std::getenv("SPOTRAIN_EMULATED_NCCL_DEFER_MS");
  return v == nullptr ? 0 : std::atoi(v);
}

// SPOTRAIN_EMULATED_NCCL_REVOKE_MS=N (> 0): a collective in flight when its communicator is
// revoked takes N ms more to stop (an abort still stops it at once), so that a revoke can
// outlast its caller's patience.
int RevokeMs() {
  const char* v = std::getenv("SPOTRAIN_EMULATED_NCCL_REVOKE_MS");
  return v == nullptr ? 0 : std::atoi(v);
}

// Enqueues `run` on the stream as one collective of `comm`. A failure sets the async error
// and leaves the collective hanging until a revoke or an abort, as a failed NCCL kernel does.
ncclResult_t Enqueue(ncclComm_t comm, cudaStream_t stream, const char* what,
                     std::function<bool(CommState&, uint64_t, std::string*)> run) {
  if (comm == nullptr) return Fail(ncclInvalidArgument, std::string(what) + " on no communicator");
  std::shared_ptr<CommState> s = comm->state;
  uint64_t seq = 0;
  {
    std::lock_guard<std::mutex> lock(s->mu);
    if (s->init_state != ncclSuccess || s->revoked || s->async_error != ncclSuccess) {
      return Fail(ncclInvalidUsage, std::string(what) + " on a communicator that is " +
                                        (s->revoked                        ? "revoked"
                                         : s->async_error != ncclSuccess   ? "in error"
                                         : s->init_state == ncclInProgress ? "still initialising"
                                                                           : "broken"));
    }
    ++s->in_flight;
    seq = ++s->issued;
  }
  auto task = [s, run, what, seq] {
    std::string why;
    bool ok = false;
    {
      std::lock_guard<std::mutex> lock(s->mu);
      ok = s->revoked || s->aborted;  // a collective that starts after a revoke does nothing
    }
    ok = ok || run(*s, seq, &why);
    std::unique_lock<std::mutex> lock(s->mu);
    if (!ok && !s->revoked && !s->aborted) {
      if (!SilentPeerLoss()) {
        s->async_error = ncclRemoteError;
        s->error = std::string(what) + ": " + why;
      }
      s->cv.wait(lock, [&] { return s->revoked || s->aborted; });
    }
    if (s->revoked && !s->aborted && RevokeMs() > 0) {  // a slow revoke, unless aborted
      s->cv.wait_for(lock, std::chrono::milliseconds(RevokeMs()), [&] { return s->aborted; });
    }
    --s->in_flight;
    s->cv.notify_all();
  };
  const int defer_ms = DeferMs();
  if (defer_ms <= 0) {
    spotrain::cuda_emulation::EnqueueOnStream(stream, std::move(task));
    return ncclSuccess;
  }
  // Enqueued later, by another thread: the state stays ncclInProgress until then.
  {
    std::lock_guard<std::mutex> lock(s->mu);
    ++s->deferred;
  }
  std::thread([s, stream, defer_ms, task = std::move(task)]() mutable {
    std::this_thread::sleep_for(std::chrono::milliseconds(defer_ms));
    spotrain::cuda_emulation::EnqueueOnStream(stream, std::move(task));
    std::lock_guard<std::mutex> lock(s->mu);
    --s->deferred;
    s->cv.notify_all();
  }).detach();
  return ncclInProgress;
}

}  // namespace

extern "C" {

ncclResult_t ncclGetVersion(int* version) {
  *version = NCCL_VERSION_CODE;
  return ncclSuccess;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  Listener& listener = Listener::Get();
  if (!listener.ok()) return Fail(ncclSystemError, listener.error());
  static std::mt19937_64 random(std::random_device{}());
  static std::mutex random_mutex;
  uint64_t key;
  {
    std::lock_guard<std::mutex> lock(random_mutex);
    key = random();
  }
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(key));
  std::memset(id->internal, 0, sizeof(id->internal));
  std::snprintf(id->internal, sizeof(id->internal), "%s %s %d %s", kIdPrefix,
                listener.host().c_str(), listener.port(), hex);
  std::thread(ServeRoot, std::string(hex)).detach();
  return ncclSuccess;
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank,
                                    ncclConfig_t* /*config: always non-blocking here*/) {
  *comm = nullptr;
  if (nranks < 1 || rank < 0 || rank >= nranks) {
    return Fail(ncclInvalidArgument,
                "rank " + std::to_string(rank) + " of " + std::to_string(nranks) + " ranks");
  }
  char text[sizeof(id.internal) + 1] = {};
  std::memcpy(text, id.internal, sizeof(id.internal));
  std::istringstream in(text);
  std::string prefix, key;
  Address root;
  if (!(in >> prefix >> root.host >> root.port >> key) || prefix != kIdPrefix) {
    return Fail(ncclInvalidArgument, "not a unique id of the emulated NCCL");
  }
  auto state = std::make_shared<CommState>();
  state->key = key;
  state->rank = rank;
  state->nranks = nranks;
  if (nranks == 1) {
    state->init_state = ncclSuccess;
    std::lock_guard<std::mutex> lock(g_roots_mutex);
    g_roots_unused.insert(key);  // the id's root thread (if in this process) can stop
  } else {
    if (!Listener::Get().ok()) return Fail(ncclSystemError, Listener::Get().error());
    state->bootstrap = std::thread(Bootstrap, state.get(), root);
  }
  *comm = new ncclComm{std::move(state)};
  return nranks == 1 ? ncclSuccess : ncclInProgress;
}

ncclResult_t ncclCommShrink(ncclComm_t comm, int* exclude, int exclude_count, ncclComm_t* newcomm,
                            ncclConfig_t* /*config*/, int /*flags*/) {
  *newcomm = nullptr;
  if (comm == nullptr) return Fail(ncclInvalidArgument, "ncclCommShrink of no communicator");
  CommState& parent = *comm->state;
  std::vector<bool> excluded(parent.nranks, false);
  for (int i = 0; i < exclude_count; ++i) {
    if (exclude[i] < 0 || exclude[i] >= parent.nranks) {
      return Fail(ncclInvalidArgument, "ncclCommShrink: rank " + std::to_string(exclude[i]) +
                                           " is not a rank of the communicator");
    }
    excluded[exclude[i]] = true;
  }
  if (excluded[parent.rank]) {
    return Fail(ncclInvalidArgument, "ncclCommShrink: this rank is in its own exclude list");
  }
  auto child = std::make_shared<CommState>();
  {
    std::lock_guard<std::mutex> lock(parent.mu);
    if (parent.init_state != ncclSuccess || parent.aborted) {
      return Fail(ncclInvalidUsage,
                  "ncclCommShrink of a communicator that never finished initialising");
    }
    if (parent.in_flight > 0) {
      return Fail(ncclInvalidUsage,
                  "ncclCommShrink while collectives are in flight (revoke the communicator and "
                  "wait until it is quiet first)");
    }
    child->key = parent.key + "/shrink" + std::to_string(++parent.shrinks);
  }
  for (int r = 0; r < parent.nranks; ++r) {
    if (excluded[r]) continue;
    if (r == parent.rank) child->rank = static_cast<int>(child->listeners.size());
    child->listeners.push_back(parent.listeners[r]);
  }
  child->nranks = static_cast<int>(child->listeners.size());
  if (child->nranks == 1) {
    child->init_state = ncclSuccess;
  } else {
    CommState* c = child.get();
    child->bootstrap = std::thread([c] { ConnectLinks(*c); });
  }
  *newcomm = new ncclComm{std::move(child)};
  return (*newcomm)->state->nranks == 1 ? ncclSuccess : ncclInProgress;
}

ncclResult_t ncclCommRevoke(ncclComm_t comm, int /*flags*/) {
  if (comm == nullptr) return Fail(ncclInvalidArgument, "ncclCommRevoke of no communicator");
  CommState& s = *comm->state;
  std::lock_guard<std::mutex> lock(s.mu);
  s.revoked = true;
  s.ShutdownLocked();
  s.cv.notify_all();
  return s.in_flight > 0 ? ncclInProgress : ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  if (comm == nullptr) return ncclSuccess;
  std::shared_ptr<CommState> s = comm->state;
  {
    std::lock_guard<std::mutex> lock(s->mu);
    s->aborted = true;
    s->ShutdownLocked();
    s->cv.notify_all();
  }
  if (s->bootstrap.joinable()) s->bootstrap.join();
  {
    // A deferred collective still names the stream: let it get there first (N ms at most).
    std::unique_lock<std::mutex> lock(s->mu);
    s->cv.wait(lock, [&] { return s->deferred == 0; });
  }
  Listener::Get().Forget(s->key + "/boot");
  Listener::Get().Forget(s->key + "/data");
  delete comm;  // collectives still on the stream keep the state until they return
  return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* state) {
  if (comm == nullptr) return Fail(ncclInvalidArgument, "ncclCommGetAsyncError of no communicator");
  CommState& s = *comm->state;
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.init_state != ncclSuccess) {
    *state = s.init_state;
  } else if (s.revoked) {
    // NCCL 2.28: a revoke makes the state ncclInProgress until the communicator is quiet,
    // then ncclSuccess (an earlier error included).
    *state = s.in_flight > 0 ? ncclInProgress : ncclSuccess;
  } else if (s.async_error != ncclSuccess) {
    *state = s.async_error;
  } else {
    *state = s.deferred > 0 ? ncclInProgress : ncclSuccess;
  }
  return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type,
                           ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
  if (op != ncclSum) return Fail(ncclInvalidArgument, "the emulated all-reduce sums only");
  if (ElementBytes(type) == 0 || type == ncclFloat16 || type == ncclBfloat16) {
    return Fail(ncclInvalidArgument, "the emulated all-reduce sums 8-, 32- and 64-bit types only");
  }
  return Enqueue(comm, stream, "ncclAllReduce", [=](CommState& s, uint64_t seq, std::string* why) {
    if (send != recv && count > 0) std::memmove(recv, send, count * ElementBytes(type));
    return s.nranks == 1 || RunAllReduce(s, seq, recv, count, type, why);
  });
}

ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type,
                           int root, ncclComm_t comm, cudaStream_t stream) {
  if (ElementBytes(type) == 0) return Fail(ncclInvalidArgument, "an unknown NCCL data type");
  if (comm != nullptr && (root < 0 || root >= comm->state->nranks)) {
    return Fail(ncclInvalidArgument, "broadcast root " + std::to_string(root) + " of " +
                                         std::to_string(comm->state->nranks) + " ranks");
  }
  return Enqueue(comm, stream, "ncclBroadcast", [=](CommState& s, uint64_t seq, std::string* why) {
    const size_t bytes = count * ElementBytes(type);
    if (s.rank == root && send != recv && bytes > 0) std::memmove(recv, send, bytes);
    return s.nranks == 1 || RunBroadcast(s, seq, recv, bytes, root, why);
  });
}

const char* ncclGetErrorString(ncclResult_t result) {
  switch (result) {
    case ncclSuccess:
      return "no error";
    case ncclSystemError:
      return "unhandled system error";
    case ncclInvalidArgument:
      return "invalid argument";
    case ncclInvalidUsage:
      return "invalid usage";
    case ncclRemoteError:
      return "remote process exited or there was a network error";
    case ncclInProgress:
      return "operation in progress";
    default:
      return "unhandled error";
  }
}

const char* ncclGetLastError(ncclComm_t comm) {
  if (comm != nullptr) {
    std::lock_guard<std::mutex> lock(comm->state->mu);
    if (!comm->state->error.empty()) g_last_error = comm->state->error;
  }
  return g_last_error.c_str();
}

}  // extern "C"
