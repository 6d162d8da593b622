"""zerofuse.checkpoint.import_deepspeed: a checkpoint written by DeepSpeed
itself (ZeRO stage 0, 1 or 2) converted to a zerofuse checkpoint, which then
loads like any other (any world size and stage) and consolidates.

DeepSpeed's files are pickles, so reading them runs code from the file: the
conversion happens only with trust_pickle=True, once, offline; what it writes
is pickle-free. DeepSpeed itself need not be installed: its pickled
classes (loss scaler, ZeRO stage enum, fragment addresses) are read into
plain stand-ins.

What is carried over: the model's weights; the fp32 master weights and Adam
moments (ZeRO-1/2: reassembled from every rank's flat partition by the
parameter fragments DeepSpeed records; ZeRO-0: the optimizer's per-parameter
state and, in fp16/bf16, its fp32 groups); the step counts, loss scale and
learning-rate schedule state; the client state (DeepSpeed stores it among its
own keys). Not carried: the random-number states (DeepSpeed does not save
them either).
"""
import glob
import json
import os
import pickle
import re
import shutil

import torch

from .._version import __version__
from . import client_state as client_codec
from .checkpoint_files import CheckpointError, save_file, write_text

# Keys DeepSpeed writes into mp_rank_*_model_states.pt; the rest is client_state.
_DEEPSPEED_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                   "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
                   "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
                   "checkpoint_parallel_dimensions", "ds_config", "ds_version"}


class _StandIn:
    """Any DeepSpeed class in the pickle: keeps its constructor arguments and state."""

    def __init__(self, *args, **kwargs):
        self.args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    def __int__(self):  # ZeroStageEnum(2) -> 2
        return int(self.args[0])


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "deepspeed" or module.startswith("deepspeed."):
            return type(name, (_StandIn,), {})
        return super().find_class(module, name)


class _PickleModule:
    Unpickler = _Unpickler
    load = staticmethod(lambda f, **kw: _Unpickler(f, **kw).load())
    __name__ = "zerofuse_deepspeed_pickle"


def _load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PickleModule)
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read as a DeepSpeed checkpoint file ({type(e).__name__}: {e})") from None


def _tag_dir(ds_dir, tag):
    if tag is None:
        latest = os.path.join(ds_dir, "latest")
        if not os.path.isfile(latest):
            raise CheckpointError(f"{ds_dir}: no 'latest' file; pass the tag to import")
        with open(latest) as f:
            tag = f.read().strip()
    path = os.path.join(ds_dir, str(tag))
    if not os.path.isdir(path):
        raise CheckpointError(f"{ds_dir}: no checkpoint tagged {tag!r}")
    return path, str(tag)


def _rank_of(path):
    match = re.search(r"zero_pp_rank_(\d+)_", os.path.basename(path))
    return int(match.group(1)) if match else -1


def _unique_params(module_states, buffer_names):
    """(name, tensor) of the saved parameters, tied ones once, in state_dict order."""
    seen, out = set(), []
    for name, value in module_states.items():
        if name in buffer_names or not isinstance(value, torch.Tensor):
            continue
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if key in seen:
            continue
        seen.add(key)
        out.append((name, value))
    return out


def _zero12_pieces(files, param_shapes):
    """{name: {"master", "exp_avg", "exp_avg_sq"} fp32 tensors} from every
    rank's flat partitions, placed by DeepSpeed's fragment addresses."""
    optims = [_load(f)["optimizer_state_dict"] for f in files]
    out = {}
    for g, shapes in enumerate(param_shapes):
        parts = [o["single_partition_of_fp32_groups"][g] for o in optims]
        size = max(p.numel() for p in parts)  # the last rank's lacks its padding
        states = [o["base_optimizer_state"]["state"].get(g, {}) for o in optims]
        flat = {"master": torch.cat([torch.nn.functional.pad(p.float(), (0, size - p.numel())) for p in parts])}
        for key in ("exp_avg", "exp_avg_sq"):
            if all(key in s for s in states):
                flat[key] = torch.cat([torch.nn.functional.pad(s[key].float(), (0, size - s[key].numel()))
                                       for s in states])
        # Where each parameter starts in the group's flat buffer: its lowest fragment.
        starts = {}
        for r, o in enumerate(optims):
            for name, frag in o["param_slice_mappings"][g].items():
                starts[name] = min(starts.get(name, float("inf")), r * size + int(frag.start))
        for name, shape in shapes.items():
            numel = int(torch.Size(shape).numel())
            begin = starts.get(name)
            if begin is None:
                raise CheckpointError(f"the optimizer partitions hold no piece of {name!r}")
            out[name] = {k: v[begin:begin + numel].reshape(shape).clone() for k, v in flat.items()}
    step = optims[0]["base_optimizer_state"]["state"].get(0, {}).get("step")
    scaler = optims[0].get("loss_scaler")
    return out, step, getattr(scaler, "cur_scale", 1.0)


def _zero0_pieces(optimizer, params):
    """{name: {...}} from a stage-0 optimizer state: torch's own, or DeepSpeed's
    fp16/bf16 wrapper around it (with the fp32 master groups)."""
    inner = optimizer.get("optimizer_state_dict", optimizer)
    masters = [t for group in optimizer.get("fp32_groups", []) for t in group]
    state = inner.get("state", {})
    order = [i for group in inner.get("param_groups", []) for i in group["params"]]
    if len(order) != len(params):
        raise CheckpointError(f"the optimizer holds {len(order)} parameters, the model states {len(params)}")
    out = {}
    for position, ((name, weight), index) in enumerate(zip(params, order)):
        s = state.get(index, {})
        master = masters[position] if masters else weight
        if master.shape != weight.shape:
            raise CheckpointError(f"optimizer parameter {index} has shape {list(master.shape)}, {name!r} "
                                  f"{list(weight.shape)}: the optimizer was not built on model.parameters() in order")
        entry = {"master": master.detach().float().clone()}
        for key in ("exp_avg", "exp_avg_sq"):
            if key in s:
                entry[key] = s[key].float().clone()
        out[name] = entry
    step = next((s["step"] for s in state.values() if "step" in s), None)
    return out, step, float(optimizer.get("cur_scale", 1.0))


def import_deepspeed(ds_dir, out_dir, tag=None, trust_pickle=False):
    """Convert DeepSpeed checkpoint `ds_dir` (its `latest`, or `tag`) into a
    zerofuse checkpoint in out_dir (same tag); returns the written directory.
    trust_pickle=True is required: DeepSpeed's files are pickles."""
    if trust_pickle is not True:
        raise ValueError("import_deepspeed: DeepSpeed's checkpoint files are Python pickles, which run code when "
                         "read; pass trust_pickle=True for a checkpoint you trust")
    path, tag = _tag_dir(ds_dir, tag)
    model_files = sorted(glob.glob(os.path.join(path, "mp_rank_*_model_states.pt")))
    if len(model_files) != 1:
        raise CheckpointError(f"{path}: expected one mp_rank_00_model_states.pt (model parallelism is not "
                              f"imported), found {len(model_files)}")
    meta = _load(model_files[0])
    module = meta["module"]
    buffers = set(meta.get("buffer_names") or [])
    optim_files = sorted(glob.glob(os.path.join(path, "*zero_pp_rank_*_optim_states.pt")), key=_rank_of)
    if optim_files:
        pieces, step, scale = _zero12_pieces(optim_files, meta["param_shapes"])
        stage = int(_load(optim_files[0])["optimizer_state_dict"]["zero_stage"])
    elif meta.get("optimizer") is not None:
        pieces, step, scale = _zero0_pieces(meta["optimizer"], _unique_params(module, buffers))
        stage = 0
    else:
        pieces = {name: {"master": w.detach().float().clone()} for name, w in _unique_params(module, buffers)}
        step, scale, stage = None, 1.0, 0
    names = list(pieces)
    state_names = [k for k in ("exp_avg", "exp_avg_sq") if all(k in p for p in pieces.values())]
    global_steps, skipped = int(meta.get("global_steps", 0)), int(meta.get("skipped_steps", 0))
    applied = int(step) if step is not None else global_steps - skipped

    final = os.path.join(out_dir, tag)
    partial = os.path.join(out_dir, f".{tag}.partial")
    os.makedirs(out_dir, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    shard = {"slices": torch.tensor([(i, 0, pieces[n]["master"].numel()) for i, n in enumerate(names)],
                                    dtype=torch.int64).reshape(-1, 3)}
    for key in ("master", *state_names):
        shard[key] = torch.cat([pieces[n][key].reshape(-1) for n in names]) if names else torch.zeros(0)
    save_file(shard, os.path.join(partial, "zero_shard_00000.pt"))
    save_file({k: v.detach().clone() for k, v in module.items() if isinstance(v, torch.Tensor)},
              os.path.join(partial, "model_states.pt"))
    storage_of = {}
    for key, value in module.items():
        storage_of.setdefault((value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape)),
                              []).append(key)
    table = []
    for name in names:
        value = module[name]
        keys = storage_of[(value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))]
        table.append({"name": name, "shape": list(value.shape), "keys": keys})
    client = {k: v for k, v in meta.items() if k not in _DEEPSPEED_KEYS}
    client_json, client_tensors = client_codec.encode(client)
    if client_tensors:
        save_file({str(i): t for i, t in enumerate(client_tensors)}, os.path.join(partial, "client_state.pt"))
    ds_config = meta.get("ds_config") or {}
    hysteresis = int((ds_config.get("fp16") or {}).get("hysteresis", 2)) if isinstance(ds_config, dict) else 2
    scheduler = meta.get("lr_scheduler")
    try:
        json.dumps(scheduler)
    except TypeError:
        scheduler = None
    manifest = {
        "format_version": 1, "zerofuse_version": __version__, "tag": tag, "world_size": 1, "zero_stage": stage,
        "shard_files": ["zero_shard_00000.pt"], "rng_files": [],
        "model_dtype": str(next(iter(module.values())).dtype).replace("torch.", "") if module else "float32",
        "config": {"imported_from": "DeepSpeed " + str(meta.get("ds_version")), "deepspeed_world_size":
                   int(meta.get("dp_world_size", 1))},
        "global_steps": global_steps, "skipped_steps": skipped, "micro_steps": 0,
        "progress": {"optimizer_steps": global_steps, "scheduler_steps": applied, "skipped_reported": skipped},
        "step_state": {"cur_scale": float(scale), "cur_iter": global_steps, "last_overflow_iter": -1,
                       "cur_hysteresis": hysteresis, "applied_steps": applied, "skipped_steps": skipped},
        "optimizer": "Adam" if state_names else None, "state_names": state_names,
        "optimizer_param_groups": None, "optimizer_scalar_state": None, "scheduler": scheduler,
        "params": table, "state_dict_keys": list(module), "frozen_excluded": False,
        "client_state": client_json, "client_tensors": "client_state.pt" if client_tensors else None,
    }
    write_text(os.path.join(partial, "manifest.json"), json.dumps(manifest, indent=1))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(partial, final)
    write_text(os.path.join(out_dir, "latest"), tag)
    return final
