#include "coordinator/event_log.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/json_util.h"

namespace spotrain::coordinator {
namespace {

std::string Quote(const std::string& s) { return common::JsonQuote(s); }

std::string Ms(double ms) { return ms < 0 ? "null" : absl::StrFormat("%.1f", ms); }

// The start of an event's line, up to its cause: what identifies it.
std::string EventKey(const MembershipEvent& e) {
  return absl::StrCat(
      "{\"time\":",
      Quote(absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", e.detected, absl::UTCTimeZone())),
      ",\"epoch\":", e.epoch, ",\"cause\":", Quote(e.cause), ",");
}

}  // namespace

std::string EventToJson(const MembershipEvent& e) {
  return absl::StrCat(
      EventKey(e), "\"detail\":", Quote(e.detail), ",\"members_before\":[",
      absl::StrJoin(e.before, ","), "],\"members_after\":[", absl::StrJoin(e.after, ","),
      "],\"paused\":", e.paused ? "true" : "false", ",\"start_step\":", e.start_step,
      ",\"state_source\":", Quote(e.state_source),
      ",\"recovery\":{\"detected_ms\":0,\"prepare_sent_ms\":", Ms(e.prepare_sent_ms),
      ",\"plan_sent_ms\":", Ms(e.plan_sent_ms), ",\"group_rebuilt_ms\":", Ms(e.group_rebuilt_ms),
      ",\"state_synced_ms\":", Ms(e.state_synced_ms), ",\"first_step_ms\":", Ms(e.first_step_ms),
      "},\"lost_steps\":", e.lost_steps, "}");
}

std::string IntervalDecisionToJson(const IntervalDecision& d) {
  auto num = [](double v) {
    return v < 0 || !std::isfinite(v) ? std::string("null") : absl::StrFormat("%.6g", v);
  };
  return absl::StrCat(
      "{\"time\":", Quote(absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", d.time, absl::UTCTimeZone())),
      ",\"event\":\"checkpoint_interval\",\"reason\":", Quote(d.reason),
      ",\"cost_s\":", num(d.cost_s), ",\"write_s\":", num(d.write_s), ",\"mtbl_s\":", num(d.mtbl_s),
      ",\"mtbl_prior_s\":", num(d.mtbl_prior_s), ",\"prior_weight\":", num(d.prior_weight),
      ",\"observed_s\":", num(d.observed_s), ",\"losses\":", d.losses,
      ",\"step_ms\":", num(d.step_ms), ",\"young_s\":", num(d.young_s),
      ",\"daly_s\":", num(d.daly_s), ",\"interval_s\":", num(d.interval_s),
      ",\"bound\":", Quote(d.bound), ",\"every_steps\":", d.every_steps, "}");
}

EventLog::~EventLog() {
  if (fd_ >= 0) ::close(fd_);
}

absl::StatusOr<std::unique_ptr<EventLog>> EventLog::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  return std::unique_ptr<EventLog>(new EventLog(path, fd));
}

absl::Status EventLog::Write(const MembershipEvent& event) { return WriteLine(EventToJson(event)); }

absl::Status EventLog::Write(const IntervalDecision& decision) {
  return WriteLine(IntervalDecisionToJson(decision));
}

absl::StatusOr<bool> EventLog::Contains(const MembershipEvent& event) const {
  constexpr off_t kTail = 1 << 20;
  const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("cannot read ", path_, ": ", std::strerror(errno)));
  }
  const off_t size = ::lseek(fd, 0, SEEK_END);
  const off_t from = std::max<off_t>(0, size - kTail);
  std::string tail(static_cast<size_t>(std::max<off_t>(0, size - from)), '\0');
  size_t got = 0;
  while (got < tail.size()) {
    const ssize_t n = ::pread(fd, tail.data() + got, tail.size() - got, from + got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  tail.resize(got);
  const std::string key = EventKey(event);
  return absl::StartsWith(tail, key) || absl::StrContains(tail, "\n" + key);
}

absl::Status EventLog::WriteLine(const std::string& json) {
  const std::string line = json + "\n";
  // O_APPEND and a single write: concurrent readers see whole lines.
  ssize_t n;
  do {
    n = ::write(fd_, line.data(), line.size());
  } while (n < 0 && errno == EINTR);
  if (n != static_cast<ssize_t>(line.size())) {
    return absl::InternalError(absl::StrCat("cannot append to ", path_, ": ",
                                            n < 0 ? std::strerror(errno) : "short write"));
  }
  ::fdatasync(fd_);
  return absl::OkStatus();
}

}  // namespace spotrain::coordinator
