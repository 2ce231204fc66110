// The collective-communication interface the trainer uses to combine gradients and to copy
// state between the ranks of one epoch (DESIGN.md section 6). Backends: Gloo over TCP
// (worker/gloo_communicator.h) and NCCL on GPUs.
//
// One Communicator serves exactly one epoch: its rank and world size are fixed when it is
// created, and it is never reused after a failure. When any operation fails, the
// communicator stays failed: every later operation returns the same error without touching
// the network, and the owner must build a new communicator for a new epoch.
//
// Threading contract: one owner thread calls the collective operations (AllReduceSum,
// Broadcast, Barrier) and destroys the object; they are not reentrant and must not run
// concurrently with each other. rank(), world_size() and status() may be called from any
// thread. Abort() may be called from any thread at any time while the object is alive (the
// caller guarantees that the object outlives the call), also while the owner is blocked in
// an operation.
//
// Status codes (STYLE.md, "Errors"):
//   kUnavailable       a peer is gone, the connection broke, or an operation timed out (the
//                      message then says "timed out"); retry in a new epoch.
//   kAborted           Abort() was called; the epoch changed.
//   kInvalidArgument   bad arguments (negative count, root out of range); nothing was sent.
//                      This does not fail the communicator, but note that the peers may now
//                      wait for a collective this rank skipped.
// Every rank of the group must issue the same sequence of collectives with the same
// counts (and the same root for Broadcast); a mismatch is a caller bug that shows up as a
// timeout (kUnavailable) or garbage.
#ifndef SPOTRAIN_WORKER_COMMUNICATOR_H_
#define SPOTRAIN_WORKER_COMMUNICATOR_H_

#include <cstdint>

#include "absl/status/status.h"

namespace spotrain::worker {

class Communicator {
 public:
  virtual ~Communicator() = default;

  // This process's rank in [0, world_size()) and the group size. Fixed at creation.
  virtual int rank() const = 0;
  virtual int world_size() const = 0;

  // In place: data[i] becomes the sum over all ranks of their data[i], for i in [0, n).
  // Every rank gets bit-identical results. The summation order of the float sum may depend
  // on the world size (use the int64 overload with worker/fixed_point.h where results must
  // not depend on membership). Buffers of any size (the whole flat gradient, 124M floats)
  // are accepted; the backend chunks them as it needs. Blocks until this rank's result is
  // complete, the operation fails, or Abort() is called. n == 0 is a no-op.
  virtual absl::Status AllReduceSum(float* data, int64_t n) = 0;
  // The int64 sum wraps around on overflow (two's complement); fixed_point.h keeps enough
  // headroom that it never does.
  virtual absl::Status AllReduceSum(int64_t* data, int64_t n) = 0;

  // The deterministic gradient reduction (worker/fixed_point.h): sums the int64 fixed-point
  // accumulators `acc` of all ranks exactly and writes FromFixedPoint(sum, factor) into
  // out[0, n) on every rank, bit-identical everywhere and for every world size. Afterwards
  // acc holds unspecified values (it is scratch). The default implementation is
  // AllReduceSum(int64) followed by FromFixedPoint; a backend may instead reduce-scatter the
  // integers, convert the slice it owns and all-gather the floats (12 bytes per element on
  // the wire instead of 16, and 1/W of the conversions). Blocks like AllReduceSum.
  virtual absl::Status AllReduceFixedPoint(int64_t* acc, int64_t n, double factor, float* out);

  // Copies `bytes` bytes at `data` on rank `root` into `data` on every other rank. Blocks
  // like AllReduceSum. bytes == 0 is a no-op.
  virtual absl::Status Broadcast(void* data, int64_t bytes, int root) = 0;

  // Returns once every rank has entered Barrier (or on failure, or after Abort()).
  virtual absl::Status Barrier() = 0;

  // Makes the operation now blocked on the owner thread, and every later one, fail fast
  // with kAborted, and tears down the connections so that the peers' operations fail too
  // (with kUnavailable). Idempotent; never blocks for long. How promptly a blocked
  // operation returns depends on the backend (see its header).
  virtual void Abort() = 0;

  // The epoch is being replaced (an immediate Prepare): make the operation in progress, and
  // every later one, fail fast. Any thread, like Abort(), which it is by default; a backend
  // may instead keep what the next epoch can reuse (NCCL: revoke, so that the communicator
  // can be shrunk). status() is then not OK, but not necessarily kAborted.
  virtual void Interrupt() { Abort(); }

  // True when the buffers of the operations may be CUDA device memory (NCCL); false when they
  // must be host memory (Gloo).
  virtual bool accepts_device_memory() const { return false; }

  // OK while the communicator is usable; otherwise the sticky error every later operation
  // returns (kAborted after Abort(), kUnavailable after a failure).
  virtual absl::Status status() const = 0;
};

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_COMMUNICATOR_H_
