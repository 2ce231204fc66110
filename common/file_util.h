// File helpers: atomic publication (temp file, fsync, rename, fsync directory), whole-file
// reads, directory checks. Thread-safe (no shared state); each call blocks on disk I/O.
// Errors come back as absl::Status with the path and errno text in the message.
#ifndef SPOTRAIN_COMMON_FILE_UTIL_H_
#define SPOTRAIN_COMMON_FILE_UTIL_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace spotrain::common {

// Writes `contents` to `path` so that readers see either the old file or the whole new
// one, never a part: writes `path.tmp.<pid>`, fsyncs it, renames it over `path`, fsyncs
// the directory. On failure the temp file is removed and `path` is untouched.
absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents);

// As above for a buffer given in pieces (e.g. a header and a payload).
absl::Status WriteFileAtomically(const std::string& path,
                                 const std::vector<absl::string_view>& pieces);

absl::StatusOr<std::string> ReadFile(const std::string& path);

// Fsyncs a directory so that a rename or unlink inside it is durable.
absl::Status FsyncDirectory(const std::string& dir);

// Creates `dir` and its parents if needed (mode 0755).
absl::Status MakeDirectories(const std::string& dir);

// Fails with kFailedPrecondition, naming the path, unless a file can be created in `dir`.
absl::Status CheckDirectoryWritable(const std::string& dir);

// Expands a glob pattern into sorted paths; kNotFound names the pattern when none match.
absl::StatusOr<std::vector<std::string>> Glob(const std::string& pattern);

bool PathExists(const std::string& path);

// "a/b" + "c" -> "a/b/c".
std::string JoinPath(absl::string_view dir, absl::string_view name);

}  // namespace spotrain::common

#endif  // SPOTRAIN_COMMON_FILE_UTIL_H_
