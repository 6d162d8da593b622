"""Compiled ops as torch.library custom ops (autograd and fake kernels
included, so torch.compile(fullgraph=True) traces through them)."""
from .add_layer_norm import add_layer_norm
from .attention import attention, attention_qkv_packed
from .bias_gelu import bias_gelu
from .cross_entropy import cross_entropy, linear_cross_entropy
from .grad_stats import grad_stats
from .layer_norm import layer_norm
from .masked_softmax import masked_softmax

__all__ = ["add_layer_norm", "attention", "attention_qkv_packed", "bias_gelu", "cross_entropy", "grad_stats",
           "layer_norm", "linear_cross_entropy", "masked_softmax"]
