"""Drop-in modules backed by zerofuse's kernels."""
from . import functional
from .layer_norm import LayerNorm

__all__ = ["LayerNorm", "functional"]
