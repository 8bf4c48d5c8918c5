#include "qcow2/l2_cache.h"

#include <algorithm>
#include <cstring>

namespace qcow2 {

L2Cache::L2Cache(std::shared_ptr<File> file, size_t sliceBytes, size_t capacityBytes)
    : file_(std::move(file)), sliceBytes_(sliceBytes), capacity_(std::max<size_t>(capacityBytes / sliceBytes, 1)) {
  index_.reserve(std::min<size_t>(capacity_, 1u << 16));
}

bool L2Cache::Lookup(uint64_t offset, std::shared_ptr<const L2Slice>* out, bool countMiss) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!pinned_.empty()) {
    auto pin = pinned_.find(offset);
    if (pin != pinned_.end()) {
      hits_++;
      *out = pin->second;
      return true;
    }
  }
  auto it = index_.find(offset);
  if (it == index_.end()) {
    if (countMiss) misses_++;
    return false;
  }
  hits_++;
  if (it->second != lru_.begin()) lru_.splice(lru_.begin(), lru_, it->second);
  *out = it->second->second;
  return true;
}

void L2Cache::Insert(uint64_t offset, const std::shared_ptr<const L2Slice>& slice) {
  std::lock_guard<std::mutex> lock(mu_);
  if (index_.count(offset)) return;  // another request loaded it meanwhile
  lru_.emplace_front(offset, slice);
  index_.emplace(offset, lru_.begin());
  while (lru_.size() > capacity_) {
    index_.erase(lru_.back().first);
    lru_.pop_back();
  }
}

Status L2Cache::Get(uint64_t offset, std::shared_ptr<const L2Slice>* out, uint64_t tableOffset, size_t tableBytes) {
  if (Lookup(offset, out)) return Status::Ok();
  if (tableBytes > sliceBytes_ && tableBytes / sliceBytes_ <= capacity_) return Load(tableOffset, tableBytes, offset, out);
  return Load(offset, sliceBytes_, offset, out);
}

Status L2Cache::Load(uint64_t offset, size_t bytes, uint64_t wanted, std::shared_ptr<const L2Slice>* out) {
  AlignedBuffer buffer(bytes);
  // A table that ends past the end of the file reads its missing part as zeros (unallocated).
  QCOW2_TRY(file_->Read(buffer.data(), bytes, offset));
  for (size_t at = 0; at < bytes; at += sliceBytes_) {
    auto slice = std::make_shared<const L2Slice>(buffer.data() + at, sliceBytes_);
    if (offset + at == wanted) *out = slice;
    Insert(offset + at, slice);
  }
  return Status::Ok();
}

void L2Cache::Replace(uint64_t offset, std::shared_ptr<const L2Slice> slice) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = index_.find(offset);
    if (it != index_.end()) {
      it->second->second = std::move(slice);
      return;
    }
  }
  Insert(offset, slice);
}

void L2Cache::Pin(uint64_t offset, std::shared_ptr<const L2Slice> slice) {
  std::lock_guard<std::mutex> lock(mu_);
  pinned_[offset] = std::move(slice);
}

void L2Cache::Unpin(uint64_t offset, const std::shared_ptr<const L2Slice>& slice) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto pin = pinned_.find(offset);
    if (pin == pinned_.end() || pin->second != slice) return;
    pinned_.erase(pin);
  }
  Replace(offset, slice);
}

void L2Cache::Clear() {
  std::lock_guard<std::mutex> lock(mu_);
  pinned_.clear();
  index_.clear();
  lru_.clear();
}

L2CacheStats L2Cache::Stats() {
  std::lock_guard<std::mutex> lock(mu_);
  return {hits_, misses_, lru_.size()};
}

}  // namespace qcow2
