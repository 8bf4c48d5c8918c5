#include "qcow2/compress.h"

#include <dlfcn.h>
#include <zlib.h>

#include <mutex>
#include <string>

namespace qcow2 {
namespace {

constexpr const char* kCorrupt = "ERR_QCOW2_CORRUPT";

// qcow2 stores raw deflate streams (no zlib header) with a 4 KiB window.
constexpr int kDeflateWindowBits = -12;

/// One inflate state per thread, reset between clusters instead of rebuilt.
class Inflater {
 public:
  ~Inflater() {
    if (ready_) inflateEnd(&stream_);
  }

  Status Run(const uint8_t* in, size_t inLen, uint8_t* out, size_t outLen) {
    QCOW2_TRY(Prepare());
    stream_.next_in = const_cast<Bytef*>(in);
    stream_.avail_in = static_cast<uInt>(inLen);
    stream_.next_out = out;
    stream_.avail_out = static_cast<uInt>(outLen);
    int rc = inflate(&stream_, Z_FINISH);
    // The compressed bytes may run past the end of the stream (sector padding), and a stream
    // that fills the cluster exactly may not have reached its end marker within the data given.
    bool full = stream_.avail_out == 0;
    if ((rc == Z_STREAM_END || rc == Z_BUF_ERROR || rc == Z_OK) && full) return Status::Ok();
    std::string why = stream_.msg ? stream_.msg : (rc == Z_STREAM_END ? "stream ends early" : "truncated stream");
    return Status::Error(kCorrupt, "compressed cluster does not inflate to " + std::to_string(outLen) +
                                       " bytes (" + why + ", " + std::to_string(outLen - stream_.avail_out) +
                                       " bytes produced from " + std::to_string(inLen) + " bytes)");
  }

 private:
  Status Prepare() {
    int rc = ready_ ? inflateReset(&stream_) : inflateInit2(&stream_, kDeflateWindowBits);
    if (rc != Z_OK) return Status::Error("ENOMEM", "could not set up zlib inflate (code " + std::to_string(rc) + ")");
    ready_ = true;
    return Status::Ok();
  }

  z_stream stream_{};
  bool ready_ = false;
};

/// The few libzstd entry points used, declared here because no zstd headers are needed to build.
struct ZstdApi {
  size_t (*findFrameCompressedSize)(const void* src, size_t srcSize);
  void* (*createDCtx)();
  size_t (*freeDCtx)(void* dctx);
  size_t (*decompressDCtx)(void* dctx, void* dst, size_t dstCapacity, const void* src, size_t srcSize);
  unsigned (*isError)(size_t code);
  const char* (*getErrorName)(size_t code);
  void* (*createCCtx)();
  size_t (*freeCCtx)(void* cctx);
  size_t (*compressCCtx)(void* cctx, void* dst, size_t dstCapacity, const void* src, size_t srcSize, int level);
};

/// libzstd, loaded once; nullptr (with `error` set) when it cannot be.
const ZstdApi* LoadZstd(std::string* error) {
  static std::once_flag once;
  static ZstdApi api;
  static const ZstdApi* loaded = nullptr;
  static std::string failure;
  std::call_once(once, [] {
    void* lib = dlopen("libzstd.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* why = dlerror();
      failure = std::string("zstd-compressed clusters need libzstd.so.1, which could not be loaded: ") +
                (why ? why : "unknown error");
      return;
    }
    bool ok = true;
    auto bind = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      ok = ok && fn != nullptr;
    };
    bind(api.findFrameCompressedSize, "ZSTD_findFrameCompressedSize");
    bind(api.createDCtx, "ZSTD_createDCtx");
    bind(api.freeDCtx, "ZSTD_freeDCtx");
    bind(api.decompressDCtx, "ZSTD_decompressDCtx");
    bind(api.isError, "ZSTD_isError");
    bind(api.getErrorName, "ZSTD_getErrorName");
    bind(api.createCCtx, "ZSTD_createCCtx");
    bind(api.freeCCtx, "ZSTD_freeCCtx");
    bind(api.compressCCtx, "ZSTD_compressCCtx");
    if (!ok) {
      failure = "libzstd.so.1 lacks the functions zstd-compressed clusters need";
      return;
    }
    loaded = &api;
  });
  if (!loaded) *error = failure;
  return loaded;
}

/// QEMU's zstd level for compressed clusters is the library default.
constexpr int kZstdLevel = 3;

/// One zstd compression context per thread: making one per cluster costs more than compressing it.
class ZstdEncoder {
 public:
  ~ZstdEncoder() {
    if (ctx_) api_->freeCCtx(ctx_);
  }

  /// `*outLen` is 0 when the cluster does not fit in `outCap` bytes.
  Status Run(const uint8_t* in, size_t inLen, uint8_t* out, size_t outCap, size_t* outLen) {
    std::string error;
    if (!api_ && !(api_ = LoadZstd(&error))) return Status::Error("ERR_QCOW2_UNSUPPORTED", error);
    if (!ctx_ && !(ctx_ = api_->createCCtx())) return Status::Error("ENOMEM", "could not create a zstd context");
    const size_t got = api_->compressCCtx(ctx_, out, outCap, in, inLen, kZstdLevel);
    *outLen = api_->isError(got) ? 0 : got;
    return Status::Ok();
  }

 private:
  const ZstdApi* api_ = nullptr;
  void* ctx_ = nullptr;
};

/// One zstd decompression context per thread.
class ZstdDecoder {
 public:
  ~ZstdDecoder() {
    if (ctx_) api_->freeDCtx(ctx_);
  }

  Status Run(const uint8_t* in, size_t inLen, uint8_t* out, size_t outLen) {
    std::string error;
    if (!api_ && !(api_ = LoadZstd(&error))) return Status::Error("ERR_QCOW2_UNSUPPORTED", error);
    if (!ctx_ && !(ctx_ = api_->createDCtx())) return Status::Error("ENOMEM", "could not create a zstd context");
    // The frame is followed by padding up to the sector end: decode the frame alone.
    size_t frame = api_->findFrameCompressedSize(in, inLen);
    if (api_->isError(frame)) return Fail(frame, outLen);
    size_t got = api_->decompressDCtx(ctx_, out, outLen, in, frame);
    if (api_->isError(got)) return Fail(got, outLen);
    if (got != outLen) {
      return Status::Error(kCorrupt, "zstd-compressed cluster decodes to " + std::to_string(got) + " bytes, not " +
                                         std::to_string(outLen));
    }
    return Status::Ok();
  }

 private:
  Status Fail(size_t code, size_t outLen) {
    return Status::Error(kCorrupt, std::string("zstd-compressed cluster does not decode to ") + std::to_string(outLen) +
                                       " bytes: " + api_->getErrorName(code));
  }

  const ZstdApi* api_ = nullptr;
  void* ctx_ = nullptr;
};

/// One deflate state per thread, reset between clusters.
class Deflater {
 public:
  ~Deflater() {
    if (ready_) deflateEnd(&stream_);
  }

  Status Run(const uint8_t* in, size_t inLen, uint8_t* out, size_t outCap, size_t* outLen) {
    int rc = ready_ ? deflateReset(&stream_)
                    : deflateInit2(&stream_, Z_DEFAULT_COMPRESSION, Z_DEFLATED, kDeflateWindowBits, 9, Z_DEFAULT_STRATEGY);
    if (rc != Z_OK) return Status::Error("ENOMEM", "could not set up zlib deflate (code " + std::to_string(rc) + ")");
    ready_ = true;
    stream_.next_in = const_cast<Bytef*>(in);
    stream_.avail_in = static_cast<uInt>(inLen);
    stream_.next_out = out;
    stream_.avail_out = static_cast<uInt>(outCap);
    rc = deflate(&stream_, Z_FINISH);
    *outLen = rc == Z_STREAM_END ? outCap - stream_.avail_out : 0;
    return Status::Ok();
  }

 private:
  z_stream stream_{};
  bool ready_ = false;
};

}  // namespace

Status CompressCluster(Compression type, const uint8_t* in, size_t inLen, uint8_t* out, size_t outCap, size_t* outLen) {
  if (type == Compression::Zstd) {
    thread_local ZstdEncoder zstd;
    return zstd.Run(in, inLen, out, outCap, outLen);
  }
  thread_local Deflater zlib;
  return zlib.Run(in, inLen, out, outCap, outLen);
}

Status DecompressCluster(Compression type, const uint8_t* in, size_t inLen, uint8_t* out, size_t outLen) {
  if (type == Compression::Zstd) {
    thread_local ZstdDecoder zstd;
    return zstd.Run(in, inLen, out, outLen);
  }
  thread_local Inflater zlib;
  return zlib.Run(in, inLen, out, outLen);
}

}  // namespace qcow2
