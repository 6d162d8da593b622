"""Tensor (model) parallelism, Megatron style: layers whose weights are split
across the ranks of a tensor-parallel group, the collectives between them,
and the loss over a split vocabulary.

    grid = zerofuse.tp.tensor_parallel_grid(tp_size=2)     # tp x data parallel over the world
    tp = grid.get_tensor_model_parallel_group()
    qkv = ColumnParallelLinear.from_linear(block.qkv, tp)  # heads split
    proj = RowParallelLinear.from_linear(block.proj, tp)    # one all-reduce after it
    engine, *_ = zerofuse.initialize(model=model, config=config, mpu=grid)

With `mpu=` the engine reduces gradients over the data-parallel group and
sums the gradient statistics over the tensor-parallel group, counting
replicated parameters once, so clipping and the fp16 overflow skip see the
whole model.
"""
import torch.distributed as dist

from .collectives import (copy_to_tensor_parallel, gather_from_tensor_parallel, reduce_from_tensor_parallel,
                          scatter_to_tensor_parallel)
from .cross_entropy import linear_vocab_parallel_cross_entropy, vocab_parallel_cross_entropy
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


def tensor_parallel_grid(tp_size: int, pipe_size: int = 1):
    """The process grid for tp_size-way tensor parallelism (ranks of a group
    adjacent, as Megatron), data parallel over the rest of the world; an
    object with Megatron's mpu interface. Every rank must call it."""
    from ..pipe.topology import PipeModelDataParallelTopology, grid_for
    from ..runtime.distributed import join_launched_group

    join_launched_group()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1 or world % (tp_size * pipe_size):
        raise ValueError(f"tensor_parallel_grid: tp_size ({tp_size}) x pipe_size ({pipe_size}) must divide the "
                         f"world size ({world})")
    topology = PipeModelDataParallelTopology(num_pp=pipe_size, num_mp=tp_size, num_dp=world // (tp_size * pipe_size))
    return grid_for(topology)  # a PipelineModule given grid.topology() uses this same grid


from .auto import AutoTPError, tp_model_init  # noqa: E402  (auto uses tensor_parallel_grid from here)

__all__ = ["AutoTPError", "tp_model_init", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
           "copy_to_tensor_parallel",
           "gather_from_tensor_parallel", "linear_vocab_parallel_cross_entropy", "reduce_from_tensor_parallel",
           "scatter_to_tensor_parallel", "tensor_parallel_grid", "vocab_parallel_cross_entropy"]
