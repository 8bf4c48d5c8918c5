// Aligned memory: buffers that O_DIRECT accepts, recycled through a size-class pool.
#pragma once
#include <napi.h>

#include <cstddef>
#include <cstdint>

namespace qcow2 {

/// The memory alignment every buffer of the pool has; 4096 satisfies every device seen here.
constexpr size_t kBufferAlign = 4096;

/// An owned aligned allocation; returns its memory to the pool when destroyed.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t size);
  ~AlignedBuffer();
  AlignedBuffer(AlignedBuffer&& other) noexcept;
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  size_t capacity_ = 0;
};

/// Take aligned memory of at least `size` bytes (rounded to the size class); nullptr when out of memory.
uint8_t* AcquireAligned(size_t size, size_t* capacity);
/// Return memory from AcquireAligned() of the given capacity.
void ReleaseAligned(uint8_t* data, size_t capacity);

/// allocAligned(size): a Buffer over aligned pool memory, handed to JS without a copy.
Napi::Value AllocAligned(const Napi::CallbackInfo& info);

}  // namespace qcow2
