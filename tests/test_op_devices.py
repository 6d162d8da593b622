"""Every op refuses a tensor argument on another device, naming it, before any
kernel runs. A tensor on `meta` beside CPU tensors used to send the call to the
fake kernel, which returned uninitialised memory instead of raising. And every
op honours __torch_function__ before it checks anything, as torch's do."""
import pytest
import torch

from zerofuse.ops import (add_layer_norm, attention, bias_gelu, cross_entropy, layer_norm, linear_cross_entropy,
                          masked_softmax)


def _cases():
    """(op name, argument name, call(tensors) -> result, tensors) with odd sizes."""
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    pad = torch.ones(2, 7, dtype=torch.bool)
    x, w, b = torch.randn(5, 12), torch.randn(12), torch.randn(12)
    logits, target = torch.randn(6, 11), torch.randint(0, 11, (6,))
    hidden, head = torch.randn(6, 12), torch.randn(11, 12)
    scores, mask = torch.randn(2, 3, 5, 7), torch.zeros(5, 7)
    bias_mask = torch.zeros(1, 1, 5, 7)
    return [
        ("attention", dict(q=q, k=k, v=v, key_padding_mask=pad),
         lambda t: attention(t["q"], t["k"], t["v"], causal=True, key_padding_mask=t["key_padding_mask"])),
        ("attention(attn_mask)", dict(q=q, k=k, v=v, attn_mask=bias_mask),
         lambda t: attention(t["q"], t["k"], t["v"], attn_mask=t["attn_mask"])),
        ("layer_norm", dict(input=x, weight=w, bias=b), lambda t: layer_norm(t["input"], (12,), t["weight"], t["bias"])),
        ("add_layer_norm", dict(x=x, residual=x.clone(), weight=w, bias=b),
         lambda t: add_layer_norm(t["x"], t["residual"], (12,), t["weight"], t["bias"])[0]),
        ("bias_gelu", dict(input=x, bias=b), lambda t: bias_gelu(t["input"], t["bias"])),
        ("cross_entropy", dict(logits=logits, target=target),
         lambda t: cross_entropy(t["logits"], t["target"], reduction="none")),
        ("linear_cross_entropy", dict(hidden=hidden, weight=head, target=target, bias=torch.randn(11)),
         lambda t: linear_cross_entropy(t["hidden"], t["weight"], t["target"], bias=t["bias"], reduction="none")),
        ("masked_softmax", dict(input=scores, mask=mask), lambda t: masked_softmax(t["input"], t["mask"])),
    ]


CASES = _cases()
ARGUMENTS = [(op, name) for op, tensors, _ in CASES for name in list(tensors)[1:]]


@pytest.mark.parametrize("op,name", ARGUMENTS)
def test_an_argument_on_another_device_is_refused_by_name(op, name):
    _, tensors, call = next(c for c in CASES if c[0] == op)
    moved = dict(tensors, **{name: tensors[name].to("meta")})
    with pytest.raises(ValueError, match=f"'{name}' is on meta"):
        call(moved)


@pytest.mark.parametrize("op", [c[0] for c in CASES])
def test_all_arguments_on_meta_give_the_output_shape(op):
    # torch.compile and meta-device model construction run the ops on meta tensors.
    _, tensors, call = next(c for c in CASES if c[0] == op)
    expected = call(tensors)
    out = call({n: t.to("meta") for n, t in tensors.items()})
    assert out.device.type == "meta" and out.shape == expected.shape and out.dtype == expected.dtype


class Intercepting(torch.Tensor):
    """A tensor subclass that sees every call first: records which zerofuse op
    reached it, then runs the op on plain tensors (as ZeRO-3's released
    parameters do after gathering the values)."""

    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", "").startswith("zerofuse.ops"):
            cls.seen.append(func.__name__)
            plain = [a.as_subclass(torch.Tensor) if isinstance(a, cls) else a for a in args]
            return func(*plain, **{k: v.as_subclass(torch.Tensor) if isinstance(v, cls) else v
                                   for k, v in kwargs.items()})
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


@pytest.mark.parametrize("op,name", [(op, name) for op, tensors, _ in CASES for name in tensors])
def test_a_tensor_subclass_sees_the_op_before_its_checks(op, name):
    _, tensors, call = next(c for c in CASES if c[0] == op)
    expected = call(tensors)
    # An empty stand-in would fail the shape checks unless the subclass sees the call first.
    Intercepting.seen.clear()
    wrapped = dict(tensors, **{name: tensors[name].as_subclass(Intercepting)})
    out = call(wrapped)
    assert Intercepting.seen[:1] == [op.split("(")[0]], Intercepting.seen
    torch.testing.assert_close(out.as_subclass(torch.Tensor), expected, rtol=0, atol=0)
