// Tensor-core building blocks shared by the attention kernels (sm_80+):
// mma.sync m16n8k16 for float16/bfloat16 with float32 accumulators, packing
// two floats into one A/B register, 32-bit pair loads and ldmatrix.x4.trans.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with 16-bit A/B): lane = 4 g + c;
//   A (16x16, row):  a0 = A[g][2c..2c+1]  a1 = A[g+8][2c..]  a2 = A[g][8+2c..]  a3 = A[g+8][8+2c..]
//   B (16x8, col):   b0 = B[2c..2c+1][g]  b1 = B[8+2c..8+2c+1][g]
//   C (16x8, f32):   c0,c1 = C[g][2c, 2c+1]   c2,c3 = C[g+8][2c, 2c+1]
// so a thread owns rows g and g+8 of a 16-row tile, and the quad (same g)
// together holds whole rows: row reductions are two xor-shuffles. Two C tiles
// side by side (n-tiles 2t, 2t+1) are, register for register, the A fragment
// of the 16 columns they cover: the product of one mma feeds the next without
// leaving registers.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "attention_common.cuh"
#include "zerofuse/attention.h"

namespace zerofuse::cuda::mma {

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                             std::uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static std::uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
    std::uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  }
};
template <>
struct Mma<__half> {
  __device__ __forceinline__ static void run(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                             std::uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static std::uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    std::uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  }
};

// Two consecutive 16-bit elements as one 32-bit word (4-byte aligned by the host's checks).
__device__ __forceinline__ std::uint32_t load_pair(const void* p) { return *static_cast<const std::uint32_t*>(p); }

// The A fragment of the 16 x 16 block at `tile` (row-major, `stride` elements
// per row): rows g and g + 8, columns 2c and 8 + 2c.
template <typename T>
__device__ __forceinline__ void load_a(std::uint32_t (&a)[4], const T* tile, int stride, int g, int c) {
  a[0] = load_pair(tile + g * stride + 2 * c);
  a[1] = load_pair(tile + (g + 8) * stride + 2 * c);
  a[2] = load_pair(tile + g * stride + 8 + 2 * c);
  a[3] = load_pair(tile + (g + 8) * stride + 8 + 2 * c);
}

// The A fragment of P (16 rows x 16 columns) held as C fragments of the two
// n-tiles that cover those columns, rounded to T.
template <typename T>
__device__ __forceinline__ void a_from_c(std::uint32_t (&a)[4], const float (&left)[4], const float (&right)[4]) {
  a[0] = Mma<T>::pack(left[0], left[1]);
  a[1] = Mma<T>::pack(left[2], left[3]);
  a[2] = Mma<T>::pack(right[0], right[1]);
  a[3] = Mma<T>::pack(right[2], right[3]);
}

// Four 8x8 matrices of 16-bit elements, transposed on the way in: lane l
// gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* smem_row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// acc[16 x D] += A[16 x 16k] B, where B is a row-major [16k x D] tile in shared
// memory (`stride` elements per row) read through ldmatrix.trans, and A is
// given as C fragments `c_tiles` (n-tiles 2kk, 2kk + 1 form the A fragment of
// k-step kk). ldmatrix's four matrices per call are (rows +0, cols +0),
// (rows +8, cols +0), (rows +0, cols +8), (rows +8, cols +8): b0, b1 of two
// output n-tiles.
template <typename T, int K, int D>
__device__ __forceinline__ void accumulate_c_times_tile(float (&acc)[D / 8][4], const float (&c_tiles)[K / 8][4],
                                                        const T* tile, int stride, int lane) {
  const int matrix = lane / 8, matrix_row = lane % 8;
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    std::uint32_t a[4];
    a_from_c<T>(a, c_tiles[2 * kk], c_tiles[2 * kk + 1]);
    const T* row = tile + (kk * 16 + (matrix & 1) * 8 + matrix_row) * stride + (matrix >> 1) * 8;
#pragma unroll
    for (int nt2 = 0; nt2 < D / 16; ++nt2) {
      std::uint32_t bf[4];
      ldmatrix_x4_trans(bf, row + nt2 * 16);
      Mma<T>::run(acc[2 * nt2], a, bf[0], bf[1]);
      Mma<T>::run(acc[2 * nt2 + 1], a, bf[2], bf[3]);
    }
  }
}

// c[16 x N] = A[16 x D] B^T, with A's rows (16, row-major, `a_stride`) and
// B's rows (N, row-major, `b_stride`) both in shared memory: B[k][n] is
// row n's element k, so b0/b1 are pairs along a row.
template <typename T, int N, int D>
__device__ __forceinline__ void rows_times_rows_t(float (&c_tiles)[N / 8][4], const T* a_rows, int a_stride,
                                                  const T* b_rows, int b_stride, int g, int c) {
#pragma unroll
  for (int nt = 0; nt < N / 8; ++nt) c_tiles[nt][0] = c_tiles[nt][1] = c_tiles[nt][2] = c_tiles[nt][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    std::uint32_t a[4];
    load_a(a, a_rows + kk * 16, a_stride, g, c);
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt) {
      const T* b = b_rows + (nt * 8 + g) * b_stride + kk * 16 + 2 * c;
      Mma<T>::run(c_tiles[nt], a, load_pair(b), load_pair(b + 8));
    }
  }
}

// Copies rows [first, first + count) of a [B, H, S, D] head (row stride
// `row_stride`, rows 16-byte aligned) into shared memory with `stride`
// elements per row, 16 bytes per access; rows at or past `rows` are zeros
// (so 0 * them cannot make a NaN).
template <typename T, int D>
__device__ __forceinline__ void stage_rows(T* dst, int stride, const T* src, std::int64_t row_stride, int first,
                                           int count, int rows, int thread, int threads) {
  for (int idx = thread; idx < count * (D / 8); idx += threads) {
    const int r = idx / (D / 8), col = (idx % (D / 8)) * 8, row = first + r;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (row < rows) value = *reinterpret_cast<const uint4*>(src + row * row_stride + col);
    *reinterpret_cast<uint4*>(dst + r * stride + col) = value;
  }
}

// The tensor-core kernels' problem: sizes, the softmax scale and the same
// scale times log2(e) (probabilities are computed with exp2).
struct Problem {
  int heads, seq_q, seq_k;
  float scale, scale_log2;
  bool causal;
};

inline Problem problem_of(const TensorView& q, const TensorView& k, const AttentionConfig& config) {
  return {int(q.shape[1]), int(q.shape[2]), int(k.shape[2]), config.scale, config.scale * kLog2e, config.causal};
}

// Rows start on 16-byte boundaries (base and every stride but the last), so
// the uint4 tile loads and the 32-bit fragment loads are aligned.
inline bool rows_aligned(const TensorView& t) {
  const std::int64_t elements = 16 / std::int64_t(t.element_size());
  return reinterpret_cast<std::uintptr_t>(t.data) % 16 == 0 && t.strides[0] % elements == 0 &&
         t.strides[1] % elements == 0 && t.strides[2] % elements == 0;
}

// ZEROFUSE_CUDA_ATTENTION=baseline: the CUDA-core kernels only (to compare the two).
inline bool forced_baseline() {
  const char* forced = std::getenv("ZEROFUSE_CUDA_ATTENTION");
  return forced != nullptr && std::strcmp(forced, "baseline") == 0;
}

// Whether the tensor-core attention kernels take a problem: float16/bfloat16,
// head_dim 64 or 128, every tensor's rows 16-byte aligned, not forced off.
inline bool tensor_cores_take(DType dtype, int head_dim, std::initializer_list<const TensorView*> tensors) {
  if ((dtype != DType::Float16 && dtype != DType::BFloat16) || (head_dim != 64 && head_dim != 128)) return false;
  for (const TensorView* t : tensors)
    if (!rows_aligned(*t)) return false;
  return !forced_baseline();
}

// Calls fn(T{}, std::integral_constant<int, D>{}) with T and D the element
// type and head_dim of a problem tensor_cores_take() accepted.
template <typename Fn>
void dispatch_tensor_core_types(DType dtype, int head_dim, Fn&& fn) {
  auto by_dim = [&](auto tag) {
    if (head_dim == 64) fn(tag, std::integral_constant<int, 64>{});
    else fn(tag, std::integral_constant<int, 128>{});
  };
  if (dtype == DType::BFloat16) by_dim(__nv_bfloat16{});
  else by_dim(__half{});
}

}  // namespace zerofuse::cuda::mma
