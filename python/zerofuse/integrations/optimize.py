"""zerofuse.optimize(model): use zerofuse's kernels in a model written for torch."""
import sys

import torch

from ..nn.layer_norm import LayerNorm
from ..nn.losses import CrossEntropyLoss


def _swap(module, old_type, new_type, accept=lambda m: True):
    """Replace every module of exactly old_type by new_type, keeping its state
    (the same parameter objects, buffers, hooks and settings)."""
    for name, child in list(module.named_children()):
        if type(child) is old_type and accept(child):
            new = new_type.__new__(new_type)
            new.__dict__.update(child.__dict__)
            setattr(module, name, new)
        else:
            _swap(child, old_type, new_type, accept)


def optimize(model: torch.nn.Module, layer_norm: bool = True, attention: bool = True,
             cross_entropy: bool = True) -> torch.nn.Module:
    """In place, and returned: every torch.nn.LayerNorm becomes a
    zerofuse.nn.LayerNorm holding the same parameters (optimizers and
    state_dicts are unaffected), every torch.nn.CrossEntropyLoss without
    per-class weights a zerofuse.nn.CrossEntropyLoss, and a Hugging Face
    transformers model is switched to attn_implementation="zerofuse". Results
    are unchanged up to rounding."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"zerofuse.optimize: 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if layer_norm:
        _swap(model, torch.nn.LayerNorm, LayerNorm)
    if cross_entropy:
        _swap(model, torch.nn.CrossEntropyLoss, CrossEntropyLoss, accept=lambda m: m.weight is None)
    if attention and "transformers" in sys.modules:
        from transformers import PreTrainedModel

        if isinstance(model, PreTrainedModel):
            from .transformers import use_zerofuse_attention
            use_zerofuse_attention(model)
    return model
