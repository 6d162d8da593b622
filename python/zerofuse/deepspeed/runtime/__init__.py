"""deepspeed.runtime: the engine, config, data loader, schedules and
activation checkpointing and ZeRO-3's zero.Init, under DeepSpeed's module paths."""
from . import activation_checkpointing, config, dataloader, engine, lr_schedules, utils, zero  # noqa: F401
