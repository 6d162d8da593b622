import copy

import numpy as np
import pytest
import torch

import zerofuse
from zerofuse import _C
from zerofuse.optim import FusedAdam

from conftest import EPS, assert_close

HYPER = dict(lr=3e-3, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1)


def reference_step(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, adam_w_mode, bias_correction, step,
                   grad_scale=1.0):
    """One Adam/AdamW step in float64, written from the papers' formulas."""
    p, g, m, v = (t.double() for t in (p, g, m, v))
    g = g * grad_scale
    if not adam_w_mode:
        g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    bc1 = 1 - beta1**step if bias_correction else 1.0
    bc2 = 1 - beta2**step if bias_correction else 1.0
    if adam_w_mode:
        p = p * (1 - lr * weight_decay)
    p = p - (lr / bc1) * m / (v.sqrt() / bc2**0.5 + eps)
    return p, m, v


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("copy_dtype", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("adam_w_mode", [True, False])
@pytest.mark.parametrize("n", [1, 3, 4097, 100_003])
def test_flat_step_matches_float64(grad_dtype, copy_dtype, adam_w_mode, n):
    p = torch.randn(n)
    g = (torch.randn(n) * 1000).to(grad_dtype)  # scaled gradient, unscaled by inv_scale
    m = torch.randn(n) * 0.1
    v = torch.rand(n) * 0.01
    copy = torch.full((n,), float("nan"), dtype=copy_dtype) if copy_dtype else None
    kw = dict(HYPER, adam_w_mode=adam_w_mode, bias_correction=True, step=7)
    expected = reference_step(p, g, m, v, grad_scale=1e-3 * 0.5, **kw)
    _C.adam_step(p, g, m, v, copy, inv_scale=1e-3, clip_coef=0.5, **kw)
    for got, want, what in zip((p, m, v), expected, ("param", "exp_avg", "exp_avg_sq")):
        assert_close(got, want, torch.float32, factor=64, what=what)
    if copy is not None:
        assert torch.equal(copy, p.to(copy_dtype)), "the low-precision copy is the rounded updated param"


@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_multi_tensor_step_matches_float64(dtype, state_dtype):
    sizes = [1, 3, 4097, 768, 50_000, 7]
    ps = [torch.randn(s).to(dtype) for s in sizes]
    gs = [torch.randn(s).to(dtype) for s in sizes]
    ms = [(torch.randn(s) * 0.1).to(state_dtype) for s in sizes]
    vs = [(torch.rand(s) * 0.01).to(state_dtype) for s in sizes]
    kw = dict(HYPER, adam_w_mode=True, bias_correction=False, step=3)
    expected = [reference_step(p, g, m, v, **kw) for p, g, m, v in zip(ps, gs, ms, vs)]
    _C.adam_step_multi(ps, gs, ms, vs, **kw)
    for i, (p, m, v) in enumerate(zip(ps, ms, vs)):
        # Each result is rounded once to its storage dtype.
        assert_close(p, expected[i][0], dtype, factor=2 if dtype != torch.float32 else 64, what=f"param {i}")
        assert_close(m, expected[i][1], state_dtype, factor=2 if state_dtype != torch.float32 else 64)
        assert_close(v, expected[i][2], state_dtype, factor=2 if state_dtype != torch.float32 else 64)


def test_device_scalars_skip_and_multiply():
    p, g, m, v = torch.randn(1000), torch.randn(1000), torch.zeros(1000), torch.zeros(1000)
    kw = dict(HYPER, adam_w_mode=True, bias_correction=True, step=1)
    before = [t.clone() for t in (p, m, v)]
    _C.adam_step(p, g, m, v, skip_if_nonzero=torch.ones(1), **kw)
    assert all(torch.equal(a, b) for a, b in zip((p, m, v), before)), "a skipped step writes nothing"
    expected = reference_step(p, g, m, v, grad_scale=0.25 * 0.5, **kw)
    _C.adam_step(p, g, m, v, inv_scale=0.5, grad_multiplier=torch.tensor([0.25]), skip_if_nonzero=torch.zeros(1), **kw)
    assert_close(p, expected[0], torch.float32, factor=64)


@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_learning_rate_from_a_tensor(adam_w_mode):
    # lr_tensor replaces lr (passed as 0 here, so a kernel that ignored the tensor would not move p).
    sizes = [5, 4099]
    ps, gs = [torch.randn(s) for s in sizes], [torch.randn(s) for s in sizes]
    ms, vs = [torch.randn(s) * 0.1 for s in sizes], [torch.rand(s) * 0.01 for s in sizes]
    kw = dict(HYPER, adam_w_mode=adam_w_mode, bias_correction=True, step=4)
    expected = [reference_step(p, g, m, v, **dict(kw, lr=0.0125)) for p, g, m, v in zip(ps, gs, ms, vs)]
    lr = torch.tensor([0.0125], dtype=torch.float64)
    _C.adam_step_multi(ps, gs, ms, vs, lr_tensor=lr, **dict(kw, lr=0.0))
    for p, want in zip(ps, expected):
        assert_close(p, want[0], torch.float32, factor=64)
    p, g, m, v = torch.randn(77), torch.randn(77), torch.zeros(77), torch.zeros(77)
    want = reference_step(p, g, m, v, **dict(kw, lr=0.0125))
    _C.adam_step(p, g, m, v, lr_tensor=lr, **dict(kw, lr=0.0))
    assert_close(p, want[0], torch.float32, factor=64)


def test_learning_rate_tensor_is_checked_before_any_tensor_changes():
    p, g, m, v = torch.randn(9), torch.randn(9), torch.zeros(9), torch.zeros(9)
    before = p.clone()
    kw = dict(HYPER, adam_w_mode=True, bias_correction=True, step=1)
    with pytest.raises(ValueError, match="'lr_tensor' must be a float64 tensor of one element"):
        _C.adam_step(p, g, m, v, lr_tensor=torch.tensor([1e-3]), **kw)  # float32
    with pytest.raises(ValueError, match="'lr_tensor' must be a float64 tensor of one element"):
        _C.adam_step(p, g, m, v, lr_tensor=torch.zeros(2, dtype=torch.float64), **kw)
    for bad in (-1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="'lr_tensor' must be a finite number >= 0"):
            _C.adam_step(p, g, m, v, lr_tensor=torch.tensor([bad], dtype=torch.float64), **kw)
    assert torch.equal(p, before)


def test_fused_adam_with_a_tensor_learning_rate_follows_its_schedule():
    torch.manual_seed(3)
    start = [torch.randn(31, 7), torch.randn(129)]
    by_number = [torch.nn.Parameter(t.clone()) for t in start]
    by_tensor = [torch.nn.Parameter(t.clone()) for t in start]
    opt_n = FusedAdam(by_number, lr=0.02, weight_decay=0.1)
    opt_t = FusedAdam(by_tensor, lr=torch.tensor(0.02, dtype=torch.float64), weight_decay=0.1)
    sched_n = torch.optim.lr_scheduler.StepLR(opt_n, step_size=3, gamma=0.5)
    sched_t = torch.optim.lr_scheduler.StepLR(opt_t, step_size=3, gamma=0.5)
    for _ in range(8):
        for a, b in zip(by_number, by_tensor):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt_n.step()
        opt_t.step()
        sched_n.step()
        sched_t.step()
    assert isinstance(opt_t.param_groups[0]["lr"], torch.Tensor)
    assert float(opt_t.param_groups[0]["lr"]) == pytest.approx(0.02 * 0.5**2)
    for a, b in zip(by_number, by_tensor):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=0)


def test_numpy_buffers_through_dlpack():
    rng = np.random.default_rng(0)
    p, g = rng.standard_normal(999).astype(np.float32), rng.standard_normal(999).astype(np.float32)
    m, v = np.zeros(999, np.float32), np.zeros(999, np.float32)
    kw = dict(HYPER, adam_w_mode=False, bias_correction=True, step=1)
    expected = reference_step(*(torch.from_numpy(a.copy()) for a in (p, g, m, v)), **kw)
    _C.adam_step(p, g, m, v, **kw)
    assert_close(torch.from_numpy(p), expected[0], torch.float32, factor=64)


def _torch_and_fused(make_params, torch_cls, **kw):
    params = make_params()
    ref = [torch.nn.Parameter(t.clone()) for t in params]
    mine = [torch.nn.Parameter(t.clone()) for t in params]
    return ref, torch_cls(ref, **kw), mine


@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=1e-3, weight_decay=0.0),  # explicit: AdamW defaults to 0.01, FusedAdam to 0
        dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
        dict(lr=3e-3, betas=(0.95, 0.999), weight_decay=0.01),
        dict(lr=5e-4, betas=(0.0, 0.5), eps=1e-3, weight_decay=0.0),
    ],
)
@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_fused_adam_matches_torch_over_50_steps(kw, adam_w_mode):
    shapes = [(33, 17), (4097,), (1,), (3, 5, 7)]
    params = [torch.randn(s) for s in shapes]
    ref = [torch.nn.Parameter(t.clone()) for t in params]
    mine = [torch.nn.Parameter(t.clone()) for t in params]
    torch_cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    ref_opt = torch_cls(ref, **kw)
    opt = FusedAdam(mine, adam_w_mode=adam_w_mode, **kw)
    for step in range(50):
        for a, b in zip(ref, mine):
            grad = torch.randn_like(a) * (1 + step % 3)
            a.grad, b.grad = grad.clone(), grad.clone()
        ref_opt.step()
        opt.step()
    for a, b in zip(ref, mine):
        # 50 float32 steps by two different operation orders.
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(ref, mine):
        torch.testing.assert_close(opt.state[b]["exp_avg_sq"], ref_opt.state[a]["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_fused_adam_param_groups_scheduler_and_state_dict_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    groups = [
        {"params": list(model[0].parameters()), "weight_decay": 0.1},
        {"params": list(model[2].parameters()), "lr": 5e-3, "betas": (0.8, 0.9)},
    ]
    opt = FusedAdam(groups, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = torch.randn(32, 9), torch.randn(32, 3)

    def train(m, o, s, steps):
        losses = []
        for _ in range(steps):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            o.step()
            s.step()
            losses.append(loss.item())
        return losses

    train(model, opt, sched, 3)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)  # halved once by StepLR
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    saved_sched = sched.state_dict()
    after = train(model, opt, sched, 4)

    model2 = torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    model2.load_state_dict(saved_model)
    opt2 = FusedAdam([{"params": list(model2[0].parameters()), "weight_decay": 0.1},
                      {"params": list(model2[2].parameters()), "lr": 5e-3, "betas": (0.8, 0.9)}], lr=1e-2)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert train(model2, opt2, sched2, 4) == after


def test_state_dict_moves_between_torch_adamw_and_fused_adam():
    p_ref = torch.nn.Parameter(torch.randn(50))
    ref = torch.optim.AdamW([p_ref], lr=1e-2)
    for _ in range(3):
        p_ref.grad = torch.randn(50)
        ref.step()
    p = torch.nn.Parameter(p_ref.detach().clone())
    opt = FusedAdam([p], lr=1e-2, weight_decay=0.01)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # load shares tensors otherwise
    grad = torch.randn(50)
    p_ref.grad, p.grad = grad.clone(), grad.clone()
    ref.step()
    opt.step()
    torch.testing.assert_close(p.detach(), p_ref.detach(), rtol=1e-5, atol=1e-6)
    back = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=1e-2)
    back.load_state_dict(opt.state_dict())  # and back again


def test_low_precision_params():
    p32 = torch.randn(300)
    p = torch.nn.Parameter(p32.to(torch.bfloat16))
    ref = torch.nn.Parameter(p32.to(torch.bfloat16))
    opt, ref_opt = FusedAdam([p], lr=1e-2), torch.optim.AdamW([ref], lr=1e-2)
    for _ in range(5):
        g = torch.randn(300).to(torch.bfloat16)
        p.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
    # torch rounds after each of its separate passes, we round once: allow a few bf16 ulps.
    torch.testing.assert_close(p.detach().float(), ref.detach().float(), rtol=4 * EPS[torch.bfloat16], atol=1e-3)


def test_bad_input_is_rejected_before_any_tensor_changes():
    ps = [torch.randn(10), torch.randn(20), torch.randn(30)]
    gs = [torch.randn(10), torch.randn(20), torch.randn(31)]  # the last grad has the wrong size
    ms = [torch.zeros(10), torch.zeros(20), torch.zeros(30)]
    vs = [torch.zeros(10), torch.zeros(20), torch.zeros(30)]
    before = [p.clone() for p in ps]
    kw = dict(HYPER, adam_w_mode=True, bias_correction=True, step=1)
    with pytest.raises(ValueError, match="'grads\\[2\\]' must have the shape of 'params\\[2\\]' \\[30\\]"):
        _C.adam_step_multi(ps, gs, ms, vs, **kw)
    assert all(torch.equal(a, b) for a, b in zip(ps, before))
    with pytest.raises(TypeError, match="'exp_avgs\\[0\\]' must be float32"):
        _C.adam_step_multi(ps[:1], gs[:1], [torch.zeros(10, dtype=torch.float16)], vs[:1], **kw)
    with pytest.raises(ValueError, match="same length"):
        _C.adam_step_multi(ps, gs[:2], ms, vs, **kw)
    with pytest.raises(ValueError, match="'beta2' must be in \\[0, 1\\)"):
        _C.adam_step(ps[0], gs[0], ms[0], vs[0], **dict(kw, beta2=1.0))
    with pytest.raises(ValueError, match="'step' must be >= 1"):
        _C.adam_step(ps[0], gs[0], ms[0], vs[0], **dict(kw, step=0))
    with pytest.raises(TypeError, match="'param' must be float32"):
        _C.adam_step(ps[0].half(), gs[0], ms[0], vs[0], **kw)
    with pytest.raises(ValueError, match="'exp_avg' must be contiguous"):
        _C.adam_step(torch.randn(4, 4), torch.randn(4, 4), torch.zeros(4, 4).t(), torch.zeros(4, 4), **kw)
    with pytest.raises(ValueError, match="'skip_if_nonzero' must be a float32 tensor of one element"):
        _C.adam_step(ps[0], gs[0], ms[0], vs[0], skip_if_nonzero=torch.zeros(2), **kw)
    with pytest.raises(TypeError, match="must be a list or tuple of tensors"):
        _C.adam_step_multi(ps[0], gs, ms, vs, **kw)


def test_fused_adam_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="'lr' must be in"):
        FusedAdam(p, lr=-1.0)
    with pytest.raises(ValueError, match="'lr' must be a number or a one-element tensor"):
        FusedAdam(p, lr=torch.tensor([1e-3, 1e-3]))
    with pytest.raises(ValueError, match="'betas\\[1\\]' must be in"):
        FusedAdam(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="'eps' must be in"):
        FusedAdam(p, eps=0.0)
    with pytest.raises(TypeError, match="'adam_w_mode' must be a bool"):
        FusedAdam(p, adam_w_mode=1)
    with pytest.raises(TypeError, match="FusedAdam takes float32, float16 and bfloat16"):
        FusedAdam([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))])
    opt = FusedAdam(p)
    if hasattr(p[0], "grad_dtype"):  # newer torch refuses mismatched grads unless asked
        p[0].grad_dtype = None
    p[0].grad = torch.randn(3, dtype=torch.float16)
    with pytest.raises(TypeError, match="its gradient is torch.float16"):
        opt.step()
    assert len(opt.state) == 0, "a refused step leaves no state behind"
