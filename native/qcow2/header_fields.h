// Where the header fields lie that native code updates in place (refcount table, L1 table, size,
// feature bits). Their offsets are written down once, in ts/qcow2/header.ts (HEADER_FIELD_OFFSETS),
// and handed to the addon with every writable open: no C++ file knows the header layout.
#pragma once
#include <napi.h>

#include <cstdint>

#include "file.h"
#include "status.h"

namespace qcow2 {

/// Byte offsets of header fields, as TypeScript gives them.
struct HeaderFields {
  uint64_t size = 0;
  uint64_t l1Size = 0;
  uint64_t l1TableOffset = 0;
  uint64_t refcountTableOffset = 0;
  uint64_t refcountTableClusters = 0;
  uint64_t incompatibleFeatures = 0;
};

/// Read `params.headerFields` ({ size, l1Size, … } offsets); a TypeError names what is missing.
HeaderFields ParseHeaderFields(const Napi::Object& params);

/// Point the header at a refcount table. Where the two fields are adjacent (every qcow2 version has
/// them so) they go in one write, so that a crash never pairs the new offset with the old size.
Status WriteRefcountTableFields(File& image, const HeaderFields& fields, uint64_t offset, uint64_t clusters);

/// Store the incompatible feature bits (dirty, corrupt, …).
Status WriteIncompatibleFeatures(File& image, const HeaderFields& fields, uint64_t bits);

}  // namespace qcow2
