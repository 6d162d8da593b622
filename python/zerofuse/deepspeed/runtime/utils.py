"""deepspeed.runtime.utils: the helpers training scripts call."""
import gc

import torch
import torch.distributed as dist


def see_memory_usage(message, force=False):
    """Print the device's memory in use (rank 0, when force)."""
    if not force or (dist.is_initialized() and dist.get_rank() != 0):
        return
    from ..accelerator import get_accelerator
    gc.collect()
    acc = get_accelerator()
    print(f"{message} | allocated {acc.memory_allocated() / 2**30:.2f} GB, max allocated "
          f"{acc.max_memory_allocated() / 2**30:.2f} GB", flush=True)


def clip_grad_norm_(parameters, max_norm, norm_type=2, mpu=None):
    """torch.nn.utils.clip_grad_norm_ over the parameters' .grad (model-parallel
    groups are not consulted: zerofuse's engine clips on its own shards)."""
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type)


def get_global_norm(norm_list):
    return sum(float(n) ** 2 for n in norm_list) ** 0.5


def noop_decorator(func):
    return func
