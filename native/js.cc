#include "js.h"

#include <cmath>

namespace qcow2 {

constexpr double kMaxSafeInteger = 9007199254740992.0;

uint64_t Args::Offset(size_t i, const char* name) const {
  Napi::Value v = info_[i];
  double d;
  if (v.IsNumber()) {
    d = v.As<Napi::Number>().DoubleValue();
  } else if (v.IsBigInt()) {
    bool lossless = true;
    uint64_t u = v.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) throw Napi::RangeError::New(info_.Env(), std::string(name) + " must be between 0 and 2^53");
    d = static_cast<double>(u);
  } else {
    throw Napi::TypeError::New(info_.Env(), std::string(name) + " must be a number");
  }
  if (!(d >= 0) || d > kMaxSafeInteger || std::floor(d) != d) {
    throw Napi::RangeError::New(info_.Env(), std::string(name) + " must be an integer between 0 and 2^53, got " +
                                                 v.ToString().Utf8Value());
  }
  return static_cast<uint64_t>(d);
}

std::string Args::String(size_t i, const char* name) const {
  if (!info_[i].IsString()) throw Napi::TypeError::New(info_.Env(), std::string(name) + " must be a string");
  return info_[i].As<Napi::String>().Utf8Value();
}

Napi::Object Args::Object(size_t i, const char* name) const {
  if (info_[i].IsUndefined()) return Napi::Object::New(info_.Env());
  if (!info_[i].IsObject()) throw Napi::TypeError::New(info_.Env(), std::string(name) + " must be an object");
  return info_[i].As<Napi::Object>();
}

static PinnedBytes PinValue(Napi::Env env, Napi::Value v, const std::string& name,
                            std::vector<Napi::Reference<Napi::Value>>* keep) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    throw Napi::TypeError::New(env, name + " must be a Buffer or Uint8Array");
  }
  auto arr = v.As<Napi::Uint8Array>();
  keep->push_back(Napi::Reference<Napi::Value>::New(v, 1));
  return {arr.Data(), arr.ByteLength()};
}

PinnedBytes Args::Bytes(size_t i, const char* name, std::vector<Napi::Reference<Napi::Value>>* keep) const {
  return PinValue(info_.Env(), info_[i], name, keep);
}

std::vector<struct iovec> Args::ByteVector(size_t i, const char* name,
                                           std::vector<Napi::Reference<Napi::Value>>* keep) const {
  if (!info_[i].IsArray()) throw Napi::TypeError::New(info_.Env(), std::string(name) + " must be an array of buffers");
  auto arr = info_[i].As<Napi::Array>();
  std::vector<struct iovec> iov;
  iov.reserve(arr.Length());
  for (uint32_t k = 0; k < arr.Length(); k++) {
    PinnedBytes b = PinValue(info_.Env(), arr.Get(k), std::string(name) + "[" + std::to_string(k) + "]", keep);
    iov.push_back({b.data, b.length});
  }
  return iov;
}

bool OptionBool(const Napi::Object& options, const char* key, bool fallback) {
  Napi::Value v = options.Get(key);
  if (v.IsUndefined()) return fallback;
  if (!v.IsBoolean()) throw Napi::TypeError::New(options.Env(), std::string("option ") + key + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

std::string OptionString(const Napi::Object& options, const char* key, const std::string& fallback) {
  Napi::Value v = options.Get(key);
  if (v.IsUndefined()) return fallback;
  if (!v.IsString()) throw Napi::TypeError::New(options.Env(), std::string("option ") + key + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

uint64_t OptionOffset(const Napi::Object& options, const char* key, uint64_t fallback) {
  Napi::Value v = options.Get(key);
  if (v.IsUndefined()) return fallback;
  double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
  if (!(d >= 0) || d > kMaxSafeInteger || std::floor(d) != d) {
    throw Napi::RangeError::New(options.Env(), std::string("option ") + key + " must be a non-negative integer");
  }
  return static_cast<uint64_t>(d);
}

Napi::Promise RunAsync(Napi::Env env, LambdaJob::Work work, LambdaJob::Result_ result,
                       std::vector<Napi::Reference<Napi::Value>> keep) {
  auto* job = new LambdaJob(env, std::move(work), std::move(result), std::move(keep));
  Napi::Promise promise = job->Promise();
  PoolOf(env).Submit(job);
  return promise;
}

}  // namespace qcow2
