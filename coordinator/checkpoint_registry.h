// The checkpoint registry: collects the shard reports of each (step, epoch), decides when a
// checkpoint is complete and consistent enough to commit (every rank of the writing epoch
// reported, equal state digests, contiguous shards), and which committed checkpoints to prune.
// Pure logic: no I/O (coordinator/checkpoint_store.h writes the files). Not thread-safe: the
// coordinator's single state thread owns it.
#ifndef SPOTRAIN_COORDINATOR_CHECKPOINT_REGISTRY_H_
#define SPOTRAIN_COORDINATOR_CHECKPOINT_REGISTRY_H_

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/config.pb.h"
#include "proto/spotrain.pb.h"

namespace spotrain::coordinator {

// A complete checkpoint ready to be published: everything of the manifest except the model
// config, fingerprint and creation time, which the caller adds.
struct ReadyCheckpoint {
  int64_t step = 0;
  int64_t epoch = 0;
  proto::Manifest manifest;
  absl::Time first_report;  // when its first shard was reported
};

class CheckpointRegistry {
 public:
  explicit CheckpointRegistry(int keep) : keep_(keep < 1 ? 1 : keep) {}

  // Restoring from durable state (no validation beyond what AddShard does).
  void RestoreCommitted(int64_t step) { committed_.insert(step); }

  // Records one shard report. Returns the complete checkpoint when this report was the last
  // one missing, std::nullopt while shards are still missing. Errors change nothing:
  // kAlreadyExists for a duplicate report or an already committed step, kFailedPrecondition
  // for a report that contradicts an earlier one (other world size, other digest for the
  // same rank) or a checkpoint marked failed. A complete checkpoint whose shards are not
  // consistent (digests differ, shards not contiguous) is dropped and reported as
  // kDataLoss; failure_message() says why.
  absl::StatusOr<std::optional<ReadyCheckpoint>> AddShard(const proto::ShardWritten& shard,
                                                          absl::Time now);

  // A rank could not write its shard: the checkpoint (step, epoch) is abandoned.
  void MarkFailed(int64_t step, int64_t epoch, const std::string& error);

  // The manifest of `step` is written: the step is committed. Returns the committed steps to
  // prune (all but the newest `keep`), which are forgotten here; pending checkpoints of older
  // steps are forgotten too.
  std::vector<int64_t> MarkCommitted(int64_t step);

  // Forgets a step entirely (its manifest is gone).
  void Forget(int64_t step);

  bool IsCommitted(int64_t step) const { return committed_.count(step) > 0; }
  // -1 when none.
  int64_t LastCommitted() const { return committed_.empty() ? -1 : *committed_.rbegin(); }
  const std::set<int64_t>& committed() const { return committed_; }
  // Every shard report still pending, in (step, epoch, rank) order.
  std::vector<proto::ShardWritten> PendingShards() const;
  size_t pending_checkpoints() const { return pending_.size(); }
  const std::string& failure_message() const { return failure_message_; }

 private:
  struct Pending {
    int32_t world_size = 0;
    std::map<int32_t, proto::ShardWritten> shards;  // by rank
    absl::Time first_report;
  };
  using Key = std::pair<int64_t, int64_t>;  // step, epoch

  int keep_;
  std::set<int64_t> committed_;
  std::map<Key, Pending> pending_;
  std::set<Key> failed_;
  std::string failure_message_;
};

}  // namespace spotrain::coordinator

#endif  // SPOTRAIN_COORDINATOR_CHECKPOINT_REGISTRY_H_
