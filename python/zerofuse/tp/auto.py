"""AutoTP: split a Hugging Face model's layers across a tensor-parallel group
in place (DeepSpeed's tp_model_init / "tensor_parallel": {"autotp_size": N}).

What goes where, by the layer's name and place (the same rules cover Llama,
Mistral, Qwen, GPT-2, BERT and models written like them):
  column-parallel   q/k/v projections (q_proj, k_proj, v_proj; query, key, value),
                    GPT-2's fused c_attn (split per head into [q_r, k_r, v_r]),
                    MLP up projections (gate_proj, up_proj, c_fc, fc1, w1, w3,
                    dense_h_to_4h, BERT's intermediate.dense)
  row-parallel      attention outputs and MLP down projections (o_proj, down_proj,
                    c_proj, out_proj, fc2, wo, w2, dense_4h_to_h, BERT's *Output.dense)
  vocab-parallel    the token embedding (VocabParallelEmbedding) and the LM head
                    (split by vocabulary rows, logits gathered for the model's own
                    loss); tied head and embedding stay tied
  replicated        norms, position embeddings, everything else -- a Linear left
                    whole is listed at start-up
Attention heads are split evenly (key/value heads too, for grouped-query
attention); a layout that does not divide is an error naming the layer.
Each rank keeps its slices of the weights the model already has, so the
split model computes exactly what the whole one does.
"""
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, tp_world

COLUMN_NAMES = {"q_proj", "k_proj", "v_proj", "query", "key", "value", "gate_proj", "up_proj", "c_fc", "fc1", "w1",
                "w3", "dense_h_to_4h"}
ROW_NAMES = {"o_proj", "down_proj", "c_proj", "out_proj", "fc2", "wo", "w2", "dense_4h_to_h"}


class AutoTPError(ValueError):
    """A model layout tensor parallelism cannot split (names the layer)."""


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # transformers.pytorch_utils.Conv1D


def _as_linear(module) -> torch.nn.Linear:
    """A Linear computing what `module` (a Linear or GPT-2's transposed Conv1D) computes."""
    if isinstance(module, torch.nn.Linear):
        return module
    weight = module.weight.detach().t()
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device=weight.device,
                             dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def _head_dim(attention):
    for name in ("head_dim", "attention_head_size"):
        if isinstance(getattr(attention, name, None), int):
            return getattr(attention, name)
    return None


def _role(parent, name, child, vocab) -> str:
    if isinstance(child, torch.nn.Embedding):
        return "vocab_embedding" if child.num_embeddings == vocab else "replicated"
    if not (isinstance(child, torch.nn.Linear) or _is_conv1d(child)):
        return "other"
    out_features = child.out_features if isinstance(child, torch.nn.Linear) else child.nf
    if out_features == vocab:
        return "vocab_head"
    if name == "c_attn" and hasattr(parent, "split_size"):
        return "fused_qkv"
    if name in COLUMN_NAMES:
        return "column"
    if name in ROW_NAMES:
        return "row"
    if name == "dense":
        kind = type(parent).__name__
        if kind.endswith("Intermediate"):
            return "column"
        if kind.endswith("Output"):
            return "row"
    return "replicated"


def _check_heads(path, parent, out_features, world):
    head_dim = _head_dim(parent)
    if head_dim is not None and (out_features // head_dim) % world:
        raise AutoTPError(f"tensor parallelism: {path} has {out_features // head_dim} heads (of {head_dim}), not "
                          f"divisible by the tensor-parallel size {world}")


def _localize_attention(parent, world):
    """Head counts the module keeps as attributes, now this rank's."""
    if hasattr(parent, "split_size"):  # GPT-2: c_attn's output is split into q, k, v by this size
        parent.split_size //= world
    for name in ("num_heads", "num_attention_heads", "all_head_size"):
        value = getattr(parent, name, None)
        if isinstance(value, int):
            setattr(parent, name, value // world)


def tp_model_init(model: torch.nn.Module, tp_size: int = None, dtype=None, group=None, mpu=None):
    """Split `model` in place for tensor parallelism over `group` (or the
    tensor-parallel group of `mpu`, or a new grid of tp_size adjacent ranks
    over the world); returns the model, which remembers the grid for
    zerofuse.initialize (`model.zerofuse_tp_grid`). dtype: cast the model first."""
    from . import tensor_parallel_grid
    if group is None:
        if mpu is None:
            mpu = tensor_parallel_grid(tp_size)
        group = mpu.get_tensor_model_parallel_group()
    world = tp_world(group)
    if tp_size is not None and tp_size != world:
        raise AutoTPError(f"tp_model_init: tp_size {tp_size} but the tensor-parallel group has {world} ranks")
    if dtype is not None:
        model.to(dtype)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    replaced: Dict[int, torch.nn.Parameter] = {}  # id of a whole parameter -> its parallel replacement
    left_whole: List[str] = []
    plan: List[Tuple[str, torch.nn.Module, str, torch.nn.Module, str]] = []
    for path, parent in model.named_modules():
        for name, child in parent.named_children():
            role = _role(parent, name, child, vocab)
            full = f"{path}.{name}" if path else name
            if role == "replicated" and (isinstance(child, torch.nn.Linear) or _is_conv1d(child)):
                left_whole.append(full)
            if role not in ("replicated", "other"):
                plan.append((full, parent, name, child, role))
    references = _references(model)
    for full, parent, name, child, role in plan:
        new = _parallel(full, parent, child, role, group, world)
        if _is_conv1d(child):  # checkpoints keep GPT-2's [in, out] layout of the whole weight
            w = new.weight
            w.tp_whole = w.tp_whole._replace(shape=tuple(child.weight.shape), transposed=True)
        for old, fresh in _param_pairs(child, new):
            if id(old) in replaced:  # a tied weight: share the parallel parameter made first
                if replaced[id(old)].shape != fresh.shape:
                    raise AutoTPError(f"tensor parallelism: {full} shares a weight split differently elsewhere")
                _set_param(new, fresh, replaced[id(old)])
            else:
                replaced[id(old)] = fresh
        setattr(parent, name, new)
        if role == "fused_qkv" or name in ("q_proj", "query"):  # once per attention module
            _localize_attention(parent, world)
    # Other places that held a replaced parameter (BERT's cls.predictions.bias is the decoder's bias).
    for pid, owners in references.items():
        if pid in replaced:
            for owner, attr in owners:
                if getattr(owner, attr) is not replaced[pid] and not isinstance(owner, (ColumnParallelLinear,
                                                                                        RowParallelLinear,
                                                                                        VocabParallelEmbedding)):
                    owner._parameters[attr] = replaced[pid]
    model.zerofuse_tp_grid = mpu
    model.zerofuse_tp_left_whole = left_whole
    return model


def _parallel(path, parent, child, role, group, world):
    try:
        if role == "vocab_embedding":
            return VocabParallelEmbedding.from_embedding(child, group)
        if role == "vocab_head":
            return ColumnParallelLinear.from_linear(_as_linear(child), group, gather_output=True)
    except ValueError as e:  # a vocabulary that does not divide
        hint = "" if "pad the vocabulary" in str(e) else "; pad the vocabulary to a multiple of it"
        raise AutoTPError(f"tensor parallelism: {path}: {e}{hint}") from None
    linear = _as_linear(child)
    if role == "fused_qkv":
        if linear.out_features % 3:
            raise AutoTPError(f"tensor parallelism: {path} ({linear.out_features} outputs) is not a fused q, k, v")
        _check_heads(path, parent, linear.out_features // 3, world)
        # [q; k; v] rows, each part split by heads: the slice is [q_r; k_r; v_r].
        third = linear.out_features // 3
        return ColumnParallelLinear(linear.in_features, linear.out_features, linear.bias is not None, False, group,
                                    _whole=(linear.weight, linear.bias, (third,) * 3))
    try:
        if role == "column":
            _check_heads(path, parent, linear.out_features, world)
            return ColumnParallelLinear.from_linear(linear, group)
        return RowParallelLinear.from_linear(linear, group)
    except ValueError as e:
        raise AutoTPError(f"tensor parallelism: {path}: {e}") from None


def _param_pairs(old, new):
    """(whole parameter, its parallel replacement) for weight and bias."""
    pairs = [(old.weight, new.weight)]
    if getattr(old, "bias", None) is not None and getattr(new, "bias", None) is not None:
        pairs.append((old.bias, new.bias))
    return pairs


def _set_param(module, current, shared):
    for name, p in module._parameters.items():
        if p is current:
            module._parameters[name] = shared


def _references(model) -> Dict[int, List[Tuple[torch.nn.Module, str]]]:
    out: Dict[int, List] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((module, name))
    return out


def describe(model) -> str:
    """One line for the start-up report: the split and what stayed whole."""
    whole = getattr(model, "zerofuse_tp_left_whole", [])
    grid = getattr(model, "zerofuse_tp_grid", None)
    size = grid.get_tensor_model_parallel_world_size() if grid is not None else (dist.get_world_size()
                                                                                  if dist.is_initialized() else 1)
    return (f"tensor parallel over {size} ranks; linear layers left whole (replicated): "
            + (", ".join(whole) if whole else "none"))
