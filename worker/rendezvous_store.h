// Rendezvous for collective groups: a small key-value interface (KeyValueClient), the one the
// coordinator serves through its KvSet/KvGet RPCs, and the adapter that lets Gloo rendezvous
// over it (KvRendezvousStore). Every key an epoch's group writes lives under the prefix
// "e<epoch>/", so nothing from an old epoch can mix into a new one (DESIGN.md sections 3
// and 6). InMemoryKeyValue is a thread-safe in-process KeyValueClient for tests and for a
// single-process run.
//
// Thread-safety: KeyValueClient implementations must be thread-safe (the ranks of a test
// share one). A KvRendezvousStore is used by one thread at a time (the thread creating a
// communicator). No exception leaves this module except the gloo exceptions that
// KvRendezvousStore throws into Gloo, which the Gloo communicator catches.
#ifndef SPOTRAIN_WORKER_RENDEZVOUS_STORE_H_
#define SPOTRAIN_WORKER_RENDEZVOUS_STORE_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gloo/rendezvous/store.h"

namespace spotrain::worker {

// A key-value service with blocking reads. Keys and values are arbitrary byte strings.
class KeyValueClient {
 public:
  virtual ~KeyValueClient() = default;

  // Stores `value` under `key`, replacing any earlier value. Errors come from the transport
  // (for the coordinator: kAborted when the key's epoch is stale).
  virtual absl::Status Set(const std::string& key, const std::string& value) = 0;

  // Returns the value of `key`, waiting up to `wait` for it to be set (zero: answer at
  // once). kDeadlineExceeded when the key was not set in time (an implementation may give
  // up earlier, e.g. an RPC whose wait is capped: KvRendezvousStore retries until its own
  // deadline); other errors come from the transport (kAborted when the key's epoch is
  // stale).
  virtual absl::StatusOr<std::string> Get(const std::string& key, absl::Duration wait) = 0;
};

// "e<epoch>/": the prefix of every rendezvous key of `epoch`.
std::string EpochKeyPrefix(int64_t epoch);

// Splits "e<epoch>/<rest>" into its epoch and the rest, for a KeyValueClient whose transport
// carries the epoch in a field of its own (the coordinator's KvSet/KvGet). False when `key`
// has no epoch prefix.
bool ParseEpochKey(absl::string_view key, int64_t* epoch, std::string* rest);

// Thread-safe in-memory KeyValueClient. Get blocks on a condition variable (no polling).
class InMemoryKeyValue : public KeyValueClient {
 public:
  absl::Status Set(const std::string& key, const std::string& value) override
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<std::string> Get(const std::string& key, absl::Duration wait) override
      ABSL_LOCKS_EXCLUDED(mu_);

  // Number of keys stored, and whether `key` is stored (for tests).
  int64_t size() const ABSL_LOCKS_EXCLUDED(mu_);
  bool Contains(const std::string& key) const ABSL_LOCKS_EXCLUDED(mu_);
  // Drops every key that starts with `prefix` (e.g. an old epoch's); returns how many.
  int64_t ErasePrefix(const std::string& prefix) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  mutable absl::Mutex mu_;
  std::map<std::string, std::string> values_ ABSL_GUARDED_BY(mu_);
};

// gloo::rendezvous::Store over a KeyValueClient, under the prefix EpochKeyPrefix(epoch).
//
// Gloo's Store API reports errors by exceptions: a failed or timed-out KeyValueClient call
// throws gloo::IoException into Gloo, and the first such error is kept as a Status
// (first_error()) so that the communicator can return the precise code (kAborted for a
// stale epoch or a cancelled rendezvous, kDeadlineExceeded for a timeout, ...).
//
// Every wait is bounded by the store's own `timeout` (given at construction), not by the
// timeout Gloo passes, because Gloo derives that one from the pair timeout, which the
// communicator shortens for the TCP connect phase. `cancelled`, if set, is polled at least
// every `poll_interval` while waiting; when it returns true, the wait throws and
// first_error() becomes kAborted.
class KvRendezvousStore : public gloo::rendezvous::Store {
 public:
  struct Options {
    absl::Duration timeout = absl::Seconds(60);
    std::function<bool()> cancelled;
    absl::Duration poll_interval = absl::Milliseconds(100);
  };

  KvRendezvousStore(KeyValueClient& kv, int64_t epoch, Options options);

  void set(const std::string& key, const std::vector<char>& data) override;
  // Blocks until `key` exists (up to the store's timeout).
  std::vector<char> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys) override;
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& gloo_timeout) override;

  // OK, or the first error a KeyValueClient call (or a timeout, or cancellation) produced.
  const absl::Status& first_error() const { return first_error_; }
  const std::string& prefix() const { return prefix_; }

 private:
  // Fetches `key` into cache_ unless it is there; throws gloo::IoException on failure.
  void Fetch(const std::string& key, absl::Time deadline);
  [[noreturn]] void Fail(absl::Status status);

  KeyValueClient& kv_;
  const std::string prefix_;
  const Options options_;
  std::map<std::string, std::vector<char>> cache_;
  absl::Status first_error_;
};

}  // namespace spotrain::worker

#endif  // SPOTRAIN_WORKER_RENDEZVOUS_STORE_H_
