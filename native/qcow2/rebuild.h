// Rebuilding the refcounts of an image left dirty (lazy refcounts, then no clean close): the check's
// walker counts every cluster the metadata references, and a new refcount table and blocks
// describing exactly that are written past the end of the file before the header points at them.
#pragma once
#include <cstdint>

#include "file.h"
#include "qcow2/check.h"
#include "status.h"

namespace qcow2 {

struct RebuildRequest {
  /// What references clusters; the refcount table fields are ignored (the structure is replaced).
  WalkRequest walk;
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
