"""Reading zerofuse checkpoints without an engine (see zerofuse/runtime/checkpoint.py),
and importing DeepSpeed's."""
from .runtime.checkpoint import CheckpointError, read_manifest, to_fp32_state_dict

__all__ = ["CheckpointError", "read_manifest", "to_fp32_state_dict"]
