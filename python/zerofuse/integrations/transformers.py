"""zerofuse attention as a Hugging Face transformers attention implementation:
after register(), models accept attn_implementation="zerofuse".

transformers hands the function query/key/value as [batch, heads, seq, dim]
and a mask that is None (plain causal or no mask) or a boolean/additive
[batch, 1 or heads, q, k] tensor. zerofuse's kernel takes causal and/or a key
padding mask; a mask that is neither (sliding windows, packed sequences, ...)
and features the kernel does not have (dropout while training, attention
probabilities, soft-capping, position biases) go to transformers' own SDPA
path, so results never change -- only the speed. (zerofuse's own fallback for
an arbitrary mask, attention(attn_mask=...), builds the [q, k] matrix, which
SDPA's memory-efficient kernel does not; on the CPU the two measured within
10% of each other, bench/results/cpu-kernels-*.json.)
"""
import torch

from ..ops.attention import attention

NAME = "zerofuse"


def _as_allowed(mask):
    """Boolean 'may attend' from a boolean or additive mask."""
    if mask.dtype == torch.bool:
        return mask
    return mask == 0


def _split_mask(allowed, causal_hint):
    """(causal, key_padding_mask) that reproduce `allowed` exactly, or None."""
    b, h, q, k = allowed.shape
    if h != 1 and not torch.equal(allowed, allowed[:, :1].expand_as(allowed)):
        return None
    allowed = allowed[:, 0]
    # A causal pattern is top-left aligned as zerofuse's kernel (query i sees keys <= i).
    for causal in ((True, False) if causal_hint else (False, True)):
        if causal and q > k:
            continue
        keys = allowed[:, -1, :] if causal else allowed.any(dim=1)
        expected = keys[:, None, :].expand(b, q, k)
        if causal:
            expected = expected & torch.ones(q, k, dtype=torch.bool, device=allowed.device).tril(k - q)
        if torch.equal(expected, allowed):
            return causal, (None if bool(keys.all()) else keys.contiguous())
    return None


def zerofuse_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                               is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    unsupported = ((dropout > 0.0 and module.training) or kwargs.get("output_attentions")
                   or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
                   or kwargs.get("sliding_window") is not None or query.shape[-1] != value.shape[-1]
                   or query.dtype not in (torch.float32, torch.float16, torch.bfloat16))
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    plan = None
    if not unsupported:
        if attention_mask is None:
            causal = bool(is_causal) and q_len > 1
            if causal and kv_len != q_len:
                plan = None  # decoding against a cache: the pattern is bottom-right aligned
            else:
                plan = (causal, None)
        else:
            plan = _split_mask(_as_allowed(attention_mask), bool(is_causal))
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: every query head gets its key/value head
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    causal, key_padding_mask = plan
    out = attention(query, key, value, causal=causal, key_padding_mask=key_padding_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register():
    """Make attn_implementation="zerofuse" available to transformers models."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, zerofuse_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # None for plain causal, else a boolean mask


def use_zerofuse_attention(model):
    """Switch a loaded transformers model to zerofuse attention."""
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    else:
        model.config._attn_implementation = NAME
    return model
