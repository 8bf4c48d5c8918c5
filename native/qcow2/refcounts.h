// Cluster reference counts: the refcount table and its blocks, held in memory once loaded,
// encoded for every width the spec allows (1 to 64 bits), and the cluster allocator built on
// them. Not thread-safe: the engine calls it under its metadata mutex only.
#pragma once
#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "file.h"
#include "qcow2/overlap.h"
#include "status.h"

namespace qcow2 {

/// The changed part of a refcount block as the next commit writes it: a copy of its bytes and where they go.
struct RefcountBlockWrite {
  uint64_t offset;
  std::vector<uint8_t> bytes;
};

/// Refcount table entries that point at blocks made since the last commit.
struct RefcountTableWrite {
  uint64_t index;
  uint64_t blockOffset;
};

/// Refcount `index` of a block of `bits`-wide entries: sub-byte widths pack from the low bits of
/// each byte, wider ones are big-endian (the one place refcount entries are encoded).
uint64_t GetRefcount(const uint8_t* block, uint32_t bits, uint64_t index);
void SetRefcount(uint8_t* block, uint32_t bits, uint64_t index, uint64_t value);

/// The refcounts of one image file.
class Refcounts {
 public:
  /// Load the table (`tableClusters` clusters at `tableOffset`) after checking it lies in the file.
  static Status Load(std::shared_ptr<File> image, uint32_t clusterBits, uint32_t refcountOrder, uint64_t tableOffset,
                     uint64_t tableClusters, uint64_t fileSize, std::unique_ptr<Refcounts>* out);

  /// Note the table and every block in `ranges`, and keep noting the ones made from now on.
  void Track(std::shared_ptr<MetadataRanges> ranges);
  Status Get(uint64_t cluster, uint64_t* value);
  /// Add `delta` to the refcount of `cluster`; going below 0 or past the width is ERR_QCOW2_CORRUPT.
  Status Add(uint64_t cluster, int64_t delta);
  /// Find `count` contiguous free clusters (no blocks missing, refcounts 0), set each to 1 and
  /// return the first. Refcount blocks and a larger table are made as needed (the table grows
  /// through `growTable`, which the engine runs with its own ordering and barriers).
  /// `*fresh` says the clusters lie past everything the file ever held: they read as zeros.
  Status Allocate(uint64_t count, uint64_t* first, bool* fresh = nullptr);
  /// Allocate the first free clusters, as many (up to `most`) as lie contiguous there: `*got` of them
  /// from `*first`; `*fresh` as for Allocate(). Fills holes that a run of `most` would skip.
  Status AllocateUpTo(uint64_t most, uint64_t* first, uint64_t* got, bool* fresh);
  /// Whether the next `count` clusters AllocateUpTo() hands out come from blocks in memory, without
  /// making any (so without I/O): then `*end` is the cluster after the last of them, and `*fresh`
  /// says they all lie past everything the file ever held. False when that is not known cheaply.
  bool AllocatesInMemory(uint64_t count, uint64_t* end, bool* fresh) const;
  /// Drop the blocks at the top that count only themselves, and say where the clusters in use end
  /// (`*end`, in clusters): what a shrunk image's file keeps.
  Status DropEmptyTail(uint64_t* end);
  /// Take the dirty blocks and new table entries for the next commit, marking them clean.
  void TakeDirty(std::vector<RefcountBlockWrite>* blocks, std::vector<RefcountTableWrite>* entries);
  /// A table grown in memory that must be written and flushed before the header points at it.
  bool tableMoved() const { return tableMoved_; }
  /// Write the grown table to disk (the caller flushes, then updates the header, then frees `*old`).
  Status WriteTable(uint64_t* offset, uint64_t* clusters, std::pair<uint64_t, uint64_t>* old);
  uint64_t clusterSize() const { return clusterSize_; }
  /// Clusters one refcount block describes.
  uint64_t perBlock() const { return perBlock_; }
  /// Clusters below this index may be in use (the file's size at load, and every allocation since).
  uint64_t highWater() const { return highWater_; }
  /// The largest refcount an entry can hold.
  uint64_t maxValue() const { return maxValue_; }

 private:
  Refcounts() = default;
  /// A loaded block; [dirtyFrom, dirtyTo) are the bytes changed since the last commit took it.
  struct Block {
    std::vector<uint8_t> bytes;
    uint64_t dirtyFrom = UINT64_MAX;
    uint64_t dirtyTo = 0;
    bool dirty() const { return dirtyFrom < dirtyTo; }
    void Touch(uint64_t from, uint64_t to) {
      dirtyFrom = std::min(dirtyFrom, from);
      dirtyTo = std::max(dirtyTo, to);
    }
  };
  /// The block holding `cluster`'s refcount; nullptr when the table has no block for it.
  Status BlockFor(uint64_t cluster, bool create, Block** out);
  Status LoadBlock(uint64_t index, Block** out);
  /// Make the missing block `index`, placed at the first cluster it describes (free, since no block counts it).
  Status MakeBlock(uint64_t index, Block** out);
  /// Make the missing block `index` at host cluster `cluster`, with no counts yet (not even its own).
  Block& PlaceBlock(uint64_t index, uint64_t cluster);
  /// Allocate a run longer than fresh space between blocks holds: past the end, its blocks just before it.
  Status AllocateLong(uint64_t count, uint64_t* first);
  Status GrowTable(uint64_t minEntries);

  std::shared_ptr<File> image_;
  std::shared_ptr<MetadataRanges> ranges_;
  uint32_t clusterBits_ = 16;
  uint64_t clusterSize_ = 0;
  uint32_t bits_ = 16;
  uint64_t perBlock_ = 0;
  uint64_t maxValue_ = 0;
  std::vector<uint64_t> table_;
  uint64_t tableOffset_ = 0;
  uint64_t tableClusters_ = 0;
  bool tableMoved_ = false;
  std::pair<uint64_t, uint64_t> oldTable_{0, 0};
  std::map<uint64_t, Block> blocks_;
  std::vector<RefcountTableWrite> newEntries_;
  uint64_t fileSize_ = 0;
  /// Where the search for free clusters starts: nothing below it is known to be free.
  uint64_t cursor_ = 0;
  /// Clusters from here on were never written: past the file's end at open and never allocated since.
  uint64_t highWater_ = 0;
};

}  // namespace qcow2
