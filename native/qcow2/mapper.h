// Guest-to-host mapping: the L1 table held in memory and L2 slices through the cache, turned
// into segments — the longest runs of guest bytes that one I/O (or one memset) can serve.
#pragma once
#include <memory>
#include <vector>

#include "file.h"
#include "qcow2/l2_cache.h"
#include "qcow2/layout.h"

namespace qcow2 {

/// A run of guest bytes with one kind and, for data, contiguous host bytes.
struct Segment {
  ClusterKind kind = ClusterKind::Unallocated;
  uint64_t length = 0;
  /// A host offset belongs to the run (data, or zeros over a preallocated cluster).
  bool hasHost = false;
  /// Host offset of the run's first byte; for compressed runs, where the compressed data starts.
  uint64_t host = 0;
  /// Compressed runs: bytes the descriptor covers. A compressed run never spans two clusters.
  uint64_t compressedBytes = 0;
};

struct MapperOptions {
  size_t l2CacheBytes = 32u << 20;
  size_t l2SliceBytes = 4096;
};

/// Resolves guest offsets to segments. Thread-safe; holds no lock across I/O.
class Mapper {
 public:
  /// Load the L1 table (`l1Entries` entries at `l1Offset`) after checking its size and place;
  /// each entry is checked whenever a request needs it, so a bad one fails only those requests.
  static Status Load(const Geometry& geometry, const HostBounds& bounds, uint64_t l1Offset, uint64_t l1Entries,
                     std::shared_ptr<File> image, const MapperOptions& options, std::unique_ptr<Mapper>* out);

  /// The segment starting at `at`, at most `maxLength` bytes long (which must not pass the disk end).
  /// `scan` says the caller walks a long range: L2 tables missing from the cache load whole.
  Status Resolve(GuestOffset at, uint64_t maxLength, Segment* out, bool scan = false);
  /// Resolve() from cached tables only: false when that would need I/O or finds an error.
  bool ResolveCached(GuestOffset at, uint64_t maxLength, Segment* out);

  const Geometry& geometry() const { return geometry_; }
  L2Cache& cache() { return cache_; }

 private:
  Mapper(const Geometry& geometry, const HostBounds& bounds, std::shared_ptr<File> image, const MapperOptions& options);

  /// A run inside one cluster: one L2 entry, one kind.
  struct Piece {
    ClusterKind kind;
    bool hasHost;
    uint64_t host;
    uint64_t compressedBytes;
    uint64_t end;  ///< guest offset where the piece ends
  };
  Status PieceAt(const L2Slice& slice, uint64_t sliceFirstCluster, GuestOffset at, Piece* out) const;
  /// The slice mapping `at`; with `cachedOnly` a slice missing from the cache is ERR_QCOW2_WOULD_BLOCK.
  Status L2SliceFor(GuestOffset at, uint64_t l2Offset, bool scan, bool cachedOnly, std::shared_ptr<const L2Slice>* slice,
                    uint64_t* firstCluster, uint64_t* sliceEnd);
  Status ResolveIn(GuestOffset at, uint64_t maxLength, Segment* out, bool scan, bool cachedOnly);

  Geometry geometry_;
  HostBounds bounds_;
  size_t sliceBytes_;
  uint64_t entriesPerSlice_;
  /// The L1 table as read; each entry is checked when a request uses it.
  std::vector<uint64_t> l1_;
  L2Cache cache_;
};

}  // namespace qcow2
