"""The fused scaled, masked softmax and attention's arbitrary-mask path
against PyTorch in float64."""
import pytest
import torch
import torch.nn.functional as F

from zerofuse import _C
from zerofuse.ops import attention, masked_softmax

from conftest import FLOAT_DTYPES, assert_close

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
NEG_INF = float("-inf")


def reference(x, mask, scale, causal):
    """softmax(x * scale + mask) in float64, rows with nothing left as zeros."""
    z = x.double() * scale
    if mask is not None:
        z = z + (torch.zeros((), dtype=torch.float64).masked_fill(~mask, NEG_INF) if mask.dtype == torch.bool
                 else mask.double())
    if causal:
        rows, n = z.shape[-2], z.shape[-1]
        z = z.masked_fill(~torch.ones(rows, n, dtype=torch.bool).tril(), NEG_INF)
    empty = (z == NEG_INF).all(dim=-1, keepdim=True)
    return torch.softmax(z.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)


def make_mask(kind, shape, dtype):
    b, h, q, k = shape
    if kind == "none":
        return None
    if kind == "bool-keys":  # [batch, 1, 1, k], a whole row masked out in batch 0
        m = torch.rand(b, 1, 1, k) > 0.3
        m[0, ..., :] = False if q == 1 else m[0, ..., :]
        return m
    if kind == "bool-full":
        m = torch.rand(b, h, q, k) > 0.4
        m[0, 0, 0, :] = False  # a row with nothing left
        return m
    if kind == "bias-heads":  # [heads, q, k] additive, as a relative-position bias, with -inf holes
        m = torch.randn(h, q, k).to(dtype)
        m[:, :, 0] = NEG_INF
        return m
    if kind == "bias-fp32":  # float32 mask beside a low-precision input
        return torch.randn(1, 1, q, k)
    raise AssertionError(kind)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 33, 129), (2, 1, 1, 1), (1, 1, 17, 1000)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["none", "bool-keys", "bool-full", "bias-heads", "bias-fp32"])
@pytest.mark.parametrize("causal", [False, True])
def test_masked_softmax_matches_float64(dtype, shape, kind, causal):
    x = (torch.randn(shape) * 4).to(dtype).requires_grad_()
    mask = make_mask(kind, shape, dtype)
    scale = 0.375
    y = masked_softmax(x, mask, scale=scale, causal=causal)
    x64 = x.detach().double().requires_grad_()
    ref = reference(x64, mask, scale, causal)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ref, dtype, factor=4, what="probabilities")
    grad = torch.randn(shape).to(dtype)
    y.backward(grad)
    ref.backward(grad.double())
    assert_close(x.grad, x64.grad, dtype, factor=8, what="grad", scale=grad.abs().max().item())


def test_masked_softmax_float64_gradcheck_and_learned_bias():
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 1, 6, dtype=torch.float64, requires_grad=True)  # broadcast over batch and queries
    assert torch.autograd.gradcheck(lambda a, b: masked_softmax(a, b, scale=0.5, causal=True), (x, bias))
    # The bias gets the gradient of the softmax input summed over where it was broadcast.
    y = masked_softmax(x, bias, scale=0.5)
    g = torch.randn_like(y)
    y.backward(g)
    x2, b2 = x.detach().requires_grad_(), bias.detach().requires_grad_()
    torch.softmax(x2 * 0.5 + b2, -1).backward(g)
    torch.testing.assert_close(bias.grad, b2.grad, rtol=1e-12, atol=1e-12)


def test_masked_softmax_fully_masked_rows_are_zero_and_nan_propagates():
    x = torch.randn(2, 4, 5)
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[1, 2] = False
    y = masked_softmax(x, mask)
    assert torch.all(y[1, 2] == 0) and torch.isfinite(y).all()
    x[0, 1, 3] = float("nan")
    y = masked_softmax(x, mask)
    assert torch.isnan(y[0, 1]).all() and torch.isfinite(y[0, 0]).all()  # as torch.softmax: the row only


def test_masked_softmax_raw_kernel_writes_every_element():
    x = torch.randn(3, 2, 9, 31)
    mask = torch.rand(3, 1, 9, 31) > 0.5
    out = torch.full_like(x, float("nan"))
    _C.masked_softmax_forward(x, mask.expand(x.shape), 0.25, True, out)
    assert_close(out, reference(x, mask, 0.25, True), torch.float32)
    dy, dx = torch.randn_like(x), torch.full_like(x, float("nan"))
    _C.masked_softmax_backward(dy, out, 0.25, dx)
    y64 = out.double()
    assert_close(dx, 0.25 * y64 * (dy.double() - (dy.double() * y64).sum(-1, keepdim=True)), torch.float32)
    _C.masked_softmax_backward(dy, out, 0.25, dy)  # in place over the incoming gradient
    assert torch.equal(dy, dx)


def test_masked_softmax_bad_input():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"'mask' of shape \[5\] must broadcast to the input's shape \[2, 3, 4\]"):
        masked_softmax(x, torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="'mask' must be bool .* got torch.int64"):
        masked_softmax(x, torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="'input' must have 1 to 4 dimensions"):
        masked_softmax(torch.randn(1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="causal masking needs 'input' of at least 2 dimensions"):
        masked_softmax(torch.randn(4), causal=True)
    with pytest.raises(TypeError, match="'input' must be float32, float16 or bfloat16"):
        masked_softmax(torch.ones(3, dtype=torch.int32))
    # The core checks what reaches it directly, without the Python wrapper.
    with pytest.raises(ValueError, match=r"argument 'mask' must have the shape of 'input' \[2, 3, 4\]"):
        _C.masked_softmax_forward(x, torch.ones(3, 4, dtype=torch.bool), 1.0, False, torch.empty_like(x))
    with pytest.raises(ValueError, match="'scale' must be finite"):
        _C.masked_softmax_forward(x, None, float("inf"), False, torch.empty_like(x))
    with pytest.raises(ValueError, match="argument 'grad_out' must have the shape of 'out'"):
        _C.masked_softmax_backward(torch.randn(2, 3), x, 1.0, torch.empty_like(x))


def test_opcheck_masked_softmax():
    x = torch.randn(2, 3, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.zerofuse.masked_softmax.default, (x, torch.rand(3, 5) > 0.3, 0.5, True),
                          test_utils=OPCHECK_TESTS)
    bias = torch.randn(1, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.zerofuse.masked_softmax.default, (x, bias, 0.5, False), test_utils=OPCHECK_TESTS)


# --- attention with an arbitrary mask ------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mask_kind", ["bool-window", "additive-heads"])
@pytest.mark.parametrize("with_padding", [False, True])
def test_attention_with_arbitrary_mask_matches_sdpa_in_float64(dtype, mask_kind, with_padding):
    b, h, sq, sk, d = 2, 3, 11, 13, 16
    q, k, v = ((torch.randn(b, h, n, d)).to(dtype).requires_grad_() for n in (sq, sk, sk))
    if mask_kind == "bool-window":  # a sliding window: neither causal nor key padding
        i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
        mask = (j <= i) & (j > i - 4)
    else:
        mask = torch.randn(h, sq, sk).to(dtype)
    padding = torch.rand(b, sk) > 0.3 if with_padding else None
    if padding is not None:
        padding[:, 0] = True  # every query keeps a key, so SDPA has no NaN rows to compare
    out = attention(q, k, v, attn_mask=mask, key_padding_mask=padding)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    full = mask if mask.dtype == torch.bool else mask.double()
    if padding is not None:
        keys = padding[:, None, None, :]
        full = full & keys if full.dtype == torch.bool else full.masked_fill(~keys, NEG_INF)
    ref = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=full)
    assert_close(out, ref, dtype, factor=16, what="out")
    g = torch.randn_like(ref)
    out.backward(g.to(dtype))
    ref.backward(g)
    for got, want, what in ((q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"), (v.grad, v64.grad, "dv")):
        assert_close(got, want, dtype, factor=32, what=what)


def test_attention_arbitrary_mask_agrees_with_the_flash_path_where_both_apply():
    q, k, v = (torch.randn(2, 2, 9, 8) for _ in range(3))
    padding = torch.rand(2, 9) > 0.3
    padding[:, 0] = True
    flash = attention(q, k, v, causal=True, key_padding_mask=padding)
    as_mask = attention(q, k, v, attn_mask=padding[:, None, None, :], causal=True)
    torch.testing.assert_close(as_mask, flash, rtol=1e-5, atol=1e-6)


def test_attention_bad_attn_mask():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"'attn_mask' of shape \[2, 5\] must broadcast to .* \[1, 2, 3, 3\]"):
        attention(q, q, q, attn_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="'attn_mask' must be bool .* got torch.int32"):
        attention(q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.int32))


def test_compile_fullgraph_attention_with_bias():
    bias = torch.randn(2, 6, 6, requires_grad=True)

    def block(q, b):
        return attention(q, q, q, attn_mask=b).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    q = torch.randn(1, 2, 6, 4, requires_grad=True)
    loss = compiled(q, bias)
    grads = torch.autograd.grad(loss, (q, bias))
    q2, b2 = q.detach().requires_grad_(), bias.detach().requires_grad_()
    ref = F.scaled_dot_product_attention(q2, q2, q2, attn_mask=b2).sum()
    want = torch.autograd.grad(ref, (q2, b2))
    torch.testing.assert_close(loss, ref)
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got, exp)
