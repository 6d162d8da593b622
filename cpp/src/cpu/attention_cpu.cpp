// CPU softmax attention, flash-style: a block of queries meets the keys a
// block at a time with the softmax kept online (running max m, running sum l,
// rescaled output), so the [seq_q, seq_k] score matrix exists only one block
// at a time.
//
// Backward, with P = exp(S - lse) recomputed per block and Di = rowsum(dO * O):
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Di),  dQ = scale * dS K,  dK = scale * dS^T Q.
//
// Every product goes through block_gemm.h's register-blocked tiles; with
// causal masking they skip what lies past the diagonal (a query block's
// scores stop at its last query, dQ's sum stops at the row's query, dK's and
// dV's start at the key's first query), so a causal head costs about half a
// full one. Per-row work (masking, exp, the running softmax) runs over the
// row's visible keys only, in loops gcc vectorises.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/block_gemm.h"
#include "cpu/convert.h"
#include "cpu/fast_math.h"
#include "cpu/kernels.h"
#include "parallel.h"

namespace zerofuse::cpu::ZF_CPU_ISA {
namespace {

constexpr std::int64_t kBlockQ = 128;  // queries per task (forward) and per step (backward)
constexpr std::int64_t kBlockK = 256;  // keys per score block: a 128 x 256 float block is 128 KiB

struct Dims {
  std::int64_t batch, heads, seq_q, seq_k, head_dim;
  std::int64_t q_blocks() const { return (seq_q + kBlockQ - 1) / kBlockQ; }
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
    A* __restrict out = dst + r * d;
    for (std::int64_t j = 0; j < d; ++j) out[j] = to_float(src[j]);
  }
}

// Rows [row0, row0 + n) of head (b, h) as a matrix of A with row stride ld:
// the tensor's own memory when it already holds A (float32 and float64 need no
// copy), else converted into `buffer`.
template <typename A>
struct Rows {
  const A* data;
  std::int64_t ld;
};

template <typename T, typename A>
Rows<A> rows_as(const TensorView& t, std::int64_t b, std::int64_t h, std::int64_t row0, std::int64_t n,
                std::vector<A>& buffer) {
  if constexpr (std::is_same_v<T, A>) {
    return {t.data_as<const T>() + b * t.strides[0] + h * t.strides[1] + row0 * t.strides[2], t.strides[2]};
  } else {
    load_rows<T>(t, b, h, row0, n, buffer.data());
    return {buffer.data(), t.shape[3]};
  }
}

#if defined(__AVX2__)
// dst[j * ldd + r] = src[r * lds + j] for an 8 x 8 block, in registers: the
// scalar form is a load and a store per element, and this transpose runs
// once per key block of every query block.
inline void transpose_8x8(const float* src, std::int64_t lds, float* dst, std::int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// The same rows transposed: A [D][n] (row-major B operand of Q K^T and dO V^T).
template <typename T, typename A>
void load_rows_transposed(const TensorView& t, std::int64_t b, std::int64_t h, std::int64_t row0,
                          std::int64_t n, A* __restrict dst) {
  const std::int64_t d = t.shape[3], stride = t.strides[2];
  const T* __restrict base = t.data_as<const T>() + b * t.strides[0] + h * t.strides[1] + row0 * stride;
  std::int64_t r0 = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    for (; r0 + 8 <= n; r0 += 8) {
      std::int64_t j0 = 0;
      for (; j0 + 8 <= d; j0 += 8) transpose_8x8(base + r0 * stride + j0, stride, dst + j0 * n + r0, n);
      for (std::int64_t j = j0; j < d; ++j)
        for (std::int64_t r = r0; r < r0 + 8; ++r) dst[j * n + r] = base[r * stride + j];
    }
  }
#endif
  for (std::int64_t r = r0; r < n; ++r)
    for (std::int64_t j = 0; j < d; ++j) dst[j * n + r] = to_float(base[r * stride + j]);
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

// visible rounded up to whole vectors, at most n.
std::int64_t padded_to_vectors(std::int64_t visible, std::int64_t n) {
  return std::min(n, (visible + kVectorFloats - 1) / kVectorFloats * kVectorFloats);
}

const std::uint8_t* mask_row(const TensorView* mask, std::int64_t b) {
  return mask ? mask->data_as<const std::uint8_t>() + b * mask->shape[1] : nullptr;
}

// How a block of nq queries starting at q0 sees a block of nk keys starting at k0.
struct BlockView {
  std::int64_t q0, nq, k0, nk;
  bool causal;
  const std::uint8_t* key_mask;  // the batch's [seq_k] row, or null

  // Keys [0, visible(i)) of the block are not past query i's diagonal.
  std::int64_t visible(std::int64_t i) const {
    return causal ? std::clamp<std::int64_t>(q0 + i - k0 + 1, 0, nk) : nk;
  }
  // Gemm limits for products over this block (rows = queries, or rows = keys).
  Limit query_rows_limit(bool over_keys) const {
    return causal ? (over_keys ? Limit::SharedUpTo : Limit::ColumnsUpTo) : Limit::None;
  }
  Limit key_rows_limit() const { return causal ? Limit::SharedFrom : Limit::None; }
  std::int64_t query_diag() const { return q0 - k0; }
  std::int64_t key_diag() const { return k0 - q0; }
};

// s[i][j] = scale * q[i] . k[j] over the keys each query can see (the rest of
// the row is left for the caller). q: [nq][d], kt: [d][nk].
template <typename A>
void block_scores(const BlockView& bv, Rows<A> q, const A* kt, std::int64_t d, A scale, A* s) {
  gemm(Gemm<A>{bv.nq, bv.nk, d, q.data, q.ld, 1, kt, bv.nk, s, bv.nk, scale, false, bv.query_rows_limit(false),
               bv.query_diag()});
}

// Sets the keys key_padding_mask hides among row i's first `visible` entries to -inf.
template <typename A>
void hide_masked_keys(const BlockView& bv, std::int64_t visible, A* __restrict si) {
  if (!bv.key_mask) return;
  const std::uint8_t* __restrict keep = bv.key_mask + bv.k0;
  constexpr A neg_inf = -std::numeric_limits<A>::infinity();
#pragma omp simd
  for (std::int64_t j = 0; j < visible; ++j) si[j] = keep[j] ? si[j] : neg_inf;
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

  // One task per (batch, head, query block): it owns those output rows.
  detail::parallel_for(tasks, 1, [&](std::int64_t t0, std::int64_t t1, int) {
    std::vector<A> qf(kBlockQ * d), kt(d * kBlockK), vf(kBlockK * d), s(kBlockQ * kBlockK), acc(kBlockQ * d),
        m(kBlockQ), l(kBlockQ);
    for (std::int64_t task = t0; task < t1; ++task) {
      const std::int64_t qb = task % dm.q_blocks(), bh = task / dm.q_blocks();
      const std::int64_t b = bh / dm.heads, h = bh % dm.heads;
      const std::int64_t q0 = qb * kBlockQ, nq = std::min(kBlockQ, dm.seq_q - q0);
      const Rows<A> qr = rows_as<T>(q, b, h, q0, nq, qf);
      std::fill(acc.begin(), acc.end(), A(0));
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), A(0));

      // With causal masking no query of the block sees past its last query.
      const std::int64_t k_end = cfg.causal ? std::min(dm.seq_k, q0 + nq) : dm.seq_k;
      for (std::int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
        const BlockView bv{q0, nq, k0, std::min(kBlockK, k_end - k0), cfg.causal, mask_row(mask, b)};
        const std::int64_t nk = bv.nk;
        load_rows_transposed<T>(k, b, h, k0, nk, kt.data());
        const Rows<A> vr = rows_as<T>(v, b, h, k0, nk, vf);
        block_scores(bv, qr, kt.data(), d, A(cfg.scale), s.data());
        for (std::int64_t i = 0; i < nq; ++i) {
          A* __restrict si = s.data() + i * nk;
          const std::int64_t visible = bv.visible(i);
          hide_masked_keys(bv, visible, si);
          // Whole vectors: the keys past the diagonal up to the next vector
          // boundary are -inf (exp gives 0) instead of a scalar remainder loop.
          const std::int64_t padded = padded_to_vectors(visible, nk);
          std::fill(si + visible, si + padded, neg_inf);
          const A m_new = std::max(m[i], max_of(si, padded));
          if (m_new == neg_inf) {  // nothing visible to this query yet: it adds nothing
            std::fill(si, si + nk, A(0));
            continue;
          }
          A row_sum = 0;
#pragma omp simd reduction(+ : row_sum)
          for (std::int64_t j = 0; j < padded; ++j) {
            si[j] = exp_approx(si[j] - m_new);
            row_sum += si[j];
          }
          std::fill(si + padded, si + nk, A(0));  // P V below reads whole rows
          if (m[i] != m_new) {  // rescale what earlier key blocks added (0 when m[i] was -inf)
            const A correction = std::exp(m[i] - m_new);
            l[i] *= correction;
            A* __restrict ai = acc.data() + i * d;
            for (std::int64_t c = 0; c < d; ++c) ai[c] *= correction;
          }
          l[i] += row_sum;
          m[i] = m_new;
        }
        // acc += P V: row i sums keys up to its diagonal only.
        gemm(Gemm<A>{nq, d, nk, s.data(), nk, 1, vr.data, vr.ld, acc.data(), d, A(1), true,
                     bv.query_rows_limit(true), bv.query_diag()});
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

// One head's backward. Queries go a block at a time; each query block meets
// the keys a block at a time. The head's dK and dV stay in float buffers until
// every query block has added to them.
template <typename T>
struct HeadBackward {
  using A = compute_t<T>;
  const Dims& dm;
  const AttentionConfig& cfg;
  std::int64_t d;
  std::vector<A> qf, gf, of, kt, vt, kf, p, ds, dq_acc, dk_acc, dv_acc, di;
  Rows<A> qr{}, gr{};  // this query block's Q and dO

  HeadBackward(const Dims& dims, const AttentionConfig& config)
      : dm(dims), cfg(config), d(dims.head_dim), qf(kBlockQ * d), gf(kBlockQ * d), of(kBlockQ * d),
        kt(d * kBlockK), vt(d * kBlockK), kf(kBlockK * d), p(kBlockQ * kBlockK), ds(kBlockQ * kBlockK),
        dq_acc(kBlockQ * d), dk_acc(dims.seq_k * d), dv_acc(dims.seq_k * d), di(kBlockQ) {}

  void run(const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v,
           const TensorView& out, const A* head_lse, const std::uint8_t* key_mask, std::int64_t b, std::int64_t h,
           const TensorView& dq, const TensorView& dk, const TensorView& dv) {
    std::fill(dk_acc.begin(), dk_acc.end(), A(0));
    std::fill(dv_acc.begin(), dv_acc.end(), A(0));
    for (std::int64_t q0 = 0; q0 < dm.seq_q; q0 += kBlockQ) {
      const std::int64_t nq = std::min(kBlockQ, dm.seq_q - q0);
      qr = rows_as<T>(q, b, h, q0, nq, qf);
      gr = rows_as<T>(dout, b, h, q0, nq, gf);
      const Rows<A> outr = rows_as<T>(out, b, h, q0, nq, of);
      for (std::int64_t i = 0; i < nq; ++i) {  // Di = rowsum(dO * O)
        const A* __restrict oi = outr.data + i * outr.ld;
        const A* __restrict gi = gr.data + i * gr.ld;
        A sum = 0;
#pragma omp simd reduction(+ : sum)
        for (std::int64_t c = 0; c < d; ++c) sum += oi[c] * gi[c];
        di[i] = sum;
      }
      std::fill(dq_acc.begin(), dq_acc.end(), A(0));
      const std::int64_t k_end = cfg.causal ? std::min(dm.seq_k, q0 + nq) : dm.seq_k;
      for (std::int64_t k0 = 0; k0 < k_end; k0 += kBlockK) {
        const BlockView bv{q0, nq, k0, std::min(kBlockK, k_end - k0), cfg.causal, key_mask};
        key_block(bv, k, v, head_lse + q0, b, h);
      }
      store_rows<T>(dq, b, h, q0, nq, dq_acc.data());
    }
    store_rows<T>(dk, b, h, 0, dm.seq_k, dk_acc.data());
    store_rows<T>(dv, b, h, 0, dm.seq_k, dv_acc.data());
  }

  void key_block(const BlockView& bv, const TensorView& k, const TensorView& v, const A* lse, std::int64_t b,
                 std::int64_t h) {
    const std::int64_t nq = bv.nq, nk = bv.nk;
    const A scale = A(cfg.scale);
    load_rows_transposed<T>(k, b, h, bv.k0, nk, kt.data());
    load_rows_transposed<T>(v, b, h, bv.k0, nk, vt.data());
    const Rows<A> kr = rows_as<T>(k, b, h, bv.k0, nk, kf);
    block_scores(bv, qr, kt.data(), d, scale, p.data());
    // dP = dO V^T, over the same visible keys.
    gemm(Gemm<A>{nq, nk, d, gr.data, gr.ld, 1, vt.data(), nk, ds.data(), nk, A(1), false, bv.query_rows_limit(false),
                 bv.query_diag()});
    for (std::int64_t i = 0; i < nq; ++i) {
      A* __restrict pi = p.data() + i * nk;
      A* __restrict dsi = ds.data() + i * nk;
      // A row that sees no key at all has no gradient.
      const std::int64_t visible = lse[i] == -std::numeric_limits<A>::infinity() ? 0 : bv.visible(i);
      hide_masked_keys(bv, visible, pi);
      const std::int64_t padded = padded_to_vectors(visible, nk);  // as in the forward
      std::fill(pi + visible, pi + padded, -std::numeric_limits<A>::infinity());
      const A row_lse = lse[i], row_di = di[i];
#pragma omp simd
      for (std::int64_t j = 0; j < padded; ++j) {
        const A pj = exp_approx(pi[j] - row_lse);
        pi[j] = pj;
        dsi[j] = j < visible ? pj * (dsi[j] - row_di) : A(0);  // dP may not be computed past visible
      }
      // The products below read whole rows (and columns): zeros past the diagonal.
      std::fill(pi + padded, pi + nk, A(0));
      std::fill(dsi + padded, dsi + nk, A(0));
    }
    A* dk_block = dk_acc.data() + bv.k0 * d;
    A* dv_block = dv_acc.data() + bv.k0 * d;
    // dV += P^T dO and dK += scale dS^T Q: key j sums queries from its diagonal on.
    gemm(Gemm<A>{nk, d, nq, p.data(), 1, nk, gr.data, gr.ld, dv_block, d, A(1), true, bv.key_rows_limit(),
                 bv.key_diag()});
    gemm(Gemm<A>{nk, d, nq, ds.data(), 1, nk, qr.data, qr.ld, dk_block, d, scale, true, bv.key_rows_limit(),
                 bv.key_diag()});
    // dQ += scale dS K: query i sums keys up to its diagonal.
    gemm(Gemm<A>{nq, d, nk, ds.data(), nk, 1, kr.data, kr.ld, dq_acc.data(), d, scale, true,
                 bv.query_rows_limit(true), bv.query_diag()});
  }
};

template <typename T>
void backward_typed(const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v,
                    const TensorView& out, const TensorView& lse, const TensorView* mask,
                    const AttentionConfig& cfg, const TensorView& dq, const TensorView& dk,
                    const TensorView& dv) {
  using A = compute_t<T>;
  const Dims dm = dims_of(q, k);
  const A* lse_all = lse.data_as<const A>();
  // One task per (batch, head): it owns that head's dQ, dK and dV outright, so
  // each score block is recomputed once and nothing is shared between threads.
  detail::parallel_for(dm.batch * dm.heads, 1, [&](std::int64_t t0, std::int64_t t1, int) {
    HeadBackward<T> head(dm, cfg);
    for (std::int64_t bh = t0; bh < t1; ++bh) {
      const std::int64_t b = bh / dm.heads, h = bh % dm.heads;
      head.run(dout, q, k, v, out, lse_all + bh * dm.seq_q, mask_row(mask, b), b, h, dq, dk, dv);
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
