// CUDA softmax attention -- the straightforward version, on CUDA cores.
//
// Forward (flash-style): a block of 4 warps takes 16 query rows of one head;
// key/value tiles of 32 rows are staged in shared memory; lane j scores key j
// of the tile against a query row, the warp keeps the row's online softmax
// (running max and sum), and each lane accumulates its slice of head_dim.
// The [seq_q, seq_k] matrix never exists; the row logsumexp is saved.
//
// Backward, recomputing P = exp(S - lse) tile by tile (Di = rowsum(dO * O)):
//   keys pass:    one warp per 32 keys; lane j owns key j and accumulates its
//                 dK and dV rows in shared memory over every query that sees it;
//   queries pass: one warp per 32 queries; lane i accumulates dQ of query i.
// Nothing is shared between blocks, so no atomics and the same bits every run.
//
// head_dim up to 256. This is the correct baseline for every case; float16/
// bfloat16 with head_dim 64 or 128 go to the tensor-core kernels of
// attention_mma.cu (forward) and attention_mma_backward.cu (backward, after the
// row-dot pass here).
#include <cmath>

#include "attention_common.cuh"
#include "common/cuda_kernels.h"

namespace zerofuse::cuda {
namespace {

constexpr int kTile = 32;            // keys per shared-memory tile (one per lane)
constexpr int kRowsPerWarp = 4;      // forward: query rows per warp
constexpr int kWarps = 4;            // forward: warps per block
constexpr int kMaxDim = 256;
constexpr int kDimPerLane = kMaxDim / 32;

struct Shape {
  int batch, heads, seq_q, seq_k, dim;
  float scale;
  bool causal;
  int batch0, head0;  // the first (batch, head) of this launch: blockIdx.z and .y count from here
};

// The tiled kernels' grids are (tiles, heads, batch). The y and z extents are
// capped at 65535, so a larger batch or head count goes in several launches.
constexpr int kMaxGridYZ = 65535;

template <typename LaunchFn>
void for_each_head_block(const Shape& s, unsigned tiles, LaunchFn&& launch) {
  for (int b0 = 0; b0 < s.batch; b0 += kMaxGridYZ)
    for (int h0 = 0; h0 < s.heads; h0 += kMaxGridYZ) {
      Shape part = s;
      part.batch0 = b0;
      part.head0 = h0;
      launch(dim3(tiles, unsigned(std::min(s.heads - h0, kMaxGridYZ)), unsigned(std::min(s.batch - b0, kMaxGridYZ))),
             part);
    }
}

// This block's batch element, head and their flat index (b * heads + h).
struct BlockHead {
  int b, h;
  std::int64_t bh;
};

__device__ __forceinline__ BlockHead block_head(const Shape& s) {
  const int b = s.batch0 + int(blockIdx.z), h = s.head0 + int(blockIdx.y);
  return {b, h, std::int64_t(b) * s.heads + h};
}

__device__ __forceinline__ bool visible(const Shape& s, const bool* mask, int b, int i, int j) {
  return j < s.seq_k && (!s.causal || j <= i) && (mask == nullptr || mask[std::int64_t(b) * s.seq_k + j]);
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    attention_forward_kernel(const T* q, Head qh, const T* k, Head kh, const T* v, Head vh, const bool* mask, T* out,
                             Head oh, float* lse, Shape s) {
  extern __shared__ float smem[];
  float* ks = smem;                          // [kTile][dim + 1]
  float* vs = ks + kTile * (s.dim + 1);      // [kTile][dim]
  float* qs = vs + kTile * s.dim;            // [kWarps * kRowsPerWarp][dim]
  const auto [b, h, bh] = block_head(s);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = blockIdx.x * kWarps * kRowsPerWarp;
  const T* qb = q + b * qh.sb + h * qh.sh;
  const T* kb = k + b * kh.sb + h * kh.sh;
  const T* vb = v + b * vh.sb + h * vh.sh;

  for (int idx = threadIdx.x; idx < kWarps * kRowsPerWarp * s.dim; idx += blockDim.x) {
    const int r = idx / s.dim, c = idx % s.dim, i = row0 + r;
    qs[idx] = i < s.seq_q ? to_float(qb[i * qh.ss + c]) * s.scale : 0.0f;
  }
  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kDimPerLane];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < kDimPerLane; ++c) acc[r][c] = 0.0f;
  }
  const int last_row = min(row0 + kWarps * kRowsPerWarp, s.seq_q) - 1;
  const int key_end = s.causal ? min(s.seq_k, last_row + 1) : s.seq_k;
  for (int key0 = 0; key0 < key_end; key0 += kTile) {
    __syncthreads();  // the previous tile is done with
    for (int idx = threadIdx.x; idx < kTile * s.dim; idx += blockDim.x) {
      const int j = idx / s.dim, c = idx % s.dim, key = key0 + j;
      ks[j * (s.dim + 1) + c] = key < s.seq_k ? to_float(kb[key * kh.ss + c]) : 0.0f;
      vs[j * s.dim + c] = key < s.seq_k ? to_float(vb[key * vh.ss + c]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int i = row0 + warp * kRowsPerWarp + r;
      if (i >= s.seq_q) continue;  // warp-uniform
      const float* qr = qs + (warp * kRowsPerWarp + r) * s.dim;
      float score = 0.0f;
      for (int c = 0; c < s.dim; ++c) score += qr[c] * ks[lane * (s.dim + 1) + c];
      if (!visible(s, mask, b, i, key0 + lane)) score = -INFINITY;
      float tile_max = score;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o));
      const float m_new = fmaxf(m[r], tile_max);
      if (m_new == -INFINITY) continue;  // nothing visible to this row yet
      const float p = __expf(score - m_new);
      const float correction = __expf(m[r] - m_new);
      l[r] = l[r] * correction + warp_sum(p);
      m[r] = m_new;
#pragma unroll
      for (int c = 0; c < kDimPerLane; ++c) acc[r][c] *= correction;
      for (int j = 0; j < kTile; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
        for (int c = 0; c < kDimPerLane; ++c)
          if (lane + 32 * c < s.dim) acc[r][c] += pj * vs[j * s.dim + lane + 32 * c];
      }
    }
  }
  T* ob = out + b * oh.sb + h * oh.sh;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = row0 + warp * kRowsPerWarp + r;
    if (i >= s.seq_q) continue;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
    for (int c = 0; c < kDimPerLane; ++c)
      if (lane + 32 * c < s.dim) ob[i * oh.ss + lane + 32 * c] = from_float<T>(acc[r][c] * inv);
    if (lane == 0) lse[bh * s.seq_q + i] = l[r] > 0.0f ? m[r] + logf(l[r]) : -INFINITY;
  }
}

// Di = rowsum(dO * O), one warp per query row.
template <typename T>
__global__ void attention_row_dot(const T* out, Head oh, const T* dout, Head dh, float* di, Shape s) {
  const std::int64_t row = std::int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= std::int64_t(s.batch) * s.heads * s.seq_q) return;
  const int i = int(row % s.seq_q), bh = int(row / s.seq_q), b = bh / s.heads, h = bh % s.heads;
  const T* o = out + b * oh.sb + h * oh.sh + i * oh.ss;
  const T* g = dout + b * dh.sb + h * dh.sh + i * dh.ss;
  float sum = 0.0f;
  for (int c = threadIdx.x % 32; c < s.dim; c += 32) sum += to_float(o[c]) * to_float(g[c]);
  sum = warp_sum(sum);
  if (threadIdx.x % 32 == 0) di[row] = sum;
}

// P_ij and dS_ij for query i and key j, from what both passes have at hand.
__device__ __forceinline__ void p_and_ds(float score, float lse_i, float dp, float di_i, bool seen, float& p,
                                         float& ds) {
  p = (seen && lse_i != -INFINITY) ? __expf(score - lse_i) : 0.0f;
  ds = p * (dp - di_i);
}

// dK, dV: one warp per 32 keys (lane j: key key0 + j), over every query row.
template <typename T>
__global__ void __launch_bounds__(32)
    attention_backward_keys(const T* q, Head qh, const T* k, Head kh, const T* v, Head vh, const T* dout, Head dh,
                            const float* lse, const float* di, const bool* mask, T* dk, Head dkh, T* dv, Head dvh,
                            Shape s) {
  extern __shared__ float smem[];
  const int stride = s.dim + 1;
  float* ks = smem;                 // [32][dim + 1]: this warp's keys
  float* vs = ks + kTile * stride;  // [32][dim + 1]
  float* dks = vs + kTile * stride; // [32][dim + 1]: accumulators, row j owned by lane j
  float* dvs = dks + kTile * stride;
  float* qrow = dvs + kTile * stride;  // [dim]: the current query (scaled)
  float* grow = qrow + s.dim;          // [dim]: its dO
  const auto [b, h, bh] = block_head(s);
  const int lane = threadIdx.x;
  const int key0 = blockIdx.x * kTile, j = key0 + lane;
  const T* kb = k + b * kh.sb + h * kh.sh;
  const T* vb = v + b * vh.sb + h * vh.sh;
  for (int idx = lane; idx < kTile * s.dim; idx += 32) {
    const int r = idx / s.dim, c = idx % s.dim, key = key0 + r;
    ks[r * stride + c] = key < s.seq_k ? to_float(kb[key * kh.ss + c]) : 0.0f;
    vs[r * stride + c] = key < s.seq_k ? to_float(vb[key * vh.ss + c]) : 0.0f;
    dks[r * stride + c] = 0.0f;
    dvs[r * stride + c] = 0.0f;
  }
  __syncwarp();
  const T* qb = q + b * qh.sb + h * qh.sh;
  const T* gb = dout + b * dh.sb + h * dh.sh;
  const int first_query = s.causal ? key0 : 0;  // earlier queries see none of these keys
  for (int i = first_query; i < s.seq_q; ++i) {
    for (int c = lane; c < s.dim; c += 32) {
      qrow[c] = to_float(qb[i * qh.ss + c]) * s.scale;
      grow[c] = to_float(gb[i * dh.ss + c]);
    }
    __syncwarp();
    float score = 0.0f, dp = 0.0f;
    for (int c = 0; c < s.dim; ++c) {
      score += qrow[c] * ks[lane * stride + c];
      dp += grow[c] * vs[lane * stride + c];
    }
    float p, ds;
    p_and_ds(score, lse[bh * s.seq_q + i], dp, di[bh * s.seq_q + i],
             visible(s, mask, b, i, j), p, ds);
    for (int c = 0; c < s.dim; ++c) {
      dvs[lane * stride + c] += p * grow[c];
      dks[lane * stride + c] += ds * qrow[c];  // qrow carries the scale: dK = scale * dS^T Q
    }
    __syncwarp();
  }
  T* dkb = dk + b * dkh.sb + h * dkh.sh;
  T* dvb = dv + b * dvh.sb + h * dvh.sh;
  for (int idx = lane; idx < kTile * s.dim; idx += 32) {
    const int r = idx / s.dim, c = idx % s.dim, key = key0 + r;
    if (key >= s.seq_k) continue;
    dkb[key * dkh.ss + c] = from_float<T>(dks[r * stride + c]);
    dvb[key * dvh.ss + c] = from_float<T>(dvs[r * stride + c]);
  }
}

// dQ: one warp per 32 queries (lane i: query row0 + i), over every key.
template <typename T>
__global__ void __launch_bounds__(32)
    attention_backward_queries(const T* q, Head qh, const T* k, Head kh, const T* v, Head vh, const T* dout,
                               Head dh, const float* lse, const float* di, const bool* mask, T* dq, Head dqh,
                               Shape s) {
  extern __shared__ float smem[];
  const int stride = s.dim + 1;
  float* qs = smem;                  // [32][dim + 1]
  float* gs = qs + kTile * stride;   // [32][dim + 1]
  float* dqs = gs + kTile * stride;  // [32][dim + 1]
  float* krow = dqs + kTile * stride;
  float* vrow = krow + s.dim;
  const auto [b, h, bh] = block_head(s);
  const int lane = threadIdx.x;
  const int row0 = blockIdx.x * kTile, i = row0 + lane;
  const T* qb = q + b * qh.sb + h * qh.sh;
  const T* gb = dout + b * dh.sb + h * dh.sh;
  for (int idx = lane; idx < kTile * s.dim; idx += 32) {
    const int r = idx / s.dim, c = idx % s.dim, row = row0 + r;
    qs[r * stride + c] = row < s.seq_q ? to_float(qb[row * qh.ss + c]) * s.scale : 0.0f;
    gs[r * stride + c] = row < s.seq_q ? to_float(gb[row * dh.ss + c]) : 0.0f;
    dqs[r * stride + c] = 0.0f;
  }
  __syncwarp();
  const float lse_i = i < s.seq_q ? lse[bh * s.seq_q + i] : -INFINITY;
  const float di_i = i < s.seq_q ? di[bh * s.seq_q + i] : 0.0f;
  const T* kb = k + b * kh.sb + h * kh.sh;
  const T* vb = v + b * vh.sb + h * vh.sh;
  const int last = min(row0 + kTile, s.seq_q) - 1;
  const int key_end = s.causal ? min(s.seq_k, last + 1) : s.seq_k;
  for (int j = 0; j < key_end; ++j) {
    for (int c = lane; c < s.dim; c += 32) {
      krow[c] = to_float(kb[j * kh.ss + c]);
      vrow[c] = to_float(vb[j * vh.ss + c]);
    }
    __syncwarp();
    float score = 0.0f, dp = 0.0f;
    for (int c = 0; c < s.dim; ++c) {
      score += qs[lane * stride + c] * krow[c];
      dp += gs[lane * stride + c] * vrow[c];
    }
    float p, ds;
    p_and_ds(score, lse_i, dp, di_i, i < s.seq_q && visible(s, mask, b, i, j), p, ds);
    for (int c = 0; c < s.dim; ++c) dqs[lane * stride + c] += ds * s.scale * krow[c];
    __syncwarp();
  }
  T* dqb = dq + b * dqh.sb + h * dqh.sh;
  for (int idx = lane; idx < kTile * s.dim; idx += 32) {
    const int r = idx / s.dim, c = idx % s.dim, row = row0 + r;
    if (row < s.seq_q) dqb[row * dqh.ss + c] = from_float<T>(dqs[r * stride + c]);
  }
}

Shape shape_of(const TensorView& q, const TensorView& k, const AttentionConfig& c) {
  if (q.shape[3] > kMaxDim)
    runtime_error("zerofuse.attention: the CUDA kernel takes head_dim up to ", kMaxDim, ", got ", q.shape[3]);
  return {int(q.shape[0]), int(q.shape[1]), int(q.shape[2]), int(k.shape[2]), int(q.shape[3]), c.scale, c.causal, 0, 0};
}

void allow_shared(const void* kernel, std::size_t bytes) {
  if (bytes > 48 * 1024)
    ZF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

}  // namespace

void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* mask,
                       const AttentionConfig& config, const TensorView& out, const TensorView& lse, Stream st) {
  DeviceGuard guard(q.device);
  const Shape s = shape_of(q, k, config);
  if (s.batch == 0 || s.heads == 0 || s.seq_q == 0) return;
  if (attention_forward_tensor_cores(q, k, v, mask, config, out, lse, st)) return;  // attention_mma.cu
  const bool* m = mask ? mask->data_as<const bool>() : nullptr;
  const std::size_t shared = sizeof(float) * (kTile * (s.dim + 1) + kTile * s.dim + kWarps * kRowsPerWarp * s.dim);
  const unsigned tiles = unsigned((s.seq_q + kWarps * kRowsPerWarp - 1) / (kWarps * kRowsPerWarp));
  dispatch_float(q.dtype, [&](auto tag) {
    using T = decltype(tag);
    allow_shared(reinterpret_cast<const void*>(attention_forward_kernel<T>), shared);
    for_each_head_block(s, tiles, [&](dim3 grid, const Shape& part) {
      attention_forward_kernel<T><<<grid, kWarps * 32, shared, stream_of(st)>>>(
          q.data_as<const T>(), head_of(q), k.data_as<const T>(), head_of(k), v.data_as<const T>(), head_of(v), m,
          out.data_as<T>(), head_of(out), lse.data_as<float>(), part);
      ZF_CUDA_CHECK_LAUNCH("attention_forward_kernel");
    });
  });
}

void attention_backward(const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& out, const TensorView& lse, const TensorView* mask,
                        const AttentionConfig& config, const TensorView& dq, const TensorView& dk,
                        const TensorView& dv, Stream st) {
  DeviceGuard guard(q.device);
  const Shape s = shape_of(q, k, config);
  const cudaStream_t stream = stream_of(st);
  const bool* m = mask ? mask->data_as<const bool>() : nullptr;
  const std::int64_t rows = std::int64_t(s.batch) * s.heads * s.seq_q;
  StreamBuffer di(std::max<std::int64_t>(1, rows) * sizeof(float), stream);
  dispatch_float(q.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (rows > 0) {
      attention_row_dot<T><<<unsigned((rows + 7) / 8), 256, 0, stream>>>(out.data_as<const T>(), head_of(out),
                                                                          dout.data_as<const T>(), head_of(dout),
                                                                          di.as<float>(), s);
      ZF_CUDA_CHECK_LAUNCH("attention_row_dot");
    }
    if (attention_backward_tensor_cores(dout, q, k, v, lse, di.as<float>(), mask, config, dq, dk, dv, st))
      return;  // attention_mma_backward.cu took it
    const std::size_t shared = sizeof(float) * (4 * kTile * (s.dim + 1) + 2 * s.dim);
    if (s.seq_k > 0 && s.batch * s.heads > 0) {
      allow_shared(reinterpret_cast<const void*>(attention_backward_keys<T>), shared);
      for_each_head_block(s, unsigned((s.seq_k + kTile - 1) / kTile), [&](dim3 grid, const Shape& part) {
        attention_backward_keys<T><<<grid, 32, shared, stream>>>(
            q.data_as<const T>(), head_of(q), k.data_as<const T>(), head_of(k), v.data_as<const T>(), head_of(v),
            dout.data_as<const T>(), head_of(dout), lse.data_as<const float>(), di.as<float>(), m, dk.data_as<T>(),
            head_of(dk), dv.data_as<T>(), head_of(dv), part);
        ZF_CUDA_CHECK_LAUNCH("attention_backward_keys");
      });
    }
    if (rows > 0) {
      const std::size_t qshared = sizeof(float) * (3 * kTile * (s.dim + 1) + 2 * s.dim);
      allow_shared(reinterpret_cast<const void*>(attention_backward_queries<T>), qshared);
      for_each_head_block(s, unsigned((s.seq_q + kTile - 1) / kTile), [&](dim3 grid, const Shape& part) {
        attention_backward_queries<T><<<grid, 32, qshared, stream>>>(
            q.data_as<const T>(), head_of(q), k.data_as<const T>(), head_of(k), v.data_as<const T>(), head_of(v),
            dout.data_as<const T>(), head_of(dout), lse.data_as<const float>(), di.as<float>(), m, dq.data_as<T>(),
            head_of(dq), part);
        ZF_CUDA_CHECK_LAUNCH("attention_backward_queries");
      });
    }
  });
}

}  // namespace zerofuse::cuda
