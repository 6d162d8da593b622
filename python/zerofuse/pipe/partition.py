"""Which layers each pipeline stage gets: DeepSpeed's partition methods.

"uniform": the same number of layers per stage (the first stages take one more
when it does not divide). "parameters": contiguous parts whose heaviest part
(trainable parameters) is as light as possible. "type:REGEX": the same, with
weight 1 for the layers whose class name matches REGEX (case-insensitive)
and 0 for the rest, so the matching layers are spread evenly.
The result is DeepSpeed's `parts`: num_stages + 1 boundaries, stage s holding
layers [parts[s], parts[s + 1]).
"""
import re
from typing import List, Sequence


def partition_uniform(num_items: int, num_parts: int) -> List[int]:
    if num_items <= num_parts:  # a stage per layer, the rest empty
        return [min(p, num_items) for p in range(num_parts + 1)]
    size, extra = divmod(num_items, num_parts)
    parts = [0]
    for p in range(num_parts):
        parts.append(parts[-1] + size + (1 if p < extra else 0))
    return parts


def partition_balanced(weights: Sequence[float], num_parts: int) -> List[int]:
    """Contiguous parts minimising the heaviest part's weight (exact: dynamic
    programming over prefix sums; layers number in the tens to hundreds). Of
    the splits with that bottleneck, the one whose earlier parts are heaviest
    is taken, so ties leave later stages (which also run the loss) lighter."""
    n = len(weights)
    if n <= num_parts:
        return partition_uniform(n, num_parts)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))
    inf = float("inf")
    # best[j][i]: the lightest possible heaviest part splitting layers [0, i) into j parts.
    best = [[inf] * (n + 1) for _ in range(num_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(num_parts + 1)]
    best[0][0] = 0.0
    for j in range(1, num_parts + 1):
        for i in range(j, n + 1):
            for k in range(j - 1, i):  # the last part is [k, i)
                cost = max(best[j - 1][k], prefix[i] - prefix[k])
                if cost <= best[j][i]:  # '<=': the latest k that ties makes earlier parts heavier
                    best[j][i], cut[j][i] = cost, k
    parts = [n]
    for j in range(num_parts, 0, -1):
        parts.append(cut[j][parts[-1]])
    return parts[::-1]


def layer_type_name(layer) -> str:
    from .module import LayerSpec
    if isinstance(layer, LayerSpec):
        return layer.typename.__name__
    if hasattr(layer, "__name__"):
        return layer.__name__
    return type(layer).__name__


def partition_layers(method: str, layers: Sequence, num_stages: int, param_counts: Sequence[int]) -> List[int]:
    """`parts` for `method` ("parameters", "uniform" or "type:REGEX")."""
    if not isinstance(method, str):
        raise ValueError(f"PipelineModule: 'partition_method' must be a string, got {type(method).__name__}")
    lowered = method.lower()
    if lowered == "uniform":
        return partition_uniform(len(layers), num_stages)
    if lowered == "parameters":
        return partition_balanced(param_counts, num_stages)
    if lowered.startswith("type:"):
        pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        weights = [1 if pattern.search(layer_type_name(layer)) else 0 for layer in layers]
        if not any(weights):
            raise ValueError(f"PipelineModule: partition_method {method!r} matches no layer; layer types are "
                             f"{sorted({layer_type_name(layer) for layer in layers})}")
        return partition_balanced(weights, num_stages)
    raise ValueError(f"PipelineModule: 'partition_method' must be 'parameters', 'uniform' or 'type:REGEX', "
                     f"got {method!r}")
