#include "worker/device.h"

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

#if defined(SPOTRAIN_HAVE_CUDA)
#include "kernels/cuda/context.h"
#endif

namespace spotrain::worker {

CudaProbe ProbeCudaDevices() {
  CudaProbe probe;
#if defined(SPOTRAIN_HAVE_CUDA)
  probe.built_with_cuda = true;
#if defined(SPOTRAIN_HAVE_NCCL)
  probe.built_with_nccl = true;
#endif
  probe.device_count = kernels::cuda::CudaDeviceCount();
  probe.describe = [](int device) { return kernels::cuda::CudaDeviceDescription(device); };
#else
  probe.device_count = absl::FailedPreconditionError("this build has no CUDA support");
#endif
  return probe;
}

namespace {

// Why no GPU can be used, or "" when at least one can.
std::string NoGpuReason(const CudaProbe& probe) {
  if (!probe.built_with_cuda) {
    return "this build has no CUDA support (spotrain was configured without CUDA or without "
           "the CUDA libraries)";
  }
  if (!probe.device_count.ok()) {
    return absl::StrCat("no usable CUDA driver or GPU: ", probe.device_count.status().message());
  }
  if (*probe.device_count == 0) return "no CUDA device is visible";
  return "";
}

std::string Describe(const CudaProbe& probe, int index) {
  if (!probe.describe) return absl::StrCat("GPU ", index);
  auto text = probe.describe(index);
  return text.ok() ? *text : absl::StrCat("GPU ", index);
}

// The name part of "cuda:<device name>": the product name without spaces.
std::string JoinName(const std::string& description) {
  std::string name = description.substr(0, description.find(" ("));
  for (char& c : name) {
    if (c == ' ' || c == ':') c = '_';
  }
  return absl::StrCat("cuda:", name.empty() ? "gpu" : name);
}

}  // namespace

absl::StatusOr<DeviceChoice> ChooseDevice(const std::string& flag, const CudaProbe& probe,
                                          bool gpu_training) {
  DeviceChoice choice;
  if (flag == "cpu") {
    choice.message = "device: CPU (--device cpu)";
    return choice;
  }
  if (flag == "auto" || flag.empty()) {
    const std::string reason = NoGpuReason(probe);
    if (!reason.empty()) {
      choice.message = absl::StrCat("device: CPU (--device auto: ", reason, ")");
      return choice;
    }
    if (!gpu_training) {
      choice.message =
          absl::StrCat("device: CPU (--device auto: ", *probe.device_count, " GPU(s) found, first ",
                       Describe(probe, 0),
                       ", but this worker was built without NCCL, which GPU training needs)");
      return choice;
    }
    choice.cuda = true;
    choice.index = 0;
    const std::string description = Describe(probe, 0);
    choice.join_device = JoinName(description);
    choice.message = absl::StrCat("device: cuda:0, ", description, " (--device auto)");
    return choice;
  }
  if (flag != "cuda" && !absl::StartsWith(flag, "cuda:")) {
    return absl::InvalidArgumentError(
        absl::StrCat("--device ", flag, ": expected auto, cpu, cuda or cuda:N"));
  }
  int index = 0;
  if (flag != "cuda" && (!absl::SimpleAtoi(flag.substr(5), &index) || index < 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--device ", flag, ": N in cuda:N must be a device number (0, 1, ...)"));
  }
  const std::string reason = NoGpuReason(probe);
  if (!reason.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("--device ", flag, ": ", reason, "; use --device cpu or auto"));
  }
  if (index >= *probe.device_count) {
    return absl::FailedPreconditionError(
        absl::StrFormat("--device %s: this machine has %d CUDA device(s) (cuda:0..cuda:%d)", flag,
                        *probe.device_count, *probe.device_count - 1));
  }
  const std::string description = Describe(probe, index);
  if (!gpu_training) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--device ", flag, ": ", description,
        " is usable, but this worker was built without NCCL, which GPU training needs "
        "(install NCCL next to the CUDA toolkit and rebuild); use --device cpu or auto"));
  }
  choice.cuda = true;
  choice.index = index;
  choice.join_device = JoinName(description);
  choice.message = absl::StrCat("device: cuda:", index, ", ", description);
  return choice;
}

}  // namespace spotrain::worker
