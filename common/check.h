// CHECK for broken invariants only (never for bad input): prints the condition and the
// place, then aborts. Debian's Abseil 20220623 has no absl/log, hence this file.
#ifndef SPOTRAIN_COMMON_CHECK_H_
#define SPOTRAIN_COMMON_CHECK_H_

#include <cstdio>
#include <cstdlib>

#define SPOTRAIN_CHECK(cond)                                                          \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "F %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                   \
    }                                                                                 \
  } while (0)

#endif  // SPOTRAIN_COMMON_CHECK_H_
