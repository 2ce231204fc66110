// The planner: given the ready candidates of a new epoch (in rank order) and the last committed
// checkpoint, decides the step the epoch starts at and where its state comes from (DESIGN.md
// section 3). Pure functions of their arguments; thread-safe.
#ifndef SPOTRAIN_COORDINATOR_PLANNER_H_
#define SPOTRAIN_COORDINATOR_PLANNER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "proto/spotrain.pb.h"

namespace spotrain::coordinator {

// What one ready member of the new epoch holds.
struct HeldState {
  uint64_t worker_id = 0;
  // Completed steps of its state; -1 when it holds none (or the state of another run).
  int64_t completed_steps = -1;
};

struct StateDecision {
  int64_t start_step = 0;
  proto::StateSource source;
};

// `members` are in rank order. `last_committed_step` is -1 when no checkpoint is committed.
// The most advanced member is the source: KEEP when every member holds that step, else
// BROADCAST from the first member (lowest rank) that holds it. A committed checkpoint newer
// than every held state (or the only state there is) gives CHECKPOINT; nothing at all gives
// FRESH.
StateDecision DecideStateSource(const std::vector<HeldState>& members, int64_t last_committed_step,
                                const std::string& checkpoint_dir);

// Whether the new epoch (members `new_members` by worker id, in rank order; state from
// `decision`) can shrink the communicator of `previous` (the last epoch's Plan): only ranks
// removed, the survivors in the same relative order, and every survivor trained in it (KEEP
// at a step after the previous epoch's start, so each of them built its communicator and
// completed collectives on it). Then sets plan->shrink_from_epoch and shrink_exclude (the
// previous epoch's ranks that are gone); otherwise leaves them empty.
void DecideShrink(const proto::Plan& previous, const std::vector<uint64_t>& new_members,
                  const StateDecision& decision, proto::Plan* plan);

// "<checkpoint_dir>/step-%08d".
std::string StepDirectory(const std::string& checkpoint_dir, int64_t step);
// "shard-%05d-of-%05d.bin".
std::string ShardFileName(int rank, int world_size);

// "keep", "broadcast from rank 2", "checkpoint step 100", "fresh".
std::string DescribeSource(const proto::StateSource& source);

}  // namespace spotrain::coordinator

#endif  // SPOTRAIN_COORDINATOR_PLANNER_H_
