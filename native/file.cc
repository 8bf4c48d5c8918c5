#include "file.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "buffer.h"

namespace qcow2 {
namespace {

// Unaligned transfers are bounced through chunks of at most this size.
constexpr size_t kBounceChunk = 8u << 20;

uint64_t AlignDown(uint64_t v, uint64_t a) { return v - v % a; }
uint64_t AlignUp(uint64_t v, uint64_t a) { return AlignDown(v + a - 1, a); }

/// Move past `done` bytes of an iovec list that a partial preadv/pwritev transferred.
void Advance(std::vector<struct iovec>* rest, size_t* first, size_t done) {
  while (done > 0) {
    struct iovec& v = (*rest)[*first];
    size_t step = std::min(done, v.iov_len);
    v.iov_base = static_cast<uint8_t*>(v.iov_base) + step;
    v.iov_len -= step;
    done -= step;
    if (v.iov_len == 0) ++*first;
  }
}

/// The iovecs with neighbours in memory merged: a request's clusters often lie side by side in one
/// buffer, and one long piece costs the kernel less than many short ones.
std::vector<struct iovec> Coalesced(const struct iovec* iov, int count) {
  std::vector<struct iovec> out;
  out.reserve(static_cast<size_t>(count));
  for (int i = 0; i < count; i++) {
    if (!out.empty() && static_cast<uint8_t*>(out.back().iov_base) + out.back().iov_len == iov[i].iov_base) {
      out.back().iov_len += iov[i].iov_len;
    } else {
      out.push_back(iov[i]);
    }
  }
  return out;
}

}  // namespace

bool ParseCacheMode(const std::string& name, CacheMode* mode) {
  static const std::pair<const char*, CacheMode> kModes[] = {
      {"none", CacheMode::None},         {"writeback", CacheMode::Writeback},
      {"unsafe", CacheMode::Unsafe},     {"directsync", CacheMode::Directsync},
      {"writethrough", CacheMode::Writethrough},
  };
  for (const auto& [n, m] : kModes) {
    if (name == n) {
      *mode = m;
      return true;
    }
  }
  return false;
}

const char* CacheModeName(CacheMode mode) {
  switch (mode) {
    case CacheMode::None: return "none";
    case CacheMode::Writeback: return "writeback";
    case CacheMode::Unsafe: return "unsafe";
    case CacheMode::Directsync: return "directsync";
    case CacheMode::Writethrough: return "writethrough";
  }
  return "none";
}

Status File::Open(const std::string& path, const FileOptions& options, std::shared_ptr<File>* out) {
  std::shared_ptr<File> file(new File(path, options));
  // Non-blocking, so that opening a FIFO does not wait for a writer (FIFOs are refused below).
  int flags = (options.writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NONBLOCK;
  if (options.create) flags |= O_CREAT;
  if (options.cache == CacheMode::Directsync || options.cache == CacheMode::Writethrough) flags |= O_DSYNC;
  bool wantDirect = options.cache == CacheMode::None || options.cache == CacheMode::Directsync;
  int fd = -1;
  if (wantDirect) {
    fd = ::open(path.c_str(), flags | O_DIRECT, 0644);
    if (fd >= 0) {
      file->direct_ = true;
    } else if (errno == EINVAL) {
      // The file system refuses O_DIRECT (tmpfs does): fall back to buffered I/O, and say so.
      file->directFallback_ = true;
    } else {
      return Status::FromErrno(errno, "could not open '" + path + "'");
    }
  }
  if (fd < 0) {
    fd = ::open(path.c_str(), flags, 0644);
    if (fd < 0) return Status::FromErrno(errno, "could not open '" + path + "'");
  }
  file->fd_.store(fd);
  struct stat st;
  if (fstat(fd, &st) != 0) return Status::FromErrno(errno, "could not stat '" + path + "'");
  if (S_ISDIR(st.st_mode)) return Status::FromErrno(EISDIR, "could not open '" + path + "'");
  if (S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode)) {
    return Status::Error("ERR_QCOW2_INVALID_ARGUMENT", "'file' driver requires '" + path + "' to be a regular file");
  }
  if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) != 0) return Status::FromErrno(errno, "could not open '" + path + "'");
  file->blockDevice_ = S_ISBLK(st.st_mode);
  if (file->direct_) QCOW2_TRY(file->DiscoverAlignment());
  uint64_t size = 0;
  QCOW2_TRY(file->Size(&size));
  file->sizeHint_.store(size);
  *out = std::move(file);
  return Status::Ok();
}

File::~File() {
  int fd = fd_.exchange(-1);
  if (fd >= 0) ::close(fd);
}

Status File::DiscoverAlignment() {
  struct statx sx;
  if (statx(fd(), "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 && (sx.stx_mask & STATX_DIOALIGN) &&
      sx.stx_dio_offset_align > 0) {
    memAlign_ = std::max<uint32_t>(sx.stx_dio_mem_align, 1);
    reqAlign_ = sx.stx_dio_offset_align;
    return Status::Ok();
  }
  if (blockDevice_) {
    int sector = 0;
    if (ioctl(fd(), BLKSSZGET, &sector) == 0 && sector > 0) {
      reqAlign_ = static_cast<uint32_t>(sector);
      memAlign_ = reqAlign_;
      return Status::Ok();
    }
  }
  // Probe with reads of growing size at offset 0; a read never changes the file. An empty
  // file answers any read, so it gets the alignment that is always safe.
  memAlign_ = reqAlign_ = static_cast<uint32_t>(kBufferAlign);
  uint64_t size = 0;
  QCOW2_TRY(Size(&size));
  if (size == 0) return Status::Ok();
  AlignedBuffer probe(kBufferAlign);
  for (uint32_t align = 512; align <= kBufferAlign; align *= 2) {
    ssize_t n = ::pread(fd(), probe.data(), align, 0);
    if (n >= 0) {
      reqAlign_ = align;
      return Status::Ok();
    }
    if (errno != EINVAL) return Fail(errno, "probing O_DIRECT alignment: read", 0, align);
  }
  return Status::Ok();
}

Status File::Fail(int err, const char* op, uint64_t off, size_t len) const {
  return Status::FromErrno(err, std::string(op) + " of '" + path_ + "' at offset " + std::to_string(off) + " (" +
                                    std::to_string(len) + " bytes) failed");
}

bool File::Aligned(const void* buf, size_t len, uint64_t off) const {
  if (!direct_) return true;
  return reinterpret_cast<uintptr_t>(buf) % memAlign_ == 0 && len % reqAlign_ == 0 && off % reqAlign_ == 0;
}

Status File::RawPread(void* buf, size_t len, uint64_t off, size_t* done) {
  auto* p = static_cast<uint8_t*>(buf);
  size_t got = 0;
  while (got < len) {
    ssize_t n = ::pread(fd(), p + got, len - got, static_cast<off_t>(off + got));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Fail(errno, "read", off, len);
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
    // O_DIRECT reads that end inside the last, partial block stop short of an aligned length.
    if (direct_ && got % reqAlign_ != 0) break;
  }
  *done = got;
  return Status::Ok();
}

Status File::RawPwrite(const void* buf, size_t len, uint64_t off) {
  auto* p = static_cast<const uint8_t*>(buf);
  size_t put = 0;
  while (put < len) {
    ssize_t n = ::pwrite(fd(), p + put, len - put, static_cast<off_t>(off + put));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Fail(errno, "write", off, len);
    }
    if (n == 0) return Fail(EIO, "write", off, len);
    put += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status File::Read(void* buf, size_t len, uint64_t off) {
  if (!Aligned(buf, len, off)) return BouncedRead(buf, len, off);
  size_t done = 0;
  QCOW2_TRY(RawPread(buf, len, off, &done));
  if (done < len) std::memset(static_cast<uint8_t*>(buf) + done, 0, len - done);
  return Status::Ok();
}

Status File::ReadExact(void* buf, size_t len, uint64_t off) {
  uint64_t size = 0;
  QCOW2_TRY(Size(&size));
  if (off > size || len > size - off) {
    return Status::Error("ERR_QCOW2_OUT_OF_BOUNDS", "read of '" + path_ + "' at offset " + std::to_string(off) +
                                                        " (" + std::to_string(len) +
                                                        " bytes) is past the end of the file (" +
                                                        std::to_string(size) + " bytes)");
  }
  return Read(buf, len, off);
}

Status File::BouncedRead(void* buf, size_t len, uint64_t off) {
  auto* out = static_cast<uint8_t*>(buf);
  uint64_t end = off + len;
  uint64_t pos = off;
  while (pos < end) {
    uint64_t a0 = AlignDown(pos, reqAlign_);
    uint64_t a1 = std::min<uint64_t>(AlignUp(end, reqAlign_), a0 + kBounceChunk);
    AlignedBuffer bounce(a1 - a0);
    size_t done = 0;
    QCOW2_TRY(RawPread(bounce.data(), a1 - a0, a0, &done));
    if (done < a1 - a0) std::memset(bounce.data() + done, 0, a1 - a0 - done);
    uint64_t take = std::min<uint64_t>(end, a1) - pos;
    std::memcpy(out + (pos - off), bounce.data() + (pos - a0), take);
    pos += take;
  }
  return Status::Ok();
}

Status File::Write(const void* buf, size_t len, uint64_t off) {
  if (!options_.writable) return Fail(EBADF, "write", off, len);
  if (off + len > sizeHint_.load(std::memory_order_acquire)) return ExtendingWrite(buf, len, off);
  if (!direct_) return RawPwrite(buf, len, off);
  if (!Aligned(buf, len, off)) return BouncedWrite(buf, len, off);
  // Aligned writes still wait for read-modify-write cycles that cover the same blocks.
  RangeLock lock(*this, off, off + len);
  return RawPwrite(buf, len, off);
}

bool File::BeginSubmittedWrite(const void* buf, size_t len, uint64_t off) {
  if (!options_.writable || fd() < 0 || !Aligned(buf, len, off)) return false;
  if (off + len > sizeHint_.load(std::memory_order_acquire)) return false;
  if (!direct_) return true;
  std::lock_guard<std::mutex> lock(rangeMu_);
  for (const auto& [s, e] : lockedRanges_) {
    if (s < off + len && off < e) return false;
  }
  lockedRanges_.emplace_back(off, off + len);
  return true;
}

void File::EndSubmittedWrite(size_t len, uint64_t off) {
  if (direct_) Unlock(off, off + len);
}

Status File::ExtendingWrite(const void* buf, size_t len, uint64_t off) {
  if (!direct_ || Aligned(buf, len, off)) {
    std::shared_lock<std::shared_mutex> extend(extendMu_);
    if (direct_) {
      RangeLock lock(*this, off, off + len);
      QCOW2_TRY(RawPwrite(buf, len, off));
    } else {
      QCOW2_TRY(RawPwrite(buf, len, off));
    }
    NoteSize(off + len);
    return Status::Ok();
  }
  std::unique_lock<std::shared_mutex> extend(extendMu_);
  uint64_t before = 0;
  QCOW2_TRY(Size(&before));
  QCOW2_TRY(BouncedWrite(buf, len, off));
  uint64_t end = std::max(before, off + len);
  if (end % reqAlign_ != 0 && !blockDevice_) QCOW2_TRY(Truncate(end));
  NoteSize(end);
  return Status::Ok();
}

void File::NoteSize(uint64_t end) {
  uint64_t seen = sizeHint_.load(std::memory_order_relaxed);
  while (seen < end && !sizeHint_.compare_exchange_weak(seen, end, std::memory_order_release)) {
  }
}

Status File::BouncedWrite(const void* buf, size_t len, uint64_t off) {
  const auto* in = static_cast<const uint8_t*>(buf);
  uint64_t end = off + len;
  RangeLock lock(*this, AlignDown(off, reqAlign_), AlignUp(end, reqAlign_));
  uint64_t pos = off;
  while (pos < end) {
    uint64_t a0 = AlignDown(pos, reqAlign_);
    uint64_t a1 = std::min<uint64_t>(AlignUp(end, reqAlign_), a0 + kBounceChunk);
    AlignedBuffer bounce(a1 - a0);
    uint64_t take = std::min<uint64_t>(end, a1) - pos;
    size_t done = 0;
    if (pos > a0) {
      QCOW2_TRY(RawPread(bounce.data(), reqAlign_, a0, &done));
      if (done < reqAlign_) std::memset(bounce.data() + done, 0, reqAlign_ - done);
    }
    if (pos + take < a1) {
      uint64_t last = a1 - reqAlign_;
      if (last > a0 || pos == a0) {
        QCOW2_TRY(RawPread(bounce.data() + (last - a0), reqAlign_, last, &done));
        if (done < reqAlign_) std::memset(bounce.data() + (last - a0) + done, 0, reqAlign_ - done);
      }
    }
    std::memcpy(bounce.data() + (pos - a0), in + (pos - off), take);
    QCOW2_TRY(RawPwrite(bounce.data(), a1 - a0, a0));
    pos += take;
  }
  return Status::Ok();
}

Status File::Readv(const struct iovec* iov, int count, uint64_t off) {
  uint64_t pos = off;
  bool aligned = direct_ ? off % reqAlign_ == 0 : true;
  size_t total = 0;
  for (int i = 0; i < count && aligned; i++) aligned = Aligned(iov[i].iov_base, iov[i].iov_len, 0);
  for (int i = 0; i < count; i++) total += iov[i].iov_len;
  if (!aligned) {
    for (int i = 0; i < count; i++) {
      QCOW2_TRY(Read(iov[i].iov_base, iov[i].iov_len, pos));
      pos += iov[i].iov_len;
    }
    return Status::Ok();
  }
  std::vector<struct iovec> rest = Coalesced(iov, count);
  size_t got = 0, first = 0;
  while (got < total) {
    const int pieces = static_cast<int>(std::min<size_t>(rest.size() - first, IOV_MAX));
    ssize_t n = ::preadv(fd(), rest.data() + first, pieces, static_cast<off_t>(off + got));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Fail(errno, "read", off, total);
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
    Advance(&rest, &first, static_cast<size_t>(n));
    if (direct_ && got % reqAlign_ != 0) break;
  }
  for (size_t i = first; i < rest.size(); i++) std::memset(rest[i].iov_base, 0, rest[i].iov_len);
  return Status::Ok();
}

Status File::Writev(const struct iovec* iov, int count, uint64_t off) {
  if (!options_.writable) return Fail(EBADF, "write", off, 0);
  bool aligned = direct_ ? off % reqAlign_ == 0 : true;
  size_t total = 0;
  for (int i = 0; i < count && aligned; i++) aligned = Aligned(iov[i].iov_base, iov[i].iov_len, 0);
  for (int i = 0; i < count; i++) total += iov[i].iov_len;
  if (!aligned || off + total > sizeHint_.load(std::memory_order_acquire)) {
    uint64_t pos = off;
    for (int i = 0; i < count; i++) {
      QCOW2_TRY(Write(iov[i].iov_base, iov[i].iov_len, pos));
      pos += iov[i].iov_len;
    }
    return Status::Ok();
  }
  std::unique_ptr<RangeLock> lock;
  if (direct_) lock = std::make_unique<RangeLock>(*this, off, off + total);
  std::vector<struct iovec> rest = Coalesced(iov, count);
  size_t put = 0, first = 0;
  while (put < total) {
    // Longer lists go in several calls of at most IOV_MAX pieces.
    const int pieces = static_cast<int>(std::min<size_t>(rest.size() - first, IOV_MAX));
    ssize_t n = ::pwritev(fd(), rest.data() + first, pieces, static_cast<off_t>(off + put));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Fail(errno, "write", off, total);
    }
    if (n == 0) return Fail(EIO, "write", off, total);
    put += static_cast<size_t>(n);
    Advance(&rest, &first, static_cast<size_t>(n));
  }
  return Status::Ok();
}

Status File::Flush() {
  if (options_.cache == CacheMode::Unsafe || !options_.writable) return Status::Ok();
  if (fdatasync(fd()) != 0) return Status::FromErrno(errno, "flush of '" + path_ + "' failed");
  return Status::Ok();
}

Status File::Allocate(AllocateMode mode, uint64_t off, uint64_t len) {
  if (!options_.writable) return Fail(EBADF, "fallocate", off, len);
  int flags = 0;
  switch (mode) {
    case AllocateMode::Allocate: flags = 0; break;
    case AllocateMode::PunchHole: flags = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE; break;
    case AllocateMode::ZeroRange: flags = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE; break;
  }
  if (fallocate(fd(), flags, static_cast<off_t>(off), static_cast<off_t>(len)) != 0) {
    return Fail(errno, "fallocate", off, len);
  }
  // Growing the file this way must be seen as growth, or writes into the space would take the extending path.
  if (mode == AllocateMode::Allocate) NoteSize(off + len);
  return Status::Ok();
}

Status File::Truncate(uint64_t size) {
  if (!options_.writable) return Fail(EBADF, "truncate", size, 0);
  if (ftruncate(fd(), static_cast<off_t>(size)) != 0) {
    return Status::FromErrno(errno, "truncate of '" + path_ + "' to " + std::to_string(size) + " bytes failed");
  }
  sizeHint_.store(size, std::memory_order_release);
  return Status::Ok();
}

Status File::Size(uint64_t* size) {
  if (blockDevice_) {
    uint64_t bytes = 0;
    if (ioctl(fd(), BLKGETSIZE64, &bytes) != 0) return Status::FromErrno(errno, "size of '" + path_ + "'");
    *size = bytes;
    return Status::Ok();
  }
  struct stat st;
  if (fstat(fd(), &st) != 0) return Status::FromErrno(errno, "stat of '" + path_ + "' failed");
  *size = static_cast<uint64_t>(st.st_size);
  return Status::Ok();
}

Status File::AllocatedBytes(uint64_t* bytes) {
  struct stat st;
  if (fstat(fd(), &st) != 0) return Status::FromErrno(errno, "stat of '" + path_ + "' failed");
  *bytes = static_cast<uint64_t>(st.st_blocks) * 512;
  return Status::Ok();
}

Status File::SeekData(uint64_t off, uint64_t* found) {
  off_t r = lseek(fd(), static_cast<off_t>(off), SEEK_DATA);
  if (r >= 0) {
    *found = static_cast<uint64_t>(r);
    return Status::Ok();
  }
  if (errno == ENXIO) return Size(found);
  return Fail(errno, "seek for data", off, 0);
}

Status File::SeekHole(uint64_t off, uint64_t* found) {
  off_t r = lseek(fd(), static_cast<off_t>(off), SEEK_HOLE);
  if (r >= 0) {
    *found = static_cast<uint64_t>(r);
    return Status::Ok();
  }
  if (errno == ENXIO) return Size(found);
  return Fail(errno, "seek for a hole", off, 0);
}

Status File::Close() {
  int fd = fd_.exchange(-1);
  if (fd >= 0 && ::close(fd) != 0) return Status::FromErrno(errno, "close of '" + path_ + "' failed");
  return Status::Ok();
}

void File::Lock(uint64_t start, uint64_t end) {
  std::unique_lock<std::mutex> lock(rangeMu_);
  rangeCv_.wait(lock, [&] {
    for (const auto& [s, e] : lockedRanges_) {
      if (s < end && start < e) return false;
    }
    return true;
  });
  lockedRanges_.emplace_back(start, end);
}

void File::Unlock(uint64_t start, uint64_t end) {
  {
    std::lock_guard<std::mutex> lock(rangeMu_);
    auto it = std::find(lockedRanges_.begin(), lockedRanges_.end(), std::make_pair(start, end));
    if (it != lockedRanges_.end()) lockedRanges_.erase(it);
  }
  rangeCv_.notify_all();
}

}  // namespace qcow2
