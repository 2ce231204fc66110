// Status propagation helpers. Debian's Abseil (20220623) ships no RETURN_IF_ERROR, so the
// two macros every module needs live here. Thread-safe: they are pure expressions.
#ifndef SPOTRAIN_COMMON_STATUS_MACROS_H_
#define SPOTRAIN_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define SPOTRAIN_CONCAT_INNER_(a, b) a##b
#define SPOTRAIN_CONCAT_(a, b) SPOTRAIN_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status); returns it from the caller if it is not OK.
#define RETURN_IF_ERROR(expr)                            \
  do {                                                   \
    ::absl::Status spotrain_status_ = (expr);            \
    if (!spotrain_status_.ok()) return spotrain_status_; \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, MakeX());` binds the value of an absl::StatusOr or returns its
// error from the caller.
#define ASSIGN_OR_RETURN(lhs, expr) \
  SPOTRAIN_ASSIGN_OR_RETURN_IMPL_(SPOTRAIN_CONCAT_(spotrain_statusor_, __LINE__), lhs, expr)
#define SPOTRAIN_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                    \
  if (!tmp.ok()) return tmp.status();                   \
  lhs = std::move(tmp).value()

#endif  // SPOTRAIN_COMMON_STATUS_MACROS_H_
