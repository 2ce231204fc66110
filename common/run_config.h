// Loading, defaulting and validating a RunConfig (proto/config.proto) from JSON. Both the
// coordinator and the standalone worker load the same file through these functions, so a
// config means the same everywhere. Pure functions apart from reading the file; thread-safe.
#ifndef SPOTRAIN_COMMON_RUN_CONFIG_H_
#define SPOTRAIN_COMMON_RUN_CONFIG_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "proto/config.pb.h"

namespace spotrain::common {

// Parses JSON (protobuf JSON mapping). Unknown fields and wrong types are
// kInvalidArgument naming the field. Defaults are applied, then the result is validated.
absl::StatusOr<proto::RunConfig> ParseRunConfig(const std::string& json);
absl::StatusOr<proto::RunConfig> LoadRunConfig(const std::string& path);

// Fills every unset field with its built-in default (idempotent).
void ApplyDefaults(proto::RunConfig& config);

// Checks a defaulted config for consistency; kInvalidArgument names the field and says what
// to change.
absl::Status ValidateRunConfig(const proto::RunConfig& config);

// The built-in demo config: gpt-tiny on the corpus that `spotrain prepare-data` writes to
// `data_dir` from the Python standard library, defaulted and valid.
proto::RunConfig DefaultRunConfig(const std::string& data_dir);

// Checkpoint interval in steps, or 0 when every_steps is "auto" or no dir is set.
int64_t FixedCheckpointInterval(const proto::RunConfig& config);
bool AutoCheckpointInterval(const proto::RunConfig& config);

// Canonical JSON of a config (defaults applied, fields in declaration order).
std::string RunConfigToJson(const proto::RunConfig& config);

// A stable 64-bit fingerprint of everything that changes the mathematics of the run (model,
// data, batch, steps, seed, optimiser, determinism). Used to refuse a state dir or a
// checkpoint that belongs to another run.
uint64_t RunFingerprint(const proto::RunConfig& config);

}  // namespace spotrain::common

#endif  // SPOTRAIN_COMMON_RUN_CONFIG_H_
