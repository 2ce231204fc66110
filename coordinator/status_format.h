// Rendering of proto::RunStatus for people and programs: the table and the JSON that
// `spotrain status` prints. JSON numbers are numbers (not the strings the protobuf JSON
// mapping uses for 64-bit fields) and the field names are stable: state, epoch, step,
// world_size, members, last_checkpoint_step, recoveries, lost_steps, tokens_per_s, ...
// Pure functions; thread-safe.
#ifndef SPOTRAIN_COORDINATOR_STATUS_FORMAT_H_
#define SPOTRAIN_COORDINATOR_STATUS_FORMAT_H_

#include <string>

#include "proto/spotrain.pb.h"

namespace spotrain::coordinator {

// One JSON object (no trailing newline).
std::string RunStatusToJson(const proto::RunStatus& status);

// A summary line, counters, and one row per member (ends with a newline).
std::string RunStatusToTable(const proto::RunStatus& status);

}  // namespace spotrain::coordinator

#endif  // SPOTRAIN_COORDINATOR_STATUS_FORMAT_H_
