// spotrain-worker: trains one replica. Without --coordinator it runs the whole job alone
// (the standalone reference run); with it, it joins an elastic run and follows its plans.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/flags.h"
#include "common/logging.h"
#include "common/run_config.h"
#include "worker/agent.h"
#include "worker/device.h"
#include "worker/preemption.h"
#include "worker/standalone.h"

ABSL_FLAG(std::string, config, "",
          "Standalone mode: run configuration (JSON, see README). Empty: the built-in demo "
          "config (gpt-tiny on the corpus in --data-dir). Ignored with --coordinator, which "
          "sends the run's config.");
ABSL_FLAG(std::string, data_dir, "data/pystdlib",
          "Standalone mode without --config: directory of the token shards written by "
          "`spotrain prepare-data`.");
ABSL_FLAG(std::string, coordinator, "", "HOST:PORT of the run's coordinator (elastic mode).");
ABSL_FLAG(std::string, name, "", "Name shown in status (default: HOSTNAME-PID).");
ABSL_FLAG(std::string, advertise_host, "127.0.0.1",
          "Address the other workers use to reach this one for collectives (this pod's IP).");
ABSL_FLAG(std::string, device, "auto",
          "Device: auto (a GPU when this worker can train on one, else the CPU; the log says "
          "which and why), cpu, or cuda:N (an error when no usable GPU N exists, or when this "
          "build lacks CUDA or NCCL). A run trains on one backend: the coordinator refuses a "
          "CPU worker into a GPU run and the reverse.");
ABSL_FLAG(std::string, preemption_notice, "none",
          "Watch a cloud metadata server for spot preemption notices: auto, aws, gcp or none. "
          "SIGTERM is always handled.");
ABSL_FLAG(std::string, aws_metadata_url, "http://169.254.169.254",
          "Base URL of the AWS instance metadata service (tests point it at a fake).");
ABSL_FLAG(std::string, gcp_metadata_url, "http://metadata.google.internal",
          "Base URL of the GCP metadata server (tests point it at a fake).");
ABSL_FLAG(int, notice_poll_ms, 5000, "How often to poll the metadata server.");
ABSL_FLAG(std::string, token_file, "",
          "File holding the run token (or set SPOTRAIN_TOKEN). Required with --coordinator.");
ABSL_FLAG(std::string, tls_ca, "", "PEM CA certificate: talk TLS to the coordinator.");
ABSL_FLAG(std::string, tls_cert, "", "PEM client certificate for mutual TLS (optional).");
ABSL_FLAG(std::string, tls_key, "", "PEM client key for mutual TLS (optional).");
ABSL_FLAG(int, join_timeout_s, 600, "Give up when the coordinator is unreachable this long.");
ABSL_FLAG(bool, check_config, false, "Standalone: validate the configuration, print it, exit.");
ABSL_FLAG(bool, print_config, false, "Standalone: print the effective configuration first.");

namespace {

spotrain::worker::LeaveRequest* g_leave = nullptr;

// SIGTERM (Kubernetes, RunPod): announce the leave; a second one exits at once.
void OnSigterm(int) {
  if (g_leave->count.fetch_add(1) >= 1) {
    static const char kMessage[] = "spotrain-worker: second SIGTERM: leaving at once\n";
    (void)!::write(2, kMessage, sizeof(kMessage) - 1);
    ::_exit(0);
  }
}

int RunElastic(const std::string& join_device,
               const spotrain::worker::TrainerDevice& trainer_device) {
  using namespace spotrain::worker;
  static LeaveRequest leave;
  g_leave = &leave;
  struct sigaction action {};
  action.sa_handler = OnSigterm;
  sigemptyset(&action.sa_mask);
  ::sigaction(SIGTERM, &action, nullptr);

  AgentOptions options;
  options.coordinator = absl::GetFlag(FLAGS_coordinator);
  options.name = absl::GetFlag(FLAGS_name);
  if (options.name.empty()) {
    char host[256] = {0};
    ::gethostname(host, sizeof(host) - 1);
    options.name = absl::StrCat(host, "-", ::getpid());
  }
  options.advertise_host = absl::GetFlag(FLAGS_advertise_host);
  options.device = join_device;
  options.trainer_device = trainer_device;
  auto token = ReadRunToken(absl::GetFlag(FLAGS_token_file));
  if (!token.ok()) {
    std::fprintf(stderr, "spotrain-worker: %s\n", std::string(token.status().message()).c_str());
    return 2;
  }
  options.client.token = *token;
  options.client.tls_ca = absl::GetFlag(FLAGS_tls_ca);
  options.client.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  options.client.tls_key = absl::GetFlag(FLAGS_tls_key);
  options.join_timeout = absl::Seconds(absl::GetFlag(FLAGS_join_timeout_s));
  options.reconnect_timeout = options.join_timeout;

  auto source = ParseNoticeSource(absl::GetFlag(FLAGS_preemption_notice));
  if (!source.ok()) {
    std::fprintf(stderr, "spotrain-worker: %s\n", std::string(source.status().message()).c_str());
    return 2;
  }
  PreemptionOptions notice;
  notice.source = *source;
  notice.aws_base_url = absl::GetFlag(FLAGS_aws_metadata_url);
  notice.gcp_base_url = absl::GetFlag(FLAGS_gcp_metadata_url);
  notice.poll_interval = absl::Milliseconds(absl::GetFlag(FLAGS_notice_poll_ms));
  PreemptionWatcher watcher(notice, leave);
  watcher.Start();

  // A known deadline (cloud notice) is a hard limit: leave at once when it is close.
  std::thread deadline_guard([] {
    while (true) {
      absl::SleepFor(absl::Milliseconds(200));
      int64_t deadline = g_leave->deadline_unix_ms.load();
      if (deadline > 0 && absl::ToUnixMillis(absl::Now()) > deadline - 2000) {
        std::fprintf(stderr, "spotrain-worker: preemption deadline reached: leaving at once\n");
        ::_exit(0);
      }
    }
  });
  deadline_guard.detach();

  auto result = RunAgent(options, leave);
  watcher.Stop();
  if (!result.ok()) {
    std::fprintf(stderr, "spotrain-worker: %s\n", result.status().ToString().c_str());
    return 1;
  }
  SPOTRAIN_LOG(Info, "%s%s", result->run_done ? "run complete" : "stopped",
               result->message.empty() ? "" : absl::StrCat(": ", result->message).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  spotrain::common::ParseFlags(
      argc, argv,
      "Trains one replica of a spotrain run.\n"
      "  standalone: spotrain-worker [--config run.json]\n"
      "  elastic:    spotrain-worker --coordinator HOST:PORT [--token-file F]",
      "worker/main.cc");
  namespace common = spotrain::common;

  // GPU training needs CUDA (the model) and NCCL (the gradient reduction).
  const spotrain::worker::CudaProbe probe = spotrain::worker::ProbeCudaDevices();
  auto device = spotrain::worker::ChooseDevice(absl::GetFlag(FLAGS_device), probe,
                                               /*gpu_training=*/probe.built_with_nccl);
  if (!device.ok()) {
    std::fprintf(stderr, "spotrain-worker: %s\n", std::string(device.status().message()).c_str());
    return 2;
  }
  SPOTRAIN_LOG(Info, "%s", device->message);
  const spotrain::worker::TrainerDevice trainer_device{device->cuda, device->index};
  if (!absl::GetFlag(FLAGS_coordinator).empty()) {
    return RunElastic(device->join_device, trainer_device);
  }

  spotrain::proto::RunConfig config;
  const std::string path = absl::GetFlag(FLAGS_config);
  if (path.empty()) {
    config = common::DefaultRunConfig(absl::GetFlag(FLAGS_data_dir));
  } else {
    auto loaded = common::LoadRunConfig(path);
    if (!loaded.ok()) {
      std::fprintf(stderr, "spotrain-worker: %s\n", std::string(loaded.status().message()).c_str());
      return 2;
    }
    config = *loaded;
  }
  if (absl::GetFlag(FLAGS_check_config) || absl::GetFlag(FLAGS_print_config)) {
    std::printf("%s\n", common::RunConfigToJson(config).c_str());
    if (absl::GetFlag(FLAGS_check_config)) {
      std::fprintf(stderr, "spotrain-worker: config is valid\n");
      return 0;
    }
  }
  auto summary = spotrain::worker::RunStandalone(config, stdout, trainer_device);
  if (!summary.ok()) {
    std::fprintf(stderr, "spotrain-worker: %s\n", summary.status().ToString().c_str());
    return 1;
  }
  return 0;
}
