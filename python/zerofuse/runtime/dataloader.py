"""The engine's data loader for `training_data=` (DeepSpeed's
DeepSpeedDataLoader) and RepeatingLoader.

Sampling is DeepSpeed's: a DistributedSampler over the data-parallel ranks,
shuffled with seed 0 (padded by repeating samples so every rank gets as many),
batches of train_micro_batch_size_per_gpu, the last partial batch dropped when
"dataloader_drop_last" is true. One difference, on purpose: DeepSpeed never
advances the sampler's epoch, so every epoch repeats the first one's order;
here each new pass over the loader reshuffles (the first pass is DeepSpeed's).
Loading happens in the training process (num_local_io_workers=0) unless asked.
"""
import math

import torch
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler


class RepeatingLoader:
    """Wraps an iterable so that iteration never ends: it restarts the
    iterable when it is exhausted (deepspeed.utils.RepeatingLoader)."""

    def __init__(self, loader):
        self.loader = loader
        self.data_iter = iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.data_iter)
        except StopIteration:
            self.data_iter = iter(self.loader)
            return next(self.data_iter)


class DeepSpeedDataLoader:
    def __init__(self, dataset, batch_size, *, rank, world_size, collate_fn=None, data_sampler=None,
                 drop_last=False, num_local_io_workers=None, pin_memory=False, tput_timer=None):
        if data_sampler is None:
            data_sampler = (DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
                            if world_size > 1 or torch.distributed.is_initialized()
                            else RandomSampler(dataset, generator=torch.Generator().manual_seed(0)))
        self.dataset = dataset
        self.batch_size = batch_size
        self.data_sampler = data_sampler
        self.collate_fn = collate_fn
        self.dataloader_drop_last = drop_last
        self.num_local_io_workers = num_local_io_workers or 0
        self.pin_memory = pin_memory
        self.tput_timer = tput_timer
        self.epoch = 0
        self.data = None
        samples = len(data_sampler)
        self.len = samples // batch_size if drop_last else math.ceil(samples / batch_size)

    def __len__(self):
        return self.len

    def __iter__(self):
        if hasattr(self.data_sampler, "set_epoch"):
            self.data_sampler.set_epoch(self.epoch)
        elif isinstance(self.data_sampler, RandomSampler) and self.data_sampler.generator is not None:
            self.data_sampler.generator.manual_seed(self.epoch)
        self.epoch += 1
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.data_sampler,
                            collate_fn=self.collate_fn, num_workers=self.num_local_io_workers,
                            pin_memory=self.pin_memory, drop_last=self.dataloader_drop_last)
        self.data = iter(loader)
        return self

    def __next__(self):
        if self.data is None:
            iter(self)
        if self.tput_timer is not None:
            self.tput_timer.start()
        return next(self.data)
