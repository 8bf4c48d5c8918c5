// The JS class NativeFile: a File whose every operation returns a promise settled off the main thread.
#pragma once
#include <napi.h>

#include <memory>

#include "file.h"

namespace qcow2 {

class FileWrap : public Napi::ObjectWrap<FileWrap> {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  explicit FileWrap(const Napi::CallbackInfo& info);
  /// The File behind a NativeFile object, or nullptr when `value` is not one.
  static std::shared_ptr<File> FileOf(Napi::Value value);

 private:
  static Napi::Value Open(const Napi::CallbackInfo& info);
  Napi::Value Read(const Napi::CallbackInfo& info);
  Napi::Value Write(const Napi::CallbackInfo& info);
  Napi::Value Readv(const Napi::CallbackInfo& info);
  Napi::Value Writev(const Napi::CallbackInfo& info);
  Napi::Value Flush(const Napi::CallbackInfo& info);
  Napi::Value Allocate(const Napi::CallbackInfo& info);
  Napi::Value Truncate(const Napi::CallbackInfo& info);
  Napi::Value Size(const Napi::CallbackInfo& info);
  Napi::Value AllocatedBytes(const Napi::CallbackInfo& info);
  Napi::Value SeekData(const Napi::CallbackInfo& info);
  Napi::Value SeekHole(const Napi::CallbackInfo& info);
  /// dataRuns(offset, end, maxRuns): the data runs of [offset, end) as [start, end, ...] pairs, at most maxRuns.
  Napi::Value DataRuns(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  Napi::Value Info(const Napi::CallbackInfo& info);
  /// The open file, or a JS error when it was closed.
  std::shared_ptr<File> Live(Napi::Env env);

  std::shared_ptr<File> file_;
};

}  // namespace qcow2
