#include "common/flags.h"

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"

namespace spotrain::common {

std::string NormalizeFlagArgument(absl::string_view arg) {
  if (!absl::StartsWith(arg, "--") || arg.size() == 2) return std::string(arg);
  std::string out(arg);
  const size_t end = out.find('=');
  for (size_t i = 2; i < out.size() && i < end; ++i) {
    if (out[i] == '-') out[i] = '_';
  }
  return out;
}

std::vector<std::string> ParseFlags(int argc, char** argv, absl::string_view usage,
                                    absl::string_view help_file_filter) {
  static std::string* filter = new std::string();
  *filter = std::string(help_file_filter);
  absl::FlagsUsageConfig config;
  config.contains_help_flags = [](absl::string_view file) {
    if (!filter->empty()) return absl::StrContains(file, *filter);
    // Every flag of spotrain's own sources (not Abseil's or gRPC's).
    return !absl::StrContains(file, "absl/");
  };
  config.contains_helpshort_flags = config.contains_help_flags;
  config.normalize_filename = [](absl::string_view file) { return std::string(file); };
  absl::SetFlagsUsageConfig(config);
  absl::SetProgramUsageMessage(usage);

  std::vector<std::string> storage;
  storage.reserve(argc);
  bool passthrough = false;
  for (int i = 0; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (i == 0 || passthrough) {
      storage.emplace_back(arg);
    } else {
      if (arg == "--") passthrough = true;
      storage.push_back(NormalizeFlagArgument(arg));
    }
  }
  std::vector<char*> args;
  for (std::string& s : storage) args.push_back(s.data());
  std::vector<char*> rest = absl::ParseCommandLine(static_cast<int>(args.size()), args.data());
  return std::vector<std::string>(rest.begin(), rest.end());
}

}  // namespace spotrain::common
