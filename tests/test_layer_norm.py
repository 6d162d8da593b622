import pytest
import torch
import torch.nn.functional as F

import zerofuse
from zerofuse import _C
from zerofuse.ops import layer_norm

from conftest import FLOAT_DTYPES, assert_close

# Hidden sizes: tiny, odd, a vector-width multiple, and one no vector width divides.
SHAPES = [(1, 1), (3, 5), (4, 3), (7, 768), (2, 4097), (33, 1001)]


def reference(x, w, b, eps, dy):
    """F.layer_norm and its gradients in float64 from the same (rounded) inputs."""
    x64 = x.detach().double().requires_grad_()
    w64 = None if w is None else w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    y = F.layer_norm(x64, x.shape[-1:], w64, b64, eps)
    y.backward(dy.double())
    return y, x64.grad, None if w is None else w64.grad, None if b is None else b64.grad


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_forward_backward_match_float64(dtype, shape, affine):
    rows, d = shape
    x = (torch.randn(rows, d) * 2 + 0.5).to(dtype).requires_grad_()
    w = (torch.randn(d) + 1).to(dtype).requires_grad_() if affine in ("both", "weight") else None
    b = torch.randn(d).to(dtype).requires_grad_() if affine in ("both", "bias") else None
    y = layer_norm(x, (d,), w, b, eps=1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn(rows, d).to(dtype)
    y.backward(dy)
    y_ref, dx_ref, dw_ref, db_ref = reference(x, w, b, 1e-5, dy)
    # Outputs are rounded once to dtype; reductions over rows add a few roundings.
    assert_close(y, y_ref, dtype, what="y")
    # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight: the
    # roundings of g are multiplied by rstd (1/sqrt(eps) for a constant row).
    g = dy.double() * (w.detach().double() if w is not None else 1.0)
    rstd = 1.0 / torch.sqrt(x.detach().double().var(-1, unbiased=False) + 1e-5)
    assert_close(x.grad, dx_ref, dtype, factor=8, what="dx", scale=(g.abs().max() * rstd.max()).item())
    if w is not None:
        assert_close(w.grad, dw_ref, dtype, factor=8, what="dweight")
    if b is not None:
        assert_close(b.grad, db_ref, dtype, factor=8, what="dbias")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_with_float32_parameters(dtype):
    x = torch.randn(9, 130).to(dtype).requires_grad_()
    w = torch.randn(130, requires_grad=True)
    b = torch.randn(130, requires_grad=True)
    y = layer_norm(x, (130,), w, b)
    assert y.dtype == dtype
    dy = torch.randn(9, 130).to(dtype)
    y.backward(dy)
    y_ref, dx_ref, dw_ref, db_ref = reference(x, w, b, 1e-5, dy)
    assert_close(y, y_ref, dtype)
    assert_close(x.grad, dx_ref, dtype, factor=8)
    assert w.grad.dtype == torch.float32
    assert_close(w.grad, dw_ref, torch.float32, factor=64)
    assert_close(b.grad, db_ref, torch.float32, factor=64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_rounding_matches_torch_including_ties_nan_and_overflow(dtype):
    """With weight 0 and a float32 bias, y is the bias rounded to the input
    dtype: the vectorised row conversion must round exactly as torch does
    (to nearest, ties to even), keep NaN, overflow to inf, and handle the
    elements after the last full vector (771 = 96 * 8 + 3)."""
    d = 771
    finfo = torch.finfo(dtype)
    representable = (torch.randn(d) * 100).to(dtype).float()
    # The spacing of `dtype` above each value: x = m * 2^e with m in [0.5, 1) puts it at 2^(e-1) * eps,
    # so +0.5 of it is an exact tie (float32 holds it exactly); the other offsets round one way.
    _, exponent = torch.frexp(representable)
    ulp = torch.ldexp(torch.full_like(representable, finfo.eps), exponent - 1)
    bias = representable + ulp * torch.tensor([0.5, 0.5, 0.25, 0.75, 0.0]).repeat(d // 5 + 1)[:d]
    bias[:12] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0e38, -3.0e38, 1e-40, -1e-40,
                              finfo.max * 1.0009765625, 65520.0, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -9, 0.0])
    bias[-3:] = torch.tensor([1.0 + 2.0 ** -11, float("nan"), 2.5 * finfo.eps])  # the scalar tail
    x = torch.randn(5, d).to(dtype)
    out = torch.full_like(x, 7.0)
    _C.layer_norm_forward(x, torch.zeros(d), bias, 1e-5, out, torch.empty(5), torch.empty(5))
    want = bias.to(dtype).expand(5, d)
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.nan_to_num(0.0), want.nan_to_num(0.0))


def test_multi_dimensional_normalized_shape_and_leading_dims():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    w = torch.randn(4, 5, requires_grad=True)
    b = torch.randn(4, 5, requires_grad=True)
    y = layer_norm(x, (4, 5), w, b, eps=1e-3)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y_ref = F.layer_norm(x64, (4, 5), w64, b64, 1e-3)
    y_ref.backward(dy.double())
    assert_close(y, y_ref, torch.float32)
    assert_close(x.grad, x64.grad, torch.float32, factor=16)
    assert_close(w.grad, w64.grad, torch.float32, factor=16)


def test_non_contiguous_input():
    x = torch.randn(16, 10).t()  # [10, 16], transposed storage
    y = layer_norm(x, (16,))
    assert_close(y, F.layer_norm(x.double(), (16,)), torch.float32)


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_float64(affine):
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True) if affine else None
    b = torch.randn(7, dtype=torch.float64, requires_grad=True) if affine else None
    assert torch.autograd.gradcheck(lambda a, c, d: layer_norm(a, (7,), c, d), (x, w, b))


def test_module_is_a_drop_in_for_torch_layernorm():
    ref = torch.nn.LayerNorm(48, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    mine = zerofuse.nn.LayerNorm(48, eps=1e-6)
    mine.load_state_dict(ref.state_dict())
    assert list(mine.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    assert isinstance(mine, torch.nn.LayerNorm)
    x = torch.randn(6, 48)
    expected = F.layer_norm(x.double(), (48,), ref.weight.double(), ref.bias.double(), 1e-6)
    assert_close(mine(x), expected, torch.float32)
    nobias = zerofuse.nn.LayerNorm(8, bias=False)
    assert "bias" not in dict(nobias.named_parameters())
    nobias(torch.randn(3, 8)).sum().backward()


def test_every_output_element_is_written():
    x = torch.randn(5, 33)
    out = torch.full_like(x, float("nan"))
    mean = torch.full((5,), float("nan"))
    rstd = torch.full((5,), float("nan"))
    _C.layer_norm_forward(x, None, None, 1e-5, out, mean, rstd)
    assert torch.isfinite(out).all() and torch.isfinite(mean).all() and torch.isfinite(rstd).all()
    dx = torch.full_like(x, float("nan"))
    dw = torch.full((33,), float("nan"))
    db = torch.full((33,), float("nan"))
    _C.layer_norm_backward(torch.randn_like(x), x, torch.ones(33), mean, rstd, dx, dw, db)
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all() and torch.isfinite(db).all()


def test_bad_arguments_name_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="'normalized_shape' \\[7\\] must match the last dimensions"):
        layer_norm(x, (7,))
    with pytest.raises(ValueError, match="'weight' must have shape \\[8\\]"):
        layer_norm(x, (8,), torch.ones(9))
    with pytest.raises(TypeError, match="'weight' must be float32"):
        _C.layer_norm_forward(x, torch.ones(8, dtype=torch.int32), None, 1e-5, torch.empty_like(x),
                              torch.empty(4), torch.empty(4))
    with pytest.raises(ValueError, match="'mean' must have one element per row of 'input' \\(4\\)"):
        _C.layer_norm_forward(x, None, None, 1e-5, torch.empty_like(x), torch.empty(3), torch.empty(4))
    with pytest.raises(ValueError, match="'eps' must be a finite number >= 0"):
        _C.layer_norm_forward(x, None, None, -1.0, torch.empty_like(x), torch.empty(4), torch.empty(4))
    with pytest.raises(ValueError, match="'out' must be contiguous"):
        _C.layer_norm_forward(x, None, None, 1e-5, torch.empty(8, 4).t(), torch.empty(4), torch.empty(4))
