"""A checkpoint's client_state without pickle: plain values become JSON,
tensors and numpy arrays go to a tensors-only file, and a small marker in the
JSON says where each came from, so loading gives back the same types.

    encode({"epoch": 3, "ema": tensor, "ids": np.array([...]), (1, 2): "x"})
        -> (JSON-able structure, [tensor, tensor])
    decode(structure, tensors) -> the same dict

Supported: None, bool, int, float (nan and inf too), str, list, tuple, dict
(keys of any supported hashable kind), torch.Tensor, numpy.ndarray and numpy
scalars. Anything else is a TypeError naming where in client_state it is.
"""
import math

import torch

_MARK = "__zerofuse__"  # a dict with this key is a marker, not user data


def _describe(where):
    return "client_state" + "".join(f"[{k!r}]" for k in where)


def encode(obj, tensors=None, where=()):
    """(JSON-able structure, tensors): `tensors` is appended to and returned."""
    tensors = [] if tensors is None else tensors
    return _encode(obj, tensors, where), tensors


def _encode(obj, tensors, where):
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {_MARK: "float", "value": repr(obj)}
    if isinstance(obj, torch.Tensor):
        tensors.append(obj.detach().cpu().clone())
        return {_MARK: "tensor", "index": len(tensors) - 1}
    np = _numpy()
    if np is not None and isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f"{_describe(where)}: a numpy array of Python objects cannot be stored without pickle")
        tensors.append(torch.from_numpy(obj.copy()) if obj.dtype.kind != "U" else None)
        if tensors[-1] is None:
            tensors.pop()
            return {_MARK: "strings", "shape": list(obj.shape), "values": obj.reshape(-1).tolist()}
        return {_MARK: "ndarray", "index": len(tensors) - 1}
    if np is not None and isinstance(obj, np.generic):
        return {_MARK: "numpy_scalar", "dtype": str(obj.dtype), "value": _encode(obj.item(), tensors, where)}
    if isinstance(obj, tuple):
        return {_MARK: "tuple", "items": [_encode(x, tensors, where + (i,)) for i, x in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(x, tensors, where + (i,)) for i, x in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and _MARK not in obj:
            return {k: _encode(v, tensors, where + (k,)) for k, v in obj.items()}
        return {_MARK: "dict", "items": [[_encode(k, tensors, where + ("<key>",)), _encode(v, tensors, where + (k,))]
                                         for k, v in obj.items()]}
    raise TypeError(f"{_describe(where)}: {type(obj).__name__} cannot be stored without pickle (use tensors, numpy "
                    "arrays, numbers, strings, None, and lists / tuples / dicts of them)")


def decode(obj, tensors):
    if isinstance(obj, list):
        return [decode(x, tensors) for x in obj]
    if not isinstance(obj, dict):
        return obj
    kind = obj.get(_MARK)
    if kind is None:
        return {k: decode(v, tensors) for k, v in obj.items()}
    if kind == "tensor":
        return tensors[obj["index"]]
    if kind == "ndarray":
        return tensors[obj["index"]].numpy()
    if kind == "strings":
        return _numpy().array(obj["values"]).reshape(obj["shape"])
    if kind == "numpy_scalar":
        return _numpy().dtype(obj["dtype"]).type(decode(obj["value"], tensors))
    if kind == "float":
        return float(obj["value"])
    if kind == "tuple":
        return tuple(decode(x, tensors) for x in obj["items"])
    if kind == "dict":
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in obj["items"]}
    raise ValueError(f"client_state: unknown marker {kind!r} (a checkpoint from a newer zerofuse?)")


def _hashable(key):
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def _numpy():
    try:
        import numpy
        return numpy
    except ImportError:
        return None
