// CPU gradient statistics. Each tensor is cut into fixed chunks; a chunk's sum
// of squares is accumulated in float32 lanes, and chunk results are added in
// chunk order in double. Chunk bounds depend only on the tensor sizes, so the
// result has the same bits for any number of threads.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/convert.h"
#include "cpu/kernels.h"
#include "parallel.h"

namespace zerofuse::cpu::ZF_CPU_ISA {
namespace {

constexpr std::int64_t kChunk = 1 << 14;

struct ChunkResult {
  double sum_sq;
  bool nonfinite;
};

template <typename T>
ChunkResult chunk_stats(const T* __restrict x, std::int64_t n) {
  float sum_sq = 0.0f;
  float poison = 0.0f;  // x - x is 0 for finite x and NaN for inf or NaN
#pragma omp simd reduction(+ : sum_sq, poison)
  for (std::int64_t i = 0; i < n; ++i) {
    const float v = to_float(x[i]);
    sum_sq += v * v;
    poison += v - v;
  }
  return {double(sum_sq), std::isnan(poison)};
}

}  // namespace

void grad_stats(const std::vector<TensorView>& grads, float* out) {
  std::vector<std::int64_t> first_chunk(grads.size() + 1, 0);
  for (std::size_t i = 0; i < grads.size(); ++i)
    first_chunk[i + 1] = first_chunk[i] + (grads[i].numel() + kChunk - 1) / kChunk;
  const std::int64_t chunks = first_chunk.back();
  std::vector<ChunkResult> results(std::size_t(chunks), ChunkResult{0.0, false});

  detail::parallel_for(chunks, 4, [&](std::int64_t begin, std::int64_t end, int) {
    std::size_t t = std::upper_bound(first_chunk.begin(), first_chunk.end(), begin) - first_chunk.begin() - 1;
    for (std::int64_t c = begin; c < end; ++c) {
      while (c >= first_chunk[t + 1]) ++t;
      const TensorView& g = grads[t];
      const std::int64_t offset = (c - first_chunk[t]) * kChunk;
      const std::int64_t n = std::min(kChunk, g.numel() - offset);
      results[std::size_t(c)] = dispatch_float(g.dtype, [&](auto tag) {
        using T = decltype(tag);
        return chunk_stats(g.data_as<const T>() + offset, n);
      });
    }
  });

  double sum_sq = 0.0;
  bool nonfinite = false;
  for (const ChunkResult& r : results) {
    sum_sq += r.sum_sq;
    nonfinite = nonfinite || r.nonfinite;
  }
  out[0] = float(sum_sq);
  out[1] = nonfinite ? 1.0f : 0.0f;
}

}  // namespace zerofuse::cpu::ZF_CPU_ISA
