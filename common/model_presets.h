// GPT-2 style model presets and the derived model shape. Shared by the worker (which
// builds the model), the coordinator (which records the shape in checkpoint manifests) and
// the tools. Pure functions; thread-safe.
#ifndef SPOTRAIN_COMMON_MODEL_PRESETS_H_
#define SPOTRAIN_COMMON_MODEL_PRESETS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/config.pb.h"

namespace spotrain::common {

// Names of all presets, in size order ("gpt-tiny", "gpt-small", "gpt2-124m").
std::vector<std::string> PresetNames();

// The shape of `preset`; kInvalidArgument lists the valid names when it is unknown.
absl::StatusOr<proto::ModelConfig> ModelConfigForPreset(const std::string& preset);

// Number of fp32 parameters of a GPT-2 decoder of this shape (tied embeddings).
int64_t CountParameters(const proto::ModelConfig& config);

}  // namespace spotrain::common

#endif  // SPOTRAIN_COMMON_MODEL_PRESETS_H_
