"""deepspeed.runtime.activation_checkpointing."""
from . import checkpointing  # noqa: F401
