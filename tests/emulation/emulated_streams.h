// Streams of the CPU emulator of the CUDA code (cuda_emulation.h) that can hold work in
// flight, for the emulated NCCL (nccl_emulated.cc), whose collectives wait on peer processes.
//
// Everything else the emulator runs at once on the calling thread. A stream made by
// cudaStreamCreate* gets a thread of its own the first time work is enqueued with
// EnqueueOnStream; while that work is pending, later work on the same stream (cudaMemcpyAsync,
// cudaMemsetAsync) is queued behind it in order, cudaStreamQuery answers cudaErrorNotReady,
// cudaStreamSynchronize / cudaDeviceSynchronize wait for it, and a kernel launched on it
// waits for it before running (the host blocks there, where a GPU would queue the kernel).
#ifndef SPOTRAIN_TESTS_EMULATION_EMULATED_STREAMS_H_
#define SPOTRAIN_TESTS_EMULATION_EMULATED_STREAMS_H_

#include <cuda_runtime_api.h>

#include <functional>

namespace spotrain::cuda_emulation {

// Runs `task` on `stream`'s own thread after the work already queued there. `stream` must
// come from cudaStreamCreate*, not the default stream. The task may block (a collective
// waiting for its peers); whoever makes it return (an NCCL abort) is its owner's business.
void EnqueueOnStream(cudaStream_t stream, std::function<void()> task);

// Waits until `stream` has nothing pending (no-op for the default stream).
void DrainStream(cudaStream_t stream);

}  // namespace spotrain::cuda_emulation

#endif  // SPOTRAIN_TESTS_EMULATION_EMULATED_STREAMS_H_
