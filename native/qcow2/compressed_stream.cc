#include "qcow2/compressed_stream.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

namespace qcow2 {
namespace {

/// A batch's room: enough for the data of the requests in flight to go out in a few writes.
constexpr uint64_t kBatchBytes = 1ull << 20;

uint64_t AlignUp(uint64_t n, uint64_t align) { return (n + align - 1) & ~(align - 1); }

}  // namespace

Status CompressedStream::Append(const uint8_t* data, uint64_t bytes, uint64_t host, Ticket* ticket) {
  std::lock_guard<std::mutex> lock(mu_);
  const bool continues = end_ != 0 && host == end_;
  Batch* open = open_ ? pending_.back().get() : nullptr;
  if (!(open && continues && AlignUp(open->filled + bytes, align_) <= open->buffer.size())) {
    const uint64_t base = host & ~(align_ - 1);
    // The bytes before `host` in its first unit are another cluster's: only known when it continues the stream.
    if (base != host && !continues) {
      return Status::Error("ERR_QCOW2_INTERNAL", "compressed data packed at host offset " + std::to_string(host) +
                                                     " neither continues the stream (at " + std::to_string(end_) +
                                                     ") nor starts a new unit");
    }
    auto batch = std::make_shared<Batch>();
    batch->base = base;
    batch->buffer = AlignedBuffer(std::max(kBatchBytes, AlignUp(host - base + bytes, align_)));
    std::memcpy(batch->buffer.data(), tail_.data(), host - base);
    batch->filled = host - base;
    pending_.push_back(batch);
    open_ = true;
    open = batch.get();
  }
  std::memcpy(open->buffer.data() + open->filled, data, bytes);
  open->filled += bytes;
  end_ = host + bytes;
  const uint64_t unit = end_ & ~(align_ - 1);
  std::memcpy(tail_.data(), open->buffer.data() + (unit - open->base), end_ - unit);
  *ticket = pending_.back();
  return Status::Ok();
}

Status CompressedStream::Wait(const Ticket& ticket) {
  std::unique_lock<std::mutex> lock(mu_);
  while (!ticket->written) {
    if (writing_) {
      cv_.wait(lock);
      continue;
    }
    // Write everything appended so far: the callers waiting meanwhile are served by one write.
    writing_ = true;
    open_ = false;
    std::vector<Ticket> batches(pending_.begin(), pending_.end());
    pending_.clear();
    lock.unlock();
    Status status;
    for (const Ticket& batch : batches) {
      // After a failure the later batches are not written: their sectors may hold the earlier ones' bytes.
      batch->status = status.ok() ? WriteBatch(*batch) : status;
      status = batch->status;
    }
    lock.lock();
    for (const Ticket& batch : batches) batch->written = true;
    writing_ = false;
    cv_.notify_all();
  }
  return ticket->status;
}

Status CompressedStream::WriteBatch(Batch& batch) {
  const uint64_t length = AlignUp(batch.filled, align_);
  // The padding is free space of the last host cluster: later data overwrites it.
  std::memset(batch.buffer.data() + batch.filled, 0, length - batch.filled);
  return file_.Write(batch.buffer.data(), length, batch.base);
}

}  // namespace qcow2
