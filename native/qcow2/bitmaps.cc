#include "qcow2/bitmaps.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <string>

namespace qcow2 {

namespace {

std::string Hex(uint64_t v) {
  char text[24];
  std::snprintf(text, sizeof text, "0x%" PRIx64, v);
  return text;
}

}  // namespace

Status DecodeBitmapTableEntry(uint64_t raw, uint64_t index, uint64_t clusterSize, uint64_t fileSize,
                              BitmapTableEntry* out) {
  const std::string where = "bitmap table entry " + std::to_string(index) + " (" + Hex(raw) + ")";
  if (raw & kBitmapEntryReservedMask) {
    return Status::Error("ERR_QCOW2_CORRUPT", where + " has reserved bits " + Hex(raw & kBitmapEntryReservedMask) + " set");
  }
  out->host = raw & kBitmapEntryOffsetMask;
  out->allOnes = out->host == 0 && (raw & kBitmapEntryAllOnes);
  if (out->host == 0) return Status::Ok();
  if (raw & kBitmapEntryAllOnes) return Status::Error("ERR_QCOW2_CORRUPT", where + " has an offset and the all-ones bit");
  if (out->host % clusterSize != 0) {
    return Status::Error("ERR_QCOW2_CORRUPT", where + ": offset " + std::to_string(out->host) +
                                                  " is not aligned to the cluster size " + std::to_string(clusterSize));
  }
  if (out->host > fileSize || fileSize - out->host < clusterSize) {
    return Status::Error("ERR_QCOW2_CORRUPT", where + ": cluster at " + std::to_string(out->host) +
                                                  " lies past the end of the file (" + std::to_string(fileSize) + " bytes)");
  }
  return Status::Ok();
}

uint64_t BitmapTableEntriesFor(uint64_t diskSize, uint32_t granularityBits, uint64_t clusterSize) {
  const uint64_t granule = 1ull << granularityBits;
  const uint64_t granules = diskSize / granule + (diskSize % granule != 0);
  const uint64_t bytes = (granules + 7) / 8;
  return (bytes + clusterSize - 1) / clusterSize;
}

DirtyBitmap::DirtyBitmap(const BitmapConfig& config, uint64_t diskSize, uint64_t clusterSize)
    : config_(config), clusterSize_(clusterSize), granules_(GranulesOf(diskSize)) {
  bytes_.assign(BitmapTableEntriesFor(diskSize, config.granularityBits, clusterSize) * clusterSize, 0);
  tableOffset = config.tableOffset;
}

uint64_t DirtyBitmap::GranulesOf(uint64_t diskSize) const {
  const uint64_t granule = 1ull << config_.granularityBits;
  return diskSize / granule + (diskSize % granule != 0);
}

void DirtyBitmap::Mark(uint64_t at, uint64_t len) {
  if (len == 0) return;
  uint64_t first = at >> config_.granularityBits;
  const uint64_t end = std::min(((at + len - 1) >> config_.granularityBits) + 1, granules_);
  if (first >= end) return;
  changed_ = true;
  // Bits up to a byte boundary, whole bytes, then the bits of the last byte.
  for (; first < end && (first & 7); first++) bytes_[first >> 3] |= static_cast<uint8_t>(1u << (first & 7));
  const uint64_t wholeEnd = end & ~7ull;
  if (first < wholeEnd) {
    std::memset(bytes_.data() + (first >> 3), 0xff, (wholeEnd - first) >> 3);
    first = wholeEnd;
  }
  for (; first < end; first++) bytes_[first >> 3] |= static_cast<uint8_t>(1u << (first & 7));
}

void DirtyBitmap::Merge(const uint8_t* bits, uint64_t bytes, uint32_t granularityBits) {
  const uint64_t granule = 1ull << granularityBits;
  for (uint64_t i = 0; i < bytes; i++) {
    if (bits[i] == 0) continue;
    for (uint32_t bit = 0; bit < 8; bit++) {
      if (bits[i] & (1u << bit)) Mark((i * 8 + bit) * granule, granule);
    }
  }
}

void DirtyBitmap::Clear() {
  std::memset(bytes_.data(), 0, bytes_.size());
  changed_ = true;
}

void DirtyBitmap::ClearTail() {
  const uint64_t firstByte = (granules_ + 7) / 8;
  if (granules_ & 7) bytes_[granules_ >> 3] &= static_cast<uint8_t>((1u << (granules_ & 7)) - 1);
  std::memset(bytes_.data() + firstByte, 0, bytes_.size() - firstByte);
}

void DirtyBitmap::Stored(uint64_t offset, std::vector<BitmapTableEntry> stored) {
  tableOffset = offset;
  table = std::move(stored);
  changed_ = false;
}

void DirtyBitmap::Resize(uint64_t diskSize) {
  const uint64_t granules = GranulesOf(diskSize);
  if (granules == granules_) return;
  changed_ = true;
  // The tail past the last granule must read as zero once stored, and when the disk grows again.
  if (granules < granules_) {
    granules_ = granules;
    ClearTail();
  }
  granules_ = granules;
  bytes_.resize(BitmapTableEntriesFor(diskSize, config_.granularityBits, clusterSize_) * clusterSize_, 0);
}

}  // namespace qcow2
