#include "common/logging.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace spotrain::common {
namespace {

LogLevel InitialLevel() {
  const char* env = std::getenv("SPOTRAIN_LOG_LEVEL");
  if (env == nullptr) return LogLevel::kInfo;
  std::string v = absl::AsciiStrToLower(env);
  if (v == "debug") return LogLevel::kDebug;
  if (v == "warning") return LogLevel::kWarning;
  if (v == "error") return LogLevel::kError;
  return LogLevel::kInfo;
}

std::atomic<LogLevel>& MinLevel() {
  static std::atomic<LogLevel> level{InitialLevel()};
  return level;
}

absl::Mutex tag_mu;
std::string& Tag() ABSL_EXCLUSIVE_LOCKS_REQUIRED(tag_mu) {
  static std::string* tag = new std::string();
  return *tag;
}

}  // namespace

void SetMinLogLevel(LogLevel level) { MinLevel().store(level); }
LogLevel MinLogLevel() { return MinLevel().load(); }

void SetLogTag(absl::string_view tag) {
  absl::MutexLock lock(&tag_mu);
  Tag() = std::string(tag);
}

void LogLine(LogLevel level, absl::string_view message) {
  static constexpr char kLetters[] = {'D', 'I', 'W', 'E'};
  std::string tag;
  {
    absl::MutexLock lock(&tag_mu);
    tag = Tag();
  }
  std::string line =
      absl::StrFormat("%c %s %s%s%s\n", kLetters[static_cast<int>(level)],
                      absl::FormatTime("%H:%M:%E3S", absl::Now(), absl::UTCTimeZone()), tag,
                      tag.empty() ? "" : ": ", message);
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
}

}  // namespace spotrain::common
