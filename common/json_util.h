// Small helpers for hand-written JSON lines (events.jsonl, `spotrain plan --json`), where a
// protobuf message would be heavier than the line it writes. Pure functions; thread-safe.
#ifndef SPOTRAIN_COMMON_JSON_UTIL_H_
#define SPOTRAIN_COMMON_JSON_UTIL_H_

#include <string>

#include "absl/strings/string_view.h"

namespace spotrain::common {

// `s` as a JSON string literal, quotes included: ", \ and control characters escaped.
std::string JsonQuote(absl::string_view s);

}  // namespace spotrain::common

#endif  // SPOTRAIN_COMMON_JSON_UTIL_H_
