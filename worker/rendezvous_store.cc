#include "worker/rendezvous_store.h"

#include <algorithm>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "gloo/common/error.h"

namespace spotrain::worker {

std::string EpochKeyPrefix(int64_t epoch) { return absl::StrCat("e", epoch, "/"); }

bool ParseEpochKey(absl::string_view key, int64_t* epoch, std::string* rest) {
  if (key.empty() || key[0] != 'e') return false;
  const size_t slash = key.find('/');
  if (slash == absl::string_view::npos || slash == 1) return false;
  int64_t parsed = 0;
  if (!absl::SimpleAtoi(key.substr(1, slash - 1), &parsed)) return false;
  *epoch = parsed;
  *rest = std::string(key.substr(slash + 1));
  return true;
}

// ---------------------------------------------------------------------------------------

absl::Status InMemoryKeyValue::Set(const std::string& key, const std::string& value) {
  absl::MutexLock lock(&mu_);
  values_[key] = value;
  return absl::OkStatus();
}

absl::StatusOr<std::string> InMemoryKeyValue::Get(const std::string& key, absl::Duration wait) {
  absl::MutexLock lock(&mu_);
  auto present = [this, &key]()
                     ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return values_.count(key) > 0; };
  // The mutex re-evaluates the condition whenever a writer releases it: no polling.
  mu_.AwaitWithTimeout(absl::Condition(&present), std::max(wait, absl::ZeroDuration()));
  auto it = values_.find(key);
  if (it == values_.end()) {
    return absl::DeadlineExceededError(
        absl::StrCat("key '", key, "' was not set within ", absl::FormatDuration(wait)));
  }
  return it->second;
}

int64_t InMemoryKeyValue::size() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(values_.size());
}

bool InMemoryKeyValue::Contains(const std::string& key) const {
  absl::MutexLock lock(&mu_);
  return values_.count(key) > 0;
}

int64_t InMemoryKeyValue::ErasePrefix(const std::string& prefix) {
  absl::MutexLock lock(&mu_);
  int64_t erased = 0;
  auto it = values_.lower_bound(prefix);
  while (it != values_.end() && absl::StartsWith(it->first, prefix)) {
    it = values_.erase(it);
    ++erased;
  }
  return erased;
}

// ---------------------------------------------------------------------------------------

KvRendezvousStore::KvRendezvousStore(KeyValueClient& kv, int64_t epoch, Options options)
    : kv_(kv), prefix_(EpochKeyPrefix(epoch)), options_(std::move(options)) {}

void KvRendezvousStore::Fail(absl::Status status) {
  if (first_error_.ok()) first_error_ = status;
  // Gloo only knows its own exception types; the Status above keeps the precise code.
  throw ::gloo::IoException(std::string(status.message()));
}

void KvRendezvousStore::set(const std::string& key, const std::vector<char>& data) {
  const std::string full_key = prefix_ + key;
  absl::Status status = kv_.Set(full_key, std::string(data.begin(), data.end()));
  if (!status.ok()) {
    Fail(absl::Status(status.code(), absl::StrCat("rendezvous: setting key '", full_key,
                                                  "' failed: ", status.message())));
  }
}

void KvRendezvousStore::Fetch(const std::string& key, absl::Time deadline) {
  if (cache_.count(key) > 0) return;
  const std::string full_key = prefix_ + key;
  for (;;) {
    if (options_.cancelled && options_.cancelled()) {
      Fail(absl::AbortedError(
          absl::StrCat("rendezvous cancelled while waiting for key '", full_key, "'")));
    }
    const absl::Duration remaining = deadline - absl::Now();
    if (remaining <= absl::ZeroDuration()) {
      Fail(absl::DeadlineExceededError(
          absl::StrCat("rendezvous timed out after ", absl::FormatDuration(options_.timeout),
                       " waiting for key '", full_key, "' (a peer never arrived)")));
    }
    // Without a cancellation hook one call can wait for the whole remaining time.
    const absl::Duration slice =
        options_.cancelled ? std::min(remaining, options_.poll_interval) : remaining;
    absl::StatusOr<std::string> value = kv_.Get(full_key, slice);
    if (value.ok()) {
      cache_[key] = std::vector<char>(value->begin(), value->end());
      return;
    }
    if (value.status().code() != absl::StatusCode::kDeadlineExceeded) {
      Fail(absl::Status(value.status().code(),
                        absl::StrCat("rendezvous: getting key '", full_key,
                                     "' failed: ", value.status().message())));
    }
  }
}

std::vector<char> KvRendezvousStore::get(const std::string& key) {
  Fetch(key, absl::Now() + options_.timeout);
  return cache_[key];
}

void KvRendezvousStore::wait(const std::vector<std::string>& keys) {
  wait(keys, std::chrono::milliseconds(0));
}

void KvRendezvousStore::wait(const std::vector<std::string>& keys,
                             const std::chrono::milliseconds& /*gloo_timeout*/) {
  const absl::Time deadline = absl::Now() + options_.timeout;
  for (const std::string& key : keys) Fetch(key, deadline);
}

}  // namespace spotrain::worker
