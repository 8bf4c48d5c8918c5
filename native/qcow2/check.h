// Checking an image the way qemu-img check does: one walker counts every reference the metadata
// makes (header, L1/L2 tables, data and compressed clusters, snapshot table, refcount structures,
// bitmaps), the counts are compared with the stored refcounts, COPIED flags are verified, and with
// a repair mode the differences are fixed (or the refcount structure is rebuilt).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "file.h"
#include "qcow2/header_fields.h"
#include "status.h"

namespace qcow2 {

/// An L1 table to walk besides the active one: a snapshot's, with the names its messages show.
struct SnapshotL1 {
  uint64_t offset = 0;
  uint64_t entries = 0;
  std::string id;
  std::string name;
};

/// A bitmap table (fixed-width entries) the bitmap directory points at.
struct BitmapTableRef {
  uint64_t offset = 0;
  uint64_t entries = 0;
};

/// Everything the walker visits, as the header, snapshot table and bitmap directory (decoded in TS) say.
struct WalkRequest {
  uint32_t clusterBits = 16;
  uint32_t refcountOrder = 4;
  bool extendedL2 = false;
  bool externalDataFile = false;
  uint64_t virtualSize = 0;
  uint64_t l1Offset = 0;
  uint64_t l1Entries = 0;
  std::vector<SnapshotL1> snapshots;
  uint64_t snapshotsOffset = 0;
  uint64_t snapshotsBytes = 0;
  uint64_t refcountTableOffset = 0;
  uint64_t refcountTableClusters = 0;
  uint64_t cryptoOffset = 0;
  uint64_t cryptoBytes = 0;
  /// The image has a bitmaps extension with at least one bitmap.
  bool hasBitmaps = false;
  /// The bitmap directory decoded; when false the check fails as qemu's does (EINVAL).
  bool bitmapDirectoryValid = true;
  uint64_t bitmapDirectoryOffset = 0;
  uint64_t bitmapDirectoryBytes = 0;
  std::vector<BitmapTableRef> bitmapTables;
  /// Where the header fields lie that a repair or rebuild updates.
  HeaderFields header;
};

/// Repair flags, as qemu-img check -r leaks (Leaks) and -r all (Leaks | Errors).
constexpr uint32_t kFixLeaks = 1;
constexpr uint32_t kFixErrors = 2;

/// A snapshot table (encoded in TS) to put in place of the one at walk.snapshotsOffset: -r all's
/// fix of incomplete entries. It goes to the first free clusters, then the header points at it.
struct SnapshotTableRewrite {
  /// The table's bytes, the last entry's padding left out; empty: no rewrite.
  std::vector<uint8_t> bytes;
  uint32_t count = 0;
  /// Header offsets of nb_snapshots and snapshots_offset.
  uint64_t countField = 0;
  uint64_t offsetField = 0;
};

struct CheckRequest {
  WalkRequest walk;
  uint32_t fix = 0;
  /// The incompatible feature bits as stored: a clean repair clears dirty (bit 0) and corrupt (bit 1).
  uint64_t incompatibleFeatures = 0;
  /// Corruptions found outside this pass (the snapshot table, in TS) and left unfixed: they keep a repair from marking the image clean.
  uint64_t otherCorruptions = 0;
  SnapshotTableRewrite snapshotTable;
};

/// What a check found (and fixed), with qemu-img check's counters and messages.
struct CheckReport {
  std::vector<std::string> messages;
  uint64_t checkErrors = 0;
  uint64_t corruptions = 0;
  uint64_t leaks = 0;
  uint64_t corruptionsFixed = 0;
  uint64_t leaksFixed = 0;
  uint64_t imageEndOffset = 0;
  uint64_t totalClusters = 0;
  uint64_t allocatedClusters = 0;
  uint64_t fragmentedClusters = 0;
  uint64_t compressedClusters = 0;
  /// A corruption event made the image unusable for the rest of this run (qemu drops the image:
  /// a double check fails with "No medium found").
  bool unusable = false;
  /// Set when the check stopped early (qemu's "Check failed: <reason>"): the reason, e.g. "Input/output error".
  std::string failure;
};

/// References per host cluster as the walker counts them, saturating at the image's refcount maximum;
/// 16 bits a cluster when the refcounts are that narrow, 32 otherwise.
class ReferenceCounts {
 public:
  explicit ReferenceCounts(uint32_t refcountOrder);
  uint64_t Get(uint64_t cluster) const {
    if (cluster >= size_) return 0;
    return narrow_ ? counts16_[cluster] : counts32_[cluster];
  }
  void Set(uint64_t cluster, uint64_t value);
  /// Clusters the array covers (qemu's nb_clusters: grows as references past the end are met).
  uint64_t size() const { return size_; }
  void Resize(uint64_t clusters);
  void Clear();
  uint64_t max() const { return max_; }

 private:
  bool narrow_ = true;
  std::vector<uint16_t> counts16_;
  std::vector<uint32_t> counts32_;
  uint64_t size_ = 0;
  uint64_t max_ = 0;
};

/// Walk every structure of the image and count its references into `counts` (sized to the file
/// first). Problems go to `report`; `*rebuild` is set when the refcount structure itself is broken.
/// With `countRefcountStructure` false the refcount table and blocks are left out (the dirty-image
/// rebuild replaces them). Nothing is written (CheckImage runs the same walk with its repairs).
Status CountReferences(File& image, const WalkRequest& request, bool countRefcountStructure, ReferenceCounts* counts,
                       CheckReport* report, bool* rebuild);

/// Where a new refcount structure went.
struct NewRefcountStructure {
  uint64_t tableOffset = 0;
  uint64_t tableClusters = 0;
};

/// Asked before each block ("refblock") and table ("reftable") write; an error stops the rebuild.
using WriteCheck = std::function<Status(uint64_t offset, uint64_t bytes, const char* what)>;

/// Write refcount blocks and a table describing `counts` (which gains their own references), placed
/// at the first free clusters from cluster `searchFrom`; flushes, then points the header at the table.
Status WriteRefcountStructure(File& image, const WalkRequest& request, uint64_t searchFrom, ReferenceCounts* counts,
                              NewRefcountStructure* out, const WriteCheck& checkWrite = nullptr);

/// Check (and with `request.fix`, repair) the image, one pass of qemu-img check.
Status CheckImage(File& image, const CheckRequest& request, CheckReport* report);

}  // namespace qcow2
