#include "qcow2/direct_reads.h"

#include <linux/io_uring.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <uv.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "pool.h"

namespace qcow2 {
namespace {

constexpr unsigned kRingEntries = 256;
/// IORING_OP_READ takes a 32-bit length; larger requests take the pool.
constexpr uint64_t kMaxDirectRead = 1u << 30;
/// Larger writes take the pool: a worker hand-off is noise next to them, and the kernel runs ring
/// writes that must allocate blocks one file at a time, while pool threads overlap them.
constexpr uint64_t kMaxDirectWrite = 256u << 10;

/// An entry of the ring, told its result on the JS thread.
struct RingOp {
  virtual ~RingOp() = default;
  /// `result`: bytes transferred, or -errno (also for an entry the kernel never took).
  virtual void Done(Napi::Env env, int result) = 0;
};

/// What one submission queue entry asks.
struct RingEntry {
  uint8_t opcode;
  int fd;
  uint64_t addr;
  uint64_t length;
  uint64_t offset;
  RingOp* op;
};

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
  if (request->status.ok()) {
    request->deferred.Resolve(env.Undefined());
  } else {
    request->deferred.Reject(MakeError(env, request->status).Value());
  }
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
    if (status.ok()) {
      deferred.Resolve(env.Undefined());
    } else {
      deferred.Reject(MakeError(env, status).Value());
    }
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

/// An io_uring without a submission thread: the JS thread submits, and the kernel signals
/// completions on an eventfd that the event loop polls.
class Ring {
 public:
  /// The ring, or nullptr when the kernel refuses io_uring (then every read takes the pool).
  static Ring* Create(Napi::Env env) {
    auto* ring = new Ring(env);
    if (ring->Setup()) return ring;
    ring->Release();
    // Once libuv knows the handle, only its close callback may free it.
    if (ring->pollInitialized_) {
      uv_close(reinterpret_cast<uv_handle_t*>(&ring->poll_), [](uv_handle_t* handle) { delete static_cast<Ring*>(handle->data); });
    } else {
      delete ring;
    }
    return nullptr;
  }

  /// Queue `count` entries; false (nothing queued) when the ring lacks room. Entries the kernel
  /// then refuses are told so (Done with a negative result) and take the pool.
  bool Submit(Napi::Env env, const RingEntry* entries, unsigned count) {
    if (inflight_ + queued_ + count > cqEntries_) return false;
    unsigned tail = *sqTail_;
    if (tail - __atomic_load_n(sqHead_, __ATOMIC_ACQUIRE) + count > sqEntries_) return false;
    for (unsigned i = 0; i < count; i++, tail++) {
      const RingEntry& entry = entries[i];
      const unsigned index = tail & *sqMask_;
      io_uring_sqe* sqe = &sqes_[index];
      std::memset(sqe, 0, sizeof *sqe);
      sqe->opcode = entry.opcode;
      sqe->fd = entry.fd;
      sqe->addr = entry.addr;
      sqe->len = static_cast<uint32_t>(entry.length);
      sqe->off = entry.offset;
      sqe->user_data = reinterpret_cast<uint64_t>(entry.op);
      sqArray_[index] = index;
    }
    __atomic_store_n(sqTail_, tail, __ATOMIC_RELEASE);
    queued_ += count;
    // Requests that promise reactions start while completions are handled go in one batch.
    if (!draining_) SubmitQueued(env);
    return true;
  }

 private:
  explicit Ring(Napi::Env env) : env_(env) {}

  bool Setup() {
    // One thread submits and reaps, so the kernel may run completion work when that thread next
    // enters it instead of interrupting it (older kernels refuse the flags: then plain).
    io_uring_params params{};
    params.flags = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER;
    ringFd_ = static_cast<int>(syscall(__NR_io_uring_setup, kRingEntries, &params));
    if (ringFd_ < 0) {
      params = io_uring_params{};
      ringFd_ = static_cast<int>(syscall(__NR_io_uring_setup, kRingEntries, &params));
    }
    if (ringFd_ < 0) return false;
    sqSize_ = params.sq_off.array + params.sq_entries * sizeof(unsigned);
    cqSize_ = params.cq_off.cqes + params.cq_entries * sizeof(io_uring_cqe);
    const bool single = params.features & IORING_FEAT_SINGLE_MMAP;
    if (single) sqSize_ = cqSize_ = std::max(sqSize_, cqSize_);
    sqRing_ = Map(sqSize_, IORING_OFF_SQ_RING);
    cqRing_ = single ? sqRing_ : Map(cqSize_, IORING_OFF_CQ_RING);
    sqesSize_ = params.sq_entries * sizeof(io_uring_sqe);
    sqes_ = static_cast<io_uring_sqe*>(Map(sqesSize_, IORING_OFF_SQES));
    if (!sqRing_ || !cqRing_ || !sqes_) return false;
    auto* sq = static_cast<uint8_t*>(sqRing_);
    auto* cq = static_cast<uint8_t*>(cqRing_);
    sqHead_ = reinterpret_cast<unsigned*>(sq + params.sq_off.head);
    sqTail_ = reinterpret_cast<unsigned*>(sq + params.sq_off.tail);
    sqMask_ = reinterpret_cast<unsigned*>(sq + params.sq_off.ring_mask);
    sqArray_ = reinterpret_cast<unsigned*>(sq + params.sq_off.array);
    sqEntries_ = params.sq_entries;
    cqHead_ = reinterpret_cast<unsigned*>(cq + params.cq_off.head);
    cqTail_ = reinterpret_cast<unsigned*>(cq + params.cq_off.tail);
    cqMask_ = reinterpret_cast<unsigned*>(cq + params.cq_off.ring_mask);
    cqes_ = reinterpret_cast<io_uring_cqe*>(cq + params.cq_off.cqes);
    cqEntries_ = params.cq_entries;
    eventFd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (eventFd_ < 0 || syscall(__NR_io_uring_register, ringFd_, IORING_REGISTER_EVENTFD, &eventFd_, 1) != 0) return false;
    Napi::Object resource = Napi::Object::New(env_);
    resource_ = Napi::Persistent(resource);
    if (napi_async_init(env_, resource, Napi::String::New(env_, "qcow2.directRead"), &context_) != napi_ok) return false;
    uv_loop_t* loop = nullptr;
    if (napi_get_uv_event_loop(env_, &loop) != napi_ok || uv_poll_init(loop, &poll_, eventFd_) != 0) return false;
    pollInitialized_ = true;
    poll_.data = this;
    if (uv_poll_start(&poll_, UV_READABLE, &Ring::OnReadable) != 0) return false;
    polling_ = true;
    // An idle ring must not keep the process alive.
    uv_unref(reinterpret_cast<uv_handle_t*>(&poll_));
    napi_add_env_cleanup_hook(env_, &Ring::Cleanup, this);
    return true;
  }

  void* Map(size_t size, uint64_t offset) {
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ringFd_, static_cast<off_t>(offset));
    return p == MAP_FAILED ? nullptr : p;
  }

  /// Undo a Setup() that failed part way, or tear the ring down when the environment goes.
  void Release() {
    if (polling_) {
      uv_poll_stop(&poll_);
      polling_ = false;
    }
    if (sqes_) munmap(sqes_, sqesSize_);
    if (cqRing_ && cqRing_ != sqRing_) munmap(cqRing_, cqSize_);
    if (sqRing_) munmap(sqRing_, sqSize_);
    sqes_ = nullptr;
    sqRing_ = cqRing_ = nullptr;
    if (eventFd_ >= 0) ::close(eventFd_);
    if (ringFd_ >= 0) ::close(ringFd_);
    eventFd_ = ringFd_ = -1;
  }

  static void Cleanup(void* arg) {
    auto* ring = static_cast<Ring*>(arg);
    ring->Release();
    if (ring->context_) napi_async_destroy(ring->env_, ring->context_);
    ring->resource_.Reset();
    uv_close(reinterpret_cast<uv_handle_t*>(&ring->poll_), [](uv_handle_t* handle) { delete static_cast<Ring*>(handle->data); });
  }

  static void OnReadable(uv_poll_t* handle, int, int) { static_cast<Ring*>(handle->data)->Drain(); }

  /// Settle what completed, submit the reads that settling started, and go round again while
  /// more completions arrived meanwhile (cheaper than a trip through the event loop).
  void Drain() {
    uint64_t signals;
    // The counter resets on one read; an empty one (EAGAIN) is fine too.
    if (::read(eventFd_, &signals, sizeof signals) < 0) signals = 0;
    Napi::Env env(env_);
    do {
      Napi::HandleScope handles(env);
      // A callback scope, so that the promise reactions run when it closes, as after any callback.
      napi_callback_scope scope;
      if (napi_open_callback_scope(env_, resource_.Value(), context_, &scope) != napi_ok) return;
      ReapCompletions(env);
      draining_ = true;
      napi_close_callback_scope(env_, scope);
      draining_ = false;
      SubmitQueued(env);
    } while (inflight_ > 0 && CompletionsReady());
    if (inflight_ == 0) uv_unref(reinterpret_cast<uv_handle_t*>(&poll_));
  }

  bool CompletionsReady() const { return *cqHead_ != __atomic_load_n(cqTail_, __ATOMIC_ACQUIRE); }

  void ReapCompletions(Napi::Env env) {
    for (;;) {
      unsigned head = *cqHead_;
      const unsigned tail = __atomic_load_n(cqTail_, __ATOMIC_ACQUIRE);
      if (head == tail) break;
      for (; head != tail; head++) {
        const io_uring_cqe& cqe = cqes_[head & *cqMask_];
        inflight_--;
        reinterpret_cast<RingOp*>(cqe.user_data)->Done(env, cqe.res);
      }
      __atomic_store_n(cqHead_, head, __ATOMIC_RELEASE);
    }
  }

  /// Hand the queued entries to the kernel with one call; any it does not take are withdrawn
  /// from the ring and go to the pool.
  void SubmitQueued(Napi::Env env) {
    if (queued_ == 0) return;
    const long submitted = syscall(__NR_io_uring_enter, ringFd_, queued_, 0, 0, nullptr, 0);
    const unsigned taken = submitted > 0 ? static_cast<unsigned>(submitted) : 0;
    if (taken > 0 && inflight_ == 0) uv_ref(reinterpret_cast<uv_handle_t*>(&poll_));
    inflight_ += taken;
    queued_ = 0;
    const unsigned head = __atomic_load_n(sqHead_, __ATOMIC_ACQUIRE);
    const unsigned tail = *sqTail_;
    __atomic_store_n(sqTail_, head, __ATOMIC_RELEASE);
    for (unsigned i = head; i != tail; i++) {
      reinterpret_cast<RingOp*>(sqes_[sqArray_[i & *sqMask_]].user_data)->Done(env, -EAGAIN);
    }
  }

  napi_env env_;
  int ringFd_ = -1;
  int eventFd_ = -1;
  void* sqRing_ = nullptr;
  void* cqRing_ = nullptr;
  size_t sqSize_ = 0, cqSize_ = 0, sqesSize_ = 0;
  io_uring_sqe* sqes_ = nullptr;
  unsigned *sqHead_ = nullptr, *sqTail_ = nullptr, *sqMask_ = nullptr, *sqArray_ = nullptr;
  unsigned *cqHead_ = nullptr, *cqTail_ = nullptr, *cqMask_ = nullptr;
  io_uring_cqe* cqes_ = nullptr;
  unsigned sqEntries_ = 0, cqEntries_ = 0;
  unsigned inflight_ = 0;
  /// Entries written to the ring during Drain() and not yet handed to the kernel.
  unsigned queued_ = 0;
  bool draining_ = false;
  bool pollInitialized_ = false;
  bool polling_ = false;
  uv_poll_t poll_{};
  Napi::ObjectReference resource_;
  napi_async_context context_ = nullptr;
};

bool DirectReadsEnabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("QCOW2_IO_URING");
    return !(v && std::string(v) == "0");
  }();
  return enabled;
}

/// The ring of the calling JS thread (each environment has its own thread), made on first use.
Ring* RingOf(Napi::Env env) {
  thread_local bool tried = false;
  thread_local Ring* ring = nullptr;
  if (!tried) {
    tried = true;
    ring = Ring::Create(env);
  }
  return ring;
}

}  // namespace

Napi::Value TryDirectRead(Napi::Env env, const std::shared_ptr<Engine>& engine, uint8_t* buf, uint64_t len, GuestOffset at,
                          Napi::Value keep) {
  if (!DirectReadsEnabled() || len > kMaxDirectRead) return Napi::Value();
  // Counted before planning, so that clusters freed meanwhile wait until the reads have landed.
  engine->BeginRead();
  const DirectPlan plan = engine->PlanDirect(buf, len, at);
  size_t reads = 0;
  for (size_t i = 0; plan.direct && i < plan.count; i++) reads += plan.pieces[i].zero ? 0 : 1;
  Ring* ring = plan.direct && reads > 0 ? RingOf(env) : nullptr;
  if (!plan.direct || (reads > 0 && !ring)) {
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
  if (reads > 0 && !ring->Submit(env, entries, static_cast<unsigned>(reads))) {
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
  if (!DirectReadsEnabled() || len == 0 || len > kMaxDirectWrite) return Napi::Value();
  const int fd = file->fd();
  Ring* ring = fd >= 0 ? RingOf(env) : nullptr;
  if (!ring || !file->BeginSubmittedWrite(buf, len, off)) return Napi::Value();
  auto* write = new PendingWrite(env, file, buf, len, off, keep);
  const RingEntry entry{IORING_OP_WRITE, fd, reinterpret_cast<uint64_t>(buf), len, off, write};
  // Taken from the request before Submit, which may already hand a refused entry to the pool.
  Napi::Promise promise = write->deferred.Promise();
  if (!ring->Submit(env, &entry, 1)) {
    file->EndSubmittedWrite(len, off);
    delete write;
    return Napi::Value();
  }
  return promise;
}

}  // namespace qcow2
