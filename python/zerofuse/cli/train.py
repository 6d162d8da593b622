"""`zerofuse train`: a byte-level GPT trained through zerofuse.initialize.

With no arguments it trains on the Python standard library's sources (no
download), sized to finish in minutes on a laptop CPU (larger on a GPU), and
leaves in the run directory: config.json, metrics.csv, loss.png, TensorBoard
events (when tensorboard is installed) and engine checkpoints. Works under
torchrun (ZeRO-2 across the processes; the same global batch, so the same loss
curve, as one process).
"""
import contextlib
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from ..models import GPT, GPTConfig
from ..runtime import distributed
from ..runtime.config import load_raw
from ..runtime.monitor import CsvLog, TensorBoardLog
from .data import load_corpus, sample_batch
from .plot import plot_losses

METRIC_COLUMNS = ("step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_s")

# Dense bf16 peak (tensor cores), for model FLOP utilisation.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}

CPU_DEFAULTS = dict(layers=4, heads=4, width=128, context=128, batch_size=16, steps=500, lr=3e-3, eval_every=50)
GPU_DEFAULTS = dict(layers=8, heads=8, width=512, context=256, batch_size=64, steps=2000, lr=1e-3, eval_every=200)


class TrainError(ValueError):
    """A problem with the command line or the run directory, reported as one line."""


def add_arguments(p):
    p.add_argument("--config", help="engine config (DeepSpeed JSON); default: a built-in ZeRO-2 AdamW config")
    p.add_argument("--data", help="a text file or a directory of text files (default: the Python standard library)")
    p.add_argument("--out", default=None, help="run directory (default: runs/zerofuse-<date>-<time>)")
    p.add_argument("--steps", type=int, help="optimizer steps (CPU default 500, GPU 2000)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g = p.add_argument_group("model size (defaults depend on the device)")
    g.add_argument("--layers", type=int)
    g.add_argument("--heads", type=int)
    g.add_argument("--width", type=int, help="embedding width")
    g.add_argument("--context", type=int, help="sequence length in bytes")
    g.add_argument("--batch-size", type=int, help="sequences per optimizer step, over all processes")
    g.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--eval-every", type=int, help="steps between validation losses (and checkpoints)")
    p.add_argument("--eval-batches", type=int, default=8, help="batches per validation loss (default 8)")
    p.add_argument("--seed", type=int, default=1337)
    g = p.add_argument_group("pipeline parallelism (under torchrun)")
    g.add_argument("--pipeline-stages", type=int, default=1,
                   help="split the model into this many pipeline stages (must divide the number of processes; "
                        "the rest is data parallel)")
    g.add_argument("--micro-batches", type=int,
                   help="micro-batches per step through the pipeline (default: 2 x --pipeline-stages)")


def _settings(args, device):
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    s = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    for key in ("layers", "heads", "width", "context", "batch_size", "steps", "eval_every"):
        if s[key] < 1:
            raise TrainError(f"--{key.replace('_', '-')} must be >= 1, got {s[key]}")
    if s["width"] % s["heads"]:
        raise TrainError(f"--width ({s['width']}) must be divisible by --heads ({s['heads']})")
    if not (s["lr"] > 0 and math.isfinite(s["lr"])):
        raise TrainError(f"--lr must be a positive number, got {s['lr']}")
    if args.eval_batches < 1:
        raise TrainError(f"--eval-batches must be >= 1, got {args.eval_batches}")
    if args.pipeline_stages < 1:
        raise TrainError(f"--pipeline-stages must be >= 1, got {args.pipeline_stages}")
    if args.micro_batches is not None and args.micro_batches < 1:
        raise TrainError(f"--micro-batches must be >= 1, got {args.micro_batches}")
    return s


def _layout(args, world):
    """(pipeline stages, data-parallel ranks, micro-batches per step per rank)."""
    stages = args.pipeline_stages
    if world % stages:
        raise TrainError(f"--pipeline-stages ({stages}) must divide the number of processes ({world})")
    micro = args.micro_batches or (2 * stages if stages > 1 else 1)
    return stages, world // stages, micro


def _engine_config(args, s, layout, device):
    if args.config:
        return load_raw(args.config)
    stages, dp, micro = layout
    if s["batch_size"] % (dp * micro):
        raise TrainError(f"--batch-size ({s['batch_size']}) must be divisible by the data-parallel processes "
                         f"({dp}) x micro-batches ({micro})")
    return {
        "train_batch_size": s["batch_size"],
        "train_micro_batch_size_per_gpu": s["batch_size"] // (dp * micro),
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,  # the progress bar reports instead
        "bf16": {"enabled": device.type == "cuda" and torch.cuda.is_bf16_supported()},
        "optimizer": {"type": "AdamW", "params": {"lr": s["lr"], "betas": [0.9, 0.95], "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": s["steps"], "warmup_num_steps": max(2, s["steps"] // 20), "warmup_type": "linear",
            "cos_min_ratio": 0.1}},
        # A pipeline's tied embedding and head sum their gradients across stages before the
        # data-parallel reduction, which ZeRO-2 would do during backward: stage 1 there.
        "zero_optimization": {"stage": 2 if stages == 1 else 1, "overlap_comm": True},
    }


def _peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class _Metrics:
    """metrics.csv (and TensorBoard events, when tensorboard is installed), written by rank 0."""

    def __init__(self, run_dir, resumed_at):
        """resumed_at: the step of the checkpoint a resumed run continues from; None for a fresh run."""
        self.csv = CsvLog(os.path.join(run_dir, "metrics.csv"), METRIC_COLUMNS, key="step").start(resumed_at)
        self.path = self.csv.path
        try:
            self.tensorboard = TensorBoardLog(os.path.join(run_dir, "tensorboard"))
        except ImportError:
            self.tensorboard = None

    def write(self, row):
        self.csv.write(row)
        if self.tensorboard is not None:
            self.tensorboard.write(row["tokens"], {k: row.get(k) for k in ("train_loss", "val_loss", "lr",
                                                                          "tokens_per_s")})

    def close(self):
        self.csv.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _rows(batch, first, count):
    return tuple(t[first:first + count] for t in batch)


def _validation_loss(engine, val, s, args, rank, world):
    if getattr(engine, "grid", None) is not None:
        return _pipeline_validation_loss(engine, val, s, args)
    engine.eval()
    total = torch.zeros((), device=engine.device)
    rows = max(1, s["batch_size"] // world)
    with torch.no_grad():
        for i in range(args.eval_batches):
            # Fixed batches (the same every evaluation), split across processes.
            x, y = sample_batch(val, rows * world, s["context"], args.seed + 1, i)
            total += engine(x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]).float()
    if world > 1:
        dist.all_reduce(total)
    engine.train()
    return total.item() / (args.eval_batches * world)


def _pipeline_validation_loss(engine, val, s, args):
    """The same fixed batches as without a pipeline, each split across the data-parallel ranks."""
    dp, d = engine.grid.data_parallel_size, engine.grid.data_parallel_id
    rows = max(1, s["batch_size"] // dp)
    total = 0.0
    for i in range(args.eval_batches):
        batch = sample_batch(val, rows * dp, s["context"], args.seed + 1, i)
        total += engine.eval_batch(iter([_rows(batch, d * rows, rows)]), num_micro_batches=1).item()
    return total / args.eval_batches


def _pipeline_step(engine, x, y, mbs):
    """One optimizer step through the pipeline: this data-parallel rank's micro-batches of the global batch."""
    dp, d = engine.grid.data_parallel_size, engine.grid.data_parallel_id
    micro = [_rows((x, y), (m * dp + d) * mbs, mbs) for m in range(engine.gradient_accumulation_steps())]
    return engine.train_batch(iter(micro)).item()


def _model(model_config, args, stages):
    """zerofuse's GPT, as a pipeline of `stages` stages when more than one, and its param groups."""
    model = GPT(model_config)
    if stages == 1:
        return model, model.param_groups(0.1)
    from ..models.gpt_pipe import gpt_pipeline
    pipe = gpt_pipeline(model, stages)
    decay = [p for p in pipe.parameters() if p.dim() >= 2]
    rest = [p for p in pipe.parameters() if p.dim() < 2]
    return pipe, [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def run(args) -> int:
    placement = distributed.setup()
    rank, world, device = placement.rank, placement.world_size, placement.device
    main = rank == 0
    s = _settings(args, device)
    run_dir = args.out or os.path.join("runs", time.strftime("zerofuse-%Y%m%d-%H%M%S"))
    if world > 1 and args.out is None:
        raise TrainError("under torchrun, give --out (every process must write to the same run directory)")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    has_run = os.path.exists(os.path.join(ckpt_dir, "latest"))
    if args.resume and not has_run:
        raise TrainError(f"--resume: {run_dir} has no checkpoint to continue from")
    if has_run and not args.resume:
        raise TrainError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")

    train, val, description = load_corpus(args.data)
    model_config = GPTConfig(vocab_size=256, block_size=s["context"], n_layer=s["layers"], n_head=s["heads"],
                             n_embd=s["width"])
    layout = _layout(args, world)
    torch.manual_seed(args.seed)
    quiet = contextlib.redirect_stdout(io.StringIO()) if not main else contextlib.nullcontext()
    with quiet:
        model, groups = _model(model_config, args, layout[0])
    engine_config = _engine_config(args, s, layout, device)
    import zerofuse

    with quiet:
        engine, _, _, _ = zerofuse.initialize(model=model, model_parameters=groups, config=engine_config)
    pipelined = getattr(engine, "grid", None) is not None
    if main:
        os.makedirs(run_dir, exist_ok=True)
    start = 0
    if args.resume:
        with quiet:
            engine.load_checkpoint(ckpt_dir)
        start = engine.global_steps
    steps = s["steps"]
    if main:
        config_record = {"engine": engine._config.to_dict(), "model": asdict(model_config), "data": description,
                         "world_size": world, "pipeline_stages": layout[0], "device": str(device), "settings": s,
                         "seed": args.seed}
        tmp = os.path.join(run_dir, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(config_record, f, indent=2)
        os.replace(tmp, os.path.join(run_dir, "config.json"))
        print(f"[zerofuse train] {model_config.num_params():,} parameters, data: {description}", flush=True)
        if pipelined:
            print(f"[zerofuse train] {layout[0]} pipeline stages x {layout[1]} data-parallel, {layout[2]} "
                  f"micro-batches per step (ideal bubble {engine.expected_bubble_fraction():.0%})", flush=True)
        print(f"[zerofuse train] run directory: {run_dir}", flush=True)

    if start >= steps:
        if main:
            print(f"[zerofuse train] {run_dir} already has {start} of {steps} steps; nothing to do", flush=True)
        return 0
    metrics = _Metrics(run_dir, start if args.resume else None) if main else None
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start, disable=not main, dynamic_ncols=True, unit="step", file=sys.stdout)
    gbs, mbs = engine.train_batch_size(), engine.train_micro_batch_size_per_gpu()
    gas = engine.gradient_accumulation_steps()
    context = s["context"]
    tokens_per_step = gbs * context
    flops_per_token, peak = model_config.flops_per_token(context), _peak_flops(device)
    val_loss = None
    if start == 0:  # where training starts from, for the plot
        val_loss = _validation_loss(engine, val, s, args, rank, world)
        if main:
            metrics.write({"step": 0, "tokens": 0, "val_loss": round(val_loss, 5), "lr": engine.get_lr()[0]})
    tick = time.perf_counter()
    for step in range(start, steps):
        x, y = sample_batch(train, gbs, context, args.seed, step)
        if pipelined:
            train_loss = _pipeline_step(engine, x, y, mbs)
        else:
            total = torch.zeros((), device=device)
            for micro in range(gas):
                rows = slice((micro * world + rank) * mbs, (micro * world + rank + 1) * mbs)
                loss = engine(x[rows], y[rows])
                engine.backward(loss)
                engine.step()
                total += loss.detach().float()
            if world > 1:
                dist.all_reduce(total)
            train_loss = total.item() / (gas * world)
        now = time.perf_counter()
        tokens_per_s = tokens_per_step / max(now - tick, 1e-9)
        tick = now
        last = step + 1 == steps
        if (step + 1) % s["eval_every"] == 0 or last:
            val_loss = _validation_loss(engine, val, s, args, rank, world)
            with quiet:
                engine.save_checkpoint(ckpt_dir, tag=f"step{step + 1}")
            tick = time.perf_counter()  # evaluation and saving are not training time
        if main:
            row = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, "train_loss": round(train_loss, 5),
                   "val_loss": None if val_loss is None or ((step + 1) % s["eval_every"] and not last)
                   else round(val_loss, 5), "lr": engine.get_lr()[0], "tokens_per_s": round(tokens_per_s, 1)}
            metrics.write(row)
            postfix = {"loss": f"{train_loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
            if val_loss is not None:
                postfix["val"] = f"{val_loss:.3f}"
            if peak:
                postfix["mfu"] = f"{100 * flops_per_token * tokens_per_s / world / peak:.1f}%"
            bar.set_postfix(postfix, refresh=False)
        bar.update(1)
    bar.close()
    if main:
        metrics.close()
        plot_losses(metrics.path, os.path.join(run_dir, "loss.png"),
                    title=f"zerofuse train: {model_config.num_params() / 1e6:.1f}M params")
        print(f"[zerofuse train] done: {steps} steps, train loss {train_loss:.4f}, validation loss {val_loss:.4f}",
              flush=True)
        print(f"[zerofuse train] wrote {run_dir}/metrics.csv, {run_dir}/loss.png, checkpoints in {ckpt_dir}",
              flush=True)
        print(f"[zerofuse train] try: zerofuse sample --run {run_dir} --prompt 'def '", flush=True)
    return 0
