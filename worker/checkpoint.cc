#include "worker/checkpoint.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/hash.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "google/protobuf/util/message_differencer.h"

namespace spotrain::worker {
namespace {

using SteadyClock = std::chrono::steady_clock;

double MsSince(SteadyClock::time_point start) {
  return std::chrono::duration<double, std::milli>(SteadyClock::now() - start).count();
}

std::string DescribeModel(const proto::ModelConfig& m) {
  if (m.preset().empty() && m.num_parameters() == 0) return "(none recorded)";
  return absl::StrFormat(
      "%s (%d layers, %d heads, %d channels, vocab %d/%d, context %d, %d "
      "parameters)",
      m.preset().empty() ? "?" : m.preset(), m.num_layers(), m.num_heads(), m.channels(),
      m.vocab_size(), m.padded_vocab(), m.max_seq_len(), m.num_parameters());
}

// Loads an already parsed manifest's state into the trainer and checks the digest.
absl::StatusOr<RestoreResult> RestoreFromManifest(const std::string& step_dir,
                                                  const proto::Manifest& manifest,
                                                  Trainer& trainer) {
  const auto start = SteadyClock::now();
  RETURN_IF_ERROR(
      CheckManifestMatchesModel(manifest, trainer.model_config(), trainer.state_floats()));
  ReadStats stats;
  RETURN_IF_ERROR(ForEachShard(
      step_dir, manifest,
      [&](int64_t offset, const float* data, int64_t length) {
        trainer.WriteState(offset, length, data);
        return absl::OkStatus();
      },
      &stats));
  trainer.set_step(manifest.step());
  RestoreResult result;
  result.state_digest = trainer.StateDigest();
  if (result.state_digest != manifest.state_digest()) {
    return absl::DataLossError(absl::StrFormat(
        "%s: the restored state has digest %s, the manifest says %s (every shard checksum "
        "matched: the manifest and the shards disagree)",
        step_dir, result.state_digest, manifest.state_digest()));
  }
  result.step = manifest.step();
  result.source_world_size = manifest.world_size();
  result.step_dir = step_dir;
  result.bytes_read = stats.bytes_read;
  result.shards_read = stats.shards_read;
  result.seconds = MsSince(start) / 1000;
  return result;
}

}  // namespace

proto::ShardWritten ToShardWritten(const ShardWriteResult& r) {
  proto::ShardWritten m;
  m.set_epoch(r.epoch);
  m.set_step(r.step);
  m.set_rank(r.rank);
  m.set_world_size(r.world_size);
  m.set_file(r.file);
  m.set_offset(r.offset);
  m.set_length(r.length);
  m.set_checksum(r.checksum);
  m.set_state_digest(r.state_digest);
  m.set_state_floats(r.state_floats);
  m.set_snapshot_ms(r.snapshot_ms);
  m.set_write_ms(r.write_ms);
  return m;
}

proto::ShardFailed ToShardFailed(const ShardWriteResult& r) {
  proto::ShardFailed m;
  m.set_epoch(r.epoch);
  m.set_step(r.step);
  m.set_error(r.status.ToString());
  return m;
}

// ---- CheckpointWriter ----------------------------------------------------------------------

CheckpointWriter::CheckpointWriter(std::string checkpoint_root, Callback on_done,
                                   CheckpointWriterOptions options)
    : root_(std::move(checkpoint_root)), on_done_(std::move(on_done)), options_(options) {
  thread_ = std::thread([this] { Run(); });
}

CheckpointWriter::~CheckpointWriter() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
}

absl::StatusOr<SnapshotStats> CheckpointWriter::Snapshot(const Trainer& trainer, int64_t epoch,
                                                         int rank, int world_size) {
  const auto start = SteadyClock::now();
  const int64_t state_floats = trainer.state_floats();
  if (world_size < 1 || rank < 0 || rank >= world_size || state_floats <= 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("checkpoint snapshot: rank %d of world size %d, %d state floats", rank,
                        world_size, state_floats));
  }
  SnapshotStats stats;
  {
    absl::MutexLock lock(&mu_);
    // One write in flight: the buffer is reused, so wait for the previous write to finish.
    mu_.Await(absl::Condition(
        +[](CheckpointWriter* w)
             ABSL_EXCLUSIVE_LOCKS_REQUIRED(w->mu_) { return !w->queued_ && !w->writing_; },
        this));
    have_snapshot_ = false;
  }
  stats.wait_ms = MsSince(start);

  Job job;
  job.epoch = epoch;
  job.step = trainer.step();
  job.rank = rank;
  job.world_size = world_size;
  job.state_floats = state_floats;
  job.range = ShardRange(state_floats, rank, world_size);
  job.full_state = options_.digest_in_background;
  // The writer is idle, so the buffer is this thread's until Submit.
  auto copy_start = SteadyClock::now();
  if (job.full_state) {
    buffer_.resize(static_cast<size_t>(state_floats));
    trainer.ReadState(0, state_floats, buffer_.data());
  } else {
    buffer_.resize(static_cast<size_t>(job.range.length));
    trainer.ReadState(job.range.offset, job.range.length, buffer_.data());
  }
  stats.copy_ms = MsSince(copy_start);
  if (!job.full_state) {
    auto digest_start = SteadyClock::now();
    job.state_digest = trainer.StateDigest();
    stats.digest_ms = MsSince(digest_start);
  }
  stats.total_ms = MsSince(start);
  job.snapshot_ms = stats.total_ms;
  {
    absl::MutexLock lock(&mu_);
    job_ = std::move(job);
    have_snapshot_ = true;
  }
  return stats;
}

absl::Status CheckpointWriter::Submit() {
  absl::MutexLock lock(&mu_);
  if (!have_snapshot_) {
    return absl::FailedPreconditionError("checkpoint Submit without a Snapshot");
  }
  have_snapshot_ = false;
  queued_ = true;
  return absl::OkStatus();
}

absl::StatusOr<SnapshotStats> CheckpointWriter::Save(const Trainer& trainer, int64_t epoch,
                                                     int rank, int world_size) {
  ASSIGN_OR_RETURN(SnapshotStats stats, Snapshot(trainer, epoch, rank, world_size));
  RETURN_IF_ERROR(Submit());
  return stats;
}

bool CheckpointWriter::WaitIdle(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  return mu_.AwaitWithTimeout(absl::Condition(
                                  +[](CheckpointWriter* w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(w->mu_) {
                                    return !w->queued_ && !w->writing_;
                                  },
                                  this),
                              timeout);
}

bool CheckpointWriter::busy() const {
  absl::MutexLock lock(&mu_);
  return queued_ || writing_;
}

void CheckpointWriter::Run() {
  while (true) {
    Job job;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](CheckpointWriter* w)
               ABSL_EXCLUSIVE_LOCKS_REQUIRED(w->mu_) { return w->queued_ || w->stop_; },
          this));
      // A submitted write is finished even when stopping.
      if (!queued_) return;
      job = job_;
      queued_ = false;
      writing_ = true;
    }
    ShardWriteResult result = Write(job);
    if (result.status.ok()) {
      SPOTRAIN_LOG(Info, "checkpoint shard %s written: %d floats, %.1f ms", result.path,
                   result.length, result.write_ms);
    } else if (absl::IsAlreadyExists(result.status)) {
      // Another group committed this step first (e.g. the final step, re-saved by a group
      // formed as the run ended): the committed checkpoint stands, nothing was written.
      SPOTRAIN_LOG(Info, "checkpoint step %d rank %d: already committed, shard not written (%s)",
                   result.step, result.rank, std::string(result.status.message()));
    } else {
      SPOTRAIN_LOG(Error, "checkpoint step %d rank %d: %s", result.step, result.rank,
                   result.status.ToString());
    }
    if (on_done_) on_done_(result);
    absl::MutexLock lock(&mu_);
    writing_ = false;
  }
}

ShardWriteResult CheckpointWriter::Write(const Job& job) {
  const auto start = SteadyClock::now();
  ShardWriteResult r;
  r.epoch = job.epoch;
  r.step = job.step;
  r.rank = job.rank;
  r.world_size = job.world_size;
  r.file = ShardFileName(job.rank, job.world_size);
  r.offset = job.range.offset;
  r.length = job.range.length;
  r.state_floats = job.state_floats;
  r.state_digest = job.state_digest;
  r.snapshot_ms = job.snapshot_ms;
  const float* payload = buffer_.data();
  if (job.full_state) {
    common::Sha256 sha;
    sha.Update(buffer_.data(), buffer_.size() * sizeof(float));
    const int64_t step = job.step;
    sha.Update(&step, sizeof(step));
    r.state_digest = sha.HexDigest();
    payload += job.range.offset;
  }
  auto written =
      WriteShardFile(root_, job.step, job.rank, job.world_size, job.state_floats, payload);
  r.write_ms = MsSince(start);
  if (!written.ok()) {
    r.status = written.status();
    return r;
  }
  r.path = written->path;
  r.checksum = written->checksum_hex;
  r.bytes = written->bytes;
  return r;
}

// ---- Restore ---------------------------------------------------------------------------------

absl::Status CheckManifestMatchesModel(const proto::Manifest& manifest,
                                       const proto::ModelConfig& model, int64_t state_floats) {
  if (!google::protobuf::util::MessageDifferencer::Equals(manifest.model(), model)) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "checkpoint step %d is of model %s, this run has %s: restore it with a run of the same "
        "model, or use another checkpoint directory",
        manifest.step(), DescribeModel(manifest.model()), DescribeModel(model)));
  }
  if (manifest.state_floats() != state_floats) {
    return absl::FailedPreconditionError(
        absl::StrFormat("checkpoint step %d holds %d state floats, this run's model has %d",
                        manifest.step(), manifest.state_floats(), state_floats));
  }
  return absl::OkStatus();
}

absl::StatusOr<RestoreResult> RestoreCheckpoint(const std::string& step_dir, Trainer& trainer) {
  ASSIGN_OR_RETURN(proto::Manifest manifest, ReadManifest(step_dir));
  return RestoreFromManifest(step_dir, manifest, trainer);
}

absl::StatusOr<RestoreResult> RestoreCheckpointShared(const std::string& step_dir, Trainer& trainer,
                                                      Communicator& comm) {
  const auto start = SteadyClock::now();
  const int rank = comm.rank(), world = comm.world_size();
  ReadStats stats;
  std::vector<float> buffer;
  absl::StatusOr<proto::Manifest> manifest = ReadManifest(step_dir);
  absl::Status local = manifest.status();
  if (local.ok()) {
    local = CheckManifestMatchesModel(*manifest, trainer.model_config(), trainer.state_floats());
  }
  if (local.ok()) {
    const StateRange mine = ShardRange(manifest->state_floats(), rank, world);
    buffer.resize(static_cast<size_t>(mine.length));
    local = ReadStateRange(step_dir, *manifest, mine, buffer.data(), &stats);
    if (local.ok()) trainer.WriteState(mine.offset, mine.length, buffer.data());
  }
  // Agree before copying: everybody read its part, of the same step and size.
  int64_t agree[3] = {local.ok() ? 0 : 1, local.ok() ? manifest->step() : 0,
                      local.ok() ? manifest->state_floats() : 0};
  RETURN_IF_ERROR(comm.AllReduceSum(agree, 3));
  if (!local.ok()) return local;
  if (agree[0] != 0) {
    return absl::DataLossError(absl::StrFormat(
        "%s: %d of %d ranks could not read their part of the checkpoint (see their logs)", step_dir,
        agree[0], world));
  }
  if (agree[1] != world * manifest->step() || agree[2] != world * manifest->state_floats()) {
    return absl::DataLossError(absl::StrFormat(
        "%s: the ranks read manifests of different steps or sizes (the directory changed while "
        "being restored?)",
        step_dir));
  }
  const int64_t state_floats = manifest->state_floats();
  for (int root = 0; root < world; ++root) {
    const StateRange range = ShardRange(state_floats, root, world);
    buffer.resize(static_cast<size_t>(range.length));
    if (root == rank) trainer.ReadState(range.offset, range.length, buffer.data());
    RETURN_IF_ERROR(
        comm.Broadcast(buffer.data(), range.length * static_cast<int64_t>(sizeof(float)), root));
    if (root != rank) trainer.WriteState(range.offset, range.length, buffer.data());
  }
  trainer.set_step(manifest->step());
  RestoreResult result;
  result.state_digest = trainer.StateDigest();
  if (result.state_digest != manifest->state_digest()) {
    return absl::DataLossError(
        absl::StrFormat("%s: the restored state has digest %s, the manifest says %s", step_dir,
                        result.state_digest, manifest->state_digest()));
  }
  result.step = manifest->step();
  result.source_world_size = manifest->world_size();
  result.step_dir = step_dir;
  result.bytes_read = stats.bytes_read;
  result.shards_read = stats.shards_read;
  result.seconds = MsSince(start) / 1000;
  return result;
}

absl::StatusOr<RestoreResult> RestoreLatestCheckpoint(const std::string& checkpoint_root,
                                                      Trainer& trainer,
                                                      const RestoreLatestOptions& options) {
  std::vector<std::string> skipped;
  for (int64_t step : ListCommittedSteps(checkpoint_root)) {
    if (step > options.max_step) continue;
    const std::string step_dir = StepDirectory(checkpoint_root, step);
    absl::StatusOr<RestoreResult> result = [&]() -> absl::StatusOr<RestoreResult> {
      ASSIGN_OR_RETURN(proto::Manifest manifest, ReadManifest(step_dir));
      if (options.check_fingerprint && manifest.run_fingerprint() != options.run_fingerprint) {
        return absl::NotFoundError(
            absl::StrFormat("belongs to another run (fingerprint %d, this run %d)",
                            manifest.run_fingerprint(), options.run_fingerprint));
      }
      return RestoreFromManifest(step_dir, manifest, trainer);
    }();
    if (result.ok()) {
      result->skipped = std::move(skipped);
      if (!result->skipped.empty()) {
        SPOTRAIN_LOG(Warning, "restored checkpoint step %d after skipping %d newer one(s)", step,
                     result->skipped.size());
      }
      return result;
    }
    if (absl::IsFailedPrecondition(result.status())) return result.status();
    std::string why = result.status().ToString();
    SPOTRAIN_LOG(Warning, "checkpoint step %d in %s is not usable: %s; trying the previous one",
                 step, checkpoint_root, why);
    skipped.push_back(absl::StrFormat("step %d: %s", step, why));
  }
  if (skipped.empty()) {
    return absl::NotFoundError(
        absl::StrCat("no committed checkpoint in ", checkpoint_root,
                     options.max_step == std::numeric_limits<int64_t>::max()
                         ? std::string()
                         : absl::StrCat(" at or before step ", options.max_step)));
  }
  return absl::NotFoundError(absl::StrCat("no usable checkpoint in ", checkpoint_root, ": ",
                                          absl::StrJoin(skipped, "; ")));
}

}  // namespace spotrain::worker
