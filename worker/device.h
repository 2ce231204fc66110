// Which device a worker trains on: parses --device (auto, cpu, cuda, cuda:N), probes the
// CUDA devices of this build and machine, and decides, with the message the worker logs or
// exits with. The probe is separate from the decision so that the decision is unit-tested
// on CPU machines (tests/unit/worker/device_test.cc); ProbeCudaDevices() is the real probe
// (a CPU-only build answers "no CUDA support" without touching any CUDA library).
//
// Thread-safety: pure functions; ProbeCudaDevices() may be called from any thread.
#ifndef SPOTRAIN_WORKER_DEVICE_H_
#define SPOTRAIN_WORKER_DEVICE_H_

#include <functional>
#include <string>

#include "absl/status/statusor.h"

namespace spotrain::worker {

// What this build and machine offer.
struct CudaProbe {
  bool built_with_cuda = false;  // SPOTRAIN_HAVE_CUDA
  bool built_with_nccl = false;  // SPOTRAIN_HAVE_NCCL
  // Number of usable devices, or why none can be used (no driver, driver too old).
  absl::StatusOr<int> device_count = 0;
  // "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.1 GiB)" for a device index.
  std::function<absl::StatusOr<std::string>(int)> describe;
};

// The real probe of this process.
CudaProbe ProbeCudaDevices();

struct DeviceChoice {
  bool cuda = false;  // false: the CPU
  int index = 0;      // CUDA ordinal when cuda
  // What the worker announces at Join: "cpu" or "cuda:<device name>" (the coordinator
  // keeps one backend per run).
  std::string join_device = "cpu";
  // One line for the log: what was chosen and why.
  std::string message;
};

// Decides the device for `flag`:
//   cpu      the CPU.
//   auto     a GPU when one is usable and `gpu_training` (this build can train on a GPU:
//            CUDA and NCCL),
//            else the CPU; the message says which and why.
//   cuda, cuda:N  that GPU (N defaults to 0); kFailedPrecondition naming the problem when
//            the build has no CUDA, no device is usable, N does not exist, or the worker
//            cannot train on a GPU (!gpu_training).
// kInvalidArgument for anything else.
absl::StatusOr<DeviceChoice> ChooseDevice(const std::string& flag, const CudaProbe& probe,
                                          bool gpu_training);

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_DEVICE_H_
