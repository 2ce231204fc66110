// The coordinator's durable state (proto::CoordinatorState) and its journal in --state-dir:
// `state.json` is an atomically written snapshot and `journal.log` holds the records applied
// after it, one line each: "<hex xxh64 of the JSON> <JSON of a proto::JournalRecord>". A torn
// last line (kill -9 or power loss during a write) fails its checksum and is ignored, so the
// state survives a kill at any moment. ApplyRecord is pure; Journal is not thread-safe (the
// coordinator's state thread owns it) and every method blocks on disk I/O.
#ifndef SPOTRAIN_COORDINATOR_DURABLE_STATE_H_
#define SPOTRAIN_COORDINATOR_DURABLE_STATE_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/spotrain.pb.h"

namespace spotrain::coordinator {

// Folds one record into the state (does not touch state.seq).
void ApplyRecord(const proto::JournalRecord& record, proto::CoordinatorState& state);

class Journal {
 public:
  ~Journal();
  Journal(const Journal&) = delete;
  Journal& operator=(const Journal&) = delete;

  // Opens the journal in `dir` (which must exist): loads the snapshot, replays the records
  // after it (stopping at the first corrupt line, which is logged), then compacts: writes a
  // new snapshot and starts an empty journal.log. `*existed` says whether any state was found.
  // kDataLoss when state.json exists but cannot be parsed.
  static absl::StatusOr<std::unique_ptr<Journal>> Open(const std::string& dir, bool* existed);

  // The state with every appended record applied.
  const proto::CoordinatorState& state() const { return state_; }

  // Replaces the whole state (a new run) and writes it as the snapshot.
  absl::Status Reset(const proto::CoordinatorState& state);

  // Assigns the next seq, appends the record (fdatasync when `sync`) and applies it. The
  // state is changed only when the write succeeded. Compacts every kCompactEvery records.
  absl::Status Append(proto::JournalRecord record, bool sync);

  absl::Status Compact();

  static constexpr int kCompactEvery = 4096;

 private:
  Journal(std::string dir, proto::CoordinatorState state);
  absl::Status OpenLogForAppend();

  std::string dir_;
  proto::CoordinatorState state_;
  int fd_ = -1;
  int records_since_snapshot_ = 0;
  bool broken_ = false;
};

}  // namespace spotrain::coordinator

#endif  // SPOTRAIN_COORDINATOR_DURABLE_STATE_H_
