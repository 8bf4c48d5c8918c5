#include "qcow2/engine.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "buffer.h"

namespace qcow2 {
namespace {

constexpr const char* kInvalidHeader = "ERR_QCOW2_INVALID_HEADER";

uint64_t AlignDown(uint64_t v, uint64_t a) { return v & ~(a - 1); }
uint64_t AlignUp(uint64_t v, uint64_t a) { return AlignDown(v + a - 1, a); }

/// The last cluster a worker thread decompressed, so that small sequential reads inflate it once.
struct InflatedCluster {
  uint64_t engine = 0;
  uint64_t host = 0;
  uint64_t generation = 0;
  AlignedBuffer data;
};

InflatedCluster& LastInflated() {
  thread_local InflatedCluster last;
  return last;
}

/// Compressed bytes read with one I/O are kept per thread up to this size; larger spans borrow
/// from the buffer pool, so that 32 threads never pin much memory.
constexpr uint64_t kKeptScratch = 1u << 20;
/// A batch of compressed clusters is read with one I/O spanning at most this many bytes.
constexpr uint64_t kMaxCompressedSpan = 4u << 20;
/// Gap allowed between the compressed data of consecutive clusters of one batch.
constexpr uint64_t kMaxCompressedGap = 4096;
/// The largest read of zeros served on the JS thread.
constexpr uint64_t kMaxDirectZeros = 1u << 20;

/// Data segments of one request that continue each other in the file (across L2 slices and
/// tables too), read with one call.
class HostRun {
 public:
  HostRun(File& file, uint8_t* buf) : file_(file), buf_(buf) {}

  /// Add `length` bytes for `buf + at` from host offset `host`, reading what came before when it does not continue.
  Status Add(uint64_t at, uint64_t host, uint64_t length) {
    if (length_ > 0 && at_ + length_ == at && host_ + length_ == host) {
      length_ += length;
      return Status::Ok();
    }
    QCOW2_TRY(Flush());
    at_ = at;
    host_ = host;
    length_ = length;
    return Status::Ok();
  }

  Status Flush() {
    if (length_ == 0) return Status::Ok();
    const uint64_t length = length_;
    length_ = 0;
    return file_.Read(buf_ + at_, length, host_);
  }

 private:
  File& file_;
  uint8_t* buf_;
  uint64_t at_ = 0, host_ = 0, length_ = 0;
};

Status CheckConfig(const EngineConfig& c, const std::shared_ptr<File>& dataFile) {
  if (c.clusterBits < 9 || c.clusterBits > 21) {
    return Status::Error(kInvalidHeader, "cluster bits must be between 9 and 21, got " + std::to_string(c.clusterBits));
  }
  if (c.extendedL2 && c.clusterBits < 14) {
    return Status::Error(kInvalidHeader, "extended L2 entries need clusters of at least 16384 bytes, got " +
                                             std::to_string(1ull << c.clusterBits));
  }
  if (c.refcountOrder > 6) {
    return Status::Error(kInvalidHeader, "refcount order must be at most 6, got " + std::to_string(c.refcountOrder));
  }
  if (c.externalDataFile && !dataFile) {
    return Status::Error("ERR_QCOW2_INVALID_ARGUMENT", "the image keeps its data in an external data file, and none was given");
  }
  return Status::Ok();
}

std::atomic<uint64_t> nextEngineId{1};

}  // namespace

void AppendRun(std::vector<MapRun>* out, const MapRun& run) {
  if (!out->empty()) {
    MapRun& last = out->back();
    bool continues = last.offset + last.length == run.offset && last.kind == run.kind && last.depth == run.depth &&
                     last.flags == run.flags && !(run.flags & kRunCompressed) && last.hasHost == run.hasHost &&
                     (!run.hasHost || last.host + last.length == run.host);
    if (continues) {
      last.length += run.length;
      return;
    }
  }
  out->push_back(run);
}

Status Engine::Open(const EngineConfig& config, std::shared_ptr<File> image, std::shared_ptr<File> dataFile,
                    Backing backing, std::shared_ptr<Engine>* out) {
  QCOW2_TRY(CheckConfig(config, dataFile));
  std::shared_ptr<Engine> engine(new Engine());
  engine->config_ = config;
  engine->id_ = nextEngineId.fetch_add(1);
  QCOW2_TRY(image->Size(&engine->imageFileSize_));
  if (config.writable) {
    QCOW2_TRY(Refcounts::Load(image, config.clusterBits, config.refcountOrder, config.refcountTableOffset,
                              config.refcountTableClusters, engine->imageFileSize_, &engine->refcounts_));
  }
  if (backing.engine) backing.size = std::min(backing.size, backing.engine->size());
  const Geometry geometry = Geometry::Make(config.clusterBits, config.extendedL2, config.virtualSize);
  const HostBounds bounds{engine->imageFileSize_, config.externalDataFile};
  QCOW2_TRY(Mapper::Load(geometry, bounds, config.l1TableOffset, config.l1Size, image, config.mapper, &engine->mapper_));
  engine->image_ = std::move(image);
  engine->dataFile_ = std::move(dataFile);
  engine->backing_ = std::move(backing);
  if (config.writable) QCOW2_TRY(engine->TrackMetadata());
  if (config.writable) QCOW2_TRY(engine->LoadBitmaps());
  *out = std::move(engine);
  return Status::Ok();
}

Engine::~Engine() = default;

DirectPlan Engine::PlanDirect(const uint8_t* buf, uint64_t len, GuestOffset at) {
  DirectPlan plan;
  // Never wait on the JS thread: a resize in progress, or writers on these clusters, send the read to the pool.
  std::shared_lock<std::shared_mutex> resizing(resizeMu_, std::try_to_lock);
  if (!resizing.owns_lock()) return plan;
  if (closed_.load(std::memory_order_acquire) || len == 0 || at.value > size() || len > size() - at.value) return plan;
  if (config_.writable && locks_.Busy(at.value >> geometry().clusterBits, (at.value + len - 1) >> geometry().clusterBits)) {
    return plan;
  }
  File& file = DataFile();
  const int fd = file.fd();
  const bool hasBacking = backing_.engine || backing_.raw;
  uint64_t zeros = 0;
  for (uint64_t done = 0; done < len;) {
    const GuestOffset pos{at.value + done};
    Segment seg;
    if (!mapper_->ResolveCached(pos, len - done, &seg)) return plan;
    const bool zero = seg.kind == ClusterKind::Zero ||
                      (seg.kind == ClusterKind::Unallocated && (!hasBacking || pos.value >= backing_.size));
    DirectPlan::Piece* last = plan.count > 0 ? &plan.pieces[plan.count - 1] : nullptr;
    if (zero) {
      // Zeros are written on the JS thread, so only small amounts take this way.
      if ((zeros += seg.length) > kMaxDirectZeros) return plan;
      if (last && last->zero) {
        last->length += seg.length;
      } else {
        if (plan.count == DirectPlan::kMaxPieces) return plan;
        plan.pieces[plan.count++] = {done, seg.length, 0, true};
      }
    } else {
      if (seg.kind != ClusterKind::Data || fd < 0) return plan;
      if (reinterpret_cast<uintptr_t>(buf + done) % file.memAlign() != 0 || seg.length % file.reqAlign() != 0 ||
          seg.host % file.reqAlign() != 0) {
        return plan;
      }
      if (last && !last->zero && last->host + last->length == seg.host) {
        last->length += seg.length;
      } else {
        if (plan.count == DirectPlan::kMaxPieces) return plan;
        plan.pieces[plan.count++] = {done, seg.length, seg.host, false};
      }
    }
    done += seg.length;
  }
  plan.direct = true;
  plan.fd = fd;
  plan.file = &file;
  return plan;
}

Status Engine::Live() const {
  if (closed_.load(std::memory_order_acquire)) {
    return Status::Error("ERR_QCOW2_CLOSED", "the image '" + image_->path() + "' is closed");
  }
  return Status::Ok();
}

Status Engine::Close() {
  Status status = config_.writable && !closed_.load() && !failed_.load() ? Flush() : Status::Ok();
  if (status.ok() && config_.writable) status = TrimFile();
  closed_.store(true, std::memory_order_release);
  mapper_->cache().Clear();
  return status;
}

Status Engine::Read(uint8_t* buf, uint64_t len, GuestOffset at) {
  QCOW2_TRY(Live());
  std::shared_lock<std::shared_mutex> resizing(resizeMu_);
  return ReadLocked(buf, len, at);
}

Status Engine::ReadLocked(uint8_t* buf, uint64_t len, GuestOffset at) {
  // Counted, so that clusters freed meanwhile are not reused under this read.
  BeginRead();
  struct Done {
    Engine* e;
    ~Done() { e->EndRead(); }
  } done{this};
  if (at.value > size() || len > size() - at.value) {
    return Status::Error("ERR_QCOW2_OUT_OF_BOUNDS", "read of " + std::to_string(len) + " bytes at guest offset " +
                                                        std::to_string(at.value) + " is past the end of the disk (" +
                                                        std::to_string(size()) + " bytes)");
  }
  HostRun data(DataFile(), buf);
  CompressedBatch batch;
  // A request spanning over an eighth of what one L2 table maps loads whole tables on misses.
  const bool scan = len > (geometry().clusterSize << geometry().l2Bits) / 8;
  for (uint64_t done = 0; done < len;) {
    const GuestOffset pos{at.value + done};
    Segment seg;
    QCOW2_TRY(mapper_->Resolve(pos, len - done, &seg, scan));
    uint8_t* dst = buf + done;
    if (seg.kind == ClusterKind::Data) {
      QCOW2_TRY(data.Add(done, seg.host, seg.length));
    } else if (seg.kind == ClusterKind::Zero) {
      std::memset(dst, 0, seg.length);
    } else if (seg.kind == ClusterKind::Unallocated) {
      QCOW2_TRY(ReadBacking(dst, seg.length, pos));
    } else if (!ServeFromLastInflated(dst, seg, pos)) {
      if (!batch.Continues(seg)) QCOW2_TRY(ReadCompressed(&batch));
      batch.Add(dst, seg, pos);
    }
    done += seg.length;
  }
  QCOW2_TRY(data.Flush());
  return ReadCompressed(&batch);
}

Status Engine::ReadBacking(uint8_t* buf, uint64_t len, GuestOffset at) {
  const uint64_t avail = at.value < backing_.size ? std::min(len, backing_.size - at.value) : 0;
  if (avail > 0) {
    if (backing_.engine) {
      QCOW2_TRY(backing_.engine->Read(buf, avail, at));
    } else {
      QCOW2_TRY(backing_.raw->Read(buf, avail, at.value));
    }
  }
  std::memset(buf + avail, 0, len - avail);
  return Status::Ok();
}

bool CompressedBatch::Continues(const Segment& seg) const {
  if (count == 0) return true;
  if (count == kMaxItems) return false;
  const Item& last = items[count - 1];
  const uint64_t lastEnd = last.seg.host + last.seg.compressedBytes;
  return seg.host >= last.seg.host && seg.host <= lastEnd + kMaxCompressedGap &&
         seg.host + seg.compressedBytes - items[0].seg.host <= kMaxCompressedSpan;
}

void CompressedBatch::Add(uint8_t* dst, const Segment& seg, GuestOffset at) { items[count++] = {dst, seg, at}; }

bool Engine::ServeFromLastInflated(uint8_t* dst, const Segment& seg, GuestOffset at) {
  const InflatedCluster& last = LastInflated();
  if (last.engine != id_ || last.host != seg.host || last.data.size() != geometry().clusterSize ||
      last.generation != compressedGeneration_.load(std::memory_order_acquire)) {
    return false;
  }
  std::memcpy(dst, last.data.data() + geometry().InCluster(at), seg.length);
  return true;
}

Status Engine::ReadCompressed(CompressedBatch* batch) {
  if (batch->count == 0) return Status::Ok();
  const uint64_t clusterSize = geometry().clusterSize;
  // A descriptor bounds its input (at most two clusters); the file's end may come sooner.
  auto inputBytes = [&](const Segment& seg) {
    return std::min({seg.compressedBytes, mapper_->fileSize() - seg.host, 2 * clusterSize});
  };
  uint64_t end = 0;
  for (size_t i = 0; i < batch->count; i++) end = std::max(end, batch->items[i].seg.host + inputBytes(batch->items[i].seg));
  const uint64_t first = AlignDown(batch->items[0].seg.host, kBufferAlign);
  const uint64_t span = AlignUp(end, kBufferAlign) - first;
  thread_local AlignedBuffer kept;
  AlignedBuffer borrowed;
  AlignedBuffer* scratch = &kept;
  if (span > kKeptScratch) {
    borrowed = AlignedBuffer(span);
    scratch = &borrowed;
  } else if (kept.size() < span) {
    kept = AlignedBuffer(span);
  }
  const size_t count = batch->count;
  batch->count = 0;
  QCOW2_TRY(image_->Read(scratch->data(), span, first));
  for (size_t i = 0; i < count; i++) {
    const CompressedBatch::Item& item = batch->items[i];
    const uint8_t* in = scratch->data() + (item.seg.host - first);
    const uint64_t inCluster = geometry().InCluster(item.at);
    if (inCluster == 0 && item.seg.length == clusterSize) {
      QCOW2_TRY(Inflate(item.seg, in, inputBytes(item.seg), item.dst));
      continue;
    }
    InflatedCluster& last = LastInflated();
    if (last.data.size() != clusterSize) last.data = AlignedBuffer(clusterSize);
    last.engine = 0;
    const uint64_t generation = compressedGeneration_.load(std::memory_order_acquire);
    QCOW2_TRY(Inflate(item.seg, in, inputBytes(item.seg), last.data.data()));
    last.engine = id_;
    last.generation = generation;
    last.host = item.seg.host;
    std::memcpy(item.dst, last.data.data() + inCluster, item.seg.length);
  }
  return Status::Ok();
}

Status Engine::Inflate(const Segment& seg, const uint8_t* in, uint64_t bytes, uint8_t* cluster) {
  Status st = DecompressCluster(config_.compression, in, bytes, cluster, geometry().clusterSize);
  if (!st.ok()) st.message = "compressed cluster at host offset " + std::to_string(seg.host) + ": " + st.message;
  return st;
}

Status Engine::Map(GuestOffset at, uint64_t len, uint32_t depth, size_t maxRuns, std::vector<MapRun>* out) {
  QCOW2_TRY(Live());
  std::shared_lock<std::shared_mutex> resizing(resizeMu_);
  if (at.value > size() || len > size() - at.value) {
    return Status::Error("ERR_QCOW2_OUT_OF_BOUNDS", "map of " + std::to_string(len) + " bytes at guest offset " +
                                                        std::to_string(at.value) + " is past the end of the disk (" +
                                                        std::to_string(size()) + " bytes)");
  }
  const uint32_t dataFlags = config_.externalDataFile ? uint32_t{kRunDataFile} : 0u;
  const uint64_t end = at.value + len;
  mapper_->AdviseTables(at, len);
  for (uint64_t pos = at.value; pos < end && out->size() < maxRuns;) {
    Segment seg;
    QCOW2_TRY(mapper_->Resolve(GuestOffset{pos}, end - pos, &seg, /*scan=*/true));
    switch (seg.kind) {
      case ClusterKind::Data:
        AppendRun(out, {pos, seg.length, RunKind::Data, depth, true, seg.host, dataFlags});
        break;
      case ClusterKind::Zero:
        AppendRun(out, {pos, seg.length, RunKind::Zero, depth, seg.hasHost, seg.host, seg.hasHost ? dataFlags : 0});
        break;
      case ClusterKind::Compressed:
        AppendRun(out, {pos, seg.length, RunKind::Data, depth, true, seg.host, kRunCompressed});
        break;
      case ClusterKind::Unallocated:
        if (!backing_.engine && !backing_.raw && seg.hasHost) {
          // Unallocated subclusters of an allocated cluster, with nothing below: qemu-img map shows where they lie.
          AppendRun(out, {pos, seg.length, RunKind::Unallocated, depth, true, seg.host, dataFlags});
        } else {
          QCOW2_TRY(MapBacking(GuestOffset{pos}, seg.length, depth, maxRuns, out));
        }
        break;
    }
    pos += seg.length;
  }
  return Status::Ok();
}

Status Engine::MapBacking(GuestOffset at, uint64_t len, uint32_t depth, size_t maxRuns, std::vector<MapRun>* out) {
  const bool hasBacking = backing_.engine || backing_.raw;
  const uint64_t avail = hasBacking && at.value < backing_.size ? std::min(len, backing_.size - at.value) : 0;
  if (avail > 0) {
    if (backing_.engine) {
      QCOW2_TRY(backing_.engine->Map(at, avail, depth + 1, maxRuns, out));
    } else {
      QCOW2_TRY(MapRaw(at, avail, depth + 1, maxRuns, out));
    }
    const MapRun& last = out->back();
    if (last.offset + last.length < at.value + avail) return Status::Ok();  // stopped at maxRuns
  }
  if (avail < len) {
    // Past the end of the backing image the disk reads as zeros, reported (as qemu-img map
    // does) at the depth of the image whose backing ended.
    AppendRun(out, {at.value + avail, len - avail, RunKind::Unallocated, depth, false, 0, 0});
  }
  return Status::Ok();
}

Status Engine::MapRaw(GuestOffset at, uint64_t len, uint32_t depth, size_t maxRuns, std::vector<MapRun>* out) {
  File& raw = *backing_.raw;
  const uint64_t end = at.value + len;
  for (uint64_t pos = at.value; pos < end && out->size() < maxRuns;) {
    // Holes of a raw file read as zeros; without SEEK_DATA support everything counts as data.
    uint64_t data = pos;
    if (!raw.SeekData(pos, &data).ok()) data = pos;
    data = std::min(std::max(data, pos), end);
    if (data > pos) {
      AppendRun(out, {pos, data - pos, RunKind::Zero, depth, true, pos, kRunRawFile});
      pos = data;
      continue;
    }
    uint64_t hole = end;
    if (!raw.SeekHole(pos, &hole).ok() || hole <= pos) hole = end;
    hole = std::min(hole, end);
    AppendRun(out, {pos, hole - pos, RunKind::Data, depth, true, pos, kRunRawFile});
    pos = hole;
  }
  return Status::Ok();
}

}  // namespace qcow2
