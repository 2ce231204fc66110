// --device parsing and the choice between CPU and GPU (worker/device.h), with fake probes.
#include "worker/device.h"

#include <string>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace spotrain::worker {
namespace {

using ::testing::HasSubstr;

CudaProbe NoCudaBuild() { return CudaProbe(); }
CudaProbe NoDriver() {
  CudaProbe p;
  p.built_with_cuda = true;
  p.device_count = absl::FailedPreconditionError("CUDA driver version is insufficient");
  return p;
}
CudaProbe TwoGpus() {
  CudaProbe p;
  p.built_with_cuda = true;
  p.built_with_nccl = true;
  p.device_count = 2;
  p.describe = [](int i) -> absl::StatusOr<std::string> {
    return i == 0 ? "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.1 GiB)" : "NVIDIA A100 (sm_80)";
  };
  return p;
}

TEST(DeviceTest, CpuIsAlwaysCpu) {
  auto c = ChooseDevice("cpu", TwoGpus(), true);
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(c->cuda);
  EXPECT_EQ(c->join_device, "cpu");
}

TEST(DeviceTest, AutoFallsBackToCpuAndSaysWhy) {
  auto a = ChooseDevice("auto", NoCudaBuild(), true);
  ASSERT_TRUE(a.ok());
  EXPECT_FALSE(a->cuda);
  EXPECT_THAT(a->message, HasSubstr("no CUDA support"));
  auto b = ChooseDevice("auto", NoDriver(), true);
  ASSERT_TRUE(b.ok());
  EXPECT_FALSE(b->cuda);
  EXPECT_THAT(b->message, HasSubstr("driver version is insufficient"));
  CudaProbe none = TwoGpus();
  none.device_count = 0;
  auto c = ChooseDevice("auto", none, true);
  ASSERT_TRUE(c.ok());
  EXPECT_THAT(c->message, HasSubstr("no CUDA device"));
}

TEST(DeviceTest, AutoTakesTheFirstGpu) {
  auto c = ChooseDevice("auto", TwoGpus(), true);
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->cuda);
  EXPECT_EQ(c->index, 0);
  EXPECT_EQ(c->join_device, "cuda:NVIDIA_H100_80GB_HBM3");
  EXPECT_THAT(c->message, HasSubstr("H100"));
}

TEST(DeviceTest, AutoStaysOnCpuWhenTheWorkerCannotTrainOnGpu) {
  auto c = ChooseDevice("auto", TwoGpus(), false);
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(c->cuda);
  EXPECT_THAT(c->message, HasSubstr("without NCCL"));
}

TEST(DeviceTest, CudaWithoutAGpuIsAClearError) {
  auto a = ChooseDevice("cuda:0", NoCudaBuild(), true);
  EXPECT_EQ(a.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(a.status().message()), HasSubstr("no CUDA support"));
  auto b = ChooseDevice("cuda", NoDriver(), true);
  EXPECT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(b.status().message()), HasSubstr("driver"));
  auto c = ChooseDevice("cuda:2", TwoGpus(), true);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("2 CUDA device(s)"));
  auto d = ChooseDevice("cuda:1", TwoGpus(), false);
  EXPECT_EQ(d.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(d.status().message()), HasSubstr("A100"));
}

TEST(DeviceTest, CudaNPicksThatGpu) {
  auto c = ChooseDevice("cuda:1", TwoGpus(), true);
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->cuda);
  EXPECT_EQ(c->index, 1);
  EXPECT_EQ(c->join_device, "cuda:NVIDIA_A100");
}

TEST(DeviceTest, BadFlags) {
  for (const char* flag : {"gpu", "cuda:", "cuda:x", "cuda:-1", "CPU"}) {
    EXPECT_EQ(ChooseDevice(flag, TwoGpus(), true).status().code(),
              absl::StatusCode::kInvalidArgument)
        << flag;
  }
}

TEST(DeviceTest, RealProbeNeverCrashes) {
  CudaProbe probe = ProbeCudaDevices();
  auto c = ChooseDevice("auto", probe, false);
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(c->message.empty());
}

}  // namespace
}  // namespace spotrain::worker
