// C += alpha * A B for the small blocks of the CPU attention kernels (64 x 64
// scores against head_dim columns). A register-blocked micro-kernel keeps a
// 4 x 16 tile of C in eight 8-wide vectors while it walks the shared
// dimension, so each loaded element feeds several multiply-adds; edges fall
// back to plain loops. A is read through strides, so A^T costs nothing.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace zerofuse::cpu {

// A(m, k) = a[m * a_row + k * a_col]; B is row-major [K][N] with row stride ldb;
// C is row-major [M][N] with row stride ldc.
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
};

template <typename T>
inline void gemm_edges(const Gemm<T>& g, std::int64_t m0, std::int64_t m1, std::int64_t n0, std::int64_t n1) {
  for (std::int64_t m = m0; m < m1; ++m) {
    T* __restrict crow = g.c + m * g.ldc;
    for (std::int64_t k = 0; k < g.K; ++k) {
      const T av = g.alpha * g.a[m * g.a_row + k * g.a_col];
      const T* __restrict brow = g.b + k * g.ldb;
#pragma omp simd
      for (std::int64_t n = n0; n < n1; ++n) crow[n] += av * brow[n];
    }
  }
}

inline void gemm_acc(const Gemm<double>& g) { gemm_edges(g, 0, g.M, 0, g.N); }  // float64: reference work

inline void gemm_acc(const Gemm<float>& g) {
  typedef float v8 __attribute__((vector_size(32)));
  constexpr int kRows = 4, kCols = 16;
  const std::int64_t m_full = g.M / kRows * kRows, n_full = g.N / kCols * kCols;
  for (std::int64_t m0 = 0; m0 < m_full; m0 += kRows) {
    for (std::int64_t n0 = 0; n0 < n_full; n0 += kCols) {
      v8 acc[kRows][2] = {};
      for (std::int64_t k = 0; k < g.K; ++k) {
        v8 b0, b1;
        std::memcpy(&b0, g.b + k * g.ldb + n0, sizeof b0);
        std::memcpy(&b1, g.b + k * g.ldb + n0 + 8, sizeof b1);
        for (int r = 0; r < kRows; ++r) {
          const float av = g.a[(m0 + r) * g.a_row + k * g.a_col];
          acc[r][0] += av * b0;
          acc[r][1] += av * b1;
        }
      }
      for (int r = 0; r < kRows; ++r) {
        float* crow = g.c + (m0 + r) * g.ldc + n0;
        v8 c0, c1;
        std::memcpy(&c0, crow, sizeof c0);
        std::memcpy(&c1, crow + 8, sizeof c1);
        c0 += g.alpha * acc[r][0];
        c1 += g.alpha * acc[r][1];
        std::memcpy(crow, &c0, sizeof c0);
        std::memcpy(crow + 8, &c1, sizeof c1);
      }
    }
  }
  gemm_edges(g, 0, m_full, n_full, g.N);  // right edge of the full rows
  gemm_edges(g, m_full, g.M, 0, g.N);     // bottom rows
}

}  // namespace zerofuse::cpu
