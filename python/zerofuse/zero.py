"""ZeRO-3's user-facing pieces, under DeepSpeed's names (deepspeed.zero):

    with zerofuse.zero.Init(config_dict_or_path=config):
        model = MyModel()                     # each rank holds 1/N of every parameter
    engine, *_ = zerofuse.initialize(model=model, config=config)   # "stage": 3
    with zerofuse.zero.GatheredParameters(model.head.weight, modifier_rank=0):
        ...                                   # whole on every rank; rank 0's edits kept
"""
from .runtime.stage3.gathered import GatheredParameters, register_external_parameter, unregister_external_parameter
from .runtime.stage3.init_context import Init
from .runtime.stage3.released import ZeroParamStatus

__all__ = ["Init", "GatheredParameters", "register_external_parameter", "unregister_external_parameter",
           "ZeroParamStatus"]
