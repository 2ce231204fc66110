// The CPU emulator of tests/emulation/cuda_emulation.h: the fiber scheduler that runs a
// kernel's threads, and the CUDA runtime and cuBLAS functions spotrain's CUDA sources call,
// over host memory. Work is synchronous: a stream is a name, synchronising is a no-op.
#include "tests/emulation/cuda_emulation.h"

#include <cblas.h>
#include <cublas_v2.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "tests/emulation/emulated_streams.h"

namespace spotrain::cuda_emulation {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxBlockThreads = 1024;
constexpr size_t kStackBytes = 128 * 1024;

[[noreturn]] void Fatal(const std::string& what) {
  std::fprintf(stderr, "CUDA emulation: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// A fiber's stack with an inaccessible guard page below it, so that an overflow faults.
class Stack {
 public:
  Stack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) Fatal("cannot map a fiber stack");
    if (mprotect(p, page, PROT_NONE) != 0) Fatal("cannot protect a fiber stack's guard page");
    base_ = static_cast<char*>(p);
    bytes_ = kStackBytes + page;
    low_ = base_ + page;
  }
  ~Stack() { munmap(base_, bytes_); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* low() const { return low_; }
  char* high() const { return base_ + bytes_; }

 private:
  char* base_ = nullptr;
  char* low_ = nullptr;
  size_t bytes_ = 0;
};

// Switching between fibers. x86-64: a few instructions saving the callee-saved registers and
// the floating-point control words (no system call, unlike swapcontext, which saves the
// signal mask: most of the emulator's time went there). Elsewhere: ucontext.
#if defined(__x86_64__)
extern "C" void spotrain_emulation_switch(void** save_sp, void* load_sp);
asm(R"(
  .pushsection .text
  .p2align 4
  .globl spotrain_emulation_switch
  .type spotrain_emulation_switch, @function
spotrain_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size spotrain_emulation_switch, .-spotrain_emulation_switch
  .popsection
)");

struct Context {
  void* sp = nullptr;
};

void SwitchContext(Context& from, Context& to) { spotrain_emulation_switch(&from.sp, to.sp); }

// A frame that the first switch to `c` "returns" from into entry(), which must never return.
void PrepareContext(Context& c, const Stack& stack, void (*entry)()) {
  const uintptr_t top = reinterpret_cast<uintptr_t>(stack.high()) & ~uintptr_t{15};
  uint64_t* w = reinterpret_cast<uint64_t*>(top);
  w[-1] = 0;                                     // entry's own return address: never used
  w[-2] = reinterpret_cast<uint64_t>(entry);     // popped by the switch's ret
  for (int r = 3; r <= 8; ++r) w[-r] = 0;        // rbp, rbx, r12-r15
  const uint32_t control[2] = {0x1f80, 0x037f};  // MXCSR and x87 control word defaults
  std::memcpy(&w[-9], control, sizeof(control));
  c.sp = &w[-9];
}
#else
struct Context {
  ucontext_t uc;
};

void SwitchContext(Context& from, Context& to) {
  if (swapcontext(&from.uc, &to.uc) != 0) Fatal("swapcontext failed");
}

void PrepareContext(Context& c, const Stack& stack, void (*entry)()) {
  if (getcontext(&c.uc) != 0) Fatal("getcontext failed");
  c.uc.uc_stack.ss_sp = stack.low();
  c.uc.uc_stack.ss_size = kStackBytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

enum class FiberState { kReady, kWaiting, kDone };
enum class WaitKind { kNone, kBlockBarrier, kWarpBarrier };

struct Fiber {
  Context context;
  uint3 thread_idx;
  int linear = 0;
  FiberState state = FiberState::kReady;
  WaitKind waiting_at = WaitKind::kNone;
};

struct Barrier {
  int arrived = 0;
  std::vector<Fiber*> waiting;
};

// Everything about the kernel that runs now; one at a time (g_launch_mutex).
struct Execution {
  const char* name = "";
  const std::function<void()>* body = nullptr;
  dim3 grid;
  dim3 block;
  uint3 block_idx;
  int threads = 0;
  int live = 0;
  std::vector<Fiber> fibers;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  // Two slot sets per warp, used by alternate shuffles: one barrier per shuffle suffices, as
  // no lane can write a set again before every lane has passed the barrier after reading it.
  std::vector<std::array<std::array<uint64_t, kWarp>, 2>> warp_slots;
  std::vector<int> warp_exited;      // lanes of each warp that have exited
  std::vector<uint8_t> lane_parity;  // per thread: which slot set its next shuffle uses
  Fiber* current = nullptr;
  Context scheduler;
  uint64_t rng = 0;  // xorshift64 state, for the run orders
};

std::mutex g_launch_mutex;
Execution* g_exec = nullptr;
std::vector<std::unique_ptr<Stack>> g_stacks;  // grows to the largest block; reused

bool Trace() {
  static const bool trace = std::getenv("SPOTRAIN_EMULATION_TRACE") != nullptr;
  return trace;
}

uint32_t Seed() {
  const char* env = std::getenv("SPOTRAIN_EMULATION_SEED");
  return env != nullptr ? static_cast<uint32_t>(std::strtoul(env, nullptr, 10)) : 1u;
}

std::string Where(const Execution& e) {
  char buf[256];
  std::snprintf(buf, sizeof(buf), "kernel %s, block (%u,%u,%u) of (%u,%u,%u), %d threads", e.name,
                e.block_idx.x, e.block_idx.y, e.block_idx.z, e.grid.x, e.grid.y, e.grid.z,
                e.threads);
  return buf;
}

uint64_t NextRandom(uint64_t& state) {
  state ^= state << 13;
  state ^= state >> 7;
  state ^= state << 17;
  return state;
}

// Fisher-Yates with xorshift64: the run order of a block's ready threads (cheap: it is
// drawn at every barrier) and of a grid's blocks.
template <typename Index>
void Shuffle(std::vector<Index>& order, uint64_t& state) {
  for (size_t i = order.size(); i > 1; --i) {
    std::swap(order[i - 1], order[NextRandom(state) % i]);
  }
}

void ReleaseAll(Barrier& b) {
  for (Fiber* f : b.waiting) {
    f->state = FiberState::kReady;
    f->waiting_at = WaitKind::kNone;
  }
  b.waiting.clear();
  b.arrived = 0;
}

// The running fiber waits at `b` until `expected` threads have arrived.
void Arrive(Barrier& b, int expected, WaitKind kind) {
  Execution& e = *g_exec;
  ++b.arrived;
  if (b.arrived >= expected) {
    ReleaseAll(b);
    return;
  }
  Fiber* self = e.current;
  self->state = FiberState::kWaiting;
  self->waiting_at = kind;
  b.waiting.push_back(self);
  SwitchContext(self->context, e.scheduler);
}

[[noreturn]] void FiberMain() {
  Execution& e = *g_exec;
  (*e.body)();
  Fiber* self = e.current;
  self->state = FiberState::kDone;
  --e.live;
  ++e.warp_exited[self->linear / kWarp];
  // __syncthreads waits for the threads that have not exited.
  if (e.block_barrier.arrived > 0 && e.block_barrier.arrived >= e.live) ReleaseAll(e.block_barrier);
  SwitchContext(self->context, e.scheduler);  // never resumed
  Fatal("a finished fiber was resumed");
}

void RunBlock(Execution& e) {
  e.live = e.threads;
  e.block_barrier = Barrier();
  const int warps = (e.threads + kWarp - 1) / kWarp;
  e.warp_barriers.assign(warps, Barrier());
  e.warp_slots.assign(warps, {});
  e.warp_exited.assign(warps, 0);
  e.lane_parity.assign(e.threads, 0);
  for (int t = 0; t < e.threads; ++t) {
    Fiber& f = e.fibers[t];
    f.linear = t;
    f.thread_idx =
        make_uint3(t % e.block.x, (t / e.block.x) % e.block.y, t / (e.block.x * e.block.y));
    f.state = FiberState::kReady;
    f.waiting_at = WaitKind::kNone;
    PrepareContext(f.context, *g_stacks[t], FiberMain);
  }
  std::vector<int> order(e.threads);
  for (int t = 0; t < e.threads; ++t) order[t] = t;
  while (e.live > 0) {
    Shuffle(order, e.rng);
    bool ran = false;
    for (int t : order) {
      Fiber& f = e.fibers[t];
      if (f.state != FiberState::kReady) continue;
      e.current = &f;
      ran = true;
      SwitchContext(e.scheduler, f.context);
    }
    e.current = nullptr;
    if (!ran) {
      int at_block = 0, at_warp = 0;
      for (const Fiber& f : e.fibers) {
        if (f.state != FiberState::kWaiting) continue;
        (f.waiting_at == WaitKind::kBlockBarrier ? at_block : at_warp)++;
      }
      Fatal(Where(e) + ": deadlock: " + std::to_string(at_block) +
            " threads wait at __syncthreads(), " + std::to_string(at_warp) +
            " at a warp shuffle, " + std::to_string(e.threads - e.live) +
            " have exited (a barrier not every thread reaches, or a shuffle with a lane that "
            "has exited)");
    }
  }
}

}  // namespace

const uint3& ThreadIdx() { return g_exec->current->thread_idx; }
const uint3& BlockIdx() { return g_exec->block_idx; }
const dim3& BlockDim() { return g_exec->block; }
const dim3& GridDim() { return g_exec->grid; }

void SyncThreads() {
  if (g_exec == nullptr || g_exec->current == nullptr) Fatal("__syncthreads() outside a kernel");
  Arrive(g_exec->block_barrier, g_exec->live, WaitKind::kBlockBarrier);
}

void WarpShuffleXor(unsigned mask, const void* in, void* out, size_t bytes, int lane_mask,
                    int width) {
  Execution& e = *g_exec;
  if (e.current == nullptr) Fatal("a warp shuffle outside a kernel");
  if (mask != 0xffffffffu) Fatal(Where(e) + ": the emulator supports full-warp shuffles only");
  if (width != kWarp) Fatal(Where(e) + ": the emulator supports shuffles of width 32 only");
  if (e.threads % kWarp != 0) {
    Fatal(Where(e) + ": a full-warp shuffle in a block that is not a whole number of warps");
  }
  if (bytes > sizeof(uint64_t)) Fatal(Where(e) + ": a shuffle of more than 8 bytes");
  const int warp = e.current->linear / kWarp;
  const int lane = e.current->linear % kWarp;
  if (e.warp_exited[warp] > 0) {
    Fatal(Where(e) + ": warp " + std::to_string(warp) + " shuffles after " +
          std::to_string(e.warp_exited[warp]) + " of its lanes have exited");
  }
  uint8_t& parity = e.lane_parity[e.current->linear];
  std::array<uint64_t, kWarp>& slots = e.warp_slots[warp][parity];
  parity ^= 1;
  std::memcpy(&slots[lane], in, bytes);
  Arrive(e.warp_barriers[warp], kWarp, WaitKind::kWarpBarrier);
  std::memcpy(out, &slots[(lane ^ lane_mask) & (kWarp - 1)], bytes);
}

// ---- streams (emulated_streams.h) ------------------------------------------------------------
namespace {

// A stream made by cudaStreamCreate*: a FIFO of tasks and, once one was enqueued, a thread
// that runs them in order.
class Stream {
 public:
  ~Stream() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  void Enqueue(std::function<void()> task) {
    std::lock_guard<std::mutex> lock(mu_);
    tasks_.push_back(std::move(task));
    if (!thread_.joinable()) thread_ = std::thread([this] { Run(); });
    cv_.notify_all();
  }

  // Runs `work` at once when nothing is pending, else queues it behind the pending work.
  void RunOrEnqueue(std::function<void()> work) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!tasks_.empty()) {
        tasks_.push_back(std::move(work));
        cv_.notify_all();
        return;
      }
    }
    work();
  }

  bool Idle() {
    std::lock_guard<std::mutex> lock(mu_);
    return tasks_.empty();
  }

  void Drain() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return tasks_.empty(); });
  }

 private:
  void Run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [this] { return stop_ || !tasks_.empty(); });
      if (tasks_.empty()) return;  // stopping with nothing left
      std::function<void()> task = tasks_.front();
      lock.unlock();
      task();
      lock.lock();
      tasks_.pop_front();  // only now: a task counts as pending while it runs
      cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stop_ = false;
  std::thread thread_;
};

std::mutex g_streams_mutex;
std::unordered_set<Stream*> g_streams;  // every live stream, for cudaDeviceSynchronize

Stream* AsStream(cudaStream_t stream) { return reinterpret_cast<Stream*>(stream); }

}  // namespace

void EnqueueOnStream(cudaStream_t stream, std::function<void()> task) {
  if (stream == nullptr) Fatal("EnqueueOnStream: work in flight needs a created stream");
  AsStream(stream)->Enqueue(std::move(task));
}

void DrainStream(cudaStream_t stream) {
  if (stream != nullptr) AsStream(stream)->Drain();
}

void RunGrid(dim3 grid, dim3 block, const char* name, const std::function<void()>& thread_body) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const int64_t threads = static_cast<int64_t>(block.x) * block.y * block.z;
  if (threads < 1 || threads > kMaxBlockThreads) {
    Fatal(std::string("kernel ") + name + ": a block of " + std::to_string(threads) +
          " threads (CUDA allows 1 to 1024)");
  }
  if (block.x > 1024 || block.y > 1024 || block.z > 64) {
    Fatal(std::string("kernel ") + name +
          ": a block dimension over CUDA's limits (1024, 1024, 64)");
  }
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535) {
    Fatal(std::string("kernel ") + name + ": an invalid grid");
  }
  if (Trace()) {
    std::fprintf(stderr, "CUDA emulation: launch %s grid (%u,%u,%u) block (%u,%u,%u)\n", name,
                 grid.x, grid.y, grid.z, block.x, block.y, block.z);
  }
  while (g_stacks.size() < static_cast<size_t>(threads)) {
    g_stacks.push_back(std::make_unique<Stack>());
  }
  Execution e;
  e.name = name;
  e.body = &thread_body;
  e.grid = grid;
  e.block = block;
  e.threads = static_cast<int>(threads);
  e.fibers.resize(e.threads);
  static uint64_t launches = 0;
  e.rng = (0x9e3779b97f4a7c15ull * ++launches) ^ Seed();
  if (e.rng == 0) e.rng = 1;
  g_exec = &e;
  // Blocks run one at a time, in a shuffled order (a kernel may not depend on it).
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  if (blocks > (uint64_t{1} << 32)) Fatal(std::string("kernel ") + name + ": too many blocks");
  std::vector<uint32_t> order(blocks);
  for (uint64_t i = 0; i < blocks; ++i) order[i] = static_cast<uint32_t>(i);
  Shuffle(order, e.rng);
  for (uint32_t linear : order) {
    e.block_idx =
        make_uint3(linear % grid.x, (linear / grid.x) % grid.y, linear / (grid.x * grid.y));
    RunBlock(e);
  }
  g_exec = nullptr;
}

}  // namespace spotrain::cuda_emulation

// ---- CUDA runtime ------------------------------------------------------------------------
// One emulated device. Memory is host memory: "device" pointers are host pointers.

namespace {

constexpr size_t kEmulatedMemory = size_t{16} << 30;
std::mutex g_memory_mutex;
size_t g_allocated = 0;
struct Allocation {
  void* ptr;      // what cudaMalloc returned
  void* base;     // the mapping, guard page included
  size_t bytes;   // counted against the emulated device's memory
  size_t mapped;  // bytes mapped
};
std::vector<Allocation> g_allocations;
std::vector<void*> g_host_allocations;
thread_local cudaError_t g_last_error = cudaSuccess;  // per host thread, as CUDA's

struct ErrorText {
  cudaError_t error;
  const char* name;
  const char* text;
};

// The errors the emulated runtime returns, for cudaGetErrorName / cudaGetErrorString.
ErrorText Describe(cudaError_t error) {
  static constexpr ErrorText kKnown[] = {
      {cudaSuccess, "cudaSuccess", "no error"},
      {cudaErrorMemoryAllocation, "cudaErrorMemoryAllocation",
       "out of memory (emulated device: 16 GiB)"},
      {cudaErrorInvalidValue, "cudaErrorInvalidValue", "invalid argument"},
      {cudaErrorInvalidDevice, "cudaErrorInvalidDevice",
       "invalid device ordinal (the emulator has one device)"},
  };
  for (const ErrorText& e : kKnown) {
    if (e.error == error) return e;
  }
  return {error, "cudaErrorUnknown", "unknown error"};
}

}  // namespace

extern "C" {

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : (g_last_error = cudaErrorInvalidDevice);
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return g_last_error = cudaErrorInvalidDevice;
  std::memset(prop, 0, sizeof(*prop));
  std::snprintf(prop->name, sizeof(prop->name), "spotrain CUDA emulator (CPU)");
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = 4;
  prop->totalGlobalMem = kEmulatedMemory;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->sharedMemPerBlock = 48 * 1024;
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** ptr, size_t size) {
  // Each allocation ends where an inaccessible page begins (its start stays 256-byte aligned,
  // as cudaMalloc's): a kernel reading or writing more than the 255 bytes of rounding past
  // its end faults at once instead of corrupting a neighbour.
  const size_t rounded = (std::max<size_t>(size, 1) + 255) / 256 * 256;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t mapped = (rounded + page - 1) / page * page + page;
  std::lock_guard<std::mutex> lock(g_memory_mutex);
  if (g_allocated + rounded > kEmulatedMemory) {
    *ptr = nullptr;
    return g_last_error = cudaErrorMemoryAllocation;
  }
  void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) return g_last_error = cudaErrorMemoryAllocation;
  char* guard = static_cast<char*>(base) + mapped - page;
  if (mprotect(guard, page, PROT_NONE) != 0) {
    munmap(base, mapped);
    return g_last_error = cudaErrorMemoryAllocation;
  }
  void* p = guard - rounded;
  // cudaMalloc memory is not initialised: every byte 0xFF (NaN as fp32 and bf16), so that a
  // kernel reading what nobody wrote shows, instead of reading the zeros of a fresh mapping.
  std::memset(p, 0xFF, rounded);
  g_allocated += rounded;
  g_allocations.push_back(Allocation{p, base, rounded, mapped});
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  if (ptr == nullptr) return cudaSuccess;
  std::lock_guard<std::mutex> lock(g_memory_mutex);
  for (size_t i = 0; i < g_allocations.size(); ++i) {
    if (g_allocations[i].ptr != ptr) continue;
    const Allocation a = g_allocations[i];
    g_allocated -= a.bytes;
    g_allocations[i] = g_allocations.back();
    g_allocations.pop_back();
    munmap(a.base, a.mapped);
    return cudaSuccess;
  }
  return g_last_error = cudaErrorInvalidValue;
}

cudaError_t cudaMallocHost(void** ptr, size_t size) {
  *ptr = std::aligned_alloc(256, (std::max<size_t>(size, 1) + 255) / 256 * 256);
  if (*ptr == nullptr) return g_last_error = cudaErrorMemoryAllocation;
  std::lock_guard<std::mutex> lock(g_memory_mutex);
  g_host_allocations.push_back(*ptr);
  return cudaSuccess;
}

cudaError_t cudaFreeHost(void* ptr) {
  std::lock_guard<std::mutex> lock(g_memory_mutex);
  for (size_t i = 0; i < g_host_allocations.size(); ++i) {
    if (g_host_allocations[i] != ptr) continue;
    g_host_allocations[i] = g_host_allocations.back();
    g_host_allocations.pop_back();
    std::free(ptr);
    return cudaSuccess;
  }
  return g_last_error = cudaErrorInvalidValue;
}

// Device memory is what cudaMalloc returned (any address inside it), pinned host memory
// what cudaMallocHost returned; anything else is unregistered host memory, as CUDA says.
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, const void* ptr) {
  std::memset(attributes, 0, sizeof(*attributes));
  attributes->type = cudaMemoryTypeUnregistered;
  attributes->device = -1;
  const char* p = static_cast<const char*>(ptr);
  std::lock_guard<std::mutex> lock(g_memory_mutex);
  for (const Allocation& a : g_allocations) {
    const char* begin = static_cast<const char*>(a.ptr);
    if (p < begin || p >= begin + a.bytes) continue;
    attributes->type = cudaMemoryTypeDevice;
    attributes->device = 0;
    attributes->devicePointer = const_cast<void*>(ptr);
    return cudaSuccess;
  }
  for (void* h : g_host_allocations) {
    if (h != ptr) continue;
    attributes->type = cudaMemoryTypeHost;
    attributes->device = 0;
    attributes->hostPointer = const_cast<void*>(ptr);
    attributes->devicePointer = const_cast<void*>(ptr);
  }
  return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  std::lock_guard<std::mutex> lock(g_memory_mutex);
  *free_bytes = kEmulatedMemory - g_allocated;
  *total_bytes = kEmulatedMemory;
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind /*kind*/) {
  if (count > 0) std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  if (stream == nullptr) return cudaMemcpy(dst, src, count, kind);
  spotrain::cuda_emulation::AsStream(stream)->RunOrEnqueue(
      [=] { cudaMemcpy(dst, src, count, kind); });
  return cudaSuccess;
}

cudaError_t cudaMemset(void* ptr, int value, size_t count) {
  if (count > 0) std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream) {
  if (stream == nullptr) return cudaMemset(ptr, value, count);
  spotrain::cuda_emulation::AsStream(stream)->RunOrEnqueue([=] { cudaMemset(ptr, value, count); });
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int /*flags*/) {
  using spotrain::cuda_emulation::Stream;
  auto* s = new Stream;
  {
    std::lock_guard<std::mutex> lock(spotrain::cuda_emulation::g_streams_mutex);
    spotrain::cuda_emulation::g_streams.insert(s);
  }
  *stream = reinterpret_cast<cudaStream_t>(s);
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  if (stream == nullptr) return cudaErrorInvalidResourceHandle;
  auto* s = spotrain::cuda_emulation::AsStream(stream);
  {
    std::lock_guard<std::mutex> lock(spotrain::cuda_emulation::g_streams_mutex);
    spotrain::cuda_emulation::g_streams.erase(s);
  }
  s->Drain();  // CUDA lets queued work finish after a destroy; here the destroy waits for it
  delete s;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  spotrain::cuda_emulation::DrainStream(stream);
  return cudaSuccess;
}

cudaError_t cudaStreamQuery(cudaStream_t stream) {
  if (stream == nullptr || spotrain::cuda_emulation::AsStream(stream)->Idle()) return cudaSuccess;
  return cudaErrorNotReady;
}

cudaError_t cudaDeviceSynchronize() {
  // Under the lock: a stream destroyed meanwhile waits for this (and is not freed under it).
  std::lock_guard<std::mutex> lock(spotrain::cuda_emulation::g_streams_mutex);
  for (auto* s : spotrain::cuda_emulation::g_streams) s->Drain();
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return g_last_error; }

const char* cudaGetErrorName(cudaError_t error) { return Describe(error).name; }
const char* cudaGetErrorString(cudaError_t error) { return Describe(error).text; }

}  // extern "C"

// ---- cuBLAS ------------------------------------------------------------------------------
// The products as cuBLAS defines them (column-major; op(A) m x k, op(B) k x n, C m x n; beta 0
// means C is not read), computed in fp32 by OpenBLAS on the operands converted to fp32.

struct cublasContext {
  cublasMath_t math = CUBLAS_DEFAULT_MATH;
};

namespace {

float ToFloat(const void* base, cudaDataType type, int64_t index) {
  if (type == CUDA_R_32F) return static_cast<const float*>(base)[index];
  return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[index]);
}

// fp32 -> TF32 (10 explicit mantissa bits), round to nearest even.
float ToTf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7f800000u) == 0x7f800000u) return x;  // inf / NaN unchanged
  bits += 0xfffu + ((bits >> 13) & 1u);
  bits &= ~0x1fffu;
  std::memcpy(&x, &bits, sizeof(bits));
  return x;
}

bool Supported(cudaDataType t) { return t == CUDA_R_32F || t == CUDA_R_16BF; }

}  // namespace

extern "C" {

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  *handle = new cublasContext;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t, void*, size_t) {
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetAtomicsMode(cublasHandle_t, cublasAtomicsMode_t) {
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  handle->math = mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmStridedBatchedEx(
    cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
    const void* alpha, const void* A, cudaDataType Atype, int lda, long long int strideA,
    const void* B, cudaDataType Btype, int ldb, long long int strideB, const void* beta, void* C,
    cudaDataType Ctype, int ldc, long long int strideC, int batchCount,
    cublasComputeType_t computeType, cublasGemmAlgo_t /*algo*/) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  // The combinations cuBLAS supports among those spotrain could ask for: A and B of one type;
  // fp32 inputs give fp32 (TF32 allowed), bf16 inputs fp32 or bf16 (compute 32F only).
  if (!Supported(Atype) || Btype != Atype || !Supported(Ctype)) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (computeType != CUBLAS_COMPUTE_32F && computeType != CUBLAS_COMPUTE_32F_FAST_TF32) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  if (Atype == CUDA_R_32F && Ctype != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (Atype == CUDA_R_16BF && computeType != CUBLAS_COMPUTE_32F) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  if (m < 0 || n < 0 || k < 0 || batchCount < 0) return CUBLAS_STATUS_INVALID_VALUE;
  const bool ta = transa != CUBLAS_OP_N;
  const bool tb = transb != CUBLAS_OP_N;
  if (lda < std::max(1, ta ? k : m) || ldb < std::max(1, tb ? n : k) || ldc < std::max(1, m)) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (spotrain::cuda_emulation::Trace()) {
    std::fprintf(stderr,
                 "CUDA emulation: gemm %c%c m %d n %d k %d lda %d ldb %d ldc %d strides %lld %lld "
                 "%lld batch %d\n",
                 ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, lda, ldb, ldc, strideA, strideB, strideC,
                 batchCount);
  }
  const bool tf32 = computeType == CUBLAS_COMPUTE_32F_FAST_TF32;
  const float a_scale = *static_cast<const float*>(alpha);
  const float b_scale = *static_cast<const float*>(beta);
  // op(A) as rows of k and op(B) as columns of k, so that each output is a contiguous dot.
  // Kept between calls: fresh pages for the large products cost more than the products.
  static thread_local std::vector<float> arows, bcols, out;
  arows.resize(static_cast<size_t>(m) * k);
  bcols.resize(static_cast<size_t>(n) * k);
  out.resize(static_cast<size_t>(m) * n);
  for (int batch = 0; batch < batchCount; ++batch) {
    const int64_t a0 = batch * strideA;
    const int64_t b0 = batch * strideB;
    const int64_t c0 = batch * strideC;
    for (int i = 0; i < m; ++i) {
      for (int l = 0; l < k; ++l) {
        const int64_t idx =
            ta ? l + static_cast<int64_t>(i) * lda : i + static_cast<int64_t>(l) * lda;
        const float v = ToFloat(A, Atype, a0 + idx);
        arows[static_cast<size_t>(i) * k + l] = tf32 ? ToTf32(v) : v;
      }
    }
    for (int j = 0; j < n; ++j) {
      for (int l = 0; l < k; ++l) {
        const int64_t idx =
            tb ? j + static_cast<int64_t>(l) * ldb : l + static_cast<int64_t>(j) * ldb;
        const float v = ToFloat(B, Btype, b0 + idx);
        bcols[static_cast<size_t>(j) * k + l] = tf32 ? ToTf32(v) : v;
      }
    }
    // out[i][j] = sum_l arows[i][l] * bcols[j][l], by OpenBLAS (single-precision, the same
    // order run after run).
    if (m > 0 && n > 0) {
      // One OpenBLAS thread: the emulated device is serial anyway, and idle OpenBLAS threads
      // spinning between the many small products took a quarter of an emulated worker's time.
      static const bool single_thread = (openblas_set_num_threads(1), true);
      (void)single_thread;
      if (k > 0) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, arows.data(), k,
                    bcols.data(), k, 0.0f, out.data(), n);
      } else {
        std::fill(out.begin(), out.end(), 0.0f);
      }
    }
    for (int j = 0; j < n; ++j) {
      for (int i = 0; i < m; ++i) {
        const int64_t ci = c0 + i + static_cast<int64_t>(j) * ldc;
        float value = a_scale * out[static_cast<size_t>(i) * n + j];
        if (b_scale != 0.0f) value += b_scale * ToFloat(C, Ctype, ci);
        if (Ctype == CUDA_R_32F) {
          static_cast<float*>(C)[ci] = value;
        } else {
          static_cast<__nv_bfloat16*>(C)[ci] = __float2bfloat16_rn(value);
        }
      }
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"
