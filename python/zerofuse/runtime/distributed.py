"""Where this process sits: its data-parallel group, rank, world size and device.

Works under torchrun (RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT), inside a process group the script made itself, or as a plain
single process (no group at all). Communication always goes through
torch.distributed: NCCL for CUDA, gloo for CPU.
"""
import atexit
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class Placement:
    group: Optional["dist.ProcessGroup"]  # None: a single process, no collectives
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name):
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def local_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is usable, else the CPU. ZEROFUSE_DEVICE=cpu
    keeps training on the CPU of a GPU machine (what DS_ACCELERATOR=cpu does
    for DeepSpeed); ZEROFUSE_DEVICE=cuda makes a missing GPU an error."""
    choice = os.environ.get("ZEROFUSE_DEVICE", "").strip().lower()
    if not choice and os.environ.get("DS_ACCELERATOR", "").strip().lower() in ("cpu", "cuda"):
        choice = os.environ["DS_ACCELERATOR"].strip().lower()  # DeepSpeed's name for the same choice
    if choice not in ("", "cpu", "cuda"):
        raise ValueError(f"environment variable ZEROFUSE_DEVICE={os.environ['ZEROFUSE_DEVICE']!r} "
                         "must be 'cpu' or 'cuda' (or unset: the GPU when there is one)")
    if choice != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", _env_int("LOCAL_RANK") or 0)
    if choice == "cuda":
        raise RuntimeError("ZEROFUSE_DEVICE=cuda but torch sees no usable CUDA device")
    return torch.device("cpu")


_exit_handler_registered = False


def _let_communication_threads_finish(destroy: bool):
    """At interpreter exit. A collective's work object can be released last by
    gloo's worker thread, and its destructor takes the GIL (it holds a Python
    object of the caller's thread state); once Python has begun finalizing,
    that thread is killed mid-destructor and the process aborts ("terminate
    called without an active exception", seen in 1 of 4-8 two-rank runs that
    ended right after a step). Sleeping here, GIL released, lets such threads
    finish first; the group zerofuse started is also destroyed."""
    if destroy and dist.is_initialized():
        dist.destroy_process_group()
    time.sleep(0.05)


def _register_exit_handler(destroy: bool):
    global _exit_handler_registered
    if not _exit_handler_registered:
        _exit_handler_registered = True
        atexit.register(_let_communication_threads_finish, destroy)


def join_launched_group(device: Optional[torch.device] = None) -> bool:
    """Start the world process group when launched as one of several
    processes (torchrun's WORLD_SIZE > 1) and none exists yet: NCCL for CUDA,
    gloo for the CPU. Returns whether torch.distributed is initialized."""
    if dist.is_initialized():
        return True
    world = _env_int("WORLD_SIZE")
    if world is None or world <= 1:
        return False
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set: launch with torchrun")
    device = device or local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    _register_exit_handler(destroy=True)  # the group is ours to end
    return True


def setup(process_group=None) -> Placement:
    """Join (or start) the data-parallel process group."""
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if process_group is not None:
        if not dist.is_initialized():
            raise ValueError("process_group was given but torch.distributed is not initialized")
        _register_exit_handler(destroy=False)
        return Placement(process_group, dist.get_rank(process_group), dist.get_world_size(process_group), device)
    if not join_launched_group(device):
        return Placement(None, 0, 1, device)
    if dist.get_world_size() == 1:
        return Placement(None, 0, 1, device)
    _register_exit_handler(destroy=False)  # no-op when registered above
    group = dist.group.WORLD
    return Placement(group, dist.get_rank(group), dist.get_world_size(group), device)
