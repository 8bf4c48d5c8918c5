// The worker pool: every blocking operation of the addon runs here, off the main thread.
#pragma once
#include <napi.h>

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "status.h"

namespace qcow2 {

/// One unit of work: Execute() runs on a worker thread, Complete() back on the main thread.
class Job {
 public:
  virtual ~Job() = default;
  /// Runs on a worker thread. Must not touch any JS value.
  virtual void Execute() = 0;
  /// Runs on the main thread once Execute() has returned.
  virtual void Complete(Napi::Env env) = 0;
  /// Execute() threw (out of memory, most likely): the job must report `error` instead of its result.
  virtual void Failed(Status error) = 0;
};

/// A job that settles a promise: subclasses fill `status` in Execute() and build the value in Result().
class PromiseJob : public Job {
 public:
  explicit PromiseJob(Napi::Env env) : deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise Promise() const { return deferred_.Promise(); }
  void Complete(Napi::Env env) override;
  void Failed(Status error) override { status = std::move(error); }

 protected:
  /// The fulfilment value; called only when `status` is ok.
  virtual Napi::Value Result(Napi::Env env) { return env.Undefined(); }
  Status status;

 private:
  Napi::Promise::Deferred deferred_;
};

/// A fixed set of threads with one queue; completions reach the main thread in batches.
class Pool {
 public:
  Pool(Napi::Env env, unsigned threads);
  ~Pool();
  /// Queue a job (main thread only). The pool owns it until Complete() has run.
  void Submit(Job* job);
  /// Stop the threads; jobs not yet started are dropped.
  void Shutdown();
  unsigned threads() const { return static_cast<unsigned>(workers_.size()); }

 private:
  void WorkerLoop();
  static void DrainCompleted(napi_env env, napi_value, void* context, void*);

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job*> queue_;
  std::vector<Job*> done_;
  std::vector<std::thread> workers_;
  bool stopping_ = false;
  size_t outstanding_ = 0;  // main thread only
  napi_env env_;
  napi_threadsafe_function tsfn_ = nullptr;
};

/// Build the JS Error for a failed status: message plus a `code` property.
Napi::Error MakeError(Napi::Env env, const Status& status);
/// Settle `deferred`: resolved with undefined when `status` is ok, else rejected with its error.
void SettleVoid(Napi::Env env, Napi::Promise::Deferred& deferred, const Status& status);

/// The per-environment addon state.
struct AddonData {
  std::unique_ptr<Pool> pool;
  Napi::FunctionReference fileConstructor;
  Napi::FunctionReference engineConstructor;
};

/// The pool of the environment `env` belongs to.
Pool& PoolOf(Napi::Env env);

}  // namespace qcow2
