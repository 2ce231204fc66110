// DIR/events.jsonl: one JSON object per line for each membership change (cause, members
// before and after, the recovery timeline in milliseconds since detection, lost steps).
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

class EventLog {
 public:
  ~EventLog();
  static absl::StatusOr<std::unique_ptr<EventLog>> Open(const std::string& path);
  absl::Status Write(const MembershipEvent& event);

 private:
  EventLog(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  std::string path_;
  int fd_;
};

}  // namespace spotrain::coordinator

#endif  // SPOTRAIN_COORDINATOR_EVENT_LOG_H_
