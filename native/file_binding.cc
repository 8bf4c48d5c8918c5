#include "file_binding.h"

#include "js.h"
#include "qcow2/direct_reads.h"

namespace qcow2 {

using Keep = std::vector<Napi::Reference<Napi::Value>>;

void FileWrap::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = DefineClass(env, "NativeFile", {
      StaticMethod<&FileWrap::Open>("open"),
      InstanceMethod<&FileWrap::Read>("read"),
      InstanceMethod<&FileWrap::Write>("write"),
      InstanceMethod<&FileWrap::Readv>("readv"),
      InstanceMethod<&FileWrap::Writev>("writev"),
      InstanceMethod<&FileWrap::Flush>("flush"),
      InstanceMethod<&FileWrap::Allocate>("allocate"),
      InstanceMethod<&FileWrap::Truncate>("truncate"),
      InstanceMethod<&FileWrap::Size>("size"),
      InstanceMethod<&FileWrap::AllocatedBytes>("allocatedBytes"),
      InstanceMethod<&FileWrap::SeekData>("seekData"),
      InstanceMethod<&FileWrap::SeekHole>("seekHole"),
      InstanceMethod<&FileWrap::DataRuns>("dataRuns"),
      InstanceMethod<&FileWrap::Close>("close"),
      InstanceAccessor<&FileWrap::Info>("info"),
  });
  env.GetInstanceData<AddonData>()->fileConstructor = Napi::Persistent(ctor);
  exports.Set("NativeFile", ctor);
}

FileWrap::FileWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FileWrap>(info) {
  if (info.Length() != 1 || !info[0].IsExternal()) {
    throw Napi::TypeError::New(info.Env(), "NativeFile cannot be constructed directly: use NativeFile.open()");
  }
  file_ = *info[0].As<Napi::External<std::shared_ptr<File>>>().Data();
}

std::shared_ptr<File> FileWrap::FileOf(Napi::Value value) {
  if (!value.IsObject()) return nullptr;
  Napi::Env env = value.Env();
  Napi::Object obj = value.As<Napi::Object>();
  if (!obj.InstanceOf(env.GetInstanceData<AddonData>()->fileConstructor.Value())) return nullptr;
  return ObjectWrap<FileWrap>::Unwrap(obj)->file_;
}

std::shared_ptr<File> FileWrap::Live(Napi::Env env) {
  if (!file_) throw MakeError(env, Status::Error("EBADF", "the file is closed"));
  return file_;
}

Napi::Value FileWrap::Open(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Args args(info);
  std::string path = args.String(0, "path");
  Napi::Object opts = args.Object(1, "options");
  FileOptions options;
  options.writable = OptionBool(opts, "writable", false);
  options.create = OptionBool(opts, "create", false);
  std::string cache = OptionString(opts, "cache", "none");
  if (!ParseCacheMode(cache, &options.cache)) {
    throw Napi::TypeError::New(env, "unknown cache mode '" + cache + "' (none, writeback, unsafe, directsync, writethrough)");
  }
  auto opened = std::make_shared<std::shared_ptr<File>>();
  return RunAsync(
      env, [=] { return File::Open(path, options, opened.get()); },
      [opened](Napi::Env env) -> Napi::Value {
        auto ctor = env.GetInstanceData<AddonData>()->fileConstructor.Value();
        return ctor.New({Napi::External<std::shared_ptr<File>>::New(env, opened.get())});
      });
}

Napi::Value FileWrap::Read(const Napi::CallbackInfo& info) {
  Args args(info);
  Keep keep;
  PinnedBytes buf = args.Bytes(0, "buffer", &keep);
  uint64_t off = args.Offset(1, "offset");
  auto file = Live(info.Env());
  return RunAsync(info.Env(), [=] { return file->Read(buf.data, buf.length, off); }, nullptr, std::move(keep));
}

Napi::Value FileWrap::Write(const Napi::CallbackInfo& info) {
  Args args(info);
  Keep keep;
  PinnedBytes buf = args.Bytes(0, "buffer", &keep);
  uint64_t off = args.Offset(1, "offset");
  auto file = Live(info.Env());
  Napi::Value direct = TryDirectWrite(info.Env(), file, buf.data, buf.length, off, info[0]);
  if (!direct.IsEmpty()) return direct;
  return RunAsync(info.Env(), [=] { return file->Write(buf.data, buf.length, off); }, nullptr, std::move(keep));
}

Napi::Value FileWrap::Readv(const Napi::CallbackInfo& info) {
  Args args(info);
  Keep keep;
  auto iov = args.ByteVector(0, "buffers", &keep);
  uint64_t off = args.Offset(1, "offset");
  auto file = Live(info.Env());
  return RunAsync(info.Env(), [=] { return file->Readv(iov.data(), static_cast<int>(iov.size()), off); }, nullptr,
                  std::move(keep));
}

Napi::Value FileWrap::Writev(const Napi::CallbackInfo& info) {
  Args args(info);
  Keep keep;
  auto iov = args.ByteVector(0, "buffers", &keep);
  uint64_t off = args.Offset(1, "offset");
  auto file = Live(info.Env());
  return RunAsync(info.Env(), [=] { return file->Writev(iov.data(), static_cast<int>(iov.size()), off); }, nullptr,
                  std::move(keep));
}

Napi::Value FileWrap::Flush(const Napi::CallbackInfo& info) {
  auto file = Live(info.Env());
  return RunAsync(info.Env(), [=] { return file->Flush(); });
}

Napi::Value FileWrap::Allocate(const Napi::CallbackInfo& info) {
  Args args(info);
  std::string name = args.String(0, "mode");
  AllocateMode mode;
  if (name == "allocate") mode = AllocateMode::Allocate;
  else if (name == "punch") mode = AllocateMode::PunchHole;
  else if (name == "zero") mode = AllocateMode::ZeroRange;
  else throw Napi::TypeError::New(info.Env(), "mode must be 'allocate', 'punch' or 'zero'");
  uint64_t off = args.Offset(1, "offset");
  uint64_t len = args.Offset(2, "length");
  auto file = Live(info.Env());
  return RunAsync(info.Env(), [=] { return file->Allocate(mode, off, len); });
}

Napi::Value FileWrap::Truncate(const Napi::CallbackInfo& info) {
  uint64_t size = Args(info).Offset(0, "size");
  auto file = Live(info.Env());
  return RunAsync(info.Env(), [=] { return file->Truncate(size); });
}

/// Run a File query that yields a byte count, resolving with it as a number.
template <typename Query>
static Napi::Value QueryNumber(Napi::Env env, Query query) {
  auto out = std::make_shared<uint64_t>(0);
  return RunAsync(
      env, [=] { return query(out.get()); },
      [out](Napi::Env env) { return Napi::Number::New(env, static_cast<double>(*out)); });
}

Napi::Value FileWrap::Size(const Napi::CallbackInfo& info) {
  auto file = Live(info.Env());
  return QueryNumber(info.Env(), [file](uint64_t* out) { return file->Size(out); });
}

Napi::Value FileWrap::AllocatedBytes(const Napi::CallbackInfo& info) {
  auto file = Live(info.Env());
  return QueryNumber(info.Env(), [file](uint64_t* out) { return file->AllocatedBytes(out); });
}

Napi::Value FileWrap::SeekData(const Napi::CallbackInfo& info) {
  uint64_t off = Args(info).Offset(0, "offset");
  auto file = Live(info.Env());
  return QueryNumber(info.Env(), [file, off](uint64_t* out) { return file->SeekData(off, out); });
}

Napi::Value FileWrap::SeekHole(const Napi::CallbackInfo& info) {
  uint64_t off = Args(info).Offset(0, "offset");
  auto file = Live(info.Env());
  return QueryNumber(info.Env(), [file, off](uint64_t* out) { return file->SeekHole(off, out); });
}

Napi::Value FileWrap::DataRuns(const Napi::CallbackInfo& info) {
  Args args(info);
  const uint64_t from = args.Offset(0, "offset");
  const uint64_t end = args.Offset(1, "end");
  const uint64_t maxRuns = args.Offset(2, "maxRuns");
  if (maxRuns == 0 || maxRuns > (1u << 20)) throw Napi::RangeError::New(info.Env(), "maxRuns must be between 1 and 1048576");
  auto file = Live(info.Env());
  auto runs = std::make_shared<std::vector<double>>();
  return RunAsync(
      info.Env(),
      [=]() -> Status {
        // One crossing for many runs: a file with holes every few clusters has tens of thousands.
        for (uint64_t pos = from; pos < end && runs->size() < 2 * maxRuns;) {
          uint64_t data = 0, hole = 0;
          QCOW2_TRY(file->SeekData(pos, &data));
          if (data >= end) break;
          QCOW2_TRY(file->SeekHole(data, &hole));
          // A hole at or before the data it follows means the file changed meanwhile: stop here.
          if (hole <= data) break;
          runs->push_back(static_cast<double>(data));
          runs->push_back(static_cast<double>(std::min(hole, end)));
          pos = hole;
        }
        return Status::Ok();
      },
      [runs](Napi::Env env) {
        Napi::Float64Array out = Napi::Float64Array::New(env, runs->size());
        std::copy(runs->begin(), runs->end(), out.Data());
        return out;
      });
}

Napi::Value FileWrap::Close(const Napi::CallbackInfo& info) {
  std::shared_ptr<File> file = std::move(file_);
  if (!file) return RunAsync(info.Env(), [] { return Status::Ok(); });
  return RunAsync(info.Env(), [file] { return file->Close(); });
}

Napi::Value FileWrap::Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto file = Live(env);
  Napi::Object o = Napi::Object::New(env);
  o.Set("path", file->path());
  o.Set("writable", file->writable());
  o.Set("cache", CacheModeName(file->cache()));
  o.Set("direct", file->direct());
  o.Set("directFallback", file->directFallback());
  o.Set("blockDevice", file->blockDevice());
  o.Set("memAlign", file->memAlign());
  o.Set("reqAlign", file->reqAlign());
  return o;
}

}  // namespace qcow2
