"""Checkpoints of tensor-parallel models, in the whole model's terms.

The model state is written whole (each split parameter gathered over its
tensor-parallel group) by global rank 0, under the unsplit model's names and
shapes. Each rank writes its optimizer pieces in its own slice's coordinates,
and the manifest records for every split parameter how slices are cut from
the whole (tp/whole.py) and which tensor-parallel rank wrote each shard file.
Loading at any tensor-parallel size (or none) puts each parameter's fp32
master and optimizer state back together whole and cuts this rank's slice
(runtime/checkpoint.py); to_fp32_state_dict gives the unsplit model.
"""
import os
from collections import OrderedDict

import torch
import torch.distributed as dist

from ..runtime import client_state as client_codec
from ..runtime.checkpoint import (MODEL_STATES, _param_table, _rng_name, _shard_name, begin_save, common_manifest,
                                  publish)
from ..runtime.checkpoint_files import rng_state, save_file
from .whole import spec_of, whole_from_locals


def whole_state(state_with_vars, tp, skip=frozenset()):
    """A state_dict(keep_vars=True) with every split tensor gathered whole over
    the tensor-parallel group `tp` (None: as it is), on the CPU; every rank of
    the group must call it. `skip`: ids of tensors to leave out."""
    out = OrderedDict()
    for key, value in state_with_vars.items():
        if id(value) in skip:
            continue
        spec = spec_of(value) if tp is not None else None
        tensor = value.detach()
        if spec is not None:
            parts = [torch.empty_like(tensor) for _ in range(tp.size)]
            dist.all_gather(parts, tensor.contiguous(), group=tp.group)
            tensor = whole_from_locals(parts, spec)
        out[key] = tensor.cpu().clone()
    return out


def whole_module_state(engine, exclude_frozen_parameters=False):
    """The model's state_dict with every split parameter gathered whole."""
    frozen = {id(p) for p in engine.module.parameters() if not p.requires_grad} if exclude_frozen_parameters \
        else set()
    return whole_state(engine.module.state_dict(keep_vars=True), engine.tp, frozen)


def save_tensor_parallel_checkpoint(engine, save_dir, tag, client_state, save_latest=True,
                                    exclude_frozen_parameters=False):
    client_json, client_tensors = client_codec.encode(client_state)
    opt, tp = engine.optimizer, engine.tp
    rank = dist.get_rank()
    tag, final, partial = begin_save(engine, save_dir, tag, creates=rank == 0)

    opt_state = opt.state_dict()
    shard = None
    if opt.partition_world > 1 or engine.placement.rank == 0:  # ZeRO-0: data-parallel rank 0 of each tp rank
        shard = _shard_name(rank)
        save_file({k: opt_state[k] for k in ["slices", "master", *opt_state["state_names"]]},
                  os.path.join(partial, shard))
    save_file(rng_state(), os.path.join(partial, _rng_name(rank)))
    states = whole_module_state(engine, exclude_frozen_parameters)  # collective over the tensor-parallel group
    if rank == 0:
        save_file(states, os.path.join(partial, MODEL_STATES))
    written = [None] * dist.get_world_size()
    dist.all_gather_object(written, (shard, tp.rank))
    engine._checkpoint_barrier()

    if rank == 0:
        table, order = _param_table(engine)
        manifest = common_manifest(engine, tag, opt_state, client_json, client_tensors)
        manifest.update({
            "world_size": dist.get_world_size(),
            "shard_files": [s for s, _ in written if s is not None],
            "shard_tp_ranks": [t for s, t in written if s is not None],
            "rng_files": [_rng_name(r) for r in range(dist.get_world_size())],
            "params": table,
            "state_dict_keys": order,
            "frozen_excluded": bool(exclude_frozen_parameters),
            "tensor_parallel": {"size": tp.size},
        })
        publish(save_dir, tag, partial, manifest, save_latest, client_tensors)
    engine._checkpoint_barrier()
    return final
