// The io_uring of the JS thread: requests that need no worker (reads from cached tables, writes
// into clusters an image owns, NativeFile writes) are submitted from the JS thread, and their
// completions come back through an eventfd that the event loop polls — no thread hand-off.
#pragma once
#include <napi.h>

#include <cstdint>

namespace qcow2 {

/// An entry of the ring, told its result on the JS thread.
struct RingOp {
  virtual ~RingOp() = default;
  /// `result`: bytes transferred, or -errno (also for an entry the kernel never took).
  virtual void Done(Napi::Env env, int result) = 0;
};

/// What one submission queue entry asks.
struct RingEntry {
  uint8_t opcode;
  int fd;
  uint64_t addr;
  uint64_t length;
  uint64_t offset;
  RingOp* op;
};

/// I/O may skip the pool through the ring (QCOW2_IO_URING=0 turns it off).
bool RingEnabled();

/// Queue `count` entries on the ring of the calling JS thread (made on first use). False, with
/// nothing queued, when the kernel refuses io_uring or the ring lacks room. Entries the kernel then
/// refuses are told so (Done with a negative result).
bool RingSubmit(Napi::Env env, const RingEntry* entries, unsigned count);

/// True when the ring of the calling JS thread exists and could take `count` entries now.
bool RingHasRoom(Napi::Env env, unsigned count);

}  // namespace qcow2
