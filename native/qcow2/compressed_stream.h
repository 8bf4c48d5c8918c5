// Compressed clusters are packed back to back into host clusters, so two of them usually share a
// sector. Written one by one through O_DIRECT, each would read back and rewrite the sectors at its
// edges, two I/Os per cluster that wait for each other. The stream instead keeps the bytes of the
// last, partly filled sector in memory, gathers what the requests in flight pack in a row, and
// writes it with one aligned write: one writer at a time, in packing order, so that when two
// writes share a sector the later one (which holds the bytes of both) lands last.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>

#include "buffer.h"
#include "file.h"
#include "status.h"

namespace qcow2 {

class CompressedStream {
 public:
  /// Writes go to `file` in whole units of `align` bytes (a power of two no larger than a
  /// cluster, so that the units never reach past the host clusters the data was packed into).
  CompressedStream(File& file, uint64_t align) : file_(file), align_(align), tail_(align) {}

  struct Batch;
  /// What a caller waits on: the batch holding the bytes it appended.
  using Ticket = std::shared_ptr<Batch>;

  /// Take `bytes` of compressed data packed at host offset `host`. Calls come in packing order:
  /// `host` continues the previous call's data, or starts a new run at an `align`-aligned offset.
  Status Append(const uint8_t* data, uint64_t bytes, uint64_t host, Ticket* ticket);
  /// Return once everything appended up to `ticket` is in the file (written by this thread or
  /// by another that got there first), or with the error that write met.
  Status Wait(const Ticket& ticket);

 private:
  Status WriteBatch(Batch& batch);

  File& file_;
  const uint64_t align_;
  std::mutex mu_;
  std::condition_variable cv_;
  /// Batches not written yet, in packing order; appends go to the last one until a writer takes it.
  std::deque<Ticket> pending_;
  bool open_ = false;
  bool writing_ = false;
  /// Just past the last byte appended (0 before the first), and the bytes of its sector before it.
  uint64_t end_ = 0;
  AlignedBuffer tail_;
};

/// Host bytes [base, base + filled), `base` aligned; the first bytes may repeat the previous
/// batch's last sector.
struct CompressedStream::Batch {
  uint64_t base = 0;
  uint64_t filled = 0;
  AlignedBuffer buffer;
  bool written = false;
  Status status;
};

}  // namespace qcow2
