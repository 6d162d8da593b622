// The CPU kernels' thread pool. Work is split statically into contiguous ranges
// whose bounds depend only on the amount of work and the thread count, so a
// kernel that combines per-range results in range order is deterministic.
#pragma once

#include <cstdint>
#include <functional>

namespace zerofuse::detail {

// Calls fn(begin, end, range_index) for contiguous ranges covering [0, n),
// using up to num_threads() ranges but none smaller than min_per_range (so
// tiny jobs stay on the calling thread). Returns when every range is done;
// the first exception thrown by any range is rethrown here.
void parallel_for(std::int64_t n, std::int64_t min_per_range,
                  const std::function<void(std::int64_t, std::int64_t, int)>& fn);

// How many ranges parallel_for would use for n items (for sizing per-range
// scratch before the call).
int parallel_ranges(std::int64_t n, std::int64_t min_per_range);

int pool_threads();

// Run parallel_for's jobs on an OpenMP runtime already loaded in the process
// (PyTorch's libgomp) rather than on zerofuse's own threads, so the two do not
// compete for cores. Returns whether one was found (looked up with dlsym; never
// when ZEROFUSE_THREADING=pool). Called by the Python package once torch is
// imported; C++ embedders call it after loading their OpenMP runtime.
bool adopt_loaded_openmp();
const char* threading_backend();  // "openmp" or "pool"
void set_pool_threads(int threads);

}  // namespace zerofuse::detail
