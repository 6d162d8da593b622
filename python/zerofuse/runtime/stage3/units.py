"""Which parameters ZeRO-3 gathers together, and which stay whole.

A unit is the trainable parameters a module holds directly (those of its
children are the children's units); a parameter shared by several modules
(tied embeddings) belongs to the first that holds it, and the others gather
that unit too. Parameters of at most `param_persistence_threshold` elements
persist -- whole on every rank, gathered again only after each step -- while
their total stays within `model_persistence_threshold` (DeepSpeed's rule:
small parameters cost more in collectives than they save in memory).
"""
from typing import Dict, List, NamedTuple, Tuple

import torch

PERSISTENT = "<persistent>"  # the unit key of the persistent parameters (one unit per param group)


class UnitPlan(NamedTuple):
    unit_of: Dict[int, Tuple[str, bool]]  # id(param) -> (unit key, persistent)
    keys_of_module: Dict[int, List[str]]  # id(module) -> unit keys its own parameters fall in (not persistent)


def full_numel(param) -> int:
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()


def plan_units(model: torch.nn.Module, trainable_ids, param_threshold: int, model_threshold: int) -> UnitPlan:
    unit_of: Dict[int, Tuple[str, bool]] = {}
    persistent_total = 0
    for module_name, module in model.named_modules():
        for p in module._parameters.values():
            if p is None or id(p) not in trainable_ids or id(p) in unit_of:
                continue
            n = full_numel(p)
            persistent = n <= param_threshold and persistent_total + n <= model_threshold
            if persistent:
                persistent_total += n
            unit_of[id(p)] = (PERSISTENT if persistent else module_name, persistent)
    keys_of_module: Dict[int, List[str]] = {}
    for module in model.modules():
        keys = []
        for p in module._parameters.values():
            if p is not None and id(p) in unit_of and not unit_of[id(p)][1] and unit_of[id(p)][0] not in keys:
                keys.append(unit_of[id(p)][0])
        if keys:
            keys_of_module[id(module)] = keys
    return UnitPlan(unit_of, keys_of_module)
