#include "qcow2/check.h"

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <utility>

#include "qcow2/bitmaps.h"
#include "qcow2/layout.h"
#include "qcow2/overlap.h"
#include "qcow2/refcounts.h"

namespace qcow2 {
namespace {

/// Reasons a check stops early, as qemu-img prints them after "Check failed: ".
constexpr const char* kIoError = "Input/output error";
constexpr const char* kInvalid = "Invalid argument";
/// The code of a Status that stops the check with its message as the reason.
constexpr const char* kCheckFailed = "ERR_QCOW2_CHECK_FAILED";
constexpr const char* kCorrupt = "ERR_QCOW2_CORRUPT";

/// Refcount table entry bits 0-8 are reserved.
constexpr uint64_t kReftableReservedMask = 0x1ffull;
/// qemu's bound on a snapshot's L1 table, in entries.
constexpr uint64_t kMaxL1Entries = kMaxL1Bytes / 8;
/// Reading L2 tables in groups of this many bytes keeps the disk busy without holding every table in memory.
constexpr size_t kL2BatchBytes = 4u << 20;

/// Most clusters a check counts: 512 MiB of 16-bit counts (a 16 TiB file of 64 KiB clusters).
constexpr uint64_t kMaxCountedClusters = 1ull << 28;
constexpr const char* kNoMemory = "Cannot allocate memory";

/// L2 tables per group: 64 of 64 KiB, 2 of 2 MiB.
size_t L2Batch(uint64_t clusterSize) { return std::max<size_t>(1, kL2BatchBytes / clusterSize); }

Status Stop(const char* reason) { return Status::Error(kCheckFailed, reason); }

/// The strerror text ending a failed system call's message ("File too large").
std::string ReasonOf(const Status& st) {
  const size_t at = st.message.rfind(": ");
  return at == std::string::npos ? kIoError : st.message.substr(at + 2);
}

std::string Format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
/// printf into a string of any length (snapshot names in messages can be long).
std::string Format(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  va_list again;
  va_copy(again, args);
  const int length = vsnprintf(nullptr, 0, fmt, args);
  va_end(args);
  std::string out(length > 0 ? length : 0, '\0');
  vsnprintf(out.data(), out.size() + 1, fmt, again);
  va_end(again);
  return out;
}

/// printf's %#x: "0" for zero, else 0x and the digits.
std::string AltHex(uint64_t v) { return v ? Format("0x%" PRIx64, v) : "0"; }

uint64_t DivUp(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

/// qemu's corruption events and overlap check. Repair writes onto metadata of another kind are
/// refused and the check stops. An event on a writable image marks it corrupt and makes it unusable
/// (refcount changes not yet written are lost, the double check cannot run); on a read-only one it
/// is only shown. Either way only the first event is shown.
class WriteGuard {
 public:
  WriteGuard(File& image, uint32_t clusterBits, const HeaderFields& fields, uint64_t incompatibleFeatures,
             bool writable, std::vector<std::string>* messages)
      : image_(image), ranges_(clusterBits), fields_(fields), features_(incompatibleFeatures), writable_(writable),
        messages_(messages) {}

  MetadataRanges& ranges() { return ranges_; }

  /// Ok when [offset, offset + bytes) overlaps no metadata outside `allowed`; otherwise the image is
  /// marked corrupt and the caller gets an error to stop with.
  Status Check(uint64_t offset, uint64_t bytes, uint32_t allowed) {
    Status st = ranges_.Check(offset, bytes, allowed);
    if (st.ok()) return st;
    const std::string prefix = "Marking image as corrupt: ";
    const size_t cut = st.message.find("): ");
    Signal(st.message.substr(prefix.size(), cut + 1 - prefix.size()));
    return Stop(kIoError);
  }

  /// A corruption event saying `what` (qemu's qcow2_signal_corruption).
  void Signal(const std::string& what) {
    if (signaled_ && (!writable_ || dead_)) return;
    signaled_ = true;
    if (!writable_) {
      messages_->push_back("qcow2: Image is corrupt: " + what + "; further non-fatal corruption events will be suppressed");
      return;
    }
    messages_->push_back("qcow2: Marking image as corrupt: " + what + "; further corruption events will be suppressed");
    dead_ = true;
    if (WriteIncompatibleFeatures(image_, fields_, features_ | 2).ok()) (void)image_.Flush();
  }

  /// A fatal event happened: qemu's image is unusable from here on.
  bool dead() const { return dead_; }

 private:
  File& image_;
  MetadataRanges ranges_;
  const HeaderFields& fields_;
  uint64_t features_;
  bool writable_;
  std::vector<std::string>* messages_;
  bool signaled_ = false;
  bool dead_ = false;
};

/// Run `work(i)` for i in [0, count) on a few threads (reads of independent tables).
template <typename Work>
void ParallelFor(size_t count, Work work) {
  if (count <= 1) {
    for (size_t i = 0; i < count; i++) work(i);
    return;
  }
  const size_t threads = std::min<size_t>(count, 8);
  std::vector<std::thread> pool;
  std::atomic<size_t> next{0};
  for (size_t t = 0; t < threads; t++) {
    pool.emplace_back([&] {
      for (size_t i = next++; i < count; i = next++) work(i);
    });
  }
  for (std::thread& t : pool) t.join();
}

/// Read the cluster-sized tables at `offsets` into `*out`, one after the other, in parallel.
Status ReadTables(File& image, const std::vector<uint64_t>& offsets, uint64_t clusterSize, std::vector<uint8_t>* out) {
  out->resize(offsets.size() * clusterSize);
  std::vector<Status> results(offsets.size());
  ParallelFor(offsets.size(), [&](size_t n) { results[n] = image.Read(out->data() + n * clusterSize, clusterSize, offsets[n]); });
  for (const Status& st : results) QCOW2_TRY(st);
  return Status::Ok();
}

/// Active L2 tables held from the walk for the COPIED pass, when they take at most this much memory.
constexpr uint64_t kMaxHeldL2Bytes = 64ull << 20;

/// The active L2 tables as the walk read (and repaired) them, so the COPIED pass need not read them again.
struct ActiveTables {
  /// Every active table is held (false: the COPIED pass reads them itself).
  bool complete = false;
  /// Slot of each L1 index whose table is held.
  std::unordered_map<uint64_t, size_t> slotOf;
  std::vector<uint64_t> offsets;
  std::vector<uint8_t> bytes;

  uint8_t* Table(size_t slot, uint64_t clusterSize) { return bytes.data() + slot * clusterSize; }
  /// A table was rewritten: every held copy of the table at `offset` becomes `table`.
  void Update(uint64_t offset, const uint8_t* table, uint64_t clusterSize) {
    for (size_t slot = 0; slot < offsets.size(); slot++) {
      uint8_t* copy = Table(slot, clusterSize);
      if (offsets[slot] == offset && copy != table) std::memcpy(copy, table, clusterSize);
    }
  }
};

/// How qemu classifies an L2 entry.
enum class EntryType { Compressed, ZeroPlain, ZeroAlloc, Normal, Unallocated };

EntryType TypeOf(uint64_t entry, bool extendedL2, bool dataFile) {
  if (entry & kCompressedFlag) return EntryType::Compressed;
  if ((entry & kZeroFlag) && !extendedL2) return (entry & kOffsetMask) ? EntryType::ZeroAlloc : EntryType::ZeroPlain;
  if (!(entry & kOffsetMask)) return dataFile && (entry & kCopiedFlag) ? EntryType::Normal : EntryType::Unallocated;
  return EntryType::Normal;
}

/// The refcounts stored in the image: the table, and its blocks as they are read (and repaired).
class StoredRefcounts {
 public:
  StoredRefcounts(File& image, const Geometry& g, uint32_t refcountOrder)
      : image_(image), g_(g), bits_(1u << refcountOrder), blockBits_(g.clusterBits + 3 - refcountOrder) {}

  Status Load(uint64_t tableOffset, uint64_t tableClusters) {
    std::vector<uint8_t> raw(tableClusters << g_.clusterBits);
    if (!raw.empty()) QCOW2_TRY(image_.Read(raw.data(), raw.size(), tableOffset));
    std::vector<uint64_t> table(raw.size() / 8);
    for (size_t i = 0; i < table.size(); i++) table[i] = LoadBE64(raw.data() + 8 * i);
    UseTable(std::move(table));
    return Status::Ok();
  }

  void UseTable(std::vector<uint64_t> table) {
    table_ = std::move(table);
    blocks_.clear();
    blocks_.resize(table_.size());
    last_ = nullptr;
    lastIndex_ = UINT64_MAX;
  }

  /// The stored refcount of `cluster`: 0 past the table or without a block; EIO for an unaligned block.
  Status Get(uint64_t cluster, uint64_t* value) {
    Block* block = nullptr;
    QCOW2_TRY(BlockOf(cluster, &block));
    *value = block ? GetRefcount(block->bytes.data(), bits_, cluster & ((1ull << blockBits_) - 1)) : 0;
    return Status::Ok();
  }

  /// Change a refcount in memory (its block must exist); WriteDirty() puts it on disk.
  Status Set(uint64_t cluster, uint64_t value) {
    Block* block = nullptr;
    QCOW2_TRY(BlockOf(cluster, &block));
    if (!block) return Stop(kIoError);
    SetRefcount(block->bytes.data(), bits_, cluster & ((1ull << blockBits_) - 1), value);
    block->dirty = true;
    return Status::Ok();
  }

  const std::vector<uint64_t>& table() const { return table_; }

  /// Write the changed blocks and flush: what depends on them is written after this.
  Status WriteDirty(WriteGuard* guard) {
    bool any = false;
    for (std::unique_ptr<Block>& block : blocks_) {
      if (!block || !block->dirty) continue;
      QCOW2_TRY(guard->Check(block->offset, block->bytes.size(), kMetaRefcountBlock));
      QCOW2_TRY(image_.Write(block->bytes.data(), block->bytes.size(), block->offset));
      block->dirty = false;
      any = true;
    }
    if (any) QCOW2_TRY(image_.Flush());
    return Status::Ok();
  }

  /// What the last failed Get() met, for a corruption event.
  const std::string& problem() const { return problem_; }

 private:
  struct Block {
    uint64_t offset = 0;
    std::vector<uint8_t> bytes;
    bool dirty = false;
  };

  Status BlockOf(uint64_t cluster, Block** out) {
    const uint64_t index = cluster >> blockBits_;
    if (index == lastIndex_) {
      *out = last_;
      return Status::Ok();
    }
    *out = nullptr;
    if (index >= table_.size()) return Remember(index, nullptr);
    const uint64_t offset = table_[index] & ~kReftableReservedMask;
    if (offset == 0) return Remember(index, nullptr);
    if (offset & (g_.clusterSize - 1)) {
      problem_ = Format("Refblock offset %s unaligned (reftable index: %s)", AltHex(offset).c_str(), AltHex(index).c_str());
      return Stop(kIoError);
    }
    std::unique_ptr<Block>& slot = blocks_[index];
    if (!slot) {
      auto block = std::make_unique<Block>();
      block->offset = offset;
      block->bytes.resize(g_.clusterSize);
      QCOW2_TRY(image_.Read(block->bytes.data(), g_.clusterSize, offset));
      slot = std::move(block);
    }
    *out = slot.get();
    return Remember(index, *out);
  }

  Status Remember(uint64_t index, Block* block) {
    lastIndex_ = index;
    last_ = block;
    return Status::Ok();
  }

  File& image_;
  Geometry g_;
  uint32_t bits_;
  uint32_t blockBits_;
  std::vector<uint64_t> table_;
  /// Loaded blocks by table index.
  std::vector<std::unique_ptr<Block>> blocks_;
  uint64_t lastIndex_ = UINT64_MAX;
  Block* last_ = nullptr;
  std::string problem_;
};

/// The one walker over every structure that references clusters (qemu's calculate_refcounts).
class Walker {
 public:
  /// `guard` checks the writes of repairs (null when `fix` is 0: nothing is written).
  /// `keep`, when given, receives the active L2 tables if they are few enough.
  Walker(File& image, const WalkRequest& r, uint32_t fix, WriteGuard* guard, ReferenceCounts* counts,
         CheckReport* report, ActiveTables* keep = nullptr)
      : image_(image), r_(r), g_(Geometry::Make(r.clusterBits, r.extendedL2, r.virtualSize)), fix_(fix),
        guard_(guard), counts_(counts), report_(report), keep_(keep) {}

  Status Run(bool countRefcountStructure, bool* rebuild) {
    QCOW2_TRY(image_.Size(&fileSize_));
    QCOW2_TRY(Inc(0, g_.clusterSize));
    QCOW2_TRY(WalkL1(r_.l1Offset, r_.l1Entries, true, true));
    if (r_.externalDataFile && !r_.snapshots.empty()) {
      Corruption(Format("ERROR %zu snapshots in image with data file", r_.snapshots.size()));
    }
    for (const SnapshotL1& s : r_.snapshots) {
      if (s.offset & (g_.clusterSize - 1)) {
        Corruption(Format("ERROR snapshot %s (%s) l1_offset=%s: L1 table is not cluster aligned; snapshot table entry "
                          "corrupted",
                          s.id.c_str(), s.name.c_str(), AltHex(s.offset).c_str()));
        continue;
      }
      if (s.entries > kMaxL1Entries) {
        Corruption(Format("ERROR snapshot %s (%s) l1_size=%s: L1 table is too large; snapshot table entry corrupted",
                          s.id.c_str(), s.name.c_str(), AltHex(s.entries).c_str()));
        continue;
      }
      QCOW2_TRY(WalkL1(s.offset, s.entries, false, false));
    }
    QCOW2_TRY(Inc(r_.snapshotsOffset, r_.snapshotsBytes));
    if (countRefcountStructure) QCOW2_TRY(Inc(r_.refcountTableOffset, r_.refcountTableClusters << g_.clusterBits));
    QCOW2_TRY(Inc(r_.cryptoOffset, r_.cryptoBytes));
    QCOW2_TRY(WalkBitmaps());
    if (countRefcountStructure) QCOW2_TRY(CheckRefcountBlocks(rebuild));
    return Status::Ok();
  }

 private:
  void Corruption(std::string message) {
    report_->corruptions++;
    report_->messages.push_back(std::move(message));
  }

  /// Count one reference to each cluster of [offset, offset + size), as qemu's check does: a range
  /// reaching a cluster or more past the end of the file is a corruption and is not counted.
  Status Inc(uint64_t offset, uint64_t size) {
    if (size == 0) return Status::Ok();
    const uint64_t end = offset + size;
    if (end < offset || (end > fileSize_ && end - fileSize_ >= g_.clusterSize)) {
      Corruption(Format("ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
                        "offset 0x%" PRIx64 " size 0x%" PRIx64,
                        offset, size));
      return Status::Ok();
    }
    const uint64_t first = offset >> g_.clusterBits, last = (end - 1) >> g_.clusterBits;
    if (last >= counts_->size()) counts_->Resize(last + 1);
    for (uint64_t k = first; k <= last; k++) {
      const uint64_t count = counts_->Get(k);
      if (count == counts_->max()) {
        Corruption(Format("ERROR: overflow cluster offset=0x%" PRIx64, k << g_.clusterBits));
        report_->messages.push_back(
            "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if "
            "the image cannot be opened for writing");
        continue;
      }
      counts_->Set(k, count + 1);
    }
    return Status::Ok();
  }

  Status ReadOrFail(void* buf, size_t len, uint64_t offset, const char* message) {
    Status st = image_.Read(buf, len, offset);
    if (st.ok()) return st;
    report_->messages.push_back(message);
    report_->checkErrors++;
    return Stop(kIoError);
  }

  Status WalkL1(uint64_t offset, uint64_t entries, bool fragInfo, bool active) {
    if (entries == 0) return Status::Ok();
    QCOW2_TRY(Inc(offset, entries * 8));
    std::vector<uint8_t> raw(entries * 8);
    QCOW2_TRY(ReadOrFail(raw.data(), raw.size(), offset, "ERROR: I/O error in check_refcounts_l1"));
    // The L2 tables are read a batch at a time ahead of the entries that name them.
    std::vector<uint64_t> pending, indices;
    for (uint64_t i = 0; i < entries; i++) {
      const uint64_t entry = LoadBE64(raw.data() + 8 * i);
      if (!entry) continue;
      pending.push_back(entry);
      indices.push_back(i);
    }
    const bool keep = active && keep_ && pending.size() * g_.clusterSize <= kMaxHeldL2Bytes;
    if (keep) keep_->complete = true;
    std::vector<uint8_t> tables;
    const size_t batch = L2Batch(g_.clusterSize);
    for (size_t start = 0; start < pending.size(); start += batch) {
      const size_t count = std::min(batch, pending.size() - start);
      QCOW2_TRY(ReadL2Batch(pending.data() + start, count, &tables));
      for (size_t n = 0; n < count; n++) {
        const uint64_t entry = pending[start + n];
        if (entry & kL1ReservedMask) {
          Corruption(Format("ERROR found L1 entry with reserved bits set: %" PRIx64, entry));
        }
        const uint64_t l2 = entry & kOffsetMask;
        QCOW2_TRY(Inc(l2, g_.clusterSize));
        if (l2 & (g_.clusterSize - 1)) {
          Corruption(Format("ERROR l2_offset=%" PRIx64 ": Table is not cluster aligned; L1 entry corrupted", l2));
        }
        bool repaired = false;
        QCOW2_TRY(WalkL2(l2, tables.data() + n * g_.clusterSize, fragInfo, active, &repaired));
        // A repaired table is what the later entries naming it read, as they would from disk.
        for (size_t later = n + 1; repaired && later < count; later++) {
          if ((pending[start + later] & kOffsetMask) != l2) continue;
          std::memcpy(tables.data() + later * g_.clusterSize, tables.data() + n * g_.clusterSize, g_.clusterSize);
        }
      }
      if (keep) Keep(indices.data() + start, pending.data() + start, count, tables);
    }
    return Status::Ok();
  }

  /// Hold a batch of active L2 tables for the COPIED pass.
  void Keep(const uint64_t* indices, const uint64_t* entries, size_t count, const std::vector<uint8_t>& tables) {
    for (size_t n = 0; n < count; n++) {
      keep_->slotOf[indices[n]] = keep_->offsets.size();
      keep_->offsets.push_back(entries[n] & kOffsetMask);
    }
    keep_->bytes.insert(keep_->bytes.end(), tables.begin(), tables.begin() + count * g_.clusterSize);
  }

  /// Read the L2 tables of `count` L1 entries into `*out`, one cluster each, in parallel.
  Status ReadL2Batch(const uint64_t* entries, size_t count, std::vector<uint8_t>* out) {
    std::vector<uint64_t> offsets(count);
    for (size_t n = 0; n < count; n++) offsets[n] = entries[n] & kOffsetMask;
    if (ReadTables(image_, offsets, g_.clusterSize, out).ok()) return Status::Ok();
    report_->messages.push_back("ERROR: I/O error in check_refcounts_l2");
    report_->checkErrors++;
    return Stop(kIoError);
  }

  Status WalkL2(uint64_t l2Offset, uint8_t* table, bool fragInfo, bool active, bool* repaired) {
    uint64_t nextContiguous = 0;
    const uint32_t shift = g_.CompressedOffsetBits();
    const uint64_t sizeMask = (1ull << (g_.clusterBits - 8)) - 1;
    const uint64_t offsetMask = (1ull << shift) - 1;
    for (uint64_t i = 0; i < g_.l2Entries(); i++) {
      uint8_t* at = table + i * g_.entryBytes;
      uint64_t entry = LoadBE64(at);
      const uint64_t bitmap = g_.extendedL2 ? LoadBE64(at + 8) : 0;
      if (entry == 0 && bitmap == 0) continue;
      const EntryType type = TypeOf(entry, g_.extendedL2, r_.externalDataFile);
      if (type != EntryType::Compressed && (entry & kL2ReservedMask)) {
        Corruption(Format("ERROR found l2 entry with reserved bits set: %" PRIx64, entry));
      }
      switch (type) {
        case EntryType::Compressed: {
          if (entry & kCopiedFlag) {
            Corruption(Format("ERROR: coffset=0x%" PRIx64 ": copied flag must never be set for compressed clusters",
                              entry & offsetMask));
            entry &= ~kCopiedFlag;
          }
          if (r_.externalDataFile) {
            Corruption(Format("ERROR compressed cluster %d with data file, entry=0x%" PRIx64, static_cast<int>(i), entry));
            break;
          }
          if (bitmap) {
            Corruption(Format("ERROR compressed cluster %d with non-zero subcluster allocation bitmap, entry=0x%" PRIx64,
                              static_cast<int>(i), entry));
            break;
          }
          const uint64_t coffset = entry & offsetMask;
          const uint64_t sectors = ((entry >> shift) & sizeMask) + 1;
          QCOW2_TRY(Inc(coffset, sectors * kSectorSize - (coffset & (kSectorSize - 1))));
          if (fragInfo) {
            report_->allocatedClusters++;
            report_->compressedClusters++;
            report_->fragmentedClusters++;
          }
          break;
        }
        case EntryType::ZeroAlloc:
        case EntryType::Normal: {
          const uint64_t offset = entry & kOffsetMask;
          if ((bitmap >> 32) & bitmap) {
            Corruption(Format("ERROR offset=%" PRIx64 ": Allocated cluster has corrupted subcluster allocation bitmap",
                              offset));
          }
          if (offset & (g_.clusterSize - 1)) {
            bool skip = false;
            QCOW2_TRY(Unaligned(l2Offset, i, at, entry, bitmap, active, &skip));
            if (skip) {
              *repaired = true;
              continue;
            }
          }
          if (fragInfo) {
            report_->allocatedClusters++;
            if (nextContiguous && offset != nextContiguous) report_->fragmentedClusters++;
            nextContiguous = offset + g_.clusterSize;
          }
          if (!r_.externalDataFile) QCOW2_TRY(Inc(offset, g_.clusterSize));
          break;
        }
        case EntryType::ZeroPlain:
          break;
        case EntryType::Unallocated:
          if (bitmap & 0xffffffffull) {
            Corruption("ERROR: Unallocated cluster has non-zero subcluster allocation map");
          }
          break;
      }
    }
    return Status::Ok();
  }

  /// An entry whose host offset is not cluster aligned: a corruption; with -r all, a preallocated
  /// (zero) one is made a plain zero entry and `*skip` says its cluster is no longer referenced.
  Status Unaligned(uint64_t l2Offset, uint64_t index, uint8_t* at, uint64_t entry, uint64_t bitmap, bool active,
                   bool* skip) {
    const uint64_t offset = entry & kOffsetMask;
    report_->corruptions++;
    const bool containsData = g_.extendedL2 ? (bitmap & 0xffffffffull) != 0 : !(entry & kZeroFlag);
    if (containsData) {
      report_->messages.push_back(
          Format("ERROR offset=%" PRIx64 ": Data cluster is not properly aligned; L2 entry corrupted.", offset));
      return Status::Ok();
    }
    const bool repair = fix_ & kFixErrors;
    report_->messages.push_back(Format("%s offset=%" PRIx64 ": Preallocated cluster is not properly aligned; L2 entry "
                                       "corrupted.",
                                       repair ? "Repairing" : "ERROR", offset));
    if (!repair) return Status::Ok();
    StoreBE64(at, g_.extendedL2 ? 0 : kZeroFlag);
    const uint64_t entryOffset = l2Offset + index * g_.entryBytes;
    if (!guard_->Check(entryOffset, g_.entryBytes, active ? uint32_t{kMetaActiveL2} : 0u).ok()) {
      report_->messages.push_back("ERROR: Overlap check failed");
      report_->checkErrors++;
      return Stop(kIoError);
    }
    Status st = image_.Write(at, g_.entryBytes, entryOffset);
    if (st.ok()) st = image_.Flush();
    if (!st.ok()) {
      report_->messages.push_back("ERROR: Failed to overwrite L2 table entry: " + std::string(kIoError));
      report_->checkErrors++;
      return Status::Ok();
    }
    report_->corruptions--;
    report_->corruptionsFixed++;
    *skip = true;
    return Status::Ok();
  }

  Status WalkBitmaps() {
    if (!r_.hasBitmaps) return Status::Ok();
    QCOW2_TRY(Inc(r_.bitmapDirectoryOffset, r_.bitmapDirectoryBytes));
    if (!r_.bitmapDirectoryValid) {
      report_->corruptions++;
      return Stop(kInvalid);
    }
    for (const BitmapTableRef& t : r_.bitmapTables) {
      QCOW2_TRY(Inc(t.offset, t.entries * 8));
      std::vector<uint8_t> raw(t.entries * 8);
      if (!raw.empty() && !image_.Read(raw.data(), raw.size(), t.offset).ok()) {
        report_->corruptions++;
        return Stop(kIoError);
      }
      std::vector<uint64_t> entries(t.entries);
      for (uint64_t i = 0; i < t.entries; i++) {
        entries[i] = LoadBE64(raw.data() + 8 * i);
        if (!ValidBitmapEntry(entries[i])) {
          report_->corruptions++;
          return Stop(kInvalid);
        }
      }
      for (uint64_t entry : entries) {
        const uint64_t offset = entry & kOffsetMask;
        if (offset) QCOW2_TRY(Inc(offset, g_.clusterSize));
      }
    }
    return Status::Ok();
  }

  bool ValidBitmapEntry(uint64_t entry) const {
    if (entry & kBitmapEntryReservedMask) return false;
    const uint64_t offset = entry & kBitmapEntryOffsetMask;
    return offset == 0 || (!(entry & kBitmapEntryAllOnes) && !(offset & (g_.clusterSize - 1)));
  }

  /// Every refcount block the table names must be aligned, inside the image and referenced once.
  Status CheckRefcountBlocks(bool* rebuild) {
    std::vector<uint8_t> raw(r_.refcountTableClusters << g_.clusterBits);
    if (!raw.empty()) QCOW2_TRY(image_.Read(raw.data(), raw.size(), r_.refcountTableOffset));
    for (uint64_t i = 0; i < raw.size() / 8; i++) {
      const uint64_t entry = LoadBE64(raw.data() + 8 * i);
      const uint64_t offset = entry & ~kReftableReservedMask;
      const uint64_t cluster = offset >> g_.clusterBits;
      if (entry & kReftableReservedMask) {
        Corruption(Format("ERROR refcount table entry %" PRId64 " has reserved bits set", i));
        *rebuild = true;
        continue;
      }
      if (offset & (g_.clusterSize - 1)) {
        Corruption(Format("ERROR refcount block %" PRId64 " is not cluster aligned; refcount table entry corrupted", i));
        *rebuild = true;
        continue;
      }
      if (cluster >= counts_->size()) {
        QCOW2_TRY(OutsideImage(i, offset, rebuild));
        continue;
      }
      if (offset == 0) continue;
      QCOW2_TRY(Inc(offset, g_.clusterSize));
      if (counts_->Get(cluster) != 1) {
        Corruption(Format("ERROR refcount block %" PRId64 " refcount=%" PRIu64, i, counts_->Get(cluster)));
        *rebuild = true;
      }
    }
    return Status::Ok();
  }

  /// A refcount block past the end of the image; -r all grows the file to hold it.
  Status OutsideImage(uint64_t index, uint64_t offset, bool* rebuild) {
    const bool repair = fix_ & kFixErrors;
    Corruption(Format("%s refcount block %" PRId64 " is outside image", repair ? "Repairing" : "ERROR", index));
    if (!repair) return Status::Ok();
    std::string reason = kInvalid;
    if (offset <= static_cast<uint64_t>(INT64_MAX) - g_.clusterSize) {
      Status st = image_.Truncate(offset + g_.clusterSize);
      if (!st.ok()) report_->messages.push_back("qcow2: Could not resize file: " + (reason = ReasonOf(st)));
      if (st.ok()) st = image_.Size(&fileSize_);
      if (st.ok()) reason.clear();
    }
    if (!reason.empty()) {
      *rebuild = true;
      report_->messages.push_back("ERROR could not resize image: " + reason);
      return Status::Ok();
    }
    counts_->Resize(std::max(counts_->size(), DivUp(fileSize_, g_.clusterSize)));
    report_->corruptions--;
    report_->corruptionsFixed++;
    return Inc(offset, g_.clusterSize);
  }

  File& image_;
  const WalkRequest& r_;
  Geometry g_;
  uint32_t fix_;
  WriteGuard* guard_;
  ReferenceCounts* counts_;
  CheckReport* report_;
  ActiveTables* keep_;
  uint64_t fileSize_ = 0;
};

/// The counters of a report, saved and restored around the comparison passes as qemu does.
struct Counters {
  uint64_t checkErrors, corruptions, leaks, corruptionsFixed, leaksFixed;
};

Counters Save(const CheckReport& r) { return {r.checkErrors, r.corruptions, r.leaks, r.corruptionsFixed, r.leaksFixed}; }

void Restore(CheckReport* r, const Counters& c) {
  r->checkErrors = c.checkErrors;
  r->corruptions = c.corruptions;
  r->leaks = c.leaks;
  r->corruptionsFixed = c.corruptionsFixed;
  r->leaksFixed = c.leaksFixed;
}

/// One pass of the check with repair (qemu's qcow2_check_refcounts and check_oflag_copied).
class Checker {
 public:
  Checker(File& image, const CheckRequest& request, CheckReport* report)
      : image_(image), req_(request), walk_(request.walk),
        g_(Geometry::Make(walk_.clusterBits, walk_.extendedL2, walk_.virtualSize)), report_(report),
        counts_(walk_.refcountOrder), stored_(image, g_, walk_.refcountOrder),
        guard_(image, walk_.clusterBits, walk_.header, request.incompatibleFeatures, request.fix != 0, &report->messages) {}

  Status Run() {
    uint64_t fileSize = 0;
    QCOW2_TRY(image_.Size(&fileSize));
    if (DivUp(fileSize, g_.clusterSize) > INT32_MAX) {
      // qemu's bound on the clusters a check counts (its reference array is indexed by int).
      report_->checkErrors++;
      return Stop("File too large");
    }
    report_->totalClusters = DivUp(walk_.virtualSize / kSectorSize * kSectorSize, g_.clusterSize);
    counts_.Resize(DivUp(fileSize, g_.clusterSize));
    QCOW2_TRY(stored_.Load(walk_.refcountTableOffset, walk_.refcountTableClusters));
    if (req_.fix) QCOW2_TRY(NoteMetadata());
    bool rebuild = false;
    QCOW2_TRY(Walker(image_, walk_, req_.fix, &guard_, &counts_, report_, &active_).Run(true, &rebuild));
    const Counters beforeCompare = Save(*report_);
    QCOW2_TRY(Compare(0, &rebuild));
    if (rebuild && (req_.fix & kFixErrors)) {
      QCOW2_TRY(Rebuild());
    } else if (req_.fix) {
      if (rebuild) {
        report_->messages.push_back("ERROR need to rebuild refcount structures");
        report_->checkErrors++;
        return Stop(kIoError);
      }
      if (report_->leaks || report_->corruptions) {
        Restore(report_, beforeCompare);
        QCOW2_TRY(Compare(req_.fix, &rebuild));
      }
    }
    // After a fatal event qemu's refcount cache is never written back.
    if (!guard_.dead()) QCOW2_TRY(stored_.WriteDirty(&guard_));
    QCOW2_TRY(CheckCopiedFlags());
    // qemu rewrites the snapshot table after the refcounts are repaired, so it may reuse freed clusters.
    if ((req_.fix & kFixErrors) && !req_.snapshotTable.bytes.empty() && !guard_.dead()) QCOW2_TRY(RewriteSnapshotTable());
    report_->imageEndOffset = (highest_ + 1) << g_.clusterBits;
    report_->unusable = guard_.dead();
    if (req_.fix && !report_->checkErrors && !report_->corruptions && !req_.otherCorruptions) {
      QCOW2_TRY(MarkCleanAndConsistent());
    }
    return Status::Ok();
  }

 private:
  /// Where the metadata lies as the image was opened, for the overlap check of repair writes.
  Status NoteMetadata() {
    MetadataRanges& r = guard_.ranges();
    r.Add(kMetaHeader, 0, g_.clusterSize);
    r.Add(kMetaActiveL1, walk_.l1Offset, walk_.l1Entries * 8);
    r.Add(kMetaRefcountTable, walk_.refcountTableOffset, walk_.refcountTableClusters << g_.clusterBits);
    r.Add(kMetaSnapshotTable, walk_.snapshotsOffset, walk_.snapshotsBytes);
    for (const SnapshotL1& s : walk_.snapshots) r.Add(kMetaInactiveL1, s.offset, s.entries * 8);
    std::vector<uint8_t> l1(walk_.l1Entries * 8);
    if (!l1.empty()) QCOW2_TRY(image_.Read(l1.data(), l1.size(), walk_.l1Offset));
    for (uint64_t i = 0; i < walk_.l1Entries; i++) {
      const uint64_t l2 = LoadBE64(l1.data() + 8 * i) & kOffsetMask;
      if (l2) r.Add(kMetaActiveL2, l2, g_.clusterSize);
    }
    NoteRefcountBlocks(kMetaRefcountBlock, true);
    if (walk_.hasBitmaps) r.Add(kMetaBitmapDirectory, walk_.bitmapDirectoryOffset, walk_.bitmapDirectoryBytes);
    return Status::Ok();
  }

  /// Add (or remove) the refcount blocks the loaded table names.
  void NoteRefcountBlocks(uint32_t kind, bool add) {
    for (uint64_t entry : stored_.table()) {
      const uint64_t offset = entry & ~kReftableReservedMask;
      if (!offset) continue;
      if (add) {
        guard_.ranges().Add(kind, offset, g_.clusterSize);
      } else {
        guard_.ranges().Remove(kind, offset, g_.clusterSize);
      }
    }
  }

  /// Stored refcounts against counted references (qemu's compare_refcounts).
  Status Compare(uint32_t fix, bool* rebuild) {
    highest_ = 0;
    for (uint64_t i = 0; i < counts_.size(); i++) {
      uint64_t stored = 0;
      Status st = stored_.Get(i, &stored);
      if (!st.ok()) {
        if (st.code != kCheckFailed) return st;
        guard_.Signal(stored_.problem());
        report_->messages.push_back(Format("Can't get refcount for cluster %" PRId64 ": %s", i, kIoError));
        report_->checkErrors++;
        continue;
      }
      const uint64_t counted = counts_.Get(i);
      if (stored || counted) highest_ = i;
      if (stored == counted) continue;
      uint64_t* fixed = nullptr;
      if (stored == 0) {
        *rebuild = true;
      } else if (stored > counted && (fix & kFixLeaks)) {
        fixed = &report_->leaksFixed;
      } else if (stored < counted && (fix & kFixErrors)) {
        fixed = &report_->corruptionsFixed;
      }
      report_->messages.push_back(Format("%s cluster %" PRId64 " refcount=%" PRIu64 " reference=%" PRIu64,
                                         fixed ? "Repairing" : stored < counted ? "ERROR" : "Leaked", i, stored,
                                         counted));
      if (fixed && stored_.Set(i, counted).ok()) {
        (*fixed)++;
        if (counted == 0) freed_.push_back(i);
        continue;
      }
      if (stored < counted) {
        report_->corruptions++;
      } else {
        report_->leaks++;
      }
    }
    return Status::Ok();
  }

  /// Replace the refcount structure by one built from the counts, then count and compare again.
  Status Rebuild() {
    const Counters before = Save(*report_);
    report_->messages.push_back("Rebuilding refcount structure");
    NewRefcountStructure made;
    auto checkWrite = [this](uint64_t offset, uint64_t bytes, const char* what) {
      Status st = guard_.Check(offset, bytes, 0);
      if (!st.ok()) {
        report_->messages.push_back(std::string("qcow2: ERROR writing ") + what + ": " + kIoError);
        report_->checkErrors++;
      }
      return st;
    };
    QCOW2_TRY(WriteRefcountStructure(image_, walk_, 0, &counts_, &made, checkWrite));
    guard_.ranges().Remove(kMetaRefcountTable, walk_.refcountTableOffset, walk_.refcountTableClusters << g_.clusterBits);
    NoteRefcountBlocks(kMetaRefcountBlock, false);
    walk_.refcountTableOffset = made.tableOffset;
    walk_.refcountTableClusters = made.tableClusters;
    QCOW2_TRY(stored_.Load(made.tableOffset, made.tableClusters));
    guard_.ranges().Add(kMetaRefcountTable, made.tableOffset, made.tableClusters << g_.clusterBits);
    NoteRefcountBlocks(kMetaRefcountBlock, true);
    report_->corruptions = 0;
    report_->leaks = 0;
    counts_.Clear();
    bool rebuild = false;
    QCOW2_TRY(Walker(image_, walk_, 0, &guard_, &counts_, report_).Run(true, &rebuild));
    uint64_t freshLeaks = 0;
    if (req_.fix & kFixLeaks) {
      const Counters saved = Save(*report_);
      Restore(report_, Counters{});
      QCOW2_TRY(Compare(kFixLeaks, &rebuild));
      if (rebuild) report_->messages.push_back("ERROR rebuilt refcount structure is still broken");
      freshLeaks = report_->leaks;
      Restore(report_, saved);
    }
    if (report_->corruptions < before.corruptions) report_->corruptionsFixed += before.corruptions - report_->corruptions;
    if (report_->leaks < before.leaks) report_->leaksFixed += before.leaks - report_->leaks;
    report_->leaks += freshLeaks;
    return Status::Ok();
  }

  /// COPIED must be set exactly where the refcount is 1, in the active L1 and L2 tables.
  Status CheckCopiedFlags() {
    bool repair = false;
    if (req_.fix & kFixErrors) {
      repair = true;
    } else if (req_.fix & kFixLeaks) {
      repair = !report_->checkErrors && !report_->corruptions && !report_->leaks;
    }
    std::vector<uint8_t> l1(walk_.l1Entries * 8);
    if (!l1.empty()) QCOW2_TRY(image_.Read(l1.data(), l1.size(), walk_.l1Offset));
    std::vector<uint64_t> indices;
    for (uint64_t i = 0; i < walk_.l1Entries; i++) {
      if (LoadBE64(l1.data() + 8 * i) & kOffsetMask) indices.push_back(i);
    }
    if (active_.complete) {
      for (uint64_t i : indices) {
        const size_t slot = active_.slotOf.at(i);
        uint8_t* l2 = active_.Table(slot, g_.clusterSize);
        bool rewritten = false;
        QCOW2_TRY(CheckCopiedFlagsAt(i, LoadBE64(l1.data() + 8 * i), l2, repair, &rewritten));
        if (rewritten) active_.Update(active_.offsets[slot], l2, g_.clusterSize);
      }
      return image_.Flush();
    }
    // The L2 tables are read a batch at a time, in parallel, ahead of the entries that name them.
    std::vector<uint8_t> tables;
    const size_t batch = L2Batch(g_.clusterSize);
    for (size_t start = 0; start < indices.size(); start += batch) {
      const size_t count = std::min(batch, indices.size() - start);
      std::vector<uint64_t> offsets(count);
      for (size_t n = 0; n < count; n++) offsets[n] = LoadBE64(l1.data() + 8 * indices[start + n]) & kOffsetMask;
      if (!ReadTables(image_, offsets, g_.clusterSize, &tables).ok()) {
        report_->messages.push_back(Format("ERROR: Could not read L2 table: %s", kIoError));
        report_->checkErrors++;
        return Stop(kIoError);
      }
      for (size_t n = 0; n < count; n++) {
        uint8_t* l2 = tables.data() + n * g_.clusterSize;
        bool rewritten = false;
        QCOW2_TRY(CheckCopiedFlagsAt(indices[start + n], LoadBE64(l1.data() + 8 * indices[start + n]), l2, repair,
                                     &rewritten));
        // A rewritten table is what the later entries naming it read, as they would from disk.
        for (size_t later = n + 1; rewritten && later < count; later++) {
          if (offsets[later] == offsets[n]) std::memcpy(tables.data() + later * g_.clusterSize, l2, g_.clusterSize);
        }
      }
    }
    return image_.Flush();
  }

  /// The COPIED flags of L1 entry `i` and of its L2 table `l2`; `*rewritten` when the table was written back.
  Status CheckCopiedFlagsAt(uint64_t i, uint64_t l1Entry, uint8_t* l2, bool repair, bool* rewritten) {
    const uint64_t l2Offset = l1Entry & kOffsetMask;
    uint64_t refcount = 0;
    if (!stored_.Get(l2Offset >> g_.clusterBits, &refcount).ok()) return Status::Ok();
    if ((refcount == 1) != ((l1Entry & kCopiedFlag) != 0)) {
      report_->corruptions++;
      report_->messages.push_back(Format("%s OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%" PRIx64
                                         " refcount=%" PRIu64,
                                         repair ? "Repairing" : "ERROR", static_cast<int>(i), l1Entry, refcount));
      if (repair) {
        uint8_t field[8];
        StoreBE64(field, refcount == 1 ? l1Entry | kCopiedFlag : l1Entry & ~kCopiedFlag);
        Status st = guard_.Check(walk_.l1Offset + 8 * i, 8, kMetaActiveL1);
        if (st.ok()) st = image_.Write(field, 8, walk_.l1Offset + 8 * i);
        if (!st.ok()) {
          report_->checkErrors++;
          return Stop(kIoError);
        }
        report_->corruptions--;
        report_->corruptionsFixed++;
      }
    }
    return CheckL2CopiedFlags(l2Offset, l2, repair, rewritten);
  }

  Status CheckL2CopiedFlags(uint64_t l2Offset, uint8_t* table, bool repair, bool* rewritten) {
    uint64_t dirty = 0;
    for (uint64_t j = 0; j < g_.l2Entries(); j++) {
      uint8_t* at = table + j * g_.entryBytes;
      const uint64_t entry = LoadBE64(at);
      const EntryType type = TypeOf(entry, g_.extendedL2, walk_.externalDataFile);
      if (type != EntryType::Normal && type != EntryType::ZeroAlloc) continue;
      uint64_t refcount = 1;
      if (!walk_.externalDataFile && !stored_.Get((entry & kOffsetMask) >> g_.clusterBits, &refcount).ok()) continue;
      if ((refcount == 1) == ((entry & kCopiedFlag) != 0)) continue;
      report_->corruptions++;
      report_->messages.push_back(Format("%s OFLAG_COPIED data cluster: l2_entry=%" PRIx64 " refcount=%" PRIu64,
                                         repair ? "Repairing" : "ERROR", entry, refcount));
      if (repair) {
        StoreBE64(at, refcount == 1 ? entry | kCopiedFlag : entry & ~kCopiedFlag);
        dirty++;
      }
    }
    if (!dirty) return Status::Ok();
    if (!guard_.Check(l2Offset, g_.clusterSize, kMetaActiveL2).ok()) {
      report_->messages.push_back(Format("ERROR: Could not write L2 table; metadata overlap check failed: %s", kIoError));
      report_->checkErrors++;
      return Stop(kIoError);
    }
    if (!image_.Write(table, g_.clusterSize, l2Offset).ok()) {
      report_->messages.push_back(Format("ERROR: Could not write L2 table: %s", kIoError));
      report_->checkErrors++;
      return Stop(kIoError);
    }
    report_->corruptions -= dirty;
    report_->corruptionsFixed += dirty;
    *rewritten = true;
    return Status::Ok();
  }

  /// Write the new snapshot table at the first free clusters (from cluster 0, as a fresh qemu
  /// allocation searches), point the header at it, then free the old table's clusters.
  Status RewriteSnapshotTable() {
    const SnapshotTableRewrite& t = req_.snapshotTable;
    const uint64_t clusters = DivUp(t.bytes.size(), g_.clusterSize);
    uint64_t start = 0, run = 0;
    for (uint64_t cluster = 0; run < clusters; cluster++) {
      uint64_t refcount = 0;
      QCOW2_TRY(stored_.Get(cluster, &refcount));
      if (refcount) {
        run = 0;
        start = cluster + 1;
      } else {
        run++;
      }
    }
    // A run past the refcount blocks cannot be counted (Set fails): the check then fails with EIO.
    for (uint64_t i = 0; i < clusters; i++) QCOW2_TRY(stored_.Set(start + i, 1));
    // Clusters the repair freed and the table now reuses must not be punched out at the end.
    freed_.erase(std::remove_if(freed_.begin(), freed_.end(), [&](uint64_t c) { return c >= start && c < start + clusters; }),
                 freed_.end());
    QCOW2_TRY(stored_.WriteDirty(&guard_));
    const uint64_t offset = start << g_.clusterBits;
    QCOW2_TRY(guard_.Check(offset, t.bytes.size(), 0));
    QCOW2_TRY(image_.Write(t.bytes.data(), t.bytes.size(), offset));
    QCOW2_TRY(image_.Flush());
    uint8_t fields[12];
    StoreBE32(fields, t.count);
    StoreBE64(fields + 4, offset);
    if (t.offsetField == t.countField + 4) {
      QCOW2_TRY(image_.Write(fields, sizeof fields, t.countField));
    } else {
      QCOW2_TRY(image_.Write(fields + 4, 8, t.offsetField));
      QCOW2_TRY(image_.Write(fields, 4, t.countField));
    }
    QCOW2_TRY(image_.Flush());
    guard_.ranges().Remove(kMetaSnapshotTable, walk_.snapshotsOffset, walk_.snapshotsBytes);
    guard_.ranges().Add(kMetaSnapshotTable, offset, t.bytes.size());
    if (walk_.snapshotsBytes == 0) return Status::Ok();
    const uint64_t end = DivUp(walk_.snapshotsOffset + walk_.snapshotsBytes, g_.clusterSize);
    for (uint64_t cluster = walk_.snapshotsOffset >> g_.clusterBits; cluster < end; cluster++) {
      uint64_t refcount = 0;
      // An old table cluster without a refcount is left alone, as qemu's failed free leaves it.
      if (!stored_.Get(cluster, &refcount).ok() || refcount == 0) continue;
      QCOW2_TRY(stored_.Set(cluster, refcount - 1));
      if (refcount == 1) freed_.push_back(cluster);
    }
    return stored_.WriteDirty(&guard_);
  }

  /// A clean repair clears the dirty and corrupt bits, after everything it wrote is durable.
  Status MarkCleanAndConsistent() {
    for (uint64_t cluster : freed_) {
      // Freed clusters give their space back, as qemu's discard of them does; failure is harmless.
      (void)image_.Allocate(AllocateMode::PunchHole, cluster << g_.clusterBits, g_.clusterSize);
    }
    const uint64_t cleared = req_.incompatibleFeatures & ~3ull;
    if (cleared == req_.incompatibleFeatures) return Status::Ok();
    QCOW2_TRY(image_.Flush());
    QCOW2_TRY(WriteIncompatibleFeatures(image_, walk_.header, cleared));
    return image_.Flush();
  }

  File& image_;
  const CheckRequest& req_;
  WalkRequest walk_;
  Geometry g_;
  CheckReport* report_;
  ReferenceCounts counts_;
  StoredRefcounts stored_;
  WriteGuard guard_;
  ActiveTables active_;
  uint64_t highest_ = 0;
  std::vector<uint64_t> freed_;
};

/// First-fit search for `count` clusters free in `counts` from `*firstFree`, growing the array
/// when the free run reaches its end; the clusters get a count of 1 (qemu's alloc_clusters_imrt).
uint64_t AllocateCounted(ReferenceCounts* counts, uint64_t count, uint64_t* firstFree) {
  uint64_t cluster = *firstFree, run = 0;
  bool firstGap = true;
  for (; cluster < counts->size() && run < count; cluster++) {
    if (counts->Get(cluster) == 0) {
      run++;
      if (firstGap) {
        *firstFree = cluster;
        firstGap = false;
      }
    } else {
      run = 0;
    }
  }
  if (run < count) counts->Resize(cluster + count - run);
  cluster -= run;
  for (uint64_t i = 0; i < count; i++) counts->Set(cluster + i, 1);
  return cluster;
}

/// Writes refcount blocks for the clusters counted in a range (qemu's rebuild_refcounts_write_refblocks).
class BlockWriter {
 public:
  BlockWriter(File& image, const Geometry& g, uint32_t refcountOrder, uint64_t searchFrom, ReferenceCounts* counts,
              const WriteCheck& checkWrite)
      : image_(image), g_(g), bits_(1u << refcountOrder), blockBits_(g.clusterBits + 3 - refcountOrder),
        searchFrom_(searchFrom), counts_(counts), checkWrite_(checkWrite), block_(g.clusterSize) {}

  /// Write the block of every cluster counted in [first, end); true when the table had to grow.
  Status Write(uint64_t first, uint64_t end, bool* grew) {
    *grew = false;
    uint64_t firstFree = searchFrom_;
    for (uint64_t cluster = first; cluster < end; cluster++) {
      if (!counts_->Get(cluster)) continue;
      const uint64_t index = cluster >> blockBits_;
      const uint64_t blockStart = index << blockBits_;
      uint64_t offset = index < table_.size() ? table_[index] : 0;
      if (!offset) {
        firstFree = std::max(firstFree, blockStart);
        offset = AllocateCounted(counts_, 1, &firstFree) << g_.clusterBits;
        if (index >= table_.size()) {
          table_.resize(DivUp((index + 1) * 8, g_.clusterSize) * g_.clusterSize / 8, 0);
          *grew = true;
        }
        table_[index] = offset;
      }
      std::memset(block_.data(), 0, block_.size());
      const uint64_t perBlock = 1ull << blockBits_;
      for (uint64_t k = 0; k < perBlock; k++) SetRefcount(block_.data(), bits_, k, counts_->Get(blockStart + k));
      if (checkWrite_) QCOW2_TRY(checkWrite_(offset, block_.size(), "refblock"));
      QCOW2_TRY(image_.Write(block_.data(), block_.size(), offset));
      cluster = blockStart + perBlock - 1;
    }
    return Status::Ok();
  }

  std::vector<uint64_t>& table() { return table_; }

 private:
  File& image_;
  Geometry g_;
  uint32_t bits_;
  uint32_t blockBits_;
  uint64_t searchFrom_;
  ReferenceCounts* counts_;
  const WriteCheck& checkWrite_;
  std::vector<uint64_t> table_;
  std::vector<uint8_t> block_;
};

}  // namespace

ReferenceCounts::ReferenceCounts(uint32_t refcountOrder) {
  const uint32_t bits = 1u << refcountOrder;
  narrow_ = bits <= 16;
  max_ = bits >= 32 ? UINT32_MAX : (1ull << bits) - 1;
}

void ReferenceCounts::Set(uint64_t cluster, uint64_t value) {
  if (cluster >= size_) Resize(cluster + 1);
  if (narrow_) {
    counts16_[cluster] = static_cast<uint16_t>(value);
  } else {
    counts32_[cluster] = static_cast<uint32_t>(value);
  }
}

void ReferenceCounts::Resize(uint64_t clusters) {
  // A hostile refcount table can make -r all grow the file to terabytes: stop short of exhausting memory.
  if (clusters > kMaxCountedClusters) throw std::bad_alloc();
  size_ = clusters;
  if (narrow_ && counts16_.size() < clusters) counts16_.resize(clusters, 0);
  if (!narrow_ && counts32_.size() < clusters) counts32_.resize(clusters, 0);
}

void ReferenceCounts::Clear() {
  std::fill(counts16_.begin(), counts16_.end(), 0);
  std::fill(counts32_.begin(), counts32_.end(), 0);
}

Status CountReferences(File& image, const WalkRequest& request, bool countRefcountStructure, ReferenceCounts* counts,
                       CheckReport* report, bool* rebuild) {
  try {
    return Walker(image, request, 0, nullptr, counts, report).Run(countRefcountStructure, rebuild);
  } catch (const std::bad_alloc&) {
    return Status::Error("ENOMEM", std::string("counting the references of the image: ") + kNoMemory);
  }
}

Status WriteRefcountStructure(File& image, const WalkRequest& request, uint64_t searchFrom, ReferenceCounts* counts,
                              NewRefcountStructure* out, const WriteCheck& checkWrite) {
  const Geometry g = Geometry::Make(request.clusterBits, request.extendedL2, request.virtualSize);
  BlockWriter writer(image, g, request.refcountOrder, searchFrom, counts, checkWrite);
  bool grew = false;
  QCOW2_TRY(writer.Write(0, counts->size(), &grew));
  uint64_t tableCluster = 0, tableClusters = 0;
  // Placing the table changes the counts its blocks hold, which may grow the table: repeat until it fits.
  do {
    tableClusters = DivUp(writer.table().size() * 8, g.clusterSize);
    uint64_t firstFree = searchFrom;
    tableCluster = AllocateCounted(counts, tableClusters, &firstFree);
    QCOW2_TRY(writer.Write(tableCluster, tableCluster + tableClusters, &grew));
  } while (grew);
  std::vector<uint8_t> table(tableClusters * g.clusterSize, 0);
  for (size_t i = 0; i < writer.table().size(); i++) StoreBE64(table.data() + 8 * i, writer.table()[i]);
  if (checkWrite) QCOW2_TRY(checkWrite(tableCluster << g.clusterBits, table.size(), "reftable"));
  QCOW2_TRY(image.Write(table.data(), table.size(), tableCluster << g.clusterBits));
  // The blocks and table are durable before the header points at them.
  QCOW2_TRY(image.Flush());
  QCOW2_TRY(WriteRefcountTableFields(image, request.header, tableCluster << g.clusterBits, tableClusters));
  QCOW2_TRY(image.Flush());
  out->tableOffset = tableCluster << g.clusterBits;
  out->tableClusters = tableClusters;
  return Status::Ok();
}

Status CheckImage(File& image, const CheckRequest& request, CheckReport* report) {
  if (request.walk.clusterBits < 9 || request.walk.clusterBits > 21 || request.walk.refcountOrder > 6) {
    return Status::Error(kCorrupt, "cluster bits " + std::to_string(request.walk.clusterBits) + " or refcount order " +
                                       std::to_string(request.walk.refcountOrder) + " is outside 9..21 / 0..6");
  }
  Checker checker(image, request, report);
  Status st;
  try {
    st = checker.Run();
  } catch (const std::bad_alloc&) {
    report->checkErrors++;
    st = Stop(kNoMemory);
  }
  if (st.code == kCheckFailed) {
    report->failure = st.message;
    return Status::Ok();
  }
  if (!st.ok()) report->failure = kIoError;
  return Status::Ok();
}

}  // namespace qcow2
