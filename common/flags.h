// Command-line parsing shared by every binary: Abseil flags, with `--foo-bar` accepted as a
// spelling of the flag `foo_bar` (Abseil names cannot hold dashes; the documented spelling
// of spotrain's flags uses them). Call once from main(), before any thread starts.
#ifndef SPOTRAIN_COMMON_FLAGS_H_
#define SPOTRAIN_COMMON_FLAGS_H_

#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace spotrain::common {

// Rewrites `--name-with-dashes[=value]` into `--name_with_dashes[=value]` (arguments after
// a bare `--` are left alone), then parses with absl::ParseCommandLine. `help_file_filter`
// picks the source files whose flags `--help` lists (substring of the defining file's path;
// empty: every spotrain flag). Returns the positional arguments, argv[0] first.
std::vector<std::string> ParseFlags(int argc, char** argv, absl::string_view usage,
                                    absl::string_view help_file_filter = "");

// The dash-to-underscore rewrite alone (exposed for tests).
std::string NormalizeFlagArgument(absl::string_view arg);

}  // namespace spotrain::common

#endif  // SPOTRAIN_COMMON_FLAGS_H_
