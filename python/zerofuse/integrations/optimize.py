"""zerofuse.optimize(model): use zerofuse's kernels in a model written for torch."""
import sys

import torch

from ..nn.layer_norm import LayerNorm


def _swap_layer_norms(module):
    swapped = 0
    for name, child in list(module.named_children()):
        if type(child) is torch.nn.LayerNorm:
            new = LayerNorm.__new__(LayerNorm)
            new.__dict__.update(child.__dict__)  # same parameters (objects), hooks and settings
            setattr(module, name, new)
            swapped += 1
        else:
            swapped += _swap_layer_norms(child)
    return swapped


def optimize(model: torch.nn.Module, layer_norm: bool = True, attention: bool = True) -> torch.nn.Module:
    """In place, and returned: every torch.nn.LayerNorm becomes a
    zerofuse.nn.LayerNorm holding the same parameters (optimizers and
    state_dicts are unaffected); a Hugging Face transformers model is switched
    to attn_implementation="zerofuse". Results are unchanged up to rounding."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"zerofuse.optimize: 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if layer_norm:
        _swap_layer_norms(model)
    if attention and "transformers" in sys.modules:
        from transformers import PreTrainedModel

        if isinstance(model, PreTrainedModel):
            from .transformers import use_zerofuse_attention
            use_zerofuse_attention(model)
    return model
