"""Optimizers other than the fused Adam: LAMB (config "Lamb", DeepSpeed's
FusedLamb), element-wise torch optimizers on the master shard (SGD, Adagrad,
Lion), the element-wise check, DeepSpeed's untested-optimizer gate, and
prescale_gradients / gradient_predivide_factor. Each engine run is compared
with the same optimizer in one process on the whole batch."""
import contextlib
import io
import math

import pytest
import torch
import torch.distributed as dist

import zerofuse
from dist_harness import gather_master, run_world
from tiny_gpt import TinyGPT, batch
from zerofuse.optim import Lamb, Lion
from zerofuse.runtime.config import ConfigError
from zerofuse.runtime.update_rules import is_elementwise

STEPS, MICRO = 3, 2


def lamb_reference(params, grads_per_step, lr, betas, eps, wd, min_coeff, max_coeff, bias_correction=True):
    """DeepSpeed's FusedLamb arithmetic in float64, written from its kernel's formulas."""
    params = [p.double().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    b1, b2 = betas
    for t, grads in enumerate(grads_per_step, start=1):
        size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if bias_correction else lr
        for p, g, mi, vi in zip(params, grads, m, v):
            g = g.double()
            mi.mul_(b1).add_((1 - b1) * g)
            vi.mul_(b2).add_((1 - b2) * g * g)
            update = mi / (vi.sqrt() + eps) + wd * p
            w, u = p.norm().item(), update.norm().item()
            ratio = min(max(w / u, min_coeff), max_coeff) if w > 0 and u > 0 else 1.0
            p.sub_(size * ratio * update)
    return params


def test_lamb_matches_the_float64_formula():
    torch.manual_seed(0)
    shapes = [(7, 5), (13,), (3, 1, 4)]
    values = [torch.randn(s) for s in shapes] + [torch.zeros(6)]  # a zero parameter: ratio 1
    grads = [[torch.randn(p.shape) for p in values] for _ in range(4)]
    params = [torch.nn.Parameter(v.clone()) for v in values]
    opt = Lamb(params, lr=0.02, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05, min_coeff=0.05, max_coeff=3.0)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    expected = lamb_reference(values, grads, 0.02, (0.9, 0.98), 1e-6, 0.05, 0.05, 3.0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)


def _train(engine, rank, world, steps=STEPS):
    losses = []
    for step in range(steps):
        tokens, targets = batch(step, MICRO * world)
        rows = slice(rank * MICRO, (rank + 1) * MICRO)
        loss = engine(tokens[rows], targets[rows])
        engine.backward(loss)
        engine.step()
        total = loss.detach().float().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def _engine(config, optimizer=None, model=None):
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = zerofuse.initialize(model=model or TinyGPT(), config=config, optimizer=optimizer)
    return engine


def _reference(make_optimizer, world, clip=1.0, steps=STEPS):
    model = TinyGPT()
    opt = make_optimizer(model.parameters())
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = model(*batch(step, MICRO * world))
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach() for n, p in model.named_parameters()}


LAMB = {"lr": 0.01, "weight_decay": 0.01, "max_coeff": 5.0, "min_coeff": 0.02}
CONFIGS = {
    "lamb": ({"type": "Lamb", "params": LAMB}, lambda ps: Lamb(ps, **LAMB)),
    "sgd": ({"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}},
            lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "adagrad": ({"type": "Adagrad", "params": {"lr": 0.05}}, lambda ps: torch.optim.Adagrad(ps, lr=0.05)),
    "lion": ({"type": "Lion", "params": {"lr": 1e-3, "weight_decay": 0.1}},
             lambda ps: Lion(ps, lr=1e-3, weight_decay=0.1)),
}


def _config(kind, stage):
    return {"train_micro_batch_size_per_gpu": MICRO, "steps_per_print": 1000, "gradient_clipping": 1.0,
            "zero_allow_untested_optimizer": True, "optimizer": CONFIGS[kind][0],
            # Small buckets: parameters split across ranks, so LAMB's norms need every rank.
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 500}}


def _train_kinds(rank, world, stage):
    out = {}
    for kind in CONFIGS:
        engine = _engine(_config(kind, stage))
        out[kind] = (_train(engine, rank, world), gather_master(engine))
    return out


def _assert_same_updates(master, ref_params, kind):
    """Element-wise for the well-conditioned updates; as a relative norm for
    the sign-like ones (Adagrad's first steps and Lion move an element by about
    lr whatever its gradient's size, so a gradient that rounds to the other side
    of zero in another summation order flips that element's step)."""
    initial = {n: p.detach() for n, p in TinyGPT().named_parameters()}
    if kind in ("lamb", "sgd"):
        for name, value in ref_params.items():
            torch.testing.assert_close(master[name], value, rtol=1e-5, atol=1e-6, msg=f"{kind}: {name}")
        return
    moved = torch.cat([(master[n] - initial[n]).flatten() for n in ref_params])
    ref_moved = torch.cat([(ref_params[n] - initial[n]).flatten() for n in ref_params])
    assert ((moved - ref_moved).norm() / ref_moved.norm()).item() < 2e-2, kind


@pytest.mark.parametrize("world,stage", [(1, 0), (3, 2)])
def test_config_optimizers_match_one_process(world, stage):
    results = run_world(world, _train_kinds, stage) if world > 1 else _train_kinds(0, 1, stage)
    for kind, (losses, master) in results.items():
        ref_losses, ref_params = _reference(CONFIGS[kind][1], world)
        assert losses == pytest.approx(ref_losses, rel=1e-5), kind
        _assert_same_updates(master, ref_params, kind)


def _client_rmsprop(rank, world):
    config = {"train_micro_batch_size_per_gpu": MICRO, "steps_per_print": 1000, "gradient_clipping": 1.0,
              "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": 1, "reduce_bucket_size": 500}}
    model = TinyGPT()
    engine = _engine(config, torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.5), model)
    return _train(engine, rank, world), gather_master(engine)


def test_a_client_torch_optimizer_runs_on_the_shards():
    losses, master = run_world(2, _client_rmsprop)
    ref_losses, ref_params = _reference(lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5), 2)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for name, value in ref_params.items():
        torch.testing.assert_close(master[name], value, rtol=1e-5, atol=1e-6)


class NormalizedSGD(torch.optim.Optimizer):
    """Steps along g / |g| per tensor: reads a whole tensor's norm."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad / (p.grad.norm() + 1e-12), alpha=-group["lr"])


def test_the_elementwise_check_tells_the_kinds_apart():
    assert is_elementwise(torch.optim.SGD, dict(lr=0.1, momentum=0.9))
    assert is_elementwise(torch.optim.Adagrad, torch.optim.Adagrad([torch.zeros(1)]).defaults)
    assert is_elementwise(Lion, dict(lr=1e-3))
    assert not is_elementwise(NormalizedSGD, dict(lr=0.1))
    assert not is_elementwise(Lamb, dict(lr=0.1))
    assert not is_elementwise(torch.optim.LBFGS, dict(lr=0.1))  # needs a closure


def test_whole_parameter_optimizers_run_at_stage_0_and_are_refused_above():
    base = {"train_micro_batch_size_per_gpu": MICRO, "steps_per_print": 1000, "zero_allow_untested_optimizer": True}
    model = TinyGPT()
    engine = _engine(dict(base, zero_optimization={"stage": 0}), NormalizedSGD(model.parameters()), model)
    losses = _train(engine, 0, 1)
    ref_losses, ref_params = _reference(lambda ps: NormalizedSGD(ps), 1, clip=0.0)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for name, p in engine.module.named_parameters():
        torch.testing.assert_close(p.detach(), ref_params[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="NormalizedSGD updates an element from more than its own values"):
        model = TinyGPT()
        _engine(dict(base, zero_optimization={"stage": 1}), NormalizedSGD(model.parameters()), model)


def test_untested_optimizers_need_deepspeeds_flag_under_zero():
    config = {"train_micro_batch_size_per_gpu": MICRO, "zero_optimization": {"stage": 1},
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    with pytest.raises(ConfigError, match="zero_allow_untested_optimizer"):
        _engine(config)
    _engine(dict(config, optimizer={"type": "Adagrad", "params": {"lr": 0.1}}))  # tested by DeepSpeed: no flag


def _prescaled(rank, world):
    out = {}
    for name, extra in (("default", {}), ("prescale", {"prescale_gradients": True}),
                        ("predivide", {"gradient_predivide_factor": 2.0})):
        config = dict({"train_micro_batch_size_per_gpu": MICRO, "steps_per_print": 1000,
                       "zero_optimization": {"stage": 2, "reduce_bucket_size": 500},
                       "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}, **extra)
        out[name] = _train(_engine(config), rank, world)
    return out


def test_prescale_and_predivide_move_the_divide_not_the_result():
    results = run_world(2, _prescaled)
    assert results["prescale"] == pytest.approx(results["default"], rel=1e-5)
    assert results["predivide"] == pytest.approx(results["default"], rel=1e-5)
