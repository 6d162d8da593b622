"""GPU benchmark of the fused loss and element-wise kernels against PyTorch in
the same run: cross-entropy on [16384, 50304] bf16 logits, the GPT-2 head +
loss (time and peak extra memory), bias + GELU on [16384, 3072] bf16, and
the scaled masked softmax on [8, 12, 1024, 1024] bf16 scores with a
[12, 1024, 1024] additive bias.

    python bench/fused_ops.py        # writes bench/results/<device>-fused_ops-<date>.json
"""
import argparse

import torch
import torch.nn.functional as F

from zerofuse.ops import bias_gelu, cross_entropy, linear_cross_entropy, masked_softmax

from .common import print_table, time_cuda, write_results


def entry(zf, pt, peer, err, **extra):
    return {"zerofuse_ms": round(zf, 4), "peer_ms": round(pt, 4), "peer": peer, "speedup": round(pt / zf, 3),
            "max_error": float(err), **extra}


def bench_cross_entropy(n, v, repeat):
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, v, (n,), device="cuda")
    err = abs(cross_entropy(logits, target).item() - F.cross_entropy(logits.float(), target).item())

    def ours():
        cross_entropy(logits, target).backward()

    def theirs():
        F.cross_entropy(logits.float(), target).backward()

    return entry(time_cuda(ours, repeat=repeat), time_cuda(theirs, repeat=repeat),
                 "F.cross_entropy(logits.float(), y) fwd+bwd", err, shape=[n, v])


def peak_extra(fn, baseline):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def bench_head(n, d, v, repeat):
    hidden = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, d, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    target = torch.randint(0, v, (n,), device="cuda")

    def ours():
        hidden.grad = weight.grad = None
        linear_cross_entropy(hidden, weight, target).backward()

    def theirs():
        hidden.grad = weight.grad = None
        F.cross_entropy((hidden @ weight.T).float(), target).backward()

    ours(), theirs()
    base = torch.cuda.memory_allocated()
    mem_ours, mem_theirs = peak_extra(ours, base), peak_extra(theirs, base)
    err = abs(linear_cross_entropy(hidden, weight, target).item() -
              F.cross_entropy((hidden @ weight.T).float(), target).item())
    return entry(time_cuda(ours, repeat=repeat), time_cuda(theirs, repeat=repeat),
                 "hidden @ W.T, float logits, F.cross_entropy, fwd+bwd", err, peak_extra_GiB=round(mem_ours / 2**30, 3),
                 peer_peak_extra_GiB=round(mem_theirs / 2**30, 3), memory_ratio=round(mem_ours / mem_theirs, 3))


def bench_bias_gelu(n, d, repeat):
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    err = (bias_gelu(x, b).float() - F.gelu(x + b, approximate="tanh").float()).abs().max().item()
    return entry(time_cuda(lambda: bias_gelu(x, b).backward(g), repeat=repeat),
                 time_cuda(lambda: F.gelu(x + b, approximate="tanh").backward(g), repeat=repeat),
                 "F.gelu(x + b, approximate='tanh') fwd+bwd", err, shape=[n, d])


def bench_masked_softmax(b, h, s, repeat):
    # The peer is what eager transformers code writes: softmax in float32, cast back.
    x = torch.randn(b, h, s, s, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(h, s, s, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(b, h, s, s, device="cuda", dtype=torch.bfloat16)
    peer = lambda: torch.softmax(x * 0.125 + bias, dim=-1, dtype=torch.float32).to(x.dtype)  # noqa: E731
    err = (masked_softmax(x, bias, scale=0.125).float() - peer().float()).abs().max().item()
    return entry(time_cuda(lambda: masked_softmax(x, bias, scale=0.125).backward(g), repeat=repeat),
                 time_cuda(lambda: peer().backward(g), repeat=repeat),
                 "torch.softmax(x * scale + bias, dtype=float32).to(bf16) fwd+bwd", err, shape=[b, h, s, s])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    n = 2048 if args.quick else 16384
    repeat = 5 if args.quick else 20
    results = {
        f"cross_entropy/{n}x50304/bf16/fwd+bwd": bench_cross_entropy(n, 50304, repeat),
        f"linear_cross_entropy/{n}x768x50304/bf16/fwd+bwd": bench_head(n, 768, 50304, repeat),
        f"bias_gelu/{n}x3072/bf16/fwd+bwd": bench_bias_gelu(n, 3072, repeat),
        f"masked_softmax/bias/{n // 2048}x12x1024x1024/bf16/fwd+bwd": bench_masked_softmax(n // 2048, 12, 1024, repeat),
    }
    print_table(results)
    if not args.no_write:
        print("wrote", write_results("fused_ops", "cuda", results, args.out))


if __name__ == "__main__":
    main()
