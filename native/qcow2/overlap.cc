#include "qcow2/overlap.h"

#include <algorithm>
#include <mutex>

namespace qcow2 {

const char* MetadataKindName(uint32_t kind) {
  switch (kind) {
    case kMetaHeader: return "qcow2_header";
    case kMetaActiveL1: return "active L1 table";
    case kMetaActiveL2: return "active L2 table";
    case kMetaRefcountTable: return "refcount table";
    case kMetaRefcountBlock: return "refcount block";
    case kMetaSnapshotTable: return "snapshot table";
    case kMetaInactiveL1: return "inactive L1 table";
    case kMetaBitmapDirectory: return "bitmap directory";
    case kMetaBitmapTable: return "bitmap table";
    case kMetaBitmapData: return "bitmap data";
    default: return "metadata";
  }
}

void MetadataRanges::Add(uint32_t kind, uint64_t offset, uint64_t bytes) {
  if (bytes == 0) return;
  const uint64_t first = offset >> clusterBits_, last = (offset + bytes - 1) >> clusterBits_;
  std::unique_lock<std::shared_mutex> lock(mu_);
  if (first == last) {
    clusters_[first] |= kind;
    return;
  }
  spans_.push_back({kind, first, last - first + 1});
}

void MetadataRanges::Remove(uint32_t kind, uint64_t offset, uint64_t bytes) {
  if (bytes == 0) return;
  const uint64_t first = offset >> clusterBits_, last = (offset + bytes - 1) >> clusterBits_;
  std::unique_lock<std::shared_mutex> lock(mu_);
  if (first == last) {
    auto it = clusters_.find(first);
    if (it == clusters_.end()) return;
    it->second &= ~kind;
    if (it->second == 0) clusters_.erase(it);
    return;
  }
  auto it = std::find_if(spans_.begin(), spans_.end(), [&](const Span& s) {
    return s.kind == kind && s.first == first && s.count == last - first + 1;
  });
  if (it != spans_.end()) spans_.erase(it);
}

Status MetadataRanges::Check(uint64_t offset, uint64_t bytes, uint32_t allowed) const {
  if (bytes == 0) return Status::Ok();
  const uint64_t first = offset >> clusterBits_, last = (offset + bytes - 1) >> clusterBits_;
  uint32_t hit = 0;
  {
    std::shared_lock<std::shared_mutex> lock(mu_);
    for (auto it = clusters_.lower_bound(first); it != clusters_.end() && it->first <= last && !hit; ++it) {
      hit = it->second & ~allowed;
    }
    for (const Span& s : spans_) {
      if (hit) break;
      if (!(s.kind & allowed) && s.first <= last && first < s.first + s.count) hit = s.kind;
    }
  }
  if (!hit) return Status::Ok();
  // The lowest bit names the structure, as QEMU names the first check that failed.
  const uint32_t kind = hit & (~hit + 1);
  return Status::Error("ERR_QCOW2_CORRUPT", "Marking image as corrupt: Preventing invalid write on metadata (overlaps with " +
                                                std::string(MetadataKindName(kind)) + "): " + std::to_string(bytes) +
                                                " bytes at host offset " + std::to_string(offset));
}

}  // namespace qcow2
