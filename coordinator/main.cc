// spotrain-coordinator: the one on-demand pod of a run. Parses flags and calls
// RunCoordinator (coordinator/server.h).
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "common/file_util.h"
#include "common/flags.h"
#include "common/run_config.h"
#include "coordinator/server.h"

ABSL_FLAG(std::string, config, "", "Run config (JSON, protobuf JSON mapping). Required.");
ABSL_FLAG(std::string, host, "0.0.0.0", "Address to listen on.");
ABSL_FLAG(int, port, 7777, "gRPC port for workers and `spotrain status`.");
ABSL_FLAG(std::string, state_dir, "",
          "Directory for the durable state (journal, token, events.jsonl). Required; keep it "
          "across restarts to resume the run.");
ABSL_FLAG(int, metrics_port, 0, "Serve Prometheus metrics on this port at /metrics (0: off).");
ABSL_FLAG(bool, check_config, false, "Validate --config, print it with defaults, and exit.");
ABSL_FLAG(std::string, token_file, "",
          "File holding the run token (default: $SPOTRAIN_TOKEN, else <state-dir>/token, "
          "generated on first start).");
ABSL_FLAG(bool, public_status, false, "Answer GetStatus (`spotrain status`) without the token.");
ABSL_FLAG(std::string, tls_cert, "", "PEM certificate of the coordinator (enables TLS).");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls-cert.");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA bundle: when set with TLS, clients must present a certificate it signed.");
ABSL_FLAG(bool, force_new_run, false,
          "Start a new run even if --state-dir holds the state of a run with another config.");
ABSL_FLAG(bool, serve_after_done, false,
          "Keep serving status after the run is done (default: exit 0 once the final "
          "checkpoint is committed).");

int main(int argc, char** argv) {
  // --help lists the flags of this file (dashes in flag names are accepted).
  spotrain::common::ParseFlags(
      argc, argv,
      "the spotrain coordinator\nusage: spotrain-coordinator --config run.json --state-dir DIR "
      "[--port P] [--metrics-port M] [--check-config]",
      "coordinator/main.cc");
  const std::string config_path = absl::GetFlag(FLAGS_config);
  if (config_path.empty()) {
    std::fprintf(stderr, "spotrain-coordinator: --config is required (see --help)\n");
    return 2;
  }
  if (absl::GetFlag(FLAGS_check_config)) {
    auto config = spotrain::common::LoadRunConfig(config_path);
    if (!config.ok()) {
      std::fprintf(stderr, "spotrain-coordinator: %s\n",
                   std::string(config.status().message()).c_str());
      return 2;
    }
    std::printf("%s\n", spotrain::common::RunConfigToJson(*config).c_str());
    std::fprintf(stderr, "config OK (fingerprint %016lx)\n",
                 static_cast<unsigned long>(spotrain::common::RunFingerprint(*config)));
    return 0;
  }
  spotrain::coordinator::CoordinatorOptions options;
  options.config_path = config_path;
  options.host = absl::GetFlag(FLAGS_host);
  options.port = absl::GetFlag(FLAGS_port);
  options.state_dir = absl::GetFlag(FLAGS_state_dir);
  options.metrics_port = absl::GetFlag(FLAGS_metrics_port);
  options.token_file = absl::GetFlag(FLAGS_token_file);
  options.public_status = absl::GetFlag(FLAGS_public_status);
  options.tls.cert = absl::GetFlag(FLAGS_tls_cert);
  options.tls.key = absl::GetFlag(FLAGS_tls_key);
  options.tls.ca = absl::GetFlag(FLAGS_tls_ca);
  options.force_new_run = absl::GetFlag(FLAGS_force_new_run);
  options.serve_after_done = absl::GetFlag(FLAGS_serve_after_done);
  if (options.state_dir.empty()) {
    std::fprintf(stderr, "spotrain-coordinator: --state-dir is required (see --help)\n");
    return 2;
  }
  if (options.port < 0 || options.port > 65535) {
    std::fprintf(stderr, "spotrain-coordinator: --port %d is not a port\n", options.port);
    return 2;
  }
  // A checkpoint directory that cannot be used stops the run before anyone trains.
  if (auto config = spotrain::common::LoadRunConfig(config_path); !config.ok()) {
    std::fprintf(stderr, "spotrain-coordinator: %s\n",
                 std::string(config.status().message()).c_str());
    return 2;
  } else if (const std::string& dir = config->checkpoint().dir(); !dir.empty()) {
    absl::Status usable = spotrain::common::MakeDirectories(dir);
    if (usable.ok()) usable = spotrain::common::CheckDirectoryWritable(dir);
    if (!usable.ok()) {
      std::fprintf(stderr,
                   "spotrain-coordinator: checkpoint.dir %s cannot be used: %s (create it, "
                   "fix its permissions or choose another path)\n",
                   dir.c_str(), std::string(usable.message()).c_str());
      return 2;
    }
  }
  return spotrain::coordinator::RunCoordinator(options);
}
