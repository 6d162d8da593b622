"""zerofuse: ZeRO-1/2/3 training for PyTorch models on a compiled C++/CUDA core.

The torch-facing parts (`zerofuse.ops`, `zerofuse.nn`, `zerofuse.optim`) load on
first use, so `import zerofuse` and the core (`zerofuse._C`, the loss scaler,
the flat-buffer plan) work where torch is not installed.
"""
import importlib as _importlib

from . import _C
from ._build import build_info
from ._version import __version__
from .flat_plan import FlatPlan
from .loss_scaler import DynamicLossScaler, StaticLossScaler
from . import _transformers_hook

# attn_implementation="zerofuse" for transformers models, registered when
# transformers' modeling code is imported (it is not imported here).
_transformers_hook.install()

_LAZY_SUBMODULES = ("ops", "nn", "optim", "cli", "runtime", "checkpoint", "models", "integrations", "zero", "pipe", "tp")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    if name == "initialize":
        from .runtime import initialize

        return initialize
    if name == "tp_model_init":
        from .tp import tp_model_init

        return tp_model_init
    if name == "optimize":
        from .integrations import optimize

        return optimize
    raise AttributeError(f"module 'zerofuse' has no attribute '{name}'")


def set_num_threads(threads: int) -> None:
    """Set how many threads the CPU kernels use (default: the usable processors)."""
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise TypeError(f"set_num_threads: 'threads' must be an int, got {type(threads).__name__}")
    _C.set_num_threads(threads)


def get_num_threads() -> int:
    """How many threads the CPU kernels use."""
    return _C.num_threads()


__all__ = [
    "__version__",
    "build_info",
    "DynamicLossScaler",
    "StaticLossScaler",
    "FlatPlan",
    "set_num_threads",
    "get_num_threads",
    "initialize",
    "optimize",
    "tp_model_init",
    "ops",
    "nn",
    "optim",
    "runtime",
    "checkpoint",
    "zero",
    "pipe",
]
