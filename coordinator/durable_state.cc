#include "coordinator/durable_state.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/file_util.h"
#include "common/hash.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "google/protobuf/util/json_util.h"

namespace spotrain::coordinator {
namespace {

constexpr char kSnapshotFile[] = "state.json";
constexpr char kLogFile[] = "journal.log";

std::string ToJson(const google::protobuf::Message& message) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(message, &json, options);
  return json;
}

bool FromJson(const std::string& json, google::protobuf::Message* message) {
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;  // a newer coordinator may add fields
  return google::protobuf::util::JsonStringToMessage(json, message, options).ok();
}

void EraseShardsOf(proto::CoordinatorState& state, int64_t step, bool and_older) {
  auto* shards = state.mutable_pending_shards();
  auto keep_end = std::remove_if(shards->begin(), shards->end(), [&](const proto::ShardWritten& s) {
    return and_older ? s.step() <= step : s.step() == step;
  });
  while (shards->end() != keep_end) shards->RemoveLast();
}

}  // namespace

void ApplyRecord(const proto::JournalRecord& record, proto::CoordinatorState& state) {
  switch (record.kind_case()) {
    case proto::JournalRecord::kEpochPrepared:
      state.set_last_epoch(std::max(state.last_epoch(), record.epoch_prepared()));
      break;
    case proto::JournalRecord::kWorkerIdsReserved:
      state.set_worker_ids_reserved(
          std::max(state.worker_ids_reserved(), record.worker_ids_reserved()));
      break;
    case proto::JournalRecord::kPlan:
      *state.mutable_last_plan() = record.plan();
      state.set_last_epoch(std::max(state.last_epoch(), record.plan().epoch()));
      break;
    case proto::JournalRecord::kShardWritten:
      *state.add_pending_shards() = record.shard_written();
      break;
    case proto::JournalRecord::kCheckpointCommitted: {
      const int64_t step = record.checkpoint_committed();
      auto* steps = state.mutable_committed_steps();
      if (std::find(steps->begin(), steps->end(), step) == steps->end()) {
        steps->Add(step);
        std::sort(steps->begin(), steps->end());
      }
      EraseShardsOf(state, step, /*and_older=*/true);
      break;
    }
    case proto::JournalRecord::kCheckpointDropped: {
      const int64_t step = record.checkpoint_dropped();
      auto* steps = state.mutable_committed_steps();
      auto end = std::remove(steps->begin(), steps->end(), step);
      while (steps->end() != end) steps->RemoveLast();
      EraseShardsOf(state, step, /*and_older=*/false);
      break;
    }
    case proto::JournalRecord::kRunDone:
      state.set_run_done(record.run_done());
      break;
    case proto::JournalRecord::kBackend:
      state.set_backend(record.backend());
      break;
    case proto::JournalRecord::kProgress:
      *state.mutable_progress() = record.progress();
      break;
    case proto::JournalRecord::kEventOpened:
      *state.mutable_open_event() = record.event_opened();
      break;
    case proto::JournalRecord::kEventWritten:
      if (state.open_event().epoch() == record.event_written()) state.clear_open_event();
      break;
    case proto::JournalRecord::KIND_NOT_SET:
      break;
  }
}

Journal::Journal(std::string dir, proto::CoordinatorState state)
    : dir_(std::move(dir)), state_(std::move(state)) {}

Journal::~Journal() {
  if (fd_ >= 0) ::close(fd_);
}

absl::StatusOr<std::unique_ptr<Journal>> Journal::Open(const std::string& dir, bool* existed) {
  proto::CoordinatorState state;
  *existed = false;
  const std::string snapshot_path = common::JoinPath(dir, kSnapshotFile);
  auto snapshot = common::ReadFile(snapshot_path);
  if (snapshot.ok()) {
    if (!FromJson(*snapshot, &state)) {
      return absl::DataLossError(absl::StrCat(
          snapshot_path,
          " is not a valid coordinator state; move the state dir away to start a new run"));
    }
    *existed = true;
  } else if (!absl::IsNotFound(snapshot.status())) {
    return snapshot.status();
  }
  const std::string log_path = common::JoinPath(dir, kLogFile);
  auto log = common::ReadFile(log_path);
  if (log.ok()) {
    int line_number = 0;
    for (absl::string_view line : absl::StrSplit(*log, '\n', absl::SkipEmpty())) {
      ++line_number;
      size_t space = line.find(' ');
      proto::JournalRecord record;
      bool good = space == 16;
      if (good) {
        absl::string_view json = line.substr(17);
        good = common::Hex64(common::XxHash64(json.data(), json.size())) == line.substr(0, 16) &&
               FromJson(std::string(json), &record);
      }
      if (!good) {
        SPOTRAIN_LOG(Warning, "%s: line %d is torn or corrupt; ignoring it and what follows",
                     log_path, line_number);
        break;
      }
      if (record.seq() <= state.seq()) continue;  // already in the snapshot
      ApplyRecord(record, state);
      state.set_seq(record.seq());
      *existed = true;
    }
  } else if (!absl::IsNotFound(log.status())) {
    return log.status();
  }
  std::unique_ptr<Journal> journal(new Journal(dir, std::move(state)));
  if (*existed) RETURN_IF_ERROR(journal->Compact());
  return journal;
}

absl::Status Journal::Reset(const proto::CoordinatorState& state) {
  const uint64_t seq = state_.seq();
  state_ = state;
  state_.set_seq(seq + 1);
  return Compact();
}

absl::Status Journal::OpenLogForAppend() {
  if (fd_ >= 0) ::close(fd_);
  const std::string path = common::JoinPath(dir_, kLogFile);
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    return absl::InternalError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::Status Journal::Compact() {
  // Snapshot first: a crash between the two writes leaves records with seq <= snapshot seq
  // in the log, which replay skips.
  RETURN_IF_ERROR(
      common::WriteFileAtomically(common::JoinPath(dir_, kSnapshotFile), ToJson(state_) + "\n"));
  RETURN_IF_ERROR(common::WriteFileAtomically(common::JoinPath(dir_, kLogFile), ""));
  records_since_snapshot_ = 0;
  return OpenLogForAppend();
}

absl::Status Journal::Append(proto::JournalRecord record, bool sync) {
  // After a failed write the log may end in a partial line; start a fresh one.
  if (broken_ || fd_ < 0) {
    RETURN_IF_ERROR(Compact());
    broken_ = false;
  }
  record.set_seq(state_.seq() + 1);
  const std::string json = ToJson(record);
  const std::string line =
      absl::StrCat(common::Hex64(common::XxHash64(json.data(), json.size())), " ", json, "\n");
  size_t done = 0;
  while (done < line.size()) {
    ssize_t n = ::write(fd_, line.data() + done, line.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      broken_ = true;
      return absl::InternalError(
          absl::StrCat("cannot append to ", dir_, "/", kLogFile, ": ", std::strerror(errno)));
    }
    done += static_cast<size_t>(n);
  }
  if (sync && ::fdatasync(fd_) != 0) {
    broken_ = true;
    return absl::InternalError(
        absl::StrCat("cannot sync ", dir_, "/", kLogFile, ": ", std::strerror(errno)));
  }
  ApplyRecord(record, state_);
  state_.set_seq(record.seq());
  if (++records_since_snapshot_ >= kCompactEvery) return Compact();
  return absl::OkStatus();
}

}  // namespace spotrain::coordinator
