"""How the engine's optimizer (zero_optimizer.py) updates this rank's share of
the parameters: the fp32 master values of the pieces it owns, with gradients
already reduced into place and the step's decision (skip, unscale and clip
multiplier) made by the step control.

Every rule has the same small interface:
    step(control)          apply one update (and write the model-dtype copies)
    state_tensors()        {name: fp32 tensor of the shard's size}: per-element state
    load_state_tensors(d)  the inverse, from tensors laid out the same way
    hyperparameters        the param-group keys the rule reads
"""
from .adam import AdamRule
from .lamb import LambRule
from .torch_optimizer import TorchOptimizerRule, is_elementwise

__all__ = ["AdamRule", "LambRule", "TorchOptimizerRule", "is_elementwise"]
