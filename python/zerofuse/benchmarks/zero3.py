"""ZeRO-3 against ZeRO-2 and PyTorch's FSDP2 (fully_shard, parameters
resharded after forward: the same memory contract as ZeRO-3), same GPT,
same batches, `--world` processes (gloo on the CPU, NCCL on CUDA).

Each round runs every configuration once, in its own group of processes, in
the same order, so drift on a noisy machine falls on all of them alike; the
figures are the median step time of each run after warm-up, reported as the
median and range over rounds. Also recorded per configuration: the bytes one
rank sends into collectives per step (zerofuse's comms log), the training
state per rank (the optimizer's memory report) and the losses, which must
agree between the zerofuse stages (they are the same arithmetic).

    python bench/zero3.py                       # CPU, world 2, a small GPT
    python bench/zero3.py --model 50m --rounds 3
"""
import argparse
import contextlib
import io
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zerofuse.models import GPT, GPTConfig

from .common import engine_step, write_results
from .train_peers import plain_step

MODELS = {  # name: (GPTConfig arguments, micro-batch rows, sequence length)
    "small": (dict(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128), 8, 128),
    "50m": (dict(vocab_size=8192, block_size=128, n_layer=6, n_head=12, n_embd=768), 2, 128),
    "124m": (dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768), 8, 1024),
}


def zerofuse_config(stage, dtype, micro, zero):
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
            "gradient_clipping": 1.0, "bf16": {"enabled": dtype == torch.bfloat16},
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.1}},
            "comms_logger": {"enabled": True},
            "zero_optimization": dict({"stage": stage, "overlap_comm": True}, **zero)}


# name: zero_optimization settings (None: FSDP2)
CONFIGS = {
    "zero2": (2, {}),
    # DeepSpeed's defaults: parameters under 1e5 elements stay whole.
    "zero3": (3, {}),
    # Every parameter partitioned, nothing kept for reuse: the most traffic.
    "zero3_partition_all": (3, {"stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0}),
    "fsdp2": None,
}


def _batches(model_args, rows, seq, count, rank, world, device):
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, model_args["vocab_size"], (rows * world, seq + 1), generator=g)
        mine = tokens[rank * rows:(rank + 1) * rows].to(device)
        out.append((mine[:, :-1], mine[:, 1:]))
    return out


def _step_times(step, data):
    times, losses = [], []
    for x, y in data:
        t0 = time.perf_counter()
        loss = step(x, y)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return times, losses


def _run_zerofuse(name, model_args, micro, data, dtype):
    import zerofuse
    from zerofuse.runtime.comms_log import COMMS_LOG

    stage, zero = CONFIGS[name]
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_args))
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = zerofuse.initialize(model=model, config=zerofuse_config(stage, dtype, micro, zero))

    COMMS_LOG.reset()
    times, losses = _step_times(engine_step(engine), data)
    per_step = COMMS_LOG.steps[-1] if COMMS_LOG.steps else {}
    report = engine.optimizer.memory_report()
    engine.destroy()
    return times, losses, sum(per_step.values()), report


def _run_fsdp2(model_args, micro, data, dtype):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    device = data[0][0].device
    model = GPT(GPTConfig(**model_args)).to(device)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)  # reshard_after_forward=True: ZeRO-3's contract
    fully_shard(model, mp_policy=policy)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)

    times, losses = _step_times(plain_step(model, model, opt), data)
    return times, losses, None, None


def _worker(rank, world, port, name, model_name, steps, device_kind, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    if device_kind == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if device_kind == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        model_args, micro, seq = MODELS[model_name]
        dtype = torch.bfloat16 if device_kind == "cuda" else torch.float32
        data = _batches(model_args, micro, seq, steps, rank, world, device)
        if name == "fsdp2":
            result = _run_fsdp2(model_args, micro, data, dtype)
        else:
            result = _run_zerofuse(name, model_args, micro, data, dtype)
        if rank == 0:
            torch.save(result, result_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_once(name, model_name, world, steps, device_kind):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(world, port, name, model_name, steps, device_kind, path), nprocs=world, join=True)
        return torch.load(path, weights_only=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.world < 1 or args.steps <= args.warmup:
        parser.error("--world must be >= 1 and --steps greater than --warmup")
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")

    medians = {n: [] for n in names}
    details = {}
    for r in range(args.rounds):
        for name in names:
            try:
                times, losses, nbytes, report = run_once(name, args.model, args.world, args.steps, args.device)
            except Exception as e:  # a peer that cannot run here (FSDP2 without its backend) is recorded, not fatal
                details[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[-1][:300]}"}
                continue
            ms = statistics.median(times[args.warmup:]) * 1e3
            medians[name].append(ms)
            details[name] = {"losses": [round(v, 6) for v in losses], "bytes_sent_per_step": nbytes,
                             "memory_per_rank_bytes": report}
            print(f"round {r}: {name:<22} {ms:9.2f} ms/step")

    results = {}
    base = statistics.median(medians["zero2"]) if medians.get("zero2") else None
    for name in names:
        entry = dict(details.get(name, {}))
        if medians[name]:
            ms = statistics.median(medians[name])
            entry.update(step_ms_median=round(ms, 3), step_ms_range=[round(min(medians[name]), 3),
                                                                     round(max(medians[name]), 3)])
            if base:
                entry["time_vs_zero2"] = round(ms / base, 3)
        results[name] = entry
    if details.get("zero2", {}).get("losses") and details.get("zero3", {}).get("losses"):
        results["max_loss_difference_zero3_vs_zero2"] = max(
            abs(a - b) for a, b in zip(details["zero2"]["losses"], details["zero3"]["losses"]))
    model_args, micro, seq = MODELS[args.model]
    results["setup"] = {"model": args.model, "gpt": model_args, "micro_batch": micro, "seq": seq,
                        "world": args.world, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                        "params": GPTConfig(**model_args).num_params()}
    path = write_results(f"zero3-{args.model}-w{args.world}", args.device, results, args.out)
    print("wrote", path)


if __name__ == "__main__":
    main()
