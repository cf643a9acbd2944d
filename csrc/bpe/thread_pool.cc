#include "bpe/thread_pool.h"

#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace fastlm::bpe {
namespace {

// Workers sleep between runs. A worker joins a run only after seeing its generation under the lock, and the
// run returns only when no worker is still inside it, so a late worker never claims a task of the next run.
class ThreadPool {
 public:
  void run(int num_tasks, const std::function<void(int)>& task) {
    std::lock_guard<std::mutex> one_run_at_a_time(run_mutex_);
    std::vector<std::exception_ptr> errors(num_tasks);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(workers_.size()) < num_tasks - 1) {
        workers_.emplace_back([this] { work(); });
      }
      task_ = &task;
      errors_ = &errors;
      num_tasks_ = num_tasks;
      next_task_ = 0;
      ++generation_;
    }
    wake_.notify_all();
    run_tasks();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return active_workers_ == 0; });
    task_ = nullptr;
    for (const std::exception_ptr& error : errors) {
      if (error) std::rethrow_exception(error);
    }
  }

 private:
  void work() {
    uint64_t seen_generation = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      wake_.wait(lock, [&] { return generation_ != seen_generation; });
      seen_generation = generation_;
      ++active_workers_;
      lock.unlock();
      run_tasks();
      lock.lock();
      if (--active_workers_ == 0) done_.notify_all();
    }
  }

  // Claims tasks until none are left.
  void run_tasks() {
    for (int index; (index = next_task_.fetch_add(1)) < num_tasks_;) {
      try {
        (*task_)(index);
      } catch (...) {
        (*errors_)[index] = std::current_exception();
      }
    }
  }

  std::mutex run_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  // Never joined: the pool lives as long as the process.
  std::vector<std::thread> workers_;
  const std::function<void(int)>* task_ = nullptr;
  std::vector<std::exception_ptr>* errors_ = nullptr;
  int num_tasks_ = 0;
  std::atomic<int> next_task_{0};
  int active_workers_ = 0;
  uint64_t generation_ = 0;
};

ThreadPool& shared_pool() {
  // A forked child (e.g. a DataLoader worker) inherits the pool but not its threads: it gets a fresh pool. The
  // parent's copy is leaked on purpose, since joining threads that do not exist in this process would hang.
  static ThreadPool* pool = nullptr;
  static pid_t owner = 0;
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  if (pool == nullptr || owner != getpid()) {
    pool = new ThreadPool();
    owner = getpid();
  }
  return *pool;
}

}  // namespace

int resolve_num_threads(int num_threads) {
  if (num_threads < 0) {
    throw std::invalid_argument("num_threads must be >= 0 (0 = all cores), got " + std::to_string(num_threads));
  }
  if (num_threads > 0) return num_threads;
  const unsigned cores = std::thread::hardware_concurrency();
  return cores ? static_cast<int>(cores) : 1;
}

void parallel_for(int num_tasks, const std::function<void(int)>& task) {
  if (num_tasks <= 0) return;
  if (num_tasks == 1) {
    task(0);
    return;
  }
  shared_pool().run(num_tasks, task);
}

}  // namespace fastlm::bpe
