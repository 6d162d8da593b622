// CUDA softmax attention backward on tensor cores (mma.sync m16n8k16, sm_80+).
// The probabilities are recomputed tile by tile from the forward's row
// logsumexp, in two kernels that each own what they write, so no output is
// accumulated with atomics and the result is the same on every run:
//
//   keys kernel     a block of 4 warps takes 64 keys of one head (16 per
//                   warp); K and V stay in shared memory while tiles of Q and
//                   dO stream past. Per tile, in the transposed frame
//                   (keys as rows):
//                     P^T  = exp2(K Q^T * scale_log2 - lse2)   masked to 0
//                     dV  += P^T dO
//                     dP^T = V dO^T
//                     dS^T = P^T (dP^T - Di)
//                     dK  += dS^T Q                 (times scale at the end)
//   queries kernel  a block takes 64 queries (16 per warp), Q and dO in
//                   shared memory, tiles of K and V stream past:
//                     P = exp2(Q K^T * scale_log2 - lse2), dP = dO V^T,
//                     dS = P (dP - Di), dQ += dS K  (times scale at the end)
//
// Di = rowsum(dO * O) comes from attention.cu's row-dot kernel. P and dS are
// rounded to the input type where they enter an mma, as FlashAttention does;
// every accumulator is float32. Recomputing P and dP in both kernels costs 7
// matrix products per tile pair instead of FlashAttention-2's 5, the price of
// not adding dQ with atomics in a nondeterministic order.
//
// Taken where the forward's tensor-core kernel is (float16/bfloat16, head_dim
// 64 or 128, 16-byte aligned rows, not ZEROFUSE_CUDA_ATTENTION=baseline).
#include <cstdint>

#include "common.cuh"
#include "common/cuda_kernels.h"
#include "mma.cuh"

namespace zerofuse::cuda {
namespace {

using namespace mma;

constexpr int kWarps = 4;
constexpr int kRowsPerBlock = 64;  // keys (keys kernel) or queries (queries kernel) a block owns: 16 per warp

// The streamed tile: 64 rows at head_dim 64; at 128 a tile of 32 keeps the
// float32 accumulators (two D-wide ones in the keys kernel) in registers.
template <int D>
constexpr int kStreamRows = D == 128 ? 32 : 64;


template <typename T, int D>
constexpr std::size_t keys_kernel_shared_bytes() {
  return sizeof(T) * (2 * kRowsPerBlock + 2 * kStreamRows<D>) * (D + 8) + 2 * sizeof(float) * kStreamRows<D>;
}

template <typename T, int D>
constexpr std::size_t queries_kernel_shared_bytes() {
  return sizeof(T) * (2 * kRowsPerBlock + 2 * kStreamRows<D>) * (D + 8);
}

// Writes one thread's two rows (g and g + 8 of its warp's 16) of a D-wide
// accumulator, times `factor`, to rows `row_lo` and `row_lo + 8` of `base`.
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* base, std::int64_t row_stride, const float (&acc)[D / 8][4],
                                           float factor, int row_lo, int rows, int c) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row_lo + 8 * half;
    if (row >= rows) continue;
    T* out = base + row * row_stride + 2 * c;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
      *reinterpret_cast<std::uint32_t*>(out + j * 8) =
          Mma<T>::pack(acc[j][2 * half] * factor, acc[j][2 * half + 1] * factor);
  }
}

template <typename T, int D>
__global__ void attention_backward_keys_mma(const T* q, Head qr, const T* k, Head kr, const T* v, Head vr,
                                            const T* dout, Head gr, const float* lse, const float* di,
                                            const bool* mask, T* dk, Head dkr, T* dv, Head dvr, Problem p) {
  constexpr int kQ = kStreamRows<D>;
  constexpr int kStride = D + 8;  // padded rows: see attention_mma.cu
  extern __shared__ uint4 shared_words[];
  T* ks = reinterpret_cast<T*>(shared_words);  // [64][kStride]: this block's keys
  T* vs = ks + kRowsPerBlock * kStride;        // [64][kStride]
  T* qs = vs + kRowsPerBlock * kStride;        // [kQ][kStride]: the current query tile
  T* gs = qs + kQ * kStride;                   // [kQ][kStride]: its dO
  float* lse2 = reinterpret_cast<float*>(gs + kQ * kStride);  // [kQ]: its logsumexp in log2 units
  float* dis = lse2 + kQ;                                     // [kQ]: its Di

  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int key0 = blockIdx.y * kRowsPerBlock;
  const int key_lo = key0 + warp * 16 + g;  // this thread's keys: key_lo and key_lo + 8
  const T* qb = q + b * qr.sb + h * qr.sh;
  const T* gb = dout + b * gr.sb + h * gr.sh;
  const std::int64_t row_base = std::int64_t(bh) * p.seq_q;  // lse and Di of this head
  const bool* mask_b = mask ? mask + std::int64_t(b) * p.seq_k : nullptr;
  bool key_ok[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int key = key_lo + 8 * half;
    key_ok[half] = key < p.seq_k && (mask_b == nullptr || mask_b[key]);
  }

  stage_rows<T, D>(ks, kStride, k + b * kr.sb + h * kr.sh, kr.ss, key0, kRowsPerBlock, p.seq_k, threadIdx.x,
                   kWarps * 32);
  stage_rows<T, D>(vs, kStride, v + b * vr.sb + h * vr.sh, vr.ss, key0, kRowsPerBlock, p.seq_k, threadIdx.x,
                   kWarps * 32);
  const T* my_k = ks + warp * 16 * kStride;
  const T* my_v = vs + warp * 16 * kStride;

  float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[j][e] = dv_acc[j][e] = 0.0f;

  // Causal: queries before key0 see none of these keys.
  for (int q0 = p.causal ? key0 / kQ * kQ : 0; q0 < p.seq_q; q0 += kQ) {
    __syncthreads();  // the previous tile is consumed (and, the first time, K and V are staged)
    stage_rows<T, D>(qs, kStride, qb, qr.ss, q0, kQ, p.seq_q, threadIdx.x, kWarps * 32);
    stage_rows<T, D>(gs, kStride, gb, gr.ss, q0, kQ, p.seq_q, threadIdx.x, kWarps * 32);
    for (int r = threadIdx.x; r < kQ; r += kWarps * 32) {
      const bool inside = q0 + r < p.seq_q;
      lse2[r] = inside ? lse[row_base + q0 + r] * kLog2e : 0.0f;
      dis[r] = inside ? di[row_base + q0 + r] : 0.0f;
    }
    __syncthreads();

    // P^T: rows are this thread's keys, columns (n-tile nt, element e) query q0 + 8 nt + 2c + (e & 1).
    float pt[kQ / 8][4];
    rows_times_rows_t<T, kQ, D>(pt, my_k, kStride, qs, kStride, g, c);
#pragma unroll
    for (int nt = 0; nt < kQ / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * c + (e & 1), query = q0 + col, key = key_lo + 8 * (e >> 1);
        const bool seen = key_ok[e >> 1] && query < p.seq_q && (!p.causal || key <= query);
        pt[nt][e] = seen ? exp2f(pt[nt][e] * p.scale_log2 - lse2[col]) : 0.0f;
      }
    accumulate_c_times_tile<T, kQ, D>(dv_acc, pt, gs, kStride, lane);  // dV += P^T dO

    float dst[kQ / 8][4];  // dP^T, then dS^T in place
    rows_times_rows_t<T, kQ, D>(dst, my_v, kStride, gs, kStride, g, c);
#pragma unroll
    for (int nt = 0; nt < kQ / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[nt][e] = pt[nt][e] * (dst[nt][e] - dis[nt * 8 + 2 * c + (e & 1)]);
    accumulate_c_times_tile<T, kQ, D>(dk_acc, dst, qs, kStride, lane);  // dK += dS^T Q
  }

  store_rows<T, D>(dk + b * dkr.sb + h * dkr.sh, dkr.ss, dk_acc, p.scale, key_lo, p.seq_k, c);
  store_rows<T, D>(dv + b * dvr.sb + h * dvr.sh, dvr.ss, dv_acc, 1.0f, key_lo, p.seq_k, c);
}

template <typename T, int D>
__global__ void attention_backward_queries_mma(const T* q, Head qr, const T* k, Head kr, const T* v, Head vr,
                                               const T* dout, Head gr, const float* lse, const float* di,
                                               const bool* mask, T* dq, Head dqr, Problem p) {
  constexpr int kN = kStreamRows<D>;
  constexpr int kStride = D + 8;
  extern __shared__ uint4 shared_words[];
  T* qs = reinterpret_cast<T*>(shared_words);  // [64][kStride]: this block's queries
  T* gs = qs + kRowsPerBlock * kStride;        // [64][kStride]: their dO
  T* ks = gs + kRowsPerBlock * kStride;        // [kN][kStride]: the current key tile
  T* vs = ks + kN * kStride;                   // [kN][kStride]

  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int row0 = blockIdx.y * kRowsPerBlock;
  const int row_lo = row0 + warp * 16 + g;  // this thread's queries: row_lo and row_lo + 8
  const T* kb = k + b * kr.sb + h * kr.sh;
  const T* vb = v + b * vr.sb + h * vr.sh;
  const std::int64_t row_base = std::int64_t(bh) * p.seq_q;
  const bool* mask_b = mask ? mask + std::int64_t(b) * p.seq_k : nullptr;
  float lse2_row[2], di_row[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row_lo + 8 * half;
    lse2_row[half] = row < p.seq_q ? lse[row_base + row] * kLog2e : 0.0f;
    di_row[half] = row < p.seq_q ? di[row_base + row] : 0.0f;
  }

  stage_rows<T, D>(qs, kStride, q + b * qr.sb + h * qr.sh, qr.ss, row0, kRowsPerBlock, p.seq_q, threadIdx.x,
                   kWarps * 32);
  stage_rows<T, D>(gs, kStride, dout + b * gr.sb + h * gr.sh, gr.ss, row0, kRowsPerBlock, p.seq_q, threadIdx.x,
                   kWarps * 32);
  const T* my_q = qs + warp * 16 * kStride;
  const T* my_g = gs + warp * 16 * kStride;

  float dq_acc[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) dq_acc[j][0] = dq_acc[j][1] = dq_acc[j][2] = dq_acc[j][3] = 0.0f;

  const int block_last_row = min(row0 + kRowsPerBlock, p.seq_q) - 1;
  const int key_end = p.causal ? min(p.seq_k, block_last_row + 1) : p.seq_k;
  for (int key0 = 0; key0 < key_end; key0 += kN) {
    __syncthreads();  // the previous tile is consumed (and, the first time, Q and dO are staged)
    stage_rows<T, D>(ks, kStride, kb, kr.ss, key0, kN, p.seq_k, threadIdx.x, kWarps * 32);
    stage_rows<T, D>(vs, kStride, vb, vr.ss, key0, kN, p.seq_k, threadIdx.x, kWarps * 32);
    __syncthreads();

    // P: rows are this thread's queries, columns key0 + 8 nt + 2c + (e & 1).
    float s[kN / 8][4];
    rows_times_rows_t<T, kN, D>(s, my_q, kStride, ks, kStride, g, c);
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + nt * 8 + 2 * c + (e & 1), row = row_lo + 8 * (e >> 1);
        const bool seen =
            key < p.seq_k && row < p.seq_q && (!p.causal || key <= row) && (mask_b == nullptr || mask_b[key]);
        s[nt][e] = seen ? exp2f(s[nt][e] * p.scale_log2 - lse2_row[e >> 1]) : 0.0f;
      }

    float ds[kN / 8][4];  // dP, then dS in place
    rows_times_rows_t<T, kN, D>(ds, my_g, kStride, vs, kStride, g, c);
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[nt][e] = s[nt][e] * (ds[nt][e] - di_row[e >> 1]);
    accumulate_c_times_tile<T, kN, D>(dq_acc, ds, ks, kStride, lane);  // dQ += dS K
  }

  store_rows<T, D>(dq + b * dqr.sb + h * dqr.sh, dqr.ss, dq_acc, p.scale, row_lo, p.seq_q, c);
}

template <typename Kernel>
void allow_dynamic_shared(Kernel kernel, std::size_t bytes) {
  ZF_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                     cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

}  // namespace

bool attention_backward_tensor_cores(const TensorView& dout, const TensorView& q, const TensorView& k,
                                     const TensorView& v, const TensorView& lse, const float* di,
                                     const TensorView* mask, const AttentionConfig& config, const TensorView& dq,
                                     const TensorView& dk, const TensorView& dv, Stream st) {
  if (!tensor_cores_take(q.dtype, int(q.shape[3]), {&dout, &q, &k, &v, &dq, &dk, &dv})) return false;
  const std::int64_t heads_total = q.shape[0] * q.shape[1];
  const std::int64_t max_rows = std::int64_t(65535) * kRowsPerBlock;
  if (heads_total >= std::int64_t(1) << 31 || q.shape[2] > max_rows || k.shape[2] > max_rows) return false;
  if (heads_total == 0) return true;

  const Problem p = problem_of(q, k, config);
  const bool* m = mask ? mask->data_as<const bool>() : nullptr;
  const cudaStream_t stream = stream_of(st);
  dispatch_tensor_core_types(q.dtype, int(q.shape[3]), [&](auto tag, auto dim_tag) {
    using T = decltype(tag);
    constexpr int kDim = decltype(dim_tag)::value;
    if (p.seq_k > 0) {
      constexpr std::size_t bytes = keys_kernel_shared_bytes<T, kDim>();
      allow_dynamic_shared(attention_backward_keys_mma<T, kDim>, bytes);
      const dim3 grid(unsigned(heads_total), unsigned((p.seq_k + kRowsPerBlock - 1) / kRowsPerBlock));
      attention_backward_keys_mma<T, kDim><<<grid, kWarps * 32, bytes, stream>>>(
          q.data_as<const T>(), head_of(q), k.data_as<const T>(), head_of(k), v.data_as<const T>(), head_of(v),
          dout.data_as<const T>(), head_of(dout), lse.data_as<const float>(), di, m, dk.data_as<T>(), head_of(dk),
          dv.data_as<T>(), head_of(dv), p);
      ZF_CUDA_CHECK_LAUNCH("attention_backward_keys_mma");
    }
    if (p.seq_q > 0) {
      constexpr std::size_t bytes = queries_kernel_shared_bytes<T, kDim>();
      allow_dynamic_shared(attention_backward_queries_mma<T, kDim>, bytes);
      const dim3 grid(unsigned(heads_total), unsigned((p.seq_q + kRowsPerBlock - 1) / kRowsPerBlock));
      attention_backward_queries_mma<T, kDim><<<grid, kWarps * 32, bytes, stream>>>(
          q.data_as<const T>(), head_of(q), k.data_as<const T>(), head_of(k), v.data_as<const T>(), head_of(v),
          dout.data_as<const T>(), head_of(dout), lse.data_as<const float>(), di, m, dq.data_as<T>(), head_of(dq),
          p);
      ZF_CUDA_CHECK_LAUNCH("attention_backward_queries_mma");
    }
  });
  return true;
}

}  // namespace zerofuse::cuda
