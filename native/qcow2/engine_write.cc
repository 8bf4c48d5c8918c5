// The write path of the engine. A request locks its guest clusters, decides per cluster whether it
// writes in place or needs a cluster of its own (allocated contiguously for the whole request),
// writes its data with one vectored write per host run, then queues its mapping changes and waits
// for a commit. One commit at a time writes the changes of every request queued before it:
//   refcount blocks -> fdatasync (covers data too) -> L2 slices -> fdatasync -> L1 entries, frees
// so one pair of barriers serves many concurrent requests, and nothing on disk ever points at a
// cluster whose data or refcount is not there yet. Clusters losing their last reference are given
// back only after the mapping that dropped them is on disk and no read can still be using them.
#include <algorithm>
#include <cstring>

#include "buffer.h"
#include "qcow2/engine.h"

namespace qcow2 {
namespace {

constexpr const char* kCorrupt = "ERR_QCOW2_CORRUPT";
constexpr uint64_t kAllAllocated = 0xffffffffull;
constexpr uint64_t kAllZero = 0xffffffffull << 32;

/// Subclusters [first, end) as bits of an extended L2 allocation bitmap.
uint32_t SubclusterMask(uint32_t first, uint32_t end) {
  const uint64_t upTo = end >= 32 ? 0xffffffffull : (1ull << end) - 1;
  return static_cast<uint32_t>(upTo & ~((1ull << first) - 1));
}
constexpr uint64_t kCorruptBit = 2;
/// Changed L2 slices and pending frees held in memory before a commit writes them back.
constexpr size_t kMaxDirtySlices = 1024;
constexpr size_t kMaxPendingFrees = 4096;
/// The image file grows ahead of allocations by at least this much.
constexpr uint64_t kGrowStep = 64ull << 20;
/// … and at most this much (space reserved ahead is given back on close).
constexpr uint64_t kMaxGrowStep = 1ull << 30;

/// Holds a range of guest clusters for the lifetime of a request (alone unless `shared`).
class ClusterRange {
 public:
  ClusterRange(ClusterLocks& locks, uint64_t first, uint64_t last, bool shared = false)
      : locks_(locks), first_(first), last_(last), shared_(shared) {
    locks_.Lock(first_, last_, shared_);
  }
  ~ClusterRange() { locks_.Unlock(first_, last_, shared_); }

 private:
  ClusterLocks& locks_;
  uint64_t first_, last_;
  bool shared_;
};

}  // namespace

void ClusterLocks::Lock(uint64_t first, uint64_t last, bool shared) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] {
    for (const Held& h : held_) {
      if (h.first <= last && first <= h.last && !(shared && h.shared)) return false;
    }
    return true;
  });
  held_.push_back({first, last, shared});
}

void ClusterLocks::Unlock(uint64_t first, uint64_t last, bool shared) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = std::find(held_.begin(), held_.end(), Held{first, last, shared});
    if (it != held_.end()) held_.erase(it);
  }
  cv_.notify_all();
}

bool ClusterLocks::TryLock(uint64_t first, uint64_t last, bool shared) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const Held& h : held_) {
    if (h.first <= last && first <= h.last && !(shared && h.shared)) return false;
  }
  held_.push_back({first, last, shared});
  return true;
}

bool ClusterLocks::Busy(uint64_t first, uint64_t last) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const Held& h : held_) {
    if (h.first <= last && first <= h.last && !h.shared) return true;
  }
  return false;
}

Status Engine::Writable() const {
  QCOW2_TRY(Live());
  if (!config_.writable) return Status::Error("ERR_QCOW2_READ_ONLY", "the image '" + image_->path() + "' is read-only");
  if (failed_.load(std::memory_order_acquire)) return failure_;
  return Status::Ok();
}

Status Engine::CheckWrite(GuestOffset at, uint64_t len, const char* what) const {
  QCOW2_TRY(Writable());
  if (at.value > size() || len > size() - at.value) {
    return Status::Error("ERR_QCOW2_OUT_OF_BOUNDS", std::string(what) + " of " + std::to_string(len) +
                                                        " bytes at guest offset " + std::to_string(at.value) +
                                                        " is past the end of the disk (" + std::to_string(size()) +
                                                        " bytes)");
  }
  return Status::Ok();
}

Status Engine::Fail(Status status) {
  if (status.ok()) return status;
  std::lock_guard<std::mutex> lock(failMu_);
  if (failed_.load()) return status;
  failure_ = status;
  failed_.store(true, std::memory_order_release);
  if (status.code == kCorrupt && config_.version >= 3) {
    failure_.message = "the image was marked corrupt and accepts no more writes: " + status.message;
    if (WriteIncompatibleFeatures(*image_, config_.header, config_.incompatibleFeatures | kCorruptBit).ok()) image_->Flush();
  }
  return status;
}

Status Engine::TrackMetadata() {
  const Geometry& g = geometry();
  metadata_ = std::make_shared<MetadataRanges>(g.clusterBits);
  metadata_->Add(kMetaHeader, 0, g.clusterSize);
  metadata_->Add(kMetaActiveL1, config_.l1TableOffset, mapper_->l1Entries() * 8);
  for (uint64_t i = 0; i < mapper_->l1Entries(); i++) {
    const uint64_t table = mapper_->L1Raw(i) & kOffsetMask;
    if (table != 0) metadata_->Add(kMetaActiveL2, table, g.clusterSize);
  }
  for (const EngineConfig::Structure& s : config_.structures) metadata_->Add(s.kind, s.offset, s.bytes);
  refcounts_->Track(metadata_);
  return Status::Ok();
}

Status Engine::Guard(uint64_t host, uint64_t bytes, uint32_t allowed) {
  return Fail(metadata_->Check(host, bytes, allowed));
}

Status Engine::WriteHeaderField(uint64_t offset, const void* bytes, size_t length) {
  QCOW2_TRY(image_->Write(bytes, length, offset));
  return image_->Flush();
}

Status Engine::PlanCluster(uint64_t cluster, uint64_t from, uint64_t to, ClusterPlan* plan, bool cachedOnly) {
  const Geometry& g = geometry();
  QCOW2_TRY(mapper_->EntryAt(GuestOffset{cluster << g.clusterBits}, &plan->entry, cachedOnly));
  const Mapper::RawEntry& e = plan->entry;
  const L2Entry& l2 = e.entry;
  const bool owned = Owned(e);
  // With extended L2 entries only the subclusters the request touches become allocated, as QEMU does;
  // a cluster that moves takes every allocated subcluster with it.
  const uint32_t touched = g.extendedL2 ? SubclusterMask(from >> g.subclusterBits, ((to - 1) >> g.subclusterBits) + 1) : kAllAllocated;
  uint32_t stored = touched;
  plan->freeOld = false;
  if (owned) {
    plan->host = l2.host;
    const bool ready = g.extendedL2 ? (l2.allocMask & touched) == touched : !l2.zero;
    plan->action = ready ? ClusterPlan::InPlace : ClusterPlan::Fill;
  } else if (config_.externalDataFile) {
    // Data in an external file sits at its guest offset, unreferenced by refcounts.
    plan->host = cluster << g.clusterBits;
    plan->action = ClusterPlan::Fill;
  } else {
    plan->action = ClusterPlan::Allocate;
    plan->freeOld = l2.compressed || l2.hostAllocated;
    if (l2.compressed) stored = kAllAllocated;
    if (l2.hostAllocated && l2.allocMask != 0) {
      stored = SubclusterMask(std::min<uint32_t>(__builtin_ctz(touched | l2.allocMask), 31),
                              32 - __builtin_clz(touched | l2.allocMask));
    }
  }
  if (plan->action == ClusterPlan::InPlace) {
    plan->from = from;
    plan->to = to;
    return Status::Ok();
  }
  plan->from = static_cast<uint64_t>(__builtin_ctz(stored)) << g.subclusterBits;
  plan->to = std::min<uint64_t>(static_cast<uint64_t>(32 - __builtin_clz(stored)) << g.subclusterBits, g.clusterSize);
  if (!g.extendedL2) plan->from = 0, plan->to = g.clusterSize;
  const uint64_t kept = l2.compressed ? 0 : e.bitmap;
  plan->bitmap = (kept & ~(static_cast<uint64_t>(stored) << 32)) | stored;
  return Status::Ok();
}

bool Engine::Owned(const Mapper::RawEntry& e) const {
  const L2Entry& l2 = e.entry;
  // An L2 table shared with a snapshot (L1 entry without COPIED) owns nothing: it is copied first.
  const bool tableOwned = e.l2Offset == 0 || (e.l1Raw & kCopiedFlag);
  return tableOwned && !l2.compressed && l2.hostAllocated && (config_.externalDataFile || (e.raw & kCopiedFlag));
}

bool Engine::ReadsAsZeros(const Mapper::RawEntry& e, uint64_t guest) const {
  const Geometry& g = geometry();
  const L2Entry& l2 = e.entry;
  if (l2.compressed) return false;
  const bool backed = (backing_.engine || backing_.raw) && guest < backing_.size;
  if (g.extendedL2) return l2.allocMask == 0 && (l2.zeroMask == kAllAllocated || !backed);
  return l2.zero || (!l2.hostAllocated && !backed);
}

Status Engine::TableFor(const Mapper::RawEntry& e, uint64_t* tableOffset, std::vector<HostFree>* frees) {
  const bool shared = e.l2Offset != 0 && !(e.l1Raw & kCopiedFlag);
  if (e.l2Offset != 0 && !shared) {
    *tableOffset = e.l2Offset;
    return Status::Ok();
  }
  // Another request may have made (or copied) the table since the caller looked.
  const uint64_t now = mapper_->L1Raw(e.l1Index);
  if ((now & kOffsetMask) != 0 && (now & kCopiedFlag)) {
    *tableOffset = now & kOffsetMask;
    return Status::Ok();
  }
  const uint64_t cs = geometry().clusterSize;
  std::vector<uint8_t> copy;
  if (shared) {
    // The active L1 takes a copy of a table a snapshot shares: the entries (and the references the
    // two L1 tables counted through the one table) stay as they are; the old table loses one reference.
    AlignedBuffer old(cs);
    QCOW2_TRY(image_->Read(old.data(), cs, e.l2Offset));
    copy.assign(old.data(), old.data() + cs);
  }
  if (!shared) copy.assign(cs, 0);
  uint64_t cluster = 0;
  QCOW2_TRY(refcounts_->Allocate(1, &cluster));
  *tableOffset = cluster << geometry().clusterBits;
  QCOW2_TRY(Guard(*tableOffset, cs));
  metadata_->Add(kMetaActiveL2, *tableOffset, cs);
  if (shared) {
    // The copied table stays a snapshot's: no longer an active one.
    metadata_->Remove(kMetaActiveL2, e.l2Offset, cs);
    frees->push_back({e.l2Offset, cs, false});
  }
  mapper_->NoteFileSize(*tableOffset + cs);
  // The table lives in the cache until a commit writes it, then the L1 entry: readers see it at once.
  L2Cache& cache = mapper_->cache();
  for (uint64_t at = 0; at < cs; at += cache.sliceBytes()) {
    cache.Pin(*tableOffset + at, std::make_shared<const L2Slice>(copy.data() + at, cache.sliceBytes()));
    dirtySlices_.insert(*tableOffset + at);
  }
  newTables_[e.l1Index] = *tableOffset;
  mapper_->SetL1(e.l1Index, *tableOffset | kCopiedFlag);
  return Status::Ok();
}

Status Engine::Write(const uint8_t* buf, uint64_t len, GuestOffset at) {
  QCOW2_TRY(CheckWrite(at, len, "write"));
  if (len == 0) return Status::Ok();
  MarkDirty(at.value, len);
  std::shared_lock<std::shared_mutex> resizing(resizeMu_);
  const Geometry& g = geometry();
  const uint64_t first = at.value >> g.clusterBits, last = (at.value + len - 1) >> g.clusterBits;
  std::vector<ClusterPlan> plans(last - first + 1);
  auto plan = [&](uint64_t c) {
    const uint64_t start = c << g.clusterBits;
    const uint64_t from = std::max(start, at.value) - start, to = std::min(start + g.clusterSize, at.value + len) - start;
    return Fail(PlanCluster(c, from, to, &plans[c - first]));
  };
  {
    // Writes into clusters they own run side by side; only mapping changes need the clusters alone.
    ClusterRange shared(locks_, first, last, true);
    bool inPlace = true;
    for (uint64_t c = first; c <= last && inPlace; c++) {
      QCOW2_TRY(plan(c));
      inPlace = plans[c - first].action == ClusterPlan::InPlace;
    }
    if (inPlace) return WriteData(buf, len, at, plans);
  }
  ClusterRange held(locks_, first, last);
  for (uint64_t c = first; c <= last; c++) QCOW2_TRY(plan(c));
  uint64_t allocations = 0;
  bool metadata = false;
  for (const ClusterPlan& p : plans) {
    allocations += p.action == ClusterPlan::Allocate;
    metadata = metadata || p.action != ClusterPlan::InPlace;
  }
  std::vector<HostFree> frees;
  if (metadata) {
    std::lock_guard<std::mutex> lock(metaMu_);
    // New L2 tables first, then data, as QEMU lays them out.
    for (ClusterPlan& p : plans) {
      if (p.action != ClusterPlan::InPlace) QCOW2_TRY(Fail(TableFor(p.entry, &p.table, &frees)));
    }
    std::vector<AllocatedRun> runs;
    if (allocations > 0) QCOW2_TRY(Fail(AllocateRuns(allocations, &runs)));
    size_t run = 0;
    uint64_t used = 0;
    for (ClusterPlan& p : plans) {
      if (p.action != ClusterPlan::Allocate) continue;
      if (used == runs[run].count) {
        run++;
        used = 0;
      }
      p.host = (runs[run].first + used++) << g.clusterBits;
      p.zeroed = runs[run].fresh && ReadsAsZeros(p.entry, (first + (&p - plans.data())) << g.clusterBits);
    }
  }
  QCOW2_TRY(WriteData(buf, len, at, plans));
  if (!metadata) return Status::Ok();
  std::vector<L2Update> updates;
  for (const ClusterPlan& p : plans) {
    if (p.action == ClusterPlan::InPlace) continue;
    const uint64_t l2Index = g.L2Index(GuestOffset{(first + (&p - plans.data())) << g.clusterBits});
    updates.push_back({p.entry.l1Index, l2Index, p.host | kCopiedFlag, g.extendedL2 ? p.bitmap : 0});
    if (p.freeOld) {
      const L2Entry& old = p.entry.entry;
      frees.push_back({old.host, old.compressed ? old.compressedBytes : g.clusterSize, false});
    }
  }
  return Publish(std::move(updates), std::move(frees));
}

Status Engine::WriteData(const uint8_t* buf, uint64_t len, GuestOffset at, std::vector<ClusterPlan>& plans) {
  const Geometry& g = geometry();
  const uint64_t first = at.value >> g.clusterBits;
  const uint64_t end = at.value + len;
  std::vector<AlignedBuffer> filled;
  filled.reserve(plans.size());
  std::vector<struct iovec> run;
  uint64_t runHost = 0, runBytes = 0;
  auto flush = [&]() -> Status {
    if (run.empty()) return Status::Ok();
    // The host offsets of clusters written in place come from disk: they must not land on metadata.
    if (!config_.externalDataFile) QCOW2_TRY(Guard(runHost, runBytes));
    Status st = DataFile().Writev(run.data(), static_cast<int>(run.size()), runHost);
    run.clear();
    runBytes = 0;
    return st;
  };
  for (size_t i = 0; i < plans.size(); i++) {
    const ClusterPlan& p = plans[i];
    const uint64_t start = (first + i) << g.clusterBits;
    const uint64_t from = std::max(start, at.value), to = std::min(start + g.clusterSize, end);
    uint64_t host = p.host + (from - start);
    struct iovec piece = {const_cast<uint8_t*>(buf + (from - at.value)), to - from};
    if (p.action != ClusterPlan::InPlace && !p.zeroed && (start + p.from < from || start + p.to > to)) {
      // A partial write to a cluster (or subclusters) of its own: the rest keeps what the guest saw.
      const uint64_t bytes = p.to - p.from;
      AlignedBuffer& region = filled.emplace_back(bytes);
      const uint64_t visible = std::min(bytes, size() - (start + p.from));
      std::memset(region.data() + visible, 0, bytes - visible);
      QCOW2_TRY(ReadLocked(region.data(), visible, GuestOffset{start + p.from}));
      std::memcpy(region.data() + (from - start - p.from), piece.iov_base, piece.iov_len);
      piece = {region.data(), bytes};
      host = p.host + p.from;
    }
    if (runBytes > 0 && runHost + runBytes != host) QCOW2_TRY(flush());
    if (run.empty()) runHost = host;
    run.push_back(piece);
    runBytes += piece.iov_len;
  }
  return flush();
}

Status Engine::Publish(std::vector<L2Update> updates, std::vector<HostFree> frees) {
  uint64_t ticket;
  {
    std::lock_guard<std::mutex> lock(metaMu_);
    QCOW2_TRY(Fail(ApplyUpdates(updates)));
    pendingFrees_.insert(pendingFrees_.end(), frees.begin(), frees.end());
    if (!CommitWanted()) return Status::Ok();
    ticket = ++ticket_;
  }
  return CommitUpTo(ticket);
}

bool Engine::CommitWanted() const {
  // Metadata is written back like a cache: on flush, or once enough of it waits.
  return dirtySlices_.size() >= kMaxDirtySlices || pendingFrees_.size() >= kMaxPendingFrees;
}

Status Engine::ApplyUpdates(const std::vector<L2Update>& updates) {
  const Geometry& g = geometry();
  L2Cache& cache = mapper_->cache();
  const uint64_t sliceBytes = cache.sliceBytes();
  const uint64_t perSlice = sliceBytes / g.entryBytes;
  for (const L2Update& u : updates) {
    const uint64_t tableOffset = mapper_->L1Raw(u.l1Index) & kOffsetMask;
    if (tableOffset == 0) return Status::Error(kCorrupt, "L1 entry " + std::to_string(u.l1Index) + " lost its L2 table");
    const uint64_t sliceOffset = tableOffset + (u.l2Index / perSlice) * sliceBytes;
    // Refused now rather than at the commit, so that the request that asked for it fails.
    QCOW2_TRY(Guard(sliceOffset, sliceBytes, kMetaActiveL2));
    std::shared_ptr<const L2Slice> slice;
    QCOW2_TRY(cache.Get(sliceOffset, &slice));
    std::vector<uint8_t> bytes(slice->data(), slice->data() + sliceBytes);
    uint8_t* entry = bytes.data() + (u.l2Index % perSlice) * g.entryBytes;
    StoreBE64(entry, u.raw);
    if (g.extendedL2) StoreBE64(entry + 8, u.bitmap);
    cache.Pin(sliceOffset, std::make_shared<const L2Slice>(bytes.data(), sliceBytes));
    dirtySlices_.insert(sliceOffset);
  }
  return Status::Ok();
}

Status Engine::CommitUpTo(uint64_t ticket) {
  std::unique_lock<std::mutex> lock(commitMu_);
  while (committed_ < ticket) {
    if (failed_.load(std::memory_order_acquire)) return failure_;
    if (committing_) {
      commitCv_.wait(lock);
      continue;
    }
    committing_ = true;
    lock.unlock();
    uint64_t done = 0;
    Status status = RunCommit(&done);
    if (!status.ok()) Fail(status);
    lock.lock();
    committing_ = false;
    if (status.ok()) committed_ = std::max(committed_, done);
    commitCv_.notify_all();
    if (!status.ok()) return status;
  }
  return Status::Ok();
}

Status Engine::RunCommit(uint64_t* done) {
  std::vector<HostFree> frees;
  std::map<uint64_t, uint64_t> tables;
  std::vector<std::pair<uint64_t, std::shared_ptr<const L2Slice>>> slices;
  L2Cache& cache = mapper_->cache();
  {
    // One consistent cut: every mapping change in it had its allocation counted before.
    std::lock_guard<std::mutex> lock(metaMu_);
    frees.swap(pendingFrees_);
    tables.swap(newTables_);
    *done = ticket_;
    for (uint64_t offset : dirtySlices_) {
      std::shared_ptr<const L2Slice> slice;
      if (!cache.Peek(offset, &slice)) return Status::Error(kCorrupt, "a changed L2 slice at " + std::to_string(offset) + " left the cache");
      slices.emplace_back(offset, std::move(slice));
    }
    dirtySlices_.clear();
  }
  QCOW2_TRY(WriteRefcountChanges());
  // Data and refcounts reach the disk before any mapping points at them.
  QCOW2_TRY(image_->Flush());
  if (config_.externalDataFile) QCOW2_TRY(dataFile_->Flush());
  for (const auto& [offset, slice] : slices) {
    QCOW2_TRY(Guard(offset, cache.sliceBytes(), kMetaActiveL2));
    QCOW2_TRY(image_->Write(slice->data(), cache.sliceBytes(), offset));
  }
  if (!tables.empty() || !frees.empty()) {
    // New tables are on disk before the L1 points at them; dropped mappings before their clusters are reused.
    QCOW2_TRY(image_->Flush());
  }
  for (const auto& [l1Index, offset] : tables) {
    uint8_t entry[8];
    StoreBE64(entry, offset | kCopiedFlag);
    QCOW2_TRY(Guard(config_.l1TableOffset + 8 * l1Index, 8, kMetaActiveL1));
    QCOW2_TRY(image_->Write(entry, 8, config_.l1TableOffset + 8 * l1Index));
  }
  // The L1 no longer points at a table it dropped before that table's clusters may go.
  if (!tables.empty() && !frees.empty()) QCOW2_TRY(image_->Flush());
  for (const auto& [offset, slice] : slices) cache.Unpin(offset, slice);
  QCOW2_TRY(ApplyFrees(frees));
  return ReleaseFreed();
}

Status Engine::WriteRefcountChanges() {
  std::vector<RefcountBlockWrite> blocks;
  std::vector<RefcountTableWrite> entries;
  bool moved;
  {
    std::lock_guard<std::mutex> lock(metaMu_);
    moved = refcounts_->tableMoved();
    refcounts_->TakeDirty(&blocks, &entries);
  }
  for (const RefcountBlockWrite& b : blocks) {
    QCOW2_TRY(Guard(b.offset, b.bytes.size(), kMetaRefcountBlock));
    QCOW2_TRY(image_->Write(b.bytes.data(), b.bytes.size(), b.offset));
  }
  if (moved) {
    uint64_t offset = 0, clusters = 0;
    std::pair<uint64_t, uint64_t> old;
    {
      std::lock_guard<std::mutex> lock(metaMu_);
      QCOW2_TRY(refcounts_->WriteTable(&offset, &clusters, &old));
    }
    // The new table and its blocks are durable before the header points at them.
    QCOW2_TRY(image_->Flush());
    QCOW2_TRY(WriteRefcountTableFields(*image_, config_.header, offset, clusters));
    QCOW2_TRY(image_->Flush());
    config_.refcountTableOffset = offset;
    config_.refcountTableClusters = clusters;
    std::lock_guard<std::mutex> lock(metaMu_);
    const uint32_t bits = geometry().clusterBits;
    metadata_->Remove(kMetaRefcountTable, old.first << bits, old.second << bits);
    if (old.second > 0) pendingFrees_.push_back({old.first << bits, old.second << bits, false});
    return Status::Ok();
  }
  if (entries.empty()) return Status::Ok();
  // New blocks are durable before the table points at them.
  QCOW2_TRY(image_->Flush());
  for (const RefcountTableWrite& e : entries) {
    uint8_t entry[8];
    StoreBE64(entry, e.blockOffset);
    QCOW2_TRY(Guard(config_.refcountTableOffset + 8 * e.index, 8, kMetaRefcountTable));
    QCOW2_TRY(image_->Write(entry, 8, config_.refcountTableOffset + 8 * e.index));
  }
  return Status::Ok();
}

Status Engine::ApplyFrees(const std::vector<HostFree>& frees) {
  const uint64_t cs = geometry().clusterSize;
  std::lock_guard<std::mutex> lock(metaMu_);
  for (const HostFree& f : frees) {
    const uint64_t firstCluster = f.host / cs, lastCluster = (f.host + f.bytes - 1) / cs;
    for (uint64_t c = firstCluster; c <= lastCluster; c++) {
      uint64_t refcount = 0;
      QCOW2_TRY(refcounts_->Get(c, &refcount));
      if (refcount == 1) {
        freed_.push_back(c);
        // The cluster compressed data was being packed into is going away: start a new one.
        if (compressedEnd_ > 0 && c == (compressedEnd_ - 1) / cs) compressedNext_ = compressedEnd_ = 0;
      } else {
        QCOW2_TRY(refcounts_->Add(c, -1));
      }
    }
    compressedGeneration_.fetch_add(1, std::memory_order_acq_rel);
  }
  return Status::Ok();
}

Status Engine::ReleaseFreed() {
  if (readsInflight_.load(std::memory_order_acquire) != 0) return Status::Ok();
  std::vector<uint64_t> clusters;
  {
    std::lock_guard<std::mutex> lock(metaMu_);
    clusters.swap(freed_);
  }
  if (clusters.empty()) return Status::Ok();
  std::sort(clusters.begin(), clusters.end());
  const uint64_t cs = geometry().clusterSize;
  // Punched while their refcount still holds them, so that no allocation can take them meanwhile;
  // a file system without hole punching just keeps the bytes.
  for (size_t i = 0; i < clusters.size();) {
    size_t j = i + 1;
    while (j < clusters.size() && clusters[j] == clusters[j - 1] + 1) j++;
    QCOW2_TRY(Guard(clusters[i] * cs, (clusters[j - 1] - clusters[i] + 1) * cs));
    image_->Allocate(AllocateMode::PunchHole, clusters[i] * cs, (clusters[j - 1] - clusters[i] + 1) * cs);
    i = j;
  }
  std::lock_guard<std::mutex> lock(metaMu_);
  for (uint64_t c : clusters) QCOW2_TRY(refcounts_->Add(c, -1));
  return Status::Ok();
}

Status Engine::AllocateRuns(uint64_t count, std::vector<AllocatedRun>* runs) {
  // The first free clusters, however they are split (holes get filled, as QEMU does).
  uint64_t end = 0;
  for (uint64_t left = count; left > 0;) {
    AllocatedRun run;
    QCOW2_TRY(refcounts_->AllocateUpTo(left, &run.first, &run.count, &run.fresh));
    // Refcounts that miss a structure would hand out its clusters.
    QCOW2_TRY(Guard(run.first << geometry().clusterBits, run.count << geometry().clusterBits));
    if (!runs->empty() && runs->back().first + runs->back().count == run.first && runs->back().fresh == run.fresh) {
      runs->back().count += run.count;
    } else {
      runs->push_back(run);
    }
    end = std::max(end, (run.first + run.count) << geometry().clusterBits);
    left -= run.count;
  }
  mapper_->NoteFileSize(end);
  return GrowFileAhead(end);
}

Status Engine::GrowFileAhead(uint64_t end) {
  if (end <= grownTo_) return Status::Ok();
  // Writes inside the file's size and into space the file system already reserved do not change
  // the file's layout: the file system then need not serialise them (ext4 takes its inode lock
  // alone for a direct write that allocates). Without fallocate the file grows sparse.
  const uint64_t target = end + std::max<uint64_t>(kGrowStep, std::min<uint64_t>(end / 8, kMaxGrowStep));
  uint64_t size = 0;
  QCOW2_TRY(image_->Size(&size));
  // A cluster reused near the start of a large file must never cut the file short.
  if (size < target && !image_->Allocate(AllocateMode::Allocate, size, target - size).ok()) QCOW2_TRY(image_->Truncate(target));
  grownTo_ = std::max(size, target);
  return Status::Ok();
}

Status Engine::TrimFile() {
  uint64_t end;
  {
    std::lock_guard<std::mutex> lock(metaMu_);
    if (grownTo_ == 0) return Status::Ok();
    end = std::max(refcounts_->highWater() << geometry().clusterBits, imageFileSize_);
    if (end >= grownTo_) return Status::Ok();
    grownTo_ = 0;
  }
  return image_->Truncate(end);
}

Status Engine::Flush() {
  QCOW2_TRY(Writable());
  // A commit can leave frees for the next one (the old refcount table, once the header no longer
  // points at it): another commit applies them, so that a flushed image has no leaks.
  for (int round = 0; round < 3; round++) {
    uint64_t ticket;
    {
      std::lock_guard<std::mutex> lock(metaMu_);
      ticket = ++ticket_;
    }
    QCOW2_TRY(CommitUpTo(ticket));
    std::lock_guard<std::mutex> lock(metaMu_);
    if (pendingFrees_.empty()) break;
  }
  // The commit ends by dropping references (after the mappings that held them are on disk): write those too.
  QCOW2_TRY(Fail(WriteRefcountChanges()));
  QCOW2_TRY(image_->Flush());
  if (config_.externalDataFile) QCOW2_TRY(dataFile_->Flush());
  return Status::Ok();
}

Status Engine::ZeroEntry(const Mapper::RawEntry& e, bool unmap, bool discard, L2Update* update, HostFree* freed,
                         bool* change) {
  const Geometry& g = geometry();
  const L2Entry& l2 = e.entry;
  const bool hasBacking = backing_.engine || backing_.raw;
  const bool keep = Owned(e) && !unmap && !discard;
  const bool hasData = l2.compressed || l2.hostAllocated;
  const uint64_t keptHost = keep ? (l2.host | kCopiedFlag) : 0;
  // Version 2 has no zero flag: only unallocated clusters without a backing image read as zeros.
  // A discard makes a cluster read as zeros where the backing would otherwise show, as QEMU's does.
  const bool zeroFlag = config_.version >= 3 && (!discard || hasBacking || hasData);
  update->raw = keptHost;
  update->bitmap = 0;
  if (zeroFlag) {
    if (g.extendedL2) {
      update->bitmap = kAllZero;
    } else {
      update->raw |= kZeroFlag;
    }
  }
  *change = update->raw != e.raw || update->bitmap != e.bitmap;
  freed->bytes = 0;
  if (hasData && !keep) {
    freed->host = l2.host;
    freed->bytes = l2.compressed ? l2.compressedBytes : g.clusterSize;
    freed->dataFile = config_.externalDataFile;
  }
  return Status::Ok();
}

Status Engine::ModifyClusters(GuestOffset at, uint64_t len, bool unmap, bool discard) {
  const Geometry& g = geometry();
  const uint64_t first = at.value >> g.clusterBits, last = (at.value + len - 1) >> g.clusterBits;
  ClusterRange held(locks_, first, last);
  return ModifyHeld(first, last, unmap, discard);
}

Status Engine::ModifyHeld(uint64_t first, uint64_t last, bool unmap, bool discard) {
  const Geometry& g = geometry();
  std::vector<L2Update> updates;
  std::vector<HostFree> frees;
  for (uint64_t c = first; c <= last; c++) {
    Mapper::RawEntry e;
    QCOW2_TRY(Fail(mapper_->EntryAt(GuestOffset{c << g.clusterBits}, &e)));
    L2Update update{e.l1Index, g.L2Index(GuestOffset{c << g.clusterBits}), 0, 0};
    HostFree freed{};
    bool change = false;
    QCOW2_TRY(ZeroEntry(e, unmap, discard, &update, &freed, &change));
    if (!change) continue;
    if (e.l2Offset == 0 || !(e.l1Raw & kCopiedFlag)) {
      std::lock_guard<std::mutex> lock(metaMu_);
      uint64_t table = 0;
      QCOW2_TRY(Fail(TableFor(e, &table, &frees)));
    }
    updates.push_back(update);
    if (freed.bytes == 0) continue;
    if (freed.dataFile) {
      // The data file has no refcounts, and a write into this guest cluster reuses the same host
      // range (host == guest) as soon as the clusters are let go: punch it now, not at the next commit.
      dataFile_->Allocate(AllocateMode::PunchHole, freed.host, freed.bytes);
    } else {
      frees.push_back(freed);
    }
  }
  if (updates.empty()) return Status::Ok();
  return Publish(std::move(updates), std::move(frees));
}

Status Engine::ZeroSubclusters(uint64_t cluster, uint32_t from, uint32_t to, bool* done) {
  const Geometry& g = geometry();
  const GuestOffset at{cluster << g.clusterBits};
  Mapper::RawEntry e;
  QCOW2_TRY(Fail(mapper_->EntryAt(at, &e)));
  // A compressed cluster has no subclusters: its bytes are written as zeros instead.
  *done = !e.entry.compressed;
  if (!*done) return Status::Ok();
  const uint64_t mask = SubclusterMask(from, to);
  const uint64_t bitmap = (e.bitmap & ~mask) | (mask << 32);
  if (bitmap == e.bitmap) return Status::Ok();
  std::vector<HostFree> frees;
  if (e.l2Offset == 0 || !(e.l1Raw & kCopiedFlag)) {
    std::lock_guard<std::mutex> lock(metaMu_);
    uint64_t table = 0;
    QCOW2_TRY(Fail(TableFor(e, &table, &frees)));
  }
  return Publish({{e.l1Index, g.L2Index(at), e.raw, bitmap}}, std::move(frees));
}

Status Engine::ZeroUnitsHeld(uint64_t from, uint64_t to, bool unmap, std::vector<std::pair<uint64_t, uint64_t>>* left) {
  const Geometry& g = geometry();
  // Version 2 has no zero flag: without a backing image, dropped clusters read as zeros (QEMU discards them).
  const bool discard = config_.version < 3;
  const uint64_t unit = 1ull << g.subclusterBits;
  // Whole clusters end here: at the last cluster boundary, or at the disk end.
  const uint64_t wholeEnd = to == size() ? to : to & ~(g.clusterSize - 1);
  for (uint64_t pos = from; pos < to;) {
    const uint64_t c = pos >> g.clusterBits, start = c << g.clusterBits;
    if (pos == start && wholeEnd > pos) {
      QCOW2_TRY(ModifyHeld(c, (wholeEnd - 1) >> g.clusterBits, unmap, discard));
      pos = wholeEnd;
      continue;
    }
    const uint64_t next = std::min(to, start + g.clusterSize);
    bool done = false;
    QCOW2_TRY(ZeroSubclusters(c, static_cast<uint32_t>((pos - start) / unit),
                              static_cast<uint32_t>((next - start + unit - 1) / unit), &done));
    if (!done) left->emplace_back(pos, next);
    pos = next;
  }
  return Status::Ok();
}

Status Engine::RangeReadsAsZeros(uint64_t from, uint64_t to, bool* zeros) {
  *zeros = true;
  for (uint64_t pos = from; pos < to && *zeros;) {
    Segment seg;
    QCOW2_TRY(mapper_->Resolve(GuestOffset{pos}, to - pos, &seg, /*scan=*/true));
    if (seg.kind == ClusterKind::Unallocated) {
      std::vector<MapRun> runs;
      QCOW2_TRY(MapBacking(GuestOffset{pos}, seg.length, 0, 64, &runs));
      uint64_t covered = 0;
      for (const MapRun& r : runs) {
        covered += r.length;
        *zeros = *zeros && r.kind != RunKind::Data;
      }
      *zeros = *zeros && covered == seg.length;
    } else {
      *zeros = seg.kind == ClusterKind::Zero;
    }
    pos += seg.length;
  }
  return Status::Ok();
}

Status Engine::ZeroPiece(uint64_t from, uint64_t to, bool unmap) {
  const Geometry& g = geometry();
  const uint64_t unit = 1ull << g.subclusterBits;
  const uint64_t unitStart = from & ~(unit - 1), unitEnd = std::min(unitStart + unit, size());
  std::vector<std::pair<uint64_t, uint64_t>> left;
  bool zeroed = false;
  {
    // Like QEMU: a piece of a subcluster that reads as zeros all around it zeroes the whole subcluster
    // (no allocation); otherwise the piece is written as zeros. The check and the change hold the cluster.
    std::shared_lock<std::shared_mutex> resizing(resizeMu_);
    const uint64_t c = unitStart >> g.clusterBits;
    ClusterRange held(locks_, c, c);
    Mapper::RawEntry e;
    QCOW2_TRY(Fail(mapper_->EntryAt(GuestOffset{unitStart}, &e)));
    const ClusterKind kind = e.entry.KindOf(g, static_cast<uint32_t>((unitStart - (c << g.clusterBits)) >> g.subclusterBits));
    bool before = false, after = false;
    if (kind == ClusterKind::Unallocated || kind == ClusterKind::Zero) {
      QCOW2_TRY(Fail(RangeReadsAsZeros(unitStart, from, &before)));
      QCOW2_TRY(Fail(RangeReadsAsZeros(to, unitEnd, &after)));
    }
    if (before && after) {
      QCOW2_TRY(ZeroUnitsHeld(unitStart, unitEnd, unmap, &left));
      zeroed = left.empty();
    }
  }
  return zeroed ? Status::Ok() : WriteZeroBytes(from, to);
}

Status Engine::WriteZeroBytes(uint64_t from, uint64_t to) {
  AlignedBuffer zeros(std::min<uint64_t>(to - from, 1u << 20));
  std::memset(zeros.data(), 0, zeros.size());
  for (uint64_t pos = from; pos < to;) {
    const uint64_t n = std::min<uint64_t>(to - pos, zeros.size());
    QCOW2_TRY(Write(zeros.data(), n, GuestOffset{pos}));
    pos += n;
  }
  return Status::Ok();
}

Status Engine::WriteZeroes(GuestOffset at, uint64_t len, bool unmap) {
  QCOW2_TRY(CheckWrite(at, len, "write of zeros"));
  if (len == 0) return Status::Ok();
  MarkDirty(at.value, len);
  const Geometry& g = geometry();
  const uint64_t end = at.value + len;
  // Version 2 has no zero flag: over a backing image only written zeros hide it.
  if (config_.version < 3 && (backing_.engine || backing_.raw)) return WriteZeroBytes(at.value, end);
  // Whole subclusters (clusters without extended L2; the last may end at the disk end) change their
  // mapping; the pieces of subclusters at either edge are zeroed as ZeroPiece() says.
  const uint64_t unit = 1ull << g.subclusterBits;
  const uint64_t inner = (at.value + unit - 1) & ~(unit - 1);
  const uint64_t innerEnd = end == size() ? end : end & ~(unit - 1);
  if (at.value < inner) QCOW2_TRY(ZeroPiece(at.value, std::min(inner, end), unmap));
  if (innerEnd > inner) {
    std::vector<std::pair<uint64_t, uint64_t>> left;
    {
      std::shared_lock<std::shared_mutex> resizing(resizeMu_);
      const uint64_t first = inner >> g.clusterBits, last = (innerEnd - 1) >> g.clusterBits;
      ClusterRange held(locks_, first, last);
      QCOW2_TRY(ZeroUnitsHeld(inner, innerEnd, unmap, &left));
    }
    for (const auto& [from, to] : left) QCOW2_TRY(WriteZeroBytes(from, to));
  }
  const uint64_t tail = std::max(innerEnd, inner);
  if (tail < end) QCOW2_TRY(ZeroPiece(tail, end, unmap));
  return Status::Ok();
}

Status Engine::Discard(GuestOffset at, uint64_t len) {
  QCOW2_TRY(CheckWrite(at, len, "discard"));
  // The whole request counts as changed, even the parts no cluster is dropped from (as QEMU marks it).
  MarkDirty(at.value, len);
  const Geometry& g = geometry();
  const uint64_t end = at.value + len;
  const uint64_t inner = (at.value + g.clusterSize - 1) & ~(g.clusterSize - 1);
  const uint64_t innerEnd = end == size() ? end : end & ~(g.clusterSize - 1);
  // Without a zero flag, dropping a cluster would show the backing image: version 2 keeps it, as QEMU does.
  const bool hasBacking = backing_.engine || backing_.raw;
  if (innerEnd <= inner || (config_.version < 3 && hasBacking)) return Status::Ok();
  std::shared_lock<std::shared_mutex> resizing(resizeMu_);
  return ModifyClusters(GuestOffset{inner}, innerEnd - inner, true, true);
}

Status Engine::WriteCompressed(const uint8_t* buf, uint64_t len, GuestOffset at) {
  QCOW2_TRY(CheckWrite(at, len, "compressed write"));
  const Geometry& g = geometry();
  if (config_.externalDataFile) {
    return Status::Error("ERR_QCOW2_UNSUPPORTED", "compressed clusters cannot be stored in an image with an external data file");
  }
  if (g.InCluster(at) != 0 || (len % g.clusterSize != 0 && at.value + len != size())) {
    return Status::Error("ERR_QCOW2_INVALID_ARGUMENT", "compressed writes take whole clusters: " + std::to_string(len) +
                                                           " bytes at guest offset " + std::to_string(at.value) +
                                                           " are not aligned to the cluster size " +
                                                           std::to_string(g.clusterSize));
  }
  if (len == 0) return Status::Ok();
  MarkDirty(at.value, len);
  const uint64_t count = (len + g.clusterSize - 1) >> g.clusterBits;
  AlignedBuffer packed(count * g.clusterSize);
  AlignedBuffer cluster;
  if (len % g.clusterSize != 0) cluster = AlignedBuffer(g.clusterSize);
  std::vector<PackedCluster> stored;
  for (uint64_t i = 0; i < count; i++) {
    const uint64_t done = i << g.clusterBits;
    const uint64_t n = std::min(g.clusterSize, len - done);
    const uint8_t* in = buf + done;
    if (n < g.clusterSize) {
      // The last cluster of a disk that ends inside it compresses padded with zeros.
      std::memcpy(cluster.data(), in, n);
      std::memset(cluster.data() + n, 0, g.clusterSize - n);
      in = cluster.data();
    }
    size_t bytes = 0;
    // As QEMU does: compressed when the output is smaller than the cluster, else stored as it is.
    QCOW2_TRY(CompressCluster(config_.compression, in, g.clusterSize, packed.data() + done, g.clusterSize - 1, &bytes));
    if (bytes == 0) {
      QCOW2_TRY(Write(buf + done, n, GuestOffset{at.value + done}));
      continue;
    }
    stored.push_back({i, bytes});
  }
  if (stored.empty()) return Status::Ok();
  return StoreCompressed(packed.data(), stored, at);
}

Status Engine::StoreCompressed(const uint8_t* packed, const std::vector<PackedCluster>& clusters, GuestOffset at) {
  const Geometry& g = geometry();
  std::shared_lock<std::shared_mutex> resizing(resizeMu_);
  const uint64_t first = at.value >> g.clusterBits;
  ClusterRange held(locks_, first + clusters.front().index, first + clusters.back().index);
  std::vector<ClusterPlan> plans(clusters.size());
  for (size_t k = 0; k < clusters.size(); k++) {
    QCOW2_TRY(Fail(PlanCluster(first + clusters[k].index, 0, g.clusterSize, &plans[k])));
  }
  std::vector<HostFree> frees;
  std::vector<L2Update> updates;
  CompressedStream::Ticket ticket;
  {
    std::lock_guard<std::mutex> lock(metaMu_);
    if (!compressedStream_) {
      // Whole units of the file's alignment must stay inside the clusters packed into.
      const uint64_t align = image_->reqAlign() <= g.clusterSize ? image_->reqAlign() : 1;
      compressedStream_ = std::make_unique<CompressedStream>(*image_, align);
    }
    for (size_t k = 0; k < clusters.size(); k++) {
      ClusterPlan& plan = plans[k];
      const uint64_t bytes = clusters[k].bytes;
      QCOW2_TRY(Fail(TableFor(plan.entry, &plan.table, &frees)));
      uint64_t host = 0;
      QCOW2_TRY(Fail(PackCompressed(bytes, &host)));
      QCOW2_TRY(Guard(host, bytes));
      QCOW2_TRY(Fail(compressedStream_->Append(packed + (clusters[k].index << g.clusterBits), bytes, host, &ticket)));
      const uint64_t sectors = (host + bytes - 1) / kSectorSize - host / kSectorSize;
      const uint64_t raw = kCompressedFlag | (sectors << g.CompressedOffsetBits()) | host;
      updates.push_back({plan.entry.l1Index, g.L2Index(GuestOffset{(first + clusters[k].index) << g.clusterBits}), raw, 0});
      const L2Entry& old = plan.entry.entry;
      if (old.compressed || old.hostAllocated) frees.push_back({old.host, old.compressed ? old.compressedBytes : g.clusterSize, false});
    }
  }
  // The stream writes in packing order: once the last cluster's bytes are in the file, so are the others'.
  QCOW2_TRY(Fail(compressedStream_->Wait(ticket)));
  return Publish(std::move(updates), std::move(frees));
}

Status Engine::PackCompressed(uint64_t bytes, uint64_t* host) {
  const Geometry& g = geometry();
  if (compressedNext_ < compressedEnd_) {
    // Narrow refcounts (1 bit) cannot count another cluster packed into the last one: start afresh.
    uint64_t refs = 0;
    QCOW2_TRY(refcounts_->Get((compressedEnd_ - 1) >> g.clusterBits, &refs));
    if (refs >= refcounts_->maxValue()) compressedNext_ = compressedEnd_ = 0;
  }
  if (compressedNext_ + bytes <= compressedEnd_) {
    // Packed behind the previous compressed cluster: one more reference to the host cluster.
    *host = compressedNext_;
    QCOW2_TRY(refcounts_->Add(*host >> g.clusterBits, 1));
  } else {
    uint64_t first = 0;
    QCOW2_TRY(refcounts_->Allocate(1, &first));
    const bool continues = compressedNext_ < compressedEnd_ && (first << g.clusterBits) == compressedEnd_;
    if (continues) {
      // The data runs on from the tail of the last cluster into the next one, as QEMU packs it.
      *host = compressedNext_;
      QCOW2_TRY(refcounts_->Add((compressedEnd_ - 1) >> g.clusterBits, 1));
    } else {
      *host = first << g.clusterBits;
    }
    compressedEnd_ = (first + 1) << g.clusterBits;
    // Inside the file's size, the writes of packed data never have to extend (and trim) the file.
    QCOW2_TRY(GrowFileAhead(compressedEnd_));
  }
  compressedNext_ = *host + bytes;
  mapper_->NoteFileSize(*host + g.clusterSize);
  return Status::Ok();
}

Status Engine::GrowL1(uint64_t entries) {
  // The new table copies the L1 in memory: entries of new L2 tables must be on disk (their tables
  // written) first, or the header would point at entries whose tables hold stale bytes.
  QCOW2_TRY(Flush());
  const Geometry& g = geometry();
  const uint64_t bytes = (entries * 8 + g.clusterSize - 1) & ~(g.clusterSize - 1);
  const uint64_t oldBytes = (mapper_->l1Entries() * 8 + g.clusterSize - 1) & ~(g.clusterSize - 1);
  uint64_t cluster = 0;
  {
    std::lock_guard<std::mutex> lock(metaMu_);
    QCOW2_TRY(refcounts_->Allocate(bytes >> g.clusterBits, &cluster));
  }
  const uint64_t offset = cluster << g.clusterBits;
  mapper_->NoteFileSize(offset + bytes);
  QCOW2_TRY(Guard(offset, bytes));
  AlignedBuffer table(bytes);
  std::memset(table.data(), 0, bytes);
  for (uint64_t i = 0; i < mapper_->l1Entries(); i++) StoreBE64(table.data() + 8 * i, mapper_->L1Raw(i));
  QCOW2_TRY(image_->Write(table.data(), bytes, offset));
  // Refcounts and table are durable before the header points at the table.
  QCOW2_TRY(WriteRefcountChanges());
  QCOW2_TRY(image_->Flush());
  // The offset first: with the old size it still describes a valid prefix of the new table.
  uint8_t field[8];
  StoreBE64(field, offset);
  QCOW2_TRY(WriteHeaderField(config_.header.l1TableOffset, field, 8));
  StoreBE32(field, static_cast<uint32_t>(entries));
  QCOW2_TRY(WriteHeaderField(config_.header.l1Size, field, 4));
  const uint64_t oldOffset = config_.l1TableOffset;
  metadata_->Add(kMetaActiveL1, offset, entries * 8);
  metadata_->Remove(kMetaActiveL1, oldOffset, mapper_->l1Entries() * 8);
  config_.l1TableOffset = offset;
  config_.l1Size = entries;
  mapper_->GrowL1(entries);
  if (oldBytes > 0 && oldOffset != 0) {
    std::lock_guard<std::mutex> lock(metaMu_);
    pendingFrees_.push_back({oldOffset, oldBytes, false});
  }
  return Status::Ok();
}

Status Engine::Preallocate(uint64_t from, uint64_t to, Preallocation mode) {
  const Geometry& g = geometry();
  const uint64_t first = from >> g.clusterBits, last = (to - 1) >> g.clusterBits;
  std::vector<std::pair<uint64_t, Mapper::RawEntry>> clusters;
  for (uint64_t c = first; c <= last; c++) {
    Mapper::RawEntry e;
    QCOW2_TRY(mapper_->EntryAt(GuestOffset{c << g.clusterBits}, &e));
    if (e.raw == 0 && e.bitmap == 0) clusters.emplace_back(c, e);
  }
  if (clusters.empty()) return Status::Ok();
  std::vector<L2Update> updates;
  std::vector<HostFree> frees;
  {
    std::lock_guard<std::mutex> lock(metaMu_);
    std::vector<AllocatedRun> runs;
    if (!config_.externalDataFile) QCOW2_TRY(AllocateRuns(clusters.size(), &runs));
    size_t run = 0;
    uint64_t used = 0;
    for (auto& [c, e] : clusters) {
      uint64_t table = 0;
      QCOW2_TRY(TableFor(e, &table, &frees));
      if (!runs.empty() && used == runs[run].count) {
        run++;
        used = 0;
      }
      // Data in an external file sits at its guest offset; in the image, in the runs just allocated.
      const uint64_t host = config_.externalDataFile ? c << g.clusterBits : (runs[run].first + used++) << g.clusterBits;
      updates.push_back({e.l1Index, g.L2Index(GuestOffset{c << g.clusterBits}), host | kCopiedFlag, 0});
    }
  }
  // The space exists before any mapping points at it: reserved (falloc) or written as zeros (full).
  File& data = DataFile();
  if (mode == Preallocation::Falloc || mode == Preallocation::Full) {
    for (const L2Update& u : updates) {
      const uint64_t host = u.raw & kOffsetMask;
      if (mode == Preallocation::Falloc) {
        QCOW2_TRY(data.Allocate(AllocateMode::Allocate, host, g.clusterSize));
      } else {
        AlignedBuffer zeros(g.clusterSize);
        std::memset(zeros.data(), 0, g.clusterSize);
        QCOW2_TRY(data.Write(zeros.data(), g.clusterSize, host));
      }
    }
  }
  return Publish(std::move(updates), std::move(frees));
}

Status Engine::DropPast(uint64_t from, uint64_t oldSize, uint64_t keep) {
  const Geometry& g = geometry();
  std::vector<L2Update> updates;
  std::vector<HostFree> frees, dropped;
  for (uint64_t c = from >> g.clusterBits; c <= (oldSize - 1) >> g.clusterBits; c++) {
    Mapper::RawEntry e;
    QCOW2_TRY(mapper_->EntryAt(GuestOffset{c << g.clusterBits}, &e));
    if (e.l2Offset == 0 || (e.raw == 0 && e.bitmap == 0)) continue;
    const bool shared = !(e.l1Raw & kCopiedFlag);
    // A whole table past the end goes with what it maps; a table shared with a snapshot and what it
    // maps each lose the reference the active L1 held.
    const bool whole = e.l1Index >= keep;
    const L2Entry& l2 = e.entry;
    if ((l2.compressed || l2.hostAllocated) && !config_.externalDataFile) {
      (whole ? dropped : frees).push_back({l2.host, l2.compressed ? l2.compressedBytes : g.clusterSize, false});
    }
    if (whole) continue;
    if (shared) {
      std::lock_guard<std::mutex> lock(metaMu_);
      uint64_t table = 0;
      QCOW2_TRY(TableFor(e, &table, &frees));
    }
    updates.push_back({e.l1Index, g.L2Index(GuestOffset{c << g.clusterBits}), 0, 0});
  }
  QCOW2_TRY(Publish(std::move(updates), std::move(frees)));
  std::vector<uint64_t> tables;
  for (uint64_t i = keep; i < mapper_->l1Entries(); i++) {
    if (mapper_->L1Raw(i) & kOffsetMask) tables.push_back(i);
  }
  if (tables.empty()) return Status::Ok();
  // The L1 entries are gone on disk before the tables and what they alone map may be reused
  // (the table sizes stay, as QEMU keeps l1_size).
  QCOW2_TRY(Flush());
  for (uint64_t i : tables) {
    const uint8_t zero[8] = {};
    QCOW2_TRY(Guard(config_.l1TableOffset + 8 * i, 8, kMetaActiveL1));
    QCOW2_TRY(image_->Write(zero, 8, config_.l1TableOffset + 8 * i));
  }
  QCOW2_TRY(image_->Flush());
  std::lock_guard<std::mutex> lock(metaMu_);
  for (uint64_t i : tables) {
    const uint64_t table = mapper_->L1Raw(i) & kOffsetMask;
    mapper_->SetL1(i, 0);
    metadata_->Remove(kMetaActiveL2, table, g.clusterSize);
    dropped.push_back({table, g.clusterSize, false});
  }
  pendingFrees_.insert(pendingFrees_.end(), dropped.begin(), dropped.end());
  return Status::Ok();
}

Status Engine::TrimToLastCluster() {
  uint64_t end = 0, fileSize = 0;
  {
    std::lock_guard<std::mutex> lock(metaMu_);
    QCOW2_TRY(refcounts_->DropEmptyTail(&end));
  }
  // The blocks dropped from the table are no longer referenced on disk once written.
  QCOW2_TRY(WriteRefcountChanges());
  QCOW2_TRY(image_->Flush());
  const uint64_t bytes = end << geometry().clusterBits;
  QCOW2_TRY(image_->Size(&fileSize));
  if (end == 0 || bytes >= fileSize) return Status::Ok();
  // The file ends with its last cluster in use, as after QEMU's shrink.
  QCOW2_TRY(image_->Truncate(bytes));
  std::lock_guard<std::mutex> lock(metaMu_);
  imageFileSize_ = bytes;
  grownTo_ = 0;
  return Status::Ok();
}

Status Engine::Resize(uint64_t newSize, bool shrink, Preallocation preallocation) {
  QCOW2_TRY(Writable());
  std::unique_lock<std::shared_mutex> resizing(resizeMu_);
  WaitForDirectWrites();
  const Geometry& g = geometry();
  const uint64_t oldSize = size();
  if (newSize < oldSize && !shrink) {
    return Status::Error("ERR_QCOW2_INVALID_ARGUMENT", "shrinking the disk from " + std::to_string(oldSize) + " to " +
                                                           std::to_string(newSize) + " bytes needs shrink: true");
  }
  if (newSize < oldSize) {
    // Clusters wholly past the new end lose their data, as QEMU's shrink discards them.
    const uint64_t from = (newSize + g.clusterSize - 1) & ~(g.clusterSize - 1);
    if (from < oldSize) QCOW2_TRY(Fail(DropPast(from, oldSize, Geometry::Make(g.clusterBits, g.extendedL2, newSize).L1EntriesNeeded())));
  }
  const Geometry grown = Geometry::Make(g.clusterBits, g.extendedL2, newSize);
  if (grown.L1EntriesNeeded() > mapper_->l1Entries()) QCOW2_TRY(Fail(GrowL1(grown.L1EntriesNeeded())));
  if (newSize > oldSize && preallocation != Preallocation::Off) QCOW2_TRY(Fail(Preallocate(oldSize, newSize, preallocation)));
  QCOW2_TRY(Flush());
  uint8_t field[8];
  StoreBE64(field, newSize);
  QCOW2_TRY(WriteHeaderField(config_.header.size, field, sizeof field));
  mapper_->SetVirtualSize(newSize);
  ResizeBitmaps(newSize);
  if (newSize < oldSize) QCOW2_TRY(Fail(TrimToLastCluster()));
  return Status::Ok();
}

}  // namespace qcow2
