"""zero.Init: parameters partitioned as the model is built.

Inside the context every torch.nn.Module subclass's __init__ is wrapped: when
the outermost __init__ of a module returns, each parameter it holds that is
not yet partitioned keeps only this rank's 1/N (`ds_tensor`: chunk r of the
flattened values, the last chunk zero-padded) and is released. The values are
exactly those the same code gives without the context (the RNG is drawn in
the same order; nothing else changes). Operations that read a released
parameter inside the context -- the weight initialisation a model runs after
its submodules exist, such as Hugging Face's post_init -- gather it, run, and
keep this rank's chunk of the result.

The engine (ZeRO stage 3) takes the values over into its own shards one
parameter at a time; any other stage makes the parameters whole again.
"""
import functools
import itertools
from typing import List, Optional

import torch
import torch.distributed as dist

from .. import collectives, distributed
from . import released

_next_id = itertools.count()
LOCAL = "local"  # release(): keep this rank's own changes, no broadcast
_active: List["InitPartition"] = []  # zero.Init contexts open now, innermost last


class InitPartition:
    """The partitioning one zero.Init context does, and the owner of what it partitioned."""

    def __init__(self, placement: distributed.Placement, dtype: Optional[torch.dtype]):
        self.placement = placement
        self.dtype = dtype
        self.gathered_for_read = set()  # ids of params a GatheredParameters block holds whole

    # --- partitioning -----------------------------------------------------------------------------

    @torch.no_grad()
    def partition_module(self, module: torch.nn.Module):
        for p in module.parameters():
            if released.owner_of(p) is None:
                self.partition(p)

    @torch.no_grad()
    def partition(self, param: torch.nn.Parameter):
        values = param.data.to(self.placement.device)
        if self.dtype is not None and values.is_floating_point():
            values = values.to(self.dtype)
        world, rank = self.placement.world_size, self.placement.rank
        chunk = -(-values.numel() // world)
        flat = values.reshape(-1)
        mine = torch.zeros(chunk, dtype=values.dtype, device=values.device)
        lo, hi = min(rank * chunk, flat.numel()), min((rank + 1) * chunk, flat.numel())
        mine[:hi - lo].copy_(flat[lo:hi])
        param.data = values  # dtype and device as partitioned (released below)
        released.attach(param, self, next(_next_id), values.shape, strong=True)
        param.ds_tensor = mine
        released.release(param)

    # --- the values ---------------------------------------------------------------------------------

    def full_values(self, param) -> torch.Tensor:
        """The whole parameter (a collective: every rank calls it, in the same order)."""
        chunk = param.ds_tensor
        world = self.placement.world_size
        if world == 1:
            whole = chunk.clone()
        else:
            whole = torch.empty(chunk.numel() * world, dtype=chunk.dtype, device=chunk.device)
            collectives.all_gather(whole, chunk, group=self.placement.group)
        return whole[:param.ds_numel].view(param.ds_shape)

    def gather(self, param):
        if released.is_released(param):
            released.make_available(param, self.full_values(param))

    @torch.no_grad()
    def release(self, param, keep_changes_of):
        """Back to this rank's chunk. keep_changes_of: None drops what was done
        to the whole values; a rank: that rank's values are broadcast and kept;
        LOCAL: each rank keeps its chunk of its own values (every rank made the
        same change, so no traffic)."""
        if released.is_released(param):
            return
        if keep_changes_of is not None:
            values = param.data.contiguous()
            if keep_changes_of is not LOCAL and self.placement.world_size > 1:
                dist.broadcast(values, src=dist.get_global_rank(self.placement.group, keep_changes_of)
                               if self.placement.group is not None else keep_changes_of, group=self.placement.group)
            chunk = param.ds_tensor
            flat = values.reshape(-1)
            lo = min(self.placement.rank * chunk.numel(), flat.numel())
            hi = min(lo + chunk.numel(), flat.numel())
            chunk[:hi - lo].copy_(flat[lo:hi])
        released.release(param)

    def on_access(self, param):
        """Inside the zero.Init context: gather, and after the operation keep
        this rank's chunk of the result (every rank ran the same operation)."""
        if self not in _active:
            return None
        self.gather(param)
        return lambda: self.release(param, keep_changes_of=LOCAL)

    def stop(self, param):
        """The parameter becomes an ordinary, whole one."""
        values = self.full_values(param) if released.is_released(param) else param.data
        released.detach_owner(param)
        param.data = values


def full_values(param) -> torch.Tensor:
    """`param`'s whole values, wherever they are (partitioned or not)."""
    owner = released.owner_of(param)
    if owner is not None and released.is_released(param):
        return owner.full_values(param)
    return param.detach()


def stop_partitioning(param):
    owner = released.owner_of(param)
    if owner is not None:
        owner.stop(param)


# --- the context's patching of module construction -----------------------------------------------------


def _all_module_classes():
    seen, todo = set(), [torch.nn.Module]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                todo.append(sub)
    return seen


def _wrapped_init(original):
    @functools.wraps(original)
    def __init__(module, *args, **kwargs):
        depth = module.__dict__.get("_zf_init_depth", 0)
        module.__dict__["_zf_init_depth"] = depth + 1
        try:
            original(module, *args, **kwargs)
        finally:
            module.__dict__["_zf_init_depth"] = depth
        if depth == 0:
            del module.__dict__["_zf_init_depth"]
            if _active:
                _active[-1].partition_module(module)

    __init__._zf_original = original
    return __init__


class ModuleConstructionPatch:
    """Wraps every Module subclass's own __init__ (and those of classes
    defined while it is on), and undoes it."""

    def __init__(self):
        self.patched = []

    def __enter__(self):
        for cls in _all_module_classes():
            self._wrap(cls)
        self.old_init_subclass = torch.nn.Module.__dict__.get("__init_subclass__")
        patch = self

        def __init_subclass__(cls, **kwargs):
            super(torch.nn.Module, cls).__init_subclass__(**kwargs)
            patch._wrap(cls)

        torch.nn.Module.__init_subclass__ = classmethod(__init_subclass__)
        return self

    def _wrap(self, cls):
        init = cls.__dict__.get("__init__")
        if init is not None and not hasattr(init, "_zf_original"):
            cls.__init__ = _wrapped_init(init)
            self.patched.append(cls)

    def __exit__(self, *exc):
        for cls in self.patched:
            cls.__init__ = cls.__dict__["__init__"]._zf_original
        self.patched = []
        if self.old_init_subclass is None:
            del torch.nn.Module.__init_subclass__
        else:
            torch.nn.Module.__init_subclass__ = self.old_init_subclass
        return False


def push(partition: InitPartition):
    _active.append(partition)


def pop(partition: InitPartition):
    _active.remove(partition)


def active() -> bool:
    return bool(_active)
