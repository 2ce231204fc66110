// The key-value rendezvous store behind KvSet/KvGet: keys namespaced by epoch, waiters that are
// woken when their key is set or when their deadline passes, and whole epochs dropped once
// they are over. Pure bookkeeping (waiters are opaque tokens; the service owns the RPCs).
// Not thread-safe: the coordinator's state thread owns it.
#ifndef SPOTRAIN_COORDINATOR_KV_STORE_H_
#define SPOTRAIN_COORDINATOR_KV_STORE_H_

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace spotrain::coordinator {

class KvStore {
 public:
  static constexpr size_t kMaxKeyBytes = 512;
  static constexpr size_t kMaxValueBytes = 1 << 20;
  static constexpr size_t kMaxTotalBytes = size_t{256} << 20;

  // kInvalidArgument for an empty or oversized key or an oversized value (checked before any
  // state is touched, so callers may validate on any thread).
  static absl::Status Validate(const std::string& key, size_t value_size);

  // Stores the value (replacing an older one) and returns the waiters of that key, which are
  // forgotten. kResourceExhausted when the store is full.
  absl::StatusOr<std::vector<uint64_t>> Set(int64_t epoch, const std::string& key,
                                            std::string value);
  // nullptr when absent.
  const std::string* Get(int64_t epoch, const std::string& key) const;

  void AddWaiter(int64_t epoch, const std::string& key, uint64_t waiter, absl::Time deadline);
  // Removes and returns the waiters whose deadline is <= now.
  std::vector<uint64_t> TakeExpired(absl::Time now);
  // Removes and returns every waiter.
  std::vector<uint64_t> TakeAllWaiters();
  // Drops the keys and waiters of epochs below `epoch`; returns the dropped waiters.
  std::vector<uint64_t> DropBelow(int64_t epoch);

  size_t keys() const { return values_.size(); }
  size_t waiters() const { return waiters_.size(); }

 private:
  using Key = std::pair<int64_t, std::string>;
  struct Waiter {
    Key key;
    absl::Time deadline;
  };
  std::map<Key, std::string> values_;
  std::map<uint64_t, Waiter> waiters_;
  std::multimap<Key, uint64_t> waiters_by_key_;
  size_t total_bytes_ = 0;
};

}  // namespace spotrain::coordinator

#endif  // SPOTRAIN_COORDINATOR_KV_STORE_H_
