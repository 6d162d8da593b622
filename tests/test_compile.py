"""The ops are real torch.library ops: schema, fake kernels and autograd are
checked by torch.library.opcheck, and torch.compile(fullgraph=True) traces them."""
import pytest
import torch

import zerofuse.ops  # noqa: F401  (registers the ops)
from zerofuse.ops import attention, layer_norm

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_opcheck_layer_norm(dtype, affine):
    x = torch.randn(3, 5, 12, dtype=dtype, requires_grad=True)
    w = torch.randn(12, dtype=dtype, requires_grad=True) if affine else None
    b = torch.randn(12, dtype=dtype, requires_grad=True) if affine else None
    torch.library.opcheck(torch.ops.zerofuse.layer_norm.default, (x, [12], w, b, 1e-5), test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_opcheck_attention(causal, masked):
    q = torch.randn(2, 3, 9, 8, requires_grad=True)
    k = torch.randn(2, 3, 11, 8, requires_grad=True)
    v = torch.randn(2, 3, 11, 8, requires_grad=True)
    mask = (torch.rand(2, 11) > 0.3) if masked else None
    torch.library.opcheck(torch.ops.zerofuse.attention.default, (q, k, v, mask, causal, 0.3), test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_attention_qkv_packed(causal):
    qkv = torch.randn(2, 9, 3 * 3 * 8, requires_grad=True)
    torch.library.opcheck(torch.ops.zerofuse.attention_qkv_packed.default, (qkv, 3, causal, 0.3),
                          test_utils=OPCHECK_TESTS)


@pytest.mark.slow
def test_compile_fullgraph_forward_and_backward():
    ln = torch.nn.LayerNorm(16)

    def block(x, w, b):
        h = layer_norm(x, (16,), w, b)
        q = h.view(2, 7, 2, 8).transpose(1, 2)
        return attention(q, q, q, causal=True).transpose(1, 2).reshape(2, 7, 16).sum()

    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    x = torch.randn(2, 7, 16, requires_grad=True)
    # Inductor's on-disk cache does not key on the ops' fake kernels: an older
    # build's cached graph could be reused here.
    torch._inductor.config.force_disable_caches = True
    w, b = ln.weight.detach().clone().requires_grad_(), ln.bias.detach().clone().requires_grad_()
    loss = compiled(x, w, b)
    loss.backward()
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    loss2 = block(x2, w2, b2)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    for a, c in ((x, x2), (w, w2), (b, b2)):
        torch.testing.assert_close(a.grad, c.grad)
