// The qcow2 read engine: one guest request in, the fewest host reads out. A backing image is
// another Engine (or a raw File) read directly from here, whatever the depth of the chain.
#pragma once
#include <atomic>
#include <condition_variable>
#include <map>
#include <set>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <vector>

#include "file.h"
#include "qcow2/bitmaps.h"
#include "qcow2/compress.h"
#include "qcow2/compressed_stream.h"
#include "qcow2/format.h"
#include "qcow2/header_fields.h"
#include "qcow2/mapper.h"
#include "qcow2/overlap.h"
#include "qcow2/refcounts.h"

namespace qcow2 {

class Engine;

/// The values of the parsed header the engine needs (header decoding stays in TypeScript).
struct EngineConfig {
  uint32_t clusterBits = 16;
  uint64_t virtualSize = 0;
  uint64_t l1TableOffset = 0;
  uint64_t l1Size = 0;
  uint32_t refcountOrder = 4;
  bool extendedL2 = false;
  Compression compression = Compression::Zlib;
  bool externalDataFile = false;
  /// The data file is a valid raw image of the disk: guest offset == data file offset.
  bool dataFileRaw = false;
  MapperOptions mapper;
  /// Writes are allowed (the image file, and data file, are open for writing).
  bool writable = false;
  uint32_t version = 3;
  uint64_t refcountTableOffset = 0;
  uint64_t refcountTableClusters = 0;
  /// The incompatible feature bits as stored, to set the corrupt bit beside them.
  uint64_t incompatibleFeatures = 0;
  /// Where the header fields the engine updates lie (from ts/qcow2/header.ts).
  HeaderFields header;
  /// A structure decoded in TypeScript (snapshot table, snapshot L1 tables, bitmap directory) that writes must not touch.
  struct Structure {
    MetadataKind kind;
    uint64_t offset;
    uint64_t bytes;
  };
  std::vector<Structure> structures;
  /// The persistent bitmaps to keep up to date (writable opens of images whose bitmaps are consistent).
  std::vector<BitmapConfig> bitmaps;
};

/// A change of the internal snapshots (engine_snapshot.cc). The snapshot table is encoded in
/// TypeScript; the references, the COPIED flags and the writes' order are the engine's.
struct SnapshotChange {
  enum class Kind { Create, Delete, Apply };
  Kind kind = Kind::Create;
  /// Delete, Apply: the snapshot's L1 table.
  uint64_t l1Offset = 0;
  uint64_t l1Entries = 0;
  /// Create, Delete: the new snapshot table (the last entry's padding left out) and its entries.
  std::vector<uint8_t> table;
  uint32_t count = 0;
  /// Create: where in `table` the new snapshot's L1 table offset goes.
  uint64_t l1OffsetAt = 0;
  /// The snapshot table in use now, freed once the header points at the new one.
  uint64_t oldTableOffset = 0;
  uint64_t oldTableBytes = 0;
  /// L1 tables (offset, entries) of the snapshots that stay, the new one left out.
  std::vector<std::pair<uint64_t, uint64_t>> keptL1s;
  /// Header offsets of nb_snapshots and snapshots_offset.
  uint64_t countField = 0;
  uint64_t offsetField = 0;
};

/// Where a snapshot change put things.
struct SnapshotChangeResult {
  /// Create: the new snapshot's L1 table.
  uint64_t l1Offset = 0;
  /// Create, Delete: the new snapshot table (0 when no snapshot is left).
  uint64_t tableOffset = 0;
};

/// Guest clusters held by writers: a request holds its whole range. Writes into clusters they own
/// share it; a request that changes the mapping holds it alone, so overlapping changes take turns.
class ClusterLocks {
 public:
  void Lock(uint64_t first, uint64_t last, bool shared);
  /// Lock() without waiting: false, holding nothing, when another request holds a conflicting cluster.
  bool TryLock(uint64_t first, uint64_t last, bool shared);
  void Unlock(uint64_t first, uint64_t last, bool shared);
  /// True when a request changing the mapping holds any cluster of [first, last] (never blocks).
  bool Busy(uint64_t first, uint64_t last);

 private:
  struct Held {
    uint64_t first, last;
    bool shared;
    bool operator==(const Held& o) const { return first == o.first && last == o.last && shared == o.shared; }
  };
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Held> held_;
};

/// What unallocated clusters fall through to: another engine, a raw file, or nothing (zeros).
struct Backing {
  std::shared_ptr<Engine> engine;
  std::shared_ptr<File> raw;
  /// Virtual size of the backing image; bytes past it read as zeros.
  uint64_t size = 0;
};

/// What a map run describes, as `qemu-img map` distinguishes it.
enum class RunKind : uint8_t { Data = 0, Zero = 1, Unallocated = 2 };

/// Flags of a map run.
enum RunFlags : uint32_t {
  kRunCompressed = 1,  ///< stored compressed; `host` is where the compressed bytes start
  kRunDataFile = 2,    ///< `host` is an offset in the external data file of the image at `depth`
  kRunRawFile = 4,     ///< the image at `depth` is a raw file; `host` is an offset in it
};

/// A run of guest bytes of one kind found at one depth of the chain.
struct MapRun {
  uint64_t offset = 0;
  uint64_t length = 0;
  RunKind kind = RunKind::Unallocated;
  uint32_t depth = 0;
  bool hasHost = false;
  uint64_t host = 0;
  uint32_t flags = 0;
};

/// Compressed clusters of one request whose data lie close together in the image file.
struct CompressedBatch {
  static constexpr size_t kMaxItems = 64;
  struct Item {
    uint8_t* dst;
    Segment seg;
    GuestOffset at;
  };
  Item items[kMaxItems];
  size_t count = 0;

  /// True when `seg`'s compressed data can join the batch's single read.
  bool Continues(const Segment& seg) const;
  void Add(uint8_t* dst, const Segment& seg, GuestOffset at);
};

/// How a request can be served without a worker thread (see direct_reads.h): a few reads of
/// one file and ranges of zeros, together covering the request.
struct DirectPlan {
  static constexpr size_t kMaxPieces = 32;
  /// A range of the request: read from `host`, or zeros.
  struct Piece {
    uint64_t at;  ///< offset in the request's buffer
    uint64_t length;
    uint64_t host;
    bool zero;
  };
  /// False when the request must take the pool.
  bool direct = false;
  Piece pieces[kMaxPieces];
  size_t count = 0;
  /// The descriptor of the File the reads are from (File::fd()), and the File (for short reads).
  int fd = -1;
  File* file = nullptr;
};

/// A read-only qcow2 image. Every method is thread-safe and may run on any worker at once.
class Engine {
 public:
  /// Check the configuration against the files and load the L1 table.
  static Status Open(const EngineConfig& config, std::shared_ptr<File> image, std::shared_ptr<File> dataFile,
                     Backing backing, std::shared_ptr<Engine>* out);

  /// Fill `buf` with `len` guest bytes from `at`; the range must lie inside the disk.
  Status Read(uint8_t* buf, uint64_t len, GuestOffset at);

  /// Append the runs describing [at, at + len) to `out`, found at `depth` or below, stopping
  /// once `out` holds `maxRuns` runs (the runs then cover a prefix of the range).
  Status Map(GuestOffset at, uint64_t len, uint32_t depth, size_t maxRuns, std::vector<MapRun>* out);

  /// Plan a read on the JS thread: only from cached tables, never blocking. Not direct when the
  /// request needs I/O to map, decompression, a backing image, or too many pieces.
  DirectPlan PlanDirect(const uint8_t* buf, uint64_t len, GuestOffset at);

  /// Requests served without a worker thread so far (for statistics).
  void CountDirectRead() { directReads_.fetch_add(1, std::memory_order_relaxed); }
  uint64_t directReads() const { return directReads_.load(std::memory_order_relaxed); }

  /// Write `len` guest bytes from `buf` at `at`; returns once the mapping that shows them is written.
  Status Write(const uint8_t* buf, uint64_t len, GuestOffset at);

  /// A small write planned on the JS thread (engine_direct_write.cc, submitted by direct_writes.cc).
  struct DirectWrite;
  /// Plan a write on the JS thread, from cached tables and without waiting: true when its data goes
  /// into clusters the image owns, or into fresh clusters allocated now (in memory), with at most
  /// DirectWrite::kMaxPieces host writes that the data file can take as they are. The clusters stay
  /// held, and a resize waits, until FinishDirectWrite().
  bool PlanDirectWrite(const uint8_t* buf, uint64_t len, GuestOffset at, DirectWrite* plan);
  /// The data of a planned write has landed (or failed: `written`): publish the new mappings and
  /// release what the plan held. `*commitDue` says enough metadata waits: run CommitDue() on a worker.
  Status FinishDirectWrite(DirectWrite* plan, const Status& written, bool* commitDue);
  /// Write back the metadata queued up to the plan's ticket (a worker's part of a direct write).
  Status CommitDue(const DirectWrite& plan);
  /// Writes served without a worker thread so far (for statistics).
  void CountDirectWrite() { directWrites_.fetch_add(1, std::memory_order_relaxed); }
  uint64_t directWrites() const { return directWrites_.load(std::memory_order_relaxed); }
  /// Make [at, at + len) read as zeros; `unmap` lets whole clusters give up their host space.
  Status WriteZeroes(GuestOffset at, uint64_t len, bool unmap);
  /// Drop the whole clusters of [at, at + len), as QEMU's qcow2 discard does.
  Status Discard(GuestOffset at, uint64_t len);
  /// Store whole clusters compressed (`at` cluster-aligned; `len` whole clusters or up to the disk end).
  Status WriteCompressed(const uint8_t* buf, uint64_t len, GuestOffset at);
  /// Everything written before is durable once this returns.
  Status Flush();
  /// Grow the disk, or shrink it (`shrink`), dropping the clusters past the new end.
  Status Resize(uint64_t size, bool shrink, Preallocation preallocation = Preallocation::Off);
  /// Create, delete or apply an internal snapshot, every other request held out meanwhile.
  Status ChangeSnapshots(const SnapshotChange& change, SnapshotChangeResult* out);
  /// A read served outside the engine (io_uring) starts or ends: freed clusters wait for those in flight.
  void BeginRead() { readsInflight_.fetch_add(1, std::memory_order_acq_rel); }
  void EndRead() { readsInflight_.fetch_sub(1, std::memory_order_acq_rel); }

  /// Write the bitmaps loaded at open back (data, then tables; flushed). The clusters they no longer
  /// use stay allocated until ReleaseBitmapClusters(): the directory on disk still points at them.
  Status StoreBitmaps(std::vector<StoredBitmap>* out);
  /// The bitmap directory now names the stored tables: free the clusters StoreBitmaps() left behind.
  Status ReleaseBitmapClusters();
  /// Add an empty bitmap, stored by the next StoreBitmaps(); `*index` is its place among the loaded ones.
  Status AddBitmap(uint32_t granularityBits, bool enabled, size_t* index);
  /// Change loaded bitmap `index`: remove it (its clusters freed by ReleaseBitmapClusters()), clear
  /// it, enable or disable it, or merge the set bits of `bits` (granularity `granularityBits`) into it.
  enum class BitmapChange { Remove, Clear, Enable, Disable, Merge };
  Status ChangeBitmap(size_t index, BitmapChange change, const std::vector<uint8_t>& bits = {}, uint32_t granularityBits = 0);
  /// The bits of loaded bitmap `index` as they are now (whole clusters).
  Status BitmapBits(size_t index, std::vector<uint8_t>* out);
  /// The bits of the bitmap whose table `config` names, read from the image (read-only engines too).
  Status ReadBitmap(const BitmapConfig& config, std::vector<uint8_t>* out);
  /// Queue the clusters of a bitmap the engine did not load (in use) to be freed with ReleaseBitmapClusters().
  Status DropBitmapTable(uint64_t tableOffset, uint64_t tableEntries);
  /// Write a new bitmap directory (none when `bytes` is empty) and flush; the old one is freed by ReleaseBitmapClusters().
  Status WriteBitmapDirectory(const std::vector<uint8_t>& bytes, uint64_t oldOffset, uint64_t oldBytes, uint64_t* offset);

  /// Flush when writable, then refuse further requests and drop the cached tables.
  Status Close();
  ~Engine();

  const Geometry& geometry() const { return mapper_->geometry(); }
  uint64_t size() const { return geometry().virtualSize; }
  uint64_t clusterSize() const { return geometry().clusterSize; }
  L2Cache& cache() { return mapper_->cache(); }

 private:
  friend class SnapshotOps;
  Engine() = default;
  Status Live() const;
  Status Writable() const;
  File& DataFile() const { return config_.externalDataFile ? *dataFile_ : *image_; }
  Status ReadLocked(uint8_t* buf, uint64_t len, GuestOffset at);
  Status CheckWrite(GuestOffset at, uint64_t len, const char* what) const;

  // Writing (engine_write.cc).
  struct ClusterPlan;
  struct L2Update {
    uint64_t l1Index;
    uint64_t l2Index;
    uint64_t raw;
    uint64_t bitmap;
  };
  /// Host bytes whose clusters lose one reference once the new mapping is on disk.
  struct HostFree {
    uint64_t host;
    uint64_t bytes;
    bool dataFile;
  };
  /// Decide how a write of bytes [from, to) of guest cluster `cluster` is stored.
  /// With `cachedOnly`, a table missing from the cache is ERR_QCOW2_WOULD_BLOCK.
  Status PlanCluster(uint64_t cluster, uint64_t from, uint64_t to, ClusterPlan* plan, bool cachedOnly = false);
  /// The cluster at guest offset `guest`, mapped by `e`, reads as zeros (no copy-on-write source).
  bool ReadsAsZeros(const Mapper::RawEntry& e, uint64_t guest) const;
  /// The L2 table for L1 entry `l1Index`: its offset, or a new table's (allocated under metaMu_).
  /// A table shared with a snapshot is copied first; the reference it loses goes to `frees`.
  Status TableFor(const Mapper::RawEntry& e, uint64_t* tableOffset, std::vector<HostFree>* frees);
  /// The cluster `e` maps is this image's alone to write in place (COPIED, in a table of its own).
  bool Owned(const Mapper::RawEntry& e) const;
  Status WriteData(const uint8_t* buf, uint64_t len, GuestOffset at, std::vector<ClusterPlan>& plans);
  /// Apply mapping changes in memory and queue frees; commit when enough waits to be written back.
  Status Publish(std::vector<L2Update> updates, std::vector<HostFree> frees);
  /// Enough changes wait in memory for a commit to write them back; under metaMu_.
  bool CommitWanted() const;
  Status CommitUpTo(uint64_t ticket);
  Status RunCommit(uint64_t* done);
  Status WriteRefcountChanges();
  /// Change the cached L2 slices (pinned until a commit writes them back); under metaMu_.
  Status ApplyUpdates(const std::vector<L2Update>& updates);
  Status ApplyFrees(const std::vector<HostFree>& frees);
  /// Give the clusters whose last reference dropped back to the allocator once no read may still use them.
  Status ReleaseFreed();
  Status WriteHeaderField(uint64_t offset, const void* bytes, size_t length);
  /// Note where every structure lies (writable opens), so that Guard() can refuse writes onto them.
  Status TrackMetadata();
  /// Refuse (and mark the image corrupt) a write of [host, host + bytes) in the image file that
  /// would land on metadata of a kind outside `allowed`.
  Status Guard(uint64_t host, uint64_t bytes, uint32_t allowed = 0);
  /// Note a failure of the write path: corruption sets the corrupt bit and stops all writes.
  Status Fail(Status status);
  Status ZeroEntry(const Mapper::RawEntry& e, bool unmap, bool discard, L2Update* update, HostFree* freed, bool* change);
  Status ModifyClusters(GuestOffset at, uint64_t len, bool unmap, bool discard);
  /// ModifyClusters() of clusters [first, last] whose lock the caller holds.
  Status ModifyHeld(uint64_t first, uint64_t last, bool unmap, bool discard);
  /// Make subclusters [from, to) of `cluster` read as zeros (extended L2; the caller holds the cluster);
  /// `*done` is false for a compressed cluster, whose bytes must be written as zeros instead.
  Status ZeroSubclusters(uint64_t cluster, uint32_t from, uint32_t to, bool* done);
  /// Zero the whole subclusters of [from, to) through the mapping (the caller holds their clusters);
  /// ranges that need zeros written instead go to `left`.
  Status ZeroUnitsHeld(uint64_t from, uint64_t to, bool unmap, std::vector<std::pair<uint64_t, uint64_t>>* left);
  /// Zero [from, to), a piece of one subcluster (cluster without extended L2).
  Status ZeroPiece(uint64_t from, uint64_t to, bool unmap);
  /// `*zeros` says every byte of [from, to) reads as zeros by its mapping (never by its content).
  Status RangeReadsAsZeros(uint64_t from, uint64_t to, bool* zeros);
  /// Write zeros over [from, to) as data.
  Status WriteZeroBytes(uint64_t from, uint64_t to);
  Status GrowL1(uint64_t entries);
  /// Drop the clusters of [from, oldSize) (the disk shrinks), and the L2 tables of L1 entries from `keep` on.
  Status DropPast(uint64_t from, uint64_t oldSize, uint64_t keep);
  /// After a shrink: drop the refcount blocks past the last cluster in use and cut the file there.
  Status TrimToLastCluster();
  /// Map every unallocated cluster of [from, to) to a data cluster of its own, as qemu-img resize --preallocation does.
  Status Preallocate(uint64_t from, uint64_t to, Preallocation mode);
  /// Contiguous clusters from the allocator; `fresh` ones read as zeros.
  struct AllocatedRun {
    uint64_t first = 0;
    uint64_t count = 0;
    bool fresh = false;
  };
  /// Allocate `count` clusters in as few runs as the refcount layout allows; under metaMu_.
  Status AllocateRuns(uint64_t count, std::vector<AllocatedRun>* runs);
  /// Extend the image file well past `end` (sparse), so that allocating writes do not each extend it.
  Status GrowFileAhead(uint64_t end);
  /// Give back what GrowFileAhead() reserved past the last cluster in use.
  Status TrimFile();
  /// A cluster of a compressed write: its index in the request and its compressed size.
  struct PackedCluster {
    uint64_t index;
    uint64_t bytes;
  };
  /// Map the request's compressed clusters (`packed` holds cluster i's bytes at i * cluster size)
  /// to host space packed behind the last compressed cluster, write them, then publish the mapping.
  Status StoreCompressed(const uint8_t* packed, const std::vector<PackedCluster>& clusters, GuestOffset at);
  /// Host space for `bytes` of compressed data, counted in the refcounts; under metaMu_.
  Status PackCompressed(uint64_t bytes, uint64_t* host);
  Status ReadBacking(uint8_t* buf, uint64_t len, GuestOffset at);
  /// PlanDirectWrite() for clusters held alone: some need fresh clusters, allocated here under metaMu_.
  bool PlanDirectAllocation(const uint8_t* buf, uint64_t len, GuestOffset at, DirectWrite* plan);
  /// Fill `plan` with the host pieces of `plans` (contiguous ones merged), then claim them in the file:
  /// false, holding nothing, when the file cannot take them as they are.
  bool AddDirectPieces(const uint8_t* buf, uint64_t len, GuestOffset at, const std::vector<ClusterPlan>& plans,
                       DirectWrite* plan);
  /// Whoever holds resizeMu_ alone to keep every request out (resize, snapshot changes) waits here
  /// for the direct writes still in flight.
  void WaitForDirectWrites();
  /// Copy the part of a compressed cluster this thread inflated last; false when it was another.
  bool ServeFromLastInflated(uint8_t* dst, const Segment& seg, GuestOffset at);
  /// Read the batch's compressed bytes with one I/O and inflate each cluster; empties the batch.
  Status ReadCompressed(CompressedBatch* batch);
  Status Inflate(const Segment& seg, const uint8_t* in, uint64_t bytes, uint8_t* cluster);
  Status MapBacking(GuestOffset at, uint64_t len, uint32_t depth, size_t maxRuns, std::vector<MapRun>* out);
  Status MapRaw(GuestOffset at, uint64_t len, uint32_t depth, size_t maxRuns, std::vector<MapRun>* out);

  // Persistent dirty bitmaps (engine_bitmaps.cc).
  /// Read the configured bitmaps' tables and data, and note their clusters as metadata.
  Status LoadBitmaps();
  Status LoadBitmap(const BitmapConfig& config, std::unique_ptr<DirtyBitmap>* out);
  /// Read a bitmap's table and data into `bitmap` (nothing noted as metadata).
  Status ReadBitmapInto(const BitmapConfig& config, DirtyBitmap* bitmap);
  /// Queue the clusters `bitmap`'s table and data use for ReleaseBitmapClusters(); under bitmapMu_.
  void QueueBitmapFrees(const DirtyBitmap& bitmap);
  /// Record that guest bytes [at, at + len) changed, in every enabled bitmap, as QEMU marks a request.
  void MarkDirty(uint64_t at, uint64_t len);
  /// Follow a disk size change in every bitmap.
  void ResizeBitmaps(uint64_t size);
  /// Write a bitmap's data clusters (reusing those it had) and its table in memory; under resizeMu_.
  Status StoreBitmapData(DirtyBitmap& bitmap, std::vector<uint64_t>* table);
  Status StoreBitmapTable(DirtyBitmap& bitmap, const std::vector<uint64_t>& table, StoredBitmap* out);
  /// `count` contiguous clusters from the allocator, noted as metadata of `kind`.
  Status AllocateMetadataClusters(uint64_t count, uint32_t kind, uint64_t* offset);

  EngineConfig config_;
  std::shared_ptr<File> image_;
  std::shared_ptr<File> dataFile_;
  Backing backing_;
  uint64_t imageFileSize_ = 0;
  std::unique_ptr<Mapper> mapper_;
  /// Distinguishes engines in per-thread caches, even when one is freed and another takes its address.
  uint64_t id_ = 0;
  std::atomic<bool> closed_{false};
  std::atomic<uint64_t> directReads_{0};

  /// Requests hold it shared; a resize holds it alone.
  std::shared_mutex resizeMu_;
  /// Guards the allocator, the queues of changes and the tables being made; never held across data I/O.
  std::mutex metaMu_;
  std::unique_ptr<Refcounts> refcounts_;
  /// Where the metadata lies (writable opens only); shared with refcounts_, which adds its blocks.
  std::shared_ptr<MetadataRanges> metadata_;
  std::vector<HostFree> pendingFrees_;
  /// New L2 tables whose L1 entries are in memory but not yet on disk, by L1 index.
  std::map<uint64_t, uint64_t> newTables_;
  /// Host offsets of L2 slices changed in memory since the last commit.
  std::set<uint64_t> dirtySlices_;
  /// Clusters whose last reference is gone, waiting until no read can still be using them.
  std::vector<uint64_t> freed_;
  uint64_t ticket_ = 0;
  /// One commit runs at a time and covers every change queued when it started.
  std::mutex commitMu_;
  std::condition_variable commitCv_;
  bool committing_ = false;
  uint64_t committed_ = 0;
  /// The first failure of the write path; every later write reports it.
  Status failure_;
  std::mutex failMu_;
  std::atomic<bool> failed_{false};
  std::atomic<int64_t> readsInflight_{0};
  /// Bumped when compressed host space is freed: per-thread inflated clusters from before are stale.
  std::atomic<uint64_t> compressedGeneration_{0};
  ClusterLocks locks_;
  /// Where the next compressed cluster goes: the free bytes at the end of the last host cluster used.
  uint64_t compressedNext_ = 0;
  uint64_t compressedEnd_ = 0;
  /// Writes the packed compressed data (made at the first compressed write).
  std::unique_ptr<CompressedStream> compressedStream_;
  /// The size GrowFileAhead() gave the file; 0 when it never grew it.
  uint64_t grownTo_ = 0;
  /// Persistent bitmaps being kept up to date; fixed at open, their bits under bitmapMu_.
  std::vector<std::unique_ptr<DirtyBitmap>> bitmaps_;
  /// bitmaps_ is not empty: requests take bitmapMu_ only then.
  std::atomic<bool> hasBitmaps_{false};
  std::mutex bitmapMu_;
  /// Clusters the stored bitmaps no longer use (metadata kind, where), freed once the directory stops naming them.
  std::vector<std::pair<uint32_t, HostFree>> bitmapFrees_;
  std::atomic<uint64_t> directWrites_{0};
  /// Direct writes planned and not yet finished; a resize waits for none to be left.
  std::atomic<int64_t> directInflight_{0};
  std::mutex directMu_;
  std::condition_variable directCv_;
};

/// What a write does to one guest cluster.
struct Engine::ClusterPlan {
  enum Action : uint8_t {
    InPlace,   ///< the cluster owns its host cluster: write the request's bytes there
    Fill,      ///< write the whole cluster to its own host cluster, then map it as data
    Allocate,  ///< write the whole cluster to a new host cluster, then map it (and drop the old one)
  };
  Action action = InPlace;
  Mapper::RawEntry entry;
  uint64_t host = 0;
  uint64_t table = 0;
  bool freeOld = false;
  /// The bytes of the cluster the write stores, [from, to): the request's part, widened to the whole
  /// cluster or (extended L2) to the subclusters that become allocated; the widening shows what the guest saw.
  uint64_t from = 0, to = 0;
  /// The subcluster bitmap of the new mapping (extended L2).
  uint64_t bitmap = 0;
  /// The new host cluster reads as zeros already, and so did the guest cluster: only the written bytes need writing.
  bool zeroed = false;
};

struct Engine::DirectWrite {
  /// Guest clusters (so host pieces) one direct write may span; longer requests take the pool.
  static constexpr size_t kMaxPieces = 8;
  /// `length` bytes of the request from `at` go to host offset `host` of `file`.
  struct Piece {
    uint64_t at;
    uint64_t length;
    uint64_t host;
  };
  Piece pieces[kMaxPieces];
  size_t count = 0;
  int fd = -1;
  File* file = nullptr;
  /// The guest clusters held: shared for writes in place, alone when mappings change.
  uint64_t first = 0, last = 0;
  bool allocating = false;
  /// The mappings of the clusters allocated, published once the data has landed.
  std::vector<L2Update> updates;
  /// The commit that writes them back, when one is due.
  uint64_t ticket = 0;
};

/// Append `run` to `out`, merging it into the last run when it continues it exactly.
void AppendRun(std::vector<MapRun>* out, const MapRun& run);

}  // namespace qcow2
