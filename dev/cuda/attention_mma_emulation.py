"""The tensor-core attention kernels' fragment logic, checked without a GPU.

A numpy emulation of one warp's mma.m16n8k16 and ldmatrix.x4.trans, written
from the PTX ISA's fragment layouts, runs hand ports of cuda/attention/mma.cuh's helpers
and of the index math of cuda/attention/attention_mma.cu (forward) and
cuda/attention/attention_mma_backward.cu (keys and queries kernels), in float64, against
the attention formulas: odd lengths, causal, key padding, both head dims.

It checks layouts and indexing (which fragment holds which element, tile
bounds, masks, the causal start), not rounding or speed; those need the GPU
tests. It is a port: a change to those kernels' indexing belongs here too.

    python dev/cuda/attention_mma_emulation.py      (about 10 s)
"""
import numpy as np

LANES = np.arange(32)
G, C = LANES // 4, LANES % 4

def mma(d, a, b0, b1):
    """d: [32,4] f64; a: [32,4,2]; b0,b1: [32,2]. Per PTX layouts."""
    A = np.zeros((16, 16)); B = np.zeros((16, 8)); Cm = np.zeros((16, 8))
    for l in range(32):
        g, c = l // 4, l % 4
        A[g, 2*c:2*c+2] = a[l, 0]; A[g+8, 2*c:2*c+2] = a[l, 1]
        A[g, 8+2*c:8+2*c+2] = a[l, 2]; A[g+8, 8+2*c:8+2*c+2] = a[l, 3]
        B[2*c:2*c+2, g] = b0[l]; B[8+2*c:8+2*c+2, g] = b1[l]
        Cm[g, 2*c:2*c+2] = d[l, 0:2]; Cm[g+8, 2*c:2*c+2] = d[l, 2:4]
    D = A @ B + Cm
    out = np.zeros_like(d)
    for l in range(32):
        g, c = l // 4, l % 4
        out[l, 0:2] = D[g, 2*c:2*c+2]; out[l, 2:4] = D[g+8, 2*c:2*c+2]
    d[:] = out

def load_pair(mem, off):  # off: [32] ints
    return np.stack([mem[off], mem[off + 1]], axis=-1)

def ldmatrix_x4_trans(mem, row_off):  # row_off[l]: flat offset of the 8-element row lane l points at
    mats = np.stack([np.stack([mem[row_off[8*i + r]: row_off[8*i + r] + 8] for r in range(8)]) for i in range(4)])  # [4,8,8]
    regs = np.zeros((32, 4, 2))
    for l in range(32):
        for i in range(4):
            regs[l, i, 0] = mats[i][2*(l % 4), l // 4]
            regs[l, i, 1] = mats[i][2*(l % 4) + 1, l // 4]
    return regs

def load_a(mem, tile, stride):  # tile: flat offset of the 16x16 block
    a = np.zeros((32, 4, 2))
    a[:, 0] = load_pair(mem, tile + G * stride + 2 * C)
    a[:, 1] = load_pair(mem, tile + (G + 8) * stride + 2 * C)
    a[:, 2] = load_pair(mem, tile + G * stride + 8 + 2 * C)
    a[:, 3] = load_pair(mem, tile + (G + 8) * stride + 8 + 2 * C)
    return a

def a_from_c(left, right):  # left/right [32,4]
    a = np.zeros((32, 4, 2))
    a[:, 0] = left[:, 0:2]; a[:, 1] = left[:, 2:4]; a[:, 2] = right[:, 0:2]; a[:, 3] = right[:, 2:4]
    return a

def accumulate_c_times_tile(acc, c_tiles, mem, tile, stride, K, D):  # acc [D/8][32,4]; c_tiles [K/8][32,4]
    matrix, matrix_row = LANES // 8, LANES % 8
    for kk in range(K // 16):
        a = a_from_c(c_tiles[2*kk], c_tiles[2*kk + 1])
        row = tile + (kk * 16 + (matrix & 1) * 8 + matrix_row) * stride + (matrix >> 1) * 8
        for nt2 in range(D // 16):
            bf = ldmatrix_x4_trans(mem, row + nt2 * 16)
            mma(acc[2*nt2], a, bf[:, 0], bf[:, 1])
            mma(acc[2*nt2 + 1], a, bf[:, 2], bf[:, 3])

def rows_times_rows_t(mem, a_rows, a_stride, b_rows, b_stride, N, D):
    ct = [np.zeros((32, 4)) for _ in range(N // 8)]
    for kk in range(D // 16):
        a = load_a(mem, a_rows + kk * 16, a_stride)
        for nt in range(N // 8):
            b = b_rows + (nt * 8 + G) * b_stride + kk * 16 + 2 * C
            mma(ct[nt], a, load_pair(mem, b), load_pair(mem, b + 8))
    return ct

def c_to_matrix(tiles):  # list over n-tiles of [32,4] -> [16, 8*len]
    M = np.zeros((16, 8 * len(tiles)))
    for nt, t in enumerate(tiles):
        for l in range(32):
            g, c = l // 4, l % 4
            M[g, nt*8 + 2*c: nt*8 + 2*c + 2] = t[l, 0:2]; M[g + 8, nt*8 + 2*c: nt*8 + 2*c + 2] = t[l, 2:4]
    return M

rng = np.random.default_rng(0)
# helper checks
for D, N in ((64, 32), (128, 64)):
    stride = D + 8
    mem = rng.standard_normal(4096 * 8)
    A_off, B_off = 100 * 8, 1000 * 8
    ct = rows_times_rows_t(mem, A_off, stride, B_off, stride, N, D)
    Am = np.stack([mem[A_off + r*stride: A_off + r*stride + D] for r in range(16)])
    Bm = np.stack([mem[B_off + r*stride: B_off + r*stride + D] for r in range(N)])
    assert np.allclose(c_to_matrix(ct), Am @ Bm.T), "rows_times_rows_t"
    acc = [np.zeros((32, 4)) for _ in range(D // 8)]
    T_off = 2000 * 8
    accumulate_c_times_tile(acc, ct, mem, T_off, stride, N, D)
    Tm = np.stack([mem[T_off + r*stride: T_off + r*stride + D] for r in range(N)])
    assert np.allclose(c_to_matrix(acc), (Am @ Bm.T) @ Tm), "accumulate_c_times_tile"
print("helpers ok")

LOG2E = 1.4426950408889634

def stage_rows(src, first, count, rows, D, stride):  # src: [S, D] head; returns flat smem with zero rows past end
    mem = np.zeros(count * stride + 64)
    for r in range(count):
        if first + r < rows:
            mem[r*stride: r*stride + D] = src[first + r]
    return mem

def concat(*mems):
    offs, total = [], 0
    for m in mems:
        offs.append(total); total += len(m)
    return np.concatenate(mems), offs

def backward_keys(q, k, v, do, lse, di, mask_b, causal, scale, D, kQ):
    """Emulates attention_backward_keys_mma for one (b, h); q,do [Sq,D], k,v [Sk,D]."""
    Sq, Sk = q.shape[0], k.shape[0]
    stride = D + 8
    dk = np.full((Sk, D), np.nan); dv = np.full((Sk, D), np.nan)
    scale_log2 = scale * LOG2E
    for key0 in range(0, Sk, 64):
        ks = stage_rows(k, key0, 64, Sk, D, stride); vs = stage_rows(v, key0, 64, Sk, D, stride)
        for warp in range(4):
            key_lo = key0 + warp * 16 + G
            key_ok = [(key_lo + 8*h < Sk) & np.array([mask_b is None or (key_lo[l] + 8*h < Sk and mask_b[key_lo[l] + 8*h]) for l in range(32)]) for h in range(2)]
            dk_acc = [np.zeros((32, 4)) for _ in range(D // 8)]; dv_acc = [np.zeros((32, 4)) for _ in range(D // 8)]
            q_begin = (key0 // kQ) * kQ if causal else 0
            for q0 in range(q_begin, Sq, kQ):
                qs = stage_rows(q, q0, kQ, Sq, D, stride); gs = stage_rows(do, q0, kQ, Sq, D, stride)
                lse2 = np.array([lse[q0 + r] * LOG2E if q0 + r < Sq else 0.0 for r in range(kQ)])
                dis = np.array([di[q0 + r] if q0 + r < Sq else 0.0 for r in range(kQ)])
                mem, (ok, ov, oq, og) = concat(ks, vs, qs, gs)
                my_k, my_v = ok + warp * 16 * stride, ov + warp * 16 * stride
                pt = rows_times_rows_t(mem, my_k, stride, oq, stride, kQ, D)
                for nt in range(kQ // 8):
                    for e in range(4):
                        col = nt * 8 + 2 * C + (e & 1); query = q0 + col; key = key_lo + 8 * (e >> 1)
                        seen = key_ok[e >> 1] & (query < Sq) & ((not causal) | (key <= query))
                        with np.errstate(over='ignore'):
                            pt[nt][:, e] = np.where(seen, np.exp2(pt[nt][:, e] * scale_log2 - lse2[np.minimum(col, kQ-1)]), 0.0)
                accumulate_c_times_tile(dv_acc, pt, mem, og, stride, kQ, D)
                dst = rows_times_rows_t(mem, my_v, stride, og, stride, kQ, D)
                for nt in range(kQ // 8):
                    for e in range(4):
                        dst[nt][:, e] = pt[nt][:, e] * (dst[nt][:, e] - dis[nt * 8 + 2 * C + (e & 1)])
                accumulate_c_times_tile(dk_acc, dst, mem, oq, stride, kQ, D)
            for half in range(2):
                for l in range(32):
                    key = key_lo[l] + 8 * half
                    if key >= Sk: continue
                    for j in range(D // 8):
                        dk[key, j*8 + 2*C[l]: j*8 + 2*C[l] + 2] = dk_acc[j][l, 2*half: 2*half+2] * scale
                        dv[key, j*8 + 2*C[l]: j*8 + 2*C[l] + 2] = dv_acc[j][l, 2*half: 2*half+2]
    return dk, dv

def backward_queries(q, k, v, do, lse, di, mask_b, causal, scale, D, kN):
    Sq, Sk = q.shape[0], k.shape[0]
    stride = D + 8
    dq = np.full((Sq, D), np.nan)
    scale_log2 = scale * LOG2E
    for row0 in range(0, Sq, 64):
        qs = stage_rows(q, row0, 64, Sq, D, stride); gs = stage_rows(do, row0, 64, Sq, D, stride)
        block_last_row = min(row0 + 64, Sq) - 1
        key_end = min(Sk, block_last_row + 1) if causal else Sk
        for warp in range(4):
            row_lo = row0 + warp * 16 + G
            lse2_row = [np.array([lse[r] * LOG2E if r < Sq else 0.0 for r in row_lo + 8*h]) for h in range(2)]
            di_row = [np.array([di[r] if r < Sq else 0.0 for r in row_lo + 8*h]) for h in range(2)]
            dq_acc = [np.zeros((32, 4)) for _ in range(D // 8)]
            for key0 in range(0, key_end, kN):
                ks = stage_rows(k, key0, kN, Sk, D, stride); vs = stage_rows(v, key0, kN, Sk, D, stride)
                mem, (oq, og, ok, ov) = concat(qs, gs, ks, vs)
                my_q, my_g = oq + warp * 16 * stride, og + warp * 16 * stride
                s = rows_times_rows_t(mem, my_q, stride, ok, stride, kN, D)
                for nt in range(kN // 8):
                    for e in range(4):
                        key = key0 + nt * 8 + 2 * C + (e & 1); row = row_lo + 8 * (e >> 1)
                        mk = np.array([mask_b is None or (key[l] < Sk and mask_b[key[l]]) for l in range(32)])
                        seen = (key < Sk) & (row < Sq) & ((not causal) | (key <= row)) & mk
                        with np.errstate(over='ignore'):
                            s[nt][:, e] = np.where(seen, np.exp2(s[nt][:, e] * scale_log2 - lse2_row[e >> 1]), 0.0)
                ds = rows_times_rows_t(mem, my_g, stride, ov, stride, kN, D)
                for nt in range(kN // 8):
                    for e in range(4):
                        ds[nt][:, e] = s[nt][:, e] * (ds[nt][:, e] - di_row[e >> 1])
                accumulate_c_times_tile(dq_acc, ds, mem, ok, stride, kN, D)
            for half in range(2):
                for l in range(32):
                    row = row_lo[l] + 8 * half
                    if row >= Sq: continue
                    for j in range(D // 8):
                        dq[row, j*8 + 2*C[l]: j*8 + 2*C[l] + 2] = dq_acc[j][l, 2*half: 2*half+2] * scale
    return dq

def reference(q, k, v, do, mask_b, causal, scale):
    Sq, Sk = q.shape[0], k.shape[0]
    s = q @ k.T * scale
    seen = np.ones((Sq, Sk), bool)
    if causal: seen &= np.arange(Sk)[None, :] <= np.arange(Sq)[:, None]
    if mask_b is not None: seen &= mask_b[None, :]
    s = np.where(seen, s, -np.inf)
    mx = s.max(1, keepdims=True)
    with np.errstate(invalid='ignore'):
        p = np.where(seen, np.exp(s - np.where(np.isfinite(mx), mx, 0)), 0.0)
    l = p.sum(1, keepdims=True)
    p = np.divide(p, l, out=np.zeros_like(p), where=l > 0)
    lse = np.where(l[:, 0] > 0, np.log(np.maximum(l[:, 0], 1e-300)) + np.where(np.isfinite(mx[:, 0]), mx[:, 0], 0), -np.inf)
    o = p @ v
    dv = p.T @ do
    dp = do @ v.T
    di = (do * o).sum(1)
    ds = p * (dp - di[:, None])
    dq = ds @ k * scale
    dk = ds.T @ q * scale
    return o, lse, di, dq, dk, dv

for (Sq, Sk, D, causal, masked) in [(70, 45, 64, False, True), (37, 130, 64, True, False), (65, 65, 128, True, True), (1, 3, 128, False, False), (130, 70, 128, False, True)]:
    q, k, v, do = (rng.standard_normal((n, D)) for n in (Sq, Sk, Sk, Sq))
    mask_b = (rng.random(Sk) > 0.3) if masked else None
    if masked: mask_b[0] = True
    scale = D ** -0.5
    o, lse, di, dq_ref, dk_ref, dv_ref = reference(q, k, v, do, mask_b, causal, scale)
    kS = 32 if D == 128 else 64
    dk, dv = backward_keys(q, k, v, do, lse, di, mask_b, causal, scale, D, kS)
    dq = backward_queries(q, k, v, do, lse, di, mask_b, causal, scale, D, kS)
    for name, got, want in (("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)):
        err = np.abs(got - want).max()
        assert err < 1e-9, (name, Sq, Sk, D, causal, masked, err)
    print("backward ok", Sq, Sk, D, causal, masked)

def forward(q, k, v, mask_b, causal, scale, D):
    Sq, Sk = q.shape[0], k.shape[0]
    stride = D + 8
    out = np.full((Sq, D), np.nan); lse_out = np.full(Sq, np.nan)
    scale_log2 = scale * LOG2E
    qmem = np.zeros((Sq + 64) * D)
    qmem[:Sq * D] = q.reshape(-1)
    for block_row0 in range(0, Sq, 64):
        block_last_row = min(block_row0 + 64, Sq) - 1
        key_end = min(Sk, block_last_row + 1) if causal else Sk
        for warp in range(4):
            row_lo = block_row0 + warp * 16 + G; row_hi = row_lo + 8
            qf = []
            for kk in range(D // 16):
                col = kk * 16 + 2 * C
                a = np.zeros((32, 4, 2))
                for l in range(32):
                    for reg, (row, cc) in enumerate(((row_lo[l], col[l]), (row_hi[l], col[l]), (row_lo[l], col[l] + 8), (row_hi[l], col[l] + 8))):
                        a[l, reg] = q[row, cc:cc+2] if row < Sq else 0.0
                qf.append(a)
            o = [np.zeros((32, 4)) for _ in range(D // 8)]
            row_max = [np.full(32, -np.inf), np.full(32, -np.inf)]
            row_sum = [np.zeros(32), np.zeros(32)]
            for key0 in range(0, key_end, 64):
                ks = stage_rows(k, key0, 64, Sk, D, stride); vs = stage_rows(v, key0, 64, Sk, D, stride)
                mem, (ok, ov) = concat(ks, vs)
                s = [np.zeros((32, 4)) for _ in range(8)]
                for nt in range(8):
                    krow = ok + (nt * 8 + G) * stride + 2 * C
                    for kk in range(D // 16):
                        mma(s[nt], qf[kk], load_pair(mem, krow + kk * 16), load_pair(mem, krow + kk * 16 + 8))
                for nt in range(8):
                    for e in range(4):
                        key = key0 + nt * 8 + 2 * C + (e & 1); row = row_lo if e < 2 else row_hi
                        mk = np.array([mask_b is None or (key[l] < Sk and mask_b[key[l]]) for l in range(32)])
                        seen = (key < Sk) & ((not causal) | (key <= row)) & mk
                        s[nt][:, e] = np.where(seen, s[nt][:, e] * scale_log2, -np.inf)
                for half in range(2):
                    tile_max = np.full(32, -np.inf)
                    for nt in range(8):
                        tile_max = np.maximum(tile_max, np.maximum(s[nt][:, 2*half], s[nt][:, 2*half+1]))
                    tile_max = np.maximum(tile_max, tile_max[LANES ^ 1]); tile_max = np.maximum(tile_max, tile_max[LANES ^ 2])
                    new_max = np.maximum(row_max[half], tile_max)
                    with np.errstate(invalid='ignore'):
                        alpha = np.where(new_max == -np.inf, 1.0, np.exp2(row_max[half] - new_max))
                    tile_sum = np.zeros(32)
                    for nt in range(8):
                        for e in (2*half, 2*half+1):
                            with np.errstate(invalid='ignore'):
                                s[nt][:, e] = np.where(new_max == -np.inf, 0.0, np.exp2(s[nt][:, e] - new_max))
                            tile_sum += s[nt][:, e]
                    row_sum[half] = row_sum[half] * alpha + tile_sum
                    row_max[half] = new_max
                    for j in range(D // 8):
                        o[j][:, 2*half] *= alpha; o[j][:, 2*half+1] *= alpha
                accumulate_c_times_tile(o, s, mem, ov, stride, 64, D)
            for half in range(2):
                total = row_sum[half].copy()
                total = total + total[LANES ^ 1]; total = total + total[LANES ^ 2]
                row = row_lo if half == 0 else row_hi
                for l in range(32):
                    if row[l] >= Sq: continue
                    inv = 1.0 / total[l] if total[l] > 0 else 0.0
                    for j in range(D // 8):
                        out[row[l], j*8 + 2*C[l]: j*8 + 2*C[l] + 2] = o[j][l, 2*half: 2*half+2] * inv
                    if C[l] == 0:
                        lse_out[row[l]] = (row_max[half][l] + np.log2(total[l])) * np.log(2) if total[l] > 0 else -np.inf
    return out, lse_out

for (Sq, Sk, D, causal, masked) in [(70, 45, 64, False, True), (37, 130, 64, True, False), (65, 65, 128, True, True), (1, 3, 128, False, False), (130, 70, 128, True, True)]:
    q, k, v, do = (rng.standard_normal((n, D)) for n in (Sq, Sk, Sk, Sq))
    mask_b = (rng.random(Sk) > 0.3) if masked else None
    scale = D ** -0.5
    o_ref, lse_ref, *_ = reference(q, k, v, do, mask_b, causal, scale)
    o, lse = forward(q, k, v, mask_b, causal, scale, D)
    assert np.abs(o - o_ref).max() < 1e-9, ("out", Sq, Sk, D, causal, masked)
    fin = np.isfinite(lse_ref)
    assert np.array_equal(fin, np.isfinite(lse)) and np.abs(lse[fin] - lse_ref[fin]).max() < 1e-9, ("lse", Sq, Sk, D)
    print("forward ok", Sq, Sk, D, causal, masked)
