"""The CUDA kernels against the same float64 references as the CPU ones, with
every output poisoned (NaN) before the call so an element left unwritten
fails; and the engine on a GPU (NCCL at world size 1). Run with `pytest -m gpu`."""
import contextlib
import io
import os

import pytest
import torch
import torch.nn.functional as F

import zerofuse
from zerofuse import _C
from zerofuse.ops import attention, grad_stats, layer_norm, masked_softmax

from conftest import FLOAT_DTYPES, assert_close
from test_adam import HYPER, reference_step
from test_attention import reference as attention_reference
from test_masked_softmax import make_mask, reference as masked_softmax_reference

pytestmark = pytest.mark.gpu
CUDA = "cuda"


def nan_like(t):
    return torch.full_like(t, float("nan"))


@pytest.mark.parametrize("grad_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("copy_dtype", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, 4097, 1_000_003])
def test_adam_flat(grad_dtype, copy_dtype, n):
    p, m, v = torch.randn(n, device=CUDA), torch.randn(n, device=CUDA) * 0.1, torch.rand(n, device=CUDA) * 0.01
    g = (torch.randn(n, device=CUDA) * 1000).to(grad_dtype)
    copy = torch.full((n,), float("nan"), dtype=copy_dtype, device=CUDA) if copy_dtype else None
    kw = dict(HYPER, adam_w_mode=True, bias_correction=True, step=7)
    expected = reference_step(p, g, m, v, grad_scale=1e-3 * 0.5, **kw)
    _C.adam_step(p, g, m, v, copy, inv_scale=1e-3, clip_coef=0.5, **kw)
    for got, want in zip((p, m, v), expected):
        assert_close(got, want, torch.float32, factor=64)
    if copy is not None:
        assert torch.equal(copy, p.to(copy_dtype))


@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32)])
def test_adam_multi_tensor_unaligned_and_device_scalars(dtype, state_dtype):
    # Views at odd offsets: the unvectorised path.
    base = [torch.randn(s + 1, device=CUDA).to(dtype) for s in (1, 3, 4097, 70_001)]
    ps = [b[1:] for b in base]
    gs = [torch.randn_like(p) for p in ps]
    ms = [torch.zeros_like(p, dtype=state_dtype) for p in ps]
    vs = [torch.zeros_like(p, dtype=state_dtype) for p in ps]
    step = torch.tensor([3.0], dtype=torch.float64, device=CUDA)
    kw = dict(HYPER, adam_w_mode=False, bias_correction=True, step=1)
    expected = [reference_step(p, g, m, v, grad_scale=0.25, **dict(kw, step=3)) for p, g, m, v in zip(ps, gs, ms, vs)]
    _C.adam_step_multi(ps, gs, ms, vs, grad_multiplier=torch.tensor([0.25], device=CUDA),
                       skip_if_nonzero=torch.zeros(1, device=CUDA), step_tensor=step, **kw)
    for p, (want, _, _) in zip(ps, expected):
        assert_close(p, want, dtype, factor=2 if dtype != torch.float32 else 64)
    before = [p.clone() for p in ps]
    _C.adam_step_multi(ps, gs, ms, vs, skip_if_nonzero=torch.ones(1, device=CUDA), **kw)
    assert all(torch.equal(a, b) for a, b in zip(ps, before))


def test_whole_fp16_step_replays_from_a_cuda_graph():
    """grad_stats -> step_control -> Adam captured once and replayed: loss scale,
    skip decision, step count and learning rate all live on the device, so each
    replay must do what the same calls do eagerly on the CPU -- including a
    skipped overflow step and a learning rate changed between replays."""
    sizes = (4097, 33, 1)
    cfg = dict(dynamic_loss_scale=True, initial_scale_power=8, loss_scale_window=2, hysteresis=1,
               consecutive_hysteresis=False, min_loss_scale=1.0, max_grad_norm=1.0)

    def buffers(device):
        gen = torch.Generator().manual_seed(0)
        b = dict(master=[torch.randn(s, generator=gen).to(device) for s in sizes],
                 grads=[torch.zeros(s, dtype=torch.float16, device=device) for s in sizes],
                 m=[torch.zeros(s, device=device) for s in sizes], v=[torch.zeros(s, device=device) for s in sizes],
                 copies=[torch.full((s,), float("nan"), dtype=torch.float16, device=device) for s in sizes],
                 stats=torch.zeros(2, device=device), lr=torch.zeros(1, dtype=torch.float64, device=device),
                 state=torch.zeros(_C.STEP_STATE_SIZE, dtype=torch.float64, device=device),
                 out=torch.zeros(_C.STEP_OUTPUT_SIZE, device=device))
        _C.step_control_init(b["state"], static_scale=1.0, **cfg)
        return b

    def step(b):
        _C.grad_stats(b["grads"], b["stats"])
        _C.step_control(b["stats"], b["state"], b["out"], **cfg)
        _C.adam_step_multi(b["master"], b["grads"], b["m"], b["v"], b["copies"], lr=0.0, beta1=0.9, beta2=0.999,
                           eps=1e-8, weight_decay=0.01, adam_w_mode=True, bias_correction=True, step=1,
                           grad_multiplier=b["out"][0:1], skip_if_nonzero=b["out"][1:2],
                           step_tensor=b["state"][4:5], lr_tensor=b["lr"])

    cpu, gpu = buffers("cpu"), buffers(CUDA)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(gpu)
    gen = torch.Generator().manual_seed(1)
    for i in range(8):
        grads = [(torch.randn(s, generator=gen) * 100).half() for s in sizes]
        if i == 3:
            grads[0][0] = float("inf")  # this step overflows: skipped, scale halved
        for b in (cpu, gpu):
            b["lr"].fill_(1e-2 / (i + 1))  # what a schedule does between replays
            for g, new in zip(b["grads"], grads):
                g.copy_(new)
        step(cpu)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(gpu["state"].cpu(), cpu["state"]), f"replay {i}: step-control state"
        for a, b in zip(gpu["master"], cpu["master"]):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)
    assert cpu["state"][5].item() == 1 and cpu["state"][4].item() == 7, "one skipped, seven applied"
    for a, b in zip(gpu["copies"], gpu["master"]):
        assert torch.equal(a, b.half())


def test_fused_adam_with_a_device_learning_rate_matches_a_number():
    start = [torch.randn(s, device=CUDA) for s in ((33, 17), (4097,))]
    by_number = [torch.nn.Parameter(p.clone()) for p in start]
    by_tensor = [torch.nn.Parameter(p.clone()) for p in start]
    opt_n = zerofuse.optim.FusedAdam(by_number, lr=0.02, weight_decay=0.1)
    opt_t = zerofuse.optim.FusedAdam(by_tensor, lr=torch.tensor(0.02, dtype=torch.float64, device=CUDA),
                                     weight_decay=0.1)
    sched = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt_n, opt_t)]
    for _ in range(6):
        for a, b in zip(by_number, by_tensor):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        for o, s_ in zip((opt_n, opt_t), sched):
            o.step()
            s_.step()
    for a, b in zip(by_number, by_tensor):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)


def test_fused_adam_on_cuda_matches_torch_adamw():
    params = [torch.randn(s, device=CUDA) for s in ((33, 17), (4097,), (1,))]
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    mine = [torch.nn.Parameter(p.clone()) for p in params]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    opt = zerofuse.optim.FusedAdam(mine, lr=1e-2, weight_decay=0.1)
    for _ in range(20):
        for a, b in zip(ref, mine):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ref_opt.step()
        opt.step()
    for a, b in zip(ref, mine):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_grad_stats_sum_flag_and_determinism(dtype):
    tensors = [(torch.randn(n, device=CUDA) * 3).to(dtype) for n in (1, 3, 100_003, 4_000_000)]
    out = nan_like(torch.empty(2, device=CUDA))
    grad_stats(tensors, out)
    expected = sum(float((t.double() ** 2).sum()) for t in tensors)
    assert out[0].item() == pytest.approx(expected, rel=1e-5) and out[1].item() == 0.0
    again = grad_stats(tensors)
    assert torch.equal(out, again)  # the same bits
    tensors[3][1234567] = float("nan")
    assert grad_stats(tensors)[1].item() == 1.0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 768), (5, 4097), (33, 1001), (16384, 768)])
@pytest.mark.parametrize("param_dtype", ["same", "float32"])
def test_layer_norm(dtype, shape, param_dtype):
    rows, d = shape
    pd = dtype if param_dtype == "same" else torch.float32
    x = (torch.randn(rows, d, device=CUDA) * 2 + 0.5).to(dtype)
    w = (torch.randn(d, device=CUDA) + 1).to(pd)
    b = torch.randn(d, device=CUDA).to(pd)
    dy = torch.randn(rows, d, device=CUDA).to(dtype)
    y, mean, rstd = nan_like(x), torch.full((rows,), float("nan"), device=CUDA), torch.full((rows,), float("nan"),
                                                                                              device=CUDA)
    _C.layer_norm_forward(x, w, b, 1e-5, y, mean, rstd)
    dx, dw, db = nan_like(x), nan_like(w), nan_like(b)
    _C.layer_norm_backward(dy, x, w, mean, rstd, dx, dw, db)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    y64 = F.layer_norm(x64, (d,), w64, b64, 1e-5)
    y64.backward(dy.double())
    g = dy.double() * w.double()
    rstd64 = 1.0 / torch.sqrt(x.double().var(-1, unbiased=False) + 1e-5)
    assert_close(y, y64, dtype, what="y")
    assert_close(dx, x64.grad, dtype, factor=8, what="dx", scale=(g.abs().max() * rstd64.max()).item())
    assert_close(dw, w64.grad, pd, factor=64 if pd == torch.float32 else 8, what="dweight")
    assert_close(db, b64.grad, pd, factor=64 if pd == torch.float32 else 8, what="dbias")


def test_layer_norm_op_autograd_on_cuda():
    x = torch.randn(4, 7, 33, device=CUDA, requires_grad=True)
    ln = zerofuse.nn.LayerNorm(33).to(CUDA)
    ln(x).sum().backward()
    ref = torch.nn.LayerNorm(33).to(CUDA)
    xr = x.detach().clone().requires_grad_()
    ref(xr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)


def test_step_control_matches_the_cpu():
    cfg = dict(dynamic_loss_scale=True, initial_scale_power=5, loss_scale_window=3, hysteresis=2,
               consecutive_hysteresis=False, min_loss_scale=1.0, max_grad_norm=1.0)
    states = {d: torch.zeros(_C.STEP_STATE_SIZE, dtype=torch.float64, device=d) for d in ("cpu", CUDA)}
    outs = {d: torch.zeros(_C.STEP_OUTPUT_SIZE, device=d) for d in ("cpu", CUDA)}
    for d in states:
        _C.step_control_init(states[d], static_scale=1.0, **cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        stats = torch.tensor([float(torch.rand(1, generator=g)) * 1e4, float(torch.rand(1, generator=g) < 0.2)])
        for d in states:
            _C.step_control(stats.to(d), states[d], outs[d], **cfg)
        assert torch.equal(states["cpu"], states[CUDA].cpu())
        torch.testing.assert_close(outs["cpu"], outs[CUDA].cpu(), equal_nan=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 16), (1, 2, 129, 65, 64), (2, 2, 200, 200, 128), (1, 1, 33, 47, 80),
                                   # more batch elements, then more heads, than one grid dimension holds (65535)
                                   (70_000, 1, 3, 5, 16), (1, 70_000, 2, 3, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_attention(dtype, causal, shape):
    b, h, sq, sk, d = shape
    q, k, v = (torch.randn(b, h, n, d, device=CUDA).to(dtype) for n in (sq, sk, sk))
    mask = torch.rand(b, sk, device=CUDA) > 0.2
    mask[0, :3] = False
    out, lse = nan_like(q), torch.full((b, h, sq), float("nan"), device=CUDA)
    scale = d ** -0.5
    _C.attention_forward(q, k, v, mask, causal, scale, out, lse)
    dout = torch.randn_like(out)
    dq, dk, dv = nan_like(q), nan_like(k), nan_like(v)
    _C.attention_backward(dout, q, k, v, out, lse, mask, causal, scale, dq, dk, dv)
    ref, (q64, k64, v64) = attention_reference(q.cpu(), k.cpu(), v.cpu(), causal, mask.cpu(), scale)
    ref.backward(dout.double().cpu())
    assert_close(out, ref, dtype, factor=8, what="out")
    for got, want, what in ((dq, q64.grad, "dq"), (dk, k64.grad, "dk"), (dv, v64.grad, "dv")):
        assert_close(got, want, dtype, factor=16, what=what)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 131, 77, 128), (1, 2, 70, 200, 64), (2, 2, 64, 64, 64), (1, 1, 1, 3, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_attention_tensor_core_kernels_against_the_cuda_core_ones(dtype, causal, shape, monkeypatch):
    """fp16/bf16 at head_dim 64/128 take the mma.sync forward and backward;
    the CUDA-core kernels (forced by ZEROFUSE_CUDA_ATTENTION=baseline) must
    agree with them and both with float64, including rows and keys past the
    last full tile, more keys than queries and fewer, and a batch element
    whose queries see no key. The backward must give the same bits twice."""
    b, h, sq, sk, d = shape
    q, k, v = (torch.randn(b, h, n, d, device=CUDA).to(dtype) for n in (sq, sk, sk))
    dout = torch.randn(b, h, sq, d, device=CUDA).to(dtype)
    mask = torch.rand(b, sk, device=CUDA) > 0.3
    mask[:, 0] = True
    if b > 1:
        mask[1] = False  # batch 1 sees nothing: zeros, lse = -inf, zero gradients
    scale = d ** -0.5
    results = {}
    for kernel in ("tensor cores", "baseline"):
        if kernel == "baseline":
            monkeypatch.setenv("ZEROFUSE_CUDA_ATTENTION", "baseline")
        out, lse = nan_like(q), torch.full((b, h, sq), float("nan"), device=CUDA)
        _C.attention_forward(q, k, v, mask, causal, scale, out, lse)
        grads = []
        for _ in range(2):
            dq, dk, dv = nan_like(q), nan_like(k), nan_like(v)
            _C.attention_backward(dout, q, k, v, out, lse, mask, causal, scale, dq, dk, dv)
            grads.append((dq, dk, dv))
        for first, second in zip(*grads):
            assert torch.equal(first, second), f"{kernel}: the backward is not deterministic"
        results[kernel] = (out, lse, *grads[0])
    ref, (q64, k64, v64) = attention_reference(q.cpu(), k.cpu(), v.cpu(), causal, mask.cpu(), scale)
    ref.backward(dout.double().cpu())
    for kernel, (out, lse, dq, dk, dv) in results.items():
        assert_close(out, ref, dtype, factor=8, what=f"{kernel} out")
        for got, want, what in ((dq, q64.grad, "dq"), (dk, k64.grad, "dk"), (dv, v64.grad, "dv")):
            assert_close(got, want, dtype, factor=16, what=f"{kernel} {what}")
        if b > 1:
            assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
            assert all(torch.all(g[1] == 0) for g in (dq, dk, dv))
    torch.testing.assert_close(results["tensor cores"][1], results["baseline"][1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 33, 129), (2, 1, 1, 1), (2, 4, 64, 4097)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["none", "bool-keys", "bool-full", "bias-heads", "bias-fp32"])
@pytest.mark.parametrize("causal", [False, True])
def test_masked_softmax_kernels(dtype, shape, kind, causal):
    x = (torch.randn(shape) * 4).to(dtype)
    mask = make_mask(kind, shape, dtype)
    scale = 0.375
    out = nan_like(x).to(CUDA)
    cuda_mask = None if mask is None else mask.to(CUDA).expand(shape)
    _C.masked_softmax_forward(x.to(CUDA), cuda_mask, scale, causal, out)
    x64 = x.double().requires_grad_()
    ref = masked_softmax_reference(x64, mask, scale, causal)
    assert_close(out, ref, dtype, factor=4, what="probabilities")
    dy = torch.randn(shape).to(dtype)
    dx = nan_like(out)
    _C.masked_softmax_backward(dy.to(CUDA), out, scale, dx)
    y64, g64 = out.double().cpu(), dy.double()
    want = scale * y64 * (g64 - (g64 * y64).sum(-1, keepdim=True))
    assert_close(dx, want, dtype, factor=8, what="grad", scale=dy.abs().max().item())


def test_attention_with_arbitrary_mask_on_cuda():
    q, k, v = (torch.randn(2, 3, 37, 32, device=CUDA, requires_grad=True) for _ in range(3))
    bias = torch.randn(3, 37, 37, device=CUDA, requires_grad=True)  # a learned position bias
    out = attention(q, k, v, attn_mask=bias)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, bias), g)
    want = torch.autograd.grad(ref, (q, k, v, bias), g.double())
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-4)
    probs = masked_softmax(torch.randn(4, 8, device=CUDA, dtype=torch.bfloat16), causal=True)
    assert probs.dtype == torch.bfloat16 and torch.all(probs.float().sum(-1).sub(1).abs() < 1e-2)


def test_attention_op_with_strided_inputs_on_cuda():
    qkv = torch.randn(2, 37, 3, 4, 32, device=CUDA, requires_grad=True)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out = attention(q, k, v, causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_engine_on_one_gpu_with_nccl(monkeypatch):
    import torch.distributed as dist

    from test_engine_zero import reference, train_all_cases

    monkeypatch.setenv("ZEROFUSE_DEVICE", "cuda")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29611", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device(CUDA, 0))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            results = train_all_cases(0, 1)
    finally:
        dist.destroy_process_group()
    for (stage, dtype), (losses, master, _) in results.items():
        ref_losses, ref_master, initial = reference(dtype, 1)
        tol = 1e-4 if dtype == "fp32" else 2e-2
        assert losses == pytest.approx(ref_losses, rel=tol), f"stage {stage} {dtype}"


def test_engine_learning_rate_on_a_gpu_is_current_after_each_step(monkeypatch):
    """On CUDA the host reads a step's outcome lazily; get_lr() must still
    report the schedule stepped once per applied step, as on the CPU."""
    from test_engine_features import make_engine
    from tiny_gpt import batch

    monkeypatch.setenv("ZEROFUSE_DEVICE", "cuda")
    engine = make_engine({"train_micro_batch_size_per_gpu": 4, "steps_per_print": 1000,
                          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}},
                         lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, 0.5))
    assert engine.device.type == "cuda"
    for step in range(4):
        tokens, targets = batch(step, 4)
        engine.backward(engine(tokens, targets))
        engine.step()
        assert engine.get_lr() == pytest.approx([1e-2 * 0.5 ** (step + 1)])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("v", [1, 3, 50257, 50304])
def test_cross_entropy_kernels(dtype, v):
    n = 64
    logits = (torch.randn(n, v, device=CUDA) * 3).to(dtype)
    target = torch.randint(0, v, (n,), device=CUDA)
    target[5] = -100
    loss, lse = torch.full((n,), float("nan"), device=CUDA), torch.full((n,), float("nan"), device=CUDA)
    _C.cross_entropy_forward(logits, target, -100, 0.1, loss, lse)
    ref = F.cross_entropy(logits.double(), target, reduction="none", label_smoothing=0.1)
    assert_close(loss, ref, torch.float32, factor=64)
    grad = torch.randn(n, device=CUDA)
    dlogits = nan_like(logits)
    _C.cross_entropy_backward(logits, target, lse, grad, -100, 0.1, dlogits)
    x64 = logits.double().requires_grad_()
    F.cross_entropy(x64, target, reduction="none", label_smoothing=0.1).backward(grad.double())
    assert_close(dlogits, x64.grad, dtype, factor=4)
    _C.cross_entropy_backward(logits, target, lse, grad, -100, 0.1, logits)  # in place
    assert torch.equal(logits, dlogits)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cross_entropy_kernels_on_vocabulary_slices(dtype):
    from test_fused_ops import check_vocabulary_slices
    check_vocabulary_slices(CUDA, dtype, widths=(700, 1300, 29))


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_cross_entropy_out_of_range_target_fails_on_cuda(op):
    """As torch's own cross_entropy on CUDA: a device-side assertion, no host
    sync. It poisons the CUDA context, so it runs in a child process."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import torch, zerofuse.ops as ops
        x, w = torch.randn(8, 16, device="cuda"), torch.randn(10, 16, device="cuda")
        target = torch.tensor([0, 1, 2, 3, 4, 5, 6, 10], device="cuda")  # 10 is out of range
        if "{op}" == "cross_entropy":
            ops.cross_entropy(x @ w.t(), target)
        else:
            ops.linear_cross_entropy(x, w, target)
        torch.cuda.synchronize()
        print("NO ERROR")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "NO ERROR" not in result.stdout
    assert "device-side assert" in result.stderr or "outside [0, 10)" in result.stderr, result.stderr[-2000:]


def test_linear_cross_entropy_on_cuda_matches_unfused():
    hidden = torch.randn(300, 64, device=CUDA, requires_grad=True)
    weight = torch.randn(1000, 64, device=CUDA, requires_grad=True)
    target = torch.randint(0, 1000, (300,), device=CUDA)
    zerofuse.ops.linear_cross_entropy(hidden, weight, target, chunk_size=64).backward()
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    F.cross_entropy(h @ w.T, target).backward()
    assert_close(hidden.grad, h.grad, torch.float32, factor=64)
    assert_close(weight.grad, w.grad, torch.float32, factor=64)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_bias_gelu_kernels(dtype, approximate):
    x = (torch.randn(1000, 3075, device=CUDA) * 3).to(dtype)
    b = torch.randn(3075, device=CUDA).to(dtype)
    y = nan_like(x)
    _C.bias_gelu_forward(x, b, approximate, y)
    assert_close(y, F.gelu(x.double() + b.double(), approximate=approximate), dtype, factor=8)
    dy = torch.randn_like(x)
    dx, db = nan_like(x), nan_like(b)
    _C.bias_gelu_backward(dy, x, b, approximate, dx, db)
    x64, b64 = x.double().requires_grad_(), b.double().requires_grad_()
    F.gelu(x64 + b64, approximate=approximate).backward(dy.double())
    assert_close(dx, x64.grad, dtype, factor=16)
    assert_close(db, b64.grad, dtype, factor=64)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_add_layer_norm_kernels(dtype):
    x, r = (torch.randn(777, 768, device=CUDA).to(dtype) for _ in range(2))
    w, b = torch.randn(768, device=CUDA).to(dtype), torch.randn(768, device=CUDA).to(dtype)
    total, out = nan_like(x), nan_like(x)
    mean, rstd = torch.full((777,), float("nan"), device=CUDA), torch.full((777,), float("nan"), device=CUDA)
    _C.add_layer_norm_forward(x, r, w, b, 1e-5, total, out, mean, rstd)
    assert torch.equal(total, x + r)
    assert_close(out, F.layer_norm(total.double(), (768,), w.double(), b.double()), dtype)
