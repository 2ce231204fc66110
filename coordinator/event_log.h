// DIR/events.jsonl: one JSON object per line for each membership change (cause, members
// before and after, the recovery timeline in milliseconds since detection, lost steps) and
// for each automatic checkpoint interval decision ("event":"checkpoint_interval").
// EventToJson is pure; EventLog appends whole lines with one write() each and is not
// thread-safe (the coordinator's state thread owns it).
#ifndef SPOTRAIN_COORDINATOR_EVENT_LOG_H_
#define SPOTRAIN_COORDINATOR_EVENT_LOG_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/membership.h"

namespace spotrain::coordinator {

// One line without the trailing newline, e.g.
// {"time":"2026-11-27T17:00:00.123Z","epoch":3,"cause":"lost","detail":"...",
//  "members_before":[1,2,3],"members_after":[1,2],"paused":false,"start_step":41,
//  "state_source":"broadcast from rank 0","recovery":{"detected_ms":0,"prepare_sent_ms":0,
//  "plan_sent_ms":12.5,"group_rebuilt_ms":80.1,"state_synced_ms":95,"first_step_ms":230},
//  "lost_steps":0}
// Unknown timeline points are null.
std::string EventToJson(const MembershipEvent& event);

// One line for a checkpoint interval decision (checkpoint.every_steps "auto"), e.g.
// {"time":"...","event":"checkpoint_interval","reason":"loss","cost_s":0.011,"write_s":0.05,
//  "mtbl_s":1800,"mtbl_prior_s":3600,"prior_weight":1,"observed_s":12.5,"losses":1,
//  "step_ms":14.2,"young_s":6.3,"daly_s":6.3,"interval_s":6.3,"bound":"none",
//  "every_steps":444}
// Unknown values (-1 in the decision) and infinities are null.
std::string IntervalDecisionToJson(const IntervalDecision& decision);

class EventLog {
 public:
  ~EventLog();
  static absl::StatusOr<std::unique_ptr<EventLog>> Open(const std::string& path);
  absl::Status Write(const MembershipEvent& event);
  absl::Status Write(const IntervalDecision& decision);
  // Whether one of the last lines (the last MiB) is the line of `event` (same time, epoch
  // and cause): a line written just before a kill must not be written twice.
  absl::StatusOr<bool> Contains(const MembershipEvent& event) const;

 private:
  EventLog(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  absl::Status WriteLine(const std::string& json);
  std::string path_;
  int fd_;
};

}  // namespace spotrain::coordinator

#endif  // SPOTRAIN_COORDINATOR_EVENT_LOG_H_
