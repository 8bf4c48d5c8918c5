#include "qcow2/direct_reads.h"

#include <linux/io_uring.h>

#include <cstring>

#include "pool.h"
#include "qcow2/ring.h"

namespace qcow2 {
namespace {

/// IORING_OP_READ takes a 32-bit length; larger requests take the pool.
constexpr uint64_t kMaxDirectRead = 1u << 30;
/// Larger writes take the pool: a worker hand-off is noise next to them, and the kernel runs ring
/// writes that must allocate blocks one file at a time, while pool threads overlap them.
constexpr uint64_t kMaxDirectWrite = 256u << 10;

struct PendingRead;

/// One host read of a request: what an io_uring entry points at.
struct PieceRead : RingOp {
  PendingRead* request = nullptr;
  uint8_t* data = nullptr;
  uint64_t length = 0;
  uint64_t host = 0;
  void Done(Napi::Env env, int result) override;
};

/// A request in flight: settles when its last piece is done. Lives on the JS thread only.
struct PendingRead {
  Napi::Promise::Deferred deferred;
  Napi::Reference<Napi::Value> buffer;
  std::shared_ptr<Engine> engine;  // keeps the File (whose descriptor is read) alive; close() waits for the read
  File* file;
  PieceRead pieces[DirectPlan::kMaxPieces];
  size_t remaining = 0;
  Status status;  // the first failure of a piece
};

/// Count a piece as done; the request settles with its last piece.
void PieceDone(Napi::Env env, PieceRead* piece, const Status& status) {
  PendingRead* request = piece->request;
  if (!status.ok() && request->status.ok()) request->status = status;
  if (--request->remaining > 0) return;
  request->engine->EndRead();
  SettleVoid(env, request->deferred, request->status);
  delete request;
}

/// Finishes, on a worker, a piece the ring returned short, failed or never took: at the end of
/// the file the rest reads as zeros, as File::Read has it.
class FinishPieceJob : public Job {
 public:
  FinishPieceJob(PieceRead* piece, uint64_t done) : piece_(piece), done_(done) {}
  void Execute() override {
    status_ = piece_->request->file->Read(piece_->data + done_, piece_->length - done_, piece_->host + done_);
  }
  void Complete(Napi::Env env) override { PieceDone(env, piece_, status_); }
  void Failed(Status error) override { status_ = std::move(error); }

 private:
  PieceRead* piece_;
  uint64_t done_;
  Status status_;
};

void PieceRead::Done(Napi::Env env, int result) {
  if (result >= 0 && static_cast<uint64_t>(result) == length) {
    PieceDone(env, this, Status::Ok());
    return;
  }
  // A short read, or a failure (an old kernel without IORING_OP_READ says EINVAL): the pool's
  // File::Read does the rest and has the last word on errors.
  PoolOf(env).Submit(new FinishPieceJob(this, result > 0 ? static_cast<uint64_t>(result) : 0));
}

/// A write of a NativeFile in the ring; holds the file's range as File::Write would.
struct PendingWrite : RingOp {
  PendingWrite(Napi::Env env, std::shared_ptr<File> f, const uint8_t* d, uint64_t len, uint64_t off, Napi::Value keep)
      : deferred(Napi::Promise::Deferred::New(env)),
        buffer(Napi::Reference<Napi::Value>::New(keep, 1)),
        file(std::move(f)),
        data(d),
        length(len),
        offset(off) {}

  void Done(Napi::Env env, int result) override;

  /// Settle the promise and free the request (JS thread).
  void Settle(Napi::Env env, const Status& status) {
    SettleVoid(env, deferred, status);
    delete this;
  }

  Napi::Promise::Deferred deferred;
  Napi::Reference<Napi::Value> buffer;
  std::shared_ptr<File> file;
  const uint8_t* data;
  uint64_t length;
  uint64_t offset;
};

/// Finishes, on a worker, a write the ring returned short, failed or never took: File::Write
/// does the rest (after the range is released, since it takes it itself) and has the last word on errors.
class FinishWriteJob : public Job {
 public:
  FinishWriteJob(PendingWrite* write, uint64_t done) : write_(write), done_(done) {}
  void Execute() override {
    write_->file->EndSubmittedWrite(write_->length, write_->offset);
    status_ = write_->file->Write(write_->data + done_, write_->length - done_, write_->offset + done_);
  }
  void Complete(Napi::Env env) override { write_->Settle(env, status_); }
  void Failed(Status error) override { status_ = std::move(error); }

 private:
  PendingWrite* write_;
  uint64_t done_;
  Status status_;
};

void PendingWrite::Done(Napi::Env env, int result) {
  if (result >= 0 && static_cast<uint64_t>(result) == length) {
    file->EndSubmittedWrite(length, offset);
    Settle(env, Status::Ok());
    return;
  }
  PoolOf(env).Submit(new FinishWriteJob(this, result > 0 ? static_cast<uint64_t>(result) : 0));
}

}  // namespace

Napi::Value TryDirectRead(Napi::Env env, const std::shared_ptr<Engine>& engine, uint8_t* buf, uint64_t len, GuestOffset at,
                          Napi::Value keep) {
  if (!RingEnabled() || len > kMaxDirectRead) return Napi::Value();
  // Counted before planning, so that clusters freed meanwhile wait until the reads have landed.
  engine->BeginRead();
  const DirectPlan plan = engine->PlanDirect(buf, len, at);
  size_t reads = 0;
  for (size_t i = 0; plan.direct && i < plan.count; i++) reads += plan.pieces[i].zero ? 0 : 1;
  if (!plan.direct) {
    engine->EndRead();
    return Napi::Value();
  }
  auto* request = new PendingRead{Napi::Promise::Deferred::New(env), Napi::Reference<Napi::Value>::New(keep, 1), engine,
                                  plan.file};
  RingEntry entries[DirectPlan::kMaxPieces];
  for (size_t i = 0; i < plan.count; i++) {
    const DirectPlan::Piece& p = plan.pieces[i];
    if (p.zero) continue;
    PieceRead& piece = request->pieces[request->remaining];
    piece.request = request;
    piece.data = buf + p.at;
    piece.length = p.length;
    piece.host = p.host;
    entries[request->remaining++] = {IORING_OP_READ, plan.fd, reinterpret_cast<uint64_t>(piece.data), p.length, p.host, &piece};
  }
  if (reads == 0) engine->EndRead();
  if (reads > 0 && !RingSubmit(env, entries, static_cast<unsigned>(reads))) {
    engine->EndRead();
    delete request;
    return Napi::Value();
  }
  // Committed to this way: zeros are written now, the reads land when the ring says.
  for (size_t i = 0; i < plan.count; i++) {
    if (plan.pieces[i].zero) std::memset(buf + plan.pieces[i].at, 0, plan.pieces[i].length);
  }
  engine->CountDirectRead();
  Napi::Promise promise = request->deferred.Promise();
  if (reads == 0) {
    request->deferred.Resolve(env.Undefined());
    delete request;
  }
  return promise;
}

Napi::Value TryDirectWrite(Napi::Env env, const std::shared_ptr<File>& file, const uint8_t* buf, uint64_t len, uint64_t off,
                           Napi::Value keep) {
  if (!RingEnabled() || len == 0 || len > kMaxDirectWrite) return Napi::Value();
  const int fd = file->fd();
  if (fd < 0 || !file->BeginSubmittedWrite(buf, len, off)) return Napi::Value();
  auto* write = new PendingWrite(env, file, buf, len, off, keep);
  const RingEntry entry{IORING_OP_WRITE, fd, reinterpret_cast<uint64_t>(buf), len, off, write};
  // Taken from the request before Submit, which may already hand a refused entry to the pool.
  Napi::Promise promise = write->deferred.Promise();
  if (!RingSubmit(env, &entry, 1)) {
    file->EndSubmittedWrite(len, off);
    delete write;
    return Napi::Value();
  }
  return promise;
}

}  // namespace qcow2
