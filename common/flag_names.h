// Command lines use dashes (--state-dir, --token-file); absl flag names are C identifiers
// (state_dir). NormalizeFlagNames rewrites every "--foo-bar[=value]" argument in place to
// "--foo_bar[=value]" before absl::ParseCommandLine sees it (values are left alone, and so is
// everything after a bare "--"). Header-only; call it once from main, before other threads.
#ifndef SPOTRAIN_COMMON_FLAG_NAMES_H_
#define SPOTRAIN_COMMON_FLAG_NAMES_H_

#include <cstring>

namespace spotrain::common {

inline void NormalizeFlagNames(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    char* arg = argv[i];
    if (std::strcmp(arg, "--") == 0) return;
    if (arg[0] != '-') continue;
    char* name = arg + (arg[1] == '-' ? 2 : 1);
    for (char* p = name; *p != '\0' && *p != '='; ++p) {
      if (*p == '-' && p != name) *p = '_';
    }
  }
}

}  // namespace spotrain::common

#endif  // SPOTRAIN_COMMON_FLAG_NAMES_H_
