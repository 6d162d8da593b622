import pytest
import torch
import torch.nn.functional as F

from zerofuse import _C
from zerofuse.ops import attention, attention_qkv_packed

from conftest import FLOAT_DTYPES, assert_close


def reference(q, k, v, causal, mask, scale):
    """softmax(q k^T * scale + mask) v in float64 with the whole score matrix;
    a query that sees no key gives zeros (and zero gradients)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (q @ k.transpose(-1, -2)) * scale
    seen = torch.ones(s.shape[-2:], dtype=torch.bool)
    if causal:
        seen = seen.tril()
    seen = seen.expand(s.shape).clone()
    if mask is not None:
        seen &= mask[:, None, None, :]
    s = s.masked_fill(~seen, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no key: all -inf -> NaN -> 0
    return p @ v, (q, k, v)


def run_and_compare(q, k, v, dtype, causal=False, mask=None, scale=None):
    scale_value = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, causal=causal, key_padding_mask=mask, scale=scale)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref, (q64, k64, v64) = reference(q, k, v, causal, mask, scale_value)
    ref.backward(dout.double())
    assert out.dtype == dtype
    assert_close(out, ref, dtype, factor=8, what="out")
    assert_close(q.grad, q64.grad, dtype, factor=16, what="dq")
    assert_close(k.grad, k64.grad, dtype, factor=16, what="dk")
    assert_close(v.grad, v64.grad, dtype, factor=16, what="dv")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "shape",
    # 300 keys: two key blocks (the online softmax across blocks) and three query blocks
    [(1, 1, 1, 1, 1), (2, 3, 5, 7, 8), (1, 2, 65, 130, 16), (2, 1, 129, 64, 24), (1, 1, 100, 100, 64),
     (1, 2, 300, 300, 40), (1, 1, 37, 300, 19)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_matches_float64_reference(dtype, causal, shape):
    b, h, sq, sk, d = shape
    q, k, v = torch.randn(b, h, sq, d), torch.randn(b, h, sk, d), torch.randn(b, h, sk, d)
    run_and_compare(q, k, v, dtype, causal=causal)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s", [70, 270])  # 270: the mask read at a second key block's offset
def test_key_padding_mask_with_fully_masked_rows(dtype, causal, s):
    b, h, d = 3, 2, 16
    mask = torch.rand(b, s) > 0.3
    mask[1] = False  # batch 1 sees no key at all: zeros out, zero grads
    mask[2, :5] = False  # with causal, batch 2's first queries see nothing
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    run_and_compare(q, k, v, dtype, causal=causal, mask=mask)
    out = attention(q, k, v, key_padding_mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_same_result_as_sdpa_with_equivalent_mask():
    q, k, v = torch.randn(2, 4, 33, 32), torch.randn(2, 4, 47, 32), torch.randn(2, 4, 47, 32)
    mask = torch.rand(2, 47) > 0.2
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask[:, None, None, :])
    assert_close(attention(q, k, v, key_padding_mask=mask), expected, torch.float32, factor=8)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, scale=0.3)
    assert_close(attention(q, k, v, causal=True, scale=0.3), expected, torch.float32, factor=8)


def test_strided_inputs_from_a_bshd_layout():
    # The usual model layout: [B, S, H, D] projected, then viewed as [B, H, S, D].
    qkv = torch.randn(2, 37, 3, 4, 16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    run_and_compare(q, k, v, torch.float32, causal=True)
    out = attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()  # output keeps q's layout: reshape to [B, S, H*D] is free


def test_gradcheck_float64():
    q = torch.randn(1, 2, 9, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 11, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 11, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 8 + [False] * 3])
    for causal in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, causal=causal, key_padding_mask=mask), (q, k, v))


def test_every_output_element_is_written():
    q, k, v = torch.randn(1, 2, 67, 8), torch.randn(1, 2, 67, 8), torch.randn(1, 2, 67, 8)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((1, 2, 67), float("nan"))
    _C.attention_forward(q, k, v, None, True, 0.35, out, lse)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    _C.attention_backward(torch.randn_like(out), q, k, v, out, lse, None, True, 0.35, *grads)
    assert all(torch.isfinite(g).all() for g in grads)


def test_bad_arguments_name_the_argument():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="'q' must be \\[batch, heads, seq, head_dim\\]"):
        attention(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="must share one dtype"):
        attention(q, q.half(), q)
    with pytest.raises(ValueError, match="'k' must be \\[batch, heads, seq_k, head_dim\\] with the batch, heads and head_dim"):
        attention(q, torch.randn(1, 2, 4, 9), torch.randn(1, 2, 4, 9))
    with pytest.raises(ValueError, match="'key_padding_mask' must have shape \\[batch, seq_k\\]"):
        attention(q, q, q, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="'key_padding_mask' must be a bool tensor"):
        attention(q, q, q, key_padding_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="'lse' must have shape \\[1, 2, 4\\]"):
        _C.attention_forward(q, q, q, None, False, 1.0, torch.empty_like(q), torch.empty(1, 2, 5))
    with pytest.raises(ValueError, match="'scale' must be finite"):
        _C.attention_forward(q, q, q, None, False, float("inf"), torch.empty_like(q), torch.empty(1, 2, 4))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 37, 3, 16), (1, 130, 2, 24), (3, 5, 1, 7)], ids=lambda s: "x".join(map(str, s)))
def test_qkv_packed_matches_float64_reference_and_the_unpacked_op(causal, shape):
    b, t, h, d = shape
    qkv = torch.randn(b, t, 3 * h * d, requires_grad=True)
    out = attention_qkv_packed(qkv, h, causal=causal)
    assert out.shape == (b, t, h * d)
    grad = torch.randn_like(out)
    out.backward(grad)

    # the float64 reference on the three views; its q, k, v gradients packed as dqkv
    q, k, v = (x.transpose(1, 2) for x in qkv.detach().view(b, t, 3, h, d).unbind(2))
    ref, leaves = reference(q, k, v, causal, None, d ** -0.5)
    ref.backward(grad.view(b, t, h, d).transpose(1, 2).double())
    ref_dqkv = torch.stack([leaf.grad.transpose(1, 2) for leaf in leaves], dim=2).reshape(b, t, 3 * h * d)
    assert_close(out, ref.transpose(1, 2).reshape(b, t, h * d), torch.float32, factor=8, what="out")
    assert_close(qkv.grad, ref_dqkv, torch.float32, factor=16, what="dqkv")

    # the same kernels as attention() on the three views: the same bits
    unpacked = qkv.detach().clone().requires_grad_()
    q, k, v = (x.transpose(1, 2) for x in unpacked.view(b, t, 3, h, d).unbind(2))
    out2 = attention(q, k, v, causal=causal).transpose(1, 2).reshape(b, t, h * d)
    out2.backward(grad)
    assert torch.equal(out, out2) and torch.equal(qkv.grad, unpacked.grad)


def test_qkv_packed_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="'qkv' must be \\[batch, seq, 3 \\* heads \\* head_dim\\]"):
        attention_qkv_packed(torch.randn(4, 24), 2)
    with pytest.raises(ValueError, match="must be 3 \\* num_heads \\* head_dim \\(a multiple of 6\\)"):
        attention_qkv_packed(torch.randn(1, 4, 20), 2)
    with pytest.raises(ValueError, match="'num_heads' must be a positive integer"):
        attention_qkv_packed(torch.randn(1, 4, 24), 0)
