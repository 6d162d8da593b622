// C = alpha * A B (or C += alpha * A B) for the small blocks of the CPU
// attention kernels: a few hundred rows and columns against head_dim.
//
// A register-blocked micro-kernel keeps an R x 2V tile of C in vectors while
// it walks the shared dimension, so each loaded element of B feeds R
// multiply-adds and each broadcast element of A feeds two: R = 8 rows of two
// 16-wide vectors with AVX-512 (16 of its 32 registers), 6 rows of two 8-wide
// vectors with AVX2 (12 of 16). Edges take narrower tiles, then plain loops.
// A is read through strides, so A^T costs nothing; B and C are row-major.
//
// Causal attention wants only a triangle of some products. `limit` says which
// part a row can need, and the tiles skip the rest (never less than asked;
// a tile may do a little more, which the caller must allow for):
//   ColumnsUpTo:  row m needs columns n <= m + diag (the rest is not written);
//   SharedUpTo:   row m sums over k <= m + diag (A is zero beyond);
//   SharedFrom:   row m sums over k >= m + diag (A is zero before).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/fast_math.h"

#ifndef ZF_CPU_ISA
#error "included only by CPU kernel sources, which are compiled once per instruction set"
#endif

// In the variant's own namespace: an inline function that gcc emits out of
// line would otherwise be one weak symbol for every variant, and the linker
// would keep one copy -- possibly built for an instruction set the processor
// lacks.
namespace zerofuse::cpu::ZF_CPU_ISA {

enum class Limit { None, ColumnsUpTo, SharedUpTo, SharedFrom };

// A(m, k) = a[m * a_row + k * a_col]; B(k, n) = b[k * ldb + n]; C(m, n) = c[m * ldc + n].
template <typename T>
struct Gemm {
  std::int64_t M, N, K;
  const T* a;
  std::int64_t a_row, a_col;
  const T* b;
  std::int64_t ldb;
  T* c;
  std::int64_t ldc;
  T alpha = T(1);
  bool accumulate = true;  // false: C is overwritten (it need not be initialised)
  Limit limit = Limit::None;
  std::int64_t diag = 0;
};

namespace gemm_detail {

constexpr int kLanes = kVectorFloats;
#if defined(__AVX512F__)
constexpr int kRows = 8;
#elif defined(__AVX2__)
constexpr int kRows = 6;
#else
constexpr int kRows = 4;  // the portable variant: gcc splits each vector in two
#endif

// The columns [0, n_end) and shared range [k0, k1) rows [m0, m0 + rows) need.
struct Span {
  std::int64_t n_end, k0, k1;
};

template <typename T>
Span span_of(const Gemm<T>& g, std::int64_t m0, std::int64_t rows) {
  Span s{g.N, 0, g.K};
  const std::int64_t last = m0 + rows - 1;
  if (g.limit == Limit::ColumnsUpTo) s.n_end = std::clamp<std::int64_t>(last + g.diag + 1, 0, g.N);
  if (g.limit == Limit::SharedUpTo) s.k1 = std::clamp<std::int64_t>(last + g.diag + 1, 0, g.K);
  if (g.limit == Limit::SharedFrom) s.k0 = std::clamp<std::int64_t>(m0 + g.diag, 0, g.K);
  return s;
}

template <typename T>
inline void put(const Gemm<T>& g, T* c, T value) {
  *c = g.accumulate ? *c + g.alpha * value : g.alpha * value;
}

// Plain loops for rows [m0, m1), columns [n0, n1).
template <typename T>
void edges(const Gemm<T>& g, std::int64_t m0, std::int64_t m1, std::int64_t n0, std::int64_t n1, Span s) {
  for (std::int64_t m = m0; m < m1; ++m) {
    for (std::int64_t n = n0; n < n1; ++n) {
      T sum = T(0);
      for (std::int64_t k = s.k0; k < s.k1; ++k) sum += g.a[m * g.a_row + k * g.a_col] * g.b[k * g.ldb + n];
      put(g, g.c + m * g.ldc + n, sum);
    }
  }
}

// One R x V-vector tile at (m0, n0).
template <int R, int V>
inline void tile(const Gemm<float>& g, std::int64_t m0, std::int64_t n0, Span s) {
  vfloat acc[R][V] = {};
  const float* a = g.a + m0 * g.a_row;
  for (std::int64_t k = s.k0; k < s.k1; ++k) {
    vfloat b[V];
    for (int v = 0; v < V; ++v) std::memcpy(&b[v], g.b + k * g.ldb + n0 + v * kLanes, sizeof(vfloat));
    for (int r = 0; r < R; ++r) {
      const float av = a[r * g.a_row + k * g.a_col];
      for (int v = 0; v < V; ++v) acc[r][v] += av * b[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      float* c = g.c + (m0 + r) * g.ldc + n0 + v * kLanes;
      vfloat out = g.alpha * acc[r][v];
      if (g.accumulate) {
        vfloat old;
        std::memcpy(&old, c, sizeof old);
        out += old;
      }
      std::memcpy(c, &out, sizeof out);
    }
  }
}

// Rows [m0, m0 + R) across the columns they need: two-vector tiles, then a
// one-vector tile, then plain loops.
template <int R>
void row_tiles(const Gemm<float>& g, std::int64_t m0) {
  const Span s = span_of(g, m0, R);
  // Columns past n_end up to the next vector are computed too (when C has
  // them): one vector tile is cheaper than their plain loops.
  const std::int64_t n_end = std::min(g.N, (s.n_end + kLanes - 1) / kLanes * kLanes);
  std::int64_t n0 = 0;
  for (; n0 + 2 * kLanes <= n_end; n0 += 2 * kLanes) tile<R, 2>(g, m0, n0, s);
  for (; n0 + kLanes <= n_end; n0 += kLanes) tile<R, 1>(g, m0, n0, s);
  if (n0 < n_end) edges(g, m0, m0 + R, n0, n_end, s);
}

// The last rows (fewer than kRows): row_tiles<rows>, chosen at run time.
template <int R = kRows - 1>
void last_rows(const Gemm<float>& g, std::int64_t m0, std::int64_t rows) {
  if constexpr (R > 0) {
    if (rows == R) return row_tiles<R>(g, m0);
    last_rows<R - 1>(g, m0, rows);
  }
}

}  // namespace gemm_detail

inline void gemm(const Gemm<float>& g) {
  using namespace gemm_detail;
  std::int64_t m0 = 0;
  for (; m0 + kRows <= g.M; m0 += kRows) row_tiles<kRows>(g, m0);
  last_rows(g, m0, g.M - m0);
}

// float64 is for reference work (gradcheck): plain loops.
inline void gemm(const Gemm<double>& g) {
  for (std::int64_t m = 0; m < g.M; ++m) {
    const auto s = gemm_detail::span_of(g, m, 1);
    gemm_detail::edges(g, m, m + 1, 0, s.n_end, s);
  }
}

}  // namespace zerofuse::cpu::ZF_CPU_ISA
