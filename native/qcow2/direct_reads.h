// Reads (and NativeFile writes) that skip the worker pool. A request the engine can map without I/O to one read of one
// file (aligned, when the file bypasses the page cache) is submitted to an io_uring from the JS
// thread and completed in the event loop (the ring signals an eventfd that libuv polls): no
// thread hand-off on either side. Everything else — misses in the L2 cache, compressed
// clusters, backing files, unaligned O_DIRECT buffers — takes the pool as before.
#pragma once
#include <napi.h>

#include <memory>

#include "qcow2/engine.h"

namespace qcow2 {

/// Try to serve `buf` (pinned by `keep`) from guest offset `at` without the pool. Returns an empty
/// value when the request must take the pool instead.
Napi::Value TryDirectRead(Napi::Env env, const std::shared_ptr<Engine>& engine, uint8_t* buf, uint64_t len, GuestOffset at,
                          Napi::Value keep);

/// Try to write `buf` (pinned by `keep`) to `file` at `off` through the same ring, so that the
/// writes of one JS turn go to the kernel with one call. Empty value: the write must take the pool.
Napi::Value TryDirectWrite(Napi::Env env, const std::shared_ptr<File>& file, const uint8_t* buf, uint64_t len, uint64_t off,
                           Napi::Value keep);

}  // namespace qcow2
