#include "pool.h"

#include <exception>
#include <new>

namespace qcow2 {

Napi::Error MakeError(Napi::Env env, const Status& status) {
  Napi::Error error = Napi::Error::New(env, status.message);
  error.Value().Set("code", Napi::String::New(env, status.code));
  return error;
}

void SettleVoid(Napi::Env env, Napi::Promise::Deferred& deferred, const Status& status) {
  if (status.ok()) {
    deferred.Resolve(env.Undefined());
  } else {
    deferred.Reject(MakeError(env, status).Value());
  }
}

void PromiseJob::Complete(Napi::Env env) {
  if (!status.ok()) {
    deferred_.Reject(MakeError(env, status).Value());
    return;
  }
  Napi::Value value;
  try {
    value = Result(env);
  } catch (const Napi::Error& e) {
    deferred_.Reject(e.Value());
    return;
  }
  deferred_.Resolve(value);
}

Pool::Pool(Napi::Env env, unsigned threads) : env_(env) {
  napi_value name;
  napi_create_string_utf8(env, "qcow2-pool", NAPI_AUTO_LENGTH, &name);
  napi_create_threadsafe_function(env, nullptr, nullptr, name, 0, 1, nullptr, nullptr, this,
                                  &Pool::DrainCompleted, &tsfn_);
  // Idle pools must not keep the process alive.
  napi_unref_threadsafe_function(env, tsfn_);
  workers_.reserve(threads);
  for (unsigned i = 0; i < threads; i++) workers_.emplace_back([this] { WorkerLoop(); });
}

Pool::~Pool() { Shutdown(); }

void Pool::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
  if (tsfn_) napi_release_threadsafe_function(tsfn_, napi_tsfn_abort);
}

void Pool::Submit(Job* job) {
  if (outstanding_++ == 0) napi_ref_threadsafe_function(env_, tsfn_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(job);
  }
  cv_.notify_one();
}

void Pool::WorkerLoop() {
  for (;;) {
    Job* job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      job = queue_.front();
      queue_.pop_front();
    }
    try {
      job->Execute();
    } catch (const std::bad_alloc&) {
      job->Failed(Status::Error("ENOMEM", "out of memory"));
    } catch (const std::exception& e) {
      job->Failed(Status::Error("ERR_QCOW2_INTERNAL", std::string("native error: ") + e.what()));
    }
    bool wake;
    {
      std::lock_guard<std::mutex> lock(mu_);
      wake = done_.empty();
      done_.push_back(job);
    }
    // One wake-up per batch: the drain takes everything finished by then.
    if (wake) napi_call_threadsafe_function(tsfn_, nullptr, napi_tsfn_nonblocking);
  }
}

void Pool::DrainCompleted(napi_env env, napi_value, void* context, void*) {
  if (env == nullptr) return;
  auto* pool = static_cast<Pool*>(context);
  std::vector<Job*> batch;
  {
    std::lock_guard<std::mutex> lock(pool->mu_);
    batch.swap(pool->done_);
  }
  Napi::Env napiEnv(env);
  for (Job* job : batch) {
    Napi::HandleScope scope(napiEnv);
    job->Complete(napiEnv);
    delete job;
  }
  pool->outstanding_ -= batch.size();
  if (pool->outstanding_ == 0) napi_unref_threadsafe_function(env, pool->tsfn_);
}

Pool& PoolOf(Napi::Env env) { return *env.GetInstanceData<AddonData>()->pool; }

}  // namespace qcow2
