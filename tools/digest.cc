// `spotrain digest STEP_DIR`: verifies a committed checkpoint from its files alone (no model,
// no data) and prints the hex SHA-256 of its logical state in canonical order (params | m | v
// floats, then the step as int64: the bytes Trainer::StateDigest hashes), then whether it
// matches the manifest's state_digest. Exit status: 0 it matches, 1 it does not or a file is
// missing or corrupt (the error names it), 2 bad usage. Single-threaded.
#include <cstdio>
#include <string>

#include "absl/strings/str_format.h"
#include "tools/command.h"
#include "worker/checkpoint_io.h"

namespace spotrain::tools {
namespace {

int RunDigest(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr,
                 "usage: spotrain digest STEP_DIR\n"
                 "  STEP_DIR is a checkpoint directory such as CHECKPOINT_DIR/step-00000100\n");
    return 2;
  }
  const std::string step_dir = argv[1];
  auto manifest = worker::ReadManifest(step_dir);
  if (!manifest.ok()) {
    std::fprintf(stderr, "spotrain digest: %s\n", manifest.status().ToString().c_str());
    return 1;
  }
  worker::ReadStats stats;
  auto digest = worker::ComputeStateDigest(step_dir, *manifest, &stats);
  if (!digest.ok()) {
    std::fprintf(stderr, "spotrain digest: %s\n", digest.status().ToString().c_str());
    return 1;
  }
  std::printf("%s\n", digest->c_str());
  const bool match = *digest == manifest->state_digest();
  std::printf(
      "%s manifest state_digest %s (step %lld, %d shards verified, %lld floats, model %s)\n",
      match ? "matches" : "DOES NOT MATCH", manifest->state_digest().c_str(),
      static_cast<long long>(manifest->step()), stats.shards_read,
      static_cast<long long>(manifest->state_floats()),
      manifest->model().preset().empty() ? "?" : manifest->model().preset().c_str());
  return match ? 0 : 1;
}

}  // namespace

SPOTRAIN_REGISTER_COMMAND(digest_command, "digest",
                          "verify a checkpoint's shards and print its state digest (STEP_DIR)",
                          RunDigest);

}  // namespace spotrain::tools
