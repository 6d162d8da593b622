"""The four communication steps of Megatron-style tensor parallelism, each an
autograd function whose backward is the matching dual:

    copy_to_tensor_parallel       forward: identity      backward: all-reduce (sum)
    reduce_from_tensor_parallel   forward: all-reduce     backward: identity
    gather_from_tensor_parallel   forward: all-gather of the last dimension
                                  backward: this rank's slice of the gradient
    scatter_to_tensor_parallel    forward: this rank's slice of the last dimension
                                  backward: all-gather

A column-parallel linear layer starts with copy_to (every rank reads the whole
input; their input gradients are partial sums), a row-parallel one ends with
reduce_from (every rank produced a partial output). `group` is the tensor-
parallel process group (None: no communication, one rank).
"""
import torch
import torch.distributed as dist

from ..runtime.comms_log import COMMS_LOG


def tp_world(group) -> int:
    """Ranks in the tensor-parallel group (None: one, no communication)."""
    return 1 if group is None else dist.get_world_size(group)


def tp_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x, group):
    if tp_world(group) == 1:
        return x
    x = x.contiguous()
    COMMS_LOG.record("all_reduce", x.numel() * x.element_size())
    dist.all_reduce(x, group=group)
    return x


def _gather_last(x, group):
    world = tp_world(group)
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    COMMS_LOG.record("all_gather", x.numel() * x.element_size() * world)
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


def _own_slice_last(x, group):
    world = tp_world(group)
    if world == 1:
        return x
    size = x.shape[-1]
    if size % world:
        raise ValueError(f"tensor parallelism: the last dimension ({size}) is not divisible by the tensor-parallel "
                         f"size ({world})")
    rank = tp_rank(group)
    return x[..., rank * (size // world):(rank + 1) * (size // world)].contiguous()


class _CopyToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice_last(grad, ctx.group), None


class _ScatterToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _own_slice_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


def copy_to_tensor_parallel(x, group):
    return _CopyToTensorParallel.apply(x, group)


def reduce_from_tensor_parallel(x, group):
    return _ReduceFromTensorParallel.apply(x, group)


def gather_from_tensor_parallel(x, group):
    return _GatherFromTensorParallel.apply(x, group)


def scatter_to_tensor_parallel(x, group):
    return _ScatterToTensorParallel.apply(x, group)
