"""Checkpoints: a directory per tag, written under a temporary name and renamed
when complete, so a crash never leaves a half checkpoint that looks whole.

    <save_dir>/latest                 the newest tag (written last)
    <save_dir>/<tag>/manifest.json    format, versions, world size, ZeRO stage, config, steps,
                                      loss-scaler and scheduler state, the parameter table
    <save_dir>/<tag>/model_states.pt  the model's state_dict as the model holds it
    <save_dir>/<tag>/zero_shard_<rank>.pt   one per rank: its pieces of every parameter's fp32
                                      master value and Adam moments, with a table of which pieces
    <save_dir>/<tag>/rng_<rank>.pt    the rank's random-number generator states

No pickled Python objects: every .pt file is tensors in dicts (torch.load with
weights_only=True reads it) and the rest is JSON. Optimizer pieces are named
by parameter, not by layout, so a checkpoint loads at any world size or ZeRO
stage (resharded on load) and consolidates into a plain fp32 state_dict.
"""
import json
import os
import random
import shutil
from collections import OrderedDict

import torch
import torch.distributed as dist

from .._version import __version__

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_STATES = "model_states.pt"
SHARD_KEYS = ("slices", "master", "exp_avg", "exp_avg_sq")  # a shard file: the optimizer state's tensors


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the model."""


def _shard_name(rank):
    return f"zero_shard_{rank:05d}.pt"


def _rng_name(rank):
    return f"rng_{rank:05d}.pt"


def _barrier(engine):
    if engine.placement.group is not None:
        dist.barrier(group=engine.placement.group)


def _save_file(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_file(path, mmap=False):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, bad magic, unexpected types...
        raise CheckpointError(f"checkpoint file {path} cannot be read ({type(e).__name__}: {e}); "
                              "the checkpoint is incomplete or corrupt") from None


def _rng_state():
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    state["python_version"] = torch.tensor(version)
    state["python_state"] = torch.tensor(internal, dtype=torch.int64)
    if gauss is not None:
        state["python_gauss"] = torch.tensor(gauss, dtype=torch.float64)
    try:
        import numpy as np
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy_state"] = torch.from_numpy(keys.astype("int64"))
        state["numpy_extra"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
        state["numpy_gauss"] = torch.tensor(cached, dtype=torch.float64)
    except ImportError:
        pass
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    gauss = float(state["python_gauss"]) if "python_gauss" in state else None
    random.setstate((int(state["python_version"]), tuple(int(x) for x in state["python_state"].tolist()), gauss))
    if "numpy_state" in state:
        import numpy as np
        pos, has_gauss = (int(x) for x in state["numpy_extra"].tolist())
        np.random.set_state(("MT19937", state["numpy_state"].numpy().astype("uint32"), pos, has_gauss,
                             float(state["numpy_gauss"])))


def _param_table(engine):
    """Trainable parameters in the optimizer's order, each with every state_dict
    key that names it (tied weights have several)."""
    trainable = engine.optimizer.named_trainable_parameters()
    index_of = {id(p): i for i, (_, p) in enumerate(trainable)}
    table = [{"name": name, "shape": list(p.shape), "keys": []} for name, p in trainable]
    order = []
    for key, value in engine.module.state_dict(keep_vars=True).items():
        i = index_of.get(id(value))
        if i is not None:
            table[i]["keys"].append(key)
        order.append(key)
    return table, order


# --- save -------------------------------------------------------------------------------------------


def save_checkpoint(engine, save_dir, tag, client_state, save_latest=True):
    try:
        json.dumps(client_state)
    except TypeError as e:
        raise TypeError(f"save_checkpoint: 'client_state' must be JSON-serializable (checkpoints hold no pickled "
                        f"objects): {e}") from None
    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    if not tag or "/" in tag or tag.startswith("."):
        raise ValueError(f"save_checkpoint: 'tag' must be a plain directory name, got {tag!r}")
    opt = engine.optimizer
    rank, world = engine.placement.rank, engine.placement.world_size
    final = os.path.join(save_dir, tag)
    partial = os.path.join(save_dir, f".{tag}.partial")
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # a save that died earlier
        os.makedirs(partial)
    _barrier(engine)

    # Each rank: its optimizer pieces (ZeRO-0 ranks hold the same state: rank 0 writes it) and RNG.
    opt_state = opt.state_dict()
    if opt.partition_world > 1 or rank == 0:
        _save_file({k: opt_state[k] for k in SHARD_KEYS}, os.path.join(partial, _shard_name(rank)))
    _save_file(_rng_state(), os.path.join(partial, _rng_name(rank)))
    if rank == 0:
        states = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
        _save_file(states, os.path.join(partial, MODEL_STATES))
    _barrier(engine)

    if rank == 0:
        table, order = _param_table(engine)
        manifest = {
            "format_version": FORMAT_VERSION,
            "zerofuse_version": __version__,
            "tag": tag,
            "world_size": world,
            "zero_stage": engine.config.zero.stage,
            "shard_files": [_shard_name(r) for r in range(world if opt.partition_world > 1 else 1)],
            "rng_files": [_rng_name(r) for r in range(world)],
            "model_dtype": str(engine.model_dtype).replace("torch.", ""),
            "config": engine.config.to_dict(),
            "global_steps": engine.global_steps,
            "skipped_steps": engine.skipped_steps,
            "micro_steps": engine.micro_steps,
            "progress": engine.progress.state_dict(),
            "step_state": opt_state["step_control"],
            "optimizer_param_groups": opt_state["param_groups"],
            "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
            "params": table,
            "state_dict_keys": order,
            "client_state": client_state,
        }
        _write_text(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1))
        # Swap the complete directory in, then point `latest` at it.
        old = os.path.join(save_dir, f".{tag}.old")
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
        if save_latest:
            _write_text(os.path.join(save_dir, "latest"), tag)
    _barrier(engine)
    return final


# --- load ---------------------------------------------------------------------------------------------


def read_manifest(load_dir, tag=None):
    """(checkpoint directory, manifest) for `tag` (default: the one `latest` names)."""
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        if not os.path.isfile(latest):
            raise CheckpointError(f"{load_dir}: no 'latest' file; pass the tag to load")
        with open(latest) as f:
            tag = f.read().strip()
    path = os.path.join(load_dir, str(tag))
    old = os.path.join(load_dir, f".{tag}.old")
    if not os.path.isdir(path) and os.path.isfile(os.path.join(old, MANIFEST)):
        path = old  # a re-save of this tag died between moving the old one aside and renaming the new one in
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


def _iter_pieces(path, manifest):
    """(name, first element, values dict of 1-D fp32 tensors) for every saved piece, one shard
    file at a time (memory-mapped: a file is not read whole)."""
    names = [p["name"] for p in manifest["params"]]
    for shard in manifest["shard_files"]:
        data = _load_file(os.path.join(path, shard), mmap=True)
        for key in SHARD_KEYS:
            if key not in data:
                raise CheckpointError(f"{os.path.join(path, shard)} lacks '{key}'; the checkpoint is corrupt")
        cursor = 0
        for param_index, first, length in data["slices"].tolist():
            if not 0 <= param_index < len(names) or cursor + length > data["master"].numel():
                raise CheckpointError(f"{os.path.join(path, shard)}: its slice table does not match its data")
            piece = slice(cursor, cursor + length)
            yield names[param_index], first, {k: data[k][piece] for k in ("master", "exp_avg", "exp_avg_sq")}
            cursor += length


def load_checkpoint(engine, load_dir, tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                    load_module_only=False):
    path, manifest = read_manifest(load_dir, tag)
    opt = engine.optimizer
    saved = {p["name"]: p for p in manifest["params"]}
    mine = dict(opt.named_trainable_parameters())
    if set(saved) != set(mine):
        missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
        raise CheckpointError(f"{path}: trainable parameters differ from the model's: missing from the checkpoint "
                              f"{missing[:5]}, not in the model {extra[:5]}")
    for name, param in mine.items():
        if list(param.shape) != saved[name]["shape"]:
            raise CheckpointError(f"{path}: parameter {name!r} has shape {saved[name]['shape']} in the checkpoint "
                                  f"but {list(param.shape)} in the model")

    states = _load_file(os.path.join(path, MODEL_STATES))
    with torch.no_grad():
        own = engine.module.state_dict()
        result = engine.module.load_state_dict(
            {k: v.to(own[k].dtype) if k in own else v for k, v in states.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: model state does not fit the model: missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")

    if load_module_only or not load_optimizer_states:
        opt.reset_from_params()
    else:
        opt_state = _pieces_for(opt.owned_pieces(), path, manifest)
        opt_state["step_control"] = manifest["step_state"]
        opt_state["param_groups"] = manifest.get("optimizer_param_groups")
        opt.load_state_dict(opt_state)
        engine.progress.load_state_dict(manifest.get("progress") or _progress_of_format1(manifest))
        if load_lr_scheduler_states and engine.lr_scheduler is not None and manifest.get("scheduler") is not None:
            engine.lr_scheduler.load_state_dict(manifest["scheduler"])
        rng_files = manifest["rng_files"]
        _set_rng_state(_load_file(os.path.join(path, rng_files[engine.placement.rank % len(rng_files)])))
        engine.monitor.resume(engine.global_samples)
    _barrier(engine)
    return path, manifest.get("client_state", {})


def _progress_of_format1(manifest):
    """Checkpoints written before the progress entry existed: derived from the step counts."""
    applied, skipped = int(manifest["step_state"]["applied_steps"]), int(manifest["step_state"]["skipped_steps"])
    return {"optimizer_steps": applied + skipped, "scheduler_steps": applied, "skipped_reported": skipped}


def _pieces_for(wanted, path, manifest):
    """The resharding: values of the pieces `wanted` ([(name, first, length)],
    one rank's owned pieces, any world size or stage) assembled in that order
    from whichever saved pieces overlap them."""
    total = sum(w.length for w in wanted)
    out = {k: torch.empty(total, dtype=torch.float32) for k in ("master", "exp_avg", "exp_avg_sq")}
    covered = torch.zeros(total, dtype=torch.int32)
    by_name = {}  # name -> [(first, length, position in out)]
    cursor = 0
    for w in wanted:
        by_name.setdefault(w.name, []).append((w.first, w.length, cursor))
        cursor += w.length
    for name, first, values in _iter_pieces(path, manifest):
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


# --- consolidation ----------------------------------------------------------------------------------------


def to_fp32_state_dict(load_dir, tag=None):
    """The model's state_dict with every trainable parameter at its fp32 master
    value (and other floating tensors as float32), loadable into the plain
    PyTorch model. Reads the shard files one at a time, memory-mapped."""
    path, manifest = read_manifest(load_dir, tag)
    states = _load_file(os.path.join(path, MODEL_STATES), mmap=True)
    params = {p["name"]: torch.empty(p["shape"], dtype=torch.float32) for p in manifest["params"]}
    filled = {name: 0 for name in params}
    for name, first, values in _iter_pieces(path, manifest):
        flat = params[name].view(-1)
        flat[first:first + values["master"].numel()] = values["master"]
        filled[name] += values["master"].numel()
    for name, t in params.items():
        if filled[name] != t.numel():
            raise CheckpointError(f"{path}: the shards hold {filled[name]} of {t.numel()} values of {name!r}")
    key_to_param = {key: p["name"] for p in manifest["params"] for key in p["keys"]}
    out = OrderedDict()
    for key in manifest["state_dict_keys"]:
        if key in key_to_param:
            out[key] = params[key_to_param[key]]  # tied weights share one tensor, as in the model
        else:
            if key not in states:
                raise CheckpointError(f"{path}: {MODEL_STATES} lacks {key!r}")
            value = states[key]
            out[key] = value.float() if value.is_floating_point() else value.clone()
    return out
