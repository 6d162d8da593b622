"""Drop-in modules backed by zerofuse's kernels."""
from . import functional
from .layer_norm import LayerNorm
from .losses import CrossEntropyLoss, LinearCrossEntropy

__all__ = ["CrossEntropyLoss", "LayerNorm", "LinearCrossEntropy", "functional"]
