// Rebuilding the refcounts of an image left dirty (lazy refcounts, then no clean close): every
// cluster the metadata references is counted, and a new refcount table and blocks describing
// exactly that are written past the end of the file before the header points at them.
#pragma once
#include <cstdint>
#include <vector>

#include "file.h"
#include "status.h"

namespace qcow2 {

/// An L1 table to walk: the active one or a snapshot's.
struct L1Table {
  uint64_t offset = 0;
  uint64_t entries = 0;
};

struct RebuildRequest {
  uint32_t clusterBits = 16;
  uint32_t refcountOrder = 4;
  bool extendedL2 = false;
  bool externalDataFile = false;
  /// The active L1 table first, then each snapshot's.
  std::vector<L1Table> l1Tables;
  uint64_t snapshotsOffset = 0;
  uint64_t snapshotsBytes = 0;
  /// The incompatible feature bits as stored; the dirty bit is cleared once the refcounts are right.
  uint64_t incompatibleFeatures = 0;
};

/// Where the new refcount table went (the header already points at it).
struct RebuildResult {
  uint64_t refcountTableOffset = 0;
  uint64_t refcountTableClusters = 0;
};

Status RebuildRefcounts(File& image, const RebuildRequest& request, RebuildResult* out);

}  // namespace qcow2
