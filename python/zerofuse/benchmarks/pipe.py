"""Pipeline parallelism on the CPU: zerofuse's GPT split into 2 stages
(1F1B, gloo point-to-point) against the same model data parallel over the
same 2 processes (ZeRO-1) and in one process, on the same global batches.

Each round runs every configuration in fresh processes, in the same order, so
drift on a noisy machine falls on all of them alike; figures are the median
step time after warm-up (median and range over rounds). For the pipeline the
idle ("bubble") fraction each stage measured -- time blocked in receives over
the schedule's time -- is recorded beside the ideal (p - 1) / (m + p - 1),
for m micro-batches per step; the losses of all configurations must agree.

    python bench/pipe.py                 # 2 stages, 4 and 8 micro-batches
    python bench/pipe.py --micro-batches 4 --rounds 3
"""
import argparse
import contextlib
import io
import statistics
import time

import torch
import torch.distributed as dist

from zerofuse.models import GPT, GPTConfig

from .common import run_on_cpu_ranks, write_results

MODEL = dict(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128)  # `zerofuse train`'s CPU default
MICRO_ROWS, SEQ = 4, 128


def _config(micro_batches, stage):
    return {"train_micro_batch_size_per_gpu": MICRO_ROWS, "gradient_accumulation_steps": micro_batches,
            "steps_per_print": 10 ** 9, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.1}},
            "zero_optimization": {"stage": stage}}


def _global_batches(steps, rows):
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, MODEL["vocab_size"], (rows, SEQ + 1), generator=g)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def _run(rank, world, kind, micro_batches, steps):
    """(step seconds, losses, bubble fractions of the stages or None) on this rank."""
    import zerofuse
    from zerofuse.models.gpt_pipe import gpt_pipeline

    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL))
    total_rows = MICRO_ROWS * micro_batches  # the global batch, the same for every configuration
    data = _global_batches(steps, total_rows)
    times, losses, bubbles = [], [], []
    quiet = contextlib.redirect_stdout(io.StringIO())
    if kind == "pipeline":
        with quiet:
            engine, *_ = zerofuse.initialize(model=gpt_pipeline(model, world), config=_config(micro_batches, 1))
        for x, y in data:
            micro = iter([(x[m * MICRO_ROWS:(m + 1) * MICRO_ROWS], y[m * MICRO_ROWS:(m + 1) * MICRO_ROWS])
                          for m in range(micro_batches)])
            t0 = time.perf_counter()
            losses.append(engine.train_batch(micro).item())
            times.append(time.perf_counter() - t0)
            bubbles.append(engine.last_bubble_fraction)
        everyone = [None] * world  # every stage's idle fractions
        dist.all_gather_object(everyone, bubbles)
        return times, losses, everyone
    per_rank = micro_batches // world  # data parallel: the global batch's micro-batches split over the ranks
    with quiet:
        engine, *_ = zerofuse.initialize(model=model, config=_config(per_rank, 1))
    for x, y in data:
        t0 = time.perf_counter()
        total = torch.zeros(())
        for m in range(per_rank):
            rows = slice((m * world + rank) * MICRO_ROWS, (m * world + rank + 1) * MICRO_ROWS)
            loss = engine(x[rows], y[rows])
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        if world > 1:
            dist.all_reduce(total)
        times.append(time.perf_counter() - t0)
        losses.append(total.item() / (per_rank * world))
    return times, losses, None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--micro-batches", default="4,8", help="comma-separated micro-batch counts per step")
    parser.add_argument("--steps", type=int, default=10, help="steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    counts = [int(m) for m in args.micro_batches.split(",") if m]
    if args.stages < 2 or args.steps <= args.warmup or any(m % args.stages for m in counts):
        parser.error("--stages must be >= 2, --steps greater than --warmup, and every micro-batch count a "
                     "multiple of --stages (the data-parallel comparison splits them over the ranks)")
    from zerofuse.pipe import ideal_bubble_fraction

    results = {}
    for m in counts:
        runs = {"pipeline": (args.stages, []), "data_parallel": (args.stages, []), "one_process": (1, [])}
        bubbles, losses = [], {}
        for r in range(args.rounds):
            for kind, (world, medians) in runs.items():
                times, run_losses, stage_bubbles = run_on_cpu_ranks(world, _run, "pipeline" if kind == "pipeline"
                                                                    else "dp", m, args.steps)
                medians.append(statistics.median(times[args.warmup:]) * 1e3)
                losses[kind] = run_losses
                if stage_bubbles is not None:
                    bubbles.append([statistics.median(b[args.warmup:]) for b in stage_bubbles])
                print(f"m={m} round {r}: {kind:<14} {medians[-1]:9.2f} ms/step")
        entry = {}
        for kind, (world, medians) in runs.items():
            entry[kind] = {"processes": world, "step_ms_median": round(statistics.median(medians), 2),
                           "step_ms_range": [round(min(medians), 2), round(max(medians), 2)]}
        base = entry["data_parallel"]["step_ms_median"]
        entry["pipeline"]["time_vs_data_parallel"] = round(entry["pipeline"]["step_ms_median"] / base, 3)
        entry["pipeline"]["bubble_measured_per_stage"] = [round(statistics.median(b), 3) for b in zip(*bubbles)]
        entry["pipeline"]["bubble_ideal"] = round(ideal_bubble_fraction(args.stages, m), 3)
        entry["max_loss_difference"] = max(abs(a - b) for kind in ("pipeline", "data_parallel")
                                           for a, b in zip(losses[kind], losses["one_process"]))
        results[f"micro_batches_{m}"] = entry
    results["setup"] = {"gpt": MODEL, "micro_batch_rows": MICRO_ROWS, "seq": SEQ, "stages": args.stages,
                        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                        "params": GPTConfig(**MODEL).num_params(), "zero_stage": 1}
    path = write_results(f"pipe-s{args.stages}", "cpu", results, args.out)
    print("wrote", path)


if __name__ == "__main__":
    main()
