#include "qcow2/refcounts.h"

#include <algorithm>

#include "buffer.h"
#include "qcow2/layout.h"

namespace qcow2 {
namespace {

constexpr const char* kCorrupt = "ERR_QCOW2_CORRUPT";

/// QEMU's bound on the refcount table, a sane limit for any image.
constexpr uint64_t kMaxTableBytes = 8ull << 20;

}  // namespace

uint64_t GetRefcount(const uint8_t* block, uint32_t bits, uint64_t index) {
  if (bits < 8) {
    const uint32_t perByte = 8 / bits;
    const uint32_t shift = static_cast<uint32_t>(index % perByte) * bits;
    return (block[index / perByte] >> shift) & ((1u << bits) - 1);
  }
  const uint32_t bytes = bits / 8;
  uint64_t v = 0;
  for (uint32_t i = 0; i < bytes; i++) v = v << 8 | block[index * bytes + i];
  return v;
}

void SetRefcount(uint8_t* block, uint32_t bits, uint64_t index, uint64_t value) {
  if (bits < 8) {
    const uint32_t perByte = 8 / bits;
    const uint32_t shift = static_cast<uint32_t>(index % perByte) * bits;
    const uint8_t mask = static_cast<uint8_t>(((1u << bits) - 1) << shift);
    uint8_t& byte = block[index / perByte];
    byte = static_cast<uint8_t>((byte & ~mask) | ((value << shift) & mask));
    return;
  }
  const uint32_t bytes = bits / 8;
  for (uint32_t i = 0; i < bytes; i++) block[index * bytes + i] = static_cast<uint8_t>(value >> (8 * (bytes - 1 - i)));
}

Status Refcounts::Load(std::shared_ptr<File> image, uint32_t clusterBits, uint32_t refcountOrder, uint64_t tableOffset,
                       uint64_t tableClusters, uint64_t fileSize, std::unique_ptr<Refcounts>* out) {
  std::unique_ptr<Refcounts> r(new Refcounts());
  r->clusterBits_ = clusterBits;
  r->clusterSize_ = 1ull << clusterBits;
  r->bits_ = 1u << refcountOrder;
  r->perBlock_ = r->clusterSize_ * 8 / r->bits_;
  r->maxValue_ = r->bits_ == 64 ? ~0ull : (1ull << r->bits_) - 1;
  const uint64_t bytes = tableClusters << clusterBits;
  if (tableClusters == 0 || bytes > kMaxTableBytes) {
    return Status::Error(kCorrupt, "the refcount table has " + std::to_string(tableClusters) +
                                       " clusters; it must have at least 1 and at most " +
                                       std::to_string(kMaxTableBytes >> clusterBits));
  }
  if ((tableOffset & (r->clusterSize_ - 1)) || tableOffset > fileSize || bytes > fileSize - tableOffset) {
    return Status::Error(kCorrupt, "the refcount table (" + std::to_string(bytes) + " bytes at offset " +
                                       std::to_string(tableOffset) + ") is unaligned or ends past the image file (" +
                                       std::to_string(fileSize) + " bytes)");
  }
  AlignedBuffer table(bytes);
  QCOW2_TRY(image->Read(table.data(), bytes, tableOffset));
  r->table_.resize(bytes / 8);
  for (uint64_t i = 0; i < r->table_.size(); i++) r->table_[i] = LoadBE64(table.data() + 8 * i);
  r->tableOffset_ = tableOffset;
  r->tableClusters_ = tableClusters;
  r->fileSize_ = fileSize;
  r->highWater_ = (fileSize + r->clusterSize_ - 1) >> clusterBits;
  r->image_ = std::move(image);
  *out = std::move(r);
  return Status::Ok();
}

void Refcounts::Track(std::shared_ptr<MetadataRanges> ranges) {
  ranges_ = std::move(ranges);
  ranges_->Add(kMetaRefcountTable, tableOffset_, tableClusters_ << clusterBits_);
  for (uint64_t raw : table_) {
    if (raw & kOffsetMask) ranges_->Add(kMetaRefcountBlock, raw & kOffsetMask, clusterSize_);
  }
}

Status Refcounts::LoadBlock(uint64_t index, Block** out) {
  auto it = blocks_.find(index);
  if (it != blocks_.end()) {
    *out = &it->second;
    return Status::Ok();
  }
  const uint64_t raw = table_[index];
  const uint64_t offset = raw & kOffsetMask;
  if ((raw & ~kOffsetMask) || (offset & (clusterSize_ - 1)) || offset + clusterSize_ > std::max(fileSize_, offset + 1)) {
    return Status::Error(kCorrupt, "refcount table entry " + std::to_string(index) + " (" + Hex(raw) +
                                       ") is unaligned, has reserved bits, or points past the image file (" +
                                       std::to_string(fileSize_) + " bytes)");
  }
  AlignedBuffer buffer(clusterSize_);
  QCOW2_TRY(image_->Read(buffer.data(), clusterSize_, offset));
  Block& block = blocks_[index];
  block.bytes.assign(buffer.data(), buffer.data() + clusterSize_);
  *out = &block;
  return Status::Ok();
}

Status Refcounts::MakeBlock(uint64_t index, Block** out) {
  if (index >= table_.size()) {
    QCOW2_TRY(GrowTable(index + 1));
    // Allocating the grown table's clusters may have made this very block already: keep its counts.
    if (table_[index] != 0) return LoadBlock(index, out);
  }
  if (index == 0) {
    // Cluster 0 holds the header and is never free: a table without its block is corrupt (and a
    // block placed there would leave the entry 0, "no block", for ever).
    return Status::Error(kCorrupt, "the refcount table has no block for cluster 0 (the header)");
  }
  *out = &PlaceBlock(index, index * perBlock_);
  SetRefcount((*out)->bytes.data(), bits_, 0, 1);
  return Status::Ok();
}

Refcounts::Block& Refcounts::PlaceBlock(uint64_t index, uint64_t cluster) {
  Block& block = blocks_[index];
  block.bytes.assign(clusterSize_, 0);
  block.Touch(0, clusterSize_);
  highWater_ = std::max(highWater_, cluster + 1);
  table_[index] = cluster << clusterBits_;
  newEntries_.push_back({index, cluster << clusterBits_});
  if (ranges_) ranges_->Add(kMetaRefcountBlock, cluster << clusterBits_, clusterSize_);
  fileSize_ = std::max(fileSize_, (cluster + 1) << clusterBits_);
  return block;
}

Status Refcounts::AllocateLong(uint64_t count, uint64_t* first) {
  for (;;) {
    // Past everything in use, the blocks describing the run go first, then the run: `k` clusters of
    // blocks, enough for the blocks missing over [start, start + k + count).
    const uint64_t start = highWater_;
    uint64_t k = 0;
    for (;;) {
      uint64_t missing = 0;
      for (uint64_t i = start / perBlock_; i <= (start + k + count - 1) / perBlock_; i++) {
        missing += i >= table_.size() || table_[i] == 0;
      }
      if (missing <= k) break;
      k = missing;
    }
    const uint64_t lastIndex = (start + k + count - 1) / perBlock_;
    if (lastIndex >= table_.size()) {
      // The grown table takes clusters of its own: plan again past them.
      QCOW2_TRY(GrowTable(lastIndex + 1));
      continue;
    }
    std::vector<uint64_t> placed;
    for (uint64_t i = start / perBlock_; i <= lastIndex; i++) {
      if (table_[i] != 0) continue;
      placed.push_back(start + placed.size());
      PlaceBlock(i, placed.back());
    }
    for (uint64_t c : placed) QCOW2_TRY(Add(c, 1));
    for (uint64_t c = start + k; c < start + k + count; c++) QCOW2_TRY(Add(c, 1));
    highWater_ = std::max(highWater_, start + k + count);
    fileSize_ = std::max(fileSize_, (start + k + count) << clusterBits_);
    *first = start + k;
    return Status::Ok();
  }
}

Status Refcounts::BlockFor(uint64_t cluster, bool create, Block** out) {
  const uint64_t index = cluster / perBlock_;
  *out = nullptr;
  if (index < table_.size() && table_[index] != 0) return LoadBlock(index, out);
  if (!create) return Status::Ok();
  return MakeBlock(index, out);
}

Status Refcounts::Get(uint64_t cluster, uint64_t* value) {
  Block* block = nullptr;
  QCOW2_TRY(BlockFor(cluster, false, &block));
  *value = block ? GetRefcount(block->bytes.data(), bits_, cluster % perBlock_) : 0;
  return Status::Ok();
}

Status Refcounts::Add(uint64_t cluster, int64_t delta) {
  Block* block = nullptr;
  QCOW2_TRY(BlockFor(cluster, delta > 0, &block));
  const uint64_t now = block ? GetRefcount(block->bytes.data(), bits_, cluster % perBlock_) : 0;
  const bool under = delta < 0 && now < static_cast<uint64_t>(-delta);
  const bool over = delta > 0 && maxValue_ - now < static_cast<uint64_t>(delta);
  if (!block || under || over) {
    return Status::Error(kCorrupt, "refcount of cluster " + std::to_string(cluster) + " is " + std::to_string(now) +
                                       "; adding " + std::to_string(delta) + " leaves the range 0.." +
                                       std::to_string(maxValue_));
  }
  const uint64_t value = now + static_cast<uint64_t>(delta);
  const uint64_t entry = cluster % perBlock_;
  SetRefcount(block->bytes.data(), bits_, entry, value);
  const uint64_t byte = entry * bits_ / 8;
  block->Touch(byte, byte + std::max<uint64_t>(bits_ / 8, 1));
  if (value == 0) cursor_ = std::min(cursor_, cluster);
  return Status::Ok();
}

Status Refcounts::Allocate(uint64_t count, uint64_t* first, bool* fresh) {
  // New blocks sit at the first cluster they describe, so fresh space holds no free run much longer
  // than half a block's reach: longer runs (large tables) are placed past the end with their blocks before them.
  if (count > std::max<uint64_t>(1, perBlock_ / 2)) {
    if (fresh) *fresh = true;
    return AllocateLong(count, first);
  }
  for (;;) {
    uint64_t start = cursor_, firstFree = UINT64_MAX;
    bool madeBlock = false;
    for (uint64_t c = start; c < start + count; c++) {
      const uint64_t index = c / perBlock_;
      Block* block = nullptr;
      if (index >= table_.size() || table_[index] == 0) {
        // A new block takes the first cluster it describes, which may fall in this run: search again.
        QCOW2_TRY(MakeBlock(index, &block));
        madeBlock = true;
        break;
      }
      QCOW2_TRY(LoadBlock(index, &block));
      if (GetRefcount(block->bytes.data(), bits_, c % perBlock_) != 0) {
        start = c + 1;
      } else {
        firstFree = std::min(firstFree, c);
      }
    }
    if (madeBlock) continue;
    for (uint64_t c = start; c < start + count; c++) QCOW2_TRY(Add(c, 1));
    cursor_ = firstFree < start ? firstFree : start + count;
    if (fresh) *fresh = start >= highWater_;
    highWater_ = std::max(highWater_, start + count);
    fileSize_ = std::max(fileSize_, (start + count) << clusterBits_);
    *first = start;
    return Status::Ok();
  }
}

Status Refcounts::AllocateUpTo(uint64_t most, uint64_t* first, uint64_t* got, bool* fresh) {
  for (;;) {
    uint64_t c = cursor_;
    Block* block = nullptr;
    bool madeBlock = false;
    for (;; c++) {
      const uint64_t index = c / perBlock_;
      if (index >= table_.size() || table_[index] == 0) {
        // A new block takes the first cluster it describes, which may be `c` itself: look again.
        QCOW2_TRY(MakeBlock(index, &block));
        madeBlock = true;
        break;
      }
      QCOW2_TRY(LoadBlock(index, &block));
      if (GetRefcount(block->bytes.data(), bits_, c % perBlock_) == 0) break;
    }
    if (madeBlock) continue;
    // The run ends where a cluster is in use or its block is missing (the next call makes that block).
    uint64_t n = 1;
    for (; n < most; n++) {
      const uint64_t index = (c + n) / perBlock_;
      if (index >= table_.size() || table_[index] == 0) break;
      QCOW2_TRY(LoadBlock(index, &block));
      if (GetRefcount(block->bytes.data(), bits_, (c + n) % perBlock_) != 0) break;
    }
    for (uint64_t i = c; i < c + n; i++) QCOW2_TRY(Add(i, 1));
    cursor_ = c + n;
    *fresh = c >= highWater_;
    highWater_ = std::max(highWater_, c + n);
    fileSize_ = std::max(fileSize_, (c + n) << clusterBits_);
    *first = c;
    *got = n;
    return Status::Ok();
  }
}

bool Refcounts::AllocatesInMemory(uint64_t count, uint64_t* end, bool* fresh) const {
  // A short look: the free clusters a small write needs lie right at the cursor in a busy image.
  constexpr uint64_t kMaxLook = 4096;
  *fresh = true;
  uint64_t found = 0;
  auto block = blocks_.end();
  for (uint64_t c = cursor_; found < count; c++) {
    if (c - cursor_ >= kMaxLook) return false;
    const uint64_t index = c / perBlock_;
    if (block == blocks_.end() || block->first != index) {
      if (index >= table_.size() || table_[index] == 0) return false;
      block = blocks_.find(index);
      if (block == blocks_.end()) return false;
    }
    if (GetRefcount(block->second.bytes.data(), bits_, c % perBlock_) != 0) continue;
    found++;
    *fresh = *fresh && c >= highWater_;
    *end = c + 1;
  }
  return true;
}

Status Refcounts::DropEmptyTail(uint64_t* end) {
  *end = 0;
  for (uint64_t i = table_.size(); i-- > 0;) {
    const uint64_t offset = table_[i] & kOffsetMask;
    if (offset == 0) continue;
    Block* block = nullptr;
    QCOW2_TRY(LoadBlock(i, &block));
    const uint64_t self = offset >> clusterBits_;
    const bool selfDescribed = self / perBlock_ == i;
    uint64_t last = 0;
    bool others = false;
    for (uint64_t j = perBlock_; j-- > 0;) {
      if (GetRefcount(block->bytes.data(), bits_, j) == 0) continue;
      if (last == 0) last = i * perBlock_ + j + 1;
      if (i * perBlock_ + j != self) {
        others = true;
        break;
      }
    }
    // A block counting nothing lies in space another block counts: that one says where the end is.
    if (last == 0) continue;
    if (selfDescribed && !others) {
      // A block that counts nothing but itself describes free space only: it leaves the table.
      table_[i] = 0;
      newEntries_.push_back({i, 0});
      blocks_.erase(i);
      if (ranges_) ranges_->Remove(kMetaRefcountBlock, offset, clusterSize_);
      continue;
    }
    *end = last;
    break;
  }
  highWater_ = std::min(highWater_, *end);
  fileSize_ = *end << clusterBits_;
  cursor_ = std::min(cursor_, *end);
  return Status::Ok();
}

Status Refcounts::GrowTable(uint64_t minEntries) {
  const uint64_t entriesPerCluster = clusterSize_ / 8;
  uint64_t clusters = std::max<uint64_t>(tableClusters_ * 2, (minEntries + entriesPerCluster - 1) / entriesPerCluster + 1);
  if ((clusters << clusterBits_) > kMaxTableBytes) {
    return Status::Error("ENOSPC", "the refcount table would need " + std::to_string(clusters) +
                                       " clusters, more than the limit of " + std::to_string(kMaxTableBytes >> clusterBits_));
  }
  // The old table stays in use until the header points at the new one; it is freed after that.
  // A table that grows again before any commit wrote it was never published: free it now.
  std::pair<uint64_t, uint64_t> unpublished{0, 0};
  if (!tableMoved_) oldTable_ = {tableOffset_ >> clusterBits_, tableClusters_};
  else unpublished = {tableOffset_ >> clusterBits_, tableClusters_};
  table_.resize(clusters * entriesPerCluster, 0);
  tableClusters_ = clusters;
  tableMoved_ = true;
  uint64_t at = 0;
  // The new table's clusters may need blocks of their own, which Allocate makes in the bigger table.
  QCOW2_TRY(Allocate(clusters, &at));
  tableOffset_ = at << clusterBits_;
  if (ranges_) {
    ranges_->Add(kMetaRefcountTable, tableOffset_, clusters << clusterBits_);
    ranges_->Remove(kMetaRefcountTable, unpublished.first << clusterBits_, unpublished.second << clusterBits_);
  }
  for (uint64_t c = unpublished.first; c < unpublished.first + unpublished.second; c++) QCOW2_TRY(Add(c, -1));
  return Status::Ok();
}

void Refcounts::TakeDirty(std::vector<RefcountBlockWrite>* blocks, std::vector<RefcountTableWrite>* entries) {
  // Only the pages that changed are written: a commit of a few allocations writes one small piece.
  const uint64_t page = std::min<uint64_t>(clusterSize_, 4096);
  for (auto& [index, block] : blocks_) {
    if (!block.dirty()) continue;
    const uint64_t from = block.dirtyFrom / page * page;
    const uint64_t to = std::min<uint64_t>((block.dirtyTo + page - 1) / page * page, clusterSize_);
    blocks->push_back({(table_[index] & kOffsetMask) + from,
                       std::vector<uint8_t>(block.bytes.begin() + from, block.bytes.begin() + to)});
    block.dirtyFrom = UINT64_MAX;
    block.dirtyTo = 0;
  }
  if (!tableMoved_) entries->insert(entries->end(), newEntries_.begin(), newEntries_.end());
  newEntries_.clear();
}

Status Refcounts::WriteTable(uint64_t* offset, uint64_t* clusters, std::pair<uint64_t, uint64_t>* old) {
  *old = {0, 0};
  *offset = tableOffset_;
  *clusters = tableClusters_;
  // Another commit wrote it first.
  if (!tableMoved_) return Status::Ok();
  const uint64_t bytes = tableClusters_ << clusterBits_;
  if (ranges_) QCOW2_TRY(ranges_->Check(tableOffset_, bytes, kMetaRefcountTable));
  AlignedBuffer buffer(bytes);
  for (uint64_t i = 0; i < table_.size(); i++) {
    const uint64_t be = __builtin_bswap64(table_[i]);
    __builtin_memcpy(buffer.data() + 8 * i, &be, 8);
  }
  QCOW2_TRY(image_->Write(buffer.data(), bytes, tableOffset_));
  *offset = tableOffset_;
  *clusters = tableClusters_;
  *old = oldTable_;
  tableMoved_ = false;
  return Status::Ok();
}

}  // namespace qcow2
