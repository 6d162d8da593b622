"""Checkpoints: a directory per tag, written under a temporary name and renamed
when complete, so a crash never leaves a half checkpoint that looks whole.

    <save_dir>/latest                 the newest tag (written last)
    <save_dir>/<tag>/manifest.json    format, versions, world size, ZeRO stage, config, steps,
                                      step-control, progress and scheduler state, the parameter
                                      table, client_state (its plain values)
    <save_dir>/<tag>/model_states.pt  the model's state_dict as the model holds it
    <save_dir>/<tag>/zero_shard_<rank>.pt   one per rank: its pieces of every parameter's fp32
                                      master value and optimizer state, with a table of which pieces
    <save_dir>/<tag>/rng_<rank>.pt    the rank's random-number generator states
    <save_dir>/<tag>/client_state.pt  the tensors and arrays of client_state (when it has any)

No pickled Python objects: every .pt file is tensors in dicts (torch.load with
weights_only=True reads it) and the rest is JSON. Optimizer pieces are named
by parameter, not by layout, so a checkpoint loads at any world size or ZeRO
stage (resharded on load) and consolidates into a plain fp32 state_dict.
The components (optimizer, step control, progress, scheduler) give and take
their own state; this module arranges files and reshards.
"""
import json
import os
import shutil
import warnings
from collections import OrderedDict

import torch

from .._version import __version__
from . import client_state as client_codec
from .checkpoint_files import CheckpointError, load_file, rng_state, save_file, set_rng_state, write_text

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_STATES = "model_states.pt"
CLIENT_TENSORS = "client_state.pt"
ADAM_STATE = ("exp_avg", "exp_avg_sq")  # what a manifest without "state_names" holds

__all__ = ["CheckpointError", "load_checkpoint", "read_manifest", "save_checkpoint", "save_model_weights",
           "to_fp32_state_dict"]


def _shard_name(rank):
    return f"zero_shard_{rank:05d}.pt"


def _rng_name(rank):
    return f"rng_{rank:05d}.pt"


def _barrier(engine):
    """Every rank that writes or reads this checkpoint (the pipeline engine: all stages)."""
    engine._checkpoint_barrier()


def _param_table(engine):
    """Trainable parameters in the optimizer's order, each with every state_dict
    key that names it (tied weights have several). With tensor parallelism a
    split parameter is listed by its whole shape, with how its slices are cut."""
    trainable = engine.optimizer.named_trainable_parameters()
    index_of = {id(p): i for i, (_, p) in enumerate(trainable)}
    table = []
    for name, p in trainable:
        spec = getattr(p, "tp_whole", None) if engine.tp is not None else None
        entry = {"name": name, "shape": list(full_shape(p) if spec is None else spec.shape), "keys": []}
        if spec is not None:
            entry["tp"] = spec.to_json()
        table.append(entry)
    order = []
    for key, value in engine.module.state_dict(keep_vars=True).items():
        i = index_of.get(id(value))
        if i is not None:
            table[i]["keys"].append(key)
        order.append(key)
    return table, order


# --- save -------------------------------------------------------------------------------------------


def full_shape(param):
    """A parameter's shape, partitioned (ZeRO-3, zero.Init) or not."""
    return getattr(param, "ds_shape", None) or param.shape


def whole_shape(param):
    """The shape in the whole model: a tensor-parallel slice's whole parameter, else full_shape."""
    spec = getattr(param, "tp_whole", None)
    return spec.shape if spec is not None else full_shape(param)


def _model_states(engine, exclude_frozen_parameters, clone=False):
    """The model's state_dict on the CPU, on rank 0 (None elsewhere). ZeRO-3
    gathers it one module at a time, and every rank must call this."""
    if engine.partitioned is not None:
        return engine.partitioned.consolidated_state_dict(keep=engine.placement.is_main,
                                                          exclude_frozen_parameters=exclude_frozen_parameters)
    if not engine.placement.is_main:
        return None
    state = engine.module_state_dict(exclude_frozen_parameters=exclude_frozen_parameters)
    return OrderedDict((k, v.detach().cpu().clone() if clone else v.detach().cpu()) for k, v in state.items())


def save_checkpoint(engine, save_dir, tag, client_state, save_latest=True, exclude_frozen_parameters=False):
    client_json, client_tensors = client_codec.encode(client_state)
    opt = engine.optimizer
    rank, world = engine.placement.rank, engine.placement.world_size
    tag, final, partial = begin_save(engine, save_dir, tag, rank == 0)

    # Each rank: its optimizer pieces (ZeRO-0 ranks hold the same state: rank 0 writes it) and RNG.
    opt_state = opt.state_dict()
    tensor_keys = ["slices", "master", *opt_state["state_names"]]
    if opt.partition_world > 1 or rank == 0:
        save_file({k: opt_state[k] for k in tensor_keys}, os.path.join(partial, _shard_name(rank)))
    save_file(rng_state(), os.path.join(partial, _rng_name(rank)))
    states = _model_states(engine, exclude_frozen_parameters)  # ZeRO-3: every rank takes part
    if rank == 0:
        save_file(states, os.path.join(partial, MODEL_STATES))
    _barrier(engine)

    if rank == 0:
        table, order = _param_table(engine)
        manifest = common_manifest(engine, tag, opt_state, client_json, client_tensors)
        manifest.update({
            "world_size": world,
            "shard_files": [_shard_name(r) for r in range(world if opt.partition_world > 1 else 1)],
            "rng_files": [_rng_name(r) for r in range(world)],
            "params": table,
            "state_dict_keys": order,
            "frozen_excluded": bool(exclude_frozen_parameters),
        })
        publish(save_dir, tag, partial, manifest, save_latest, client_tensors)
    _barrier(engine)
    return final


def common_manifest(engine, tag, opt_state, client_json, client_tensors) -> dict:
    """The manifest entries every checkpoint has, whatever its layout (the
    layout's own -- files, parameter table, key order -- are added by the caller)."""
    return {
            "format_version": FORMAT_VERSION,
            "zerofuse_version": __version__,
            "tag": tag,
            "zero_stage": engine.zero_optimization_stage(),
            "model_dtype": str(engine.model_dtype).replace("torch.", ""),
            "config": engine._config.to_dict(),
            "global_steps": engine.global_steps,
            "skipped_steps": engine.skipped_steps,
            "micro_steps": engine.micro_steps,
            "progress": engine.progress.state_dict(),
            "step_state": opt_state["step_control"],
            "optimizer": engine.optimizer_name(),
            "state_names": opt_state["state_names"],
            "optimizer_param_groups": opt_state["param_groups"],
            "optimizer_scalar_state": opt_state["scalar_state"],
            "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
            "client_state": client_json,
            "client_tensors": CLIENT_TENSORS if client_tensors else None,
    }


def publish(save_dir, tag, partial, manifest, save_latest, client_tensors=()):
    """Write client_state's tensors and the manifest into the complete
    `partial` directory, swap it in as `tag`, then point `latest` at it (rank
    0, after every rank wrote its files)."""
    if client_tensors:
        save_file({str(i): t for i, t in enumerate(client_tensors)}, os.path.join(partial, CLIENT_TENSORS))
    final = os.path.join(save_dir, tag)
    write_text(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1))
    old = os.path.join(save_dir, f".{tag}.old")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)
    if save_latest:
        write_text(os.path.join(save_dir, "latest"), tag)


def begin_save(engine, save_dir, tag, creates: bool):
    """(tag, final directory, partial directory): the directory every rank
    writes into, made fresh by the rank that `creates` it."""
    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    if not tag or "/" in tag or tag.startswith("."):
        raise ValueError(f"save_checkpoint: 'tag' must be a plain directory name, got {tag!r}")
    partial = os.path.join(save_dir, f".{tag}.partial")
    if creates:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # a save that died earlier
        os.makedirs(partial)
    _barrier(engine)
    return tag, os.path.join(save_dir, tag), partial


def save_model_weights(engine, save_dir, filename, exclude_frozen_parameters=False):
    """The model's state_dict in its training dtype, from rank 0, written
    under a temporary name and renamed."""
    if not filename or os.sep in filename:
        raise ValueError(f"save_16bit_model: 'save_filename' must be a file name, got {filename!r}")
    state = engine.whole_model_state(exclude_frozen_parameters)  # a collective; None except on the writer
    if state is not None:
        os.makedirs(save_dir, exist_ok=True)
        save_file(state, os.path.join(save_dir, filename))
    _barrier(engine)


# --- load ---------------------------------------------------------------------------------------------


def _find(load_dir, tag):
    """The checkpoint directory for `tag` (default: the one `latest` names), or
    None when there is no checkpoint there at all."""
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            tag = f.read().strip()
    path = os.path.join(load_dir, str(tag))
    old = os.path.join(load_dir, f".{tag}.old")
    if not os.path.isdir(path) and os.path.isfile(os.path.join(old, MANIFEST)):
        path = old  # a re-save of this tag died between moving the old one aside and renaming the new one in
    return path if os.path.isdir(path) else None


def read_manifest(load_dir, tag=None):
    """(checkpoint directory, manifest) for `tag` (default: the one `latest` names)."""
    path = _find(load_dir, tag)
    if path is None:
        what = f"no checkpoint tagged {tag!r}" if tag is not None else "no 'latest' file; pass the tag to load"
        raise CheckpointError(f"{load_dir}: {what}")
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{path}: no {MANIFEST}; not a zerofuse checkpoint, or an incomplete one")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{manifest_path} cannot be read ({e}); the checkpoint is corrupt") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('format_version')} is not "
                              f"{FORMAT_VERSION}, which this zerofuse ({__version__}) reads")
    return path, manifest


def read_model_states(path, manifest, mmap=False) -> "OrderedDict[str, torch.Tensor]":
    """The whole model's state_dict as saved: one file, or (pipeline
    checkpoints) one file per layer, its keys relative to the layer and the
    manifest giving each file's key prefix."""
    layer_files = manifest.get("layer_files")
    if layer_files is None:
        return load_file(os.path.join(path, MODEL_STATES), mmap=mmap)
    out = OrderedDict()
    for entry in layer_files:
        for key, value in load_file(os.path.join(path, entry["file"]), mmap=mmap).items():
            out[entry["prefix"] + key] = value
    return out


def _state_names(manifest):
    return list(manifest.get("state_names", ADAM_STATE))


def _iter_pieces(path, manifest, names=None):
    """(name, first element, values dict of 1-D fp32 tensors) for every saved piece, one shard
    file at a time (memory-mapped: a file is not read whole)."""
    params = [p["name"] for p in manifest["params"]]
    names = ["master", *_state_names(manifest)] if names is None else names
    for shard in manifest["shard_files"]:
        data = load_file(os.path.join(path, shard), mmap=True)
        for key in ["slices", *names]:
            if key not in data:
                raise CheckpointError(f"{os.path.join(path, shard)} lacks '{key}'; the checkpoint is corrupt")
        cursor = 0
        for param_index, first, length in data["slices"].tolist():
            if not 0 <= param_index < len(params) or cursor + length > data["master"].numel():
                raise CheckpointError(f"{os.path.join(path, shard)}: its slice table does not match its data")
            piece = slice(cursor, cursor + length)
            yield params[param_index], first, {k: data[k][piece] for k in names}
            cursor += length


def _client_state(path, manifest):
    tensors = []
    if manifest.get("client_tensors"):
        stored = load_file(os.path.join(path, manifest["client_tensors"]))
        tensors = [stored[str(i)] for i in range(len(stored))]
    return client_codec.decode(manifest.get("client_state", {}), tensors)


def load_checkpoint(engine, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                    load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
    if _find(load_dir, tag) is None:
        warnings.warn(f"load_checkpoint: {load_dir} holds no checkpoint"
                      f"{f' tagged {tag!r}' if tag is not None else ' (no latest file)'}; nothing was loaded",
                      stacklevel=3)
        return None, None
    path, manifest = read_manifest(load_dir, tag)
    opt = engine.optimizer
    saved = {p["name"]: p for p in manifest["params"]}
    mine = dict(opt.named_trainable_parameters())
    for name, param in mine.items():
        if name in saved and list(whole_shape(param)) != saved[name]["shape"]:
            raise CheckpointError(f"{path}: parameter {name!r} has shape {saved[name]['shape']} in the checkpoint "
                                  f"but {list(whole_shape(param))} in the model")

    states = read_model_states(path, manifest)
    strict = load_module_strict and not manifest.get("frozen_excluded")
    with torch.no_grad():
        states = _localized(engine, states)  # tensor parallelism: this rank's slices of the whole tensors
        own = engine.module.state_dict()
        if engine.holds_part_of_model:  # a pipeline stage: the other stages' layers are theirs to load
            states = OrderedDict((k, v) for k, v in states.items() if k in own)
        cast = {k: v.to(own[k].dtype) if k in own else v for k, v in states.items()}
        if engine.partitioned is not None:
            result = engine.load_module_state_dict(cast, strict=False, custom_load_fn=custom_load_fn)
        elif custom_load_fn is not None:
            custom_load_fn(src=cast, dst=engine.module)
            result = None
        else:
            result = engine.module.load_state_dict(cast, strict=False)
        if result is not None:
            if strict and (result.missing_keys or result.unexpected_keys):
                raise CheckpointError(f"{path}: model state does not fit the model: missing "
                                      f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]} (pass "
                                      "load_module_strict=False to load what fits)")

    if load_module_only or not load_optimizer_states:
        opt.reset_from_params()
    else:
        extra = set() if engine.holds_part_of_model else set(saved) - set(mine)
        if set(mine) - set(saved) or extra:
            missing, extra = sorted(set(mine) - set(saved)), sorted(extra)
            raise CheckpointError(f"{path}: trainable parameters differ from the model's: missing from the "
                                  f"checkpoint {missing[:5]}, not in the model {extra[:5]} (pass "
                                  "load_optimizer_states=False to load the weights alone)")
        needed = getattr(opt.rule, "state_names", ())
        names = _state_names(manifest)
        if any(n not in names for n in needed):
            raise CheckpointError(f"{path}: holds the state of optimizer {manifest.get('optimizer')!r} "
                                  f"({', '.join(names) or 'none'}), not the {', '.join(needed)} this optimizer "
                                  "needs; pass load_optimizer_states=False to start the optimizer afresh")
        if manifest.get("tensor_parallel") or engine.tp is not None:
            opt_state = _tensor_parallel_pieces_for(engine, opt.owned_pieces(), path, manifest, names)
        else:
            opt_state = _pieces_for(opt.owned_pieces(), path, manifest, names)
        opt_state.update(state_names=names, step_control=manifest["step_state"],
                         param_groups=manifest.get("optimizer_param_groups"),
                         scalar_state=manifest.get("optimizer_scalar_state"))
        opt.load_state_dict(opt_state)
        engine.progress.load_state_dict(manifest.get("progress") or _progress_of_format1(manifest))
        if load_lr_scheduler_states and engine.lr_scheduler is not None and manifest.get("scheduler") is not None:
            engine.lr_scheduler.load_state_dict(manifest["scheduler"])
        rng_files = manifest["rng_files"]  # none in a checkpoint imported from DeepSpeed
        if rng_files:
            set_rng_state(load_file(os.path.join(path, rng_files[engine._file_rank % len(rng_files)])))
        engine.monitor.resume(engine.global_samples)
    _barrier(engine)
    return path, _client_state(path, manifest)


def _progress_of_format1(manifest):
    """Checkpoints written before the progress entry existed: derived from the step counts."""
    applied, skipped = int(manifest["step_state"]["applied_steps"]), int(manifest["step_state"]["skipped_steps"])
    return {"optimizer_steps": applied + skipped, "scheduler_steps": applied, "skipped_reported": skipped}


def _pieces_for(wanted, path, manifest, state_names):
    """The resharding: values of the pieces `wanted` ([(name, first, length)],
    one rank's owned pieces, any world size or stage) assembled in that order
    from whichever saved pieces overlap them."""
    names = ["master", *state_names]
    total = sum(w.length for w in wanted)
    out = {k: torch.empty(total, dtype=torch.float32) for k in names}
    covered = torch.zeros(total, dtype=torch.int32)
    by_name = {}  # name -> [(first, length, position in out)]
    cursor = 0
    for w in wanted:
        by_name.setdefault(w.name, []).append((w.first, w.length, cursor))
        cursor += w.length
    for name, first, values in _iter_pieces(path, manifest, names):
        length = values["master"].numel()
        for w_first, w_length, w_pos in by_name.get(name, ()):
            lo, hi = max(first, w_first), min(first + length, w_first + w_length)
            if lo >= hi:
                continue
            dst = slice(w_pos + lo - w_first, w_pos + hi - w_first)
            src = slice(lo - first, hi - first)
            for k in out:
                out[k][dst] = values[k][src]
            covered[dst] += 1
    if total and int(covered.min()) != 1:
        raise CheckpointError(f"{path}: the optimizer shards do not cover every parameter exactly once "
                              "(a shard file is missing or from another checkpoint)")
    return out


# --- tensor parallelism: whole parameters from slices ----------------------------------------------------------


def _localized(engine, states):
    """Whole tensors of the checkpoint's model state cut to this rank's slices."""
    if engine.tp is None:
        return states
    from ..tp.whole import local_from_whole
    slices = {}
    for key, value in engine.module.state_dict(keep_vars=True).items():
        spec = getattr(value, "tp_whole", None)
        if spec is not None and key in states:
            slices[key] = local_from_whole(states[key], spec, engine.tp.rank, engine.tp.size)
    return OrderedDict((k, slices.get(k, v)) for k, v in states.items())


def _iter_pieces_by_file(path, manifest, names):
    """(tensor-parallel rank of the writer, name, first, values) for every saved piece."""
    tp_ranks = manifest.get("shard_tp_ranks") or [0] * len(manifest["shard_files"])
    for shard, tp_rank in zip(manifest["shard_files"], tp_ranks):
        for name, first, values in _iter_pieces(path, dict(manifest, shard_files=[shard]), names):
            yield tp_rank, name, first, values


def whole_values(path, manifest, wanted_names, names):
    """{name: {state name: the whole parameter's fp32 values}} for wanted_names,
    assembled from every tensor-parallel rank's slices (a checkpoint without
    tensor parallelism is one rank of one)."""
    from ..tp.whole import WholeSpec, local_from_whole, whole_from_locals
    size = (manifest.get("tensor_parallel") or {}).get("size", 1)
    table = {p["name"]: p for p in manifest["params"]}
    specs = {n: WholeSpec.from_json(table[n]["tp"]) for n in wanted_names if table[n].get("tp")}
    local_shape = {n: tuple(local_from_whole(torch.empty(table[n]["shape"], device="meta"), specs[n], 0, size).shape)
                   if n in specs else tuple(table[n]["shape"]) for n in wanted_names}
    buffers, covered = {}, {}
    for tp_rank, name, first, values in _iter_pieces_by_file(path, manifest, names):
        if name not in wanted_names or (name not in specs and tp_rank != 0):
            continue  # a replicated parameter: every tensor-parallel rank saved the same values
        key = (name, tp_rank)
        numel = int(torch.Size(local_shape[name]).numel())
        if key not in buffers:
            buffers[key] = {k: torch.empty(numel, dtype=torch.float32) for k in names}
            covered[key] = torch.zeros(numel, dtype=torch.int32)
        length = values["master"].numel()
        for k in names:
            buffers[key][k][first:first + length] = values[k]
        covered[key][first:first + length] += 1
    out = {}
    for name in wanted_names:
        ranks = range(size) if name in specs else range(1)
        for t in ranks:
            if (name, t) not in covered or int(covered[(name, t)].min()) != 1:
                raise CheckpointError(f"{path}: the optimizer shards do not cover {name!r} (tensor-parallel rank "
                                      f"{t}) exactly once (a shard file is missing or from another checkpoint)")
        out[name] = {k: (whole_from_locals([buffers[(name, t)][k].view(local_shape[name]) for t in ranks], specs[name])
                         if name in specs else buffers[(name, 0)][k].view(local_shape[name])) for k in names}
    return out


def _tensor_parallel_pieces_for(engine, wanted, path, manifest, state_names):
    """_pieces_for through whole parameters: the saved slices of any tensor-
    parallel size put together, then cut to this rank's slice (or kept whole)."""
    from ..tp.whole import local_from_whole
    names = ["master", *state_names]
    params = dict(engine.optimizer.named_trainable_parameters())
    whole = whole_values(path, manifest, {w.name for w in wanted}, names)
    out = {k: [] for k in names}
    for w in wanted:
        spec = getattr(params[w.name], "tp_whole", None)
        for k in names:
            value = whole[w.name][k]
            if spec is not None and engine.tp is not None:
                value = local_from_whole(value, spec, engine.tp.rank, engine.tp.size)
            out[k].append(value.reshape(-1)[w.first:w.first + w.length])
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}


# --- consolidation ----------------------------------------------------------------------------------------


def to_fp32_state_dict(load_dir, tag=None):
    """The model's state_dict with every trainable parameter at its fp32 master
    value (and other floating tensors as float32), loadable into the plain
    PyTorch model. Reads the shard files one at a time, memory-mapped."""
    path, manifest = read_manifest(load_dir, tag)
    states = read_model_states(path, manifest, mmap=True)
    # Every parameter put together from its pieces (and, with tensor parallelism, its ranks' slices).
    whole = whole_values(path, manifest, {p["name"] for p in manifest["params"]}, ["master"])
    params = {name: values["master"] for name, values in whole.items()}
    key_to_param = {key: p["name"] for p in manifest["params"] for key in p["keys"]}
    out = OrderedDict()
    for key in manifest["state_dict_keys"]:
        if key in key_to_param:
            out[key] = params[key_to_param[key]]  # tied weights share one tensor, as in the model
        else:
            if key not in states:
                if manifest.get("frozen_excluded"):
                    continue  # saved with exclude_frozen_parameters
                raise CheckpointError(f"{path}: the model states lack {key!r}")
            value = states[key]
            out[key] = value.float() if value.is_floating_point() else value.clone()
    return out
