"""deepspeed.zero (= deepspeed.runtime.zero): ZeRO-3's user-facing names on zerofuse."""
from ..._unsupported import unsupported
from .partition_parameters import GatheredParameters, Init, MiCS_Init, ZeroParamStatus, ZeroParamType, \
    register_external_parameter, unregister_external_parameter  # noqa: F401

TiledLinear = unsupported("deepspeed.zero.TiledLinear", "TiledLinear (splitting one linear layer's gathers)")
TiledLinearReturnBias = unsupported("deepspeed.zero.TiledLinearReturnBias", "TiledLinear")
