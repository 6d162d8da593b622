"""Attention on the GPU: zerofuse against torch's SDPA (flash backend) in the
same run, forward and forward+backward TFLOP/s (causal counted as half);
and the arbitrary-mask path (scores, fused masked softmax, probabilities x V)
against SDPA given the same additive bias, which picks its memory-efficient
kernel.

    python bench/attention.py        # writes bench/results/<device>-attention-<date>.json
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from zerofuse.ops import attention

from .common import print_table, time_cuda, write_results

SHAPES = [(8, 12, 1024, 64), (4, 16, 4096, 128), (2, 16, 8192, 128)]


def flops(b, h, s, d, causal, backward):
    f = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
    return f * (3.5 if backward else 1.0)  # backward = 2.5x forward


def bench(b, h, s, d, dtype, repeat):
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(b, h, s, d, device="cuda", dtype=dtype)

    def flash(*args, **kwargs):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(*args, **kwargs)

    with torch.no_grad():
        err = (attention(q, k, v, causal=True).float() - flash(q, k, v, is_causal=True).float()).abs().max().item()
        fwd = (time_cuda(lambda: attention(q, k, v, causal=True), repeat=repeat),
               time_cuda(lambda: flash(q, k, v, is_causal=True), repeat=repeat))
    both = (time_cuda(lambda: attention(q, k, v, causal=True).backward(g), repeat=repeat),
            time_cuda(lambda: flash(q, k, v, is_causal=True).backward(g), repeat=repeat))
    out = {}
    for name, (zf, pt), backward in (("fwd", fwd, False), ("fwd+bwd", both, True)):
        f = flops(b, h, s, d, True, backward)
        out[name] = {"zerofuse_ms": round(zf, 4), "peer_ms": round(pt, 4), "peer": "SDPA flash",
                     "speedup": round(pt / zf, 3), "max_error": err,
                     "zerofuse_TFLOPs": round(f / zf / 1e9, 1), "peer_TFLOPs": round(f / pt / 1e9, 1)}
    return out


def bench_bias(b, h, s, d, dtype, repeat):
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(h, s, s, device="cuda", dtype=dtype)
    g = torch.randn(b, h, s, d, device="cuda", dtype=dtype)
    with torch.no_grad():
        err = (attention(q, k, v, attn_mask=bias).float() -
               F.scaled_dot_product_attention(q, k, v, attn_mask=bias).float()).abs().max().item()
    zf = time_cuda(lambda: attention(q, k, v, attn_mask=bias).backward(g), repeat=repeat)
    pt = time_cuda(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias).backward(g), repeat=repeat)
    f = flops(b, h, s, d, False, True)
    return {"zerofuse_ms": round(zf, 4), "peer_ms": round(pt, 4), "peer": "F.scaled_dot_product_attention(attn_mask)",
            "speedup": round(pt / zf, 3), "zerofuse_TFLOPs": round(f / zf / 1e9, 1),
            "peer_TFLOPs": round(f / pt / 1e9, 1), "max_error": err}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    results = {}
    for b, h, s, d in SHAPES[:1] if args.quick else SHAPES:
        for name, r in bench(b, h, s, d, torch.bfloat16, 5 if args.quick else 20).items():
            results[f"attention/causal/B{b}_H{h}_S{s}_D{d}/bf16/{name}"] = r
    results["attention/bias/B8_H12_S1024_D64/bf16/fwd+bwd"] = bench_bias(8, 12, 1024, 64, torch.bfloat16,
                                                                     5 if args.quick else 20)
    print_table(results)
    for k, r in results.items():
        print(f"{k}: zerofuse {r['zerofuse_TFLOPs']} TFLOP/s, SDPA flash {r['peer_TFLOPs']} TFLOP/s")
    if not args.no_write:
        print("wrote", write_results("attention", "cuda", results, args.out))


if __name__ == "__main__":
    main()
