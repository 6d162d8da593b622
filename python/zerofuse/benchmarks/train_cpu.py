"""`zerofuse train`'s model end to end on the CPU: zerofuse against plain
PyTorch, same model size, same initial weights, same batches.

- zerofuse: zerofuse.models.GPT (fused=True: zerofuse's LayerNorm, attention,
  bias+GELU and fused loss) through zerofuse.initialize with the config
  `zerofuse train` uses (AdamW, clipping at 1.0, ZeRO-2), as `zerofuse train` runs it.
- torch: the same GPT with torch's modules (fused=False: nn.LayerNorm, SDPA,
  GELU, F.cross_entropy), torch.optim.AdamW(fused=True) and clip_grad_norm_.

Each round runs both, each in a fresh process, alternating which goes first,
so that drift on a noisy machine falls on both; the ratio of each round's
tokens/s is reported with its spread.

    python bench/train_cpu.py                    # the CPU default: L4 C128 T128 B16
    zerofuse bench --train --rounds 3 --width 256 --context 256
"""
import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

from .common import engine_step, write_results
from .train_peers import plain_step

LR, BETAS, WD = 3e-3, (0.9, 0.95), 0.1


def _setup(settings):
    from zerofuse.cli.data import load_corpus, sample_batch

    train, _, _ = load_corpus(None)
    total = settings["warmup"] + settings["steps"]
    return [sample_batch(train, settings["batch_size"], settings["context"], 1337, step) for step in range(total)]


def _model(settings, fused):
    from zerofuse.models import GPT, GPTConfig

    torch.manual_seed(1337)
    return GPT(GPTConfig(vocab_size=256, block_size=settings["context"], n_layer=settings["layers"],
                         n_head=settings["heads"], n_embd=settings["width"], fused=fused))


def _zerofuse_step(settings):
    import zerofuse

    model = _model(settings, fused=True)
    config = {"train_batch_size": settings["batch_size"], "train_micro_batch_size_per_gpu": settings["batch_size"],
              "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "weight_decay": WD}},
              "zero_optimization": {"stage": 2, "overlap_comm": True}}
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = zerofuse.initialize(model=model, model_parameters=model.param_groups(WD), config=config)

    return engine_step(engine)


def _torch_step(settings):
    model = _model(settings, fused=False)
    opt = torch.optim.AdamW(model.param_groups(WD), lr=LR, betas=BETAS, fused=True)
    return plain_step(model, model, opt)


def _worker(_, which, settings, result_path):
    torch.set_num_threads(settings["threads"] or os.cpu_count() or 1)
    data = _setup(settings)
    step = (_zerofuse_step if which == "zerofuse" else _torch_step)(settings)
    losses = []
    for i, (x, y) in enumerate(data):
        if i == settings["warmup"]:
            start = time.perf_counter()
        losses.append(step(x, y).detach())
    seconds = time.perf_counter() - start
    tokens = settings["steps"] * settings["batch_size"] * settings["context"]
    torch.save({"tokens_per_s": tokens / seconds, "losses": [float(v) for v in losses]}, result_path)


def run_one(which, settings):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(which, settings, path), nprocs=1, join=True)
        return torch.load(path, weights_only=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    for name in ("layers", "heads", "width", "context", "batch_size", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.width % args.heads:
        parser.error(f"--width ({args.width}) must be divisible by --heads ({args.heads})")
    settings = {k: getattr(args, k) for k in ("layers", "heads", "width", "context", "batch_size", "steps",
                                               "warmup", "threads")}

    rounds = []
    for r in range(args.rounds):
        order = ("zerofuse", "torch") if r % 2 == 0 else ("torch", "zerofuse")
        got = {which: run_one(which, settings) for which in order}
        ratio = got["zerofuse"]["tokens_per_s"] / got["torch"]["tokens_per_s"]
        rounds.append({"zerofuse_tokens_per_s": round(got["zerofuse"]["tokens_per_s"], 1),
                       "torch_tokens_per_s": round(got["torch"]["tokens_per_s"], 1), "ratio": round(ratio, 3),
                       "first": order[0]})
        print(f"round {r}: zerofuse {got['zerofuse']['tokens_per_s']:9.0f} tok/s, torch "
              f"{got['torch']['tokens_per_s']:9.0f} tok/s, ratio {ratio:.3f}")
    ratios = [r["ratio"] for r in rounds]
    last = {which: run["losses"][-1] for which, run in got.items()}
    results = {
        "model": dict(settings, vocab_size=256),
        "rounds": rounds,
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_range": [min(ratios), max(ratios)],
        # The two runs are different kernels in float32: close, not equal.
        "final_loss": {k: round(v, 4) for k, v in last.items()},
    }
    print(f"zerofuse / torch tokens/s: median {results['ratio_median']:.3f}, range {min(ratios):.3f}-{max(ratios):.3f}")
    if not args.no_write:
        name = f"train-L{args.layers}-C{args.width}-T{args.context}-B{args.batch_size}"
        print("wrote", write_results(name, "cpu", results, args.out))
    return 0


if __name__ == "__main__":
    main()
