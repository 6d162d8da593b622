import numpy as np
import pytest
import torch

import zerofuse
from zerofuse import _C
from zerofuse.ops import grad_stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sizes", [[1], [3], [4097], [100_003, 5, 1, 70_000], [0, 7]])
def test_sum_of_squares_matches_float64(dtype, sizes):
    tensors = [(torch.randn(n) * 3).to(dtype) for n in sizes]
    out = grad_stats(tensors)
    expected = sum(float((t.double() ** 2).sum()) for t in tensors)
    # float32 lanes within chunks, double across chunks: relative error ~ chunk length * 2^-24.
    assert out[0].item() == pytest.approx(expected, rel=1e-5, abs=1e-30)
    assert out[1].item() == 0.0


def test_mixed_dtypes_in_one_call():
    tensors = [torch.randn(100), torch.randn(50).half(), torch.randn(30).bfloat16()]
    expected = sum(float((t.double() ** 2).sum()) for t in tensors)
    assert grad_stats(tensors)[0].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_any_nonfinite_element_is_flagged(bad, dtype):
    tensors = [torch.randn(70_000).to(dtype), torch.randn(33).to(dtype)]
    tensors[0][54_321] = bad
    assert grad_stats(tensors)[1].item() == 1.0
    tensors[0][54_321] = 0
    tensors[1][32] = bad
    assert grad_stats(tensors)[1].item() == 1.0


def test_large_finite_values_are_not_flagged_when_their_square_overflows():
    t = torch.full((10,), 1e30)
    out = grad_stats([t])
    assert out[1].item() == 0.0 and out[0].item() == float("inf")


def test_result_does_not_depend_on_thread_count():
    tensors = [torch.randn(1_000_003), torch.randn(77_777)]
    before = zerofuse.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            zerofuse.set_num_threads(threads)
            results.append(grad_stats(tensors)[0].item())
    finally:
        zerofuse.set_num_threads(before)
    assert results[0] == results[1] == results[2]


def test_out_and_numpy_inputs():
    out = np.full(2, np.nan, np.float32)
    _C.grad_stats([np.array([3.0, 4.0], np.float32), np.array([12.0], np.float16)], out)
    assert out.tolist() == [169.0, 0.0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="'out' must be a contiguous float32 tensor of 2 elements"):
        _C.grad_stats([torch.randn(3)], torch.empty(3))
    with pytest.raises(TypeError, match="'grads\\[1\\]' must be float32, float16 or bfloat16"):
        _C.grad_stats([torch.randn(3), torch.ones(3, dtype=torch.int32)], torch.empty(2))
    with pytest.raises(ValueError, match="'grads\\[0\\]' must be contiguous"):
        _C.grad_stats([torch.randn(4, 4).t()], torch.empty(2))
