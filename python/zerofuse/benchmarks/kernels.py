"""GPU kernel benchmark: each zerofuse kernel against the PyTorch equivalent in
the same run, timed with CUDA events (warm-up, median of many runs, inputs
larger than L2), after checking both give the same result.

    python bench/kernels.py           # writes bench/results/<device>-kernels-<date>.json
"""
import argparse

import torch

import zerofuse
from zerofuse import _C

from .common import print_table, time_cuda, write_results


def gbps(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9


def record(zf_ms, peer_ms, peer, err, nbytes, copy_gbps, **extra):
    r = {"zerofuse_ms": round(zf_ms, 4), "peer_ms": round(peer_ms, 4), "peer": peer,
         "speedup": round(peer_ms / zf_ms, 3), "max_error": float(err)}
    if nbytes:
        r["zerofuse_GBps"] = round(gbps(nbytes, zf_ms), 1)
        r["peer_GBps"] = round(gbps(nbytes, peer_ms), 1)
        r["zerofuse_pct_of_copy"] = round(100 * gbps(nbytes, zf_ms) / copy_gbps, 1)
    r.update(extra)
    return r


def copy_bandwidth(n):
    x = torch.empty(n, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    ms = time_cuda(lambda: y.copy_(x))
    return gbps(2 * 4 * n, ms)


def bench_adam_flat(n, copy_gbps, repeat):
    """Adam on one flat fp32 buffer: 28 bytes per parameter (read p, g, m, v; write p, m, v)."""
    p = torch.randn(n, device="cuda")
    g = torch.randn(n, device="cuda")
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    tp, tg, tm, tv = p.clone(), g.clone(), m.clone(), v.clone()
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, adam_w_mode=True, bias_correction=True)
    steps = torch.tensor([1.0], device="cuda")

    def ours():
        _C.adam_step(p, g, m, v, step=1, **kw)

    def theirs():
        torch._fused_adamw_([tp], [tg], [tm], [tv], [], [steps], lr=1e-3, beta1=0.9, beta2=0.999,
                            weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)

    ours(), theirs()
    err = (p - tp).abs().max().item()
    zf, pt = time_cuda(ours, repeat=repeat), time_cuda(theirs, repeat=repeat)
    del p, g, m, v, tp, tg, tm, tv
    return record(zf, pt, "torch._fused_adamw_ (AdamW fused=True)", err, 28 * n, copy_gbps, params=n)


def bench_mixed_precision_step(n, copy_gbps, repeat):
    """bf16 params + fp32 master, bf16 grads: unscale, global-norm clip, AdamW, new bf16 params.
    zerofuse: grad_stats + step_control + one Adam pass. torch: the sequence a user writes."""
    master = torch.randn(n, device="cuda")
    params = master.to(torch.bfloat16)
    grad = (torch.randn(n, device="cuda") * 1024).to(torch.bfloat16)  # scaled by 1024
    m, v = torch.zeros_like(master), torch.zeros_like(master)
    stats = torch.zeros(2, device="cuda")
    state = torch.zeros(_C.STEP_STATE_SIZE, dtype=torch.float64, device="cuda")
    out = torch.zeros(_C.STEP_OUTPUT_SIZE, device="cuda")
    ctl = dict(dynamic_loss_scale=False, initial_scale_power=10, loss_scale_window=1000, hysteresis=2,
               consecutive_hysteresis=False, min_loss_scale=1.0, max_grad_norm=1.0)
    _C.step_control_init(state, static_scale=1024.0, **ctl)

    def ours():
        _C.grad_stats([grad], stats)
        _C.step_control(stats, state, out, **ctl)
        _C.adam_step(master, grad, m, v, params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                     adam_w_mode=True, bias_correction=True, step=1, grad_multiplier=out[0:1],
                     skip_if_nonzero=out[1:2], step_tensor=state[4:5])

    t_master = torch.nn.Parameter(master.clone())
    t_params = params.clone()
    opt = torch.optim.AdamW([t_master], lr=1e-3, weight_decay=0.01, fused=True)

    def theirs():
        t_master.grad = grad.float()
        t_master.grad.mul_(1.0 / 1024)  # unscale
        torch.nn.utils.clip_grad_norm_([t_master], 1.0)
        opt.step()
        t_params.copy_(t_master.detach())

    ours(), theirs()
    err = (params.float() - t_params.float()).abs().max().item()
    zf, pt = time_cuda(ours, repeat=repeat), time_cuda(theirs, repeat=repeat)
    # zerofuse's bytes: grads read twice (stats, update), master/m/v read+write, bf16 params written.
    return record(zf, pt, "unscale + clip_grad_norm_ + AdamW(fused) + copy to bf16", err, n * (2 * 2 + 24 + 2),
                  copy_gbps, params=n)


def gpt2_shapes():
    d, v, t = 768, 50304, 1024
    shapes = [(v, d), (t, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def bench_adam_list(copy_gbps, repeat):
    shapes = gpt2_shapes()
    ours = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    opt = zerofuse.optim.FusedAdam(ours, lr=1e-3, weight_decay=0.01)
    ref = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.01, fused=True)
    opt.step(), ref.step()
    err = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
    n = sum(p.numel() for p in ours)
    zf, pt = time_cuda(opt.step, repeat=repeat), time_cuda(ref.step, repeat=repeat)
    return record(zf, pt, "torch.optim.AdamW(fused=True)", err, 28 * n, copy_gbps, tensors=len(shapes), params=n)


def bench_layer_norm(rows, width, dtype, copy_gbps, repeat):
    x = torch.randn(rows, width, device="cuda", dtype=dtype)
    dy = torch.randn_like(x)
    ref = torch.nn.LayerNorm(width, device="cuda", dtype=dtype)
    mine = zerofuse.nn.LayerNorm(width, device="cuda", dtype=dtype)
    mine.load_state_dict(ref.state_dict())
    with torch.no_grad():
        err = (mine(x).float() - ref(x).float()).abs().max().item()
        fwd = record(time_cuda(lambda: mine(x), repeat=repeat), time_cuda(lambda: ref(x), repeat=repeat),
                     "torch.nn.LayerNorm", err, 2 * x.numel() * x.element_size(), copy_gbps, shape=[rows, width])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()

    def step(mod, inp):
        def run():
            inp.grad = None
            mod.zero_grad(set_to_none=True)
            mod(inp).backward(dy)
        return run

    both = record(time_cuda(step(mine, xa), repeat=repeat), time_cuda(step(ref, xb), repeat=repeat),
                  "torch.nn.LayerNorm", err, 5 * x.numel() * x.element_size(), copy_gbps, shape=[rows, width])
    return fwd, both


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py needs a CUDA device (bench/cpu_kernels.py is the CPU one)")
    big = 10**7 if args.quick else 10**9
    repeat = 10 if args.quick else 50
    copy_gbps = copy_bandwidth(big // 4 if args.quick else 250_000_000)
    results = {"copy/fp32": {"GBps": round(copy_gbps, 1)}}
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s")
    results[f"adam/flat_{big:.0e}/fp32"] = bench_adam_flat(big, copy_gbps, repeat)
    torch.cuda.empty_cache()
    n = big // 8
    results[f"mixed_step/flat_{n:.0e}/bf16"] = bench_mixed_precision_step(n, copy_gbps, repeat)
    torch.cuda.empty_cache()
    results["adam/gpt2_124M_148_tensors/fp32"] = bench_adam_list(copy_gbps, repeat)
    for rows, width, dtype in ((16384, 768, torch.bfloat16), (8192, 4096, torch.bfloat16),
                               (16384, 768, torch.float32)):
        fwd, both = bench_layer_norm(rows, width, dtype, copy_gbps, repeat)
        name = f"layernorm/{rows}x{width}/{str(dtype).replace('torch.', '')}"
        results[name + "/fwd"], results[name + "/fwd+bwd"] = fwd, both
    print_table({k: v for k, v in results.items() if "zerofuse_ms" in v})
    if not args.no_write:
        print("wrote", write_results("kernels", "cuda", results, args.out))


if __name__ == "__main__":
    main()
