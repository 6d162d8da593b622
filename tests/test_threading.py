"""Where the CPU kernels' parallel work runs: on torch's OpenMP team once torch
is imported (so zerofuse's threads do not compete with torch's spinning ones),
on zerofuse's own pool otherwise or with ZEROFUSE_THREADING=pool. The ranges
do not depend on which, so results are bit-identical; a forked child works."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# Sizes that split into several ranges, odd where they can be.
COMPUTE = textwrap.dedent("""
    import sys, torch
    import zerofuse, zerofuse.ops as ops
    from zerofuse.optim import FusedAdam
    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    g = torch.Generator().manual_seed(0)
    out = {"backend": zerofuse._C.threading_backend()}
    x = torch.randn(1031, 384, generator=g, requires_grad=True)
    w = torch.randn(384, generator=g, requires_grad=True)
    b = torch.randn(384, generator=g, requires_grad=True)
    y = ops.layer_norm(x, (384,), w, b)
    z = ops.bias_gelu(y, b)
    q, k, v = (torch.randn(3, 5, 77, 32, generator=g, requires_grad=True) for _ in range(3))
    a = ops.attention(q, k, v, causal=True)
    logits = torch.randn(517, 259, generator=g, requires_grad=True)
    target = torch.randint(0, 259, (517,), generator=g)
    loss = z.square().mean() + a.square().mean() + ops.cross_entropy(logits, target)
    loss.backward()
    out.update(z=z, a=a, loss=loss, dx=x.grad, dw=w.grad, db=b.grad, dq=q.grad, dlogits=logits.grad)
    p = torch.nn.Parameter(torch.randn(100_003, generator=g))
    p.grad = torch.randn(100_003, generator=g)
    opt = FusedAdam([p], lr=1e-3, weight_decay=0.1)
    opt.step()
    out["adam"] = p.detach()
    torch.save(out, sys.argv[1])
""")


def _compute(tmp_path, name, env=None, torch_threads=None):
    path = str(tmp_path / f"{name}.pt")
    args = [sys.executable, "-c", COMPUTE, path] + ([str(torch_threads)] if torch_threads else [])
    run_env = dict(os.environ, ZEROFUSE_NUM_THREADS="2", **(env or {}))
    result = subprocess.run(args, env=run_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(path)


def test_torchs_openmp_team_and_the_own_pool_give_identical_bits(tmp_path):
    on_team = _compute(tmp_path, "openmp")
    on_pool = _compute(tmp_path, "pool", env={"ZEROFUSE_THREADING": "pool"})
    one_omp_thread = _compute(tmp_path, "single", torch_threads=1)  # the ranges run in order on one thread
    assert on_team.pop("backend") == "openmp" and one_omp_thread.pop("backend") == "openmp"
    assert on_pool.pop("backend") == "pool"
    for name, value in on_team.items():
        assert torch.equal(value, on_pool[name]), name
        assert torch.equal(value, one_omp_thread[name]), name


def test_without_torch_the_core_keeps_its_own_pool():
    code = "import sys, zerofuse; assert 'torch' not in sys.modules; print(zerofuse._C.threading_backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, ZEROFUSE_NUM_THREADS="2"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "pool"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_runs_the_kernels_on_a_fresh_pool():
    # GNU OpenMP does not rebuild its team in a forked child: torch's own
    # parallel ops hang there after the parent used the team (so DataLoader
    # workers set one thread). zerofuse's ops must not: they use a fresh pool.
    code = textwrap.dedent("""
        import os, sys, torch, zerofuse, zerofuse.ops as ops
        x, b = torch.randn(4099, 256), torch.randn(256)
        parent = ops.bias_gelu(x, b)
        assert zerofuse._C.threading_backend() == "openmp"
        pid = os.fork()
        if pid == 0:
            y = ops.bias_gelu(x, b)
            torch.set_num_threads(1)  # for torch.equal below, as a DataLoader worker does
            same = torch.equal(y, parent) and zerofuse._C.threading_backend() == "pool"
            os._exit(0 if same else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, ZEROFUSE_NUM_THREADS="2"))
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
