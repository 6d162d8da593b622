"""Optimizers: FusedAdam on zerofuse's fused kernel; Lamb (DeepSpeed's
FusedLamb arithmetic) and Lion for the engine's config types."""
from .. import _torch_threads  # noqa: F401  (CPU kernels on torch's OpenMP team)
from .fused_adam import FusedAdam
from .lamb import Lamb
from .lion import Lion

__all__ = ["FusedAdam", "Lamb", "Lion"]
