"""deepspeed.comm: DeepSpeed's torch.distributed-like functions, as thin calls
into torch.distributed (NCCL for CUDA tensors, gloo for CPU ones).

DeepSpeed's profiling keywords (prof, log_name, debug) are accepted and do
nothing. Differences on purpose: get_rank() / get_world_size() answer 0 / 1
before any process group exists (DeepSpeed asserts), and init_distributed()
in a single process that no launcher started makes a one-process group
without a network port (DeepSpeed tries MPI discovery and fails without mpi4py).
"""
import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as _dist
from torch.distributed import ReduceOp  # noqa: F401  (deepspeed.comm.ReduceOp)

from ...runtime.collectives import all_gather as _all_gather_flat
from ...runtime.collectives import reduce_scatter as _reduce_scatter_flat

TORCH_DISTRIBUTED_DEFAULT_PORT = 29500
default_pg_timeout = timedelta(minutes=int(os.environ.get("DEEPSPEED_TIMEOUT", "10")))

_PROFILING = ("prof", "log_name", "debug", "log_comm_sizes")


def _plain(kwargs):
    return {k: v for k, v in kwargs.items() if k not in _PROFILING}


def _default_backend():
    return "nccl" if torch.cuda.is_available() and os.environ.get("ZEROFUSE_DEVICE", "") != "cpu" else "gloo"


def init_distributed(dist_backend: Optional[str] = None, auto_mpi_discovery: bool = True,
                     distributed_port: int = TORCH_DISTRIBUTED_DEFAULT_PORT, verbose: bool = True,
                     timeout: timedelta = default_pg_timeout, init_method: Optional[str] = None,
                     dist_init_required: Optional[bool] = None, config=None, rank: int = -1,
                     world_size: int = -1) -> None:
    """Start the process group if there is none (DeepSpeed's init_distributed):
    from torchrun's / the DeepSpeed launcher's environment, init_method, or --
    in a single process no launcher started -- a group of one."""
    if _dist.is_initialized():
        return
    if dist_init_required is False:
        raise RuntimeError("deepspeed.init_distributed: dist_init_required=False but torch.distributed is not "
                           "initialized; initialize it first, or leave dist_init_required unset")
    backend = dist_backend or _default_backend()
    launched = all(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if init_method is not None or launched:
        kwargs = dict(backend=backend, timeout=timeout, init_method=init_method)
        if rank >= 0:
            kwargs["rank"] = rank
        if world_size > 0:
            kwargs["world_size"] = world_size
        _dist.init_process_group(**kwargs)
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        raise RuntimeError(f"deepspeed.init_distributed: WORLD_SIZE={os.environ['WORLD_SIZE']} but "
                           f"{', '.join(missing)} is not set: start the processes with `zerofuse launch` or torchrun")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    _dist.init_process_group(backend=backend, store=_dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def is_initialized() -> bool:
    return _dist.is_initialized()


def is_available() -> bool:
    return _dist.is_available()


def destroy_process_group(group=None):
    _dist.destroy_process_group(group)


def new_group(ranks):
    return _dist.new_group(ranks)


def get_world_group():
    return _dist.group.WORLD


def get_rank(group=None) -> int:
    return _dist.get_rank(group) if _dist.is_initialized() else 0


def get_world_size(group=None) -> int:
    return _dist.get_world_size(group) if _dist.is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def get_global_rank(group=None, group_rank: int = 0) -> int:
    return _dist.get_global_rank(group, group_rank) if group is not None else group_rank


def get_all_ranks_from_group(group=None):
    return list(range(get_world_size())) if group is None else _dist.get_process_group_ranks(group)


def get_backend(group=None):
    return _dist.get_backend(group)


def barrier(group=None, async_op=False, device_ids=None, **kwargs):
    return _dist.barrier(group=group, async_op=async_op, device_ids=device_ids)


def monitored_barrier(group=None, timeout=None, wait_all_ranks=False, **kwargs):
    return _dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=wait_all_ranks)


def all_reduce(tensor, op=ReduceOp.SUM, group=None, async_op=False, **kwargs):
    return _dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def inference_all_reduce(tensor, op=ReduceOp.SUM, group=None, **kwargs):
    return _dist.all_reduce(tensor, op=op, group=group)


def all_reduce_coalesced(tensors, op=ReduceOp.SUM, group=None, async_op=False, **kwargs):
    works = [_dist.all_reduce(t, op=op, group=group, async_op=async_op) for t in tensors]
    return works[-1] if async_op and works else None


def reduce(tensor, dst, op=ReduceOp.SUM, group=None, async_op=False, **kwargs):
    return _dist.reduce(tensor, dst, op=op, group=group, async_op=async_op)


def broadcast(tensor, src, group=None, async_op=False, **kwargs):
    return _dist.broadcast(tensor, src, group=group, async_op=async_op)


def broadcast_object_list(object_list, src, group=None, device=None, **kwargs):
    return _dist.broadcast_object_list(object_list, src, group=group, device=device)


def all_gather(tensor_list, tensor, group=None, async_op=False, **kwargs):
    return _dist.all_gather(tensor_list, tensor, group=group, async_op=async_op)


def all_gather_object(object_list, obj, group=None, **kwargs):
    return _dist.all_gather_object(object_list, obj, group=group)


def all_gather_into_tensor(output_tensor, tensor, group=None, async_op=False, **kwargs):
    return _all_gather_flat(output_tensor, tensor, group=group, async_op=async_op)


def allgather_fn(output_tensor, input_tensor, group=None, async_op=False, **kwargs):
    return _all_gather_flat(output_tensor, input_tensor, group=group, async_op=async_op)


def has_all_gather_into_tensor() -> bool:
    return True


def reduce_scatter(output, input_list, op=ReduceOp.SUM, group=None, async_op=False, **kwargs):
    return _dist.reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)


def reduce_scatter_tensor(output_tensor, tensor, op=ReduceOp.SUM, group=None, async_op=False, **kwargs):
    return _reduce_scatter_flat(output_tensor, tensor, op=op, group=group, async_op=async_op)


def reduce_scatter_fn(output_tensor, tensor, op=ReduceOp.SUM, group=None, async_op=False, **kwargs):
    return _reduce_scatter_flat(output_tensor, tensor, op=op, group=group, async_op=async_op)


def has_reduce_scatter_tensor() -> bool:
    return True


def all_to_all_single(output, tensor, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False,
                      **kwargs):
    return _dist.all_to_all_single(output, tensor, output_split_sizes, input_split_sizes, group=group,
                                   async_op=async_op)


def all_to_all(output_tensor_list, input_tensor_list, group=None, async_op=False, **kwargs):
    return _dist.all_to_all(output_tensor_list, input_tensor_list, group=group, async_op=async_op)


def gather(tensor, gather_list=None, dst=0, group=None, async_op=False, **kwargs):
    return _dist.gather(tensor, gather_list, dst, group=group, async_op=async_op)


def scatter(tensor, scatter_list=None, src=0, group=None, async_op=False, **kwargs):
    return _dist.scatter(tensor, scatter_list, src, group=group, async_op=async_op)


def send(tensor, dst, group=None, tag=0, **kwargs):
    return _dist.send(tensor, dst, group=group, tag=tag)


def recv(tensor, src=None, group=None, tag=0, **kwargs):
    return _dist.recv(tensor, src, group=group, tag=tag)


def isend(tensor, dst, group=None, tag=0, **kwargs):
    return _dist.isend(tensor, dst, group=group, tag=tag)


def irecv(tensor, src=None, group=None, tag=0, **kwargs):
    return _dist.irecv(tensor, src, group=group, tag=tag)


P2POp = _dist.P2POp


def batch_isend_irecv(p2p_op_list, **kwargs):
    return _dist.batch_isend_irecv(p2p_op_list)


def configure(deepspeed_config=None, enabled=None, prof_all=None, prof_ops=None, verbose=None, debug=None):
    """DeepSpeed's comms-logger switches, for the engine's collectives
    (zerofuse.runtime.comms_log); a config's comms_logger section sets them too."""
    from ...runtime.comms_log import COMMS_LOG
    if deepspeed_config is not None:
        section = getattr(deepspeed_config, "comms_logger", None) or {}
        COMMS_LOG.configure(**{k: v for k, v in section.items() if k != "debug"})
    COMMS_LOG.configure(enabled=enabled, verbose=verbose, prof_all=prof_all, prof_ops=prof_ops)


def log_summary(show_straggler=False, return_dict=False):
    """The engine's collectives so far, by kind: count and bytes (printed by
    rank 0; returned as a dict with return_dict)."""
    from ...runtime.comms_log import COMMS_LOG
    summary = COMMS_LOG.summary()
    if return_dict:
        return summary
    if get_rank() == 0:
        print("Comm. Op            Count      Total bytes")
        for kind, entry in summary.items():
            print(f"{kind:<20}{entry['count']:<11}{entry['bytes']}")
    return None
