#include "worker/communicator.h"

#include "common/status_macros.h"
#include "worker/fixed_point.h"

namespace spotrain::worker {

absl::Status Communicator::AllReduceFixedPoint(int64_t* acc, int64_t n, double factor, float* out) {
  RETURN_IF_ERROR(AllReduceSum(acc, n));
  FromFixedPoint(acc, n, factor, out);
  return absl::OkStatus();
}

}  // namespace spotrain::worker
