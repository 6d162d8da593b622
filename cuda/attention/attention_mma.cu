// CUDA softmax attention forward on tensor cores (mma.sync m16n8k16, sm_80+),
// FlashAttention-2's schedule: a block of 4 warps takes 64 query rows of one
// head, each warp 16 of them held as A fragments in registers for the whole
// run; 64-key tiles of K and V are staged in shared memory; per tile a warp
//   1. S = Q K^T          16 x 64 scores in f32 accumulators (8 n-tiles),
//   2. masks and scales them (log2 domain) and updates each row's running max
//      and sum, rescaling its O accumulators,
//   3. O += P V           P rounded to the input type, reused straight from the
//                         S accumulators as A fragments (no shared memory),
//                         V's B fragments by ldmatrix.trans.
// Then O / l is written and the row logsumexp saved for the backward
// (attention_mma_backward.cu).
//
// Fragment layouts and the mma helpers: mma.cuh.
//
// Taken for float16/bfloat16, head_dim 64 or 128, 16-byte aligned rows;
// anything else goes to the CUDA-core kernel. Setting ZEROFUSE_CUDA_ATTENTION=
// baseline forces that kernel too (for comparing the two).
#include <cstdint>

#include "common.cuh"
#include "common/cuda_kernels.h"
#include "mma.cuh"

namespace zerofuse::cuda {
namespace {

constexpr int kBlockM = 64;  // query rows per block (16 per warp)
constexpr int kBlockN = 64;  // keys per shared-memory tile
constexpr int kWarps = 4;

using namespace mma;


// No __launch_bounds__: with it ptxas held sm_80 to 168 registers and spilled
// 48 bytes at head_dim 128.
template <typename T, int D>
__global__ void attention_forward_mma(const T* q, Head qr, const T* k, Head kr, const T* v, Head vr,
                                      const bool* mask, T* out, Head orows, float* lse, Problem p) {
  // Rows padded by 8 elements (16 bytes): the 8 rows a quad-column reads start
  // in different banks, and ldmatrix's row addresses stay 16-byte aligned.
  constexpr int kStride = D + 8;
  __shared__ alignas(16) T ks[kBlockN * kStride];
  __shared__ alignas(16) T vs[kBlockN * kStride];

  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int block_row0 = blockIdx.y * kBlockM;
  const int row_lo = block_row0 + warp * 16 + g, row_hi = row_lo + 8;  // this thread's two rows
  const T* qb = q + b * qr.sb + h * qr.sh;
  const T* kb = k + b * kr.sb + h * kr.sh;
  const T* vb = v + b * vr.sb + h * vr.sh;
  const bool* mask_b = mask ? mask + std::int64_t(b) * p.seq_k : nullptr;

  // Q as A fragments, k-steps of 16 over head_dim; rows past the end are 0.
  std::uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int col = kk * 16 + 2 * c;
    qf[kk][0] = row_lo < p.seq_q ? load_pair(qb + row_lo * qr.ss + col) : 0u;
    qf[kk][1] = row_hi < p.seq_q ? load_pair(qb + row_hi * qr.ss + col) : 0u;
    qf[kk][2] = row_lo < p.seq_q ? load_pair(qb + row_lo * qr.ss + col + 8) : 0u;
    qf[kk][3] = row_hi < p.seq_q ? load_pair(qb + row_hi * qr.ss + col + 8) : 0u;
  }

  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 domain, the same in all four lanes of a quad
  float row_sum[2] = {0.0f, 0.0f};            // this lane's part of each row's sum

  const int block_last_row = min(block_row0 + kBlockM, p.seq_q) - 1;
  const int key_end = p.causal ? min(p.seq_k, block_last_row + 1) : p.seq_k;
  for (int key0 = 0; key0 < key_end; key0 += kBlockN) {
    __syncthreads();  // every warp is done with the previous tile
    // Keys past the end are zeros (V's must be: 0 * garbage could be NaN).
    stage_rows<T, D>(ks, kStride, kb, kr.ss, key0, kBlockN, p.seq_k, threadIdx.x, kWarps * 32);
    stage_rows<T, D>(vs, kStride, vb, vr.ss, key0, kBlockN, p.seq_k, threadIdx.x, kWarps * 32);
    __syncthreads();

    // 1. S = Q K^T: B[k][n] = K[key n][dim k], so b0/b1 are pairs along a K row.
    float s[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
      const T* krow = ks + (nt * 8 + g) * kStride + 2 * c;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        Mma<T>::run(s[nt], qf[kk], load_pair(krow + kk * 16), load_pair(krow + kk * 16 + 8));
    }

    // 2. Mask, scale, and the online softmax of rows g (e = 0, 1) and g + 8 (e = 2, 3).
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + nt * 8 + 2 * c + (e & 1), row = e < 2 ? row_lo : row_hi;
        const bool seen = key < p.seq_k && (!p.causal || key <= row) && (mask_b == nullptr || mask_b[key]);
        s[nt][e] = seen ? s[nt][e] * p.scale_log2 : -INFINITY;
      }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * half], s[nt][2 * half + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float new_max = fmaxf(row_max[half], tile_max);
      // Nothing seen yet (new_max = -inf): keep everything at 0 rather than exp2(-inf - -inf) = NaN.
      const float alpha = new_max == -INFINITY ? 1.0f : exp2f(row_max[half] - new_max);
      float tile_sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          s[nt][e] = new_max == -INFINITY ? 0.0f : exp2f(s[nt][e] - new_max);
          tile_sum += s[nt][e];
        }
      row_sum[half] = row_sum[half] * alpha + tile_sum;
      row_max[half] = new_max;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        o[j][2 * half] *= alpha;
        o[j][2 * half + 1] *= alpha;
      }
    }

    // 3. O += P V: P's A fragments straight from S's accumulators, V's B
    // fragments by ldmatrix.trans.
    accumulate_c_times_tile<T, kBlockN, D>(o, s, vs, kStride, lane);
  }

  // O / l, and lse = ln(l) + max (the max is in log2 units). A row that saw
  // no key has l = 0: zeros and lse = -inf, as the other kernels give.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float total = row_sum[half];
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    const int row = half == 0 ? row_lo : row_hi;
    if (row >= p.seq_q) continue;
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    T* orow = out + b * orows.sb + h * orows.sh + row * orows.ss + 2 * c;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const std::uint32_t packed = Mma<T>::pack(o[j][2 * half] * inv, o[j][2 * half + 1] * inv);
      *reinterpret_cast<std::uint32_t*>(orow + j * 8) = packed;
    }
    if (c == 0)
      lse[(std::int64_t(b) * p.heads + h) * p.seq_q + row] =
          total > 0.0f ? (row_max[half] + log2f(total)) * kLn2 : -INFINITY;
  }
}

}  // namespace

bool attention_forward_tensor_cores(const TensorView& q, const TensorView& k, const TensorView& v,
                                    const TensorView* mask, const AttentionConfig& config, const TensorView& out,
                                    const TensorView& lse, Stream st) {
  if (!tensor_cores_take(q.dtype, int(q.shape[3]), {&q, &k, &v, &out})) return false;
  if (q.shape[0] * q.shape[1] >= std::int64_t(1) << 31 || q.shape[2] > std::int64_t(65535) * kBlockM) return false;
  const Problem p = problem_of(q, k, config);
  const dim3 grid(unsigned(q.shape[0] * q.shape[1]), unsigned((p.seq_q + kBlockM - 1) / kBlockM));
  const bool* m = mask ? mask->data_as<const bool>() : nullptr;
  dispatch_tensor_core_types(q.dtype, int(q.shape[3]), [&](auto tag, auto dim_tag) {
    using T = decltype(tag);
    constexpr int kDim = decltype(dim_tag)::value;
    attention_forward_mma<T, kDim><<<grid, kWarps * 32, 0, stream_of(st)>>>(
        q.data_as<const T>(), head_of(q), k.data_as<const T>(), head_of(k), v.data_as<const T>(), head_of(v), m,
        out.data_as<T>(), head_of(out), lse.data_as<float>(), p);
    ZF_CUDA_CHECK_LAUNCH("attention_forward_mma");
  });
  return true;
}

}  // namespace zerofuse::cuda
