// Laying out a new image: refcount table and blocks, L1 table and, with preallocation, L2
// tables and data clusters. The header itself is encoded in TypeScript and written last.
#pragma once
#include <cstdint>

#include "file.h"
#include "status.h"

namespace qcow2 {

/// qemu-img's preallocation modes.
enum class Preallocation : uint8_t { Off, Metadata, Falloc, Full };

struct FormatRequest {
  uint32_t clusterBits = 16;
  uint32_t refcountOrder = 4;
  uint64_t size = 0;
  bool extendedL2 = false;
  Preallocation preallocation = Preallocation::Off;
};

/// Where the structures of the new image went, for the header.
struct FormatResult {
  uint64_t l1Offset = 0;
  uint64_t l1Size = 0;
  uint64_t refcountTableOffset = 0;
  uint64_t refcountTableClusters = 0;
};

/// Write every structure but the header (cluster 0) into the empty file `image`; data clusters of a
/// preallocated image go to `dataFile` at their guest offsets when it is given (external data file).
Status FormatImage(File& image, File* dataFile, const FormatRequest& request, FormatResult* out);

}  // namespace qcow2
