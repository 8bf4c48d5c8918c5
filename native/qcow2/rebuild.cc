#include "qcow2/rebuild.h"

#include <algorithm>
#include <cstring>

#include "buffer.h"
#include "qcow2/layout.h"
#include "qcow2/refcounts.h"

namespace qcow2 {
namespace {

constexpr const char* kCorrupt = "ERR_QCOW2_CORRUPT";

void StoreBE64(uint8_t* p, uint64_t v) {
  v = __builtin_bswap64(v);
  std::memcpy(p, &v, 8);
}

/// References counted per cluster, growing as clusters past the end so far are met.
class Counter {
 public:
  Counter(uint32_t clusterBits, uint64_t fileSize) : clusterBits_(clusterBits), fileSize_(fileSize) {}

  /// Count one reference to every cluster of [offset, offset + bytes), which must lie in the file.
  Status Add(uint64_t offset, uint64_t bytes, const char* what) {
    if (bytes == 0) return Status::Ok();
    if (offset > fileSize_ || bytes > fileSize_ - offset) {
      return Status::Error(kCorrupt, std::string(what) + " at offset " + std::to_string(offset) + " (" +
                                         std::to_string(bytes) + " bytes) lies past the end of the image file (" +
                                         std::to_string(fileSize_) + " bytes)");
    }
    const uint64_t first = offset >> clusterBits_, last = (offset + bytes - 1) >> clusterBits_;
    if (counts_.size() <= last) counts_.resize(last + 1, 0);
    for (uint64_t c = first; c <= last; c++) counts_[c]++;
    return Status::Ok();
  }
  std::vector<uint64_t>& counts() { return counts_; }

 private:
  uint32_t clusterBits_;
  uint64_t fileSize_;
  std::vector<uint64_t> counts_;
};

Status CountL2(File& image, const RebuildRequest& r, const Geometry& g, uint64_t tableOffset, uint64_t fileSize,
               Counter* counter) {
  AlignedBuffer table(g.clusterSize);
  QCOW2_TRY(image.Read(table.data(), g.clusterSize, tableOffset));
  const HostBounds bounds{fileSize, r.externalDataFile};
  for (uint64_t i = 0; i < g.l2Entries(); i++) {
    const uint64_t raw = LoadBE64(table.data() + i * g.entryBytes);
    const uint64_t bitmap = g.extendedL2 ? LoadBE64(table.data() + i * g.entryBytes + 8) : 0;
    if (raw == 0) continue;
    L2Entry entry;
    QCOW2_TRY(DecodeL2Entry(g, bounds, GuestOffset{i << g.clusterBits}, raw, bitmap, &entry));
    if (entry.compressed) {
      const uint64_t bytes = std::min(entry.compressedBytes, fileSize - entry.host);
      QCOW2_TRY(counter->Add(entry.host, bytes, "compressed data"));
    } else if (entry.host != 0 && !r.externalDataFile) {
      QCOW2_TRY(counter->Add(entry.host, g.clusterSize, "a data cluster"));
    }
  }
  return Status::Ok();
}

Status CountL1(File& image, const RebuildRequest& r, const Geometry& g, const L1Table& l1, uint64_t fileSize,
               Counter* counter) {
  if (l1.entries == 0) return Status::Ok();
  if (l1.entries * 8 > kMaxL1Bytes) {
    return Status::Error(kCorrupt, "an L1 table of " + std::to_string(l1.entries) + " entries is larger than the limit");
  }
  QCOW2_TRY(counter->Add(l1.offset, l1.entries * 8, "an L1 table"));
  AlignedBuffer table(l1.entries * 8);
  QCOW2_TRY(image.Read(table.data(), l1.entries * 8, l1.offset));
  const HostBounds bounds{fileSize, r.externalDataFile};
  for (uint64_t i = 0; i < l1.entries; i++) {
    uint64_t l2 = 0;
    QCOW2_TRY(DecodeL1Entry(g, bounds, i, LoadBE64(table.data() + 8 * i), &l2));
    if (l2 == 0) continue;
    QCOW2_TRY(counter->Add(l2, g.clusterSize, "an L2 table"));
    QCOW2_TRY(CountL2(image, r, g, l2, fileSize, counter));
  }
  return Status::Ok();
}

uint64_t DivUp(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

}  // namespace

Status RebuildRefcounts(File& image, const RebuildRequest& r, RebuildResult* out) {
  const Geometry g = Geometry::Make(r.clusterBits, r.extendedL2, 0);
  uint64_t fileSize = 0;
  QCOW2_TRY(image.Size(&fileSize));
  Counter counter(r.clusterBits, fileSize);
  QCOW2_TRY(counter.Add(0, g.clusterSize, "the header"));
  for (const L1Table& l1 : r.l1Tables) QCOW2_TRY(CountL1(image, r, g, l1, fileSize, &counter));
  QCOW2_TRY(counter.Add(r.snapshotsOffset, r.snapshotsBytes, "the snapshot table"));
  std::vector<uint64_t>& counts = counter.counts();
  const uint32_t bits = 1u << r.refcountOrder;
  const uint64_t maxValue = bits == 64 ? ~0ull : (1ull << bits) - 1;
  for (uint64_t c = 0; c < counts.size(); c++) {
    if (counts[c] > maxValue) {
      return Status::Error(kCorrupt, "cluster " + std::to_string(c) + " has " + std::to_string(counts[c]) +
                                         " references, more than " + std::to_string(bits) + "-bit refcounts hold");
    }
  }
  // The new structures go past everything: blocks, then the table, each counted by the blocks.
  const uint64_t start = std::max<uint64_t>(counts.size(), DivUp(fileSize, g.clusterSize));
  const uint64_t perBlock = g.clusterSize * 8 / bits;
  uint64_t blocks = 1, tableClusters = 1;
  for (;;) {
    const uint64_t end = start + blocks + tableClusters;
    const uint64_t needBlocks = DivUp(end, perBlock);
    const uint64_t needTable = DivUp(needBlocks * 8, g.clusterSize);
    if (needBlocks <= blocks && needTable <= tableClusters) break;
    blocks = std::max(blocks, needBlocks);
    tableClusters = std::max(tableClusters, needTable);
  }
  counts.resize(start + blocks + tableClusters, 0);
  for (uint64_t c = start; c < counts.size(); c++) counts[c] = 1;
  AlignedBuffer block(g.clusterSize);
  AlignedBuffer table(tableClusters * g.clusterSize);
  std::memset(table.data(), 0, table.size());
  for (uint64_t b = 0; b < blocks; b++) {
    std::memset(block.data(), 0, g.clusterSize);
    for (uint64_t i = 0; i < perBlock && b * perBlock + i < counts.size(); i++) {
      SetRefcount(block.data(), bits, i, counts[b * perBlock + i]);
    }
    const uint64_t at = (start + b) << g.clusterBits;
    QCOW2_TRY(image.Write(block.data(), g.clusterSize, at));
    StoreBE64(table.data() + 8 * b, at);
  }
  const uint64_t tableOffset = (start + blocks) << g.clusterBits;
  QCOW2_TRY(image.Write(table.data(), table.size(), tableOffset));
  // The new refcounts are durable before the header points at them, and the header before the dirty bit goes.
  QCOW2_TRY(image.Flush());
  uint8_t field[12];
  StoreBE64(field, tableOffset);
  const uint32_t clustersBE = __builtin_bswap32(static_cast<uint32_t>(tableClusters));
  std::memcpy(field + 8, &clustersBE, 4);
  QCOW2_TRY(image.Write(field, sizeof field, 48));
  QCOW2_TRY(image.Flush());
  uint8_t features[8];
  StoreBE64(features, r.incompatibleFeatures & ~1ull);
  QCOW2_TRY(image.Write(features, sizeof features, 72));
  QCOW2_TRY(image.Flush());
  out->refcountTableOffset = tableOffset;
  out->refcountTableClusters = tableClusters;
  return Status::Ok();
}

}  // namespace qcow2
