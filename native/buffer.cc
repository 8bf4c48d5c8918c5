#include "buffer.h"

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "pool.h"

namespace qcow2 {
namespace {

// Size classes are powers of two from 4 KiB to 64 MiB; larger requests bypass the pool.
constexpr int kMinClassShift = 12;
constexpr int kMaxClassShift = 26;
// Free buffers kept per class, so an idle pool holds a bounded amount of memory.
constexpr size_t kKeepPerClass = 64;
constexpr size_t kKeepBytesPerClass = 64u << 20;

struct FreeLists {
  std::mutex mu;
  std::vector<uint8_t*> lists[kMaxClassShift + 1];
};

FreeLists& Free() {
  static FreeLists* lists = new FreeLists();  // never destroyed: buffers may outlive static teardown
  return *lists;
}

// Buffers of at least a huge page are whole huge pages: the kernel then hands a direct transfer
// over to the device as a few physically contiguous segments, where 4 KiB pages make one segment
// each (a 2 MiB request in 512 pieces, split into several requests and costly to a virtual disk).
constexpr size_t kHugePage = 2u << 20;

uint8_t* AllocateBlock(size_t capacity) {
  if (capacity < kHugePage) return static_cast<uint8_t*>(std::aligned_alloc(kBufferAlign, capacity));
  const size_t rounded = (capacity + kHugePage - 1) & ~(kHugePage - 1);
  void* p = mmap(nullptr, rounded + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  // Keep the huge-page-aligned part of the mapping, give back the rest.
  auto* base = static_cast<uint8_t*>(p);
  const size_t lead = (kHugePage - reinterpret_cast<uintptr_t>(base) % kHugePage) % kHugePage;
  if (lead > 0) munmap(base, lead);
  munmap(base + lead + rounded, kHugePage - lead);
  madvise(base + lead, rounded, MADV_HUGEPAGE);
  return base + lead;
}

void FreeBlock(uint8_t* data, size_t capacity) {
  if (capacity < kHugePage) {
    std::free(data);
  } else {
    munmap(data, (capacity + kHugePage - 1) & ~(kHugePage - 1));
  }
}

int ClassShift(size_t size) {
  int shift = kMinClassShift;
  while ((size_t{1} << shift) < size) shift++;
  return shift;
}

}  // namespace

uint8_t* AcquireAligned(size_t size, size_t* capacity) {
  if (size == 0) size = 1;
  int shift = ClassShift(size);
  if (shift > kMaxClassShift) {
    size_t rounded = (size + kBufferAlign - 1) & ~(kBufferAlign - 1);
    *capacity = rounded;
    return AllocateBlock(rounded);
  }
  *capacity = size_t{1} << shift;
  {
    FreeLists& f = Free();
    std::lock_guard<std::mutex> lock(f.mu);
    auto& list = f.lists[shift];
    if (!list.empty()) {
      uint8_t* p = list.back();
      list.pop_back();
      return p;
    }
  }
  return AllocateBlock(*capacity);
}

void ReleaseAligned(uint8_t* data, size_t capacity) {
  if (!data) return;
  int shift = ClassShift(capacity);
  if (shift <= kMaxClassShift && (size_t{1} << shift) == capacity) {
    FreeLists& f = Free();
    std::lock_guard<std::mutex> lock(f.mu);
    auto& list = f.lists[shift];
    if (list.size() < kKeepPerClass && (list.size() + 1) * capacity <= kKeepBytesPerClass) {
      list.push_back(data);
      return;
    }
  }
  FreeBlock(data, capacity);
}

AlignedBuffer::AlignedBuffer(size_t size) : size_(size) {
  data_ = AcquireAligned(size, &capacity_);
  if (!data_) throw std::bad_alloc();
}

AlignedBuffer::~AlignedBuffer() { ReleaseAligned(data_, capacity_); }

AlignedBuffer::AlignedBuffer(AlignedBuffer&& other) noexcept
    : data_(other.data_), size_(other.size_), capacity_(other.capacity_) {
  other.data_ = nullptr;
  other.size_ = other.capacity_ = 0;
}

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& other) noexcept {
  if (this != &other) {
    ReleaseAligned(data_, capacity_);
    data_ = other.data_;
    size_ = other.size_;
    capacity_ = other.capacity_;
    other.data_ = nullptr;
    other.size_ = other.capacity_ = 0;
  }
  return *this;
}

Napi::Value AllocAligned(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) {
    throw Napi::TypeError::New(env, "allocAligned(size): size must be a number");
  }
  double requested = info[0].As<Napi::Number>().DoubleValue();
  if (!(requested >= 0) || requested > double(size_t{1} << 32)) {
    throw Napi::RangeError::New(env, "allocAligned(size): size must be between 0 and 4 GiB");
  }
  size_t size = static_cast<size_t>(requested);
  size_t capacity = 0;
  uint8_t* data = AcquireAligned(size, &capacity);
  if (!data) throw MakeError(env, Status::Error("ENOMEM", "allocAligned: out of memory"));
  std::memset(data, 0, size);
  auto* cap = new size_t(capacity);
  return Napi::Buffer<uint8_t>::New(env, data, size, [](Napi::Env, uint8_t* d, size_t* c) {
    ReleaseAligned(d, *c);
    delete c;
  }, cap);
}

}  // namespace qcow2
