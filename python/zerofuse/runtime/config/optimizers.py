"""The config's "optimizer" section: DeepSpeed's optimizer types.

  Adam / AdamW      zerofuse's fused kernel (DeepSpeed's "Adam" is AdamW unless adam_w_mode is false)
  Lamb              DeepSpeed FusedLamb's arithmetic, norms reduced across shards
  Adagrad, Lion     element-wise, on the master shard (torch.optim.Adagrad, zerofuse.optim.Lion)
  any torch.optim name (SGD, RMSprop, ...)   as DeepSpeed: getattr(torch.optim, type)
DeepSpeed's 1-bit optimizers and the mup/Muon families are refused by name.
"""
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict

from .values import as_bool, as_float, as_section, as_str, check_keys, fail

ADAM_KEYS = ("lr", "betas", "eps", "weight_decay", "adam_w_mode", "bias_correction", "amsgrad")
ADAM_INERT = ("torch_adam", "fused", "foreach", "capturable", "fp32_optimizer_states")
LAMB_KEYS = ("lr", "betas", "eps", "weight_decay", "bias_correction", "max_coeff", "min_coeff", "eps_inside_sqrt",
             "amsgrad")
UNSUPPORTED = {
    "onebitadam": "DeepSpeed's 1-bit Adam (compressed communication)",
    "zerooneadam": "DeepSpeed's 0/1 Adam (compressed communication)",
    "onebitlamb": "DeepSpeed's 1-bit LAMB (compressed communication)",
    "muon": "the Muon optimizer", "muadam": "mup's MuAdam", "muadamw": "mup's MuAdamW", "musgd": "mup's MuSGD",
}


@dataclass
class OptimizerConfig:
    """type: "Adam", "AdamW", "Lamb", "Adagrad", "Lion", or a torch.optim class
    name; params: its keyword arguments, validated (for Adam/AdamW every
    hyper-parameter is set, adam_w_mode resolved)."""

    type: str = "AdamW"
    params: Dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """'adam', 'lamb' or 'torch' (a torch.optim.Optimizer class on the master shard)."""
        return {"adam": "adam", "adamw": "adam", "lamb": "lamb"}.get(self.type.lower(), "torch")

    def torch_class(self):
        import torch

        if self.type.lower() == "adagrad":
            return torch.optim.Adagrad
        if self.type.lower() == "lion":
            from ...optim.lion import Lion
            return Lion
        return getattr(torch.optim, self.type)


def _betas(b, parts):
    if not (isinstance(b, (list, tuple)) and len(b) == 2):
        fail(parts, f"must be a list of two numbers, got {b!r}")
    return [as_float(b[i], parts + [i], minimum=0.0, below=1.0) for i in range(2)]


def _parse_adam(kind, p, pp, inert):
    check_keys(p, pp, ADAM_KEYS, inert=ADAM_INERT, inert_found=inert)
    out = dict(lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0, adam_w_mode=True, bias_correction=True)
    if "lr" in p:
        out["lr"] = as_float(p["lr"], pp + ["lr"], minimum=0.0)
    if "betas" in p:
        out["betas"] = _betas(p["betas"], pp + ["betas"])
    if "eps" in p:
        out["eps"] = as_float(p["eps"], pp + ["eps"], positive=True)
    if "weight_decay" in p:
        out["weight_decay"] = as_float(p["weight_decay"], pp + ["weight_decay"], minimum=0.0)
    if "bias_correction" in p:
        out["bias_correction"] = as_bool(p["bias_correction"], pp + ["bias_correction"])
    # DeepSpeed's "Adam" is AdamW unless adam_w_mode is false; "AdamW" is always AdamW.
    if "adam_w_mode" in p:
        out["adam_w_mode"] = as_bool(p["adam_w_mode"], pp + ["adam_w_mode"])
        if kind == "AdamW" and not out["adam_w_mode"]:
            fail(pp + ["adam_w_mode"], "must be true for type 'AdamW' (use type 'Adam' for L2 weight decay)")
    if p.get("amsgrad", False) is not False:
        fail(pp + ["amsgrad"], "is not supported by zerofuse (only false)")
    return out


def _parse_lamb(p, pp):
    check_keys(p, pp, LAMB_KEYS + ("max_grad_norm",))
    if "max_grad_norm" in p:
        fail(pp + ["max_grad_norm"], "is not an optimizer parameter (as in DeepSpeed): use the top-level "
                                     "'gradient_clipping'")
    out = dict(lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0, bias_correction=True, max_coeff=10.0,
               min_coeff=0.01, eps_inside_sqrt=False)
    for key in ("lr", "weight_decay", "max_coeff", "min_coeff"):
        if key in p:
            out[key] = as_float(p[key], pp + [key], minimum=0.0)
    if "eps" in p:
        out["eps"] = as_float(p["eps"], pp + ["eps"], positive=True)
    if "betas" in p:
        out["betas"] = _betas(p["betas"], pp + ["betas"])
    for key in ("bias_correction", "eps_inside_sqrt"):
        if key in p:
            out[key] = as_bool(p[key], pp + [key])
    if out["min_coeff"] > out["max_coeff"]:
        fail(pp + ["min_coeff"], f"({out['min_coeff']}) must not exceed max_coeff ({out['max_coeff']})")
    if p.get("amsgrad", False) is not False:
        fail(pp + ["amsgrad"], "is not supported by zerofuse's LAMB (only false)")
    return out


def _parse_torch(config: OptimizerConfig, p, pp):
    """Keyword arguments of a torch.optim class, checked against its signature."""
    try:
        cls = config.torch_class()
    except AttributeError:
        fail(pp[:-1] + ["type"], f"{config.type!r} is neither a DeepSpeed optimizer (Adam, AdamW, Lamb, Adagrad, "
                                 "Lion) nor a torch.optim class")
    import torch

    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        fail(pp[:-1] + ["type"], f"torch.optim.{config.type} is not an optimizer class")
    accepted = [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "params")]
    check_keys(p, pp, accepted)
    for key in ("lr", "weight_decay", "momentum", "eps"):
        if key in p and not isinstance(p[key], bool):
            as_float(p[key], pp + [key], minimum=0.0)
    if "betas" in p:
        _betas(p["betas"], pp + ["betas"])
    return dict(p)


def parse_optimizer(raw, inert) -> OptimizerConfig:
    parts = ["optimizer"]
    s = as_section(raw, parts)
    check_keys(s, parts, {"type", "params"}, inert={"legacy_fusion"}, inert_found=inert)
    if "type" not in s:
        fail(parts + ["type"], "is required (for example 'AdamW', 'Adam', 'Lamb', 'Adagrad', 'Lion', 'SGD')")
    kind = as_str(s["type"], parts + ["type"])
    if kind.lower() in UNSUPPORTED:
        fail(parts + ["type"], f"{UNSUPPORTED[kind.lower()]} ({kind!r}) is not supported by zerofuse; use 'Adam', "
                               "'AdamW' or 'Lamb'")
    p = as_section(s.get("params", {}), parts + ["params"])
    pp = parts + ["params"]
    canonical = {"adam": "Adam", "adamw": "AdamW", "lamb": "Lamb", "adagrad": "Adagrad", "lion": "Lion"}
    c = OptimizerConfig(type=canonical.get(kind.lower(), kind))
    if c.kind == "adam":
        c.params = _parse_adam(c.type, p, pp, inert)
    elif c.kind == "lamb":
        c.params = _parse_lamb(p, pp)
    else:
        c.params = _parse_torch(c, p, pp)
    return c
