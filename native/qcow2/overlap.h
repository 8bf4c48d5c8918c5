// Where the image's metadata lies in the image file, so that no write lands on it: the engine asks
// before every write whose host offset came from disk (or from the allocator) and refuses one that
// would overwrite a structure, as QEMU's overlap check does.
#pragma once
#include <cstdint>
#include <map>
#include <shared_mutex>
#include <string>
#include <vector>

#include "status.h"

namespace qcow2 {

/// The kinds of metadata structures, as bits so that a write can be allowed onto its own kind.
enum MetadataKind : uint32_t {
  kMetaHeader = 1,
  kMetaActiveL1 = 2,
  kMetaActiveL2 = 4,
  kMetaRefcountTable = 8,
  kMetaRefcountBlock = 16,
  kMetaSnapshotTable = 32,
  kMetaInactiveL1 = 64,
  kMetaBitmapDirectory = 128,
  kMetaBitmapTable = 256,
  kMetaBitmapData = 512,
};

/// The name QEMU's message gives a structure ("active L1 table", …).
const char* MetadataKindName(uint32_t kind);

/// Host ranges of metadata, cluster-granular. Thread-safe: lookups share a lock, changes take it alone.
class MetadataRanges {
 public:
  explicit MetadataRanges(uint32_t clusterBits) : clusterBits_(clusterBits) {}

  /// Note that [offset, offset + bytes) holds a structure of `kind` (widened to whole clusters).
  void Add(uint32_t kind, uint64_t offset, uint64_t bytes);
  /// Forget the structure of `kind` noted at [offset, offset + bytes): its clusters are being freed.
  void Remove(uint32_t kind, uint64_t offset, uint64_t bytes);
  /// ERR_QCOW2_CORRUPT naming the structure when [offset, offset + bytes) overlaps metadata of a
  /// kind outside `allowed`; ok otherwise.
  Status Check(uint64_t offset, uint64_t bytes, uint32_t allowed = 0) const;

 private:
  /// A structure of several clusters (tables); few of them exist, so they are scanned.
  struct Span {
    uint32_t kind;
    uint64_t first, count;
  };
  uint32_t clusterBits_;
  mutable std::shared_mutex mu_;
  /// Single-cluster structures (L2 tables, refcount blocks, the header): cluster -> kind bits.
  std::map<uint64_t, uint32_t> clusters_;
  std::vector<Span> spans_;
};

}  // namespace qcow2
