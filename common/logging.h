// Minimal leveled logging to stderr with a timestamp and a component tag. Thread-safe:
// each call writes one line with a single fwrite.
#ifndef SPOTRAIN_COMMON_LOGGING_H_
#define SPOTRAIN_COMMON_LOGGING_H_

#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"

namespace spotrain::common {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Lines below this level are dropped. Default kInfo; SPOTRAIN_LOG_LEVEL=debug lowers it.
void SetMinLogLevel(LogLevel level);
LogLevel MinLogLevel();
// A short tag printed on every line of this process, e.g. "worker w3" (default: none).
void SetLogTag(absl::string_view tag);

void LogLine(LogLevel level, absl::string_view message);

template <typename... Args>
void Log(LogLevel level, const absl::FormatSpec<Args...>& format, const Args&... args) {
  if (level < MinLogLevel()) return;
  LogLine(level, absl::StrFormat(format, args...));
}

}  // namespace spotrain::common

#define SPOTRAIN_LOG(level, ...) \
  ::spotrain::common::Log(::spotrain::common::LogLevel::k##level, __VA_ARGS__)

#endif  // SPOTRAIN_COMMON_LOGGING_H_
