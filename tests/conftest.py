import os

import pytest
import torch

# Tests compare against float64 references; keep them independent of the
# machine's thread count and of each other's random state.
torch.set_num_threads(min(2, os.cpu_count() or 1))
# The engine trains on the GPU when there is one; outside the `gpu` tests it
# is kept on the CPU (child processes inherit this), so the suite checks on a
# GPU machine what it checks in CI. GPU tests that want the engine set "cuda".
os.environ.setdefault("ZEROFUSE_DEVICE", "cpu")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Rounding of one value of each dtype; the tolerances below are a few of these.
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}


def assert_close(actual, expected, dtype, factor=4.0, what="value", scale=None):
    """|actual - expected| within `factor` roundings of `dtype`, measured
    against the reference's largest magnitude (outputs of reductions have no
    meaningful per-element relative error), or against `scale` where the
    computation amplifies its inputs' rounding by more than that."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), f"{what}: non-finite values differ"
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 1.0
    scale = max(1.0, scale)
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    bound = factor * EPS[dtype] * scale + (1e-6 * scale if dtype == torch.float32 else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} exceeds {bound:.3g} ({dtype})"
