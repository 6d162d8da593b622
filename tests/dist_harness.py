"""Run a function in N gloo processes (torch.multiprocessing spawn) and get
rank 0's return value back."""
import gc
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), ZEROFUSE_NUM_THREADS="1")
    torch.set_num_threads(1)  # N processes share 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        if rank == 0:
            torch.save(result, result_path)
        dist.barrier()
    finally:
        gc.collect()  # nothing may hold the process group once it is destroyed
        dist.destroy_process_group()


def run_world(world: int, fn, *args):
    """fn(rank, world, *args) in `world` processes with a gloo group; returns
    what rank 0 returned. A failure in any rank raises here with its traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.pt")
        mp.spawn(_entry, args=(world, free_port(), fn, args, path), nprocs=world, join=True)
        return torch.load(path, weights_only=False)


def gather_master(engine):
    """Every trainable parameter's fp32 master value, assembled from all ranks' shards."""
    state = engine.optimizer.state_dict()
    names = state["param_names"]
    shapes = {name: getattr(p, "ds_shape", p.shape) for name, p in engine.optimizer.named_trainable_parameters()}
    mine = (state["slices"], state["master"])
    everyone = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    if engine.optimizer.partition_world == 1:
        everyone = everyone[:1]
    out = {n: torch.full((int(torch.Size(shapes[n]).numel()),), float("nan")) for n in names}
    for table, master in everyone:
        cursor = 0
        for param_index, first, length in table.tolist():
            out[names[param_index]][first:first + length] = master[cursor:cursor + length]
            cursor += length
    return {n: t.view(shapes[n]) for n, t in out.items()}


def rows_of(batch, first, count):
    """Rows [first, first + count) of a batch: a tuple of tensors or a dict of them."""
    if isinstance(batch, dict):
        return {k: v[first:first + count] for k, v in batch.items()}
    return tuple(t[first:first + count] for t in batch)


def train_global_batches(engine, rank, world, make_batch, steps, micro, accum, first_step=0):
    """Train `steps` optimizer steps, each on make_batch(step, micro * accum *
    world) split into this rank's micro-batches (micro-batch m of rank r is rows
    (m * world + r) * micro onwards). Returns each step's mean loss over the
    global batch (all ranks). A dict batch is passed as keywords and the loss
    read from the output's .loss (Hugging Face models)."""
    losses = []
    for step in range(first_step, first_step + steps):
        whole = make_batch(step, micro * accum * world)
        total = torch.zeros(())
        for m in range(accum):
            part = rows_of(whole, (m * world + rank) * micro, micro)
            loss = engine(**part).loss if isinstance(part, dict) else engine(*part)
            engine.backward(loss)
            engine.step()
            total += loss.detach().float()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / (accum * world))
    return losses


def _entry_unsynchronised(rank, world, port, fn, args, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), ZEROFUSE_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.save(fn(rank, world, *args), os.path.join(result_dir, f"{rank}.pt"))
    os._exit(0)  # no barrier or teardown: the ranks' connections may be broken on purpose


def run_world_unsynchronised(world: int, fn, *args):
    """fn(rank, world, *args) in `world` processes that end without meeting
    again (for tests that break the connections between ranks); returns every
    rank's return value."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry_unsynchronised, args=(world, free_port(), fn, args, tmp), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False) for r in range(world)]
