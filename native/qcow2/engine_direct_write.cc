// The engine's part of writes served on the JS thread (see direct_writes.h). Planning never waits
// and never does I/O: every lock is tried, every table must be cached, and anything unusual —
// copy-on-write, a new L2 table, a refcount block to load or make, the file to grow — leaves the
// request to the pool's Engine::Write. A plan holds its guest clusters (shared to write in place,
// alone to allocate) until its data has landed; the mappings of clusters it allocated are then
// published like Engine::Write publishes them: in memory, written back by the next commit
// (refcounts -> fdatasync -> L2), so the crash-safety order is the pool path's.
#include <algorithm>

#include "qcow2/engine.h"

namespace qcow2 {

bool Engine::PlanDirectWrite(const uint8_t* buf, uint64_t len, GuestOffset at, DirectWrite* plan) {
  if (!config_.writable || closed_.load(std::memory_order_acquire) || failed_.load(std::memory_order_acquire)) return false;
  if (len == 0 || at.value > size() || len > size() - at.value) return false;
  // A resize in progress sends the request to the pool, which waits for it; a resize that starts
  // later waits for the writes counted here.
  std::shared_lock<std::shared_mutex> resizing(resizeMu_, std::try_to_lock);
  if (!resizing.owns_lock()) return false;
  const Geometry& g = geometry();
  plan->first = at.value >> g.clusterBits;
  plan->last = (at.value + len - 1) >> g.clusterBits;
  if (plan->last - plan->first >= DirectWrite::kMaxPieces) return false;
  if (!locks_.TryLock(plan->first, plan->last, true)) return false;
  std::vector<ClusterPlan> plans(plan->last - plan->first + 1);
  bool inPlace = true;
  for (uint64_t c = plan->first; c <= plan->last && inPlace; c++) {
    const uint64_t start = c << g.clusterBits;
    const uint64_t from = std::max(start, at.value) - start, to = std::min(start + g.clusterSize, at.value + len) - start;
    ClusterPlan& p = plans[c - plan->first];
    inPlace = PlanCluster(c, from, to, &p, /*cachedOnly=*/true).ok() && p.action == ClusterPlan::InPlace;
  }
  if (!(inPlace && AddDirectPieces(buf, len, at, plans, plan))) {
    locks_.Unlock(plan->first, plan->last, true);
    if (inPlace || !PlanDirectAllocation(buf, len, at, plan)) return false;
  }
  // Committed to this way: persistent bitmaps note the range, as Engine::Write does.
  MarkDirty(at.value, len);
  directInflight_.fetch_add(1, std::memory_order_acq_rel);
  return true;
}

bool Engine::PlanDirectAllocation(const uint8_t* buf, uint64_t len, GuestOffset at, DirectWrite* plan) {
  const Geometry& g = geometry();
  if (config_.externalDataFile) return false;
  // Clusters are only allocated for pieces the file can take as they are (host clusters start aligned).
  const File& file = DataFile();
  const uint64_t align = file.reqAlign();
  if (reinterpret_cast<uintptr_t>(buf) % file.memAlign() != 0 || at.value % align != 0 || len % align != 0 ||
      g.clusterSize % align != 0) {
    return false;
  }
  if (!locks_.TryLock(plan->first, plan->last, false)) return false;
  std::vector<ClusterPlan> plans(plan->last - plan->first + 1);
  uint64_t allocations = 0;
  bool direct = true;
  for (uint64_t c = plan->first; c <= plan->last && direct; c++) {
    const uint64_t start = c << g.clusterBits;
    const uint64_t from = std::max(start, at.value) - start, to = std::min(start + g.clusterSize, at.value + len) - start;
    ClusterPlan& p = plans[c - plan->first];
    direct = PlanCluster(c, from, to, &p, /*cachedOnly=*/true).ok();
    if (!direct || p.action == ClusterPlan::InPlace) continue;
    // Only a cluster that reads as zeros, maps no host cluster and lies in an L2 table of its own
    // (cached, as PlanCluster found it) takes a fresh cluster with nothing but the request's bytes.
    const Mapper::RawEntry& e = p.entry;
    direct = p.action == ClusterPlan::Allocate && !p.freeOld && e.l2Offset != 0 && (e.l1Raw & kCopiedFlag) &&
             ReadsAsZeros(e, start);
    allocations++;
  }
  std::unique_lock<std::mutex> meta(metaMu_, std::defer_lock);
  uint64_t end = 0;
  bool fresh = false;
  // Fresh clusters inside the space the file already reserved: nothing to read, nothing to grow.
  direct = direct && meta.try_lock() && refcounts_->AllocatesInMemory(allocations, &end, &fresh) && fresh &&
           (end << g.clusterBits) <= grownTo_;
  std::vector<AllocatedRun> runs;
  if (direct && !Fail(AllocateRuns(allocations, &runs)).ok()) {
    // Refcounts that miss a structure: the image is marked corrupt, and the pool path reports it.
    direct = false;
  }
  if (meta.owns_lock()) meta.unlock();
  if (!direct) {
    locks_.Unlock(plan->first, plan->last, false);
    return false;
  }
  size_t run = 0;
  uint64_t used = 0;
  plan->updates.clear();
  for (ClusterPlan& p : plans) {
    if (p.action == ClusterPlan::InPlace) continue;
    if (used == runs[run].count) {
      run++;
      used = 0;
    }
    p.host = (runs[run].first + used++) << g.clusterBits;
    p.zeroed = true;
    const uint64_t c = plan->first + (&p - plans.data());
    plan->updates.push_back({p.entry.l1Index, g.L2Index(GuestOffset{c << g.clusterBits}), p.host | kCopiedFlag,
                             g.extendedL2 ? p.bitmap : 0});
  }
  plan->allocating = true;
  // Allocated now: from here on the data goes to these clusters, through the ring or, when the
  // file cannot take the pieces as they are (fd -1), by the caller's fallback write.
  if (!AddDirectPieces(buf, len, at, plans, plan)) plan->fd = -1;
  return true;
}

bool Engine::AddDirectPieces(const uint8_t* buf, uint64_t len, GuestOffset at, const std::vector<ClusterPlan>& plans,
                             DirectWrite* plan) {
  const Geometry& g = geometry();
  File& file = DataFile();
  plan->count = 0;
  plan->file = &file;
  plan->fd = file.fd();
  for (size_t i = 0; i < plans.size(); i++) {
    const uint64_t start = (plan->first + i) << g.clusterBits;
    const uint64_t from = std::max(start, at.value), to = std::min(start + g.clusterSize, at.value + len);
    const uint64_t host = plans[i].host + (from - start);
    DirectWrite::Piece* last = plan->count > 0 ? &plan->pieces[plan->count - 1] : nullptr;
    if (last && last->host + last->length == host) {
      last->length += to - from;
    } else {
      plan->pieces[plan->count++] = {from - at.value, to - from, host};
    }
  }
  if (plan->fd < 0) return false;
  for (size_t i = 0; i < plan->count; i++) {
    const DirectWrite::Piece& p = plan->pieces[i];
    // Host offsets written in place come from disk: never onto metadata (the pool path says why and marks the image).
    if (!config_.externalDataFile && !metadata_->Check(p.host, p.length).ok()) return false;
    if (p.length > (1u << 30)) return false;
  }
  // The file takes each piece as one aligned write inside its size, holding the range as File::Write would.
  for (size_t i = 0; i < plan->count; i++) {
    const DirectWrite::Piece& p = plan->pieces[i];
    if (!file.BeginSubmittedWrite(buf + p.at, p.length, p.host)) {
      for (size_t j = 0; j < i; j++) file.EndSubmittedWrite(plan->pieces[j].length, plan->pieces[j].host);
      return false;
    }
  }
  return true;
}

Status Engine::FinishDirectWrite(DirectWrite* plan, const Status& written, bool* commitDue) {
  *commitDue = false;
  Status status = written;
  if (plan->allocating) {
    std::lock_guard<std::mutex> lock(metaMu_);
    if (status.ok()) {
      status = Fail(ApplyUpdates(plan->updates));
      // As Publish() does.
      *commitDue = status.ok() && CommitWanted();
      if (*commitDue) plan->ticket = ++ticket_;
    } else {
      // Never mapped: the clusters go straight back (not fresh any more, so a later write fills them whole).
      for (const L2Update& u : plan->updates) Fail(refcounts_->Add((u.raw & kOffsetMask) >> geometry().clusterBits, -1));
    }
  }
  locks_.Unlock(plan->first, plan->last, !plan->allocating);
  if (directInflight_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    std::lock_guard<std::mutex> lock(directMu_);
    directCv_.notify_all();
  }
  return status;
}

Status Engine::CommitDue(const DirectWrite& plan) {
  std::shared_lock<std::shared_mutex> resizing(resizeMu_);
  return CommitUpTo(plan.ticket);
}

void Engine::WaitForDirectWrites() {
  std::unique_lock<std::mutex> lock(directMu_);
  directCv_.wait(lock, [&] { return directInflight_.load(std::memory_order_acquire) == 0; });
}

}  // namespace qcow2
