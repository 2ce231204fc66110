#include "coordinator/planner.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/file_util.h"

namespace spotrain::coordinator {

StateDecision DecideStateSource(const std::vector<HeldState>& members, int64_t last_committed_step,
                                const std::string& checkpoint_dir) {
  StateDecision decision;
  int64_t best = -1;
  int best_rank = -1;
  bool all_equal = !members.empty();
  for (size_t rank = 0; rank < members.size(); ++rank) {
    const int64_t held = members[rank].completed_steps;
    if (held > best) {
      best = held;
      best_rank = static_cast<int>(rank);
    }
  }
  for (const HeldState& m : members) {
    if (m.completed_steps != best) all_equal = false;
  }
  // A checkpoint newer than anything in memory wins (e.g. a stale worker returning alone).
  if (last_committed_step >= 0 && last_committed_step > best) {
    decision.start_step = last_committed_step;
    decision.source.set_kind(proto::StateSource::CHECKPOINT);
    decision.source.set_checkpoint_step(last_committed_step);
    decision.source.set_checkpoint_dir(StepDirectory(checkpoint_dir, last_committed_step));
    return decision;
  }
  if (best < 0) {
    decision.start_step = 0;
    decision.source.set_kind(proto::StateSource::FRESH);
    return decision;
  }
  decision.start_step = best;
  if (all_equal) {
    decision.source.set_kind(proto::StateSource::KEEP);
  } else {
    decision.source.set_kind(proto::StateSource::BROADCAST);
    decision.source.set_broadcast_rank(best_rank);
  }
  return decision;
}

void DecideShrink(const proto::Plan& previous, const std::vector<uint64_t>& new_members,
                  const StateDecision& decision, proto::Plan* plan) {
  plan->clear_shrink_from_epoch();
  plan->clear_shrink_exclude();
  if (previous.epoch() <= 0 || new_members.empty() ||
      static_cast<int>(new_members.size()) >= previous.members_size()) {
    return;
  }
  if (decision.source.kind() != proto::StateSource::KEEP ||
      decision.start_step <= previous.start_step()) {
    return;
  }
  std::vector<bool> kept(previous.members_size(), false);
  int last_old_rank = -1;
  for (uint64_t id : new_members) {
    int old_rank = -1;
    for (const proto::Member& m : previous.members()) {
      if (m.worker_id() == id) old_rank = m.rank();
    }
    if (old_rank <= last_old_rank || old_rank >= previous.members_size()) return;
    kept[old_rank] = true;
    last_old_rank = old_rank;
  }
  plan->set_shrink_from_epoch(previous.epoch());
  for (int r = 0; r < previous.members_size(); ++r) {
    if (!kept[r]) plan->add_shrink_exclude(r);
  }
}

std::string StepDirectory(const std::string& checkpoint_dir, int64_t step) {
  return common::JoinPath(checkpoint_dir, absl::StrFormat("step-%08d", step));
}

std::string ShardFileName(int rank, int world_size) {
  return absl::StrFormat("shard-%05d-of-%05d.bin", rank, world_size);
}

std::string DescribeSource(const proto::StateSource& source) {
  switch (source.kind()) {
    case proto::StateSource::KEEP:
      return "keep";
    case proto::StateSource::BROADCAST:
      return absl::StrCat("broadcast from rank ", source.broadcast_rank());
    case proto::StateSource::CHECKPOINT:
      return absl::StrCat("checkpoint step ", source.checkpoint_step());
    case proto::StateSource::FRESH:
      return "fresh";
    default:
      return "unspecified";
  }
}

}  // namespace spotrain::coordinator
