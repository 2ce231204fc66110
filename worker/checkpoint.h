// Saving and restoring a Trainer's state as sharded checkpoints (DESIGN.md section 5; the
// file format and the split of the state over ranks are in worker/checkpoint_io.h).
//
// Saving is two-phase. At a step boundary the training thread calls
// CheckpointWriter::Snapshot, which copies this rank's range of the logical state
// (params | m | v) into a reused host buffer and computes the state digest: this is the only
// stall of training. Submit then hands the buffer to the writer's background thread, which
// writes the shard file durably and calls the completion callback with the fields of
// ShardWritten (or an error for ShardFailed). The coordinator writes manifest.json once every
// rank's shard of the step is reported.
//
// Restoring: every data-parallel replica needs the whole state, so RestoreCheckpoint reads
// every shard of a committed checkpoint (any world size: resharding is free because shards
// are ranges of one vector), verifies every checksum, loads the trainer and checks the state
// digest of the manifest. RestoreCheckpointShared splits the reading over the ranks of a
// group and copies the pieces with broadcasts. RestoreLatestCheckpoint falls back to older
// committed checkpoints when one is missing a shard or is corrupt, logging why.
//
// Thread-safety: CheckpointWriter's Snapshot, Submit, Save and its destructor are called by
// one thread (the training thread, which owns the Trainer); WaitIdle and busy may be called
// from any thread. The callback runs on the writer's own thread. The restore functions are
// called by the thread that owns the Trainer (and the Communicator, for the shared one).
#ifndef SPOTRAIN_WORKER_CHECKPOINT_H_
#define SPOTRAIN_WORKER_CHECKPOINT_H_

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/config.pb.h"
#include "proto/spotrain.pb.h"
#include "worker/checkpoint_io.h"
#include "worker/communicator.h"
#include "worker/trainer.h"

namespace spotrain::worker {

// The outcome of one shard write. Every field but `status`, `checksum`, `path`, `bytes` and
// `write_ms` is set also on failure (so that a ShardFailed can name epoch and step).
struct ShardWriteResult {
  absl::Status status;  // OK, or why the shard was not written (names the path)
  int64_t epoch = 0;    // as given to Snapshot
  int64_t step = 0;     // completed steps of the saved state
  int rank = 0;
  int world_size = 0;
  std::string file;          // shard file name inside the step directory
  std::string path;          // full path of the shard file
  int64_t offset = 0;        // first float of the logical state in the shard
  int64_t length = 0;        // floats in the shard
  std::string checksum;      // hex xxh64 of the payload
  std::string state_digest;  // hex SHA-256 of the whole logical state
  int64_t state_floats = 0;
  int64_t bytes = 0;       // size of the shard file
  double write_ms = 0;     // background time: digest (if deferred), checksum, write, fsyncs
  double snapshot_ms = 0;  // the training stall of its Snapshot (SnapshotStats::total_ms)
};

// The Session reports for a result (ToShardWritten requires result.status.ok()).
proto::ShardWritten ToShardWritten(const ShardWriteResult& result);
proto::ShardFailed ToShardFailed(const ShardWriteResult& result);

// Where the stall of one Snapshot went, in milliseconds.
struct SnapshotStats {
  double wait_ms = 0;    // waiting for the previous write to finish
  double copy_ms = 0;    // copying state into the host buffer
  double digest_ms = 0;  // Trainer::StateDigest (0 with digest_in_background)
  double total_ms = 0;   // the whole call: the training stall
};

struct CheckpointWriterOptions {
  // false: Snapshot computes Trainer::StateDigest (SHA-256 over the whole state, about
  // 1.4 GB/s on one core) on the calling thread and copies only this rank's range: S / W floats
  // of buffer. true: Snapshot copies the whole state and the background thread hashes it:
  // a shorter stall for S floats of host memory.
  bool digest_in_background = false;
};

class CheckpointWriter {
 public:
  // Runs on the writer's thread after each submitted write, successful or not. It must not
  // call Snapshot, Save or WaitIdle of this writer (they wait for it to return).
  using Callback = std::function<void(const ShardWriteResult&)>;

  // Shards go to <checkpoint_root>/step-%08d/. Starts the background thread.
  CheckpointWriter(std::string checkpoint_root, Callback on_done,
                   CheckpointWriterOptions options = {});
  // Waits for a submitted write (and its callback) to finish, then stops the thread. A
  // snapshot that was never submitted is dropped.
  ~CheckpointWriter();
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  // Copies this rank's part of the trainer's state (ShardRange(state_floats, rank, world_size))
  // and its step into the host buffer and records the state digest. At most one write is in
  // flight: if the previous one is still running, this blocks until it has finished and its
  // callback returned (the wait is in SnapshotStats::wait_ms), so the buffer is reused and
  // never overwritten while being written. A snapshot not yet submitted is replaced.
  // kInvalidArgument: rank/world out of range or an empty state.
  absl::StatusOr<SnapshotStats> Snapshot(const Trainer& trainer, int64_t epoch, int rank,
                                         int world_size);

  // Hands the last snapshot to the background thread and returns at once. The callback
  // reports the outcome; a failed write leaves no file under the shard's name and the writer
  // usable. The callback's status: kAlreadyExists (the step already has a manifest; nothing
  // written), kResourceExhausted (disk full, file size limit), other file-system errors.
  // kFailedPrecondition: no snapshot to submit.
  absl::Status Submit();

  // Snapshot then Submit.
  absl::StatusOr<SnapshotStats> Save(const Trainer& trainer, int64_t epoch, int rank,
                                     int world_size);

  // Blocks until no write is submitted or running (its callback has returned), or until
  // `timeout`. Returns whether the writer is idle.
  bool WaitIdle(absl::Duration timeout = absl::InfiniteDuration()) ABSL_LOCKS_EXCLUDED(mu_);
  bool busy() const ABSL_LOCKS_EXCLUDED(mu_);

  const std::string& checkpoint_root() const { return root_; }

 private:
  struct Job {
    int64_t epoch = 0;
    int64_t step = 0;
    int rank = 0;
    int world_size = 0;
    int64_t state_floats = 0;
    StateRange range;
    bool full_state = false;   // buffer_ holds the whole state, not just `range`
    std::string state_digest;  // empty: compute it in the background from buffer_
    double snapshot_ms = 0;
  };

  void Run() ABSL_LOCKS_EXCLUDED(mu_);
  ShardWriteResult Write(const Job& job);

  const std::string root_;
  const Callback on_done_;
  const CheckpointWriterOptions options_;

  mutable absl::Mutex mu_;
  bool have_snapshot_ ABSL_GUARDED_BY(mu_) = false;  // snapshot taken, not submitted
  bool queued_ ABSL_GUARDED_BY(mu_) = false;         // submitted, not picked up yet
  bool writing_ ABSL_GUARDED_BY(mu_) = false;        // the thread is writing / calling back
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  Job job_ ABSL_GUARDED_BY(mu_);

  // Handed over, not shared: the training thread fills it while the writer is idle (neither
  // queued_ nor writing_), the writer thread reads it while queued_ or writing_. The state
  // transitions under mu_ order the accesses.
  std::vector<float> buffer_;

  std::thread thread_;
};

// What a restore loaded.
struct RestoreResult {
  int64_t step = 0;           // completed steps of the loaded state (= trainer.step())
  int source_world_size = 0;  // world size that wrote the checkpoint
  std::string step_dir;
  std::string state_digest;  // verified equal to the manifest's
  int64_t bytes_read = 0;    // shard bytes this process read
  int shards_read = 0;
  double seconds = 0;  // wall time of the restore
  // RestoreLatestCheckpoint: the newer committed checkpoints that could not be loaded,
  // "step N: why", newest first.
  std::vector<std::string> skipped;
};

// OK when `manifest` holds a state for this model: same ModelConfig and state_floats.
// kFailedPrecondition otherwise, e.g. "checkpoint of model gpt-small (...), run has
// gpt-tiny (...)".
absl::Status CheckManifestMatchesModel(const proto::Manifest& manifest,
                                       const proto::ModelConfig& model, int64_t state_floats);

// Loads the committed checkpoint in `step_dir` (<root>/step-%08d, as in the Plan's
// StateSource.checkpoint_dir) into `trainer`: reads every shard (whatever world size wrote
// them), verifies every checksum, sets the state and the step, and checks that
// Trainer::StateDigest equals the manifest's state_digest. Errors: kNotFound (no manifest or
// a shard file missing), kDataLoss (corrupt or inconsistent file, digest mismatch),
// kFailedPrecondition (other model, other shard format version). On error the trainer holds
// no usable state (it may be partly overwritten): restore another checkpoint or InitFresh.
absl::StatusOr<RestoreResult> RestoreCheckpoint(const std::string& step_dir, Trainer& trainer);

// The same, as a collective over every rank of `comm`: each rank reads only the shards that
// overlap its ShardRange(state_floats, rank, world) (about 1/W of the bytes), the ranks agree
// that everybody succeeded (one small int64 all-reduce, which also checks that all read the
// same step and size) and then copy the ranges to each other with W broadcasts. Every rank
// ends with the whole state and checks the digest. All ranks must call it with the same
// step_dir. Errors: as RestoreCheckpoint on the rank that failed; kDataLoss on the others
// ("another rank could not read its part"); the communicator's error (kUnavailable,
// kAborted) if the group breaks. On error the trainer holds no usable state.
absl::StatusOr<RestoreResult> RestoreCheckpointShared(const std::string& step_dir, Trainer& trainer,
                                                      Communicator& comm);

struct RestoreLatestOptions {
  // Checkpoints of later steps are not considered.
  int64_t max_step = std::numeric_limits<int64_t>::max();
  // When set, manifests whose run_fingerprint differs are skipped (another run's).
  bool check_fingerprint = false;
  uint64_t run_fingerprint = 0;
};

// Loads the newest committed checkpoint under `checkpoint_root` that is usable: committed
// step directories (with manifest.json) newest first; one with a missing, corrupt or
// inconsistent manifest or shard is skipped (logged as a warning naming the file and the
// reason; listed in RestoreResult::skipped) and the previous one is tried. Stops with
// kFailedPrecondition when a checkpoint is of another model (a configuration error, not
// corruption). kNotFound when no committed checkpoint could be loaded (the message lists
// why each failed). On error the trainer holds no usable state.
absl::StatusOr<RestoreResult> RestoreLatestCheckpoint(const std::string& checkpoint_root,
                                                      Trainer& trainer,
                                                      const RestoreLatestOptions& options = {});

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_CHECKPOINT_H_
