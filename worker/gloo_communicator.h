// The Gloo (CPU, TCP) implementation of Communicator: one Gloo context per epoch, built by a
// rendezvous over the coordinator's key-value service under the epoch's key prefix
// (worker/rendezvous_store.h). Every Gloo exception is caught inside this module and
// returned as a Status (worker/communicator.h lists the codes).
//
// Threading: CreateGlooCommunicator blocks the calling thread for the rendezvous; the
// returned communicator follows the Communicator contract (one owner thread for the
// operations, Abort() from any thread).
//
// Process-wide side effect: Gloo writes to its sockets without MSG_NOSIGNAL, so a write to
// a connection that a dead peer closed raises SIGPIPE, which by default kills the process.
// The first multi-rank CreateGlooCommunicator therefore sets SIGPIPE to "ignore" when it
// still has its default action (a handler the program installed is left alone; it must
// then not terminate the process). The worker's main may also do this itself at start-up.
//
// Failure behaviour (loopback, libgloo 2022-05, 2-core machine):
//   - A peer killed with SIGKILL, or whose communicator is destroyed: its sockets close,
//     and the other ranks' current or next operation fails with kUnavailable (measured
//     14-57 ms after the SIGKILL, four processes, in the multi-process test).
//   - A peer that stays connected but silent (a hung process, SIGSTOP): kUnavailable with
//     "timed out" after op_timeout (per wait: one ring step of an all-reduce chunk, or one
//     broadcast chunk). Tested with a rank that never calls the collective.
//   - When an operation fails on this rank, the communicator closes all of its connections
//     at once, so that ranks not adjacent to the failure (in the ring) also fail fast
//     instead of waiting for their own timeout. Not always: Gloo 2022-05 does not fail a
//     send still waiting for the peer's receive when that peer's connection closes, so a
//     rank whose right neighbour died in that state, and the ranks waiting on it, fail only
//     at op_timeout unless something calls Abort() (about 1 run in 40 of the four-process
//     test on a loaded 2-core machine, where nothing does). In the worker the coordinator's
//     Prepare leads to Abort(), which releases such a wait (below).
//
// The collectives: all-reduce (float, int64), the fixed-point all-reduce and the barrier are
// this module's own ring (reduce-scatter, then all-gather) over Gloo's point-to-point
// send/receive; broadcast is Gloo's. Every operation posts its sends and receives only on
// the caller's buffers and on the communicator's own scratch buffer, all registered for
// Abort(), never on a buffer inside Gloo that Abort() could not reach. The ring's result has
// the same bits on every rank (each slice is summed once, then copied); the float sum order
// depends on the world size and the rank (deterministic runs use the fixed-point all-reduce,
// exact whatever the order).
//
// What Abort() can and cannot do:
//   - It makes the communicator's status kAborted, so every later operation returns at once.
//   - It puts the Gloo TCP context into the state Gloo itself uses after an application
//     timeout (gloo::transport::tcp::Context::signalException): every connection is closed
//     and every send/receive posted on a connection gets an exception, so an operation
//     blocked waiting for a peer (for example one that never arrives) returns kAborted
//     within milliseconds (1-5 ms measured for all-reduce, broadcast and barrier with
//     three ranks; closing each connection waits for a tick of Gloo's event loop, up to 10 ms, so
//     this grows with the number of peers), and the peers see the connections close (kUnavailable).
//     It also releases every wait of the operation in flight (all on registered buffers,
//     above), including a send or receive that a closed connection did not fail: tested with
//     a peer stopped (SIGSTOP) or killed (SIGKILL) in the middle of a stream of 8 MiB
//     all-reduces, every survivor released within milliseconds (tests/unit/worker/
//     gloo_communicator_test.cc, AbortReleasesEveryRankWhenAPeerStopsOrDiesMidTransfer).
//   - It cannot interrupt the local reduction of the slice in progress (bounded by one
//     slice of a max_chunk_bytes segment).
//   - It does not interrupt CreateGlooCommunicator (no communicator exists yet): use
//     GlooOptions::cancelled for the rendezvous phase; the TCP connect phase is bounded by
//     connect_timeout.
//   The signalException hook is not part of Gloo's public headers in this version (the
//   header that declares it does not compile outside Gloo's tree), so it is bound by its
//   exported symbol name and used only after checking that the context's dynamic type is
//   gloo::transport::tcp::Context; for any other transport Abort() falls back to
//   gloo::Context::closeConnections(), which fails the peers fast but leaves a blocked
//   local operation to its op_timeout.
#ifndef SPOTRAIN_WORKER_GLOO_COMMUNICATOR_H_
#define SPOTRAIN_WORKER_GLOO_COMMUNICATOR_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/communicator.h"
#include "worker/rendezvous_store.h"

namespace spotrain::worker {

struct GlooOptions {
  // The address this rank binds its sockets to and advertises to its peers (an IP address
  // or a host name that resolves to one of this host's addresses), e.g. "127.0.0.1".
  std::string interface_host = "127.0.0.1";
  // Bound on the rendezvous (waiting for every peer's address in the key-value store) and,
  // separately, on the TCP connection set-up that follows it.
  absl::Duration connect_timeout = absl::Seconds(60);
  // A collective that makes no progress for this long fails with kUnavailable ("timed
  // out"). Applies to each wait: one of the 2(W-1) ring steps of an all-reduce chunk, one
  // broadcast chunk. A peer that keeps sending, slowly, can so stretch one chunk of an
  // all-reduce up to 2(W-1) x op_timeout; the coordinator's heartbeats bound a hung peer.
  absl::Duration op_timeout = absl::Seconds(60);
  // Large all-reduces and broadcasts are issued as Gloo calls of at most this many bytes
  // (rounded down to whole elements), so that memory and per-call time stay bounded and
  // Abort() is checked between chunks.
  int64_t max_chunk_bytes = int64_t{64} << 20;
  // Optional: polled (from the creating thread) while the rendezvous waits for peers;
  // returning true makes CreateGlooCommunicator fail with kAborted. E.g. "a newer Prepare
  // arrived".
  std::function<bool()> cancelled;
};

// Builds the communicator of rank `rank` in a group of `world_size` ranks for `epoch`:
// every rank of the epoch calls this with the same epoch, world size and key-value
// service, and its own rank. Blocks until all ranks are connected. World size 1 needs no
// peers and no networking (the key-value service is not used).
//
// Each (epoch, rank) must be created at most once on a key-value service: the rendezvous
// keys of a failed attempt stay, so a retry needs a new epoch.
//
// Errors: kInvalidArgument for bad arguments or an interface_host that cannot be bound;
// kUnavailable when a peer never arrived or could not be connected (the message says
// "timed out" after connect_timeout); kAborted when the key-value service reports the
// epoch as stale or `cancelled` returned true; other codes as the key-value service
// returned them.
absl::StatusOr<std::unique_ptr<Communicator>> CreateGlooCommunicator(KeyValueClient& kv,
                                                                     int64_t epoch, int rank,
                                                                     int world_size,
                                                                     const GlooOptions& options);

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_GLOO_COMMUNICATOR_H_
