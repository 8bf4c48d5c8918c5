#include "qcow2/rebuild.h"

#include <new>

namespace qcow2 {

Status RebuildRefcounts(File& image, const RebuildRequest& r, RebuildResult* out) {
  uint64_t fileSize = 0;
  QCOW2_TRY(image.Size(&fileSize));
  const uint64_t clusterSize = 1ull << r.walk.clusterBits;
  ReferenceCounts counts(r.walk.refcountOrder);
  counts.Resize((fileSize + clusterSize - 1) / clusterSize);
  CheckReport report;
  bool rebuild = false;
  // The old refcount structure is not counted: the new one replaces it and its clusters become free.
  QCOW2_TRY(CountReferences(image, r.walk, false, &counts, &report, &rebuild));
  if (!report.failure.empty() || report.corruptions || report.checkErrors) {
    const std::string first = report.messages.empty() ? report.failure : report.messages.front();
    return Status::Error("ERR_QCOW2_CORRUPT", "cannot rebuild the refcounts of a dirty image whose metadata is corrupt: " + first);
  }
  // Past everything the file holds, so a crash before the header moves leaves the old structure intact.
  NewRefcountStructure made;
  try {
    QCOW2_TRY(WriteRefcountStructure(image, r.walk, counts.size(), &counts, &made));
  } catch (const std::bad_alloc&) {
    return Status::Error("ENOMEM", "rebuilding the refcounts: Cannot allocate memory");
  }
  QCOW2_TRY(WriteIncompatibleFeatures(image, r.walk.header, r.incompatibleFeatures & ~1ull));
  QCOW2_TRY(image.Flush());
  out->refcountTableOffset = made.tableOffset;
  out->refcountTableClusters = made.tableClusters;
  return Status::Ok();
}

}  // namespace qcow2
