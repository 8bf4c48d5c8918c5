// Internal snapshots in the engine: the references of an L1 table are counted by the check's walker,
// added or dropped through the engine's refcount cache, the COPIED flags of the active tables are made
// exact again, and the snapshot table (encoded in TypeScript) is put in place. Each step is durable
// before the one that depends on it, so that a crash leaves at most leaked clusters behind.
#include <cstring>
#include <mutex>
#include <shared_mutex>
#include <utility>
#include <vector>

#include "buffer.h"
#include "qcow2/check.h"
#include "qcow2/engine.h"
#include "qcow2/layout.h"

namespace qcow2 {
namespace {

constexpr const char* kCorrupt = "ERR_QCOW2_CORRUPT";
constexpr const char* kInvalidArgument = "ERR_QCOW2_INVALID_ARGUMENT";

uint64_t DivUp(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

/// Clusters [first, first + length) each referenced `count` times by one L1 table.
struct ReferenceRun {
  uint64_t first;
  uint64_t length;
  uint64_t count;
};

/// References one L1 table makes, as runs of clusters with the same count, ascending (a disk
/// written front to back is a handful of runs, however large).
using References = std::vector<ReferenceRun>;

}  // namespace

/// The steps of a snapshot change, run by Engine::ChangeSnapshots with every request held out.
class SnapshotOps {
 public:
  explicit SnapshotOps(Engine& engine) : e_(engine), g_(engine.geometry()) {}

  Status Create(const SnapshotChange& c, SnapshotChangeResult* out) {
    References refs;
    QCOW2_TRY(Count(e_.config_.l1TableOffset, e_.mapper_->l1Entries(), false, &refs));
    if (c.l1OffsetAt > c.table.size() || c.table.size() - c.l1OffsetAt < 8) {
      return Status::Error(kInvalidArgument, "the new snapshot's L1 offset at byte " + std::to_string(c.l1OffsetAt) +
                                                 " lies outside the " + std::to_string(c.table.size()) + " byte table");
    }
    {
      std::lock_guard<std::mutex> lock(e_.metaMu_);
      QCOW2_TRY(CheckChange(refs, 1));
    }
    // From here on a failure may leave the in-memory state ahead of the disk: the engine stops writing.
    return e_.Fail(CreateChecked(c, refs, out));
  }

  Status Delete(const SnapshotChange& c, SnapshotChangeResult* out) {
    References refs;
    QCOW2_TRY(Count(c.l1Offset, c.l1Entries, true, &refs));
    {
      std::lock_guard<std::mutex> lock(e_.metaMu_);
      QCOW2_TRY(CheckChange(refs, -1));
    }
    return e_.Fail(DeleteChecked(c, refs, out));
  }

  Status Apply(const SnapshotChange& c) {
    References gained, lost;
    QCOW2_TRY(Count(c.l1Offset, c.l1Entries, false, &gained));
    QCOW2_TRY(Count(e_.config_.l1TableOffset, e_.mapper_->l1Entries(), false, &lost));
    {
      std::lock_guard<std::mutex> lock(e_.metaMu_);
      QCOW2_TRY(CheckChange(gained, 1));
      // Checked against today's counts: adding first only makes room.
      QCOW2_TRY(CheckChange(lost, -1));
    }
    return e_.Fail(ApplyChecked(c, gained, lost));
  }

 private:
  Status CreateChecked(const SnapshotChange& c, const References& refs, SnapshotChangeResult* out) {
    const uint64_t l1Entries = e_.mapper_->l1Entries();
    uint64_t l1Offset = 0, tableOffset = 0;
    {
      std::lock_guard<std::mutex> lock(e_.metaMu_);
      QCOW2_TRY(AddAll(refs));
      if (l1Entries > 0) QCOW2_TRY(Allocate(l1Entries * 8, &l1Offset));
      QCOW2_TRY(Allocate(c.table.size(), &tableOffset));
    }
    QCOW2_TRY(WriteRefcounts());
    // Every cluster the active tables reach now has a second reference: no COPIED flag stays.
    QCOW2_TRY(UpdateCopiedFlags());
    if (l1Entries > 0) {
      AlignedBuffer l1(l1Entries * 8);
      for (uint64_t i = 0; i < l1Entries; i++) StoreBE64(l1.data() + 8 * i, e_.mapper_->L1Raw(i));
      QCOW2_TRY(e_.Guard(l1Offset, l1Entries * 8));
      QCOW2_TRY(e_.image_->Write(l1.data(), l1Entries * 8, l1Offset));
    }
    std::vector<uint8_t> table = c.table;
    StoreBE64(table.data() + c.l1OffsetAt, l1Offset);
    QCOW2_TRY(WriteTable(table, tableOffset));
    QCOW2_TRY(PointHeader(c, tableOffset));
    std::vector<std::pair<uint64_t, uint64_t>> l1s = c.keptL1s;
    l1s.emplace_back(l1Offset, l1Entries);
    QCOW2_TRY(Retrack(l1s, tableOffset, c.table.size()));
    QCOW2_TRY(FreeOldTable(c));
    out->l1Offset = l1Offset;
    out->tableOffset = tableOffset;
    return Status::Ok();
  }

  Status DeleteChecked(const SnapshotChange& c, const References& refs, SnapshotChangeResult* out) {
    uint64_t tableOffset = 0;
    if (c.count > 0) {
      {
        std::lock_guard<std::mutex> lock(e_.metaMu_);
        QCOW2_TRY(Allocate(c.table.size(), &tableOffset));
      }
      QCOW2_TRY(WriteRefcounts());
      QCOW2_TRY(WriteTable(c.table, tableOffset));
    }
    QCOW2_TRY(PointHeader(c, tableOffset));
    // The snapshot is gone from the disk: its references can go (a crash from here on only leaks).
    QCOW2_TRY(Retrack(c.keptL1s, tableOffset, c.count > 0 ? c.table.size() : 0));
    QueueFrees(refs);
    QCOW2_TRY(FreeOldTable(c));
    // Clusters the active tables share with it alone are theirs again.
    QCOW2_TRY(UpdateCopiedFlags());
    out->tableOffset = tableOffset;
    return Status::Ok();
  }

  Status ApplyChecked(const SnapshotChange& c, const References& gained, const References& lost) {
    {
      std::lock_guard<std::mutex> lock(e_.metaMu_);
      QCOW2_TRY(AddAll(gained));
    }
    QCOW2_TRY(WriteRefcounts());
    if (c.l1Entries > e_.mapper_->l1Entries()) QCOW2_TRY(e_.GrowL1(c.l1Entries));
    const uint64_t entries = e_.mapper_->l1Entries();
    AlignedBuffer l1(entries * 8);
    std::memset(l1.data(), 0, entries * 8);
    if (c.l1Entries > 0) QCOW2_TRY(e_.image_->ReadExact(l1.data(), c.l1Entries * 8, c.l1Offset));
    // The snapshot's flags are stale; the clusters it reaches are shared with it now, so none is set.
    for (uint64_t i = 0; i < entries; i++) StoreBE64(l1.data() + 8 * i, LoadBE64(l1.data() + 8 * i) & ~kCopiedFlag);
    if (entries > 0) {
      QCOW2_TRY(e_.Guard(e_.config_.l1TableOffset, entries * 8, kMetaActiveL1));
      QCOW2_TRY(e_.image_->Write(l1.data(), entries * 8, e_.config_.l1TableOffset));
      QCOW2_TRY(e_.image_->Flush());
    }
    for (uint64_t i = 0; i < entries; i++) e_.mapper_->SetL1(i, LoadBE64(l1.data() + 8 * i));
    e_.cache().Clear();
    std::vector<std::pair<uint64_t, uint64_t>> l1s = c.keptL1s;
    QCOW2_TRY(Retrack(l1s, c.oldTableOffset, c.oldTableBytes));
    QueueFrees(lost);
    QCOW2_TRY(e_.Flush());
    return UpdateCopiedFlags();
  }

  /// The references the L1 table at `l1Offset` makes, counted by the check's walker; the header's
  /// reference is left out, and so is the L1 table's own unless `withL1` (it goes with the snapshot).
  Status Count(uint64_t l1Offset, uint64_t l1Entries, bool withL1, References* out) {
    WalkRequest walk;
    walk.clusterBits = g_.clusterBits;
    walk.refcountOrder = e_.config_.refcountOrder;
    walk.extendedL2 = g_.extendedL2;
    walk.virtualSize = g_.virtualSize;
    walk.l1Offset = l1Offset;
    walk.l1Entries = l1Entries;
    walk.header = e_.config_.header;
    uint64_t fileSize = 0;
    QCOW2_TRY(e_.image_->Size(&fileSize));
    ReferenceCounts counts(walk.refcountOrder);
    CheckReport report;
    bool rebuild = false;
    Status st;
    try {
      counts.Resize(DivUp(fileSize, g_.clusterSize));
      st = CountReferences(*e_.image_, walk, false, &counts, &report, &rebuild);
    } catch (const std::bad_alloc&) {
      return Status::Error("ENOMEM", "counting the references of the L1 table at " + std::to_string(l1Offset) + ": out of memory");
    }
    if (!st.ok() || report.corruptions > 0 || report.checkErrors > 0) {
      const std::string why = !report.messages.empty() ? report.messages.front() : st.message;
      return Status::Error(kCorrupt, "the L1 table at " + std::to_string(l1Offset) + " (" + std::to_string(l1Entries) +
                                         " entries) cannot be walked: " + why);
    }
    const uint64_t l1First = l1Offset >> g_.clusterBits;
    const uint64_t l1Last = l1Entries > 0 ? (l1Offset + l1Entries * 8 - 1) >> g_.clusterBits : 0;
    for (uint64_t k = 0; k < counts.size(); k++) {
      uint64_t n = counts.Get(k);
      if (k == 0 && n > 0) n--;
      if (!withL1 && l1Entries > 0 && k >= l1First && k <= l1Last && n > 0) n--;
      if (n == 0) continue;
      if (!out->empty() && out->back().first + out->back().length == k && out->back().count == n) {
        out->back().length++;
      } else {
        out->push_back({k, 1, n});
      }
    }
    return Status::Ok();
  }

  /// Add every reference of `refs` to the refcounts; under metaMu_, after CheckChange().
  Status AddAll(const References& refs) {
    for (const ReferenceRun& run : refs) {
      for (uint64_t k = run.first; k < run.first + run.length; k++) QCOW2_TRY(e_.refcounts_->Add(k, static_cast<int64_t>(run.count)));
    }
    return Status::Ok();
  }

  /// Every refcount can take `sign` × its references (checked before anything changes); under metaMu_.
  Status CheckChange(const References& refs, int sign) {
    const uint64_t max = e_.refcounts_->maxValue();
    for (const ReferenceRun& run : refs) {
      for (uint64_t cluster = run.first; cluster < run.first + run.length; cluster++) {
        QCOW2_TRY(CheckOne(cluster, run.count, sign, max));
      }
    }
    return Status::Ok();
  }

  Status CheckOne(uint64_t cluster, uint64_t count, int sign, uint64_t max) {
    uint64_t now = 0;
    QCOW2_TRY(e_.refcounts_->Get(cluster, &now));
    if (sign > 0 && max - now < count) {
      return Status::Error("EINVAL", "cluster " + std::to_string(cluster) + " has refcount " + std::to_string(now) + "; " +
                                         std::to_string(count) + " more references pass the largest refcount the image holds, " +
                                         std::to_string(max));
    }
    if (sign < 0 && now < count) {
      return Status::Error(kCorrupt, "cluster " + std::to_string(cluster) + " has refcount " + std::to_string(now) + " but " +
                                         std::to_string(count) + " references to drop");
    }
    return Status::Ok();
  }

  /// `bytes` of new clusters for a structure; under metaMu_.
  Status Allocate(uint64_t bytes, uint64_t* offset) {
    uint64_t first = 0;
    const uint64_t clusters = DivUp(bytes, g_.clusterSize);
    QCOW2_TRY(e_.refcounts_->Allocate(clusters, &first));
    *offset = first << g_.clusterBits;
    QCOW2_TRY(e_.Guard(*offset, clusters << g_.clusterBits));
    e_.mapper_->NoteFileSize(*offset + (clusters << g_.clusterBits));
    return Status::Ok();
  }

  Status WriteRefcounts() {
    QCOW2_TRY(e_.WriteRefcountChanges());
    return e_.image_->Flush();
  }

  Status WriteTable(const std::vector<uint8_t>& table, uint64_t offset) {
    QCOW2_TRY(e_.image_->Write(table.data(), table.size(), offset));
    return e_.image_->Flush();
  }

  /// nb_snapshots and snapshots_offset in one write: a crash never pairs a count with the other table.
  Status PointHeader(const SnapshotChange& c, uint64_t tableOffset) {
    uint8_t fields[12];
    StoreBE32(fields, c.count);
    StoreBE64(fields + 4, tableOffset);
    return e_.WriteHeaderField(c.countField, fields, sizeof fields);
  }

  /// The overlap guard learns where the snapshot structures are now (before anything is freed).
  Status Retrack(const std::vector<std::pair<uint64_t, uint64_t>>& l1s, uint64_t tableOffset, uint64_t tableBytes) {
    std::vector<EngineConfig::Structure> structures;
    for (const EngineConfig::Structure& s : e_.config_.structures) {
      if (s.kind != kMetaSnapshotTable && s.kind != kMetaInactiveL1) structures.push_back(s);
    }
    if (tableBytes > 0) structures.push_back({kMetaSnapshotTable, tableOffset, tableBytes});
    for (const auto& [offset, entries] : l1s) {
      if (entries > 0) structures.push_back({kMetaInactiveL1, offset, entries * 8});
    }
    std::lock_guard<std::mutex> lock(e_.metaMu_);
    e_.config_.structures = std::move(structures);
    // A host cluster being packed with compressed data may be shared now: the next one starts afresh.
    e_.compressedNext_ = e_.compressedEnd_ = 0;
    return e_.TrackMetadata();
  }

  /// Queue the references of `refs` to be dropped (a free takes one from each cluster of its range); the commit drops them.
  void QueueFrees(const References& refs) {
    std::lock_guard<std::mutex> lock(e_.metaMu_);
    const uint64_t cs = g_.clusterSize;
    for (const ReferenceRun& run : refs) {
      for (uint64_t n = 0; n < run.count; n++) e_.pendingFrees_.push_back({run.first * cs, run.length * cs, false});
    }
  }

  /// Free the replaced snapshot table, then commit every queued free (their clusters are discarded).
  Status FreeOldTable(const SnapshotChange& c) {
    if (c.oldTableBytes > 0) {
      std::lock_guard<std::mutex> lock(e_.metaMu_);
      e_.pendingFrees_.push_back({c.oldTableOffset, c.oldTableBytes, false});
    }
    return e_.Flush();
  }

  /// Make bit 63 of every active L1 entry and of every entry of the tables they name say "refcount 1".
  Status UpdateCopiedFlags() {
    const uint64_t entries = e_.mapper_->l1Entries();
    std::vector<uint64_t> l1(entries);
    bool l1Changed = false;
    AlignedBuffer table(g_.clusterSize);
    for (uint64_t i = 0; i < entries; i++) {
      const uint64_t raw = e_.mapper_->L1Raw(i);
      const uint64_t offset = raw & kOffsetMask;
      l1[i] = raw;
      if (offset == 0) continue;
      bool owned = false;
      QCOW2_TRY(OwnedCluster(offset, &owned));
      l1[i] = owned ? raw | kCopiedFlag : raw & ~kCopiedFlag;
      l1Changed |= l1[i] != raw;
      QCOW2_TRY(e_.image_->ReadExact(table.data(), g_.clusterSize, offset));
      bool changed = false;
      QCOW2_TRY(UpdateTableFlags(table.data(), &changed));
      if (!changed) continue;
      QCOW2_TRY(e_.Guard(offset, g_.clusterSize, kMetaActiveL2));
      QCOW2_TRY(e_.image_->Write(table.data(), g_.clusterSize, offset));
    }
    QCOW2_TRY(e_.image_->Flush());
    e_.cache().Clear();
    if (!l1Changed) return Status::Ok();
    AlignedBuffer bytes(entries * 8);
    for (uint64_t i = 0; i < entries; i++) StoreBE64(bytes.data() + 8 * i, l1[i]);
    QCOW2_TRY(e_.Guard(e_.config_.l1TableOffset, entries * 8, kMetaActiveL1));
    QCOW2_TRY(e_.image_->Write(bytes.data(), entries * 8, e_.config_.l1TableOffset));
    QCOW2_TRY(e_.image_->Flush());
    for (uint64_t i = 0; i < entries; i++) e_.mapper_->SetL1(i, l1[i]);
    return Status::Ok();
  }

  /// Set or clear COPIED in each entry of an L2 table that names a host cluster (compressed ones never have it).
  Status UpdateTableFlags(uint8_t* table, bool* changed) {
    for (uint64_t j = 0; j < g_.l2Entries(); j++) {
      uint8_t* at = table + j * g_.entryBytes;
      const uint64_t entry = LoadBE64(at);
      const uint64_t host = entry & kOffsetMask;
      if ((entry & kCompressedFlag) || host == 0) continue;
      bool owned = false;
      QCOW2_TRY(OwnedCluster(host, &owned));
      const uint64_t updated = owned ? entry | kCopiedFlag : entry & ~kCopiedFlag;
      if (updated == entry) continue;
      StoreBE64(at, updated);
      *changed = true;
    }
    return Status::Ok();
  }

  Status OwnedCluster(uint64_t host, bool* owned) {
    uint64_t refcount = 0;
    std::lock_guard<std::mutex> lock(e_.metaMu_);
    QCOW2_TRY(e_.refcounts_->Get(host >> g_.clusterBits, &refcount));
    *owned = refcount == 1;
    return Status::Ok();
  }

  Engine& e_;
  Geometry g_;
};

Status Engine::ChangeSnapshots(const SnapshotChange& change, SnapshotChangeResult* out) {
  QCOW2_TRY(Writable());
  if (config_.externalDataFile) {
    return Status::Error("ENOTSUP", "an image with an external data file cannot have internal snapshots");
  }
  if (change.offsetField != change.countField + 4) {
    return Status::Error(kInvalidArgument, "the header fields nb_snapshots (" + std::to_string(change.countField) +
                                               ") and snapshots_offset (" + std::to_string(change.offsetField) + ") must be adjacent");
  }
  std::unique_lock<std::shared_mutex> held(resizeMu_);
  WaitForDirectWrites();
  // The walks read the tables from the file: every change made so far must be there.
  QCOW2_TRY(Flush());
  SnapshotOps ops(*this);
  switch (change.kind) {
    case SnapshotChange::Kind::Create:
      return ops.Create(change, out);
    case SnapshotChange::Kind::Delete:
      return ops.Delete(change, out);
    case SnapshotChange::Kind::Apply:
      return ops.Apply(change);
  }
  return Status::Error(kInvalidArgument, "unknown snapshot change");
}

}  // namespace qcow2
