#include "qcow2/format.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "buffer.h"
#include "qcow2/layout.h"
#include "qcow2/refcounts.h"

namespace qcow2 {
namespace {

uint64_t DivUp(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

/// Cluster counts of each structure, in file order after the header cluster.
struct Layout {
  uint64_t table = 0, blocks = 0, l1 = 0, l2 = 0, data = 0;
  uint64_t Total() const { return 1 + table + blocks + l1 + l2 + data; }
  uint64_t L1Start() const { return 1 + table + blocks; }
  uint64_t L2Start() const { return L1Start() + l1; }
  uint64_t DataStart() const { return L2Start() + l2; }
};

/// Refcount blocks and table big enough to count every cluster, themselves included.
void SizeRefcounts(Layout* layout, uint64_t clusterSize, uint64_t perBlock) {
  layout->table = layout->blocks = 1;
  for (;;) {
    const uint64_t blocks = DivUp(layout->Total(), perBlock);
    const uint64_t table = DivUp(blocks * 8, clusterSize);
    if (blocks <= layout->blocks && table <= layout->table) return;
    layout->blocks = std::max(blocks, layout->blocks);
    layout->table = std::max(table, layout->table);
  }
}

Status WriteRefcounts(File& image, const Layout& layout, uint64_t clusterSize, uint32_t bits, uint64_t perBlock) {
  // Pool memory comes back dirty: every byte not set below must be zero.
  AlignedBuffer table(layout.table * clusterSize);
  std::memset(table.data(), 0, table.size());
  AlignedBuffer block(clusterSize);
  const uint64_t total = layout.Total();
  for (uint64_t b = 0; b < layout.blocks; b++) {
    const uint64_t blockCluster = 1 + layout.table + b;
    StoreBE64(table.data() + 8 * b, blockCluster * clusterSize);
    std::memset(block.data(), 0, clusterSize);
    for (uint64_t i = 0; i < perBlock && b * perBlock + i < total; i++) SetRefcount(block.data(), bits, i, 1);
    QCOW2_TRY(image.Write(block.data(), clusterSize, blockCluster * clusterSize));
  }
  return image.Write(table.data(), layout.table * clusterSize, clusterSize);
}

/// L1 and L2 tables mapping guest cluster i to `dataStart + i` (or guest offset in a data file).
Status WriteMappings(File& image, const Layout& layout, const Geometry& g, uint64_t l1Size, uint64_t dataClusters,
                     bool dataFile) {
  AlignedBuffer l1(std::max<uint64_t>(layout.l1, 1) * g.clusterSize);
  std::memset(l1.data(), 0, l1.size());
  AlignedBuffer l2(g.clusterSize);
  const uint64_t perTable = g.l2Entries();
  for (uint64_t t = 0; t < layout.l2; t++) {
    const uint64_t tableOffset = (layout.L2Start() + t) * g.clusterSize;
    StoreBE64(l1.data() + 8 * t, tableOffset | kCopiedFlag);
    std::memset(l2.data(), 0, g.clusterSize);
    for (uint64_t i = 0; i < perTable && t * perTable + i < dataClusters; i++) {
      const uint64_t guest = t * perTable + i;
      const uint64_t host = dataFile ? guest * g.clusterSize : (layout.DataStart() + guest) * g.clusterSize;
      StoreBE64(l2.data() + i * g.entryBytes, host | kCopiedFlag);
    }
    QCOW2_TRY(image.Write(l2.data(), g.clusterSize, tableOffset));
  }
  if (l1Size == 0) return Status::Ok();
  return image.Write(l1.data(), layout.l1 * g.clusterSize, layout.L1Start() * g.clusterSize);
}

/// Give the data clusters their space: a sparse end for metadata, fallocate, or written zeros.
Status PreallocateData(File& file, Preallocation mode, uint64_t start, uint64_t bytes) {
  if (bytes == 0) return Status::Ok();
  if (mode == Preallocation::Metadata) {
    uint64_t size = 0;
    QCOW2_TRY(file.Size(&size));
    return size < start + bytes ? file.Truncate(start + bytes) : Status::Ok();
  }
  if (mode == Preallocation::Falloc) return file.Allocate(AllocateMode::Allocate, start, bytes);
  constexpr uint64_t kChunk = 4u << 20;
  AlignedBuffer zeros(kChunk);
  std::memset(zeros.data(), 0, kChunk);
  for (uint64_t at = 0; at < bytes; at += kChunk) {
    QCOW2_TRY(file.Write(zeros.data(), std::min(kChunk, bytes - at), start + at));
  }
  return Status::Ok();
}

}  // namespace

Status FormatImage(File& image, File* dataFile, const FormatRequest& request, FormatResult* out) {
  const Geometry g = Geometry::Make(request.clusterBits, request.extendedL2, request.size);
  const uint32_t bits = 1u << request.refcountOrder;
  const uint64_t perBlock = g.clusterSize * 8 / bits;
  const uint64_t l1Size = g.L1EntriesNeeded();
  if (l1Size * 8 > kMaxL1Bytes) {
    return Status::Error("ERR_QCOW2_INVALID_ARGUMENT", "a disk of " + std::to_string(request.size) +
                                                           " bytes needs an L1 table of " + std::to_string(l1Size * 8) +
                                                           " bytes, more than the limit of " + std::to_string(kMaxL1Bytes));
  }
  const bool prealloc = request.preallocation != Preallocation::Off;
  const uint64_t dataClusters = prealloc ? DivUp(request.size, g.clusterSize) : 0;
  Layout layout;
  layout.l1 = DivUp(l1Size * 8, g.clusterSize);
  layout.l2 = prealloc ? DivUp(dataClusters, g.l2Entries()) : 0;
  layout.data = dataFile ? 0 : dataClusters;
  SizeRefcounts(&layout, g.clusterSize, perBlock);
  QCOW2_TRY(WriteRefcounts(image, layout, g.clusterSize, bits, perBlock));
  QCOW2_TRY(WriteMappings(image, layout, g, l1Size, dataClusters, dataFile != nullptr));
  if (dataFile) {
    QCOW2_TRY(PreallocateData(*dataFile, request.preallocation, 0, dataClusters * g.clusterSize));
  } else {
    QCOW2_TRY(PreallocateData(image, request.preallocation, layout.DataStart() * g.clusterSize, dataClusters * g.clusterSize));
  }
  out->l1Offset = l1Size > 0 ? layout.L1Start() * g.clusterSize : 0;
  out->l1Size = l1Size;
  out->refcountTableOffset = g.clusterSize;
  out->refcountTableClusters = layout.table;
  return Status::Ok();
}

}  // namespace qcow2
