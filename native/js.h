// Helpers for turning JS arguments into plain C++ values on the main thread, and for running
// a piece of work on the pool as a promise.
#pragma once
#include <napi.h>
#include <sys/uio.h>

#include <functional>
#include <string>
#include <vector>

#include "pool.h"

namespace qcow2 {

/// A byte range of a JS Uint8Array/Buffer, pinned by a reference for as long as a job runs.
struct PinnedBytes {
  uint8_t* data = nullptr;
  size_t length = 0;
};

/// Arguments read from JS; every getter throws a TypeError/RangeError naming the argument.
class Args {
 public:
  explicit Args(const Napi::CallbackInfo& info) : info_(info) {}
  /// A non-negative integer no larger than 2^53 (byte offsets and lengths).
  uint64_t Offset(size_t i, const char* name) const;
  std::string String(size_t i, const char* name) const;
  /// The bytes of a Uint8Array; the reference keeping it alive is appended to `keep`.
  PinnedBytes Bytes(size_t i, const char* name, std::vector<Napi::Reference<Napi::Value>>* keep) const;
  /// An array of Uint8Arrays as iovecs.
  std::vector<struct iovec> ByteVector(size_t i, const char* name, std::vector<Napi::Reference<Napi::Value>>* keep) const;
  Napi::Object Object(size_t i, const char* name) const;

 private:
  const Napi::CallbackInfo& info_;
};

/// Read an optional property of an options object.
bool OptionBool(const Napi::Object& options, const char* key, bool fallback);
std::string OptionString(const Napi::Object& options, const char* key, const std::string& fallback);
uint64_t OptionOffset(const Napi::Object& options, const char* key, uint64_t fallback);

/// A job built from two functions: `work` on a worker thread, `result` on the main thread.
class LambdaJob : public PromiseJob {
 public:
  using Work = std::function<Status()>;
  using Result_ = std::function<Napi::Value(Napi::Env)>;
  LambdaJob(Napi::Env env, Work work, Result_ result, std::vector<Napi::Reference<Napi::Value>> keep)
      : PromiseJob(env), work_(std::move(work)), result_(std::move(result)), keep_(std::move(keep)) {}
  void Execute() override { status = work_(); }

 protected:
  Napi::Value Result(Napi::Env env) override { return result_ ? result_(env) : env.Undefined(); }

 private:
  Work work_;
  Result_ result_;
  std::vector<Napi::Reference<Napi::Value>> keep_;
};

/// Queue `work` on the pool; the promise resolves with `result(env)` (undefined when empty).
Napi::Promise RunAsync(Napi::Env env, LambdaJob::Work work, LambdaJob::Result_ result = nullptr,
                       std::vector<Napi::Reference<Napi::Value>> keep = {});

}  // namespace qcow2
