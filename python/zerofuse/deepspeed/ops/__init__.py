"""deepspeed.ops: the optimizers, on zerofuse's kernels (no just-in-time build)."""
from . import adam, lamb  # noqa: F401
