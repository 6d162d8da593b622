"""Functional forms, mirroring torch.nn.functional."""
from ..ops import attention, layer_norm

__all__ = ["attention", "layer_norm"]
