// CPU softmax attention, flash-style: blocks of queries meet blocks of keys,
// the softmax is kept online (running max m, running sum l, rescaled output),
// and the [seq_q, seq_k] score matrix exists only one block at a time.
//
// Backward, with P = exp(S - lse) recomputed per block and Di = rowsum(dO * O):
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Di),  dQ = scale * dS K,  dK = scale * dS^T Q.
// It runs as two passes so that every output block has one owner and no thread
// ever adds into memory another thread writes: pass 1 walks key blocks and
// produces dK, dV; pass 2 walks query blocks and produces dQ.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/convert.h"
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
  for (std::int64_t i = 0; i < nq; ++i) {
    A* __restrict si = s + i * nk;
    for (std::int64_t j = 0; j < nk; ++j) si[j] = A(0);
    for (std::int64_t c = 0; c < d; ++c) {
      const A qc = q[i * d + c];
      const A* __restrict kc = kt + c * nk;
      for (std::int64_t j = 0; j < nk; ++j) si[j] += qc * kc[j];
    }
    for (std::int64_t j = 0; j < nk; ++j) {
      const bool hidden = (causal && k0 + j > q0 + i) || (key_mask && !key_mask[k0 + j]);
      si[j] = hidden ? -std::numeric_limits<A>::infinity() : si[j] * scale;
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
          for (std::int64_t j = 0; j < nk; ++j) block_max = std::max(block_max, si[j]);
          const A m_new = std::max(m[i], block_max);
          if (m_new == neg_inf) continue;  // nothing visible to this query yet
          const A correction = std::exp(m[i] - m_new);  // 0 when m[i] was -inf
          A row_sum = 0;
          for (std::int64_t j = 0; j < nk; ++j) {
            si[j] = std::exp(si[j] - m_new);
            row_sum += si[j];
          }
          l[i] = l[i] * correction + row_sum;
          m[i] = m_new;
          A* __restrict ai = acc.data() + i * d;
          for (std::int64_t c = 0; c < d; ++c) ai[c] *= correction;
          for (std::int64_t j = 0; j < nk; ++j) {
            const A p = si[j];
            const A* __restrict vj = vf.data() + j * d;
            for (std::int64_t c = 0; c < d; ++c) ai[c] += p * vj[c];
          }
        }
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
    for (std::int64_t i = 0; i < nq; ++i) {
      A* __restrict pi = p.data() + i * nk;
      A* __restrict dsi = ds.data() + i * nk;
      const A* __restrict si = s.data() + i * nk;
      const bool row_sees_nothing = lse[i] == -std::numeric_limits<A>::infinity();
      for (std::int64_t j = 0; j < nk; ++j) pi[j] = row_sees_nothing ? A(0) : std::exp(si[j] - lse[i]);
      for (std::int64_t j = 0; j < nk; ++j) dsi[j] = A(0);
      for (std::int64_t c = 0; c < d; ++c) {  // dP = dO V^T
        const A g = dout[i * d + c];
        const A* __restrict vc = vt + c * nk;
        for (std::int64_t j = 0; j < nk; ++j) dsi[j] += g * vc[j];
      }
      for (std::int64_t j = 0; j < nk; ++j) dsi[j] = pi[j] * (dsi[j] - di[i]);
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

  // Di = rowsum(dO * O), per query.
  std::vector<A> di_all(std::size_t(heads * dm.seq_q));
  detail::parallel_for(heads * dm.q_blocks(), 1, [&](std::int64_t t0, std::int64_t t1, int) {
    std::vector<A> o(kBlockQ * d), g(kBlockQ * d);
    for (std::int64_t task = t0; task < t1; ++task) {
      const std::int64_t bh = task / dm.q_blocks(), q0 = (task % dm.q_blocks()) * kBlockQ;
      const std::int64_t nq = std::min(kBlockQ, dm.seq_q - q0);
      load_rows<T>(out, bh / dm.heads, bh % dm.heads, q0, nq, o.data());
      load_rows<T>(dout, bh / dm.heads, bh % dm.heads, q0, nq, g.data());
      for (std::int64_t i = 0; i < nq; ++i) {
        A sum = 0;
        for (std::int64_t c = 0; c < d; ++c) sum += o[i * d + c] * g[i * d + c];
        di_all[std::size_t(bh * dm.seq_q + q0 + i)] = sum;
      }
    }
  });

  // Pass 1: one task per key block produces its dK and dV.
  detail::parallel_for(heads * dm.k_blocks(), 1, [&](std::int64_t t0, std::int64_t t1, int) {
    std::vector<A> qf(kBlockQ * d), gf(kBlockQ * d), kt(d * kBlockK), vt(d * kBlockK), dk_acc(kBlockK * d),
        dv_acc(kBlockK * d);
    BackwardBlock<A> blk;
    for (std::int64_t task = t0; task < t1; ++task) {
      const std::int64_t bh = task / dm.k_blocks(), b = bh / dm.heads, h = bh % dm.heads;
      const std::int64_t k0 = (task % dm.k_blocks()) * kBlockK, nk = std::min(kBlockK, dm.seq_k - k0);
      const std::uint8_t* key_mask = mask_row(mask, b);
      load_rows_transposed<T>(k, b, h, k0, nk, kt.data());
      load_rows_transposed<T>(v, b, h, k0, nk, vt.data());
      std::fill(dk_acc.begin(), dk_acc.end(), A(0));
      std::fill(dv_acc.begin(), dv_acc.end(), A(0));
      // With causal masking, queries before k0 see none of these keys.
      const std::int64_t q_start = cfg.causal ? (k0 / kBlockQ) * kBlockQ : 0;
      for (std::int64_t q0 = q_start; q0 < dm.seq_q; q0 += kBlockQ) {
        const std::int64_t nq = std::min(kBlockQ, dm.seq_q - q0);
        load_rows<T>(q, b, h, q0, nq, qf.data());
        load_rows<T>(dout, b, h, q0, nq, gf.data());
        blk.compute(qf.data(), gf.data(), kt.data(), vt.data(), lse_all + bh * dm.seq_q + q0,
                    di_all.data() + bh * dm.seq_q + q0, nq, nk, d, scale, q0, k0, cfg.causal, key_mask);
        for (std::int64_t i = 0; i < nq; ++i) {
          const A* __restrict gi = gf.data() + i * d;
          const A* __restrict qi = qf.data() + i * d;
          for (std::int64_t j = 0; j < nk; ++j) {
            const A p = blk.p[i * nk + j], ds = blk.ds[i * nk + j] * scale;
            A* __restrict dvj = dv_acc.data() + j * d;
            A* __restrict dkj = dk_acc.data() + j * d;
            for (std::int64_t c = 0; c < d; ++c) {
              dvj[c] += p * gi[c];
              dkj[c] += ds * qi[c];
            }
          }
        }
      }
      store_rows<T>(dk, b, h, k0, nk, dk_acc.data());
      store_rows<T>(dv, b, h, k0, nk, dv_acc.data());
    }
  });

  // Pass 2: one task per query block produces its dQ.
  detail::parallel_for(heads * dm.q_blocks(), 1, [&](std::int64_t t0, std::int64_t t1, int) {
    std::vector<A> qf(kBlockQ * d), gf(kBlockQ * d), kt(d * kBlockK), vt(d * kBlockK), kf(kBlockK * d),
        dq_acc(kBlockQ * d);
    BackwardBlock<A> blk;
    for (std::int64_t task = t0; task < t1; ++task) {
      const std::int64_t bh = task / dm.q_blocks(), b = bh / dm.heads, h = bh % dm.heads;
      const std::int64_t q0 = (task % dm.q_blocks()) * kBlockQ, nq = std::min(kBlockQ, dm.seq_q - q0);
      const std::uint8_t* key_mask = mask_row(mask, b);
      load_rows<T>(q, b, h, q0, nq, qf.data());
      load_rows<T>(dout, b, h, q0, nq, gf.data());
      std::fill(dq_acc.begin(), dq_acc.end(), A(0));
      const std::int64_t k_end = visible_keys(dm, cfg.causal, q0 + nq);
      for (std::int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
        const std::int64_t nk = std::min(kBlockK, k_end - k0);
        load_rows_transposed<T>(k, b, h, k0, nk, kt.data());
        load_rows_transposed<T>(v, b, h, k0, nk, vt.data());
        load_rows<T>(k, b, h, k0, nk, kf.data());
        blk.compute(qf.data(), gf.data(), kt.data(), vt.data(), lse_all + bh * dm.seq_q + q0,
                    di_all.data() + bh * dm.seq_q + q0, nq, nk, d, scale, q0, k0, cfg.causal, key_mask);
        for (std::int64_t i = 0; i < nq; ++i) {
          A* __restrict dqi = dq_acc.data() + i * d;
          for (std::int64_t j = 0; j < nk; ++j) {
            const A ds = blk.ds[i * nk + j] * scale;
            const A* __restrict kj = kf.data() + j * d;
            for (std::int64_t c = 0; c < d; ++c) dqi[c] += ds * kj[c];
          }
        }
      }
      store_rows<T>(dq, b, h, q0, nq, dq_acc.data());
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
