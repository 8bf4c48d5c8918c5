// Decompression of compressed clusters: raw deflate (zlib, from Node's own copy) and zstd
// (libzstd.so.1, loaded on first use so that a machine without it still reads other images).
#pragma once
#include <cstddef>
#include <cstdint>

#include "status.h"

namespace qcow2 {

/// The compression_type header field.
enum class Compression : uint8_t { Zlib = 0, Zstd = 1 };

/// Inflate one cluster: exactly `outLen` bytes into `out` from at most `inLen` bytes of `in`.
/// Data that does not decode, or decodes to a different length, is ERR_QCOW2_CORRUPT; a missing
/// libzstd is ERR_QCOW2_UNSUPPORTED. Safe to call from any number of threads at once.
Status DecompressCluster(Compression type, const uint8_t* in, size_t inLen, uint8_t* out, size_t outLen);

/// Compress one cluster of `inLen` bytes into `out` (room for `outCap` bytes): raw deflate with a
/// 4 KiB window, or a zstd frame recording the content size. `*outLen` = 0 when the result would not
/// fit in `outCap` bytes (the caller then stores the cluster uncompressed).
Status CompressCluster(Compression type, const uint8_t* in, size_t inLen, uint8_t* out, size_t outCap, size_t* outLen);

}  // namespace qcow2
