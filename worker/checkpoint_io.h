// Sharded checkpoint files (DESIGN.md section 5): names, the shard file format, the split of
// the logical state over ranks, and reading and verifying shards and manifests. This layer
// knows nothing about the Trainer: it moves flat fp32 vectors. worker/checkpoint.h builds the
// background writer and the restore of a Trainer on top of it.
//
// On disk:
//   <root>/step-%08d/shard-%05d-of-%05d.bin   one per rank of the writing epoch (rank, world)
//   <root>/step-%08d/manifest.json            written last, by the coordinator
// A step directory without manifest.json is not a checkpoint. Temporary files
// (`<name>.tmp.<pid>`, common::WriteFileAtomically) are never listed in a manifest and are
// ignored.
//
// Shard file: a 64-byte little-endian header, then `length` little-endian fp32 floats.
//   offset  size  field
//        0     8  magic "SPTRCKPT"
//        8     4  uint32 format version (1)
//       12     4  uint32 header size in bytes (64)
//       16     8  int64 step (completed steps of the saved state)
//       24     8  int64 offset: index of the shard's first float in the logical state
//       32     8  int64 length: floats in the payload
//       40     8  int64 state_floats: floats of the whole logical state
//       48     8  uint64 xxh64 (seed 0) of the payload bytes
//       56     8  uint64 xxh64 (seed 0) of header bytes [0, 56)
// The file is exactly 64 + 4 * length bytes long.
//
// Thread-safety: every function is thread-safe (no shared state) and blocks on disk I/O where
// it touches files. Errors name the file; kDataLoss means a file is corrupt, truncated or
// inconsistent with its manifest; kNotFound a file is missing; kResourceExhausted the disk is
// full (or the file size limit was hit).
#ifndef SPOTRAIN_WORKER_CHECKPOINT_IO_H_
#define SPOTRAIN_WORKER_CHECKPOINT_IO_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/config.pb.h"

namespace spotrain::worker {

inline constexpr char kCheckpointMagic[] = "SPTRCKPT";  // 8 bytes on disk, no terminator
inline constexpr uint32_t kCheckpointFormatVersion = 1;
inline constexpr int64_t kCheckpointHeaderBytes = 64;
inline constexpr char kManifestFileName[] = "manifest.json";

// "step-%08d" and <root>/step-%08d.
std::string StepDirectoryName(int64_t step);
std::string StepDirectory(const std::string& checkpoint_root, int64_t step);
// "shard-%05d-of-%05d.bin".
std::string ShardFileName(int rank, int world_size);
// The step of a "step-%08d" name (any number of digits, at least 8), or -1.
int64_t ParseStepDirectoryName(absl::string_view name);

// A contiguous range [offset, offset + length) of the logical state, in floats.
struct StateRange {
  int64_t offset = 0;
  int64_t length = 0;
  int64_t end() const { return offset + length; }
};

// The part of a state of `state_floats` floats that rank `rank` of `world_size` saves:
// [floor(rank * S / W), floor((rank + 1) * S / W)). The ranges of all ranks are contiguous,
// cover [0, S) and differ in length by at most one float. Computed exactly in int64 for any
// S < 2^62 and W < 2^31. Writers and readers both use this function. Requires
// 0 <= rank < world_size.
StateRange ShardRange(int64_t state_floats, int rank, int world_size);

struct ShardHeader {
  int64_t step = 0;
  int64_t offset = 0;
  int64_t length = 0;
  int64_t state_floats = 0;
  uint64_t payload_xxh64 = 0;
};

// The 64 header bytes, header checksum included.
std::string EncodeShardHeader(const ShardHeader& header);
// Parses and verifies 64 header bytes. kDataLoss: wrong magic, bad header checksum, header
// size or fields out of range; kFailedPrecondition: another format version (the message says
// which). `what` names the file in messages.
absl::StatusOr<ShardHeader> DecodeShardHeader(absl::string_view bytes, absl::string_view what);

// What a shard write produced: the fields of ShardWritten that describe the file.
struct ShardFileInfo {
  std::string file;  // name inside the step directory
  std::string path;  // full path
  int64_t offset = 0;
  int64_t length = 0;
  uint64_t checksum = 0;     // xxh64 of the payload
  std::string checksum_hex;  // common::Hex64(checksum), as in ShardInfo.checksum
  int64_t bytes = 0;         // file size
};

// Writes <root>/step-%08d/shard-<rank>-of-<world>.bin holding `payload`, which must be the
// ShardRange(state_floats, rank, world_size) part of the state (its length floats). Creates
// the step directory if needed (and fsyncs the root), then publishes the file atomically
// (temp file, fsync, rename, fsync the step directory): on any error no file exists under the
// final name and no temp file is left. Errors: kInvalidArgument (bad rank/world/step),
// kAlreadyExists (the step already has a manifest: a committed checkpoint is never
// overwritten), kResourceExhausted (disk full, file size limit), otherwise the file system's
// error; every message names the shard path.
absl::StatusOr<ShardFileInfo> WriteShardFile(const std::string& checkpoint_root, int64_t step,
                                             int rank, int world_size, int64_t state_floats,
                                             const float* payload);

// Reads <step_dir>/manifest.json (protobuf JSON mapping) and checks that it is internally
// consistent (ValidateManifest) and that its step matches the directory's name when the name
// is step-%08d. kNotFound: no manifest (the directory is not a checkpoint); kDataLoss: not
// valid JSON or inconsistent (the message says why).
absl::StatusOr<proto::Manifest> ReadManifest(const std::string& step_dir);

// Pure check of a manifest: step >= 0, state_floats > 0, world_size == number of shards,
// shards in rank order 0..W-1, contiguous from offset 0 to state_floats, file names plain
// (no '/'), checksums present. kDataLoss names the first problem.
absl::Status ValidateManifest(const proto::Manifest& manifest);

// Reads shard `index` of `manifest` from `step_dir` into `out` (its length floats), verifying
// the header (magic, version, header checksum), that step, offset, length and state_floats
// agree with the manifest, the file size, and the payload's xxh64 against both the header and
// the manifest. kNotFound: missing file; kDataLoss: anything else wrong (names the file).
absl::Status ReadShardFile(const std::string& step_dir, const proto::Manifest& manifest, int index,
                           float* out);

// One piece of a read plan: floats [shard_offset, shard_offset + length) of shard
// `shard_index`'s payload are state floats [state_offset, state_offset + length).
struct ShardSlice {
  int shard_index = 0;
  int64_t shard_offset = 0;
  int64_t state_offset = 0;
  int64_t length = 0;
};

// Which parts of which shards hold state floats `range`, in state order. Pure. Requires a
// manifest that passed ValidateManifest; kOutOfRange when `range` is not inside the state.
absl::StatusOr<std::vector<ShardSlice>> PlanStateRead(const proto::Manifest& manifest,
                                                      StateRange range);

struct ReadStats {
  int64_t bytes_read = 0;  // bytes of shard files read (headers included)
  int shards_read = 0;
};

// Copies state floats `range` into `out` (range.length floats). Every shard that overlaps
// the range is read whole, because its checksum covers the whole payload; a shard partly
// outside the range goes through a scratch buffer of its size. `stats` (optional)
// accumulates what was read. Errors as ReadShardFile, plus kOutOfRange for a bad range.
absl::Status ReadStateRange(const std::string& step_dir, const proto::Manifest& manifest,
                            StateRange range, float* out, ReadStats* stats = nullptr);

// Reads every shard in state order, verifying each, and hands its payload to `sink(offset,
// data, length)`; stops at the first error (of a shard or of the sink). Peak memory: one
// buffer of the largest shard.
using ShardSink = std::function<absl::Status(int64_t offset, const float* data, int64_t length)>;
absl::Status ForEachShard(const std::string& step_dir, const proto::Manifest& manifest,
                          const ShardSink& sink, ReadStats* stats = nullptr);

// Hex SHA-256 of the logical state stored in the shards (payloads in state order, then the
// manifest's step as little-endian int64): the bytes Trainer::StateDigest hashes. Needs no
// model. Errors as ForEachShard.
absl::StatusOr<std::string> ComputeStateDigest(const std::string& step_dir,
                                               const proto::Manifest& manifest,
                                               ReadStats* stats = nullptr);

// Steps of the step directories under `checkpoint_root` that hold a manifest.json (committed,
// not yet verified), newest first. A missing or unreadable root is an empty list.
std::vector<int64_t> ListCommittedSteps(const std::string& checkpoint_root);

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_CHECKPOINT_IO_H_
