// CPU softmax attention, flash-style: blocks of queries meet blocks of keys,
// the softmax is kept online (running max m, running sum l, rescaled output),
// and the [seq_q, seq_k] score matrix exists only one block at a time.
//
// Backward, with P = exp(S - lse) recomputed per block and Di = rowsum(dO * O):
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Di),  dQ = scale * dS K,  dK = scale * dS^T Q.
// Threads take whole (batch, head) pairs, so every output has one owner and
// each score block is computed once.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/block_gemm.h"
#include "cpu/convert.h"
#include "cpu/fast_math.h"
#include "cpu/kernels.h"
#include "parallel.h"

namespace zerofuse::cpu::ZF_CPU_ISA {
namespace {

constexpr std::int64_t kBlockQ = 64;
constexpr std::int64_t kBlockK = 64;

// The shapes shared by every loop.
struct Dims {
  std::int64_t batch, heads, seq_q, seq_k, head_dim;
  std::int64_t q_blocks() const { return (seq_q + kBlockQ - 1) / kBlockQ; }
  std::int64_t k_blocks() const { return (seq_k + kBlockK - 1) / kBlockK; }
};

Dims dims_of(const TensorView& q, const TensorView& k) {
  return {q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3]};
}

// Rows [row0, row0 + n) of head (b, h) of a [B, H, S, D] view, as A [n][D].
template <typename T, typename A>
void load_rows(const TensorView& t, std::int64_t b, std::int64_t h, std::int64_t row0, std::int64_t n,
               A* __restrict dst) {
  const std::int64_t d = t.shape[3];
  const T* base = t.data_as<const T>() + b * t.strides[0] + h * t.strides[1];
  for (std::int64_t r = 0; r < n; ++r) {
    const T* __restrict src = base + (row0 + r) * t.strides[2];
    for (std::int64_t j = 0; j < d; ++j) dst[r * d + j] = to_float(src[j]);
  }
}

// The same rows transposed: A [D][n] (so score loops run along keys).
template <typename T, typename A>
void load_rows_transposed(const TensorView& t, std::int64_t b, std::int64_t h, std::int64_t row0,
                          std::int64_t n, A* __restrict dst) {
  const std::int64_t d = t.shape[3];
  const T* base = t.data_as<const T>() + b * t.strides[0] + h * t.strides[1];
  for (std::int64_t r = 0; r < n; ++r) {
    const T* __restrict src = base + (row0 + r) * t.strides[2];
    for (std::int64_t j = 0; j < d; ++j) dst[j * n + r] = to_float(src[j]);
  }
}

template <typename T, typename A>
void store_rows(const TensorView& t, std::int64_t b, std::int64_t h, std::int64_t row0, std::int64_t n,
                const A* __restrict src) {
  const std::int64_t d = t.shape[3];
  T* base = t.data_as<T>() + b * t.strides[0] + h * t.strides[1];
  for (std::int64_t r = 0; r < n; ++r) {
    T* __restrict dst = base + (row0 + r) * t.strides[2];
    for (std::int64_t j = 0; j < d; ++j) dst[j] = store_as<T>(src[r * d + j]);
  }
}

// s[i][j] = scale * q[i] . k[j] for an nq x nk block, -inf where masked.
// q: [nq][d], kt: [d][nk].
template <typename A>
void block_scores(const A* __restrict q, const A* __restrict kt, std::int64_t nq, std::int64_t nk,
                  std::int64_t d, A scale, std::int64_t q0, std::int64_t k0, bool causal,
                  const std::uint8_t* key_mask, A* __restrict s) {
  for (std::int64_t i = 0; i < nq * nk; ++i) s[i] = A(0);
  gemm_acc(Gemm<A>{nq, nk, d, q, d, 1, kt, nk, s, nk, scale});
  const bool all_visible = !key_mask && (!causal || k0 + nk - 1 <= q0);
  if (all_visible) return;
  for (std::int64_t i = 0; i < nq; ++i) {
    A* __restrict si = s + i * nk;
    for (std::int64_t j = 0; j < nk; ++j) {
      const bool hidden = (causal && k0 + j > q0 + i) || (key_mask && !key_mask[k0 + j]);
      if (hidden) si[j] = -std::numeric_limits<A>::infinity();
    }
  }
}

// Keys a query block can see: with causal masking none past its last query.
std::int64_t visible_keys(const Dims& dm, bool causal, std::int64_t q_end) {
  return causal ? std::min(dm.seq_k, q_end) : dm.seq_k;
}

const std::uint8_t* mask_row(const TensorView* mask, std::int64_t b) {
  return mask ? mask->data_as<const std::uint8_t>() + b * mask->shape[1] : nullptr;
}

template <typename T>
void forward_typed(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* mask,
                   const AttentionConfig& cfg, const TensorView& out, const TensorView& lse) {
  using A = compute_t<T>;
  constexpr A neg_inf = -std::numeric_limits<A>::infinity();
  const Dims dm = dims_of(q, k);
  const std::int64_t d = dm.head_dim;
  const std::int64_t tasks = dm.batch * dm.heads * dm.q_blocks();
  A* lse_out = lse.data_as<A>();

  detail::parallel_for(tasks, 1, [&](std::int64_t t0, std::int64_t t1, int) {
    std::vector<A> qf(kBlockQ * d), kt(d * kBlockK), vf(kBlockK * d), s(kBlockQ * kBlockK), acc(kBlockQ * d),
        m(kBlockQ), l(kBlockQ);
    for (std::int64_t task = t0; task < t1; ++task) {
      const std::int64_t qb = task % dm.q_blocks(), bh = task / dm.q_blocks();
      const std::int64_t b = bh / dm.heads, h = bh % dm.heads;
      const std::int64_t q0 = qb * kBlockQ, nq = std::min(kBlockQ, dm.seq_q - q0);
      const std::uint8_t* key_mask = mask_row(mask, b);
      load_rows<T>(q, b, h, q0, nq, qf.data());
      std::fill(acc.begin(), acc.end(), A(0));
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), A(0));

      const std::int64_t k_end = visible_keys(dm, cfg.causal, q0 + nq);
      for (std::int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
        const std::int64_t nk = std::min(kBlockK, k_end - k0);
        load_rows_transposed<T>(k, b, h, k0, nk, kt.data());
        load_rows<T>(v, b, h, k0, nk, vf.data());
        block_scores(qf.data(), kt.data(), nq, nk, d, A(cfg.scale), q0, k0, cfg.causal, key_mask, s.data());
        for (std::int64_t i = 0; i < nq; ++i) {
          A* __restrict si = s.data() + i * nk;
          A block_max = neg_inf;
#pragma omp simd reduction(max : block_max)
          for (std::int64_t j = 0; j < nk; ++j) block_max = std::max(block_max, si[j]);
          const A m_new = std::max(m[i], block_max);
          if (m_new == neg_inf) {  // nothing visible to this query yet: it adds nothing
            for (std::int64_t j = 0; j < nk; ++j) si[j] = A(0);
            continue;
          }
          const A correction = std::exp(m[i] - m_new);  // 0 when m[i] was -inf
          A row_sum = 0;
#pragma omp simd reduction(+ : row_sum)
          for (std::int64_t j = 0; j < nk; ++j) {
            si[j] = exp_approx(si[j] - m_new);
            row_sum += si[j];
          }
          l[i] = l[i] * correction + row_sum;
          m[i] = m_new;
          A* __restrict ai = acc.data() + i * d;
          for (std::int64_t c = 0; c < d; ++c) ai[c] *= correction;
        }
        // acc += P V for the whole block at once.
        gemm_acc(Gemm<A>{nq, d, nk, s.data(), nk, 1, vf.data(), d, acc.data(), d});
      }
      for (std::int64_t i = 0; i < nq; ++i) {
        const A inv = l[i] > 0 ? A(1) / l[i] : A(0);
        for (std::int64_t c = 0; c < d; ++c) acc[i * d + c] *= inv;
        lse_out[(bh * dm.seq_q) + q0 + i] = l[i] > 0 ? m[i] + std::log(l[i]) : neg_inf;
      }
      store_rows<T>(out, b, h, q0, nq, acc.data());
    }
  });
}

// Everything one block pair of the backward needs, computed from scratch:
// p = exp(s - lse) and ds = p * (dO V^T - Di), both [nq][nk].
template <typename A>
struct BackwardBlock {
  std::vector<A> s, p, ds;
  BackwardBlock() : s(kBlockQ * kBlockK), p(kBlockQ * kBlockK), ds(kBlockQ * kBlockK) {}

  // q, dout: [nq][d]; kt, vt: [d][nk]. Fills p with P and ds with dS.
  void compute(const A* q, const A* dout, const A* kt, const A* vt, const A* lse, const A* di, std::int64_t nq,
               std::int64_t nk, std::int64_t d, A scale, std::int64_t q0, std::int64_t k0, bool causal,
               const std::uint8_t* key_mask) {
    block_scores(q, kt, nq, nk, d, scale, q0, k0, causal, key_mask, s.data());
    for (std::int64_t i = 0; i < nq * nk; ++i) ds[i] = A(0);
    gemm_acc(Gemm<A>{nq, nk, d, dout, d, 1, vt, nk, ds.data(), nk});  // dP = dO V^T
    for (std::int64_t i = 0; i < nq; ++i) {
      A* __restrict pi = p.data() + i * nk;
      A* __restrict dsi = ds.data() + i * nk;
      const A* __restrict si = s.data() + i * nk;
      if (lse[i] == -std::numeric_limits<A>::infinity()) {  // the row sees no key: no gradient
        for (std::int64_t j = 0; j < nk; ++j) pi[j] = dsi[j] = A(0);
        continue;
      }
      const A row_lse = lse[i], row_di = di[i];
#pragma omp simd
      for (std::int64_t j = 0; j < nk; ++j) {
        pi[j] = exp_approx(si[j] - row_lse);
        dsi[j] = pi[j] * (dsi[j] - row_di);
      }
    }
  }
};

template <typename T>
void backward_typed(const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v,
                    const TensorView& out, const TensorView& lse, const TensorView* mask,
                    const AttentionConfig& cfg, const TensorView& dq, const TensorView& dk,
                    const TensorView& dv) {
  using A = compute_t<T>;
  const Dims dm = dims_of(q, k);
  const std::int64_t d = dm.head_dim, heads = dm.batch * dm.heads;
  const A* lse_all = lse.data_as<const A>();
  const A scale = A(cfg.scale);

  // One task per (batch, head): it owns that head's dQ, dK and dV outright, so
  // each score block is recomputed once and nothing is shared between threads.
  detail::parallel_for(heads, 1, [&](std::int64_t t0, std::int64_t t1, int) {
    std::vector<A> qf(kBlockQ * d), gf(kBlockQ * d), kt(d * kBlockK), vt(d * kBlockK), kf(kBlockK * d),
        dk_acc(kBlockK * d), dv_acc(kBlockK * d), dq_acc(dm.seq_q * d), di(dm.seq_q);
    BackwardBlock<A> blk;
    for (std::int64_t bh = t0; bh < t1; ++bh) {
      const std::int64_t b = bh / dm.heads, h = bh % dm.heads;
      const std::uint8_t* key_mask = mask_row(mask, b);
      const A* head_lse = lse_all + bh * dm.seq_q;
      // Di = rowsum(dO * O), per query.
      for (std::int64_t q0 = 0; q0 < dm.seq_q; q0 += kBlockQ) {
        const std::int64_t nq = std::min(kBlockQ, dm.seq_q - q0);
        load_rows<T>(out, b, h, q0, nq, qf.data());
        load_rows<T>(dout, b, h, q0, nq, gf.data());
        for (std::int64_t i = 0; i < nq; ++i) {
          A sum = 0;
          for (std::int64_t c = 0; c < d; ++c) sum += qf[i * d + c] * gf[i * d + c];
          di[q0 + i] = sum;
        }
      }
      std::fill(dq_acc.begin(), dq_acc.end(), A(0));
      for (std::int64_t k0 = 0; k0 < dm.seq_k; k0 += kBlockK) {
        const std::int64_t nk = std::min(kBlockK, dm.seq_k - k0);
        load_rows_transposed<T>(k, b, h, k0, nk, kt.data());
        load_rows_transposed<T>(v, b, h, k0, nk, vt.data());
        load_rows<T>(k, b, h, k0, nk, kf.data());
        std::fill(dk_acc.begin(), dk_acc.end(), A(0));
        std::fill(dv_acc.begin(), dv_acc.end(), A(0));
        // With causal masking, queries before k0 see none of these keys.
        const std::int64_t q_start = cfg.causal ? (k0 / kBlockQ) * kBlockQ : 0;
        for (std::int64_t q0 = q_start; q0 < dm.seq_q; q0 += kBlockQ) {
          const std::int64_t nq = std::min(kBlockQ, dm.seq_q - q0);
          load_rows<T>(q, b, h, q0, nq, qf.data());
          load_rows<T>(dout, b, h, q0, nq, gf.data());
          blk.compute(qf.data(), gf.data(), kt.data(), vt.data(), head_lse + q0, di.data() + q0, nq, nk, d, scale,
                      q0, k0, cfg.causal, key_mask);
          // dV += P^T dO,  dK += scale dS^T Q,  dQ += scale dS K
          gemm_acc(Gemm<A>{nk, d, nq, blk.p.data(), 1, nk, gf.data(), d, dv_acc.data(), d});
          gemm_acc(Gemm<A>{nk, d, nq, blk.ds.data(), 1, nk, qf.data(), d, dk_acc.data(), d, scale});
          gemm_acc(Gemm<A>{nq, d, nk, blk.ds.data(), nk, 1, kf.data(), d, dq_acc.data() + q0 * d, d, scale});
        }
        store_rows<T>(dk, b, h, k0, nk, dk_acc.data());
        store_rows<T>(dv, b, h, k0, nk, dv_acc.data());
      }
      store_rows<T>(dq, b, h, 0, dm.seq_q, dq_acc.data());
    }
  });
}

}  // namespace

void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* mask,
                       const AttentionConfig& config, const TensorView& out, const TensorView& lse) {
  dispatch_float_or_double(q.dtype, [&](auto t) { forward_typed<decltype(t)>(q, k, v, mask, config, out, lse); });
}

void attention_backward(const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& out, const TensorView& lse, const TensorView* mask,
                        const AttentionConfig& config, const TensorView& dq, const TensorView& dk,
                        const TensorView& dv) {
  dispatch_float_or_double(q.dtype, [&](auto t) {
    backward_typed<decltype(t)>(dout, q, k, v, out, lse, mask, config, dq, dk, dv);
  });
}

}  // namespace zerofuse::cpu::ZF_CPU_ISA
