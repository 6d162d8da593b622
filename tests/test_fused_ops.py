"""Fused cross-entropy, linear + cross-entropy, bias + GELU and residual add +
LayerNorm against PyTorch in float64."""
import pytest
import torch
import torch.nn.functional as F

import zerofuse
from zerofuse import _C
from zerofuse.ops import add_layer_norm, bias_gelu, cross_entropy, linear_cross_entropy

from conftest import FLOAT_DTYPES, assert_close

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def ce_reference(logits, target, **kw):
    x = logits.detach().double().requires_grad_()
    loss = F.cross_entropy(x, target, **kw)
    return loss, x


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("v", [1, 3, 50257])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_float64(dtype, v, reduction, label_smoothing):
    n = 5 if v > 1000 else 37
    logits = (torch.randn(n, v) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,))
    target[1] = -100  # an ignored row
    loss = cross_entropy(logits, target, reduction=reduction, label_smoothing=label_smoothing)
    ref, x64 = ce_reference(logits, target, reduction=reduction, label_smoothing=label_smoothing)
    assert loss.dtype == torch.float32
    assert_close(loss, ref, torch.float32, factor=64, what="loss")
    grad = torch.randn_like(loss)
    loss.backward(grad)
    ref.backward(grad.double())
    assert_close(logits.grad, x64.grad, dtype, factor=4, what="dlogits")
    assert torch.all(logits.grad[1] == 0)


def test_cross_entropy_all_ignored_and_inplace_backward():
    logits = torch.randn(4, 9, requires_grad=True)
    ignored = torch.full((4,), -100)
    assert torch.isnan(cross_entropy(logits, ignored))  # 0 / 0, as torch
    assert cross_entropy(logits, ignored, reduction="sum").item() == 0.0
    target = torch.randint(0, 9, (4,))
    x = logits * 1.0  # a temporary the backward may overwrite
    cross_entropy(x, target, inplace_backward=True).backward()
    x64 = logits.detach().double().requires_grad_()
    F.cross_entropy(x64, target).backward()
    assert_close(logits.grad, x64.grad, torch.float32, factor=8)


def check_vocabulary_slices(device, dtype=torch.float32, widths=(5, 9, 3)):
    """The kernels on column slices of each row (tensor parallelism): the
    slices' log-sum-exps and loss shares combine into F.cross_entropy, and
    each slice's backward with the whole row's log-sum-exp is its slice of
    the gradient -- against float64, with label smoothing and ignored rows."""
    g = torch.Generator().manual_seed(5)
    total = sum(widths)
    logits = (torch.randn(7, total, generator=g) * 3).to(device, dtype)
    target = torch.randint(0, total, (7,), generator=g).to(device)
    target[3] = -100
    grad = torch.randn(7, generator=g).to(device)
    shares, lses, starts = [], [], [0]
    for w in widths:
        part = logits[:, starts[-1]:starts[-1] + w].contiguous()
        share, lse = torch.empty(7, device=device), torch.empty(7, device=device)
        _C.cross_entropy_forward(part, target, -100, 0.1, share, lse, vocab_start=starts[-1], vocab_total=total)
        shares.append(share)
        lses.append(lse)
        starts.append(starts[-1] + w)
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    loss = (lse + torch.stack(shares).sum(0)) * (target != -100)
    x64 = logits.double().cpu().requires_grad_(True)
    ref = F.cross_entropy(x64, target.cpu(), reduction="none", label_smoothing=0.1)
    ref.backward(grad.double().cpu())
    assert_close(loss, ref, torch.float32, factor=16, what="sliced loss")
    parts = []
    for w, start in zip(widths, starts):
        part = logits[:, start:start + w].contiguous()
        out = torch.empty_like(part)
        _C.cross_entropy_backward(part, target, lse, grad, -100, 0.1, out, vocab_start=start, vocab_total=total)
        parts.append(out)
    assert_close(torch.cat(parts, dim=1), x64.grad, dtype, factor=16, what="sliced gradient")


def test_cross_entropy_kernels_on_vocabulary_slices():
    check_vocabulary_slices("cpu")
    check_vocabulary_slices("cpu", torch.bfloat16)
    part = torch.zeros(2, 4)
    rows = torch.empty(2)
    with pytest.raises(ValueError, match="must lie within"):
        _C.cross_entropy_forward(part, torch.tensor([0, 1]), -100, 0.0, rows, rows.clone(), vocab_start=7,
                                 vocab_total=10)
    with pytest.raises(ValueError, match=r"out of range \[0, 10\)"):
        _C.cross_entropy_forward(part, torch.tensor([0, 10]), -100, 0.0, rows, rows.clone(), vocab_start=4,
                                 vocab_total=10)


def test_cross_entropy_bad_input():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"target\[2\] = 7 is out of range \[0, 5\) and is not ignore_index"):
        cross_entropy(x, torch.tensor([0, 1, 7]))
    with pytest.raises(ValueError, match="'target' must be an int64 tensor of shape \\[3\\]"):
        cross_entropy(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="'reduction' must be one of"):
        cross_entropy(x, torch.tensor([0, 1, 2]), reduction="avg")
    with pytest.raises(TypeError, match="'logits' must be float32, float16 or bfloat16"):
        cross_entropy(x.double(), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="'label_smoothing' must be in \\[0, 1\\]"):
        cross_entropy(x, torch.tensor([0, 1, 2]), label_smoothing=1.5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_cross_entropy_equals_the_unfused_head(reduction, chunk_size, with_bias):
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(67, 16, requires_grad=True)
    bias = torch.randn(67, requires_grad=True) if with_bias else None
    target = torch.randint(0, 67, (2, 9))
    target[0, 3] = -100
    loss = linear_cross_entropy(hidden, weight, target, bias=bias, reduction=reduction, chunk_size=chunk_size)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if with_bias else None
    ref = F.cross_entropy(F.linear(h64, w64, b64).reshape(-1, 67), target.reshape(-1), reduction=reduction)
    ref = ref.view(target.shape) if reduction == "none" else ref
    assert_close(loss, ref, torch.float32, factor=64, what="loss")
    grad = torch.randn_like(loss)
    loss.backward(grad)
    ref.backward(grad.double())
    assert_close(hidden.grad, h64.grad, torch.float32, factor=64, what="dhidden")
    assert_close(weight.grad, w64.grad, torch.float32, factor=64, what="dweight")
    if with_bias:
        assert_close(bias.grad, b64.grad, torch.float32, factor=64, what="dbias")


@pytest.mark.parametrize("rows,classes", [(300, 67), (2100, 2500)])  # one piece; chunks of about an eighth
def test_linear_cross_entropy_default_chunking(rows, classes):
    # The default chunk size: logits under 16 MiB in one piece (dweight written
    # whole, not added into zeros), larger ones in chunks; from loss.backward().
    hidden = torch.randn(rows, 16, requires_grad=True)
    weight = torch.randn(classes, 16, requires_grad=True)
    target = torch.randint(0, classes, (rows,))
    linear_cross_entropy(hidden, weight, target).backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    F.cross_entropy(F.linear(h64, w64), target).backward()
    assert_close(hidden.grad, h64.grad, torch.float32, factor=64, what="dhidden")
    assert_close(weight.grad, w64.grad, torch.float32, factor=64, what="dweight")


@pytest.mark.parametrize("chunk_size", [8, None])  # None: one piece, accumulated in float32 all the same
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_cross_entropy_low_precision(dtype, chunk_size):
    hidden = torch.randn(33, 24).to(dtype).requires_grad_()
    weight = (torch.randn(101, 24) * 0.3).to(dtype).requires_grad_()
    target = torch.randint(0, 101, (33,))
    loss = linear_cross_entropy(hidden, weight, target, chunk_size=chunk_size)
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.T, target)
    ref.backward()
    # The chunk's logits are rounded to the input dtype, as an unfused bf16/fp16 head's would be.
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()
    assert_close(hidden.grad, h64.grad, dtype, factor=16, what="dhidden")
    assert_close(weight.grad, w64.grad, dtype, factor=16, what="dweight")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 3072 + 3)])
def test_bias_gelu_matches_float64(dtype, approximate, shape):
    x = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    b = torch.randn(shape[-1]).to(dtype).requires_grad_()
    y = bias_gelu(x, b, approximate)
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = F.gelu(x64 + b64, approximate=approximate)
    assert_close(y, ref, dtype, factor=8, what="y")
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy.double())
    assert_close(x.grad, x64.grad, dtype, factor=16, what="dx")
    assert_close(b.grad, b64.grad, dtype, factor=64, what="dbias")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(3, 5), (7, 768), (2, 4097)])
def test_add_layer_norm_matches_float64(dtype, shape):
    x = torch.randn(shape).to(dtype).requires_grad_()
    r = (torch.randn(shape) * 2).to(dtype).requires_grad_()
    w = (torch.randn(shape[-1]) + 1).to(dtype).requires_grad_()
    b = torch.randn(shape[-1]).to(dtype).requires_grad_()
    out, total = add_layer_norm(x, r, shape[-1:], w, b)
    # The reference adds in the dtype (as the unfused pair would), then normalises in float64.
    s64 = (x.detach() + r.detach()).double().requires_grad_()
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = F.layer_norm(s64, shape[-1:], w64, b64)
    assert torch.equal(total, x.detach() + r.detach())
    assert_close(out, ref, dtype, what="out")
    d_out, d_sum = torch.randn_like(out), torch.randn_like(total)  # the sum flows on down the residual stream
    torch.autograd.backward([out, total], [d_out, d_sum])
    torch.autograd.backward([ref, s64], [d_out.double(), d_sum.double()])
    g = d_out.double() * w.detach().double()
    rstd = 1.0 / torch.sqrt(s64.detach().var(-1, unbiased=False) + 1e-5)
    scale = (g.abs().max() * rstd.max()).item() + d_sum.abs().max().item()
    assert_close(x.grad, s64.grad, dtype, factor=16, what="dx", scale=scale)
    assert torch.equal(x.grad, r.grad)
    assert_close(w.grad, w64.grad, dtype, factor=16, what="dweight")
    assert_close(b.grad, b64.grad, dtype, factor=16, what="dbias")


def test_modules_and_optimize():
    loss_fn = zerofuse.nn.CrossEntropyLoss(label_smoothing=0.05)
    x, t = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    ref = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    assert_close(loss_fn(x, t), ref(x.reshape(-1, 11).double(), t.reshape(-1)), torch.float32, factor=16)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.loss = torch.nn.CrossEntropyLoss(reduction="sum")
    zerofuse.optimize(model)
    assert type(model.loss) is zerofuse.nn.CrossEntropyLoss and model.loss.reduction == "sum"
    head = zerofuse.nn.LinearCrossEntropy(8, 19, bias=True)
    h, t = torch.randn(5, 8), torch.randint(0, 19, (5,))
    assert_close(head(h, t), F.cross_entropy(head.logits(h).double(), t), torch.float32, factor=64)
    with pytest.raises(ValueError, match="per-class 'weight' is not supported"):
        zerofuse.nn.CrossEntropyLoss(weight=torch.ones(3))


def test_fused_gpt_equals_the_unfused_one():
    from zerofuse.models import GPT, GPTConfig
    c = dict(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    fused = GPT(GPTConfig(**c))
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**c, fused=False))
    x = torch.randint(0, 61, (3, 16))
    a, b = fused(x, x), plain(x, x)
    a.backward()
    b.backward()
    assert abs(a.item() - b.item()) < 1e-5
    for (n, p), q in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_opcheck_fused_ops():
    logits = torch.randn(5, 13, requires_grad=True)
    target = torch.randint(0, 13, (5,))
    torch.library.opcheck(torch.ops.zerofuse.cross_entropy.default, (logits, target, -100, 0.1, False),
                          test_utils=OPCHECK_TESTS)
    x, b = torch.randn(4, 6, requires_grad=True), torch.randn(6, requires_grad=True)
    torch.library.opcheck(torch.ops.zerofuse.bias_gelu.default, (x, b, "tanh"), test_utils=OPCHECK_TESTS)
    r, w = torch.randn(4, 6, requires_grad=True), torch.randn(6, requires_grad=True)
    torch.library.opcheck(torch.ops.zerofuse.add_layer_norm.default, (x, r, [6], w, b, 1e-5), test_utils=OPCHECK_TESTS)
    h, wt = torch.randn(7, 6, requires_grad=True), torch.randn(11, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.zerofuse.linear_cross_entropy.default,
                          (h, wt, torch.randint(0, 11, (7,)), None, -100, 1, 3, True), test_utils=OPCHECK_TESTS)
