"""deepspeed.checkpointing: activation checkpointing on torch.utils.checkpoint.

checkpoint(function, *args) runs `function` without keeping its
intermediate activations and runs it again in backward, with the same random
state (dropout masks match). It is the non-reentrant form, so it works when
no input requires grad and with keyword arguments. configure() takes
DeepSpeed's settings, or its config's "activation_checkpointing" section:
  checkpoint_in_cpu / cpu_checkpointing  the saved inputs of each checkpoint live in CPU memory
  synchronize                            the device is synchronised around each checkpoint
  partition_activations, contiguous_memory_optimization, num_checkpoints, profile
                                         accepted; they act on model-parallel partitions and
                                         buffers that the torch path does not have
The RNG tracker (get_cuda_rng_tracker, model_parallel_cuda_manual_seed) keeps
Megatron-style named random states for model-parallel dropout.
"""
import contextlib

import torch
import torch.utils.checkpoint as _torch_checkpoint

from ....runtime.config import load_raw
from ....runtime.config.sections import parse_activation_checkpointing

_settings = {"configured": False, "cpu": False, "synchronize": False, "num_checkpoints": None,
             "partition_activations": False, "profile": False, "mpu": None}


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _to_cpu(args):
    """(args with tensors copied to the CPU, the device each came from)."""
    moved, devices = [], []
    for a in args:
        if isinstance(a, torch.Tensor) and a.device.type != "cpu":
            devices.append(a.device)
            moved.append(a.to("cpu"))
        else:
            devices.append(None)
            moved.append(a)
    return moved, devices


def checkpoint(function, *args, **kwargs):
    """function(*args, **kwargs), recomputed in backward instead of stored."""
    if _settings["synchronize"] and torch.cuda.is_available():
        torch.cuda.synchronize()
    if _settings["cpu"]:
        moved, devices = _to_cpu(args)

        def on_device(*cpu_args, **kw):
            back = [a.to(d) if d is not None else a for a, d in zip(cpu_args, devices)]
            return function(*back, **kw)

        out = _torch_checkpoint.checkpoint(on_device, *moved, use_reentrant=False, **kwargs)
    else:
        out = _torch_checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)
    if _settings["synchronize"] and torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


non_reentrant_checkpoint = checkpoint


def configure(mpu_=None, deepspeed_config=None, partition_activations=None, contiguous_checkpointing=None,
              num_checkpoints=None, checkpoint_in_cpu=None, synchronize=None, profile=None):
    """DeepSpeed's configure: settings from deepspeed_config's
    "activation_checkpointing" section (a dict or a JSON path), overridden by
    the arguments given. mpu_: a Megatron-style object whose
    get_model_parallel_rank() seeds the model-parallel random state."""
    _settings["mpu"] = mpu_
    if deepspeed_config is not None:
        raw = load_raw(deepspeed_config)
        section = parse_activation_checkpointing(raw.get("activation_checkpointing", {}), [], cpu_engine=False)
        _settings.update(cpu=section.cpu_checkpointing, synchronize=section.synchronize_checkpoint_boundary,
                         num_checkpoints=section.number_checkpoints, profile=section.profile)
    for key, value in (("partition_activations", partition_activations), ("num_checkpoints", num_checkpoints),
                       ("cpu", checkpoint_in_cpu), ("synchronize", synchronize), ("profile", profile)):
        if value is not None:
            _settings[key] = value
    _settings["configured"] = True


def is_configured() -> bool:
    return _settings["configured"]


def reset():
    """Between iterations DeepSpeed frees its contiguous buffers; torch's
    checkpoint keeps none."""


def set_num_layers(nlayers):
    _settings["num_checkpoints"] = nlayers


def partition_activations_in_checkpoint(partition_activation):
    _settings["partition_activations"] = bool(partition_activation)


# --- named random states (Megatron's) --------------------------------------------------------

_MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"


def _get_state():
    return torch.cuda.get_rng_state() if _device() == "cuda" else torch.get_rng_state()


def _set_state(state):
    if _device() == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named random states: fork(name) runs a block with that state and keeps
    where it got to, leaving the default state as it was."""

    def __init__(self):
        self.states_ = {}
        self.seeds_ = set()

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states):
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name, seed):
        if seed in self.seeds_:
            raise ValueError(f"RNG tracker: seed {seed} is already used")
        if name in self.states_:
            raise ValueError(f"RNG tracker: state {name!r} already exists")
        self.seeds_.add(seed)
        original = _get_state()
        if _device() == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.states_[name] = _get_state()
        _set_state(original)

    @contextlib.contextmanager
    def fork(self, name=_MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise ValueError(f"RNG tracker: no state named {name!r} (add it, or call model_parallel_cuda_manual_seed)")
        original = _get_state()
        _set_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = _get_state()
            _set_state(original)


CudaRNGStatesTracker = RNGStatesTracker
_tracker = RNGStatesTracker()


def get_cuda_rng_tracker():
    return _tracker


def model_parallel_cuda_manual_seed(seed):
    """Megatron's seeding: the default state gets `seed` (the same on every
    rank of a data-parallel group); the tracker's model-parallel state gets
    seed + 2718 + the model-parallel rank (of the mpu given to configure())."""
    mpu = _settings["mpu"]
    tp_rank = mpu.get_model_parallel_rank() if mpu is not None else 0
    _tracker.reset()
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    _tracker.add(_MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
