#include "common/model_presets.h"

#include "absl/strings/str_join.h"

namespace spotrain::common {
namespace {

struct Preset {
  const char* name;
  int vocab;
  int padded_vocab;
  int context;
  int layers;
  int heads;
  int channels;
};

// gpt-tiny and gpt-small are byte-level (vocab 256); gpt2-124m is GPT-2 small with the
// vocabulary padded to a multiple of 128 as llm.c does.
constexpr Preset kPresets[] = {
    {"gpt-tiny", 256, 256, 128, 4, 4, 128},
    {"gpt-small", 256, 256, 256, 6, 8, 256},
    {"gpt2-124m", 50257, 50304, 1024, 12, 12, 768},
};

}  // namespace

std::vector<std::string> PresetNames() {
  std::vector<std::string> names;
  for (const Preset& p : kPresets) names.emplace_back(p.name);
  return names;
}

absl::StatusOr<proto::ModelConfig> ModelConfigForPreset(const std::string& preset) {
  for (const Preset& p : kPresets) {
    if (preset != p.name) continue;
    proto::ModelConfig config;
    config.set_preset(p.name);
    config.set_vocab_size(p.vocab);
    config.set_padded_vocab(p.padded_vocab);
    config.set_max_seq_len(p.context);
    config.set_num_layers(p.layers);
    config.set_num_heads(p.heads);
    config.set_channels(p.channels);
    config.set_num_parameters(CountParameters(config));
    return config;
  }
  return absl::InvalidArgumentError(absl::StrCat("model: unknown preset \"", preset,
                                                 "\"; choose one of ",
                                                 absl::StrJoin(PresetNames(), ", ")));
}

int64_t CountParameters(const proto::ModelConfig& c) {
  const int64_t v = c.padded_vocab(), t = c.max_seq_len(), l = c.num_layers(), ch = c.channels();
  const int64_t per_layer = 12 * ch * ch + 13 * ch;
  return v * ch + t * ch + l * per_layer + 2 * ch;
}

}  // namespace spotrain::common
