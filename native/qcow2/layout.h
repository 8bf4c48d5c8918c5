// The qcow2 mapping structures as they lie on disk: L1 and L2 entry formats, compressed
// cluster descriptors, extended L2 subcluster bitmaps, and the unit types that keep guest
// offsets, host offsets and cluster indices apart.
#pragma once
#include <cstdint>
#include <string>

#include "status.h"

namespace qcow2 {

/// A byte offset in the virtual disk the guest sees.
struct GuestOffset {
  uint64_t value = 0;
};

/// A byte offset in a host file (the image file or its external data file).
struct HostOffset {
  uint64_t value = 0;
};

/// What a range of guest bytes reads as, as one L2 entry (or one subcluster) describes it.
enum class ClusterKind : uint8_t {
  Unallocated,  ///< not in this image: read from the backing image, or zeros without one
  Zero,         ///< reads as zeros (a host cluster may be preallocated, never read)
  Data,         ///< stored uncompressed at a host offset
  Compressed,   ///< stored compressed: a whole cluster decompressed from a host byte range
};

/// Entry bits shared by L1 and L2 entries.
constexpr uint64_t kCopiedFlag = 1ull << 63;
constexpr uint64_t kCompressedFlag = 1ull << 62;
/// Bits 9-55: the host offset of an L2 table (L1 entry) or a data cluster (L2 entry).
constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;
/// L1 entry bits that must be zero: 0-8 and 56-62.
constexpr uint64_t kL1ReservedMask = ~(kOffsetMask | kCopiedFlag);
/// Standard L2 descriptor bit 0: the cluster reads as zeros (version 3, without extended L2).
constexpr uint64_t kZeroFlag = 1ull;
/// Standard L2 descriptor bits that must be zero: 1-8 and 56-61.
constexpr uint64_t kL2ReservedMask = 0x3f000000000001feull;
/// Compressed data is counted in 512-byte sectors.
constexpr uint64_t kSectorSize = 512;
/// Extended L2 entries split a cluster into this many subclusters.
constexpr uint32_t kSubclusters = 32;
/// QEMU's bound on the active L1 table, a sane limit for any image.
constexpr uint64_t kMaxL1Bytes = 32ull << 20;

/// Big-endian 64-bit load from unaligned memory.
inline uint64_t LoadBE64(const uint8_t* p) {
  uint64_t v;
  __builtin_memcpy(&v, p, 8);
  return __builtin_bswap64(v);
}

inline void StoreBE64(uint8_t* p, uint64_t v) {
  v = __builtin_bswap64(v);
  __builtin_memcpy(p, &v, 8);
}

inline void StoreBE32(uint8_t* p, uint32_t v) {
  v = __builtin_bswap32(v);
  __builtin_memcpy(p, &v, 4);
}

/// The shape of an image's mapping tables, derived once from the header values.
struct Geometry {
  uint32_t clusterBits = 16;
  uint64_t clusterSize = 1ull << 16;
  bool extendedL2 = false;
  /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
  uint32_t entryBytes = 8;
  /// log2 of the entries of one L2 table.
  uint32_t l2Bits = 13;
  /// log2 of the bytes one subcluster covers (the cluster itself without extended L2).
  uint32_t subclusterBits = 16;
  uint64_t virtualSize = 0;

  static Geometry Make(uint32_t clusterBits, bool extendedL2, uint64_t virtualSize) {
    Geometry g;
    g.clusterBits = clusterBits;
    g.clusterSize = 1ull << clusterBits;
    g.extendedL2 = extendedL2;
    g.entryBytes = extendedL2 ? 16 : 8;
    g.l2Bits = clusterBits - (extendedL2 ? 4 : 3);
    g.subclusterBits = extendedL2 ? clusterBits - 5 : clusterBits;
    g.virtualSize = virtualSize;
    return g;
  }
  uint64_t l2Entries() const { return 1ull << l2Bits; }
  /// Guest bytes one L1 entry (a whole L2 table) maps.
  uint64_t l1Span() const { return 1ull << (clusterBits + l2Bits); }
  uint64_t L1Index(GuestOffset g) const { return g.value >> (clusterBits + l2Bits); }
  uint64_t L2Index(GuestOffset g) const { return (g.value >> clusterBits) & (l2Entries() - 1); }
  uint64_t InCluster(GuestOffset g) const { return g.value & (clusterSize - 1); }
  uint64_t ClusterStart(GuestOffset g) const { return g.value & ~(clusterSize - 1); }
  /// L1 entries needed to map the whole virtual disk.
  uint64_t L1EntriesNeeded() const { return (virtualSize + l1Span() - 1) >> (clusterBits + l2Bits); }
  /// Bit position of the sector count in a compressed descriptor (x in the spec).
  uint32_t CompressedOffsetBits() const { return 62 - (clusterBits - 8); }
};

/// Where the files an image maps into end, for bounds checks of host offsets.
struct HostBounds {
  uint64_t imageFileSize = 0;
  /// Data clusters live in an external data file: their offsets are not checked against the image file.
  bool externalData = false;
};

/// One decoded L2 entry: a standard cluster (maybe with subclusters) or a compressed one.
struct L2Entry {
  bool compressed = false;
  /// Standard: the host cluster offset holds the cluster (offset != 0, or bit 63 with a data file).
  bool hostAllocated = false;
  /// Standard: the host cluster offset. Compressed: the byte offset of the compressed data.
  uint64_t host = 0;
  /// Compressed: bytes the descriptor covers (the data may end sooner; never more than two clusters).
  uint64_t compressedBytes = 0;
  /// Standard without extended L2: bit 0, the cluster reads as zeros.
  bool zero = false;
  /// Extended L2: allocation and reads-as-zero bitmaps, bit i for subcluster i.
  uint32_t allocMask = 0;
  uint32_t zeroMask = 0;

  /// The kind of subcluster `sc` (0 without extended L2 entries, where the cluster is one piece).
  ClusterKind KindOf(const Geometry& g, uint32_t sc) const {
    if (compressed) return ClusterKind::Compressed;
    if (!g.extendedL2) {
      if (zero) return ClusterKind::Zero;
      return hostAllocated ? ClusterKind::Data : ClusterKind::Unallocated;
    }
    if (allocMask >> sc & 1) return ClusterKind::Data;
    if (zeroMask >> sc & 1) return ClusterKind::Zero;
    return ClusterKind::Unallocated;
  }
};

/// `value` as 0x followed by 16 hex digits, the way error messages show raw entries.
std::string Hex(uint64_t value);

/// Decode and validate an L1 entry: `*l2Offset` is the L2 table offset, 0 when unallocated.
Status DecodeL1Entry(const Geometry& g, const HostBounds& bounds, uint64_t index, uint64_t raw, uint64_t* l2Offset);

/// Decode and validate the L2 entry mapping guest offset `where` (`bitmap` is 0 without extended L2).
Status DecodeL2Entry(const Geometry& g, const HostBounds& bounds, GuestOffset where, uint64_t raw, uint64_t bitmap,
                     L2Entry* out);

}  // namespace qcow2
