// Guest-to-host mapping: the L1 table held in memory and L2 slices through the cache, turned
// into segments — the longest runs of guest bytes that one I/O (or one memset) can serve.
#pragma once
#include <atomic>
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
  /// Ask the kernel to start reading the L2 tables of [at, at + length) missing from the cache, all
  /// at once, so that a long walk (map) finds them in the page cache instead of waiting for each
  /// in turn. Only for files read through the page cache; at most kMaxAdvisedBytes per call.
  void AdviseTables(GuestOffset at, uint64_t length);
  /// Resolve() from cached tables only: false when that would need I/O or finds an error.
  bool ResolveCached(GuestOffset at, uint64_t maxLength, Segment* out);

  const Geometry& geometry() const { return geometry_; }
  L2Cache& cache() { return cache_; }

  /// The raw L2 entry (and subcluster bitmap) of the cluster holding `at`, with the L1 entry above it.
  struct RawEntry {
    uint64_t l1Index = 0;
    uint64_t l1Raw = 0;
    /// The L2 table offset; 0 when the L1 entry is unallocated (then `raw` and `bitmap` are 0).
    uint64_t l2Offset = 0;
    uint64_t raw = 0;
    uint64_t bitmap = 0;
    L2Entry entry;
  };
  /// With `cachedOnly`, a table missing from the cache is ERR_QCOW2_WOULD_BLOCK instead of a read.
  Status EntryAt(GuestOffset at, RawEntry* out, bool cachedOnly = false);
  /// Publish a new L1 entry (already on disk).
  void SetL1(uint64_t index, uint64_t raw) { l1_[index].store(raw, std::memory_order_release); }
  uint64_t L1Raw(uint64_t index) const { return l1_[index].load(std::memory_order_acquire); }
  uint64_t l1Entries() const { return l1Count_; }
  /// Replace the L1 table by a longer one (the caller holds every request out).
  void GrowL1(uint64_t entries);
  /// The image file has grown to `size` bytes: host offsets below it are valid.
  void NoteFileSize(uint64_t size);
  /// Host offsets of the image file are checked against this size.
  uint64_t fileSize() const { return fileSize_.load(std::memory_order_acquire); }
  /// The virtual disk size changed (the caller holds every request out).
  void SetVirtualSize(uint64_t size) { geometry_.virtualSize = size; }

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

  HostBounds Bounds() const { return {fileSize(), bounds_.externalData}; }

  Geometry geometry_;
  HostBounds bounds_;
  std::atomic<uint64_t> fileSize_{0};
  size_t sliceBytes_;
  uint64_t entriesPerSlice_;
  /// The L1 table as read and as updated; each entry is checked when a request uses it.
  std::unique_ptr<std::atomic<uint64_t>[]> l1_;
  uint64_t l1Count_ = 0;
  L2Cache cache_;
};

}  // namespace qcow2
