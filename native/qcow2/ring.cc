#include "qcow2/ring.h"

#include <linux/io_uring.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <uv.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

namespace qcow2 {
namespace {

constexpr unsigned kRingEntries = 256;

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
  /// The ring could take `count` entries now.
  bool HasRoom(unsigned count) const {
    return inflight_ + queued_ + count <= cqEntries_ && *sqTail_ - __atomic_load_n(sqHead_, __ATOMIC_ACQUIRE) + count <= sqEntries_;
  }

  bool Submit(Napi::Env env, const RingEntry* entries, unsigned count) {
    if (!HasRoom(count)) return false;
    unsigned tail = *sqTail_;
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

bool RingEnabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("QCOW2_IO_URING");
    return !(v && std::string(v) == "0");
  }();
  return enabled;
}

bool RingHasRoom(Napi::Env env, unsigned count) {
  Ring* ring = RingEnabled() ? RingOf(env) : nullptr;
  return ring && ring->HasRoom(count);
}

bool RingSubmit(Napi::Env env, const RingEntry* entries, unsigned count) {
  Ring* ring = RingEnabled() ? RingOf(env) : nullptr;
  return ring && ring->Submit(env, entries, count);
}

}  // namespace qcow2
