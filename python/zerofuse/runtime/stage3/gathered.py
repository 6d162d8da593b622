"""zero.GatheredParameters and register_external_parameter: whole
parameters on request, whoever partitioned them (an engine at ZeRO-3, or a
zero.Init context before the engine exists)."""
import torch

from . import released
from .init_partition import InitPartition


def _as_list(params):
    if params is None:
        return []
    if isinstance(params, torch.Tensor):
        return [params]
    return list(params)


class GatheredParameters:
    """Inside the block the given parameters are whole on every rank (a
    collective: every rank enters it). On exit, with modifier_rank=None, any
    change is dropped; with a rank, that rank's values are broadcast and
    become every rank's (shards and fp32 masters alike). Parameters that are
    not partitioned are left alone, so the same code runs at every stage."""

    def __init__(self, params, modifier_rank=None, fwd_module=None, enabled=True):
        if modifier_rank is not None and (isinstance(modifier_rank, bool) or not isinstance(modifier_rank, int)):
            raise TypeError(f"GatheredParameters: 'modifier_rank' must be None or a rank (int), got "
                            f"{type(modifier_rank).__name__}")
        self.params = [p for p in _as_list(params) if released.owner_of(p) is not None] if enabled else []
        self.modifier_rank = modifier_rank
        self.fwd_module = fwd_module
        self.held = []  # (owner, units or params)

    def __enter__(self):
        by_owner = {}
        for p in self.params:
            by_owner.setdefault(id(released.owner_of(p)), (released.owner_of(p), []))[1].append(p)
        for owner, params in by_owner.values():
            if isinstance(owner, InitPartition):
                for p in params:
                    owner.gather(p)
                self.held.append((owner, params))
            else:
                units = owner.units_of_params(params)
                owner.acquire(units)
                self.held.append((owner, units))
                if self.fwd_module is not None:
                    for p in params:
                        owner.register_external(self.fwd_module, p)
        return self

    def __exit__(self, *exc):
        for owner, held in reversed(self.held):
            if isinstance(owner, InitPartition):
                for p in held:
                    owner.release(p, keep_changes_of=self.modifier_rank)
            else:
                if self.modifier_rank is not None:
                    owner.keep_changes(held, from_rank=self.modifier_rank)
                owner.let_go_all(held, discard=self.modifier_rank is None)
        self.held = []
        return False


def register_external_parameter(module: torch.nn.Module, parameter: torch.nn.Parameter):
    """`module`'s forward uses `parameter`, which another module holds: ZeRO-3
    gathers it with `module`'s own (DeepSpeed's). zerofuse also finds such
    uses by itself on first access; registering saves that first gather."""
    if not isinstance(parameter, torch.nn.Parameter):
        raise TypeError(f"register_external_parameter: 'parameter' must be a torch.nn.Parameter, got "
                        f"{type(parameter).__name__}")
    module.__dict__.setdefault("_external_params", {})[id(parameter)] = parameter
    owner = released.owner_of(parameter)
    if owner is not None and not isinstance(owner, InitPartition):
        owner.register_external(module, parameter)


def unregister_external_parameter(module: torch.nn.Module, parameter: torch.nn.Parameter):
    module.__dict__.get("_external_params", {}).pop(id(parameter), None)
    owner = released.owner_of(parameter)
    if owner is not None and not isinstance(owner, InitPartition):
        owner.unregister_external(module, parameter)
