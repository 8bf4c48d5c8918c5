#include "qcow2/l2_cache.h"

#include <algorithm>
#include <cstring>

namespace qcow2 {

L2Cache::L2Cache(std::shared_ptr<File> file, size_t sliceBytes, size_t capacityBytes)
    : file_(std::move(file)), sliceBytes_(sliceBytes), capacity_(std::max<size_t>(capacityBytes / sliceBytes, 1)) {
  index_.reserve(std::min<size_t>(capacity_, 1u << 16));
}

bool L2Cache::Lookup(uint64_t offset, std::shared_ptr<const L2Slice>* out) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = index_.find(offset);
  if (it == index_.end()) {
    misses_++;
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
  if (tableBytes > sliceBytes_ && tableBytes / sliceBytes_ <= capacity_) return LoadTable(tableOffset, tableBytes, offset, out);
  auto slice = std::make_shared<L2Slice>(sliceBytes_);
  // A table that ends past the end of the file reads its missing part as zeros (unallocated).
  QCOW2_TRY(file_->Read(slice->data(), sliceBytes_, offset));
  Insert(offset, slice);
  *out = std::move(slice);
  return Status::Ok();
}

Status L2Cache::LoadTable(uint64_t tableOffset, size_t tableBytes, uint64_t wanted, std::shared_ptr<const L2Slice>* out) {
  AlignedBuffer table(tableBytes);
  QCOW2_TRY(file_->Read(table.data(), tableBytes, tableOffset));
  for (size_t at = 0; at < tableBytes; at += sliceBytes_) {
    auto slice = std::make_shared<L2Slice>(sliceBytes_);
    std::memcpy(slice->data(), table.data() + at, sliceBytes_);
    if (tableOffset + at == wanted) *out = slice;
    Insert(tableOffset + at, slice);
  }
  return Status::Ok();
}

void L2Cache::Clear() {
  std::lock_guard<std::mutex> lock(mu_);
  index_.clear();
  lru_.clear();
}

L2CacheStats L2Cache::Stats() {
  std::lock_guard<std::mutex> lock(mu_);
  return {hits_, misses_, lru_.size()};
}

}  // namespace qcow2
