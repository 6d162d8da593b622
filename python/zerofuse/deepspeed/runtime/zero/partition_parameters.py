"""deepspeed.runtime.zero.partition_parameters: where DeepSpeed defines
zero.Init, GatheredParameters and the parameter status user code tests."""
import enum

from ....zero import GatheredParameters, Init, ZeroParamStatus, register_external_parameter, \
    unregister_external_parameter  # noqa: F401
from ..._unsupported import unsupported


class ZeroParamType(enum.Enum):
    """DeepSpeed's parameter kinds. zerofuse's partitioned parameters are PARTITIONED;
    it has no REMOTE (offloaded) parameters."""
    NORMAL = 1
    PARTITIONED = 2
    REMOTE = 3


MiCS_Init = unsupported("deepspeed.zero.MiCS_Init", "MiCS (hierarchical ZeRO-3 partitioning)")
