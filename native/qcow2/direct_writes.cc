#include "qcow2/direct_writes.h"

#include <linux/io_uring.h>

#include "pool.h"
#include "qcow2/ring.h"

namespace qcow2 {
namespace {

using Plan = Engine::DirectWrite;

struct EngineWrite;

/// One host write of a request: what an io_uring entry points at.
struct PieceWrite : RingOp {
  EngineWrite* request = nullptr;
  size_t index = 0;
  void Done(Napi::Env env, int result) override;
};

/// A request in flight: finishes when its last piece is done. Lives on the JS thread only.
struct EngineWrite {
  EngineWrite(Napi::Env env, std::shared_ptr<Engine> e, const uint8_t* data, Napi::Value keep)
      : deferred(Napi::Promise::Deferred::New(env)),
        buffer(Napi::Reference<Napi::Value>::New(keep, 1)),
        engine(std::move(e)),
        buf(data) {}

  /// Settle the promise and free the request.
  void Settle(Napi::Env env, const Status& status) {
    SettleVoid(env, deferred, status);
    delete this;
  }

  Napi::Promise::Deferred deferred;
  Napi::Reference<Napi::Value> buffer;
  std::shared_ptr<Engine> engine;  // keeps the File written to alive
  const uint8_t* buf;
  Plan plan;
  PieceWrite pieces[Plan::kMaxPieces];
  size_t remaining = 0;
  Status status;  // the first failure of a piece
};

/// Runs, on a worker, the commit a direct write made due (it holds no clusters by then), and
/// settles the request after it, as Engine::Write returns after the commit it starts.
class CommitJob : public Job {
 public:
  explicit CommitJob(EngineWrite* write) : write_(write) {}
  void Execute() override { status_ = write_->engine->CommitDue(write_->plan); }
  void Complete(Napi::Env env) override { write_->Settle(env, status_); }
  void Failed(Status error) override { status_ = std::move(error); }

 private:
  EngineWrite* write_;
  Status status_;
};

/// Write, on this thread, what the ring left of piece `i` from byte `done` on. Rare (a short write,
/// an error, an entry the kernel refused), and kept off the pool on purpose: the request holds its
/// clusters, which writes waiting on pool threads may need.
void WriteRest(EngineWrite* w, size_t i, uint64_t done) {
  const Plan::Piece& p = w->plan.pieces[i];
  Status status = w->plan.file->Write(w->buf + p.at + done, p.length - done, p.host + done);
  if (!status.ok() && w->status.ok()) w->status = status;
}

/// The data has landed: publish, release, settle (after a commit, when one fell due).
void Finish(Napi::Env env, EngineWrite* w) {
  bool commitDue = false;
  Status status = w->engine->FinishDirectWrite(&w->plan, w->status, &commitDue);
  if (status.ok() && commitDue) {
    PoolOf(env).Submit(new CommitJob(w));
    return;
  }
  w->Settle(env, status);
}

void PieceWrite::Done(Napi::Env env, int result) {
  const Plan::Piece& p = request->plan.pieces[index];
  const uint64_t done = result > 0 ? static_cast<uint64_t>(result) : 0;
  // The range BeginSubmittedWrite() took goes back first: File::Write takes it itself.
  request->plan.file->EndSubmittedWrite(p.length, p.host);
  if (done < p.length) WriteRest(request, index, done);
  if (--request->remaining == 0) Finish(env, request);
}

}  // namespace

Napi::Value TryDirectEngineWrite(Napi::Env env, const std::shared_ptr<Engine>& engine, const uint8_t* buf, uint64_t len,
                                 GuestOffset at, Napi::Value keep) {
  // Room first: a plan may allocate clusters, and must then go through with the write.
  if (!RingEnabled() || !RingHasRoom(env, Plan::kMaxPieces)) return Napi::Value();
  auto* write = new EngineWrite(env, engine, buf, keep);
  Plan& plan = write->plan;
  if (!engine->PlanDirectWrite(buf, len, at, &plan)) {
    delete write;
    return Napi::Value();
  }
  engine->CountDirectWrite();
  // Taken before Submit, which may already finish (and free) the request when the kernel refuses an entry.
  Napi::Promise promise = write->deferred.Promise();
  write->remaining = plan.count;
  RingEntry entries[Plan::kMaxPieces];
  for (size_t i = 0; i < plan.count; i++) {
    const Plan::Piece& p = plan.pieces[i];
    write->pieces[i].request = write;
    write->pieces[i].index = i;
    entries[i] = {IORING_OP_WRITE, plan.fd, reinterpret_cast<uint64_t>(buf + p.at), p.length, p.host, &write->pieces[i]};
  }
  if (plan.fd >= 0 && RingSubmit(env, entries, static_cast<unsigned>(plan.count))) return promise;
  // Planned, with clusters allocated for it, but the pieces cannot take the ring: written here.
  for (size_t i = 0; i < plan.count; i++) {
    if (plan.fd >= 0) plan.file->EndSubmittedWrite(plan.pieces[i].length, plan.pieces[i].host);
    WriteRest(write, i, 0);
  }
  Finish(env, write);
  return promise;
}

}  // namespace qcow2
