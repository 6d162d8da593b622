"""Functional forms, mirroring torch.nn.functional."""
from ..ops import add_layer_norm, attention, bias_gelu, cross_entropy, layer_norm, linear_cross_entropy, masked_softmax

__all__ = ["add_layer_norm", "attention", "bias_gelu", "cross_entropy", "layer_norm", "linear_cross_entropy",
           "masked_softmax"]
