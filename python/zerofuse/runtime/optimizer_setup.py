"""Which optimizer the engine runs, and on which param groups, from what the
script gave (DeepSpeed's rules: a client optimizer or callable wins over the
config's "optimizer" section).

  torch.optim.Adam/AdamW, zerofuse FusedAdam (and DeepSpeed's names for it),
  config "Adam"/"AdamW"                      -> the fused Adam kernel
  zerofuse.optim.Lamb (DeepSpeed's FusedLamb), config "Lamb"  -> sharded LAMB
  any other torch.optim.Optimizer, config "Adagrad"/"Lion"/torch names
                                             -> the class itself on the master shard:
     at ZeRO stage >= 1 it must be element-wise (checked by running it), and
     one DeepSpeed has not tested needs "zero_allow_untested_optimizer": true,
     as in DeepSpeed.
"""
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, List, Optional

import torch

from ..optim import FusedAdam, Lamb, Lion
from .config import Config, ConfigError
from .update_rules import AdamRule, LambRule, TorchOptimizerRule, is_elementwise
from .update_rules.adam import HYPERPARAMETERS as ADAM_KEYS
from .update_rules.lamb import HYPERPARAMETERS as LAMB_KEYS

_GROUP_BOOKKEEPING = ("params", "name", "initial_lr")


@dataclass
class OptimizerSetup:
    groups: List[dict]              # param groups, every hyper-parameter set
    rule: Callable                  # rule(zero_optimizer) -> update rule
    client: Optional[torch.optim.Optimizer] = None  # whose param_groups the engine shares
    notes: List[str] = field(default_factory=list)  # said once at start-up


def _is_adam(opt) -> bool:
    return isinstance(opt, (torch.optim.Adam, torch.optim.AdamW, FusedAdam))


def _adam_groups(opt):
    for group in opt.param_groups:
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError("zerofuse.initialize: amsgrad and maximize are not supported by the fused Adam kernel")
        if "adam_w_mode" not in group:
            group["adam_w_mode"] = isinstance(opt, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay"))
        group.setdefault("bias_correction", True)
    return opt.param_groups


def _torch_rule(cls, defaults, stage, allow_untested, notes):
    if stage >= 1:
        if not is_elementwise(cls, defaults):
            raise ValueError(f"zerofuse.initialize: {cls.__name__} updates an element from more than its own values "
                             "(it reads parameter shapes or norms, or needs a closure), but at ZeRO stage >= 1 a rank "
                             "holds only pieces of parameters; use ZeRO stage 0, or an element-wise optimizer")
        tested = cls in (torch.optim.Adagrad, Lion)
        if not tested and not allow_untested:
            raise ConfigError(f"zerofuse.initialize: {cls.__name__} is not one of the optimizers DeepSpeed tests with "
                              "ZeRO; add \"zero_allow_untested_optimizer\": true to the config to use it (as DeepSpeed "
                              "requires)")
        if not tested:
            notes.append(f"ZeRO with an untested optimizer ({cls.__name__}): it passed zerofuse's element-wise check")
    return partial(TorchOptimizerRule, optimizer_class=cls, defaults=dict(defaults), whole_parameters=stage == 0)


def _from_client(opt: torch.optim.Optimizer, config: Config, notes) -> OptimizerSetup:
    opt.param_groups[:] = [g for g in opt.param_groups if g["params"]]
    if _is_adam(opt):
        return OptimizerSetup(_adam_groups(opt), AdamRule, opt, notes)
    if isinstance(opt, Lamb):
        return OptimizerSetup(opt.param_groups, LambRule, opt, notes)
    rule = _torch_rule(type(opt), opt.defaults, config.zero.stage, config.zero_allow_untested_optimizer, notes)
    return OptimizerSetup(opt.param_groups, rule, opt, notes)


def _groups_of(model, model_parameters, defaults):
    params = list(model.parameters() if model_parameters is None else model_parameters)
    if params and isinstance(params[0], dict):
        groups = [dict(defaults, **g) for g in params]
    else:
        groups = [dict(defaults, params=params)]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
    return [g for g in groups if g["params"]] or groups[:1]


def _check_group_keys(groups, allowed, what):
    for g in groups:
        unknown = set(g) - set(allowed) - set(_GROUP_BOOKKEEPING)
        if unknown:
            raise ConfigError(f"zerofuse.initialize: param group keys {sorted(unknown)} are not {what} "
                              "hyper-parameters")


def choose_optimizer(model, model_parameters, client_optimizer, config: Config) -> OptimizerSetup:
    notes = []
    if client_optimizer is not None:
        if config.optimizer is not None:
            notes.append("the optimizer passed to initialize() is used; the config's 'optimizer' section is not "
                         "(as in DeepSpeed)")
        if not isinstance(client_optimizer, torch.optim.Optimizer):
            if not callable(client_optimizer):
                raise TypeError("zerofuse.initialize: 'optimizer' must be a torch.optim.Optimizer or a callable that "
                                f"makes one from the parameters, got {type(client_optimizer).__name__}")
            params = model.parameters() if model_parameters is None else model_parameters
            client_optimizer = client_optimizer(params)
            if not isinstance(client_optimizer, torch.optim.Optimizer):
                raise TypeError("zerofuse.initialize: the 'optimizer' callable must return a torch.optim.Optimizer, "
                                f"got {type(client_optimizer).__name__}")
        return _from_client(client_optimizer, config, notes)
    oc = config.optimizer
    if oc is None:
        notes.append("no optimizer given: AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8, no weight decay)")
        defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True,
                        bias_correction=True)
        groups = _groups_of(model, model_parameters, defaults)
        _check_group_keys(groups, ADAM_KEYS, "Adam")
        return OptimizerSetup(groups, AdamRule, None, notes)
    defaults = {k: (tuple(v) if k == "betas" else v) for k, v in oc.params.items()}
    if oc.kind == "adam":
        groups = _groups_of(model, model_parameters, defaults)
        _check_group_keys(groups, ADAM_KEYS, "Adam")
        return OptimizerSetup(groups, AdamRule, None, notes)
    if oc.kind == "lamb":
        groups = _groups_of(model, model_parameters, defaults)
        _check_group_keys(groups, LAMB_KEYS, "LAMB")
        return OptimizerSetup(groups, LambRule, None, notes)
    cls = oc.torch_class()
    # Built once on the param groups so the class fills in its own defaults.
    built = cls(_groups_of(model, model_parameters, {}), **defaults)
    rule = _torch_rule(cls, built.defaults, config.zero.stage, config.zero_allow_untested_optimizer, notes)
    return OptimizerSetup(built.param_groups, rule, None, notes)
