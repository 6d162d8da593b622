"""Optimizers backed by zerofuse's fused kernels."""
from .fused_adam import FusedAdam

__all__ = ["FusedAdam"]
