// The deterministic gradient accumulation of worker/fixed_point.h on a CUDA GPU, with the
// same format and exactly the same arithmetic per element (widen to double, scale by 2^32,
// round half away from zero; back: float(double(sum) * (factor / 2^32))), so a GPU replica's
// reduction is bit-identical for every grouping of micro-batches over ranks, as on the CPU.
// No atomics in the arithmetic; only the index of the first out-of-range element is found
// with an atomic minimum (its value does not depend on the order).
//
// Every function enqueues on `stream`; DrainToFixedPointCuda then waits for it (it reports
// range errors). Thread-safety: as the stream's.
#ifndef SPOTRAIN_WORKER_FIXED_POINT_CUDA_H_
#define SPOTRAIN_WORKER_FIXED_POINT_CUDA_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace spotrain::worker {

// Device scratch of DrainToFixedPointCuda (one 8-byte word).
struct FixedPointCudaScratch {
  unsigned long long* first_bad = nullptr;
};

// acc = (assign ? 0 : acc) + round(src * 2^32), src = 0, for the n device elements; then
// waits. *first_bad = -1 when every element converted; else the first element that is NaN,
// infinite or |x| >= kFixedPointMaxAbs, with its value in *bad_value (such elements of src
// and acc are left unchanged; the step has failed: make FixedPointRangeError of them).
// CUDA errors as kernels/cuda/cuda_status.h.
absl::Status DrainToFixedPointCuda(cudaStream_t stream, float* src, int64_t n, int64_t* acc,
                                   bool assign, const FixedPointCudaScratch& scratch,
                                   int64_t* first_bad, float* bad_value);

// dst[i] = float(double(acc[i]) * (factor / 2^32)) (enqueued).
absl::Status FromFixedPointCuda(cudaStream_t stream, const int64_t* acc, int64_t n, double factor,
                                float* dst);

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_FIXED_POINT_CUDA_H_
