#include "parallel.h"

#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "zerofuse/error.h"

namespace zerofuse::detail {
namespace {

int default_threads() {
  if (const char* env = std::getenv("ZEROFUSE_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Workers sleep on a condition variable between jobs. A job is published by
// bumping `generation_`; worker w runs range w + 1 (the caller runs range 0).
class ThreadPool {
 public:
  explicit ThreadPool(int threads) : threads_(threads) {
    for (int w = 1; w < threads_; ++w) workers_.emplace_back([this, w] { worker_loop(w); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int threads() const { return threads_; }

  // Callers hold run_mutex_ for the whole job, so one job runs at a time.
  void run(int ranges, std::int64_t n, const std::function<void(std::int64_t, std::int64_t, int)>& fn) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      n_ = n;
      ranges_ = ranges;
      pending_ = ranges - 1;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    run_range(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

  std::mutex run_mutex_;

 private:
  void run_range(int r) {
    const std::int64_t begin = n_ * r / ranges_;
    const std::int64_t end = n_ * (r + 1) / ranges_;
    try {
      if (begin < end) (*fn_)(begin, end, r);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }

  void worker_loop(int w) {
    in_worker_ = true;
    std::uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (stopping_) return;
        if (w >= ranges_) continue;
      }
      run_range(w);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (--pending_ == 0) done_.notify_one();
      }
    }
  }

 public:
  static thread_local bool in_worker_;

 private:
  const int threads_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::uint64_t generation_ = 0;
  bool stopping_ = false;
  const std::function<void(std::int64_t, std::int64_t, int)>* fn_ = nullptr;
  std::int64_t n_ = 0;
  int ranges_ = 1;
  int pending_ = 0;
  std::exception_ptr error_;
};

thread_local bool ThreadPool::in_worker_ = false;

std::mutex g_pool_mutex;
// Pools are never deleted: a caller may still hold one while another thread
// asks for more threads. Growing leaves the old pool's (sleeping) threads behind,
// which only set_num_threads above the machine's size does.
ThreadPool* g_pool = nullptr;
std::atomic<int> g_thread_limit{0};  // 0 until first use, then the ranges cap

// Ranges are run by the calling thread while it is inside a job, and always by
// worker threads, so nested calls never wait on the pool they are part of.
thread_local bool t_inside_job = false;

// After fork() the child has none of the parent's worker threads: forget the
// pool (its threads do not exist here) and build a new one on first use.
void forget_openmp_in_child();
void forget_pool_in_child() {
  g_pool = nullptr;
  new (&g_pool_mutex) std::mutex();
  forget_openmp_in_child();
}
const bool g_atfork_registered = [] {
  pthread_atfork(nullptr, nullptr, forget_pool_in_child);
  return true;
}();

ThreadPool& pool() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_thread_limit.load() == 0) g_thread_limit = default_threads();
  if (g_pool == nullptr || g_pool->threads() < g_thread_limit.load())
    g_pool = new ThreadPool(std::max(default_threads(), g_thread_limit.load()));
  return *g_pool;
}

// --- the OpenMP runtime already in the process ------------------------------------------------
//
// Under PyTorch, torch's own OpenMP team (libgomp) runs its ops; after each
// one its threads spin for a while waiting for more work. Our own workers,
// woken for the next zerofuse op, then share cores with those spinning threads
// and a job that should take 1 ms takes 3-4. So when an OpenMP runtime is
// loaded in the process (torch's libgomp is, with global symbols), jobs run on
// its team instead: the threads that are spinning pick the ranges up. Found at
// run time with dlsym, so the core does not link OpenMP and works without it.
struct OpenMpRuntime {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;  // GOMP_parallel (GCC >= 4.9 ABI)
  int (*thread_num)() = nullptr;
  int (*team_size)() = nullptr;
  int (*in_parallel)() = nullptr;
  int (*max_threads)() = nullptr;  // the team size the process asked for (torch.set_num_threads sets it)
  bool usable() const { return parallel && thread_num && team_size && in_parallel && max_threads; }
};

std::atomic<bool> g_openmp_found{false};
bool g_openmp_refused_in_child = false;
OpenMpRuntime g_openmp;
std::mutex g_openmp_mutex;

bool own_pool_forced() {
  const char* env = std::getenv("ZEROFUSE_THREADING");
  return env != nullptr && std::string(env) == "pool";
}

// After fork() the child has none of the team's threads either, and GNU
// OpenMP does not rebuild its team in a child: use our own (fresh) pool there.
void forget_openmp_in_child() {
  g_openmp_found.store(false);
  g_openmp_refused_in_child = true;
}

const OpenMpRuntime* loaded_openmp() {
  if (g_openmp_found.load(std::memory_order_acquire)) return &g_openmp;
  return nullptr;
}

struct OpenMpJob {
  const std::function<void(std::int64_t, std::int64_t, int)>* fn;
  std::int64_t n;
  int ranges;
  const OpenMpRuntime* rt;
  std::mutex error_mutex;
  std::exception_ptr error;
};

// Team thread `first` of `team` runs ranges first, first + team, ...: the same
// ranges (so the same results) whatever size of team the runtime gives.
void run_ranges_of(OpenMpJob& job, int first, int team) {
  for (int r = first; r < job.ranges; r += team) {
    const std::int64_t begin = job.n * r / job.ranges, end = job.n * (r + 1) / job.ranges;
    try {
      if (begin < end) (*job.fn)(begin, end, r);
    } catch (...) {
      std::lock_guard<std::mutex> lock(job.error_mutex);
      if (!job.error) job.error = std::current_exception();
    }
  }
}

void run_openmp_ranges(void* data) {
  auto& job = *static_cast<OpenMpJob*>(data);
  t_inside_job = true;  // a nested parallel_for runs its ranges on this thread
  run_ranges_of(job, job.rt->thread_num(), std::max(1, job.rt->team_size()));
  t_inside_job = false;
}

}  // namespace

bool adopt_loaded_openmp() {
  if (g_openmp_found.load(std::memory_order_acquire)) return true;
  if (own_pool_forced() || g_openmp_refused_in_child) return false;
  std::lock_guard<std::mutex> lock(g_openmp_mutex);
  OpenMpRuntime rt;
  rt.parallel = reinterpret_cast<decltype(rt.parallel)>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
  rt.thread_num = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "omp_get_thread_num"));
  rt.team_size = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "omp_get_num_threads"));
  rt.in_parallel = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "omp_in_parallel"));
  rt.max_threads = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "omp_get_max_threads"));
  if (!rt.usable()) return false;
  g_openmp = rt;
  g_openmp_found.store(true, std::memory_order_release);
  return true;
}

const char* threading_backend() { return loaded_openmp() ? "openmp" : "pool"; }

int pool_threads() {
  pool();
  return g_thread_limit.load();
}

void set_pool_threads(int threads) {
  if (threads < 1) value_error("set_num_threads: 'threads' must be >= 1, got ", threads);
  g_thread_limit = threads;
}

int parallel_ranges(std::int64_t n, std::int64_t min_per_range) {
  if (n <= 0) return 0;
  const std::int64_t by_size = std::max<std::int64_t>(1, n / std::max<std::int64_t>(1, min_per_range));
  return int(std::min<std::int64_t>(pool_threads(), by_size));
}

void parallel_for(std::int64_t n, std::int64_t min_per_range,
                  const std::function<void(std::int64_t, std::int64_t, int)>& fn) {
  const int ranges = parallel_ranges(n, min_per_range);
  if (ranges == 0) return;
  if (ranges > 1 && !t_inside_job && !ThreadPool::in_worker_) {
    if (const OpenMpRuntime* rt = loaded_openmp(); rt && !rt->in_parallel()) {
      // As many threads as the ranges, but no more than the process gave
      // OpenMP (one in torch's DataLoader workers): then they run here, in order.
      OpenMpJob job{&fn, n, ranges, rt, {}, nullptr};
      const int team = std::min(ranges, std::max(1, rt->max_threads()));
      if (team > 1)
        rt->parallel(run_openmp_ranges, &job, unsigned(team), 0);
      else
        run_ranges_of(job, 0, 1);
      if (job.error) std::rethrow_exception(job.error);
      return;
    }
  }
  ThreadPool& p = pool();
  // Nested or concurrent calls run their ranges one after another on this
  // thread: same ranges, same results, no deadlock.
  std::unique_lock<std::mutex> lock(p.run_mutex_, std::defer_lock);
  if (ranges == 1 || t_inside_job || ThreadPool::in_worker_ || !lock.try_lock()) {
    for (int r = 0; r < ranges; ++r) {
      const std::int64_t begin = n * r / ranges, end = n * (r + 1) / ranges;
      if (begin < end) fn(begin, end, r);
    }
    return;
  }
  t_inside_job = true;
  try {
    p.run(ranges, n, fn);
  } catch (...) {
    t_inside_job = false;
    throw;
  }
  t_inside_job = false;
}

}  // namespace zerofuse::detail
