// The JS class Qcow2Engine: arguments become an EngineConfig on the main thread, the work runs
// on the pool, and results become JS values in one place.
#include <algorithm>
#include <cstring>
#include <napi.h>

#include "file_binding.h"
#include "js.h"
#include "qcow2/check.h"
#include "qcow2/direct_reads.h"
#include "qcow2/direct_writes.h"
#include "qcow2/engine.h"
#include "qcow2/rebuild.h"

namespace qcow2 {
namespace {

using Keep = std::vector<Napi::Reference<Napi::Value>>;

/// Runs per map() call unless the caller asks otherwise.
constexpr size_t kDefaultMapRuns = 65536;
/// Numbers per run in map() results: offset, length, kind, depth, hostOffset, flags.
constexpr size_t kRunFields = 6;

class EngineWrap : public Napi::ObjectWrap<EngineWrap> {
 public:
  static void Init(Napi::Env env, Napi::Object exports) {
    Napi::Function ctor = DefineClass(env, "Qcow2Engine", {
        StaticMethod<&EngineWrap::Open>("open"),
        InstanceMethod<&EngineWrap::Read>("read"),
        InstanceMethod<&EngineWrap::Map>("map"),
        InstanceMethod<&EngineWrap::Write>("write"),
        InstanceMethod<&EngineWrap::WriteZeroes>("writeZeroes"),
        InstanceMethod<&EngineWrap::Discard>("discard"),
        InstanceMethod<&EngineWrap::WriteCompressed>("writeCompressed"),
        InstanceMethod<&EngineWrap::Flush>("flush"),
        InstanceMethod<&EngineWrap::Resize>("resize"),
        InstanceMethod<&EngineWrap::ChangeSnapshots>("changeSnapshots"),
        InstanceMethod<&EngineWrap::StoreBitmaps>("storeBitmaps"),
        InstanceMethod<&EngineWrap::ReleaseBitmapClusters>("releaseBitmapClusters"),
        InstanceMethod<&EngineWrap::AddBitmap>("addBitmap"),
        InstanceMethod<&EngineWrap::ChangeBitmap>("changeBitmap"),
        InstanceMethod<&EngineWrap::BitmapBits>("bitmapBits"),
        InstanceMethod<&EngineWrap::ReadBitmap>("readBitmap"),
        InstanceMethod<&EngineWrap::DropBitmapTable>("dropBitmapTable"),
        InstanceMethod<&EngineWrap::WriteBitmapDirectory>("writeBitmapDirectory"),
        StaticMethod<&EngineWrap::Format>("format"),
        StaticMethod<&EngineWrap::RebuildRefcounts>("rebuildRefcounts"),
        StaticMethod<&EngineWrap::Check>("check"),
        InstanceMethod<&EngineWrap::Close>("close"),
        InstanceAccessor<&EngineWrap::Info>("info"),
    });
    env.GetInstanceData<AddonData>()->engineConstructor = Napi::Persistent(ctor);
    exports.Set("Qcow2Engine", ctor);
  }

  explicit EngineWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<EngineWrap>(info) {
    if (info.Length() != 1 || !info[0].IsExternal()) {
      throw Napi::TypeError::New(info.Env(), "Qcow2Engine cannot be constructed directly: use Qcow2Engine.open()");
    }
    engine_ = *info[0].As<Napi::External<std::shared_ptr<Engine>>>().Data();
  }

  /// The engine behind a Qcow2Engine object, or nullptr when `value` is not one.
  static std::shared_ptr<Engine> EngineOf(Napi::Value value) {
    if (!value.IsObject()) return nullptr;
    Napi::Object obj = value.As<Napi::Object>();
    if (!obj.InstanceOf(value.Env().GetInstanceData<AddonData>()->engineConstructor.Value())) return nullptr;
    return Unwrap(obj)->engine_;
  }

 private:
  static Napi::Value Open(const Napi::CallbackInfo& info);
  Napi::Value Read(const Napi::CallbackInfo& info);
  Napi::Value Map(const Napi::CallbackInfo& info);
  Napi::Value Write(const Napi::CallbackInfo& info);
  Napi::Value WriteZeroes(const Napi::CallbackInfo& info);
  Napi::Value Discard(const Napi::CallbackInfo& info);
  Napi::Value WriteCompressed(const Napi::CallbackInfo& info);
  Napi::Value Flush(const Napi::CallbackInfo& info);
  Napi::Value Resize(const Napi::CallbackInfo& info);
  Napi::Value ChangeSnapshots(const Napi::CallbackInfo& info);
  Napi::Value StoreBitmaps(const Napi::CallbackInfo& info);
  Napi::Value ReleaseBitmapClusters(const Napi::CallbackInfo& info);
  Napi::Value AddBitmap(const Napi::CallbackInfo& info);
  Napi::Value ChangeBitmap(const Napi::CallbackInfo& info);
  Napi::Value BitmapBits(const Napi::CallbackInfo& info);
  Napi::Value ReadBitmap(const Napi::CallbackInfo& info);
  Napi::Value DropBitmapTable(const Napi::CallbackInfo& info);
  Napi::Value WriteBitmapDirectory(const Napi::CallbackInfo& info);
  static Napi::Value Format(const Napi::CallbackInfo& info);
  static Napi::Value RebuildRefcounts(const Napi::CallbackInfo& info);
  static Napi::Value Check(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  Napi::Value Info(const Napi::CallbackInfo& info);

  std::shared_ptr<Engine> Live(Napi::Env env) {
    if (!engine_) throw MakeError(env, Status::Error("ERR_QCOW2_CLOSED", "the qcow2 engine is closed"));
    return engine_;
  }

  std::shared_ptr<Engine> engine_;
};

uint64_t RequiredOffset(const Napi::Object& o, const char* key) {
  if (o.Get(key).IsUndefined()) throw Napi::TypeError::New(o.Env(), std::string("option ") + key + " is required");
  return OptionOffset(o, key, 0);
}

/// A bitmap table's `offset`: a safe integer, or a BigInt for a table past the end of the file beyond 2^53.
uint64_t TableOffset(const Napi::Object& o) {
  Napi::Value v = o.Get("offset");
  if (!v.IsBigInt()) return RequiredOffset(o, "offset");
  bool lossless = false;
  const uint64_t offset = v.As<Napi::BigInt>().Uint64Value(&lossless);
  if (!lossless) throw Napi::RangeError::New(o.Env(), "option offset must fit 64 bits");
  return offset;
}

uint32_t SmallInteger(const Napi::Object& o, const char* key, uint64_t max) {
  uint64_t v = RequiredOffset(o, key);
  if (v > max) {
    throw Napi::RangeError::New(o.Env(), std::string("option ") + key + " must be at most " + std::to_string(max) +
                                             ", got " + std::to_string(v));
  }
  return static_cast<uint32_t>(v);
}

size_t PowerOfTwoOption(const Napi::Object& o, const char* key, size_t fallback, size_t min, size_t max) {
  uint64_t v = OptionOffset(o, key, fallback);
  if (v < min || v > max || (v & (v - 1))) {
    throw Napi::RangeError::New(o.Env(), std::string("option ") + key + " must be a power of two between " +
                                             std::to_string(min) + " and " + std::to_string(max) + ", got " +
                                             std::to_string(v));
  }
  return static_cast<size_t>(v);
}

/// The structures TypeScript decoded that writes must not touch: `structures: [{ kind, offset, bytes }]`.
std::vector<EngineConfig::Structure> ParseStructures(const Napi::Object& o) {
  static const std::pair<const char*, MetadataKind> kinds[] = {
      {"snapshotTable", kMetaSnapshotTable}, {"inactiveL1", kMetaInactiveL1}, {"bitmapDirectory", kMetaBitmapDirectory}};
  std::vector<EngineConfig::Structure> out;
  Napi::Value value = o.Get("structures");
  if (value.IsUndefined()) return out;
  const char* shape = "option structures must be an array of { kind: 'snapshotTable' | 'inactiveL1' | 'bitmapDirectory', offset, bytes }";
  if (!value.IsArray()) throw Napi::TypeError::New(o.Env(), shape);
  Napi::Array list = value.As<Napi::Array>();
  for (uint32_t i = 0; i < list.Length(); i++) {
    if (!list.Get(i).IsObject()) throw Napi::TypeError::New(o.Env(), shape);
    Napi::Object item = list.Get(i).As<Napi::Object>();
    std::string kind = OptionString(item, "kind", "");
    auto found = std::find_if(std::begin(kinds), std::end(kinds), [&](const auto& k) { return kind == k.first; });
    if (found == std::end(kinds)) throw Napi::TypeError::New(o.Env(), std::string(shape) + ", got kind '" + kind + "'");
    out.push_back({found->second, RequiredOffset(item, "offset"), RequiredOffset(item, "bytes")});
  }
  return out;
}

/// The bitmaps to keep up to date: `bitmaps: [{ tableOffset, tableEntries, granularityBits, enabled }]`.
std::vector<BitmapConfig> ParseBitmaps(const Napi::Object& o) {
  std::vector<BitmapConfig> out;
  Napi::Value value = o.Get("bitmaps");
  if (value.IsUndefined()) return out;
  const char* shape = "option bitmaps must be an array of { tableOffset, tableEntries, granularityBits, enabled }";
  if (!value.IsArray()) throw Napi::TypeError::New(o.Env(), shape);
  Napi::Array list = value.As<Napi::Array>();
  for (uint32_t i = 0; i < list.Length(); i++) {
    if (!list.Get(i).IsObject()) throw Napi::TypeError::New(o.Env(), shape);
    Napi::Object item = list.Get(i).As<Napi::Object>();
    BitmapConfig c;
    c.tableOffset = RequiredOffset(item, "tableOffset");
    c.tableEntries = RequiredOffset(item, "tableEntries");
    c.granularityBits = SmallInteger(item, "granularityBits", 63);
    c.enabled = OptionBool(item, "enabled", false);
    out.push_back(c);
  }
  return out;
}

EngineConfig ParseConfig(const Napi::Object& o) {
  EngineConfig c;
  c.clusterBits = SmallInteger(o, "clusterBits", 63);
  c.virtualSize = RequiredOffset(o, "size");
  c.l1TableOffset = RequiredOffset(o, "l1TableOffset");
  c.l1Size = RequiredOffset(o, "l1Size");
  c.refcountOrder = SmallInteger(o, "refcountOrder", 63);
  c.extendedL2 = OptionBool(o, "extendedL2", false);
  std::string compression = OptionString(o, "compressionType", "zlib");
  if (compression == "zstd") {
    c.compression = Compression::Zstd;
  } else if (compression != "zlib") {
    throw Napi::TypeError::New(o.Env(), "option compressionType must be 'zlib' or 'zstd', got '" + compression + "'");
  }
  c.externalDataFile = OptionBool(o, "externalDataFile", false);
  c.dataFileRaw = OptionBool(o, "dataFileRaw", false);
  uint64_t cacheBytes = OptionOffset(o, "l2CacheSize", c.mapper.l2CacheBytes);
  if (cacheBytes < 512) throw Napi::RangeError::New(o.Env(), "option l2CacheSize must be at least 512 bytes, got " + std::to_string(cacheBytes));
  c.mapper.l2CacheBytes = static_cast<size_t>(cacheBytes);
  c.mapper.l2SliceBytes = PowerOfTwoOption(o, "l2SliceSize", c.mapper.l2SliceBytes, 512, 2u << 20);
  c.writable = OptionBool(o, "writable", false);
  if (c.writable) {
    c.version = SmallInteger(o, "version", 3);
    c.refcountTableOffset = RequiredOffset(o, "refcountTableOffset");
    c.refcountTableClusters = RequiredOffset(o, "refcountTableClusters");
    c.incompatibleFeatures = OptionOffset(o, "incompatibleFeatures", 0);
    c.structures = ParseStructures(o);
    c.bitmaps = ParseBitmaps(o);
    c.header = ParseHeaderFields(o);
  }
  return c;
}

Backing ParseBacking(Napi::Env env, Napi::Value value) {
  Backing backing;
  if (value.IsUndefined() || value.IsNull()) return backing;
  if (!value.IsObject()) throw Napi::TypeError::New(env, "backing must be an object { engine | file, size }");
  Napi::Object o = value.As<Napi::Object>();
  backing.size = RequiredOffset(o, "size");
  if (!o.Get("engine").IsUndefined()) {
    backing.engine = EngineWrap::EngineOf(o.Get("engine"));
    if (!backing.engine) throw Napi::TypeError::New(env, "backing.engine must be an open Qcow2Engine");
  } else {
    backing.raw = FileWrap::FileOf(o.Get("file"));
    if (!backing.raw) throw Napi::TypeError::New(env, "backing.file must be an open NativeFile");
  }
  return backing;
}

std::shared_ptr<File> OptionalFile(Napi::Env env, Napi::Value value, const char* name) {
  if (value.IsUndefined() || value.IsNull()) return nullptr;
  auto file = FileWrap::FileOf(value);
  if (!file) throw Napi::TypeError::New(env, std::string(name) + " must be an open NativeFile");
  return file;
}

Napi::Value EngineWrap::Open(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto image = FileWrap::FileOf(info[0]);
  if (!image) throw Napi::TypeError::New(env, "file must be an open NativeFile");
  EngineConfig config = ParseConfig(Args(info).Object(1, "params"));
  auto dataFile = OptionalFile(env, info[2], "dataFile");
  Backing backing = ParseBacking(env, info[3]);
  auto opened = std::make_shared<std::shared_ptr<Engine>>();
  return RunAsync(
      env, [=] { return Engine::Open(config, image, dataFile, backing, opened.get()); },
      [opened](Napi::Env env) -> Napi::Value {
        auto ctor = env.GetInstanceData<AddonData>()->engineConstructor.Value();
        return ctor.New({Napi::External<std::shared_ptr<Engine>>::New(env, opened.get())});
      });
}

Napi::Value EngineWrap::Read(const Napi::CallbackInfo& info) {
  Args args(info);
  Keep keep;
  PinnedBytes buf = args.Bytes(0, "buffer", &keep);
  uint64_t off = args.Offset(1, "offset");
  auto engine = Live(info.Env());
  Napi::Value direct = TryDirectRead(info.Env(), engine, buf.data, buf.length, GuestOffset{off}, info[0]);
  if (!direct.IsEmpty()) return direct;
  return RunAsync(
      info.Env(), [=] { return engine->Read(buf.data, buf.length, GuestOffset{off}); }, nullptr, std::move(keep));
}

Napi::Value EngineWrap::Map(const Napi::CallbackInfo& info) {
  Args args(info);
  uint64_t off = args.Offset(0, "offset");
  uint64_t len = args.Offset(1, "length");
  uint64_t maxRuns = info.Length() > 2 && !info[2].IsUndefined() ? args.Offset(2, "maxRuns") : kDefaultMapRuns;
  if (maxRuns == 0) throw Napi::RangeError::New(info.Env(), "maxRuns must be at least 1");
  auto engine = Live(info.Env());
  auto runs = std::make_shared<std::vector<MapRun>>();
  return RunAsync(
      info.Env(), [=] { return engine->Map(GuestOffset{off}, len, 0, static_cast<size_t>(maxRuns), runs.get()); },
      [runs](Napi::Env env) -> Napi::Value {
        auto out = Napi::Float64Array::New(env, runs->size() * kRunFields);
        double* p = out.Data();
        for (const MapRun& r : *runs) {
          *p++ = static_cast<double>(r.offset);
          *p++ = static_cast<double>(r.length);
          *p++ = static_cast<double>(r.kind);
          *p++ = r.depth;
          *p++ = r.hasHost ? static_cast<double>(r.host) : -1;
          *p++ = r.flags;
        }
        return out;
      });
}

Preallocation ParsePreallocation(const Napi::Object& o);

Napi::Value EngineWrap::Write(const Napi::CallbackInfo& info) {
  Args args(info);
  Keep keep;
  PinnedBytes buf = args.Bytes(0, "buffer", &keep);
  uint64_t off = args.Offset(1, "offset");
  auto engine = Live(info.Env());
  Napi::Value direct = TryDirectEngineWrite(info.Env(), engine, buf.data, buf.length, GuestOffset{off}, info[0]);
  if (!direct.IsEmpty()) return direct;
  return RunAsync(
      info.Env(), [=] { return engine->Write(buf.data, buf.length, GuestOffset{off}); }, nullptr, std::move(keep));
}

Napi::Value EngineWrap::WriteZeroes(const Napi::CallbackInfo& info) {
  Args args(info);
  uint64_t off = args.Offset(0, "offset");
  uint64_t len = args.Offset(1, "length");
  bool unmap = OptionBool(args.Object(2, "options"), "unmap", false);
  auto engine = Live(info.Env());
  return RunAsync(info.Env(), [=] { return engine->WriteZeroes(GuestOffset{off}, len, unmap); });
}

Napi::Value EngineWrap::Discard(const Napi::CallbackInfo& info) {
  Args args(info);
  uint64_t off = args.Offset(0, "offset");
  uint64_t len = args.Offset(1, "length");
  auto engine = Live(info.Env());
  return RunAsync(info.Env(), [=] { return engine->Discard(GuestOffset{off}, len); });
}

Napi::Value EngineWrap::WriteCompressed(const Napi::CallbackInfo& info) {
  Args args(info);
  Keep keep;
  PinnedBytes buf = args.Bytes(0, "buffer", &keep);
  uint64_t off = args.Offset(1, "offset");
  auto engine = Live(info.Env());
  return RunAsync(
      info.Env(), [=] { return engine->WriteCompressed(buf.data, buf.length, GuestOffset{off}); }, nullptr,
      std::move(keep));
}

Napi::Value EngineWrap::Flush(const Napi::CallbackInfo& info) {
  auto engine = Live(info.Env());
  return RunAsync(info.Env(), [=] { return engine->Flush(); });
}

Napi::Value EngineWrap::Resize(const Napi::CallbackInfo& info) {
  Args args(info);
  uint64_t size = args.Offset(0, "size");
  Napi::Object options = args.Object(1, "options");
  bool shrink = OptionBool(options, "shrink", false);
  Preallocation preallocation = ParsePreallocation(options);
  auto engine = Live(info.Env());
  return RunAsync(info.Env(), [=] { return engine->Resize(size, shrink, preallocation); });
}

/// changeSnapshots({ kind, l1Offset, l1Entries, table, count, l1OffsetAt, oldTableOffset, oldTableBytes,
/// keptL1s: [{ offset, entries }], countField, offsetField }) → { l1Offset, tableOffset }.
SnapshotChange ParseSnapshotChange(const Napi::Object& o) {
  Napi::Env env = o.Env();
  SnapshotChange c;
  const std::string kind = OptionString(o, "kind", "");
  if (kind == "create") {
    c.kind = SnapshotChange::Kind::Create;
  } else if (kind == "delete") {
    c.kind = SnapshotChange::Kind::Delete;
  } else if (kind == "apply") {
    c.kind = SnapshotChange::Kind::Apply;
  } else {
    throw Napi::TypeError::New(env, "option kind must be 'create', 'delete' or 'apply', got '" + kind + "'");
  }
  c.l1Offset = OptionOffset(o, "l1Offset", 0);
  c.l1Entries = OptionOffset(o, "l1Entries", 0);
  if (c.l1Entries > kMaxL1Bytes / 8) {
    throw Napi::RangeError::New(env, "option l1Entries must be at most " + std::to_string(kMaxL1Bytes / 8) + ", got " + std::to_string(c.l1Entries));
  }
  Napi::Value table = o.Get("table");
  if (!table.IsUndefined()) {
    if (!table.IsBuffer()) throw Napi::TypeError::New(env, "option table must be a Buffer");
    auto bytes = table.As<Napi::Buffer<uint8_t>>();
    c.table.assign(bytes.Data(), bytes.Data() + bytes.Length());
  }
  c.count = SmallInteger(o, "count", UINT32_MAX);
  c.l1OffsetAt = OptionOffset(o, "l1OffsetAt", 0);
  c.oldTableOffset = OptionOffset(o, "oldTableOffset", 0);
  c.oldTableBytes = OptionOffset(o, "oldTableBytes", 0);
  c.countField = RequiredOffset(o, "countField");
  c.offsetField = RequiredOffset(o, "offsetField");
  Napi::Value kept = o.Get("keptL1s");
  const char* shape = "option keptL1s must be an array of { offset, entries }";
  if (!kept.IsArray()) throw Napi::TypeError::New(env, shape);
  Napi::Array list = kept.As<Napi::Array>();
  for (uint32_t i = 0; i < list.Length(); i++) {
    if (!list.Get(i).IsObject()) throw Napi::TypeError::New(env, shape);
    Napi::Object item = list.Get(i).As<Napi::Object>();
    c.keptL1s.emplace_back(RequiredOffset(item, "offset"), RequiredOffset(item, "entries"));
  }
  return c;
}

Napi::Value EngineWrap::ChangeSnapshots(const Napi::CallbackInfo& info) {
  SnapshotChange change = ParseSnapshotChange(Args(info).Object(0, "change"));
  auto engine = Live(info.Env());
  auto result = std::make_shared<SnapshotChangeResult>();
  return RunAsync(
      info.Env(), [=] { return engine->ChangeSnapshots(change, result.get()); },
      [result](Napi::Env env) -> Napi::Value {
        Napi::Object out = Napi::Object::New(env);
        out.Set("l1Offset", static_cast<double>(result->l1Offset));
        out.Set("tableOffset", static_cast<double>(result->tableOffset));
        return out;
      });
}

Napi::Value EngineWrap::StoreBitmaps(const Napi::CallbackInfo& info) {
  auto engine = Live(info.Env());
  auto stored = std::make_shared<std::vector<StoredBitmap>>();
  return RunAsync(
      info.Env(), [=] { return engine->StoreBitmaps(stored.get()); },
      [stored](Napi::Env env) -> Napi::Value {
        Napi::Array out = Napi::Array::New(env, stored->size());
        for (size_t i = 0; i < stored->size(); i++) {
          Napi::Object item = Napi::Object::New(env);
          item.Set("tableOffset", static_cast<double>((*stored)[i].tableOffset));
          item.Set("tableEntries", static_cast<double>((*stored)[i].tableEntries));
          out.Set(static_cast<uint32_t>(i), item);
        }
        return out;
      });
}

Napi::Value EngineWrap::ReleaseBitmapClusters(const Napi::CallbackInfo& info) {
  auto engine = Live(info.Env());
  return RunAsync(info.Env(), [=] { return engine->ReleaseBitmapClusters(); });
}

/// Bytes produced by a job, handed to JS as a Buffer.
Napi::Value BytesResult(Napi::Env env, const std::vector<uint8_t>& bytes) {
  return Napi::Buffer<uint8_t>::Copy(env, bytes.data(), bytes.size());
}

Napi::Value EngineWrap::AddBitmap(const Napi::CallbackInfo& info) {
  Args args(info);
  const uint32_t granularityBits = static_cast<uint32_t>(std::min<uint64_t>(args.Offset(0, "granularityBits"), 64));
  const bool enabled = info[1].ToBoolean();
  auto engine = Live(info.Env());
  auto index = std::make_shared<size_t>(0);
  return RunAsync(
      info.Env(), [=] { return engine->AddBitmap(granularityBits, enabled, index.get()); },
      [index](Napi::Env env) -> Napi::Value { return Napi::Number::New(env, static_cast<double>(*index)); });
}

Napi::Value EngineWrap::ChangeBitmap(const Napi::CallbackInfo& info) {
  static const std::pair<const char*, Engine::BitmapChange> kinds[] = {
      {"remove", Engine::BitmapChange::Remove}, {"clear", Engine::BitmapChange::Clear},
      {"enable", Engine::BitmapChange::Enable}, {"disable", Engine::BitmapChange::Disable},
      {"merge", Engine::BitmapChange::Merge}};
  Args args(info);
  const size_t index = static_cast<size_t>(args.Offset(0, "index"));
  const std::string kind = args.String(1, "change");
  auto found = std::find_if(std::begin(kinds), std::end(kinds), [&](const auto& k) { return kind == k.first; });
  if (found == std::end(kinds)) {
    throw Napi::TypeError::New(info.Env(), "change must be 'remove', 'clear', 'enable', 'disable' or 'merge', got '" + kind + "'");
  }
  std::vector<uint8_t> bits;
  uint32_t granularityBits = 0;
  if (found->second == Engine::BitmapChange::Merge) {
    Keep keep;
    PinnedBytes source = args.Bytes(2, "bits", &keep);
    bits.assign(source.data, source.data + source.length);
    granularityBits = static_cast<uint32_t>(std::min<uint64_t>(args.Offset(3, "granularityBits"), 64));
  }
  auto engine = Live(info.Env());
  const Engine::BitmapChange change = found->second;
  return RunAsync(info.Env(), [=] { return engine->ChangeBitmap(index, change, bits, granularityBits); });
}

Napi::Value EngineWrap::BitmapBits(const Napi::CallbackInfo& info) {
  const size_t index = static_cast<size_t>(Args(info).Offset(0, "index"));
  auto engine = Live(info.Env());
  auto bits = std::make_shared<std::vector<uint8_t>>();
  return RunAsync(
      info.Env(), [=] { return engine->BitmapBits(index, bits.get()); },
      [bits](Napi::Env env) { return BytesResult(env, *bits); });
}

Napi::Value EngineWrap::ReadBitmap(const Napi::CallbackInfo& info) {
  Napi::Object o = Args(info).Object(0, "bitmap");
  BitmapConfig config;
  config.tableOffset = RequiredOffset(o, "tableOffset");
  config.tableEntries = RequiredOffset(o, "tableEntries");
  config.granularityBits = SmallInteger(o, "granularityBits", 63);
  auto engine = Live(info.Env());
  auto bits = std::make_shared<std::vector<uint8_t>>();
  return RunAsync(
      info.Env(), [=] { return engine->ReadBitmap(config, bits.get()); },
      [bits](Napi::Env env) { return BytesResult(env, *bits); });
}

Napi::Value EngineWrap::DropBitmapTable(const Napi::CallbackInfo& info) {
  Args args(info);
  const uint64_t offset = args.Offset(0, "tableOffset");
  const uint64_t entries = args.Offset(1, "tableEntries");
  auto engine = Live(info.Env());
  return RunAsync(info.Env(), [=] { return engine->DropBitmapTable(offset, entries); });
}

Napi::Value EngineWrap::WriteBitmapDirectory(const Napi::CallbackInfo& info) {
  Args args(info);
  Keep keep;
  PinnedBytes source = args.Bytes(0, "directory", &keep);
  std::vector<uint8_t> bytes(source.data, source.data + source.length);
  const uint64_t oldOffset = args.Offset(1, "oldOffset");
  const uint64_t oldBytes = args.Offset(2, "oldBytes");
  auto engine = Live(info.Env());
  auto offset = std::make_shared<uint64_t>(0);
  return RunAsync(
      info.Env(), [=] { return engine->WriteBitmapDirectory(bytes, oldOffset, oldBytes, offset.get()); },
      [offset](Napi::Env env) -> Napi::Value { return Napi::Number::New(env, static_cast<double>(*offset)); });
}

Preallocation ParsePreallocation(const Napi::Object& o) {
  const std::string mode = OptionString(o, "preallocation", "off");
  if (mode == "off") return Preallocation::Off;
  if (mode == "metadata") return Preallocation::Metadata;
  if (mode == "falloc") return Preallocation::Falloc;
  if (mode == "full") return Preallocation::Full;
  throw Napi::TypeError::New(o.Env(), "option preallocation must be 'off', 'metadata', 'falloc' or 'full', got '" + mode + "'");
}

/// The image file (argument 0) and the geometry in params (argument 1) that formatting takes;
/// `request` gets clusterBits and refcountOrder.
template <typename Request>
std::shared_ptr<File> ImageArguments(const Napi::CallbackInfo& info, Request* request) {
  Napi::Env env = info.Env();
  auto image = FileWrap::FileOf(info[0]);
  if (!image) throw Napi::TypeError::New(env, "file must be an open NativeFile");
  Napi::Object o = Args(info).Object(1, "params");
  request->clusterBits = SmallInteger(o, "clusterBits", 21);
  if (request->clusterBits < 9) {
    throw Napi::RangeError::New(env, "option clusterBits must be at least 9, got " + std::to_string(request->clusterBits));
  }
  request->refcountOrder = SmallInteger(o, "refcountOrder", 6);
  return image;
}

Napi::Value EngineWrap::Format(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  FormatRequest request;
  auto image = ImageArguments(info, &request);
  Napi::Object o = Args(info).Object(1, "params");
  request.size = RequiredOffset(o, "size");
  request.extendedL2 = OptionBool(o, "extendedL2", false);
  request.preallocation = ParsePreallocation(o);
  auto dataFile = OptionalFile(env, info[2], "dataFile");
  auto result = std::make_shared<FormatResult>();
  return RunAsync(
      env, [=] { return FormatImage(*image, dataFile.get(), request, result.get()); },
      [result](Napi::Env env) -> Napi::Value {
        Napi::Object out = Napi::Object::New(env);
        out.Set("l1TableOffset", static_cast<double>(result->l1Offset));
        out.Set("l1Size", static_cast<double>(result->l1Size));
        out.Set("refcountTableOffset", static_cast<double>(result->refcountTableOffset));
        out.Set("refcountTableClusters", static_cast<double>(result->refcountTableClusters));
        return out;
      });
}

/// The structures a check or refcount rebuild walks (argument 1), as TS decoded them from the header,
/// snapshot table and bitmap directory.
WalkRequest ParseWalk(const Napi::Object& o) {
  Napi::Env env = o.Env();
  WalkRequest w;
  w.header = ParseHeaderFields(o);
  w.clusterBits = SmallInteger(o, "clusterBits", 21);
  if (w.clusterBits < 9) throw Napi::RangeError::New(env, "option clusterBits must be at least 9, got " + std::to_string(w.clusterBits));
  w.refcountOrder = SmallInteger(o, "refcountOrder", 6);
  w.extendedL2 = OptionBool(o, "extendedL2", false);
  w.externalDataFile = OptionBool(o, "externalDataFile", false);
  w.virtualSize = OptionOffset(o, "size", 0);
  w.l1Offset = RequiredOffset(o, "l1TableOffset");
  w.l1Entries = RequiredOffset(o, "l1Size");
  if (w.l1Entries > kMaxL1Bytes / 8) {
    throw Napi::RangeError::New(env, "option l1Size must be at most " + std::to_string(kMaxL1Bytes / 8) + ", got " + std::to_string(w.l1Entries));
  }
  w.snapshotsOffset = OptionOffset(o, "snapshotsOffset", 0);
  w.snapshotsBytes = OptionOffset(o, "snapshotsBytes", 0);
  w.refcountTableOffset = OptionOffset(o, "refcountTableOffset", 0);
  w.refcountTableClusters = OptionOffset(o, "refcountTableClusters", 0);
  if (w.refcountTableClusters > (8ull << 20) >> w.clusterBits << 3) {
    throw Napi::RangeError::New(env, "option refcountTableClusters is too large: " + std::to_string(w.refcountTableClusters));
  }
  w.cryptoOffset = OptionOffset(o, "cryptoOffset", 0);
  w.cryptoBytes = OptionOffset(o, "cryptoBytes", 0);
  Napi::Value snapshots = o.Get("snapshots");
  if (!snapshots.IsUndefined()) {
    if (!snapshots.IsArray()) throw Napi::TypeError::New(env, "option snapshots must be an array of { offset, entries, id, name }");
    Napi::Array list = snapshots.As<Napi::Array>();
    for (uint32_t i = 0; i < list.Length(); i++) {
      Napi::Value item = list.Get(i);
      if (!item.IsObject()) throw Napi::TypeError::New(env, "option snapshots must be an array of { offset, entries, id, name }");
      Napi::Object s = item.As<Napi::Object>();
      w.snapshots.push_back({RequiredOffset(s, "offset"), RequiredOffset(s, "entries"), OptionString(s, "id", ""), OptionString(s, "name", "")});
    }
  }
  Napi::Value bitmaps = o.Get("bitmaps");
  if (!bitmaps.IsUndefined()) {
    if (!bitmaps.IsObject()) throw Napi::TypeError::New(env, "option bitmaps must be an object");
    Napi::Object b = bitmaps.As<Napi::Object>();
    w.hasBitmaps = true;
    w.bitmapDirectoryValid = OptionBool(b, "valid", true);
    w.bitmapDirectoryOffset = RequiredOffset(b, "directoryOffset");
    w.bitmapDirectoryBytes = RequiredOffset(b, "directoryBytes");
    Napi::Value tables = b.Get("tables");
    if (!tables.IsArray()) throw Napi::TypeError::New(env, "option bitmaps.tables must be an array of { offset, entries }");
    Napi::Array list = tables.As<Napi::Array>();
    for (uint32_t i = 0; i < list.Length(); i++) {
      Napi::Value item = list.Get(i);
      if (!item.IsObject()) throw Napi::TypeError::New(env, "option bitmaps.tables must be an array of { offset, entries }");
      const uint64_t entries = RequiredOffset(item.As<Napi::Object>(), "entries");
      if (entries > (64ull << 20) / 8) throw Napi::RangeError::New(env, "a bitmap table of " + std::to_string(entries) + " entries is too large");
      w.bitmapTables.push_back({TableOffset(item.As<Napi::Object>()), entries});
    }
  }
  return w;
}

std::shared_ptr<File> ImageFile(const Napi::CallbackInfo& info) {
  auto image = FileWrap::FileOf(info[0]);
  if (!image) throw Napi::TypeError::New(info.Env(), "file must be an open NativeFile");
  return image;
}

Napi::Value EngineWrap::RebuildRefcounts(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto image = ImageFile(info);
  Napi::Object o = Args(info).Object(1, "params");
  RebuildRequest request;
  request.walk = ParseWalk(o);
  request.incompatibleFeatures = OptionOffset(o, "incompatibleFeatures", 0);
  auto result = std::make_shared<RebuildResult>();
  return RunAsync(
      env, [=] { return qcow2::RebuildRefcounts(*image, request, result.get()); },
      [result](Napi::Env env) -> Napi::Value {
        Napi::Object out = Napi::Object::New(env);
        out.Set("refcountTableOffset", static_cast<double>(result->refcountTableOffset));
        out.Set("refcountTableClusters", static_cast<double>(result->refcountTableClusters));
        return out;
      });
}

Napi::Value CheckReportToJs(Napi::Env env, const CheckReport& r) {
  Napi::Object out = Napi::Object::New(env);
  Napi::Array messages = Napi::Array::New(env, r.messages.size());
  for (uint32_t i = 0; i < r.messages.size(); i++) messages.Set(i, r.messages[i]);
  out.Set("messages", messages);
  out.Set("checkErrors", static_cast<double>(r.checkErrors));
  out.Set("corruptions", static_cast<double>(r.corruptions));
  out.Set("leaks", static_cast<double>(r.leaks));
  out.Set("corruptionsFixed", static_cast<double>(r.corruptionsFixed));
  out.Set("leaksFixed", static_cast<double>(r.leaksFixed));
  out.Set("imageEndOffset", static_cast<double>(r.imageEndOffset));
  out.Set("totalClusters", static_cast<double>(r.totalClusters));
  out.Set("allocatedClusters", static_cast<double>(r.allocatedClusters));
  out.Set("fragmentedClusters", static_cast<double>(r.fragmentedClusters));
  out.Set("compressedClusters", static_cast<double>(r.compressedClusters));
  if (!r.failure.empty()) out.Set("failure", r.failure);
  if (r.unusable) out.Set("unusable", true);
  return out;
}

Napi::Value EngineWrap::Check(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto image = ImageFile(info);
  Napi::Object o = Args(info).Object(1, "params");
  CheckRequest request;
  request.walk = ParseWalk(o);
  request.incompatibleFeatures = OptionOffset(o, "incompatibleFeatures", 0);
  const std::string repair = OptionString(o, "repair", "");
  if (repair == "leaks") {
    request.fix = kFixLeaks;
  } else if (repair == "all") {
    request.fix = kFixLeaks | kFixErrors;
  } else if (!repair.empty()) {
    throw Napi::TypeError::New(env, "option repair must be 'leaks' or 'all', got '" + repair + "'");
  }
  request.otherCorruptions = OptionOffset(o, "otherCorruptions", 0);
  if (o.Has("snapshotTable") && o.Get("snapshotTable").IsObject()) {
    Napi::Object t = o.Get("snapshotTable").As<Napi::Object>();
    if (!t.Get("bytes").IsBuffer()) throw Napi::TypeError::New(env, "option snapshotTable.bytes must be a Buffer");
    auto bytes = t.Get("bytes").As<Napi::Buffer<uint8_t>>();
    request.snapshotTable.bytes.assign(bytes.Data(), bytes.Data() + bytes.Length());
    request.snapshotTable.count = static_cast<uint32_t>(OptionOffset(t, "count", 0));
    request.snapshotTable.countField = OptionOffset(t, "countField", 0);
    request.snapshotTable.offsetField = OptionOffset(t, "offsetField", 0);
  }
  auto report = std::make_shared<CheckReport>();
  return RunAsync(
      env, [=] { return CheckImage(*image, request, report.get()); },
      [report](Napi::Env env) -> Napi::Value { return CheckReportToJs(env, *report); });
}

Napi::Value EngineWrap::Close(const Napi::CallbackInfo& info) {
  std::shared_ptr<Engine> engine = std::move(engine_);
  return RunAsync(info.Env(), [engine] { return engine ? engine->Close() : Status::Ok(); });
}

Napi::Value EngineWrap::Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto engine = Live(env);
  L2CacheStats stats = engine->cache().Stats();
  Napi::Object o = Napi::Object::New(env);
  o.Set("clusterSize", static_cast<double>(engine->geometry().clusterSize));
  o.Set("size", static_cast<double>(engine->size()));
  o.Set("l2CacheSize", static_cast<double>(engine->cache().capacityBytes()));
  o.Set("l2SliceSize", static_cast<double>(engine->cache().sliceBytes()));
  o.Set("l2CacheHits", static_cast<double>(stats.hits));
  o.Set("l2CacheMisses", static_cast<double>(stats.misses));
  o.Set("l2CachedSlices", static_cast<double>(stats.slices));
  o.Set("directReads", static_cast<double>(engine->directReads()));
  o.Set("directWrites", static_cast<double>(engine->directWrites()));
  return o;
}

}  // namespace

namespace {

/// Bytes one JSON map line takes at most, separator included: three 16-digit numbers, a 10-digit
/// depth, the longest flags.
constexpr size_t kMaxMapJsonLine = 160;

char* PutText(char* p, const char* text) {
  const size_t n = std::strlen(text);
  std::memcpy(p, text, n);
  return p + n;
}

char* PutDecimal(char* p, uint64_t value) {
  char digits[20];
  int n = 0;
  do {
    digits[n++] = static_cast<char>('0' + value % 10);
    value /= 10;
  } while (value != 0);
  while (n > 0) *p++ = digits[--n];
  return p;
}

/**
 * formatMapJson(start, length, depth, bits, offset, count, out, pos, first): rows [0, count) of a
 * map table (ts/tools/map.ts MapTable; bits 1 present, 2 zero, 4 data; offset -1 for none) as
 * qemu-img map's JSON lines, written into `out` from `pos`, each after ",\n" unless `first` and
 * the first. Returns the new position. The map prints one line per run, and over 200 000 runs
 * the first, unoptimised passes of JS over digits cost as much as qemu-img's whole map.
 */
Napi::Value FormatMapJson(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  for (size_t i = 0; i < 5; i++) {
    if (!info[i].IsTypedArray()) throw Napi::TypeError::New(env, "formatMapJson: arguments 1-5 must be typed arrays");
  }
  const napi_typedarray_type types[5] = {napi_float64_array, napi_float64_array, napi_uint32_array, napi_uint8_array,
                                         napi_float64_array};
  for (size_t i = 0; i < 5; i++) {
    if (info[i].As<Napi::TypedArray>().TypedArrayType() != types[i]) {
      throw Napi::TypeError::New(env, "formatMapJson: argument " + std::to_string(i + 1) + " has the wrong element type");
    }
  }
  if (!info[5].IsNumber() || !info[7].IsNumber() || !info[6].IsBuffer()) {
    throw Napi::TypeError::New(env, "formatMapJson: count and pos must be numbers and out a Buffer");
  }
  const double countArg = info[5].As<Napi::Number>().DoubleValue();
  const double posArg = info[7].As<Napi::Number>().DoubleValue();
  auto out = info[6].As<Napi::Buffer<char>>();
  if (!(countArg >= 0 && countArg <= 1e9) || !(posArg >= 0 && posArg <= static_cast<double>(out.Length()))) {
    throw Napi::RangeError::New(env, "formatMapJson: count " + std::to_string(countArg) + " or pos " + std::to_string(posArg) +
                                         " out of range (buffer of " + std::to_string(out.Length()) + " bytes)");
  }
  const size_t count = static_cast<size_t>(countArg);
  const size_t pos = static_cast<size_t>(posArg);
  if ((out.Length() - pos) / kMaxMapJsonLine < count) {
    throw Napi::RangeError::New(env, "formatMapJson: " + std::to_string(out.Length() - pos) + " bytes of room for " +
                                         std::to_string(count) + " lines of up to " + std::to_string(kMaxMapJsonLine) + " bytes");
  }
  auto start = info[0].As<Napi::Float64Array>();
  auto length = info[1].As<Napi::Float64Array>();
  auto depth = info[2].As<Napi::Uint32Array>();
  auto bits = info[3].As<Napi::Uint8Array>();
  auto offset = info[4].As<Napi::Float64Array>();
  for (auto n : {start.ElementLength(), length.ElementLength(), depth.ElementLength(), bits.ElementLength(), offset.ElementLength()}) {
    if (n < count) throw Napi::RangeError::New(env, "formatMapJson: a column holds " + std::to_string(n) + " rows, fewer than " + std::to_string(count));
  }
  static const char* const kFlags[8] = {
      ", \"present\": false, \"zero\": false, \"data\": false", ", \"present\": true, \"zero\": false, \"data\": false",
      ", \"present\": false, \"zero\": true, \"data\": false",  ", \"present\": true, \"zero\": true, \"data\": false",
      ", \"present\": false, \"zero\": false, \"data\": true",  ", \"present\": true, \"zero\": false, \"data\": true",
      ", \"present\": false, \"zero\": true, \"data\": true",   ", \"present\": true, \"zero\": true, \"data\": true"};
  // Safe integers: at most 2^53, 16 digits.
  auto whole = [](double v) { return v > 0 && v <= 9007199254740992.0 ? static_cast<uint64_t>(v) : 0; };
  char* p = out.Data() + pos;
  const bool first = info[8].ToBoolean();
  for (size_t i = 0; i < count; i++) {
    if (i > 0 || !first) p = PutText(p, ",\n");
    p = PutText(p, "{ \"start\": ");
    p = PutDecimal(p, whole(start[i]));
    p = PutText(p, ", \"length\": ");
    p = PutDecimal(p, whole(length[i]));
    p = PutText(p, ", \"depth\": ");
    p = PutDecimal(p, depth[i]);
    p = PutText(p, kFlags[bits[i] & 7]);
    if (offset[i] >= 0) {
      p = PutText(p, ", \"offset\": ");
      p = PutDecimal(p, whole(offset[i]));
    }
    *p++ = '}';
  }
  return Napi::Number::New(env, static_cast<double>(p - out.Data()));
}

}  // namespace

void InitEngine(Napi::Env env, Napi::Object exports) {
  EngineWrap::Init(env, exports);
  exports.Set("formatMapJson", Napi::Function::New(env, FormatMapJson, "formatMapJson"));
  exports.Set("mapJsonLineMax", Napi::Number::New(env, static_cast<double>(kMaxMapJsonLine)));
}

}  // namespace qcow2
