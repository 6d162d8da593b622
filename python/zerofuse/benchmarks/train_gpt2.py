"""GPT-2 124M training step on one GPU: zerofuse's engine (bf16 parameters, fused
LayerNorm / attention / optimizer) against the same model in plain PyTorch
(fp32 parameters, bf16 autocast, SDPA, fused AdamW, gradient clipping), the
same under torch.compile, and the data-parallel peers at world size 1 (DDP +
ZeroRedundancyOptimizer, FSDP2, DeepSpeed ZeRO-1 when installed), in the same
run: tokens/s, model FLOP utilisation and peak memory.

    python bench/train_gpt2.py       # writes bench/results/<device>-train_gpt2-<date>.json
"""
import argparse
import contextlib
import io

import torch

import zerofuse
from zerofuse.models import GPT, GPTConfig

from . import train_peers
from .common import engine_step, timed_training, write_results

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def batches(steps, batch, seq, vocab):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (steps + 2, batch, seq + 1), generator=g)
    return [(d[:, :-1].cuda(), d[:, 1:].cuda()) for d in data]


def run_engine(config, data, warmup):
    torch.manual_seed(0)  # the same initial weights on both sides
    model = GPT(config)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = zerofuse.initialize(model=model, model_parameters=model.param_groups(0.1), config={
            "train_micro_batch_size_per_gpu": data[0][0].shape[0], "gradient_clipping": 1.0,
            "steps_per_print": 10**9, "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 6e-4, "betas": [0.9, 0.95], "eps": 1e-8}},
            "zero_optimization": {"stage": 1}})

    return timed_training(data, warmup, engine_step(engine))


def run_torch(config, data, warmup, compile_model=False):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**config.__dict__, "fused": False})).cuda()
    step_model = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    return timed_training(data, warmup, train_peers.plain_step(step_model, model, opt, autocast_device="cuda"))


CATEGORIES = (  # kernel-name fragments -> the categories of the step breakdown
    ("matrix multiplies", ("gemm", "cutlass", "cublas", "sm90_xmma", "nvjet")),
    ("attention", ("attention", "flash", "fmha", "cudnn")),
    ("optimizer", ("adam", "grad_stats", "partial_stats", "finish_stats", "step_control", "multi_tensor")),
    ("LayerNorm", ("ln_", "layer_norm", "layernorm")),
    ("loss", ("ce_", "cross_entropy", "softmax", "nll")),
    ("GELU", ("gelu",)),
    ("dtype casts and copies", ("copy", "cast", "convert")),
)


def breakdown(config, data):
    """GPU time per category over a few engine steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = GPT(config)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = zerofuse.initialize(model=model, model_parameters=model.param_groups(0.1), config={
            "train_micro_batch_size_per_gpu": data[0][0].shape[0], "gradient_clipping": 1.0,
            "steps_per_print": 10**9, "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
            "optimizer": {"type": "AdamW", "params": {"lr": 6e-4}}})
    for x, y in data[:3]:
        engine.backward(engine(x, y))
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for x, y in data[3:6]:
            engine.backward(engine(x, y))
            engine.step()
        torch.cuda.synchronize()
    totals = {}
    for event in prof.key_averages():
        ms = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0)) / 1e3 / 3
        if ms <= 0:
            continue
        name = event.key.lower()
        category = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other element-wise work")
        totals[category] = totals.get(category, 0.0) + ms
    return {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def measure(name, fn, config, data, warmup):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds, losses = fn(config, data, warmup)
    steps = len(data) - warmup
    tokens = steps * data[0][0].numel()
    tps = tokens / seconds
    peak = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name()), None)
    r = {"tokens_per_s": round(tps), "ms_per_step": round(1e3 * seconds / steps, 2),
         "peak_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
         "first_losses": [round(l, 4) for l in losses[:3]], "last_loss": round(losses[-1], 4)}
    if peak:
        r["mfu_pct"] = round(100 * config.flops_per_token(data[0][0].shape[1]) * tps / peak, 1)
    print(f"{name:>8}: {r['tokens_per_s']:>9,} tokens/s, {r['ms_per_step']:.1f} ms/step, "
          f"peak {r['peak_memory_GiB']} GiB" + (f", MFU {r['mfu_pct']}%" if peak else ""))
    return r


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a 2-layer model, a few steps")
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    config = GPTConfig(n_layer=2 if args.quick else 12)
    steps = 5 if args.quick else args.steps
    data = batches(steps + 5, args.batch, config.block_size, config.vocab_size)
    zf = measure("zerofuse", run_engine, config, data, warmup=5)
    pt = measure("torch", run_torch, config, data, warmup=5)
    compiled = measure("compiled", lambda c, d, w: run_torch(c, d, w, compile_model=True), config, data, warmup=5)
    results = {"gpt2_124M/B16_T1024/bf16": {
        "zerofuse": zf, "peer": pt, "peer_name": "torch eager: bf16 autocast, SDPA, AdamW(fused), clip",
        "torch_compile": compiled,
        "speedup": round(zf["tokens_per_s"] / pt["tokens_per_s"], 3),
        "speedup_vs_compile": round(zf["tokens_per_s"] / compiled["tokens_per_s"], 3),
        "max_error": abs(zf["first_losses"][0] - pt["first_losses"][0])}}
    peers = {"ddp_zero_redundancy": train_peers.run_ddp_zero, "fsdp2": train_peers.run_fsdp2}
    if train_peers.deepspeed_available():
        peers["deepspeed_zero1"] = train_peers.run_deepspeed
    for name, fn in peers.items():
        try:
            r = measure(name, fn, config, data, warmup=5)
            r["zerofuse_speedup"] = round(zf["tokens_per_s"] / r["tokens_per_s"], 3)
        except Exception as e:  # a peer that cannot run here is recorded, not fatal
            r = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"{name:>8}: did not run ({r['error']})")
        results["gpt2_124M/B16_T1024/bf16"][name] = r
    print(f"speedup {results['gpt2_124M/B16_T1024/bf16']['speedup']}x")
    results["gpt2_124M/B16_T1024/bf16"]["engine_step_breakdown_ms"] = breakdown(config, data)
    print("engine step, GPU ms by category:", results["gpt2_124M/B16_T1024/bf16"]["engine_step_breakdown_ms"])
    if not args.no_write:
        print("wrote", write_results("train_gpt2", "cuda", results, args.out))


if __name__ == "__main__":
    main()
