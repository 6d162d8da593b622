"""Compiled ops as torch.library custom ops (autograd and fake kernels
included, so torch.compile(fullgraph=True) traces through them)."""
from .attention import attention
from .grad_stats import grad_stats
from .layer_norm import layer_norm

__all__ = ["attention", "grad_stats", "layer_norm"]
