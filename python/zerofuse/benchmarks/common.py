"""What every benchmark shares: timing, the environment record, and writing
results/<device>-<what>-<date>.json atomically."""
import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time

import torch

import zerofuse


def default_results_dir() -> str:
    """bench/results of the repository when run from a checkout, else ./zerofuse_bench_results."""
    return "bench/results" if os.path.isdir("bench") else "zerofuse_bench_results"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_record(device: str) -> dict:
    if device == "cuda":
        return {"device": torch.cuda.get_device_name(), "device_kind": "cuda"}
    return {"device": f"{cpu_name()}, {os.cpu_count()} cores", "device_kind": "cpu",
            "threads": {"zerofuse": zerofuse.get_num_threads(), "torch": torch.get_num_threads()}}


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_cpu(fn, warmup=3, repeat=20, min_seconds=0.0):
    """Median wall time of fn() in milliseconds (CPU work is synchronous)."""
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < repeat or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def compare_cpu(ours, peer, rounds=5, repeat=10):
    """(ours_ms, peer_ms): medians over `rounds` alternating rounds, so that
    drift in the machine's state (other load, the allocator's heap, page
    faults on fresh buffers) falls on both sides alike."""
    a, b = [], []
    for _ in range(rounds):
        a.append(time_cpu(ours, warmup=2, repeat=repeat))
        b.append(time_cpu(peer, warmup=2, repeat=repeat))
    return statistics.median(a), statistics.median(b)


def timed_training(data, warmup, step):
    """Runs step(x, y) -> loss over the batches in `data`; returns (seconds
    from batch `warmup` on, every loss as a float). Losses stay on the device
    until the end, so the loop itself never waits for it."""
    losses, start = [], time.perf_counter()
    for i, (x, y) in enumerate(data):
        if i == warmup:
            _synchronize(x.device)
            start = time.perf_counter()
        losses.append(step(x, y).detach())
    _synchronize(data[0][0].device)
    return time.perf_counter() - start, [float(loss) for loss in losses]


def engine_step(engine):
    """step(x, y) -> loss for a zerofuse (or DeepSpeed) engine: forward,
    backward, and the optimizer at the accumulation boundary."""
    def step(x, y):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        return loss

    return step


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cuda(fn, warmup=5, repeat=50):
    """Median time of fn() in milliseconds, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def case(zerofuse_ms, peer_ms, peer, max_error, **extra):
    """One result: both figures from the same run, their ratio (> 1: zerofuse
    is faster) and the correctness error measured before timing."""
    return {"zerofuse_ms": round(zerofuse_ms, 4), "peer_ms": round(peer_ms, 4), "peer": peer,
            "speedup": round(peer_ms / zerofuse_ms, 3), "max_error": float(max_error), **extra}


def write_results(what: str, device: str, results: dict, out_dir: str = None) -> str:
    out_dir = out_dir or default_results_dir()
    record = {
        **device_record(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "zerofuse": zerofuse.__version__,
        "zerofuse_commit": commit(),
        "date": datetime.date.today().isoformat(),
        "results": results,
    }
    os.makedirs(out_dir, exist_ok=True)
    prefix = "cpu" if device == "cpu" else "".join(ch if ch.isalnum() else "-" for ch in record["device"].lower())
    name = f"{prefix}-{what}-{record['date']}.json"
    path = os.path.join(out_dir, name)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)  # never a half-written results file
    return path


def print_table(results: dict):
    print(f"{'case':<36} {'zerofuse ms':>12} {'peer ms':>10} {'speedup':>8}  peer")
    for name, r in results.items():
        print(f"{name:<36} {r['zerofuse_ms']:>12.3f} {r['peer_ms']:>10.3f} {r['speedup']:>7.2f}x  {r['peer']}")


def _cpu_rank(rank, world, port, fn, args, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), ZEROFUSE_DEVICE="cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share the cores
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        if rank == 0:
            torch.save(result, result_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_cpu_ranks(world: int, fn, *args):
    """fn(rank, world, *args) in `world` fresh processes on the CPU, joined by
    a gloo group (fn must be importable: a module-level function); returns
    rank 0's result. Fresh processes per run keep runs independent."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.pt")
        mp.spawn(_cpu_rank, args=(world, port, fn, args, path), nprocs=world, join=True)
        return torch.load(path, weights_only=False)
