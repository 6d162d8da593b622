"""CPU kernel benchmark: zerofuse against torch's CPU equivalents in the same run,
at the kernel benchmark's usual sizes and at the shapes `zerofuse train`'s
default CPU model runs (the `train/` cases).

    python bench/cpu_kernels.py            # writes bench/results/cpu-kernels-<date>.json
"""
import argparse

import torch
import torch.nn.functional as F

import zerofuse
from zerofuse.ops import (add_layer_norm, attention, attention_qkv_packed, bias_gelu, linear_cross_entropy,
                          masked_softmax)
from zerofuse.optim import FusedAdam

from .common import case, compare_cpu, print_table, write_results


def bench_adam(n, repeat):
    """FusedAdam vs torch.optim.AdamW(fused=True) on one flat fp32 tensor of n."""
    init = torch.randn(n)
    grad = torch.randn(n)
    ours, theirs = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    opt = FusedAdam([ours], lr=1e-3, weight_decay=0.01)
    ref = torch.optim.AdamW([theirs], lr=1e-3, weight_decay=0.01, fused=True)
    opt.step()
    ref.step()
    err = (ours.detach() - theirs.detach()).abs().max().item()
    return case(*compare_cpu(opt.step, ref.step, repeat=repeat), "torch.optim.AdamW(fused=True)", err, params=n)


def bench_adam_list(repeat):
    """The multi-tensor path: GPT-2 124M's 148 tensor shapes, scaled down 10x in width."""
    shapes = [(5030, 77), (102, 77)] + [(77,), (77,), (231, 77), (231,), (77, 77), (77,), (77,), (77,),
                                        (308, 77), (308,), (77, 308), (77,)] * 12 + [(77,), (77,)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    opt = FusedAdam(ours, lr=1e-3, weight_decay=0.01)
    ref = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.01, fused=True)
    opt.step()
    ref.step()
    err = max((a.detach() - b.detach()).abs().max().item() for a, b in zip(ours, theirs))
    return case(*compare_cpu(opt.step, ref.step, repeat=repeat), "torch.optim.AdamW(fused=True)", err,
                tensors=len(shapes), params=sum(p.numel() for p in ours))


def bench_layer_norm(rows, width, dtype, repeat):
    x = torch.randn(rows, width, dtype=dtype)
    dy = torch.randn(rows, width, dtype=dtype)
    ref_mod = torch.nn.LayerNorm(width, dtype=dtype)
    ours_mod = zerofuse.nn.LayerNorm(width, dtype=dtype)
    ours_mod.load_state_dict(ref_mod.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()

    def fwd_bwd(mod, inp):
        def run():
            inp.grad = None
            mod.zero_grad(set_to_none=True)
            mod(inp).backward(dy)
        return run

    y_ours, y_ref = ours_mod(x), ref_mod(x)
    err = (y_ours.double() - y_ref.double()).abs().max().item()
    with torch.no_grad():
        fwd = case(*compare_cpu(lambda: ours_mod(x), lambda: ref_mod(x), repeat=repeat), "torch.nn.LayerNorm", err,
                   shape=[rows, width])
    both = case(*compare_cpu(fwd_bwd(ours_mod, xa), fwd_bwd(ref_mod, xb), repeat=repeat), "torch.nn.LayerNorm", err,
                shape=[rows, width])
    return fwd, both


def bench_attention(b, h, s, d, repeat):
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    out = attention(q, k, v, causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    err = (out - ref).abs().max().item()
    ours = lambda: attention(q, k, v, causal=True)  # noqa: E731
    peer = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    return case(*compare_cpu(ours, peer, repeat=repeat), "F.scaled_dot_product_attention (CPU)", err,
                shape=[b, h, s, d])


def bench_masked_softmax(b, h, s, repeat):
    """Attention probabilities under a [heads, s, s] additive bias (a relative
    position bias), forward and backward, against softmax(x * scale + bias)."""
    x = torch.randn(b, h, s, s, requires_grad=True)
    bias = torch.randn(h, s, s)
    grad = torch.randn(b, h, s, s)
    err = (masked_softmax(x, bias, scale=0.125) - torch.softmax(x * 0.125 + bias, -1)).abs().max().item()
    ours = lambda: masked_softmax(x, bias, scale=0.125).backward(grad)  # noqa: E731
    peer = lambda: torch.softmax(x * 0.125 + bias, -1).backward(grad)  # noqa: E731
    return case(*compare_cpu(ours, peer, repeat=repeat), "torch.softmax(x * scale + bias, -1) fwd+bwd (CPU)", err,
                shape=[b, h, s, s])


def bench_attention_with_bias(b, h, s, d, repeat):
    """attention(attn_mask=bias): matmul, fused masked softmax, matmul."""
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    bias = torch.randn(h, s, s)
    err = (attention(q, k, v, attn_mask=bias) - F.scaled_dot_product_attention(q, k, v, attn_mask=bias)).abs().max()
    ours = lambda: attention(q, k, v, attn_mask=bias).sum().backward()  # noqa: E731
    peer = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias).sum().backward()  # noqa: E731
    return case(*compare_cpu(ours, peer, repeat=repeat), "F.scaled_dot_product_attention(attn_mask=bias) fwd+bwd (CPU)",
                err.item(), shape=[b, h, s, d])


# --- the shapes `zerofuse train`'s default CPU model runs (L4 C128 T128, batch 16, 4 heads, vocab 256):
# what a training step calls, forward and backward, against the torch modules the
# plain-torch baseline of bench/train_cpu.py uses.

def _fwd_bwd(fn, leaves, grad):
    def run():
        for t in leaves:
            t.grad = None
        fn().backward(grad)
    return run


def bench_train_attention(b, t, h, d, repeat):
    """Causal attention from a fused QKV output [B, T, 3C], as the model calls it."""
    qkv = torch.randn(b, t, 3 * h * d, requires_grad=True)

    def peer_fn():
        q, k, v = (x.transpose(1, 2) for x in qkv.view(b, t, 3, h, d).unbind(2))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, h * d)

    ours_fn = lambda: attention_qkv_packed(qkv, h, causal=True)  # noqa: E731
    err = (ours_fn() - peer_fn()).abs().max().item()
    grad = torch.randn(b, t, h * d)
    with torch.no_grad():
        fwd = case(*compare_cpu(ours_fn, peer_fn, repeat=repeat), "F.scaled_dot_product_attention (CPU)", err,
                   shape=[b, h, t, d])
    both = case(*compare_cpu(_fwd_bwd(ours_fn, [qkv], grad), _fwd_bwd(peer_fn, [qkv], grad), repeat=repeat),
                "F.scaled_dot_product_attention (CPU) fwd+bwd", err, shape=[b, h, t, d])
    return fwd, both


def bench_train_bias_gelu(rows, width, repeat):
    """The MLP's bias + GELU(tanh) after a bias-free Linear, against the bias
    added by torch's Linear and F.gelu (its backward sums the bias gradient)."""
    x = torch.randn(rows, width, requires_grad=True)
    bias = torch.randn(width, requires_grad=True)
    ours_fn = lambda: bias_gelu(x, bias, approximate="tanh")  # noqa: E731
    peer_fn = lambda: F.gelu(x + bias, approximate="tanh")  # noqa: E731
    err = (ours_fn() - peer_fn()).abs().max().item()
    grad = torch.randn(rows, width)
    with torch.no_grad():
        fwd = case(*compare_cpu(ours_fn, peer_fn, repeat=repeat), "F.gelu(x + bias, approximate='tanh')", err,
                   shape=[rows, width])
    both = case(*compare_cpu(_fwd_bwd(ours_fn, [x, bias], grad), _fwd_bwd(peer_fn, [x, bias], grad), repeat=repeat),
                "F.gelu(x + bias, approximate='tanh') fwd+bwd", err, shape=[rows, width])
    return fwd, both


def bench_train_add_layer_norm(rows, width, repeat):
    """The block's residual add and second LayerNorm in one op, against x + y
    then nn.LayerNorm; both outputs (the normalised rows and the residual
    stream) get dense gradients, as in a block."""
    x, y = (torch.randn(rows, width, requires_grad=True) for _ in range(2))
    norm = torch.nn.LayerNorm(width)
    grads = [torch.randn(rows, width), torch.randn(rows, width)]

    def ours_fn():
        return add_layer_norm(x, y, (width,), norm.weight, norm.bias, norm.eps)

    def peer_fn():
        s = x + y
        return norm(s), s

    err = max((a - b).abs().max().item() for a, b in zip(ours_fn(), peer_fn()))

    def backward_of(fn):
        def run():
            x.grad = y.grad = None
            norm.zero_grad(set_to_none=True)
            torch.autograd.backward(fn(), grads)
        return run

    return case(*compare_cpu(backward_of(ours_fn), backward_of(peer_fn), repeat=repeat),
                "x + y, nn.LayerNorm fwd+bwd", err, shape=[rows, width])


def bench_train_head_loss(rows, width, vocab, repeat):
    """The LM head and loss: zerofuse's linear_cross_entropy (no [rows, vocab]
    logits kept) against F.linear then F.cross_entropy."""
    x = torch.randn(rows, width, requires_grad=True)
    w = (torch.randn(vocab, width) * 0.02).requires_grad_()
    target = torch.randint(0, vocab, (rows,))
    ours_fn = lambda: linear_cross_entropy(x, w, target)  # noqa: E731
    peer_fn = lambda: F.cross_entropy(F.linear(x, w), target)  # noqa: E731
    err = abs(ours_fn().item() - peer_fn().item())
    return case(*compare_cpu(_fwd_bwd(ours_fn, [x, w], None), _fwd_bwd(peer_fn, [x, w], None), repeat=repeat),
                "F.linear + F.cross_entropy fwd+bwd", err, shape=[rows, width, vocab])


def train_shapes(results, repeat, scale=1):
    """The train/ cases; --quick (scale 10) shrinks the batch, and the names say the sizes run."""
    b, t, h, d, vocab = max(1, 16 // scale), 128, 4, 32, 256
    rows, width = b * t, h * d
    fwd, both = bench_train_attention(b, t, h, d, repeat)
    results[f"train/attention/causal/{b}x{h}x{t}x{d}/fp32/fwd"] = fwd
    results[f"train/attention/causal/{b}x{h}x{t}x{d}/fp32/fwd+bwd"] = both
    fwd, both = bench_train_bias_gelu(rows, 4 * width, repeat)
    results[f"train/bias_gelu/{rows}x{4 * width}/fp32/fwd"] = fwd
    results[f"train/bias_gelu/{rows}x{4 * width}/fp32/fwd+bwd"] = both
    results[f"train/add_layer_norm/{rows}x{width}/fp32/fwd+bwd"] = bench_train_add_layer_norm(rows, width, repeat)
    results[f"train/linear_cross_entropy/{rows}x{width}xV{vocab}/fp32/fwd+bwd"] = bench_train_head_loss(
        rows, width, vocab, repeat)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (a smoke run)")
    parser.add_argument("--out", default=None, help="results directory (default: bench/results in a checkout)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write a results file")
    args = parser.parse_args(argv)
    repeat = 2 if args.quick else 10
    scale = 10 if args.quick else 1

    results = {}
    with torch.no_grad():
        results["adam/flat_1e7/fp32"] = bench_adam(10_000_000 // scale, repeat)
        results["adam/gpt2_shapes_148_tensors/fp32"] = bench_adam_list(repeat)
    fwd, both = bench_layer_norm(16384 // scale, 768, torch.float32, repeat)
    results["layernorm/16384x768/fp32/fwd"] = fwd
    results["layernorm/16384x768/fp32/fwd+bwd"] = both
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        fwd, both = bench_layer_norm(16384 // scale, 768, dtype, repeat)
        results[f"layernorm/16384x768/{name}/fwd"] = fwd
        results[f"layernorm/16384x768/{name}/fwd+bwd"] = both
    with torch.no_grad():
        results["attention/causal/4x12x512x64/fp32/fwd"] = bench_attention(4 // min(scale, 4), 12, 512, 64, repeat)
    b = 4 // min(scale, 4)
    results["masked_softmax/bias/4x12x512x512/fp32/fwd+bwd"] = bench_masked_softmax(b, 12, 512, repeat)
    results["attention/bias/4x12x512x64/fp32/fwd+bwd"] = bench_attention_with_bias(b, 12, 512, 64, repeat)
    train_shapes(results, repeat, scale)
    print_table(results)
    if not args.no_write:
        print("wrote", write_results("kernels", "cpu", results, args.out))


if __name__ == "__main__":
    main()
