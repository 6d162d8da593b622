"""deepspeed.runtime.dataloader."""
from ...runtime.dataloader import DeepSpeedDataLoader, RepeatingLoader  # noqa: F401
