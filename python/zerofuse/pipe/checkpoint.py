"""Pipeline checkpoints: the common checkpoint format (runtime/checkpoint.py)
written by every stage, with the model's state in one file per layer.

    <tag>/layer_<idx>-model_states.pt  layer idx's state_dict (its own keys; the
                                       manifest's "layer_files" gives each file's
                                       prefix in the whole model: "<idx>." or
                                       "tied_modules.<key>."), written by data-
                                       parallel rank 0 of the owning stage
    <tag>/zero_shard_<rank>.pt         each rank's optimizer pieces, named by the
                                       parameter's name in the whole model
    <tag>/rng_<rank>.pt, manifest.json as in every checkpoint; the manifest's
                                       parameter table and key order cover all stages

Because pieces and layers are named as in the whole model, a checkpoint loads
at another number of stages or data-parallel ranks (each rank takes the
pieces and layers it now holds), into a data-parallel engine over the same
layers, and consolidates with zerofuse.checkpoint.to_fp32_state_dict. A
weight tied across stages is saved once, by its primary stage.
"""
import os

import torch
import torch.distributed as dist

from ..runtime import client_state as client_codec
from ..runtime.checkpoint import (_param_table, _rng_name, _shard_name, begin_save, common_manifest, publish)
from ..runtime.checkpoint_files import rng_state, save_file
from ..tp.checkpoint import whole_state


def _layer_file(idx):
    return f"layer_{idx:02d}-model_states.pt"


def _everyone(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _without(opt_state, names, skip):
    """The optimizer state_dict's tensors without the pieces of parameters in
    `skip`, its slice table re-indexed by `names` (the global parameter index)."""
    own_names = opt_state["param_names"]
    keys = ["master", *opt_state["state_names"]]
    rows, kept = [], {k: [] for k in keys}
    cursor = 0
    for param_index, first, length in opt_state["slices"].tolist():
        name = own_names[param_index]
        if name not in skip:
            rows.append((names[name], first, length))
            for k in keys:
                kept[k].append(opt_state[k][cursor:cursor + length])
        cursor += length
    out = {k: torch.cat(v) if v else torch.zeros(0) for k, v in kept.items()}
    out["slices"] = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)
    return out


def save_pipeline_checkpoint(engine, save_dir, tag, client_state, save_latest=True, exclude_frozen_parameters=False):
    client_json, client_tensors = client_codec.encode(client_state)
    grid, module, opt = engine.grid, engine.module, engine.optimizer
    rank, writes_layers = grid.global_rank, grid.data_parallel_id == 0
    tag, final, partial = begin_save(engine, save_dir, tag, creates=rank == 0)

    # The whole model's parameter table and key order, from every stage in stage order
    # (tensor-parallel slices under their whole shapes, with how they are cut).
    table, order = _param_table(engine)
    names, keys, params = [], {}, {}
    for their_table, their_order in _everyone((table, order)):
        for entry in their_table:
            if entry["name"] not in params:
                params[entry["name"]] = entry
                names.append(entry["name"])
        keys.update(dict.fromkeys(their_order))  # insertion-ordered, each key once
    index = {name: i for i, name in enumerate(names)}

    opt_state = opt.state_dict()
    not_primary = {id(p) for p in module.tied_copies_not_primary()}
    skip = {name for name, p in opt.named_trainable_parameters() if id(p) in not_primary}
    shard = None
    if opt.partition_world > 1 or writes_layers:  # ZeRO-0: data-parallel rank 0 writes the stage's state
        shard = _shard_name(rank)
        save_file(_without(opt_state, index, skip), os.path.join(partial, shard))
    save_file(rng_state(), os.path.join(partial, _rng_name(rank)))
    layer_files = []
    if writes_layers:  # data-parallel rank 0 of the stage; with tensor parallelism its group gathers, rank 0 writes
        frozen = {id(p) for p in module.parameters() if not p.requires_grad} if exclude_frozen_parameters else set()
        for idx, prefix, layer in module.layer_modules():
            state = whole_state(layer.state_dict(keep_vars=True), engine.tp, frozen)
            if engine.tp is None or engine.tp.rank == 0:
                save_file(state, os.path.join(partial, _layer_file(idx)))
                layer_files.append({"file": _layer_file(idx), "prefix": prefix, "layer": idx})
    tp_rank = engine.tp.rank if engine.tp is not None else 0
    written = _everyone((shard, layer_files, tp_rank))
    engine._checkpoint_barrier()

    if rank == 0:
        manifest = common_manifest(engine, tag, opt_state, client_json, client_tensors)
        manifest.update({
            "world_size": grid.world_size,
            "shard_files": [s for s, _, _ in written if s is not None],
            "shard_tp_ranks": [t for s, _, t in written if s is not None],
            "rng_files": [_rng_name(r) for r in range(grid.world_size)],
            "params": [params[n] for n in names],
            "state_dict_keys": list(keys),
            "frozen_excluded": bool(exclude_frozen_parameters),
            "layer_files": sorted((f for _, files, _ in written for f in files), key=lambda f: f["layer"]),
            "pipeline": {"num_stages": engine.num_stages, "data_parallel_size": grid.data_parallel_size,
                         "parts": module.partitions()},
            "tensor_parallel": {"size": engine.tp.size} if engine.tp is not None else None,
        })
        publish(save_dir, tag, partial, manifest, save_latest, client_tensors)
    engine._checkpoint_barrier()
    return final
