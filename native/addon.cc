// Module registration only.
#include <napi.h>

#include <cstdlib>
#include <thread>

#include "buffer.h"
#include "file_binding.h"
#include "pool.h"

namespace qcow2 {

void InitEngine(Napi::Env env, Napi::Object exports);

/// Pool size: QCOW2_THREADS, else enough threads for deep queues of blocking I/O.
static unsigned PoolThreads() {
  if (const char* v = std::getenv("QCOW2_THREADS")) {
    long n = std::strtol(v, nullptr, 10);
    if (n >= 1 && n <= 1024) return static_cast<unsigned>(n);
  }
  return std::max(32u, 4 * std::thread::hardware_concurrency());
}

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  data->pool = std::make_unique<Pool>(env, PoolThreads());
  env.SetInstanceData<AddonData>(data);
  exports.Set("allocAligned", Napi::Function::New(env, AllocAligned, "allocAligned"));
  exports.Set("bufferAlign", Napi::Number::New(env, kBufferAlign));
  exports.Set("poolThreads", Napi::Number::New(env, data->pool->threads()));
  FileWrap::Init(env, exports);
  InitEngine(env, exports);
  return exports;
}

}  // namespace qcow2

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return qcow2::Init(env, exports); }

NODE_API_MODULE(qcow2_native, InitModule)
