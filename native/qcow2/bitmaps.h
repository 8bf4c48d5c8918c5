// Persistent dirty bitmaps held in memory while a writable engine has the image open: the bitmap
// table entry format, and the bits themselves in their on-disk order. The bitmap directory is
// decoded and encoded in TypeScript (ts/qcow2/bitmaps.ts); loading and storing is the engine's
// (engine_bitmaps.cc).
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "status.h"

namespace qcow2 {

/// Bitmap table entry bits that must be zero: 1-8 and 56-63.
constexpr uint64_t kBitmapEntryReservedMask = 0xff000000000001feull;
/// Bitmap table entry bits 9-55: the host offset of a data cluster.
constexpr uint64_t kBitmapEntryOffsetMask = 0x00fffffffffffe00ull;
/// Bit 0 of an entry without an offset: the cluster reads as all ones.
constexpr uint64_t kBitmapEntryAllOnes = 1;

/// One bitmap table entry, decoded.
struct BitmapTableEntry {
  /// Host offset of the data cluster; 0 when the cluster is not stored.
  uint64_t host = 0;
  /// Not stored and reading as all ones (bit 0); otherwise not stored means zeros.
  bool allOnes = false;
};

/// Decode entry `index` of a bitmap table; ERR_QCOW2_CORRUPT (saying the value and the rule broken)
/// when reserved bits are set, the offset is not cluster-aligned or its cluster lies past `fileSize`.
Status DecodeBitmapTableEntry(uint64_t raw, uint64_t index, uint64_t clusterSize, uint64_t fileSize,
                              BitmapTableEntry* out);

/// A bitmap as the directory describes it (decoded in TypeScript), handed to the engine at open.
struct BitmapConfig {
  uint64_t tableOffset = 0;
  uint64_t tableEntries = 0;
  uint32_t granularityBits = 16;
  /// The `auto` flag: every change of the disk is recorded in it.
  bool enabled = false;
};

/// Where a stored bitmap's table lies once the engine wrote it back.
struct StoredBitmap {
  uint64_t tableOffset = 0;
  uint64_t tableEntries = 0;
};

/// The bits of one bitmap, one per granule of the disk: bit i of byte j stands for granule 8j + i,
/// as on disk. Bytes past the last granule are kept zero, as the spec asks of the stored tail.
class DirtyBitmap {
 public:
  DirtyBitmap(const BitmapConfig& config, uint64_t diskSize, uint64_t clusterSize);

  /// Set the bits of every granule [at, at + len) touches (none when len is 0).
  void Mark(uint64_t at, uint64_t len);
  /// Follow a change of the disk size: granules past the new end are dropped, new ones start clear.
  void Resize(uint64_t diskSize);
  /// Set the granules that the set bits of `bits` (of another bitmap, at `granularityBits`) cover.
  void Merge(const uint8_t* bits, uint64_t bytes, uint32_t granularityBits);
  /// Clear every bit.
  void Clear();
  void SetEnabled(bool enabled) { config_.enabled = enabled; }
  /// Removed from the image: neither marked nor stored any more.
  void Remove() { removed_ = true; }
  bool removed() const { return removed_; }
  /// Clear the bits past the last granule (loaded data may hold some; they must read as zero).
  void ClearTail();
  /// The bits are on disk in `stored` at `offset`: unchanged from now on.
  void Stored(uint64_t offset, std::vector<BitmapTableEntry> stored);
  /// Bytes of bitmap data, whole clusters (what the bitmap table maps).
  uint8_t* data() { return bytes_.data(); }
  /// Bitmap table entries the current disk size needs.
  uint64_t entries() const { return bytes_.size() / clusterSize_; }
  uint32_t granularityBits() const { return config_.granularityBits; }
  bool enabled() const { return config_.enabled; }
  /// True once the bits or the size changed since the load: the bitmap must be written back.
  bool changed() const { return changed_; }

  /// The bitmap table as loaded (decoded entries), and where it lies: the store reuses its clusters.
  std::vector<BitmapTableEntry> table;
  uint64_t tableOffset = 0;

 private:
  /// Granules of a disk of `diskSize` bytes.
  uint64_t GranulesOf(uint64_t diskSize) const;

  BitmapConfig config_;
  uint64_t clusterSize_;
  uint64_t granules_;
  std::vector<uint8_t> bytes_;
  bool changed_ = false;
  bool removed_ = false;
};

/// Bitmap table entries a bitmap of `granularityBits` needs for a disk of `diskSize` bytes.
uint64_t BitmapTableEntriesFor(uint64_t diskSize, uint32_t granularityBits, uint64_t clusterSize);

}  // namespace qcow2
