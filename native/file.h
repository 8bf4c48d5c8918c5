// An image file opened for data I/O: O_DIRECT where the file system allows it, aligned
// transfers, bounce buffers and read-modify-write for requests that are not aligned.
#pragma once
#include <sys/uio.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "status.h"

namespace qcow2 {

/// Host cache modes, named as qemu-img's -t/-T take them.
enum class CacheMode { None, Writeback, Unsafe, Directsync, Writethrough };

/// Parse a cache mode name; false when the name is unknown.
bool ParseCacheMode(const std::string& name, CacheMode* mode);
const char* CacheModeName(CacheMode mode);

struct FileOptions {
  bool writable = false;
  bool create = false;  ///< create the file if missing (O_CREAT), never truncating it
  CacheMode cache = CacheMode::None;
};

/// fallocate() flavours the layers above ask for.
enum class AllocateMode { Allocate, PunchHole, ZeroRange };

/// A held byte range of a file: writes that overlap wait for each other (see File::LockRange).
class RangeLock;

/// An open file or block device. Thread-safe: every method may be called from any worker.
class File {
 public:
  static Status Open(const std::string& path, const FileOptions& options, std::shared_ptr<File>* out);
  ~File();

  const std::string& path() const { return path_; }
  bool writable() const { return options_.writable; }
  CacheMode cache() const { return options_.cache; }
  bool direct() const { return direct_; }
  /// True when O_DIRECT was asked for but the file system refused it.
  bool directFallback() const { return directFallback_; }
  bool blockDevice() const { return blockDevice_; }
  /// Alignment that buffer addresses need (1 when buffered).
  uint32_t memAlign() const { return memAlign_; }
  /// Alignment that offsets and lengths need (1 when buffered).
  uint32_t reqAlign() const { return reqAlign_; }
  /// The open descriptor (-1 once closed), for I/O submitted outside this class (io_uring reads).
  int fd() const { return fd_.load(std::memory_order_acquire); }

  /// Read exactly `len` bytes at `off` into any buffer; bytes past the end of the file read as zero.
  Status Read(void* buf, size_t len, uint64_t off);
  /// Read like Read(), but a range that extends past the end of the file is an error.
  Status ReadExact(void* buf, size_t len, uint64_t off);
  /// Write `len` bytes at `off` from any buffer; unaligned edges do read-modify-write.
  Status Write(const void* buf, size_t len, uint64_t off);
  /// For a write that another mechanism (an io_uring) performs: true, with the range held as
  /// Write() would hold it, when the write can go straight to the descriptor without waiting —
  /// writable, aligned for O_DIRECT, inside the known size, no read-modify-write on those blocks.
  /// Call EndSubmittedWrite() once the write is done.
  bool BeginSubmittedWrite(const void* buf, size_t len, uint64_t off);
  /// Release what BeginSubmittedWrite() took.
  void EndSubmittedWrite(size_t len, uint64_t off);
  /// Vectored forms of Read and Write, the iovecs filling a contiguous range at `off`.
  Status Readv(const struct iovec* iov, int count, uint64_t off);
  Status Writev(const struct iovec* iov, int count, uint64_t off);
  /// Make written data durable (fdatasync), except in cache mode unsafe.
  Status Flush();
  Status Allocate(AllocateMode mode, uint64_t off, uint64_t len);
  Status Truncate(uint64_t size);
  Status Size(uint64_t* size);
  /// Bytes the file occupies on its file system (st_blocks * 512).
  Status AllocatedBytes(uint64_t* bytes);
  /// Next data (or hole) at or after `off`; *found = size of file when there is none.
  Status SeekData(uint64_t off, uint64_t* found);
  Status SeekHole(uint64_t off, uint64_t* found);
  Status Close();

 private:
  File(std::string path, const FileOptions& options) : path_(std::move(path)), options_(options) {}
  Status DiscoverAlignment();
  bool Aligned(const void* buf, size_t len, uint64_t off) const;
  Status RawPread(void* buf, size_t len, uint64_t off, size_t* done);
  Status RawPwrite(const void* buf, size_t len, uint64_t off);
  Status BouncedRead(void* buf, size_t len, uint64_t off);
  Status BouncedWrite(const void* buf, size_t len, uint64_t off);
  Status ExtendingWrite(const void* buf, size_t len, uint64_t off);
  void NoteSize(uint64_t end);
  Status Fail(int err, const char* op, uint64_t off, size_t len) const;

  friend class RangeLock;
  void Lock(uint64_t start, uint64_t end);
  void Unlock(uint64_t start, uint64_t end);

  std::string path_;
  FileOptions options_;
  std::atomic<int> fd_{-1};
  bool direct_ = false;
  bool directFallback_ = false;
  bool blockDevice_ = false;
  uint32_t memAlign_ = 1;
  uint32_t reqAlign_ = 1;

  /// Writes that may extend the file hold this lock: shared for those that write exactly their
  /// bytes, exclusive for an unaligned O_DIRECT one, which pads to whole blocks and then trims
  /// the padding — never while another extending write could have put bytes there.
  std::shared_mutex extendMu_;
  /// The file size as this process last made or saw it; writes ending below it cannot extend.
  std::atomic<uint64_t> sizeHint_{0};

  std::mutex rangeMu_;
  std::condition_variable rangeCv_;
  std::vector<std::pair<uint64_t, uint64_t>> lockedRanges_;
};

class RangeLock {
 public:
  RangeLock(File& file, uint64_t start, uint64_t end) : file_(file), start_(start), end_(end) { file_.Lock(start, end); }
  ~RangeLock() { file_.Unlock(start_, end_); }
  RangeLock(const RangeLock&) = delete;
  RangeLock& operator=(const RangeLock&) = delete;

 private:
  File& file_;
  uint64_t start_, end_;
};

}  // namespace qcow2
