// Preemption notices from cloud metadata servers, turned into an announced leave.
//
// AWS (IMDSv2): PUT /latest/api/token (header X-aws-ec2-metadata-token-ttl-seconds), then
// GET /latest/meta-data/spot/instance-action with X-aws-ec2-metadata-token: 404 normally,
// 200 {"action":"terminate","time":"2026-..."} when the instance will be reclaimed (about
// 2 minutes ahead). GCP: GET /computeMetadata/v1/instance/preempted with
// Metadata-Flavor: Google -> "TRUE" once preempted (about 30 s ahead). RunPod and plain
// Kubernetes send SIGTERM instead (handled by spotrain-worker's signal handler).
//
// Threading: a PreemptionWatcher polls from one thread of its own; Stop() joins it. The
// LeaveRequest it sets is lock-free.
#ifndef SPOTRAIN_WORKER_PREEMPTION_H_
#define SPOTRAIN_WORKER_PREEMPTION_H_

#include <atomic>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "worker/agent.h"

namespace spotrain::worker {

enum class NoticeSource { kNone, kAuto, kAws, kGcp };

// "none", "auto", "aws", "gcp"; kInvalidArgument otherwise.
absl::StatusOr<NoticeSource> ParseNoticeSource(const std::string& name);

struct PreemptionOptions {
  NoticeSource source = NoticeSource::kNone;
  std::string aws_base_url = "http://169.254.169.254";
  std::string gcp_base_url = "http://metadata.google.internal";
  absl::Duration poll_interval = absl::Seconds(5);
  absl::Duration http_timeout = absl::Seconds(1);
};

// A minimal HTTP/1.1 client for metadata servers (plain http only). Exposed for tests.
struct HttpResponse {
  int status = 0;
  std::string body;
};
absl::StatusOr<HttpResponse> HttpRequest(const std::string& method, const std::string& url,
                                         const std::vector<std::string>& headers,
                                         absl::Duration timeout);

// Parses the "time" of an AWS instance-action document ("2026-11-27T17:10:00Z") into Unix
// milliseconds; 0 when absent or unparsable.
int64_t ParseAwsActionTime(const std::string& body);

class PreemptionWatcher {
 public:
  PreemptionWatcher(PreemptionOptions options, LeaveRequest& leave)
      : options_(std::move(options)), leave_(leave) {}
  ~PreemptionWatcher() { Stop(); }

  // Starts polling (no-op for kNone). For kAuto, probes AWS then GCP once and polls the one
  // that answers; neither: logs that no notice source was found and does nothing.
  void Start();
  void Stop();

  // One poll of the chosen source: true when a notice is pending (and sets the request).
  bool PollOnce(NoticeSource source);

 private:
  void Loop();

  PreemptionOptions options_;
  LeaveRequest& leave_;
  std::thread thread_;
  absl::Notification stop_;
};

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_PREEMPTION_H_
