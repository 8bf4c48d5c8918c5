#include "qcow2/layout.h"

#include <cstdio>

namespace qcow2 {
namespace {

constexpr const char* kCorrupt = "ERR_QCOW2_CORRUPT";

Status Corrupt(const std::string& message) { return Status::Error(kCorrupt, message); }

std::string L2What(GuestOffset where, uint64_t raw) {
  return "L2 entry " + Hex(raw) + " for guest offset " + std::to_string(where.value);
}

Status DecodeCompressed(const Geometry& g, const HostBounds& bounds, GuestOffset where, uint64_t raw, uint64_t bitmap,
                        L2Entry* out) {
  if (bounds.externalData) return Corrupt(L2What(where, raw) + " is compressed, which an external data file excludes");
  if (bitmap != 0) return Corrupt(L2What(where, raw) + ": compressed clusters must have a zero subcluster bitmap, got " + Hex(bitmap));
  const uint32_t x = g.CompressedOffsetBits();
  const uint64_t offset = raw & ((1ull << x) - 1);
  const uint64_t sectors = (raw >> x) & ((1ull << (62 - x)) - 1);
  if (offset >> 56 != 0) return Corrupt(L2What(where, raw) + ": compressed data offset " + Hex(offset) + " uses bits above 55");
  if (offset < g.clusterSize || offset >= bounds.imageFileSize) {
    return Corrupt(L2What(where, raw) + ": compressed data offset " + std::to_string(offset) +
                   " is outside the image file (" + std::to_string(bounds.imageFileSize) + " bytes)");
  }
  out->compressed = true;
  out->host = offset;
  out->compressedBytes = (sectors + 1) * kSectorSize - (offset & (kSectorSize - 1));
  return Status::Ok();
}

Status DecodeStandard(const Geometry& g, const HostBounds& bounds, GuestOffset where, uint64_t raw, uint64_t bitmap,
                      L2Entry* out) {
  if (raw & kL2ReservedMask) {
    return Corrupt(L2What(where, raw) + " has reserved bits set (" + Hex(raw & kL2ReservedMask) + ")");
  }
  const uint64_t host = raw & kOffsetMask;
  if (host & (g.clusterSize - 1)) {
    return Corrupt(L2What(where, raw) + ": host offset " + std::to_string(host) + " is not aligned to the cluster size " +
                   std::to_string(g.clusterSize));
  }
  out->host = host;
  out->hostAllocated = host != 0 || (bounds.externalData && (raw & kCopiedFlag));
  const uint64_t guest = where.value & ~(g.clusterSize - 1);
  if (bounds.externalData && out->hostAllocated && host != guest) {
    // An external data file holds each cluster at its guest offset (QEMU refuses any other as corrupt).
    return Corrupt(L2What(where, raw) + ": host offset " + std::to_string(host) +
                   " in the external data file does not match the guest cluster offset " + std::to_string(guest));
  }
  bool readsHost;
  if (g.extendedL2) {
    out->allocMask = static_cast<uint32_t>(bitmap);
    out->zeroMask = static_cast<uint32_t>(bitmap >> 32);
    if (out->allocMask & out->zeroMask) {
      return Corrupt(L2What(where, raw) + ": subcluster bitmap " + Hex(bitmap) +
                     " marks subclusters both allocated and zero");
    }
    if (out->allocMask && !out->hostAllocated) {
      return Corrupt(L2What(where, raw) + ": subcluster bitmap " + Hex(bitmap) + " allocates subclusters of a cluster without a host offset");
    }
    readsHost = out->allocMask != 0;
  } else {
    out->zero = raw & kZeroFlag;
    readsHost = out->hostAllocated && !out->zero;
  }
  if (readsHost && !bounds.externalData && host >= bounds.imageFileSize) {
    return Corrupt(L2What(where, raw) + ": host offset " + std::to_string(host) + " is past the end of the image file (" +
                   std::to_string(bounds.imageFileSize) + " bytes)");
  }
  return Status::Ok();
}

}  // namespace

std::string Hex(uint64_t value) {
  char text[24];
  std::snprintf(text, sizeof text, "0x%016llx", static_cast<unsigned long long>(value));
  return text;
}

Status DecodeL1Entry(const Geometry& g, const HostBounds& bounds, uint64_t index, uint64_t raw, uint64_t* l2Offset) {
  const uint64_t offset = raw & kOffsetMask;
  const bool reserved = raw & kL1ReservedMask;
  const bool unaligned = offset & (g.clusterSize - 1);
  const bool outside = offset != 0 && offset >= bounds.imageFileSize;
  if (!reserved && !unaligned && !outside) {
    *l2Offset = offset;
    return Status::Ok();
  }
  const std::string what = "L1 entry " + std::to_string(index) + " (" + Hex(raw) + ")";
  if (reserved) return Corrupt(what + " has reserved bits set (" + Hex(raw & kL1ReservedMask) + ")");
  if (unaligned) {
    return Corrupt(what + ": L2 table offset " + std::to_string(offset) + " is not aligned to the cluster size " +
                   std::to_string(g.clusterSize));
  }
  return Corrupt(what + ": L2 table offset " + std::to_string(offset) + " is past the end of the image file (" +
                 std::to_string(bounds.imageFileSize) + " bytes)");
}

Status DecodeL2Entry(const Geometry& g, const HostBounds& bounds, GuestOffset where, uint64_t raw, uint64_t bitmap,
                     L2Entry* out) {
  *out = L2Entry{};
  if (raw & kCompressedFlag) return DecodeCompressed(g, bounds, where, raw, bitmap, out);
  return DecodeStandard(g, bounds, where, raw, bitmap, out);
}

}  // namespace qcow2
