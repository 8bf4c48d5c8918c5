// Persistent dirty bitmaps in a writable engine: loaded at open, marked by every request that
// changes the disk, written back before a clean close. The directory (names, flags, where each
// table lies) is TypeScript's: it hands the tables in and rewrites the directory from what
// StoreBitmaps() reports.
#include <cstring>
#include <mutex>
#include <shared_mutex>

#include "qcow2/engine.h"
#include "qcow2/layout.h"

namespace qcow2 {

namespace {

/// The bits every loaded bitmap may hold together in memory: qemu keeps them in memory too, and a
/// 16 TiB disk at the smallest granularity would need 4 GiB.
constexpr uint64_t kMaxBitmapBytes = 1ull << 30;

/// The least granularity QEMU stores (512 bytes a bit) and the most (2 GiB).
constexpr uint32_t kMinGranularityBits = 9;
constexpr uint32_t kMaxGranularityBits = 31;

bool AllZero(const uint8_t* p, uint64_t n) { return n == 0 || (p[0] == 0 && std::memcmp(p, p + 1, n - 1) == 0); }

}  // namespace

Status Engine::LoadBitmaps() {
  uint64_t total = 0;
  for (const BitmapConfig& c : config_.bitmaps) {
    if (c.granularityBits < kMinGranularityBits || c.granularityBits > kMaxGranularityBits) {
      return Status::Error("ERR_QCOW2_CORRUPT", "bitmap granularity bits " + std::to_string(c.granularityBits) +
                                                    " is outside " + std::to_string(kMinGranularityBits) + ".." +
                                                    std::to_string(kMaxGranularityBits));
    }
    total += BitmapTableEntriesFor(size(), c.granularityBits, clusterSize()) * clusterSize();
    if (total > kMaxBitmapBytes) {
      return Status::Error("ERR_QCOW2_UNSUPPORTED", "the image's bitmaps need " + std::to_string(total) +
                                                        " bytes of memory, more than the limit of " +
                                                        std::to_string(kMaxBitmapBytes));
    }
    std::unique_ptr<DirtyBitmap> bitmap;
    QCOW2_TRY(LoadBitmap(c, &bitmap));
    bitmaps_.push_back(std::move(bitmap));
  }
  hasBitmaps_.store(!bitmaps_.empty(), std::memory_order_release);
  return Status::Ok();
}

Status Engine::LoadBitmap(const BitmapConfig& c, std::unique_ptr<DirtyBitmap>* out) {
  auto bitmap = std::make_unique<DirtyBitmap>(c, size(), clusterSize());
  QCOW2_TRY(ReadBitmapInto(c, bitmap.get()));
  const uint64_t cs = clusterSize();
  for (const BitmapTableEntry& e : bitmap->table) {
    if (e.host != 0) metadata_->Add(kMetaBitmapData, e.host, cs);
  }
  if (c.tableEntries > 0) metadata_->Add(kMetaBitmapTable, c.tableOffset, (c.tableEntries * 8 + cs - 1) / cs * cs);
  *out = std::move(bitmap);
  return Status::Ok();
}

Status Engine::ReadBitmapInto(const BitmapConfig& c, DirtyBitmap* bitmap) {
  const uint64_t cs = clusterSize();
  if (c.tableEntries != bitmap->entries()) {
    return Status::Error("ERR_QCOW2_CORRUPT", "bitmap table of " + std::to_string(c.tableEntries) +
                                                  " entries does not match the " + std::to_string(bitmap->entries()) +
                                                  " the disk size needs");
  }
  const uint64_t tableBytes = c.tableEntries * 8;
  if (tableBytes > 0 && (c.tableOffset % cs != 0 || c.tableOffset < cs || c.tableOffset > imageFileSize_ ||
                         imageFileSize_ - c.tableOffset < tableBytes)) {
    return Status::Error("ERR_QCOW2_CORRUPT", "bitmap table at " + std::to_string(c.tableOffset) + " (+" +
                                                  std::to_string(tableBytes) + " bytes) is not cluster-aligned inside " +
                                                  std::to_string(cs) + ".." + std::to_string(imageFileSize_));
  }
  std::vector<uint8_t> raw(tableBytes);
  if (tableBytes > 0) QCOW2_TRY(image_->ReadExact(raw.data(), tableBytes, c.tableOffset));
  bitmap->table.resize(c.tableEntries);
  for (uint64_t j = 0; j < c.tableEntries; j++) {
    BitmapTableEntry& e = bitmap->table[j];
    QCOW2_TRY(DecodeBitmapTableEntry(LoadBE64(raw.data() + 8 * j), j, cs, imageFileSize_, &e));
    uint8_t* chunk = bitmap->data() + j * cs;
    if (e.host != 0) {
      QCOW2_TRY(image_->ReadExact(chunk, cs, e.host));
    } else if (e.allOnes) {
      std::memset(chunk, 0xff, cs);
    }
  }
  bitmap->ClearTail();
  return Status::Ok();
}

Status Engine::ReadBitmap(const BitmapConfig& config, std::vector<uint8_t>* out) {
  QCOW2_TRY(Live());
  if (config.granularityBits < kMinGranularityBits || config.granularityBits > kMaxGranularityBits) {
    return Status::Error("ERR_QCOW2_CORRUPT", "bitmap granularity bits " + std::to_string(config.granularityBits) +
                                                  " is outside " + std::to_string(kMinGranularityBits) + ".." +
                                                  std::to_string(kMaxGranularityBits));
  }
  if (BitmapTableEntriesFor(size(), config.granularityBits, clusterSize()) * clusterSize() > kMaxBitmapBytes) {
    return Status::Error("ERR_QCOW2_UNSUPPORTED", "the bitmap needs more than " + std::to_string(kMaxBitmapBytes) + " bytes of memory");
  }
  std::shared_lock<std::shared_mutex> resizing(resizeMu_);
  DirtyBitmap bitmap(config, size(), clusterSize());
  QCOW2_TRY(ReadBitmapInto(config, &bitmap));
  out->assign(bitmap.data(), bitmap.data() + bitmap.entries() * clusterSize());
  return Status::Ok();
}

Status Engine::AddBitmap(uint32_t granularityBits, bool enabled, size_t* index) {
  QCOW2_TRY(Writable());
  if (granularityBits < kMinGranularityBits || granularityBits > kMaxGranularityBits) {
    return Status::Error("ERR_QCOW2_INVALID_ARGUMENT", "bitmap granularity bits " + std::to_string(granularityBits) +
                                                           " is outside " + std::to_string(kMinGranularityBits) + ".." +
                                                           std::to_string(kMaxGranularityBits));
  }
  std::unique_lock<std::shared_mutex> resizing(resizeMu_);
  std::lock_guard<std::mutex> lock(bitmapMu_);
  uint64_t total = BitmapTableEntriesFor(size(), granularityBits, clusterSize()) * clusterSize();
  for (const auto& b : bitmaps_) total += b->removed() ? 0 : b->entries() * clusterSize();
  if (total > kMaxBitmapBytes) {
    return Status::Error("ERR_QCOW2_UNSUPPORTED", "the image's bitmaps would need " + std::to_string(total) +
                                                      " bytes of memory, more than the limit of " +
                                                      std::to_string(kMaxBitmapBytes));
  }
  BitmapConfig config;
  config.granularityBits = granularityBits;
  config.enabled = enabled;
  config.tableEntries = BitmapTableEntriesFor(size(), granularityBits, clusterSize());
  auto bitmap = std::make_unique<DirtyBitmap>(config, size(), clusterSize());
  // Stored even while all clear: the directory needs its table.
  bitmap->Clear();
  bitmaps_.push_back(std::move(bitmap));
  hasBitmaps_.store(true, std::memory_order_release);
  *index = bitmaps_.size() - 1;
  return Status::Ok();
}

void Engine::QueueBitmapFrees(const DirtyBitmap& b) {
  const uint64_t cs = clusterSize();
  for (const BitmapTableEntry& e : b.table) {
    if (e.host != 0) bitmapFrees_.push_back({kMetaBitmapData, {e.host, cs, false}});
  }
  const uint64_t tableClusters = (b.table.size() * 8 + cs - 1) / cs;
  if (b.tableOffset != 0 && tableClusters > 0) bitmapFrees_.push_back({kMetaBitmapTable, {b.tableOffset, tableClusters * cs, false}});
}

Status Engine::ChangeBitmap(size_t index, BitmapChange change, const std::vector<uint8_t>& bits, uint32_t granularityBits) {
  QCOW2_TRY(Writable());
  std::lock_guard<std::mutex> lock(bitmapMu_);
  if (index >= bitmaps_.size() || bitmaps_[index]->removed()) {
    return Status::Error("ERR_QCOW2_INVALID_ARGUMENT", "no loaded bitmap " + std::to_string(index));
  }
  DirtyBitmap& b = *bitmaps_[index];
  switch (change) {
    case BitmapChange::Remove:
      QueueBitmapFrees(b);
      b.Remove();
      break;
    case BitmapChange::Clear: b.Clear(); break;
    case BitmapChange::Enable: b.SetEnabled(true); break;
    case BitmapChange::Disable: b.SetEnabled(false); break;
    case BitmapChange::Merge:
      if (granularityBits < kMinGranularityBits || granularityBits > kMaxGranularityBits) {
        return Status::Error("ERR_QCOW2_INVALID_ARGUMENT", "merged bitmap granularity bits " + std::to_string(granularityBits) +
                                                               " is outside " + std::to_string(kMinGranularityBits) + ".." +
                                                               std::to_string(kMaxGranularityBits));
      }
      b.Merge(bits.data(), bits.size(), granularityBits);
      break;
  }
  return Status::Ok();
}

Status Engine::BitmapBits(size_t index, std::vector<uint8_t>* out) {
  QCOW2_TRY(Live());
  std::lock_guard<std::mutex> lock(bitmapMu_);
  if (index >= bitmaps_.size() || bitmaps_[index]->removed()) {
    return Status::Error("ERR_QCOW2_INVALID_ARGUMENT", "no loaded bitmap " + std::to_string(index));
  }
  DirtyBitmap& b = *bitmaps_[index];
  out->assign(b.data(), b.data() + b.entries() * clusterSize());
  return Status::Ok();
}

Status Engine::DropBitmapTable(uint64_t tableOffset, uint64_t tableEntries) {
  QCOW2_TRY(Writable());
  const uint64_t cs = clusterSize();
  const uint64_t tableBytes = tableEntries * 8;
  if (tableBytes > 0 && (tableOffset % cs != 0 || tableOffset < cs || tableOffset > imageFileSize_ ||
                         imageFileSize_ - tableOffset < tableBytes)) {
    return Status::Error("ERR_QCOW2_CORRUPT", "bitmap table at " + std::to_string(tableOffset) + " (+" +
                                                  std::to_string(tableBytes) + " bytes) is not cluster-aligned inside " +
                                                  std::to_string(cs) + ".." + std::to_string(imageFileSize_));
  }
  std::vector<uint8_t> raw(tableBytes);
  if (tableBytes > 0) QCOW2_TRY(image_->ReadExact(raw.data(), tableBytes, tableOffset));
  DirtyBitmap dropped(BitmapConfig{}, 0, cs);
  dropped.tableOffset = tableOffset;
  dropped.table.resize(tableEntries);
  for (uint64_t j = 0; j < tableEntries; j++) {
    QCOW2_TRY(DecodeBitmapTableEntry(LoadBE64(raw.data() + 8 * j), j, cs, imageFileSize_, &dropped.table[j]));
  }
  std::lock_guard<std::mutex> lock(bitmapMu_);
  QueueBitmapFrees(dropped);
  return Status::Ok();
}

Status Engine::WriteBitmapDirectory(const std::vector<uint8_t>& bytes, uint64_t oldOffset, uint64_t oldBytes, uint64_t* offset) {
  QCOW2_TRY(Writable());
  const uint64_t cs = clusterSize();
  *offset = 0;
  if (!bytes.empty()) {
    const uint64_t clusters = (bytes.size() + cs - 1) / cs;
    QCOW2_TRY(Fail(AllocateMetadataClusters(clusters, kMetaBitmapDirectory, offset)));
    std::vector<uint8_t> padded(clusters * cs, 0);
    std::memcpy(padded.data(), bytes.data(), bytes.size());
    QCOW2_TRY(Guard(*offset, padded.size(), kMetaBitmapDirectory));
    QCOW2_TRY(image_->Write(padded.data(), padded.size(), *offset));
  }
  if (oldOffset != 0 && oldBytes > 0) {
    std::lock_guard<std::mutex> lock(bitmapMu_);
    bitmapFrees_.push_back({kMetaBitmapDirectory, {oldOffset, oldBytes, false}});
  }
  // The directory and the refcounts counting it are durable before the header names it.
  return Flush();
}

void Engine::MarkDirty(uint64_t at, uint64_t len) {
  if (!hasBitmaps_.load(std::memory_order_acquire)) return;
  std::lock_guard<std::mutex> lock(bitmapMu_);
  for (const auto& b : bitmaps_) {
    if (b->enabled() && !b->removed()) b->Mark(at, len);
  }
}

void Engine::ResizeBitmaps(uint64_t newSize) {
  if (!hasBitmaps_.load(std::memory_order_acquire)) return;
  std::lock_guard<std::mutex> lock(bitmapMu_);
  for (const auto& b : bitmaps_) b->Resize(newSize);
}

Status Engine::AllocateMetadataClusters(uint64_t count, uint32_t kind, uint64_t* offset) {
  const Geometry& g = geometry();
  uint64_t cluster = 0;
  {
    std::lock_guard<std::mutex> lock(metaMu_);
    QCOW2_TRY(refcounts_->Allocate(count, &cluster));
  }
  *offset = cluster << g.clusterBits;
  mapper_->NoteFileSize(*offset + (count << g.clusterBits));
  QCOW2_TRY(Guard(*offset, count << g.clusterBits));
  metadata_->Add(kind, *offset, count << g.clusterBits);
  return Status::Ok();
}

Status Engine::StoreBitmaps(std::vector<StoredBitmap>* out) {
  QCOW2_TRY(Writable());
  // No request may change the disk (or the bits) while they are written.
  std::unique_lock<std::shared_mutex> resizing(resizeMu_);
  std::lock_guard<std::mutex> marking(bitmapMu_);
  std::vector<std::vector<uint64_t>> tables(bitmaps_.size());
  for (size_t i = 0; i < bitmaps_.size(); i++) {
    if (bitmaps_[i]->changed() && !bitmaps_[i]->removed()) QCOW2_TRY(Fail(StoreBitmapData(*bitmaps_[i], &tables[i])));
  }
  // The data, and the refcounts counting its new clusters, are durable before a table points at them.
  QCOW2_TRY(Flush());
  out->assign(bitmaps_.size(), StoredBitmap{});
  for (size_t i = 0; i < bitmaps_.size(); i++) {
    DirtyBitmap& b = *bitmaps_[i];
    if (b.removed()) continue;
    if (b.changed()) {
      QCOW2_TRY(Fail(StoreBitmapTable(b, tables[i], &(*out)[i])));
    } else {
      (*out)[i] = {b.tableOffset, b.table.size()};
    }
  }
  // The tables and their refcounts are durable before the directory names them.
  return Flush();
}

Status Engine::StoreBitmapData(DirtyBitmap& b, std::vector<uint64_t>* table) {
  const uint64_t cs = clusterSize();
  const uint64_t n = b.entries();
  table->assign(n, 0);
  for (uint64_t j = 0; j < n; j++) {
    const uint8_t* chunk = b.data() + j * cs;
    const uint64_t old = j < b.table.size() ? b.table[j].host : 0;
    // All-zero clusters are not stored, as qemu stores them.
    if (AllZero(chunk, cs)) {
      if (old != 0) bitmapFrees_.push_back({kMetaBitmapData, {old, cs, false}});
      continue;
    }
    uint64_t host = old;
    if (host == 0) QCOW2_TRY(AllocateMetadataClusters(1, kMetaBitmapData, &host));
    QCOW2_TRY(Guard(host, cs, kMetaBitmapData));
    QCOW2_TRY(image_->Write(chunk, cs, host));
    (*table)[j] = host;
  }
  for (uint64_t j = n; j < b.table.size(); j++) {
    if (b.table[j].host != 0) bitmapFrees_.push_back({kMetaBitmapData, {b.table[j].host, cs, false}});
  }
  return Status::Ok();
}

Status Engine::StoreBitmapTable(DirtyBitmap& b, const std::vector<uint64_t>& table, StoredBitmap* out) {
  const uint64_t cs = clusterSize();
  const uint64_t clusters = (table.size() * 8 + cs - 1) / cs;
  const uint64_t oldClusters = (b.table.size() * 8 + cs - 1) / cs;
  // Rewritten in place when it keeps its size in clusters (the bitmap is in use meanwhile, so a
  // torn table is never trusted); elsewhere otherwise, the old one freed once the directory moved on.
  uint64_t offset = b.tableOffset;
  if (clusters != oldClusters || offset == 0) {
    if (oldClusters > 0 && offset != 0) bitmapFrees_.push_back({kMetaBitmapTable, {offset, oldClusters * cs, false}});
    offset = 0;
    if (clusters > 0) QCOW2_TRY(AllocateMetadataClusters(clusters, kMetaBitmapTable, &offset));
  }
  std::vector<BitmapTableEntry> decoded(table.size());
  if (clusters > 0) {
    std::vector<uint8_t> bytes(clusters * cs, 0);
    for (size_t j = 0; j < table.size(); j++) {
      StoreBE64(bytes.data() + 8 * j, table[j]);
      decoded[j].host = table[j];
    }
    QCOW2_TRY(Guard(offset, bytes.size(), kMetaBitmapTable));
    QCOW2_TRY(image_->Write(bytes.data(), bytes.size(), offset));
  }
  b.Stored(offset, std::move(decoded));
  *out = {offset, table.size()};
  return Status::Ok();
}

Status Engine::ReleaseBitmapClusters() {
  QCOW2_TRY(Writable());
  std::vector<std::pair<uint32_t, HostFree>> frees;
  {
    std::lock_guard<std::mutex> lock(bitmapMu_);
    frees.swap(bitmapFrees_);
  }
  if (frees.empty()) return Status::Ok();
  for (const auto& [kind, f] : frees) metadata_->Remove(kind, f.host, f.bytes);
  {
    std::lock_guard<std::mutex> lock(metaMu_);
    for (const auto& entry : frees) pendingFrees_.push_back(entry.second);
  }
  return Flush();
}

}  // namespace qcow2
