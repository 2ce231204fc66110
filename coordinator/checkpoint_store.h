// Checkpoint files the coordinator owns on disk (DESIGN.md section 5): it publishes
// <dir>/step-%08d/manifest.json atomically once every shard is reported, deletes pruned step
// directories (manifest first, so a half-deleted directory never looks committed) and finds
// committed checkpoints at startup. Stateless functions, thread-safe; each blocks on disk I/O.
#ifndef SPOTRAIN_COORDINATOR_CHECKPOINT_STORE_H_
#define SPOTRAIN_COORDINATOR_CHECKPOINT_STORE_H_

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/config.pb.h"

namespace spotrain::coordinator {

// The manifest as JSON (protobuf JSON mapping, proto field names).
std::string ManifestToJson(const proto::Manifest& manifest);
absl::StatusOr<proto::Manifest> ParseManifest(const std::string& json);

// Checks that every shard file of the manifest exists in the step directory and holds at least
// its payload, then writes manifest.json (temp file, fsync, rename, fsync dir).
// kFailedPrecondition names a missing or short shard file.
absl::Status WriteManifest(const std::string& checkpoint_dir, const proto::Manifest& manifest);

// Deletes step-%08d: manifest.json first (fsynced), then the other files, then the directory.
absl::Status DeleteStepDirectory(const std::string& checkpoint_dir, int64_t step);

// Deletes every step directory with a step below `below_step` that is not in `keep`
// (uncommitted leftovers and pruned checkpoints). Returns the steps deleted.
std::vector<int64_t> PruneStepDirectories(const std::string& checkpoint_dir, int64_t below_step,
                                          const std::set<int64_t>& keep);

// Steps whose manifest.json parses and carries `run_fingerprint`, ascending. An unreadable
// directory is an empty result (logged).
std::vector<int64_t> FindCommittedSteps(const std::string& checkpoint_dir,
                                        uint64_t run_fingerprint);

}  // namespace spotrain::coordinator

#endif  // SPOTRAIN_COORDINATOR_CHECKPOINT_STORE_H_
