// Engine writes that skip the worker pool. A write the engine can plan from cached tables —
// into clusters the image owns, or into fresh clusters it allocates in memory — is submitted to
// the JS thread's io_uring (ring.h) and finished in the event loop: the mappings of new clusters
// are published there once their data has landed, and only a commit that falls due goes to a
// worker. Everything else takes the pool's Engine::Write as before.
#pragma once
#include <napi.h>

#include <memory>

#include "qcow2/engine.h"

namespace qcow2 {

/// Try to write `buf` (pinned by `keep`) at guest offset `at` without the pool. Returns an empty
/// value when the request must take the pool instead.
Napi::Value TryDirectEngineWrite(Napi::Env env, const std::shared_ptr<Engine>& engine, const uint8_t* buf, uint64_t len,
                                 GuestOffset at, Napi::Value keep);

}  // namespace qcow2
