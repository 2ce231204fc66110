// The worker's device probe (worker/device.h) on a real GPU: the CUDA build sees the device,
// describes it, and --device auto / cuda:0 choose it when the worker can train on a GPU.
// Labelled gpu: skipped without a usable GPU.
#include "worker/device.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/gpu/gpu_test_util.h"

namespace spotrain::worker {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

TEST(DeviceGpuTest, ProbeSeesTheGpu) {
  SPOTRAIN_SKIP_WITHOUT_GPU();
  const CudaProbe probe = ProbeCudaDevices();
  EXPECT_TRUE(probe.built_with_cuda);
  ASSERT_TRUE(probe.device_count.ok()) << probe.device_count.status();
  ASSERT_GE(*probe.device_count, 1);
  ASSERT_TRUE(probe.describe);
  auto description = probe.describe(0);
  ASSERT_TRUE(description.ok()) << description.status();
  EXPECT_THAT(*description, HasSubstr("sm_"));
  RecordProperty("gpu", *description);

  auto chosen = ChooseDevice("auto", probe, /*gpu_training=*/true);
  ASSERT_TRUE(chosen.ok()) << chosen.status();
  EXPECT_TRUE(chosen->cuda);
  EXPECT_THAT(chosen->join_device, StartsWith("cuda:"));
  auto cuda0 = ChooseDevice("cuda:0", probe, /*gpu_training=*/true);
  ASSERT_TRUE(cuda0.ok()) << cuda0.status();
  EXPECT_EQ(cuda0->index, 0);
  // What the worker does (worker/main.cc): it trains on the GPU when built with NCCL.
  auto worker = ChooseDevice("auto", probe, /*gpu_training=*/probe.built_with_nccl);
  ASSERT_TRUE(worker.ok());
  EXPECT_EQ(worker->cuda, probe.built_with_nccl);
  // A build without NCCL stays on the CPU and says why.
  auto no_nccl = ChooseDevice("auto", probe, /*gpu_training=*/false);
  ASSERT_TRUE(no_nccl.ok());
  EXPECT_FALSE(no_nccl->cuda);
  EXPECT_THAT(no_nccl->message, HasSubstr("without NCCL"));
  EXPECT_EQ(ChooseDevice("cuda:0", probe, false).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace spotrain::worker
