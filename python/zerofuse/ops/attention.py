"""zerofuse.ops.attention: softmax(Q K^T * scale + mask) V without the
[seq_q, seq_k] matrix, the same result as
torch.nn.functional.scaled_dot_product_attention with the equivalent mask.
An arbitrary mask tensor takes the one path that needs the matrix: two
matrix multiplies around the fused masked softmax."""
from typing import Optional

import torch

from .. import _C
from ._library import check_same_device, define, honours_torch_function, stream_of
from .masked_softmax import masked_softmax

_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(q, k, v, key_padding_mask, op="zerofuse.ops.attention"):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: '{name}' must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: '{name}' must be [batch, heads, seq, head_dim], got shape {list(t.shape)}")
    if q.dtype not in _FLOAT_TYPES and not (q.dtype == torch.float64 and q.device.type != "cuda"):
        raise TypeError(f"{op}: 'q' must be float32, float16 or bfloat16 (or float64 on the CPU), got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: 'q', 'k' and 'v' must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(
            f"{op}: 'k' must be [batch, heads, seq_k, head_dim] with the batch, heads and head_dim of 'q' "
            f"{list(q.shape)}, got {list(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"{op}: 'v' must have the shape of 'k' {list(k.shape)}, got {list(v.shape)}")
    check_same_device(op, [("q", q), ("k", k), ("v", v), ("key_padding_mask", key_padding_mask)])
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(f"{op}: 'key_padding_mask' must be a bool tensor, got {getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if tuple(key_padding_mask.shape) != (b, k.shape[2]):
            raise ValueError(
                f"{op}: 'key_padding_mask' must have shape [batch, seq_k] = {[b, k.shape[2]]}, "
                f"got {list(key_padding_mask.shape)}"
            )


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _dense_last_dim(t):
    # The kernels take any strides but the last; only then is a copy needed.
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _forward_impl(q, k, v, key_padding_mask, causal, scale):
    _check(q, k, v, key_padding_mask)
    q, k, v = _dense_last_dim(q), _dense_last_dim(k), _dense_last_dim(v)
    out = torch.empty_like(q)  # keeps q's layout: [B, S, H, D] storage stays so
    lse = torch.empty(q.shape[:3], dtype=_lse_dtype(q), device=q.device)
    mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    _C.attention_forward(q, k, v, mask, causal, scale, out, lse, stream_of(q))
    return out, lse


def _forward_fake(q, k, v, key_padding_mask, causal, scale):
    _check(q, k, v, key_padding_mask)
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


def _backward_impl(grad_out, q, k, v, out, lse, key_padding_mask, causal, scale):
    grad_out = _dense_last_dim(grad_out)
    q, k, v = _dense_last_dim(q), _dense_last_dim(k), _dense_last_dim(v)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    _C.attention_backward(grad_out, q, k, v, out, lse, mask, causal, scale, dq, dk, dv, stream_of(q))
    return dq, dk, dv


def _backward_fake(grad_out, q, k, v, out, lse, key_padding_mask, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


attention_backward_op = define(
    "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor? key_padding_mask, bool causal, float scale) -> (Tensor, Tensor, Tensor)",
    _backward_impl,
    _backward_fake,
)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale = inputs
    out, lse = output
    ctx.causal, ctx.scale = causal, scale
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(grad_out, q, k, v, out, lse, key_padding_mask, ctx.causal, ctx.scale)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None, None)


attention_op = define(
    "attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal, float scale) "
    "-> (Tensor, Tensor)",
    _forward_impl,
    _forward_fake,
    _backward,
    _setup_context,
)


def _check_attn_mask(q, k, attn_mask, op="zerofuse.ops.attention"):
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{op}: 'attn_mask' must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype not in (torch.bool, q.dtype, torch.float32):
        raise TypeError(f"{op}: 'attn_mask' must be bool (True = may attend) or an additive float mask in q's "
                        f"dtype ({q.dtype}) or float32, got {attn_mask.dtype}")
    scores_shape = (*q.shape[:3], k.shape[2])
    try:
        fits = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, scores_shape) == scores_shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{op}: 'attn_mask' of shape {list(attn_mask.shape)} must broadcast to "
                         f"[batch, heads, seq_q, seq_k] = {list(scores_shape)}")
    check_same_device(op, [("q", q), ("attn_mask", attn_mask)])


def _attention_with_mask(q, k, v, attn_mask, key_padding_mask, causal, scale):
    """The fallback for an arbitrary mask: the [seq_q, seq_k] scores exist
    once, in q's dtype, between two batched matrix multiplies (as in
    Megatron's fused-softmax path); the softmax, its scaling and masking are one
    kernel each way."""
    _check(q, k, v, key_padding_mask)
    _check_attn_mask(q, k, attn_mask)
    if key_padding_mask is not None:
        keys = key_padding_mask[:, None, None, :]
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & keys
        else:
            attn_mask = torch.where(keys, attn_mask, torch.full((), float("-inf"), dtype=attn_mask.dtype,
                                                                 device=attn_mask.device))
    dtype = q.dtype
    if q.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        # Most CPUs have no half-precision matrix units: torch's bf16 matmul
        # there ran 10-16x slower than float32 (and torch's own CPU attention
        # computes in float32 too).
        q, k, v = q.float(), k.float(), v.float()
        if attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.float()
    scores = torch.matmul(q, k.transpose(-2, -1))
    probs = masked_softmax(scores, attn_mask, scale=scale, causal=causal)
    return torch.matmul(probs, v).to(dtype)


@honours_torch_function
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q [batch, heads, seq_q, head_dim] and
    k, v [batch, heads, seq_k, head_dim].

    causal: query i sees keys j <= i (top-left aligned, as SDPA's is_causal).
    key_padding_mask: bool [batch, seq_k], True where a key may be attended.
    attn_mask: any other mask, broadcastable to [batch, heads, seq_q, seq_k]:
    bool (True = may attend) or additive float, as SDPA's attn_mask. It takes
    the materialised path (scores, fused masked softmax, probabilities times v),
    so prefer causal / key_padding_mask where they express the mask.
    scale: defaults to head_dim ** -0.5.
    A query that sees no key gets zeros (SDPA gives NaN there).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if attn_mask is not None:
        return _attention_with_mask(q, k, v, attn_mask, key_padding_mask, bool(causal), float(scale))
    return attention_op(q, k, v, key_padding_mask, bool(causal), float(scale))[0]


# --- packed QKV: the output of one fused Linear, [batch, seq, 3 * heads * head_dim] -------------------

def _check_packed(qkv, num_heads, op="zerofuse.ops.attention_qkv_packed"):
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        raise ValueError(f"{op}: 'qkv' must be [batch, seq, 3 * heads * head_dim], got "
                         f"{list(getattr(qkv, 'shape', []))}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"{op}: 'num_heads' must be a positive integer, got {num_heads!r}")
    if qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"{op}: the last dimension of 'qkv' ({qkv.shape[-1]}) must be 3 * num_heads * head_dim "
                         f"(a multiple of {3 * num_heads})")


def _packed_views(qkv, num_heads):
    """q, k, v as [batch, heads, seq, head_dim] views of qkv (no copies)."""
    b, t, c3 = qkv.shape
    q, k, v = qkv.view(b, t, 3, num_heads, c3 // (3 * num_heads)).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _packed_forward_impl(qkv, num_heads, causal, scale):
    _check_packed(qkv, num_heads)
    qkv = qkv.contiguous()
    q, k, v = _packed_views(qkv, num_heads)
    _check(q, k, v, None)
    b, t, c3 = qkv.shape
    out = torch.empty(b, t, c3 // 3, dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty(q.shape[:3], dtype=_lse_dtype(q), device=q.device)
    _C.attention_forward(q, k, v, None, causal, scale, out.view(b, t, num_heads, -1).transpose(1, 2), lse,
                         stream_of(q))
    return out, lse


def _packed_forward_fake(qkv, num_heads, causal, scale):
    _check_packed(qkv, num_heads)
    b, t, c3 = qkv.shape
    return qkv.new_empty(b, t, c3 // 3), qkv.new_empty(b, num_heads, t, dtype=_lse_dtype(qkv))


def _packed_backward_impl(grad_out, qkv, out, lse, num_heads, causal, scale):
    qkv, grad_out = qkv.contiguous(), grad_out.contiguous()
    b, t, c3 = qkv.shape
    heads_view = lambda x: x.view(b, t, num_heads, -1).transpose(1, 2)  # noqa: E731
    # dQ, dK and dV land in one [batch, seq, 3 * channels] buffer: the fused
    # Linear's gradient, with no stack of three separate ones.
    dqkv = torch.empty_like(qkv)
    _C.attention_backward(heads_view(grad_out), *_packed_views(qkv, num_heads), heads_view(out), lse, None, causal,
                          scale, *_packed_views(dqkv, num_heads), stream_of(qkv))
    return dqkv


attention_qkv_packed_backward_op = define(
    "attention_qkv_packed_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads, "
    "bool causal, float scale) -> Tensor",
    _packed_backward_impl,
    lambda grad_out, qkv, out, lse, num_heads, causal, scale: torch.empty_like(
        qkv, memory_format=torch.contiguous_format),
)


def _packed_setup_context(ctx, inputs, output):
    qkv, num_heads, causal, scale = inputs
    out, lse = output
    ctx.num_heads, ctx.causal, ctx.scale = num_heads, causal, scale
    ctx.save_for_backward(qkv, out, lse)


def _packed_backward(ctx, grad_out, _grad_lse):
    qkv, out, lse = ctx.saved_tensors
    dqkv = attention_qkv_packed_backward_op(grad_out, qkv, out, lse, ctx.num_heads, ctx.causal, ctx.scale)
    return dqkv, None, None, None


attention_qkv_packed_op = define(
    "attention_qkv_packed(Tensor qkv, int num_heads, bool causal, float scale) -> (Tensor, Tensor)",
    _packed_forward_impl,
    _packed_forward_fake,
    _packed_backward,
    _packed_setup_context,
)


@honours_torch_function
def attention_qkv_packed(qkv: torch.Tensor, num_heads: int, *, causal: bool = False,
                         scale: Optional[float] = None) -> torch.Tensor:
    """attention() on the output of one fused QKV Linear: qkv [batch, seq,
    3 * heads * head_dim] (q, then k, then v, heads inside each) gives
    [batch, seq, heads * head_dim], ready for the output projection. The same
    kernels as attention(); its backward writes dQ, dK and dV into one
    [batch, seq, 3 * heads * head_dim] gradient instead of three that autograd
    then stacks (a copy of the whole QKV activation per layer)."""
    _check_packed(qkv, num_heads)
    if scale is None:
        scale = (qkv.shape[-1] // (3 * num_heads)) ** -0.5
    return attention_qkv_packed_op(qkv, num_heads, bool(causal), float(scale))[0]
