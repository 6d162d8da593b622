"""Reading zerofuse checkpoints without an engine (see zerofuse/runtime/checkpoint.py),
and importing DeepSpeed's (runtime/deepspeed_import.py)."""
from .runtime.checkpoint import CheckpointError, read_manifest, to_fp32_state_dict
from .runtime.deepspeed_import import import_deepspeed

__all__ = ["CheckpointError", "import_deepspeed", "read_manifest", "to_fp32_state_dict"]
