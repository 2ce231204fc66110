// A CPU emulator for spotrain's own CUDA code, so that the kernels, their launch
// configurations and the cuBLAS operand plans run in every CI build, where there is no GPU.
//
// How: the .cu sources are compiled by the C++ compiler with this header force-included
// (-include) and SPOTRAIN_CUDA_EMULATION defined. SPOTRAIN_LAUNCH (kernels/cuda/launch.h) then
// runs a kernel on the host before returning: the blocks one after another in a shuffled
// order, the threads of a block as cooperative fibers on one OS thread, switched only at
// __syncthreads() and warp shuffles, in a shuffled order, so that a missing barrier shows as a
// wrong result (a fixed seed; SPOTRAIN_EMULATION_SEED overrides it). The CUDA runtime and cuBLAS
// functions the sources call are implemented in cuda_emulation.cc over host memory (cuBLAS by
// a reference column-major product), cub's radix sort by a stable sort
// (include/cub/device/device_radix_sort.cuh).
//
// What it checks and what it cannot:
//  - checks: indexing, bounds of the grid-stride and row loops, packed loads, reductions and
//    their barriers, launch shapes, which elements a kernel writes or reads before writing
//    (cudaMalloc memory starts as 0xFF bytes, NaN), overruns past an allocation (a guard page),
//    cuBLAS operand mapping and type combinations as cuBLAS defines them, whole training steps
//    against the CPU model;
//  - stops the process with a message (a kernel bug, not a test failure to continue from): a
//    barrier some threads of a block never reach (deadlock), a warp shuffle over lanes that
//    have exited or do not exist, a mask other than all lanes, a block over 1024 threads;
//  - cannot: timing; the GPU's memory model and scheduling beyond the orders it tries; races
//    between streams or a host read before a stream synchronisation (work is synchronous,
//    except the emulated NCCL's collectives, emulated_streams.h);
//    last-bit results (nvcc contracts a * b + c into one FMA by default, the emulator does not;
//    host libm instead of device math; OpenBLAS's summation order instead of cuBLAS's), so
//    only code whose rounding the intrinsics below pin can be compared bit for bit with a GPU;
//    shared memory that starts as garbage (here: zeros, then the previous block's values).
//
// One emulated kernel runs at a time in the process (a global lock); `__shared__` variables
// are function-local statics, shared by the block that runs.
#ifndef SPOTRAIN_TESTS_EMULATION_CUDA_EMULATION_H_
#define SPOTRAIN_TESTS_EMULATION_CUDA_EMULATION_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#include "tests/emulation/emulated_streams.h"

// __shared__ variables: function-local statics (zero at first, then what the previous block
// left; GCC cannot gather the statics of function templates in one section to poison them).
#undef __shared__
#define __shared__ static

namespace spotrain::cuda_emulation {

// The running thread's built-in variables (valid inside a kernel only).
const uint3& ThreadIdx();
const uint3& BlockIdx();
const dim3& BlockDim();
const dim3& GridDim();

// __syncthreads(): waits for every thread of the block that has not exited.
void SyncThreads();
// out = the `bytes`-byte value that lane (lane ^ lane_mask) passed; every lane of the warp
// must call it (mask 0xffffffff).
void WarpShuffleXor(unsigned mask, const void* in, void* out, size_t bytes, int lane_mask,
                    int width);

// Runs thread_body for every thread of every block of the grid; `name` is the kernel, for
// messages.
void RunGrid(dim3 grid, dim3 block, const char* name, const std::function<void()>& thread_body);

// What SPOTRAIN_LAUNCH(grid, block, stream, kernel) yields: called with the kernel's
// arguments, it runs the kernel. The arguments are kept by value, like a kernel's parameters,
// and each thread gets its own copies.
template <typename Body>
class PendingLaunch {
 public:
  PendingLaunch(dim3 grid, dim3 block, cudaStream_t stream, const char* name, Body body)
      : grid_(grid), block_(block), stream_(stream), name_(name), body_(std::move(body)) {}
  template <typename... Args>
  void operator()(Args... args) {
    DrainStream(stream_);  // in stream order: after the work still in flight there
    RunGrid(grid_, block_, name_, [&] { body_(args...); });
  }

 private:
  dim3 grid_;
  dim3 block_;
  cudaStream_t stream_;
  const char* name_;
  Body body_;
};

template <typename Body>
PendingLaunch<Body> Launch(dim3 grid, dim3 block, cudaStream_t stream, const char* name,
                           Body body) {
  return PendingLaunch<Body>(grid, block, stream, name, std::move(body));
}

}  // namespace spotrain::cuda_emulation

#define threadIdx (::spotrain::cuda_emulation::ThreadIdx())
#define blockIdx (::spotrain::cuda_emulation::BlockIdx())
#define blockDim (::spotrain::cuda_emulation::BlockDim())
#define gridDim (::spotrain::cuda_emulation::GridDim())

inline void __syncthreads() { ::spotrain::cuda_emulation::SyncThreads(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T>, "shuffles move plain values");
  T out;
  ::spotrain::cuda_emulation::WarpShuffleXor(mask, &value, &out, sizeof(T), lane_mask, width);
  return out;
}

// Device intrinsics with their IEEE meaning: each one rounded operation, never contracted
// (the emulated sources are compiled with -ffp-contract=off; nvcc would contract plain
// a * b + c, which these intrinsics exist to prevent).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __double2float_rn(double a) { return static_cast<float>(a); }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
template <typename T>
T __ldg(const T* p) {
  return *p;
}

// One emulated kernel runs at a time, so these are atomic as they stand.
inline unsigned long long atomicMin(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;
  if (value < old) *address = value;
  return old;
}

// The device's integer min / max overloads.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

#endif  // SPOTRAIN_TESTS_EMULATION_CUDA_EMULATION_H_
