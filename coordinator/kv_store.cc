#include "coordinator/kv_store.h"

#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"

namespace spotrain::coordinator {

absl::Status KvStore::Validate(const std::string& key, size_t value_size) {
  if (key.empty()) return absl::InvalidArgumentError("KV key is empty");
  if (key.size() > kMaxKeyBytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KV key of %d bytes exceeds %d", key.size(), kMaxKeyBytes));
  }
  if (value_size > kMaxValueBytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KV value of %d bytes exceeds %d", value_size, kMaxValueBytes));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint64_t>> KvStore::Set(int64_t epoch, const std::string& key,
                                                   std::string value) {
  Key k{epoch, key};
  auto it = values_.find(k);
  const size_t old_size = it == values_.end() ? 0 : it->second.size() + key.size();
  if (total_bytes_ - old_size + value.size() + key.size() > kMaxTotalBytes) {
    return absl::ResourceExhaustedError("KV store is full");
  }
  total_bytes_ = total_bytes_ - old_size + value.size() + key.size();
  values_[k] = std::move(value);
  std::vector<uint64_t> woken;
  auto range = waiters_by_key_.equal_range(k);
  for (auto w = range.first; w != range.second; ++w) {
    woken.push_back(w->second);
    waiters_.erase(w->second);
  }
  waiters_by_key_.erase(range.first, range.second);
  return woken;
}

const std::string* KvStore::Get(int64_t epoch, const std::string& key) const {
  auto it = values_.find(Key{epoch, key});
  return it == values_.end() ? nullptr : &it->second;
}

void KvStore::AddWaiter(int64_t epoch, const std::string& key, uint64_t waiter,
                        absl::Time deadline) {
  Key k{epoch, key};
  waiters_[waiter] = {k, deadline};
  waiters_by_key_.emplace(k, waiter);
}

std::vector<uint64_t> KvStore::TakeExpired(absl::Time now) {
  std::vector<uint64_t> out;
  for (auto it = waiters_.begin(); it != waiters_.end();) {
    if (it->second.deadline <= now) {
      auto range = waiters_by_key_.equal_range(it->second.key);
      for (auto w = range.first; w != range.second; ++w) {
        if (w->second == it->first) {
          waiters_by_key_.erase(w);
          break;
        }
      }
      out.push_back(it->first);
      it = waiters_.erase(it);
    } else {
      ++it;
    }
  }
  return out;
}

std::vector<uint64_t> KvStore::TakeAllWaiters() {
  std::vector<uint64_t> out;
  for (const auto& [id, w] : waiters_) out.push_back(id);
  waiters_.clear();
  waiters_by_key_.clear();
  return out;
}

std::vector<uint64_t> KvStore::DropBelow(int64_t epoch) {
  for (auto it = values_.begin(); it != values_.end() && it->first.first < epoch;) {
    total_bytes_ -= it->second.size() + it->first.second.size();
    it = values_.erase(it);
  }
  std::vector<uint64_t> out;
  for (auto it = waiters_by_key_.begin(); it != waiters_by_key_.end() && it->first.first < epoch;) {
    out.push_back(it->second);
    waiters_.erase(it->second);
    it = waiters_by_key_.erase(it);
  }
  return out;
}

}  // namespace spotrain::coordinator
