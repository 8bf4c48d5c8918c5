#include "qcow2/mapper.h"

#include <fcntl.h>

#include <algorithm>

namespace qcow2 {
namespace {

constexpr const char* kCorrupt = "ERR_QCOW2_CORRUPT";

bool CanMerge(const Segment& seg, uint64_t segStart, ClusterKind kind, bool hasHost, uint64_t host, uint64_t at) {
  if (kind != seg.kind || kind == ClusterKind::Compressed || hasHost != seg.hasHost) return false;
  return !hasHost || host == seg.host + (at - segStart);
}

/// The L1 table must map the whole disk, stay within QEMU's bound, and lie inside the file.
Status CheckL1Table(const Geometry& geometry, const HostBounds& bounds, uint64_t l1Offset, uint64_t l1Entries) {
  const uint64_t needed = geometry.L1EntriesNeeded();
  if (l1Entries < needed) {
    return Status::Error(kCorrupt, "the L1 table has " + std::to_string(l1Entries) + " entries, too few for a disk of " +
                                       std::to_string(geometry.virtualSize) + " bytes (" + std::to_string(needed) +
                                       " needed)");
  }
  if (l1Entries > kMaxL1Bytes / 8) {
    return Status::Error(kCorrupt, "the L1 table has " + std::to_string(l1Entries) + " entries, more than the limit of " +
                                       std::to_string(kMaxL1Bytes / 8));
  }
  const uint64_t l1Bytes = l1Entries * 8;
  if (l1Entries > 0 && (l1Offset & (geometry.clusterSize - 1))) {
    return Status::Error(kCorrupt, "the L1 table offset " + std::to_string(l1Offset) +
                                       " is not aligned to the cluster size " + std::to_string(geometry.clusterSize));
  }
  if (l1Offset > bounds.imageFileSize || l1Bytes > bounds.imageFileSize - l1Offset) {
    return Status::Error(kCorrupt, "the L1 table (" + std::to_string(l1Bytes) + " bytes at offset " +
                                       std::to_string(l1Offset) + ") ends past the end of the image file (" +
                                       std::to_string(bounds.imageFileSize) + " bytes)");
  }
  return Status::Ok();
}

}  // namespace

Mapper::Mapper(const Geometry& geometry, const HostBounds& bounds, std::shared_ptr<File> image,
               const MapperOptions& options)
    : geometry_(geometry),
      bounds_(bounds),
      sliceBytes_(std::min<size_t>(options.l2SliceBytes, geometry.clusterSize)),
      entriesPerSlice_(sliceBytes_ / geometry.entryBytes),
      cache_(std::move(image), sliceBytes_, options.l2CacheBytes) {
  fileSize_.store(bounds.imageFileSize);
}

Status Mapper::Load(const Geometry& geometry, const HostBounds& bounds, uint64_t l1Offset, uint64_t l1Entries,
                    std::shared_ptr<File> image, const MapperOptions& options, std::unique_ptr<Mapper>* out) {
  QCOW2_TRY(CheckL1Table(geometry, bounds, l1Offset, l1Entries));
  const uint64_t l1Bytes = l1Entries * 8;
  // The cache never needs more than every L2 table of the image.
  MapperOptions sized = options;
  sized.l2CacheBytes = std::min<uint64_t>(options.l2CacheBytes, std::max<uint64_t>(l1Entries, 1) * geometry.clusterSize);
  std::unique_ptr<Mapper> mapper(new Mapper(geometry, bounds, image, sized));
  AlignedBuffer table(std::max<uint64_t>(l1Bytes, 8));
  if (l1Bytes > 0) QCOW2_TRY(image->Read(table.data(), l1Bytes, l1Offset));
  mapper->l1_.reset(new std::atomic<uint64_t>[std::max<uint64_t>(l1Entries, 1)]);
  mapper->l1Count_ = l1Entries;
  for (uint64_t i = 0; i < l1Entries; i++) mapper->l1_[i].store(LoadBE64(table.data() + 8 * i));
  *out = std::move(mapper);
  return Status::Ok();
}

namespace {
/// Bytes of L2 tables one AdviseTables() call may ask the kernel to read ahead.
constexpr uint64_t kMaxAdvisedBytes = 32u << 20;
}  // namespace

void Mapper::AdviseTables(GuestOffset at, uint64_t length) {
  const File& file = cache_.file();
  if (length == 0 || file.direct() || file.fd() < 0) return;
  const uint64_t first = geometry_.L1Index(at);
  const uint64_t end = std::min(l1Count_, geometry_.L1Index(GuestOffset{at.value + length - 1}) + 1);
  uint64_t advised = 0;
  for (uint64_t i = first; i < end && advised + geometry_.clusterSize <= kMaxAdvisedBytes; i++) {
    uint64_t l2Offset = 0;
    // A bad entry fails the request that resolves through it, not this hint.
    if (!DecodeL1Entry(geometry_, Bounds(), i, L1Raw(i), &l2Offset).ok() || l2Offset == 0) continue;
    std::shared_ptr<const L2Slice> slice;
    if (cache_.Peek(l2Offset, &slice)) continue;
    posix_fadvise(file.fd(), static_cast<off_t>(l2Offset), static_cast<off_t>(geometry_.clusterSize), POSIX_FADV_WILLNEED);
    advised += geometry_.clusterSize;
  }
}

Status Mapper::L2SliceFor(GuestOffset at, uint64_t l2Offset, bool scan, bool cachedOnly,
                          std::shared_ptr<const L2Slice>* slice, uint64_t* firstCluster, uint64_t* sliceEnd) {
  const uint64_t sliceIndex = geometry_.L2Index(at) / entriesPerSlice_;
  const uint64_t tableFirstCluster = geometry_.L1Index(at) << geometry_.l2Bits;
  *firstCluster = tableFirstCluster + sliceIndex * entriesPerSlice_;
  *sliceEnd = (*firstCluster + entriesPerSlice_) << geometry_.clusterBits;
  const uint64_t sliceOffset = l2Offset + sliceIndex * sliceBytes_;
  if (cachedOnly) return cache_.Peek(sliceOffset, slice) ? Status::Ok() : Status::Error("ERR_QCOW2_WOULD_BLOCK", "");
  return cache_.Get(sliceOffset, slice, l2Offset, scan ? geometry_.clusterSize : 0);
}

Status Mapper::PieceAt(const L2Slice& slice, uint64_t sliceFirstCluster, GuestOffset at, Piece* out) const {
  const Geometry& g = geometry_;
  const uint64_t index = (at.value >> g.clusterBits) - sliceFirstCluster;
  const uint64_t raw = g.extendedL2 ? slice.Word(2 * index) : slice.Word(index);
  const uint64_t bitmap = g.extendedL2 ? slice.Word(2 * index + 1) : 0;
  L2Entry entry;
  QCOW2_TRY(DecodeL2Entry(g, Bounds(), GuestOffset{g.ClusterStart(at)}, raw, bitmap, &entry));
  const uint64_t clusterStart = g.ClusterStart(at);
  const uint64_t inCluster = g.InCluster(at);
  uint32_t sc = static_cast<uint32_t>(inCluster >> g.subclusterBits);
  const ClusterKind kind = entry.KindOf(g, sc);
  uint64_t end = clusterStart + g.clusterSize;
  if (g.extendedL2 && kind != ClusterKind::Compressed) {
    while (sc + 1 < kSubclusters && entry.KindOf(g, sc + 1) == kind) sc++;
    end = clusterStart + (uint64_t{sc + 1} << g.subclusterBits);
  }
  out->kind = kind;
  out->end = end;
  out->compressedBytes = entry.compressedBytes;
  if (kind == ClusterKind::Compressed) {
    out->hasHost = true;
    out->host = entry.host;
  } else {
    // Unallocated subclusters of an allocated cluster keep their host too: qemu-img map shows it.
    out->hasHost = entry.hostAllocated;
    out->host = out->hasHost ? entry.host + inCluster : 0;
  }
  return Status::Ok();
}

Status Mapper::Resolve(GuestOffset at, uint64_t maxLength, Segment* out, bool scan) {
  return ResolveIn(at, maxLength, out, scan, false);
}

bool Mapper::ResolveCached(GuestOffset at, uint64_t maxLength, Segment* out) {
  return ResolveIn(at, maxLength, out, false, true).ok();
}

Status Mapper::ResolveIn(GuestOffset at, uint64_t maxLength, Segment* out, bool scan, bool cachedOnly) {
  const Geometry& g = geometry_;
  const uint64_t l1Index = g.L1Index(at);
  if (l1Index >= l1Count_) {
    return Status::Error("ERR_QCOW2_OUT_OF_BOUNDS", "guest offset " + std::to_string(at.value) +
                                                        " is past what the L1 table maps");
  }
  uint64_t l2Offset = 0;
  QCOW2_TRY(DecodeL1Entry(g, Bounds(), l1Index, L1Raw(l1Index), &l2Offset));
  uint64_t limit = std::min(at.value + maxLength, (l1Index + 1) << (g.clusterBits + g.l2Bits));
  if (l2Offset == 0) {
    *out = Segment{ClusterKind::Unallocated, limit - at.value, false, 0, 0};
    return Status::Ok();
  }
  std::shared_ptr<const L2Slice> slice;
  uint64_t firstCluster, sliceEnd;
  QCOW2_TRY(L2SliceFor(at, l2Offset, scan, cachedOnly, &slice, &firstCluster, &sliceEnd));
  limit = std::min(limit, sliceEnd);
  Piece piece;
  QCOW2_TRY(PieceAt(*slice, firstCluster, at, &piece));
  *out = Segment{piece.kind, std::min(piece.end, limit) - at.value, piece.hasHost, piece.host, piece.compressedBytes};
  uint64_t pos = at.value + out->length;
  while (pos < limit && piece.kind != ClusterKind::Compressed) {
    // An entry that fails its checks ends the segment here; the next request for it reports the error.
    if (!PieceAt(*slice, firstCluster, GuestOffset{pos}, &piece).ok()) break;
    if (!CanMerge(*out, at.value, piece.kind, piece.hasHost, piece.host, pos)) break;
    pos = std::min(piece.end, limit);
  }
  out->length = pos - at.value;
  return Status::Ok();
}

Status Mapper::EntryAt(GuestOffset at, RawEntry* out, bool cachedOnly) {
  const Geometry& g = geometry_;
  *out = RawEntry{};
  out->l1Index = g.L1Index(at);
  if (out->l1Index >= l1Count_) {
    return Status::Error("ERR_QCOW2_OUT_OF_BOUNDS", "guest offset " + std::to_string(at.value) +
                                                        " is past what the L1 table maps");
  }
  out->l1Raw = L1Raw(out->l1Index);
  QCOW2_TRY(DecodeL1Entry(g, Bounds(), out->l1Index, out->l1Raw, &out->l2Offset));
  if (out->l2Offset == 0) return Status::Ok();
  std::shared_ptr<const L2Slice> slice;
  uint64_t firstCluster, sliceEnd;
  QCOW2_TRY(L2SliceFor(at, out->l2Offset, false, cachedOnly, &slice, &firstCluster, &sliceEnd));
  const uint64_t index = (at.value >> g.clusterBits) - firstCluster;
  out->raw = g.extendedL2 ? slice->Word(2 * index) : slice->Word(index);
  out->bitmap = g.extendedL2 ? slice->Word(2 * index + 1) : 0;
  return DecodeL2Entry(g, Bounds(), GuestOffset{g.ClusterStart(at)}, out->raw, out->bitmap, &out->entry);
}

void Mapper::GrowL1(uint64_t entries) {
  if (entries <= l1Count_) return;
  std::unique_ptr<std::atomic<uint64_t>[]> grown(new std::atomic<uint64_t>[entries]);
  for (uint64_t i = 0; i < entries; i++) grown[i].store(i < l1Count_ ? L1Raw(i) : 0);
  l1_ = std::move(grown);
  l1Count_ = entries;
}

void Mapper::NoteFileSize(uint64_t size) {
  uint64_t seen = fileSize_.load(std::memory_order_relaxed);
  while (seen < size && !fileSize_.compare_exchange_weak(seen, size, std::memory_order_release)) {
  }
}

}  // namespace qcow2
