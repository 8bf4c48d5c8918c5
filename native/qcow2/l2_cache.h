// A cache of L2 table slices, shared by every request of an engine. The map is guarded by a
// mutex that is never held across I/O: concurrent misses on the same slice may both load it.
#pragma once
#include <cstdint>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "buffer.h"
#include "file.h"
#include "qcow2/layout.h"

namespace qcow2 {

/// A slice of an L2 table as it lies on disk (big-endian entries), immutable once loaded.
/// Plain heap memory: loads go through an aligned buffer, so that thousands of cached slices
/// do not each pay for page alignment.
class L2Slice {
 public:
  L2Slice(const uint8_t* bytes, size_t length) : bytes_(new uint8_t[length]) { std::memcpy(bytes_.get(), bytes, length); }
  /// Word `i` of the slice: entry i (8-byte entries), or half of an extended entry.
  uint64_t Word(size_t i) const { return LoadBE64(bytes_.get() + 8 * i); }
  const uint8_t* data() const { return bytes_.get(); }

 private:
  std::unique_ptr<uint8_t[]> bytes_;
};

struct L2CacheStats {
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t slices = 0;
};

/// LRU cache of L2 slices keyed by their host offset in the image file.
class L2Cache {
 public:
  /// `sliceBytes` divides the cluster size; `capacityBytes` bounds the memory held.
  L2Cache(std::shared_ptr<File> file, size_t sliceBytes, size_t capacityBytes);
  size_t sliceBytes() const { return sliceBytes_; }
  size_t capacityBytes() const { return capacity_ * sliceBytes_; }
  /// The slice at host offset `offset` (a multiple of the slice size), loading it on a miss.
  /// With `tableBytes` > 0 a miss loads the whole table at `tableOffset` with one read, for scans.
  Status Get(uint64_t offset, std::shared_ptr<const L2Slice>* out, uint64_t tableOffset = 0, size_t tableBytes = 0);
  /// The slice at `offset` when it is cached, without loading it.
  bool Peek(uint64_t offset, std::shared_ptr<const L2Slice>* out) { return Lookup(offset, out, false); }
  /// The file the tables are read from.
  const File& file() const { return *file_; }
  L2CacheStats Stats();
  /// Put `slice` (an updated copy, already written to disk) in place of the slice at `offset`.
  void Replace(uint64_t offset, std::shared_ptr<const L2Slice> slice);
  /// Hold `slice`, newer than the disk, in place of the slice at `offset`: never evicted until unpinned.
  void Pin(uint64_t offset, std::shared_ptr<const L2Slice> slice);
  /// `slice` (pinned at `offset`) is on disk now: it may be evicted, unless a newer one was pinned meanwhile.
  void Unpin(uint64_t offset, const std::shared_ptr<const L2Slice>& slice);
  /// Drop every cached slice (requests holding one keep it until they finish).
  void Clear();

 private:
  using Lru = std::list<std::pair<uint64_t, std::shared_ptr<const L2Slice>>>;
  /// A cached slice, made the most recently used; `countMiss` says whether a miss counts in the stats.
  bool Lookup(uint64_t offset, std::shared_ptr<const L2Slice>* out, bool countMiss = true);
  /// Read `bytes` at `offset` (one slice, or a whole table) and cache every slice in it.
  Status Load(uint64_t offset, size_t bytes, uint64_t wanted, std::shared_ptr<const L2Slice>* out);
  void Insert(uint64_t offset, const std::shared_ptr<const L2Slice>& slice);

  std::shared_ptr<File> file_;
  size_t sliceBytes_;
  size_t capacity_;
  std::mutex mu_;
  Lru lru_;  // most recently used first
  std::unordered_map<uint64_t, Lru::iterator> index_;
  /// Slices changed in memory and not yet written back, looked up before the LRU.
  std::unordered_map<uint64_t, std::shared_ptr<const L2Slice>> pinned_;
  uint64_t hits_ = 0, misses_ = 0;
};

}  // namespace qcow2
