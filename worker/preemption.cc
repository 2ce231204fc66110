#include "worker/preemption.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/logging.h"

namespace spotrain::worker {
namespace {

struct Url {
  std::string host;
  std::string port = "80";
  std::string path = "/";
};

absl::StatusOr<Url> ParseUrl(const std::string& url) {
  constexpr absl::string_view kScheme = "http://";
  if (!absl::StartsWith(url, kScheme)) {
    return absl::InvalidArgumentError(absl::StrCat("only http:// URLs are supported: ", url));
  }
  absl::string_view rest = absl::string_view(url).substr(kScheme.size());
  Url out;
  size_t slash = rest.find('/');
  absl::string_view authority = rest.substr(0, slash);
  if (slash != absl::string_view::npos) out.path = std::string(rest.substr(slash));
  size_t colon = authority.rfind(':');
  if (colon != absl::string_view::npos) {
    out.host = std::string(authority.substr(0, colon));
    out.port = std::string(authority.substr(colon + 1));
  } else {
    out.host = std::string(authority);
  }
  if (out.host.empty()) return absl::InvalidArgumentError(absl::StrCat("no host in ", url));
  return out;
}

// Waits until fd is ready for `events` or the deadline passes.
bool WaitFd(int fd, short events, absl::Time deadline) {
  while (true) {
    int ms = static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now()));
    if (ms <= 0) return false;
    pollfd p{fd, events, 0};
    int rc = ::poll(&p, 1, ms);
    if (rc > 0) return true;
    if (rc == 0) return false;
    if (errno != EINTR) return false;
  }
}

}  // namespace

absl::StatusOr<NoticeSource> ParseNoticeSource(const std::string& name) {
  if (name == "none") return NoticeSource::kNone;
  if (name == "auto") return NoticeSource::kAuto;
  if (name == "aws") return NoticeSource::kAws;
  if (name == "gcp") return NoticeSource::kGcp;
  return absl::InvalidArgumentError(
      absl::StrCat("--preemption-notice ", name, ": choose auto, aws, gcp or none"));
}

absl::StatusOr<HttpResponse> HttpRequest(const std::string& method, const std::string& url,
                                         const std::vector<std::string>& headers,
                                         absl::Duration timeout) {
  auto parsed = ParseUrl(url);
  if (!parsed.ok()) return parsed.status();
  const absl::Time deadline = absl::Now() + timeout;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* addrs = nullptr;
  int rc = ::getaddrinfo(parsed->host.c_str(), parsed->port.c_str(), &hints, &addrs);
  if (rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot resolve ", parsed->host, ": ", gai_strerror(rc)));
  }
  int fd = -1;
  for (addrinfo* a = addrs; a != nullptr && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) continue;
    if (::connect(fd, a->ai_addr, a->ai_addrlen) != 0 &&
        !(errno == EINPROGRESS && WaitFd(fd, POLLOUT, deadline))) {
      ::close(fd);
      fd = -1;
      continue;
    }
    int err = 0;
    socklen_t len = sizeof(err);
    ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      ::close(fd);
      fd = -1;
    }
  }
  ::freeaddrinfo(addrs);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("cannot connect to ", url));

  std::string request = absl::StrCat(method, " ", parsed->path, " HTTP/1.1\r\nHost: ", parsed->host,
                                     "\r\nConnection: close\r\n");
  for (const std::string& h : headers) absl::StrAppend(&request, h, "\r\n");
  if (method == "PUT" || method == "POST") absl::StrAppend(&request, "Content-Length: 0\r\n");
  absl::StrAppend(&request, "\r\n");
  size_t sent = 0;
  while (sent < request.size()) {
    if (!WaitFd(fd, POLLOUT, deadline)) break;
    ssize_t n = ::send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0 && errno != EAGAIN && errno != EINTR) break;
    if (n > 0) sent += static_cast<size_t>(n);
  }
  std::string response;
  char buf[4096];
  while (sent == request.size() && WaitFd(fd, POLLIN, deadline)) {
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n > 0) {
      response.append(buf, static_cast<size_t>(n));
      if (response.size() > (1 << 20)) break;
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    break;  // EOF or error
  }
  ::close(fd);
  if (sent != request.size() || response.empty()) {
    return absl::UnavailableError(absl::StrCat("no answer from ", url));
  }
  HttpResponse out;
  std::vector<absl::string_view> status_line = absl::StrSplit(
      absl::string_view(response).substr(0, response.find("\r\n")), absl::MaxSplits(' ', 2));
  if (status_line.size() < 2 || !absl::SimpleAtoi(status_line[1], &out.status)) {
    return absl::UnavailableError(absl::StrCat("malformed HTTP answer from ", url));
  }
  size_t body = response.find("\r\n\r\n");
  if (body != std::string::npos) out.body = response.substr(body + 4);
  return out;
}

int64_t ParseAwsActionTime(const std::string& body) {
  size_t key = body.find("\"time\"");
  if (key == std::string::npos) return 0;
  size_t open = body.find('"', body.find(':', key) + 1);
  if (open == std::string::npos) return 0;
  size_t close = body.find('"', open + 1);
  if (close == std::string::npos) return 0;
  absl::Time t;
  std::string err;
  if (!absl::ParseTime(absl::RFC3339_full, body.substr(open + 1, close - open - 1), &t, &err)) {
    return 0;
  }
  return absl::ToUnixMillis(t);
}

bool PreemptionWatcher::PollOnce(NoticeSource source) {
  if (source == NoticeSource::kAws) {
    auto token = HttpRequest("PUT", options_.aws_base_url + "/latest/api/token",
                             {"X-aws-ec2-metadata-token-ttl-seconds: 300"}, options_.http_timeout);
    if (!token.ok() || token->status != 200) return false;
    auto action = HttpRequest(
        "GET", options_.aws_base_url + "/latest/meta-data/spot/instance-action",
        {absl::StrCat("X-aws-ec2-metadata-token: ", absl::StripAsciiWhitespace(token->body))},
        options_.http_timeout);
    if (!action.ok() || action->status != 200) return false;
    leave_.reason = "AWS spot instance-action notice";
    leave_.deadline_unix_ms = ParseAwsActionTime(action->body);
    leave_.count.fetch_add(1);
    SPOTRAIN_LOG(Warning, "AWS spot interruption notice: %s", action->body);
    return true;
  }
  if (source == NoticeSource::kGcp) {
    auto preempted =
        HttpRequest("GET", options_.gcp_base_url + "/computeMetadata/v1/instance/preempted",
                    {"Metadata-Flavor: Google"}, options_.http_timeout);
    if (!preempted.ok() || preempted->status != 200 ||
        absl::StripAsciiWhitespace(preempted->body) != "TRUE") {
      return false;
    }
    leave_.reason = "GCP preemption notice";
    leave_.deadline_unix_ms = absl::ToUnixMillis(absl::Now() + absl::Seconds(30));
    leave_.count.fetch_add(1);
    SPOTRAIN_LOG(Warning, "GCP preemption notice: instance is preempted");
    return true;
  }
  return false;
}

void PreemptionWatcher::Start() {
  if (options_.source == NoticeSource::kNone || thread_.joinable()) return;
  thread_ = std::thread([this] { Loop(); });
}

void PreemptionWatcher::Stop() {
  if (!thread_.joinable()) return;
  if (!stop_.HasBeenNotified()) stop_.Notify();
  thread_.join();
}

void PreemptionWatcher::Loop() {
  NoticeSource source = options_.source;
  if (source == NoticeSource::kAuto) {
    auto aws = HttpRequest("PUT", options_.aws_base_url + "/latest/api/token",
                           {"X-aws-ec2-metadata-token-ttl-seconds: 60"}, options_.http_timeout);
    auto gcp = aws.ok() ? aws
                        : HttpRequest("GET", options_.gcp_base_url + "/computeMetadata/v1/",
                                      {"Metadata-Flavor: Google"}, options_.http_timeout);
    source = aws.ok() ? NoticeSource::kAws : gcp.ok() ? NoticeSource::kGcp : NoticeSource::kNone;
    if (source == NoticeSource::kNone) {
      SPOTRAIN_LOG(Info, "no AWS or GCP metadata server answered: relying on SIGTERM");
      return;
    }
  }
  SPOTRAIN_LOG(Info, "watching %s preemption notices every %s",
               source == NoticeSource::kAws ? "AWS" : "GCP",
               absl::FormatDuration(options_.poll_interval));
  while (!stop_.WaitForNotificationWithTimeout(options_.poll_interval)) {
    if (PollOnce(source)) return;
  }
}

}  // namespace spotrain::worker
