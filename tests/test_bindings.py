"""The Python boundary: what the bindings accept and how they refuse."""
import numpy as np
import pytest
import torch

from zerofuse import _C


def test_numpy_float16_and_bfloat16_like_inputs_through_dlpack():
    x = np.random.default_rng(1).standard_normal((4, 9)).astype(np.float16)
    out = np.full_like(x, np.nan)
    mean, rstd = np.empty(4, np.float32), np.empty(4, np.float32)
    _C.layer_norm_forward(x, None, None, 1e-5, out, mean, rstd)
    expected = torch.nn.functional.layer_norm(torch.from_numpy(x).double(), (9,))
    assert np.abs(out.astype(np.float64) - expected.numpy()).max() < 4e-3


def test_read_only_numpy_output_is_refused():
    x = np.ones((2, 3), np.float32)
    out = np.zeros_like(x)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="'out' is written to, but the array is read-only"):
        _C.layer_norm_forward(x, None, None, 1e-5, out, np.empty(2, np.float32), np.empty(2, np.float32))


def test_read_only_numpy_input_is_fine():
    x = np.ones((2, 3), np.float32)
    x.setflags(write=False)
    out = np.zeros_like(x)
    _C.layer_norm_forward(x, None, None, 1e-5, out, np.empty(2, np.float32), np.empty(2, np.float32))
    assert (out == 0).all()  # a constant row normalises to zero


def test_non_array_arguments_are_type_errors():
    with pytest.raises(TypeError, match="'input' must be a torch.Tensor or an array with __dlpack__.*got list"):
        _C.layer_norm_forward([1.0, 2.0], None, None, 1e-5, torch.empty(1, 2), torch.empty(1), torch.empty(1))
    with pytest.raises(TypeError, match="'out' must be a tensor, got None"):
        _C.layer_norm_forward(torch.ones(1, 2), None, None, 1e-5, None, torch.empty(1), torch.empty(1))


def test_unsupported_torch_tensors():
    with pytest.raises(TypeError, match="'input' has dtype torch.complex64"):
        _C.layer_norm_forward(torch.ones(1, 2, dtype=torch.complex64), None, None, 1e-5, torch.empty(1, 2),
                              torch.empty(1), torch.empty(1))
    with pytest.raises(ValueError, match="'input' is on device 'meta'"):
        _C.layer_norm_forward(torch.ones(1, 2, device="meta"), None, None, 1e-5, torch.empty(1, 2),
                              torch.empty(1), torch.empty(1))
    with pytest.raises(TypeError, match="must be a dense \\(strided\\) tensor"):
        _C.grad_stats([torch.ones(3).to_sparse()], torch.empty(2))


def test_views_with_offsets_are_read_at_their_offset():
    base = torch.randn(10, 8)
    x = base[3:7]  # a view whose data starts 24 floats in
    out, mean, rstd = torch.empty(4, 8), torch.empty(4), torch.empty(4)
    _C.layer_norm_forward(x, None, None, 1e-5, out, mean, rstd)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (8,)))


def test_parameter_subclass_takes_the_fast_path():
    p = torch.nn.Parameter(torch.randn(5))
    with torch.no_grad():
        before = p.clone()
        _C.adam_step(p, torch.ones(5), torch.zeros(5), torch.zeros(5), lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.0, adam_w_mode=True, bias_correction=True, step=1)
    torch.testing.assert_close(p.detach(), before - 0.1, rtol=0, atol=1e-6)
