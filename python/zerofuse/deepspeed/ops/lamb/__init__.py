"""deepspeed.ops.lamb: FusedLamb is zerofuse's Lamb (DeepSpeed FusedLamb's
arithmetic, on any device; the engine runs it sharded)."""
from ....optim.lamb import Lamb as FusedLamb

__all__ = ["FusedLamb"]
