// The qcow2 read engine: one guest request in, the fewest host reads out. A backing image is
// another Engine (or a raw File) read directly from here, whatever the depth of the chain.
#pragma once
#include <atomic>
#include <memory>
#include <vector>

#include "file.h"
#include "qcow2/compress.h"
#include "qcow2/mapper.h"

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
  /// The engine's own descriptor of the file the reads are from, and the File (for short reads).
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

  /// Refuse further requests and drop the cached tables; requests already running finish.
  void Close();
  ~Engine();

  const Geometry& geometry() const { return mapper_->geometry(); }
  uint64_t size() const { return geometry().virtualSize; }
  L2Cache& cache() { return mapper_->cache(); }

 private:
  Engine() = default;
  Status Live() const;
  File& DataFile() const { return config_.externalDataFile ? *dataFile_ : *image_; }
  Status ReadBacking(uint8_t* buf, uint64_t len, GuestOffset at);
  /// Copy the part of a compressed cluster this thread inflated last; false when it was another.
  bool ServeFromLastInflated(uint8_t* dst, const Segment& seg, GuestOffset at);
  /// Read the batch's compressed bytes with one I/O and inflate each cluster; empties the batch.
  Status ReadCompressed(CompressedBatch* batch);
  Status Inflate(const Segment& seg, const uint8_t* in, uint64_t bytes, uint8_t* cluster);
  Status MapBacking(GuestOffset at, uint64_t len, uint32_t depth, size_t maxRuns, std::vector<MapRun>* out);
  Status MapRaw(GuestOffset at, uint64_t len, uint32_t depth, size_t maxRuns, std::vector<MapRun>* out);

  EngineConfig config_;
  std::shared_ptr<File> image_;
  std::shared_ptr<File> dataFile_;
  Backing backing_;
  uint64_t imageFileSize_ = 0;
  std::unique_ptr<Mapper> mapper_;
  /// Distinguishes engines in per-thread caches, even when one is freed and another takes its address.
  uint64_t id_ = 0;
  std::atomic<bool> closed_{false};
  /// A descriptor of DataFile() for direct reads (O_DIRECT when the File is); -1 when it would not open.
  int directFd_ = -1;
  std::atomic<uint64_t> directReads_{0};
};

/// Append `run` to `out`, merging it into the last run when it continues it exactly.
void AppendRun(std::vector<MapRun>* out, const MapRun& run);

}  // namespace qcow2
