"""DeepSpeed's module-level API on zerofuse: `import zerofuse.deepspeed as
deepspeed` in a script, or run an unmodified DeepSpeed script with
`zerofuse launch script.py ...` (or `python -m zerofuse.deepspeed script.py`
for one process), in which `import deepspeed` resolves here.

This package is a facade: it maps DeepSpeed's names onto zerofuse's objects
and holds no training logic of its own. Where zerofuse differs on purpose the
docstrings say so (checkpoints are pickle-free; the config is validated
strictly). DeepSpeed features zerofuse does not have (MoE, inference,
compression, sparse attention, 1-bit optimizers, ...) import, and raise one
line naming them when used.
"""
import contextlib

import torch

from .._version import __version__ as _zerofuse_version
from ..runtime.config import ConfigError as DeepSpeedConfigError
from ..runtime.dataloader import DeepSpeedDataLoader, RepeatingLoader  # noqa: F401
from ..runtime.engine import Engine as DeepSpeedEngine
from ..runtime.initialize import config_from
from . import accelerator, comm, ops, pipe, runtime, utils  # noqa: F401
from ..pipe import PipelineEngine, PipelineModule
from ._unsupported import NotSupported, unsupported, unsupported_module
from .accelerator import get_accelerator  # noqa: F401
from .comm import init_distributed
from .runtime.activation_checkpointing import checkpointing  # noqa: F401
from .runtime import zero  # noqa: F401  (deepspeed.zero is deepspeed.runtime.zero, as in DeepSpeed)
from .runtime.config import DeepSpeedConfig  # noqa: F401
from .utils import log_dist, logger  # noqa: F401

# The DeepSpeed release whose API this follows, marked as zerofuse's.
__version__ = f"0.19.8+zerofuse.{_zerofuse_version}"
__version_major__, __version_minor__, __version_patch__ = 0, 19, 8
__git_hash__ = None
__git_branch__ = None

TORCH_DISTRIBUTED_DEFAULT_PORT = comm.TORCH_DISTRIBUTED_DEFAULT_PORT


def initialize(args=None, model: torch.nn.Module = None, optimizer=None, model_parameters=None,
               training_data=None, lr_scheduler=None, distributed_port: int = TORCH_DISTRIBUTED_DEFAULT_PORT,
               mpu=None, dist_init_required=None, collate_fn=None, config=None, mesh_param=None,
               config_params=None):
    """deepspeed.initialize: returns (engine, optimizer, training_dataloader,
    lr_scheduler). As DeepSpeed, it starts torch.distributed first (a
    one-process group when no launcher started this process), and takes the
    config from `config`, `config_params` or `args.deepspeed_config`."""
    if model is None:
        raise ValueError("deepspeed.initialize requires a model")
    if mesh_param is not None:
        raise NotSupported("deepspeed.initialize: mesh_param (sequence-parallel device meshes) is not supported by "
                           "zerofuse")
    init_distributed(distributed_port=distributed_port, dist_init_required=dist_init_required)
    kind = PipelineEngine if isinstance(model, PipelineModule) else DeepSpeedEngine
    engine = kind(model, config_from(config, config_params, args), model_parameters, optimizer,
                             lr_scheduler, training_data, None, collate_fn, mpu=mpu)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler


def tp_model_init(model, tp_size, dtype=None, config=None, **kwargs):
    """deepspeed.tp_model_init: split `model` in place for tensor parallelism
    over tp_size ranks (zerofuse.tp.tp_model_init); returns the model. Pass it
    to initialize() with or without "tensor_parallel": {"autotp_size": tp_size}."""
    from ..tp import tp_model_init as split
    init_distributed()
    return split(model, tp_size, dtype)


def add_config_arguments(parser):
    """Adds DeepSpeed's --deepspeed, --deepspeed_config, --deepscale and
    --deepscale_config arguments (group 'DeepSpeed')."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="Enable DeepSpeed (helper flag for user code, no impact on DeepSpeed backend)")
    group.add_argument("--deepspeed_config", default=None, type=str, help="DeepSpeed json configuration file.")
    group.add_argument("--deepscale", default=False, action="store_true",
                       help="Deprecated enable DeepSpeed (helper flag for user code, no impact on DeepSpeed backend)")
    group.add_argument("--deepscale_config", default=None, type=str,
                       help="Deprecated DeepSpeed json configuration file.")
    return parser


class OnDevice:
    """Creates the modules built inside on `device` with floating tensors in
    `dtype` (device="meta": shapes only, no memory)."""

    def __init__(self, dtype, device="meta", enabled=True):
        self.dtype, self.device, self.enabled = dtype, device, enabled
        self._stack = None

    def __enter__(self):
        if not self.enabled:
            return self
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(torch.device(self.device))
        self._previous_dtype = torch.get_default_dtype()
        if self.dtype is not None and self.dtype.is_floating_point:
            torch.set_default_dtype(self.dtype)
        return self

    def __exit__(self, *exc):
        if self._stack is not None:
            torch.set_default_dtype(self._previous_dtype)
            self._stack.close()
            self._stack = None
        return False


# --- parts of DeepSpeed zerofuse does not have: importable, refused when used --------------------------

moe = unsupported_module("deepspeed.moe", "mixture of experts")
inference = unsupported_module("deepspeed.inference", "DeepSpeed inference")
compression = unsupported_module("deepspeed.compression", "compression training")
init_inference = unsupported("deepspeed.init_inference", "DeepSpeed inference")
DeepSpeedHybridEngine = unsupported("deepspeed.DeepSpeedHybridEngine", "the RLHF hybrid engine")
InferenceEngine = unsupported("deepspeed.InferenceEngine", "DeepSpeed inference")
DeepSpeedTransformerLayer = unsupported("deepspeed.DeepSpeedTransformerLayer", "DeepSpeed's fused transformer layer")
DeepSpeedTransformerConfig = unsupported("deepspeed.DeepSpeedTransformerConfig", "DeepSpeed's fused transformer layer")
