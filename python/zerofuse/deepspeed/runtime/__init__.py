"""deepspeed.runtime: the engine, config, data loader, schedules and
activation checkpointing, under DeepSpeed's module paths."""
from . import activation_checkpointing, config, dataloader, engine, lr_schedules, utils  # noqa: F401
