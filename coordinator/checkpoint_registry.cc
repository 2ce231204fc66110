#include "coordinator/checkpoint_registry.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace spotrain::coordinator {

absl::StatusOr<std::optional<ReadyCheckpoint>> CheckpointRegistry::AddShard(
    const proto::ShardWritten& shard, absl::Time now) {
  const Key key{shard.step(), shard.epoch()};
  if (committed_.count(shard.step())) {
    return absl::AlreadyExistsError(
        absl::StrFormat("checkpoint step %d is already committed", shard.step()));
  }
  if (!committed_.empty() && shard.step() < *committed_.rbegin()) {
    return absl::FailedPreconditionError(
        absl::StrFormat("checkpoint step %d is older than the last committed step %d", shard.step(),
                        *committed_.rbegin()));
  }
  if (failed_.count(key)) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "checkpoint step %d of epoch %d was abandoned", shard.step(), shard.epoch()));
  }
  auto [it, inserted] = pending_.try_emplace(key);
  Pending& p = it->second;
  if (inserted) {
    p.world_size = shard.world_size();
    p.first_report = now;
  } else if (p.world_size != shard.world_size()) {
    return absl::FailedPreconditionError(
        absl::StrFormat("shard of step %d says world_size %d, earlier shards said %d", shard.step(),
                        shard.world_size(), p.world_size));
  }
  auto existing = p.shards.find(shard.rank());
  if (existing != p.shards.end()) {
    const proto::ShardWritten& old = existing->second;
    if (old.SerializeAsString() == shard.SerializeAsString()) {
      return absl::AlreadyExistsError(
          absl::StrFormat("duplicate report of shard %d of step %d", shard.rank(), shard.step()));
    }
    return absl::FailedPreconditionError(absl::StrFormat(
        "shard %d of step %d reported twice with different contents", shard.rank(), shard.step()));
  }
  p.shards.emplace(shard.rank(), shard);
  if (static_cast<int32_t>(p.shards.size()) < p.world_size) return std::nullopt;

  // Complete: check consistency before anyone relies on it.
  Pending done = std::move(p);
  pending_.erase(it);
  std::string problem;
  int64_t next_offset = 0;
  const proto::ShardWritten& first = done.shards.begin()->second;
  for (int32_t rank = 0; rank < done.world_size && problem.empty(); ++rank) {
    auto s = done.shards.find(rank);
    if (s == done.shards.end()) {
      problem = absl::StrFormat("rank %d is missing", rank);
    } else if (s->second.state_digest() != first.state_digest()) {
      problem = absl::StrFormat("state digests differ (rank %d: %s, rank %d: %s)", first.rank(),
                                first.state_digest(), rank, s->second.state_digest());
    } else if (s->second.state_floats() != first.state_floats()) {
      problem = absl::StrFormat("ranks disagree on state_floats");
    } else if (s->second.offset() != next_offset) {
      problem = absl::StrFormat("shard %d starts at %d, expected %d", rank, s->second.offset(),
                                next_offset);
    } else {
      next_offset += s->second.length();
    }
  }
  if (problem.empty() && next_offset != first.state_floats()) {
    problem = absl::StrFormat("shards cover %d floats of %d", next_offset, first.state_floats());
  }
  if (!problem.empty()) {
    failed_.insert(key);
    failure_message_ = absl::StrFormat("checkpoint step %d (epoch %d) not committed: %s",
                                       shard.step(), shard.epoch(), problem);
    return absl::DataLossError(failure_message_);
  }
  ReadyCheckpoint ready;
  ready.step = shard.step();
  ready.epoch = shard.epoch();
  ready.first_report = done.first_report;
  proto::Manifest& m = ready.manifest;
  m.set_step(shard.step());
  m.set_world_size(done.world_size);
  m.set_state_digest(first.state_digest());
  m.set_state_floats(first.state_floats());
  for (const auto& [rank, s] : done.shards) {
    proto::ShardInfo* info = m.add_shards();
    info->set_rank(rank);
    info->set_file(s.file());
    info->set_offset(s.offset());
    info->set_length(s.length());
    info->set_checksum(s.checksum());
  }
  return std::optional<ReadyCheckpoint>(std::move(ready));
}

void CheckpointRegistry::MarkFailed(int64_t step, int64_t epoch, const std::string& error) {
  const Key key{step, epoch};
  pending_.erase(key);
  failed_.insert(key);
  failure_message_ =
      absl::StrFormat("checkpoint step %d (epoch %d) not committed: %s", step, epoch, error);
}

std::vector<int64_t> CheckpointRegistry::MarkCommitted(int64_t step) {
  committed_.insert(step);
  // Pending checkpoints of this or older steps can never be useful.
  for (auto it = pending_.begin(); it != pending_.end();) {
    if (it->first.first <= step) {
      it = pending_.erase(it);
    } else {
      ++it;
    }
  }
  for (auto it = failed_.begin(); it != failed_.end();) {
    if (it->first <= step) {
      it = failed_.erase(it);
    } else {
      ++it;
    }
  }
  std::vector<int64_t> prune;
  while (static_cast<int>(committed_.size()) > keep_) {
    prune.push_back(*committed_.begin());
    committed_.erase(committed_.begin());
  }
  return prune;
}

void CheckpointRegistry::Forget(int64_t step) {
  committed_.erase(step);
  for (auto it = pending_.begin(); it != pending_.end();) {
    if (it->first.first == step) {
      it = pending_.erase(it);
    } else {
      ++it;
    }
  }
}

std::vector<proto::ShardWritten> CheckpointRegistry::PendingShards() const {
  std::vector<proto::ShardWritten> out;
  for (const auto& [key, p] : pending_) {
    for (const auto& [rank, s] : p.shards) out.push_back(s);
  }
  return out;
}

}  // namespace spotrain::coordinator
