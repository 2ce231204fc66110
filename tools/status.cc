// `spotrain status --coordinator HOST:PORT [--json]`: asks a coordinator for the state of its
// run (GetStatus) and prints it as a table or as JSON (coordinator/status_format.h).
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "coordinator/client_auth.h"
#include "coordinator/status_format.h"
#include "proto/spotrain.grpc.pb.h"
#include "tools/command.h"

// Shared by the subcommands that talk to a coordinator: other tools/*.cc declare them with
// ABSL_DECLARE_FLAG instead of defining them again.
ABSL_FLAG(std::string, coordinator, "", "Coordinator address HOST:PORT.");
ABSL_FLAG(std::string, token_file, "",
          "File holding the run token (default: $SPOTRAIN_TOKEN; not needed when the "
          "coordinator runs with --public-status).");
ABSL_FLAG(std::string, tls_ca, "", "PEM CA that signed the coordinator's certificate (TLS).");
ABSL_FLAG(std::string, tls_cert, "", "PEM client certificate (mutual TLS).");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls-cert.");
ABSL_FLAG(bool, json, false, "Print JSON instead of a table.");
ABSL_FLAG(int, timeout_ms, 5000, "Give up after this long.");

namespace spotrain::tools {
namespace {

int RunStatus(int argc, char** argv) {
  (void)argc;
  (void)argv;
  const std::string address = absl::GetFlag(FLAGS_coordinator);
  if (address.empty()) {
    std::fprintf(stderr, "spotrain status: --coordinator HOST:PORT is required\n");
    return 2;
  }
  std::string token;
  auto read = coordinator::ReadRunToken(absl::GetFlag(FLAGS_token_file));
  if (read.ok()) {
    token = *read;
  } else if (!absl::IsNotFound(read.status())) {
    std::fprintf(stderr, "spotrain status: %s\n", std::string(read.status().message()).c_str());
    return 2;
  }
  coordinator::TlsFiles tls;
  tls.ca = absl::GetFlag(FLAGS_tls_ca);
  tls.cert = absl::GetFlag(FLAGS_tls_cert);
  tls.key = absl::GetFlag(FLAGS_tls_key);
  auto credentials = coordinator::MakeChannelCredentials(tls);
  if (!credentials.ok()) {
    std::fprintf(stderr, "spotrain status: %s\n",
                 std::string(credentials.status().message()).c_str());
    return 2;
  }
  auto stub = proto::Coordinator::NewStub(coordinator::ConnectToCoordinator(address, *credentials));
  grpc::ClientContext ctx;
  if (!token.empty()) coordinator::AttachToken(&ctx, token);
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(absl::GetFlag(FLAGS_timeout_ms)));
  proto::RunStatus status;
  grpc::Status s = stub->GetStatus(&ctx, proto::StatusRequest(), &status);
  if (!s.ok()) {
    std::string hint;
    if (s.error_code() == grpc::StatusCode::PERMISSION_DENIED) {
      hint = " (pass the run token with --token-file or SPOTRAIN_TOKEN)";
    } else if (s.error_code() == grpc::StatusCode::UNAVAILABLE ||
               s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
      hint = " (is the coordinator running at that address? TLS flags right?)";
    }
    std::fprintf(stderr, "spotrain status: %s: %s%s\n", address.c_str(), s.error_message().c_str(),
                 hint.c_str());
    return 1;
  }
  if (absl::GetFlag(FLAGS_json)) {
    std::printf("%s\n", coordinator::RunStatusToJson(status).c_str());
  } else {
    std::printf("%s", coordinator::RunStatusToTable(status).c_str());
  }
  return 0;
}

}  // namespace

SPOTRAIN_REGISTER_COMMAND(status_command, "status",
                          "show a run's state: members, epoch, step, checkpoints, recoveries",
                          RunStatus);

}  // namespace spotrain::tools
