#include "coordinator/status_format.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace spotrain::coordinator {
namespace {

std::string Quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      out += absl::StrFormat("\\u%04x", c);
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

std::string Number(double v) { return absl::StrFormat("%.6g", v); }

}  // namespace

std::string RunStatusToJson(const proto::RunStatus& s) {
  std::vector<std::string> members;
  for (const proto::MemberStatus& m : s.members()) {
    members.push_back(absl::StrCat(
        "{\"id\":", m.id(), ",\"name\":", Quote(m.name()), ",\"address\":", Quote(m.address()),
        ",\"rank\":", m.rank(), ",\"state\":", Quote(m.state()),
        ",\"heartbeat_age_ms\":", m.heartbeat_age_ms(), ",\"step\":", m.step(),
        ",\"device\":", Quote(m.device()), ",\"epoch\":", m.epoch(), "}"));
  }
  return absl::StrCat(
      "{\"state\":", Quote(s.state()), ",\"epoch\":", s.epoch(), ",\"step\":", s.step(),
      ",\"world_size\":", s.world_size(), ",\"members\":[", absl::StrJoin(members, ","),
      "],\"last_checkpoint_step\":", s.last_checkpoint_step(), ",\"recoveries\":", s.recoveries(),
      ",\"lost_steps\":", s.lost_steps(), ",\"tokens_per_s\":", Number(s.tokens_per_s()),
      ",\"goodput\":", Number(s.goodput()), ",\"total_steps\":", s.total_steps(),
      ",\"run_id\":", Quote(s.run_id()), ",\"preparing_epoch\":", s.preparing_epoch(),
      ",\"min_workers\":", s.min_workers(), ",\"max_workers\":", s.max_workers(),
      ",\"message\":", Quote(s.message()), ",\"checkpoint_error\":", Quote(s.checkpoint_error()),
      ",\"checkpoint_failures\":", s.checkpoint_failures(),
      ",\"checkpoint_every_steps\":", s.checkpoint_every_steps(),
      ",\"checkpoint_interval_auto\":", s.checkpoint_interval_auto() ? "true" : "false",
      ",\"checkpoint_cost_s\":", Number(s.checkpoint_cost_s()),
      ",\"checkpoint_mtbl_s\":", Number(s.checkpoint_mtbl_s()), "}");
}

std::string RunStatusToTable(const proto::RunStatus& s) {
  std::string out = absl::StrFormat(
      "run %s: %s, epoch %d, step %d/%d, world_size %d (min %d, max %d)\n", s.run_id(), s.state(),
      s.epoch(), s.step(), s.total_steps(), s.world_size(), s.min_workers(), s.max_workers());
  if (!s.message().empty()) absl::StrAppend(&out, "  ", s.message(), "\n");
  absl::StrAppend(
      &out, absl::StrFormat(
                "last checkpoint: %s   recoveries: %d   lost steps: %d   tokens/s: %.1f   "
                "goodput: %.2f\n",
                s.last_checkpoint_step() < 0 ? std::string("none")
                                             : absl::StrCat("step ", s.last_checkpoint_step()),
                s.recoveries(), s.lost_steps(), s.tokens_per_s(), s.goodput()));
  if (s.checkpoint_interval_auto()) {
    absl::StrAppend(&out,
                    absl::StrFormat("checkpoint interval: auto, every %d steps (C %s, M %.0f s)\n",
                                    s.checkpoint_every_steps(),
                                    s.checkpoint_cost_s() < 0
                                        ? std::string("not measured yet")
                                        : absl::StrFormat("%.3f s", s.checkpoint_cost_s()),
                                    s.checkpoint_mtbl_s()));
  } else if (s.checkpoint_every_steps() > 0) {
    absl::StrAppend(&out, "checkpoint interval: every ", s.checkpoint_every_steps(), " steps\n");
  }
  if (!s.checkpoint_error().empty()) {
    absl::StrAppend(&out, "checkpoint error (", s.checkpoint_failures(),
                    " failed so far): ", s.checkpoint_error(), "\n");
  }
  if (s.members_size() == 0) return out + "no workers\n";
  absl::StrAppend(&out, absl::StrFormat("%6s  %-20s %-24s %4s  %-12s %10s %8s\n", "ID", "NAME",
                                        "ADDRESS", "RANK", "STATE", "HEARTBEAT", "STEP"));
  for (const proto::MemberStatus& m : s.members()) {
    absl::StrAppend(
        &out, absl::StrFormat(
                  "%6d  %-20s %-24s %4s  %-12s %10s %8s\n", m.id(), m.name().substr(0, 20),
                  m.address().substr(0, 24), m.rank() < 0 ? "-" : absl::StrCat(m.rank()), m.state(),
                  m.heartbeat_age_ms() < 0 ? "-" : absl::StrCat(m.heartbeat_age_ms(), " ms"),
                  m.step() < 0 ? "-" : absl::StrCat(m.step())));
  }
  return out;
}

}  // namespace spotrain::coordinator
